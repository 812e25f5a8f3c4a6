"""Linear scan h_t = a_t h_{t-1} + b_t: every path against the sequential reference.

Outputs, final state and the gradients of a, b and h0, at odd sizes and several chunk
sizes, fp32 and bf16. The Triton path runs on CPU under TRITON_INTERPRET=1, which must be
set before triton is first imported: this module sets it at import when it can, and
otherwise re-runs its Triton tests in a fresh interpreter (test_triton_in_subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from archlab.kernels import available_paths
from archlab.kernels.scan import linear_scan, linear_scan_ref
from archlab.kernels.testing import RMS_TOL, assert_close, grads_of, nan_poisoned_empty
from tests.conftest import needs_cc

# Triton runs here in-process if a GPU is present or the interpreter was switched on
# before triton's first import (the case when this module is the first to import it).
TRITON_IN_PROCESS = "triton" in available_paths("scan", "cuda" if torch.cuda.is_available() else "cpu") \
    and ("triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton not usable in this process")


def make_inputs(B, T, D, *, with_h0=True, sign="mixed", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if sign == "mixed":  # |a| <= 1, both signs: exercises the any-sign claim
        a = torch.rand(B, T, D, generator=gen) * 2 - 1
    else:  # gates close to 1, the long-memory regime of RG-LRU / minGRU
        a = 0.9 + 0.1 * torch.rand(B, T, D, generator=gen)
    b = torch.randn(B, T, D, generator=gen)
    h0 = torch.randn(B, D, generator=gen) if with_h0 else None
    leaves = [x.to(dtype).requires_grad_() for x in (a, b) + ((h0,) if with_h0 else ())]
    return leaves


def check_against_reference(kernel, B, T, D, chunk, *, with_h0=True, dtype=torch.float32, sign="mixed"):
    leaves = make_inputs(B, T, D, with_h0=with_h0, dtype=dtype, sign=sign)
    # the reference sees the same (already rounded) values in fp32, so only the path's error is measured
    ref_leaves = [x.detach().float().requires_grad_() for x in leaves]
    with nan_poisoned_empty():
        h, hT = linear_scan(*leaves, kernel=kernel, chunk_size=chunk)
        grads = grads_of((h, hT), leaves)
    h_r, hT_r = linear_scan_ref(*ref_leaves)
    grads_r = grads_of((h_r, hT_r), ref_leaves)
    tol = RMS_TOL[dtype]
    assert h.dtype == dtype and hT.dtype == dtype
    assert_close("h", h, h_r, tol)
    assert_close("h_T", hT, hT_r, tol)
    for name, g, g_r in zip(("da", "db", "dh0"), grads, grads_r):
        assert_close(name, g, g_r, tol)


SIZES = [(2, 63, 60), (1, 1, 5), (3, 130, 17)]
CHUNKS = [1, 16, 64, None]


def ids(B, T, D, C):
    return f"B{B}-T{T}-D{D}-C{C}"


@pytest.mark.parametrize("B,T,D,C", [(*s, c) for s in SIZES for c in CHUNKS],
                         ids=[ids(*s, c) for s in SIZES for c in CHUNKS])
def test_torch_matches_reference_fp32(B, T, D, C):
    check_against_reference("torch", B, T, D, C)


def test_torch_without_initial_state():
    check_against_reference("torch", 2, 63, 60, 16, with_h0=False)


def test_torch_bf16_tiny():
    check_against_reference("torch", 2, 33, 12, 8, dtype=torch.bfloat16)


@pytest.mark.parametrize("sign", ["positive", "mixed"])
def test_torch_stable_at_16k(sign):
    """T = 16384: the blocked scan stays as accurate as the loop (no logs, no divisions).

    The reference's autograd over 16k steps is too slow for CI, so the backward is checked
    through its definition instead: db is the reverse-time scan of dL/dh with decays
    a_{t+1}, which the reference computes forward on flipped inputs (no autograd).
    """
    B, T, D = 1, 16384, 4
    a, b, h0 = make_inputs(B, T, D, sign=sign)
    h, hT = linear_scan(a, b, h0, kernel="torch")
    with torch.no_grad():
        h_r, hT_r = linear_scan_ref(a, b, h0)
    assert_close("h", h, h_r, RMS_TOL[torch.float32])
    assert_close("h_T", hT, hT_r, RMS_TOL[torch.float32])
    dh = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    da, db, dh0 = torch.autograd.grad((h * dh).sum(), (a, b, h0))
    with torch.no_grad():
        a_next = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)
        g_r = linear_scan_ref(a_next.flip(1), dh.flip(1))[0].flip(1)
        h_prev = torch.cat([h0[:, None], h_r[:, :-1]], dim=1)
    assert_close("db", db, g_r, RMS_TOL[torch.float32])
    assert_close("da", da, g_r * h_prev, RMS_TOL[torch.float32])
    assert_close("dh0", dh0, a[:, 0] * g_r[:, 0], RMS_TOL[torch.float32])


def test_zero_gates_and_closed_form():
    """a = 0 resets the state (log-space scans break here); constant a has a closed form."""
    B, T, D = 1, 40, 3
    a = torch.full((B, T, D), 0.5)
    a[:, 10] = 0.0
    b = torch.ones(B, T, D)
    h, hT = linear_scan(a, b, torch.full((B, D), 4.0), kernel="torch", chunk_size=8)
    t = torch.arange(T, dtype=torch.float32)
    # before the reset: h_t = 0.5^(t+1) * 4 + sum_{j=0..t} 0.5^j ; from t=10 on it restarts at 1
    expected = torch.where(t < 10, 4 * 0.5 ** (t + 1) + (1 - 0.5 ** (t + 1)) / 0.5,
                           (1 - 0.5 ** (t - 9)) / 0.5)
    assert_close("h closed form", h[0, :, 0], expected, 1e-6)
    assert_close("h_T", hT, h[:, -1], 0.0)


def test_shape_errors_name_the_argument():
    a = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match=r"a must have b's shape \[2, 5, 4\]"):
        linear_scan(a, torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match=r"h0 must be \[B, D\] = \[2, 3\]"):
        linear_scan(a, a, torch.rand(3))


TRITON_CASES = [(2, 63, 60, 16), (2, 63, 60, 64), (1, 1, 5, 4), (1, 70, 3, 32)]


@needs_triton
@pytest.mark.parametrize("B,T,D,C", TRITON_CASES, ids=[ids(*c) for c in TRITON_CASES])
def test_triton_matches_reference_fp32(B, T, D, C):
    check_against_reference("triton", B, T, D, C)


@needs_triton
def test_triton_without_initial_state_and_bf16():
    check_against_reference("triton", 2, 63, 60, 16, with_h0=False)
    check_against_reference("triton", 1, 17, 9, 8, dtype=torch.bfloat16)


def test_triton_in_subprocess():
    """When triton was imported before this module could switch the interpreter on, run the
    Triton tests above in a fresh Python where it is on from the start."""
    if TRITON_IN_PROCESS:
        pytest.skip("Triton tests ran in this process")
    if "triton" not in available_paths("scan", "cuda") and not _triton_installed():
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton_matches or bf16",
                           "-p", "no:cacheprovider"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# ---- the fused C path (kernel="cpu"): built by the system C compiler on first use ----


@needs_cc
@pytest.mark.parametrize("B,T,D", SIZES, ids=[f"B{B}-T{T}-D{D}" for B, T, D in SIZES])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
def test_cpu_matches_reference_fp32(B, T, D, with_h0):
    check_against_reference("cpu", B, T, D, None, with_h0=with_h0)


@needs_cc
def test_cpu_bf16_and_fp64():
    check_against_reference("cpu", 2, 33, 12, None, dtype=torch.bfloat16)
    # fp64 stays fp64 inside: compare with the fp64 reference to fp64 precision
    a, b, h0 = make_inputs(2, 63, 60, dtype=torch.float64)
    h, hT = linear_scan(a, b, h0, kernel="cpu")
    assert h.dtype == torch.float64
    h_r, hT_r = linear_scan_ref(a, b, h0)
    assert_close("h fp64", h, h_r, 1e-12)
    g = torch.autograd.grad((h * h_r.detach()).sum(), (a, b, h0))
    g_r = torch.autograd.grad((h_r * h_r.detach()).sum(), (a, b, h0))
    for name, x, y in zip(("da", "db", "dh0"), g, g_r):
        assert_close(name + " fp64", x, y, 1e-12)


@needs_cc
def test_cpu_threads_split_channels_exactly():
    """Every (batch row, channel block) is one thread's whole column: the result must not
    depend on the thread count, bit for bit, forward and backward."""
    from archlab.kernels.scan import cpu_scan

    a, b, h0 = make_inputs(3, 200, 301)
    outs = {}
    old = torch.get_num_threads()
    try:
        # let these 180,600 elements use every thread asked for (the real cut-off is 2^23 per thread)
        cpu_scan._PER_THREAD_MIN = 1
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            h, _ = linear_scan(a, b, h0, kernel="cpu")
            outs[n] = (h.detach(), *torch.autograd.grad(h.pow(2).sum(), (a, b, h0)))
    finally:
        torch.set_num_threads(old)
        cpu_scan._PER_THREAD_MIN = 1 << 23
    assert cpu_scan._threads(10_000) == 1
    for n in (2, 5):
        for x, y in zip(outs[1], outs[n]):
            assert torch.equal(x, y), f"threads={n} differs from threads=1"


@needs_cc
def test_cpu_zero_gates_closed_form_and_16k():
    B, T, D = 1, 40, 3
    a = torch.full((B, T, D), 0.5)
    a[:, 10] = 0.0
    h, hT = linear_scan(a, torch.ones(B, T, D), torch.full((B, D), 4.0), kernel="cpu")
    t = torch.arange(T, dtype=torch.float32)
    expected = torch.where(t < 10, 4 * 0.5 ** (t + 1) + (1 - 0.5 ** (t + 1)) / 0.5,
                           (1 - 0.5 ** (t - 9)) / 0.5)
    assert_close("h closed form", h[0, :, 0], expected, 1e-6)
    a, b, h0 = make_inputs(1, 16384, 4, sign="positive")
    with torch.no_grad():
        h, hT = linear_scan(a, b, h0, kernel="cpu")
        h_r, hT_r = linear_scan_ref(a, b, h0)
    assert_close("h 16k", h, h_r, RMS_TOL[torch.float32])
    assert_close("h_T 16k", hT, hT_r, RMS_TOL[torch.float32])


@needs_cc
def test_cpu_refuses_tensors_off_cpu():
    from archlab.kernels.scan.cpu_scan import linear_scan_cpu

    with pytest.raises(ValueError, match=r"kernel='cpu': a is on meta"):
        linear_scan_cpu(torch.empty(1, 2, 3, device="meta"), torch.rand(1, 2, 3))


@pytest.fixture
def fresh_cpu_build(monkeypatch, tmp_path):
    """A process state where the fused scan has not been built yet, with an empty cache."""
    from archlab.kernels import _dispatch
    from archlab.kernels.scan import cpu_scan

    monkeypatch.setattr(cpu_scan, "_libs", {})
    monkeypatch.setattr(_dispatch, "_cpu_build_error", None)
    monkeypatch.setattr(_dispatch, "_cpu_loaded", False)
    monkeypatch.setenv("ARCHLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_cpu_build_failure_is_named_and_auto_falls_back(fresh_cpu_build, monkeypatch, caplog):
    """A compiler that fails: kernel='cpu' raises with its command and output; auto logs
    why once and runs the torch path; nothing half-built is left in the cache."""
    import logging

    from archlab.kernels import KernelUnavailableError, resolve_kernel

    fake = fresh_cpu_build / "badcc"
    fake.write_text("#!/bin/sh\necho 'badcc: simulated compiler failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(KernelUnavailableError, match=r"(?s)kernel='cpu' is unavailable.*badcc.*exited 3.*simulated compiler failure"):
        linear_scan(torch.rand(1, 4, 2), torch.rand(1, 4, 2), kernel="cpu")
    with caplog.at_level(logging.WARNING, logger="archlab.kernels"):
        assert resolve_kernel("scan", "auto", torch.device("cpu")) == "torch"
        h, _ = linear_scan(torch.rand(1, 4, 2), torch.rand(1, 4, 2))  # auto: runs on torch
    assert h.shape == (1, 4, 2)
    cache = fresh_cpu_build / "cache"
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


def test_cpu_without_compiler_is_unavailable(fresh_cpu_build, monkeypatch):
    from archlab.kernels import KernelUnavailableError, available_paths

    monkeypatch.setenv("PATH", str(fresh_cpu_build))  # no cc, gcc or clang here
    monkeypatch.delenv("CC", raising=False)
    assert "cpu" not in available_paths("scan", "cpu")
    assert available_paths("scan", "cpu")[0] == "torch"
    with pytest.raises(KernelUnavailableError, match=r"no C compiler found"):
        linear_scan(torch.rand(1, 4, 2), torch.rand(1, 4, 2), kernel="cpu")


@needs_cc
def test_cpu_build_is_cached_and_atomic(fresh_cpu_build):
    """First use builds one library into the cache, named by the source's hash; a second
    process state loads it without building (no temporary files left behind)."""
    from archlab.kernels.scan import cpu_scan

    cpu_scan.load_library()
    built = sorted(p.name for p in (fresh_cpu_build / "cache").iterdir())
    assert len(built) == 1 and built[0].startswith("archlab_scan_") and built[0].endswith(".so"), built
    mtime = (fresh_cpu_build / "cache" / built[0]).stat().st_mtime_ns
    cpu_scan._libs.clear()
    cpu_scan.load_library()
    assert sorted(p.name for p in (fresh_cpu_build / "cache").iterdir()) == built
    assert (fresh_cpu_build / "cache" / built[0]).stat().st_mtime_ns == mtime


@needs_cc
def test_cpu_build_falls_back_to_temp_when_cache_is_read_only(fresh_cpu_build, monkeypatch):
    """A cache folder that cannot be written (read-only home): the library is built in the
    user's temp folder instead, and the path still runs."""
    import tempfile

    from archlab.kernels.scan import cpu_scan

    cache, tmp = fresh_cpu_build / "cache", fresh_cpu_build / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_build = cpu_scan._build

    def build(compiler, out, defines=()):  # what mkdir/mkstemp raise in a folder the user cannot write
        if cache in out.parents:
            raise PermissionError(13, "Permission denied", str(out.parent))
        return real_build(compiler, out, defines)

    monkeypatch.setattr(cpu_scan, "_build", build)
    h, _ = linear_scan(torch.ones(1, 3, 2), torch.ones(1, 3, 2), kernel="cpu")
    assert torch.equal(h[0, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert len(list(tmp.rglob("archlab_scan_*.so"))) == 1 and not cache.exists()


@needs_cc
def test_cpu_backward_walk_order_changes_no_bit():
    """The backward walks channels high to low (a memory-order choice, see cpu_scan.c); the
    earlier ascending walk, built as a variant for benchmarks/scan_walk.py, must give the
    same gradients bit for bit, and the variant must be cached apart from the default."""
    from archlab.kernels.scan import cpu_scan

    a, b, h0 = (x.detach() for x in make_inputs(3, 61, 37))
    h = cpu_scan.scan_fwd(a, b, h0)
    dh = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    grads = {}
    for defines in ((), ("ARCHLAB_SCAN_BWD_ASCENDING",)):
        grads[defines] = cpu_scan.scan_bwd(a, h, h0, dh, want_h0=True, lib=cpu_scan.load_library(defines))
    assert cpu_scan.load_library(()) is not cpu_scan.load_library(("ARCHLAB_SCAN_BWD_ASCENDING",))
    for x, y in zip(*grads.values()):
        assert torch.equal(x, y)
    # and both equal autograd through the reference loop
    ar, br, h0r = (x.clone().requires_grad_() for x in (a, b, h0))
    hr, _ = linear_scan_ref(ar, br, h0r)
    ref = torch.autograd.grad(hr, (ar, br, h0r), dh)
    for name, x, y in zip(("da", "db", "dh0"), grads[()], ref):
        assert_close(name, x, y, 1e-6)


@needs_cc
def test_cpu_shortcuts_give_the_general_paths_results():
    """The fused path skips conversions for ready fp32 inputs (scan_in_compute_dtype) and
    skips autograd when no gradient is wanted; strided inputs, inputs that need no gradient
    under grad mode, and no_grad must all still give the reference's h and h_T (and h_T
    must be h's last step)."""
    a, b, h0 = (x.detach() for x in make_inputs(2, 45, 24))
    h_r, hT_r = linear_scan_ref(a, b, h0)
    # strided: [B, D, T] storage seen as [B, T, D]
    a_s, b_s = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
    assert not a_s.is_contiguous()
    for name, args, grad_mode in (("ready, grad mode, nothing requires grad", (a, b, h0), True),
                                  ("ready, no_grad", (a, b, h0), False),
                                  ("strided", (a_s, b_s, h0), True),
                                  ("no h0", (a, b, None), True)):
        with torch.set_grad_enabled(grad_mode):
            h, hT = linear_scan(*args, kernel="cpu")
        ref_h, ref_hT = (h_r, hT_r) if args[2] is not None else linear_scan_ref(a, b)
        assert not h.requires_grad, name
        assert_close(f"h {name}", h, ref_h, 1e-6)
        assert torch.equal(hT, h[:, -1]), name
        assert_close(f"hT {name}", hT, ref_hT, 1e-6)
