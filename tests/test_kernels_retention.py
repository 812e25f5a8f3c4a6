"""Retention: parallel, recurrent and chunkwise forms against the step-by-step reference,
on outputs, final state and the gradients of q, k, v, gamma and the initial state."""

from __future__ import annotations

import pytest
import torch

from archlab.kernels import KernelUnavailableError, available_paths
from archlab.kernels.retention import retention, retention_ref, retention_step
from archlab.kernels.testing import RMS_TOL, assert_close, grads_of, nan_poisoned_empty

NAMES = ("dq", "dk", "dv", "dgamma", "dS0")


def make_inputs(Bsz, H, T, K, V, *, with_state=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(Bsz, H, T, K, generator=gen) / K ** 0.5
    k = torch.randn(Bsz, H, T, K, generator=gen)
    v = torch.randn(Bsz, H, T, V, generator=gen)
    # RetNet's multi-scale decays 1 - 2^(-5-i), plus faster ones so short ranges are exercised
    gamma = 1 - 2.0 ** (-torch.linspace(1, 8, H))
    s0 = torch.randn(Bsz, H, K, V, generator=gen) if with_state else None
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [gamma.requires_grad_()]
    state = s0.to(dtype).requires_grad_() if with_state else None
    return leaves, state


def run(fn, leaves, state, **kw):
    o, s = fn(*leaves, initial_state=state, **kw)
    inputs = leaves + ([state] if state is not None else [])
    return o, s, grads_of((o, s), inputs)


def check(dims, mode, chunk, *, with_state=True, dtype=torch.float32, kernel="torch"):
    leaves, state = make_inputs(*dims, with_state=with_state, dtype=dtype)
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    ref_state = state.detach().float().requires_grad_() if state is not None else None
    with nan_poisoned_empty():
        o, s, grads = run(retention, leaves, state, mode=mode, chunk_size=chunk, kernel=kernel)
    o_r, s_r, grads_r = run(retention_ref, ref_leaves, ref_state)
    tol = RMS_TOL[dtype]
    assert o.dtype == dtype
    assert_close("o", o, o_r, tol)
    assert_close("final_state", s, s_r, tol)
    for name, g, g_r in zip(NAMES, grads, grads_r):
        assert_close(name, g, g_r, tol)


DIMS = [(2, 2, 63, 60, 20), (1, 1, 1, 3, 2), (2, 3, 100, 7, 5)]
CASES = [("parallel", 64), ("recurrent", 64), ("chunkwise", 8), ("chunkwise", 16), ("chunkwise", 64),
         ("auto", 64)]


def dim_id(d, mode, c):
    return "B{}-H{}-T{}-K{}-V{}".format(*d) + f"-{mode}-C{c}"


@pytest.mark.parametrize("dims,mode,chunk", [(d, m, c) for d in DIMS for m, c in CASES],
                         ids=[dim_id(d, m, c) for d in DIMS for m, c in CASES])
def test_torch_matches_reference_fp32(dims, mode, chunk):
    check(dims, mode, chunk)


def test_without_initial_state():
    check((2, 2, 63, 12, 10), "chunkwise", 16, with_state=False)
    check((2, 2, 63, 12, 10), "parallel", 16, with_state=False)


def test_bf16_tiny():
    check((1, 2, 20, 6, 4), "chunkwise", 8, dtype=torch.bfloat16)


def test_retention_step_decodes_like_the_parallel_form():
    """Stepping token by token from an initial state gives the same outputs and state."""
    (q, k, v, gamma), s0 = make_inputs(2, 3, 30, 5, 4)
    o, s = retention(q, k, v, gamma, mode="parallel", initial_state=s0)
    state = s0
    for t in range(q.shape[2]):
        o_t, state = retention_step(q[:, :, t], k[:, :, t], v[:, :, t], gamma, state)
        assert_close(f"o[{t}]", o_t, o[:, :, t], 1e-5)
    assert_close("final_state", state, s, 1e-5)
    o0, s_first = retention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], gamma, None)
    assert_close("first step from no state", s_first, k[:, :, 0, :, None] * v[:, :, 0, None, :], 0.0)


def test_decay_matches_closed_form():
    """One key at t=0 and constant queries: o_t = gamma^t (q . k) v exactly."""
    T = 12
    q = torch.ones(1, 1, T, 2)
    k = torch.zeros(1, 1, T, 2)
    k[..., 0, :] = torch.tensor([1.0, 2.0])
    v = torch.zeros(1, 1, T, 1)
    v[..., 0, 0] = 3.0
    gamma = torch.tensor([0.8])
    expected = 0.8 ** torch.arange(T, dtype=torch.float32) * 3.0 * 3.0
    for mode in ("parallel", "recurrent", "chunkwise"):
        o, _ = retention(q, k, v, gamma, mode=mode, chunk_size=5)
        assert_close(f"o ({mode})", o[0, 0, :, 0], expected, 1e-6)


def test_errors_name_the_argument():
    (q, k, v, gamma), _ = make_inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"gamma must be a tensor \[H\] = \[2\]"):
        retention(q, k, v, gamma[:1])
    with pytest.raises(ValueError, match=r"mode='fast' is not a retention mode"):
        retention(q, k, v, gamma, mode="fast")
    with pytest.raises(ValueError, match=r"v must be \[B, H, T, V\]"):
        retention(q, k, v[:, :, :4], gamma)


@pytest.mark.skipif("fla" not in available_paths("retention", "cuda"),
                    reason="flash-linear-attention with a CUDA device is not available here")
def test_fla_matches_reference_fp32():
    leaves, state = make_inputs(2, 2, 63, 64, 64)
    cuda = [x.detach().cuda().requires_grad_() for x in leaves]
    s_cuda = state.detach().cuda().requires_grad_()
    o, s, grads = run(retention, cuda, s_cuda, kernel="fla")
    o_r, s_r, grads_r = run(retention_ref, leaves, state)
    assert_close("o", o.cpu(), o_r, 1e-3)  # TF32 inside fla's kernels
    assert_close("final_state", s.cpu(), s_r, 1e-3)
    for name, g, g_r in zip(NAMES, grads, grads_r):
        if g is not None:  # fla's simple_gla gives no gradient for a constant gate here
            assert_close(name, g.cpu(), g_r, 1e-3)


def test_fla_unavailable_names_package_or_device():
    if "fla" in available_paths("retention", "cpu"):
        pytest.skip("fla runs here")
    (q, k, v, gamma), _ = make_inputs(1, 1, 4, 2, 2)
    with pytest.raises(KernelUnavailableError, match=r"flash-linear-attention|CUDA"):
        retention(q, k, v, gamma, kernel="fla")
