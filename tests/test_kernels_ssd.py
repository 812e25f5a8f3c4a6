"""Mamba-2 SSD: the chunked listing against the step-by-step recurrence, and every fast
path against the listing, on outputs, final state and the gradients of all six inputs."""

from __future__ import annotations

import pytest
import torch

from archlab.kernels import KernelUnavailableError, available_paths
from archlab.kernels.ssd import ssd, ssd_recurrent_ref, ssd_ref
from archlab.kernels.testing import RMS_TOL, assert_close, grads_of, nan_poisoned_empty

NAMES = ("dx", "ddt", "dA", "dB", "dC", "dS0")


def make_inputs(Bsz, T, H, P, N, *, with_state=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, H, P, generator=gen)
    # dt after softplus in Mamba-2 lies around 1e-3..1e-1; wider here so decays matter
    dt = torch.rand(Bsz, T, H, generator=gen) * 0.5 + 0.01
    A = -(torch.rand(H, generator=gen) * 3 + 0.2)
    Bm = torch.randn(Bsz, T, H, N, generator=gen)
    Cm = torch.randn(Bsz, T, H, N, generator=gen)
    s0 = torch.randn(Bsz, H, P, N, generator=gen) if with_state else None
    leaves = [v.to(dtype).requires_grad_() for v in (x, dt, A, Bm, Cm)]
    state = s0.to(dtype).requires_grad_() if with_state else None
    return leaves, state


def run(fn, leaves, state, **kw):
    y, s = fn(*leaves, initial_state=state, **kw)
    inputs = leaves + ([state] if state is not None else [])
    return y, s, grads_of((y, s), inputs)


def check(kernel, dims, chunk, *, with_state=True, dtype=torch.float32):
    leaves, state = make_inputs(*dims, with_state=with_state, dtype=dtype)
    ref_leaves = [v.detach().float().requires_grad_() for v in leaves]
    ref_state = state.detach().float().requires_grad_() if state is not None else None
    with nan_poisoned_empty():
        y, s, grads = run(ssd, leaves, state, chunk_size=chunk, kernel=kernel)
    y_r, s_r, grads_r = run(ssd_ref, ref_leaves, ref_state, chunk_size=chunk)
    tol = RMS_TOL[dtype]
    assert y.dtype == dtype
    assert_close("y", y, y_r, tol)
    assert_close("final_state", s, s_r, tol)
    for name, g, g_r in zip(NAMES, grads, grads_r):
        assert_close(name, g, g_r, tol)


DIMS = [(2, 63, 2, 12, 10), (1, 1, 1, 3, 2), (2, 100, 3, 5, 7)]
CHUNKS = [8, 16, 64]


def dim_id(d, c):
    return "B{}-T{}-H{}-P{}-N{}".format(*d) + f"-C{c}"


@pytest.mark.parametrize("dims,chunk", [(d, c) for d in DIMS for c in CHUNKS],
                         ids=[dim_id(d, c) for d in DIMS for c in CHUNKS])
def test_listing_matches_recurrence(dims, chunk):
    """The paper's chunked listing equals the step-by-step definition, forward and backward."""
    leaves, state = make_inputs(*dims)
    y, s, grads = run(ssd_ref, leaves, state, chunk_size=chunk)
    y_r, s_r, grads_r = run(ssd_recurrent_ref, leaves, state)
    assert_close("y", y, y_r, 1e-5)
    assert_close("final_state", s, s_r, 1e-5)
    for name, g, g_r in zip(NAMES, grads, grads_r):
        assert_close(name, g, g_r, 1e-5)


@pytest.mark.parametrize("dims,chunk", [(d, c) for d in DIMS for c in CHUNKS],
                         ids=[dim_id(d, c) for d in DIMS for c in CHUNKS])
def test_torch_matches_reference_fp32(dims, chunk):
    check("torch", dims, chunk)


def test_torch_without_initial_state():
    check("torch", (2, 63, 2, 12, 10), 16, with_state=False)


def test_torch_bf16_tiny():
    check("torch", (1, 20, 2, 4, 3), 8, dtype=torch.bfloat16)


def test_chunk_size_does_not_change_results():
    leaves, state = make_inputs(1, 50, 2, 4, 3)
    y1, s1 = ssd(*leaves, initial_state=state, chunk_size=7, kernel="torch")
    y2, s2 = ssd(*leaves, initial_state=state, chunk_size=50, kernel="torch")
    assert_close("y", y1, y2, 1e-5)
    assert_close("final_state", s1, s2, 1e-5)


def test_state_carries_across_calls():
    """Running [0, T1) then [T1, T) from the carried state equals one call over [0, T)."""
    leaves, state = make_inputs(2, 40, 2, 4, 3)
    y, s = ssd(*leaves, initial_state=state, kernel="torch", chunk_size=8)
    first = [v[:, :25] if v.dim() > 1 else v for v in leaves]
    second = [v[:, 25:] if v.dim() > 1 else v for v in leaves]
    y1, s1 = ssd(*first, initial_state=state, kernel="torch", chunk_size=8)
    y2, s2 = ssd(*second, initial_state=s1, kernel="torch", chunk_size=8)
    assert_close("y", torch.cat([y1, y2], 1), y, 1e-5)
    assert_close("final_state", s2, s, 1e-5)


def test_shape_errors_name_the_argument():
    (x, dt, A, Bm, Cm), _ = make_inputs(1, 5, 2, 3, 4)
    with pytest.raises(ValueError, match=r"dt must be \[B, T, H\] = \[1, 5, 2\]"):
        ssd(x, dt[:, :4], A, Bm, Cm)
    with pytest.raises(ValueError, match=r"A must be \[H\] = \[2\]"):
        ssd(x, dt, A[:1], Bm, Cm)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, P, N\] = \[1, 2, 3, 4\]"):
        ssd(x, dt, A, Bm, Cm, initial_state=torch.zeros(1, 2, 4, 3))


@pytest.mark.skipif("mamba_ssm" not in available_paths("ssd", "cuda"),
                    reason="mamba-ssm with a CUDA device is not available here")
def test_mamba_ssm_matches_reference_fp32():
    leaves, state = make_inputs(2, 63, 2, 64, 16)
    cuda = [v.detach().cuda().requires_grad_() for v in leaves]
    s_cuda = state.detach().cuda().requires_grad_()
    y, s, grads = run(ssd, cuda, s_cuda, chunk_size=16, kernel="mamba_ssm")
    y_r, s_r, grads_r = run(ssd_ref, leaves, state, chunk_size=16)
    assert_close("y", y.cpu(), y_r, 1e-3)  # TF32 inside mamba's kernels
    assert_close("final_state", s.cpu(), s_r, 1e-3)
    for name, g, g_r in zip(NAMES, grads, grads_r):
        assert_close(name, g.cpu(), g_r, 1e-3)


def test_mamba_ssm_unavailable_names_package_or_device():
    if "mamba_ssm" in available_paths("ssd", "cpu"):
        pytest.skip("mamba_ssm runs here")
    (x, dt, A, Bm, Cm), _ = make_inputs(1, 4, 1, 2, 2)
    with pytest.raises(KernelUnavailableError, match=r"mamba-ssm|CUDA"):
        ssd(x, dt, A, Bm, Cm, kernel="mamba_ssm")
