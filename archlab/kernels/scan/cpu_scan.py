"""Diagonal linear recurrence, the fused CPU path: `cpu_scan.c` built on first use.

One pass over memory forward (read a, b; write h) and one backward (read a, h, dh; write
da, db), against the ~5 passes and ~100 PyTorch calls of the blocked torch scan, which is
why this is `auto`'s first choice on CPU when a C compiler is present. The C source has no
Python or torch headers: the system compiler (`$CC`, else cc, gcc or clang) builds it into a
shared library in about a second, cached under `$ARCHLAB_KERNEL_CACHE` (default
`~/.cache/archlab/kernels`) by a hash of the source, compiler, flags and machine type. The library is written to a temporary name and
renamed into place, so Ray workers building at once never load a half-written file.

Threads: up to torch.get_num_threads() at call time (the ctypes call releases the GIL),
one per 2^23 elements at most (smaller problems run on the calling thread: a thread's
start-up and torch's still-spinning OpenMP workers cost more than they save), each taking
whole (batch row, channel block) columns.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from archlab.kernels.scan._io import compute_dtype, scan_in_compute_dtype

SOURCE = Path(__file__).with_name("cpu_scan.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-pthread")
# Elements each thread must have before the call uses another one. Threads here are started
# per call (~70 us) and, worse, compete with torch's OpenMP workers, which keep spinning on
# the other cores for milliseconds after torch's last parallel op. Measured on this 2-core
# machine with torch at 2 threads and a matmul just before each call: [B, 1024, 512] took
# 5.6 ms with 2 threads vs 1.7 ms with 1 at B=4, 9.5 vs 2.9 ms at B=8, and only at B=32
# (16M elements) did 2 threads win (30 vs 42 ms). So: one thread per 2^23 elements at most.
_PER_THREAD_MIN = 1 << 23
_DTYPES = {torch.float32: 0, torch.float64: 1}


class BuildError(RuntimeError):
    """The C compiler is missing or failed; the message has its command and output."""


def find_compiler() -> str | None:
    """The C compiler the path would use, or None: $CC if set, else cc, gcc, clang on PATH."""
    # every auto dispatch asks this; searching PATH costs ~30 us, so remember per (CC, PATH)
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _find_compiler(cc: str | None, path: str | None) -> str | None:
    if cc:
        return shutil.which(cc.split()[0], path=path)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("ARCHLAB_KERNEL_CACHE") or Path.home() / ".cache" / "archlab" / "kernels")


_libs: dict[tuple[str, ...], ctypes.CDLL] = {}
_lock = threading.Lock()


def _build(compiler: str, out: Path, defines: tuple[str, ...] = ()) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *FLAGS, *(f"-D{d}" for d in defines), "-o", tmp, str(SOURCE)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise BuildError(f"building the fused CPU scan failed: `{' '.join(cmd)}` exited "
                             f"{proc.returncode}:\n{proc.stderr.strip() or proc.stdout.strip()}")
        os.replace(tmp, out)  # atomic: a concurrent loader sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(defines: tuple[str, ...] = ()):
    """The compiled kernels (built on first call, then cached on disk and in memory).

    defines: C macros for a variant build (benchmarks/scan_walk.py builds the earlier
    backward walk with ARCHLAB_SCAN_BWD_ASCENDING); the ops themselves use the default.
    """
    defines = tuple(defines)
    lib = _libs.get(defines)
    if lib is not None:
        return lib
    with _lock:
        if defines in _libs:
            return _libs[defines]
        compiler = find_compiler()
        if compiler is None:
            raise BuildError("no C compiler found for the fused CPU scan (looked for $CC, cc, gcc, "
                             "clang on PATH); install one (e.g. `apt install gcc`) or use kernel='torch'")
        # machine in the key too: nodes of another architecture may share this home folder
        ident = " ".join((compiler, *FLAGS, *defines, platform.machine(), platform.system()))
        key = hashlib.sha256(SOURCE.read_bytes() + ident.encode()).hexdigest()[:16]
        name = f"archlab_scan_{key}.so"
        path = cache_dir() / name
        if not path.exists():
            try:
                _build(compiler, path, defines)
            except PermissionError:  # a read-only home: build in this user's temp folder instead
                path = Path(tempfile.gettempdir()) / f"archlab-kernels-{os.getuid()}" / name
                if not path.exists():
                    _build(compiler, path, defines)
        lib = ctypes.CDLL(str(path))
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        lib.archlab_scan_fwd.argtypes = [ctypes.c_int, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
        lib.archlab_scan_fwd.restype = ctypes.c_int
        lib.archlab_scan_bwd.argtypes = [ctypes.c_int, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, ctypes.c_int]
        lib.archlab_scan_bwd.restype = ctypes.c_int
        _libs[defines] = lib
        return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _PER_THREAD_MIN))


def scan_fwd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, lib=None) -> torch.Tensor:
    """a, b [B, T, D] contiguous CPU fp32/fp64 of one dtype, h0 [B, D] or None -> h.
    lib: a load_library() build (default: the standard one)."""
    lib = lib or load_library()
    h = torch.empty_like(b)
    bsz, t, d = b.shape
    rc = lib.archlab_scan_fwd(_DTYPES[b.dtype], _ptr(a), _ptr(b), _ptr(h0), _ptr(h), bsz, t, d,
                              _threads(b.numel()))
    if rc != 0:
        raise RuntimeError(f"fused CPU scan forward: a worker thread failed to join (rc={rc})")
    return h


def scan_bwd(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor,
             want_h0: bool, lib=None):
    """The gradients of h = scan_fwd(a, b, h0) given dh (all contiguous, one dtype) ->
    (da, db, dh0), dh0 None unless want_h0 (and h0 given). lib as in scan_fwd."""
    lib = lib or load_library()
    da, db = torch.empty_like(a), torch.empty_like(a)
    dh0 = torch.empty_like(h0) if want_h0 and h0 is not None else None
    bsz, t, d = a.shape
    rc = lib.archlab_scan_bwd(_DTYPES[a.dtype], _ptr(a), _ptr(h), _ptr(h0), _ptr(dh), _ptr(da), _ptr(db),
                              _ptr(dh0), bsz, t, d, _threads(a.numel()))
    if rc != 0:
        raise RuntimeError(f"fused CPU scan backward: a worker thread failed to join (rc={rc})")
    return da, db, dh0


class _CpuScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0):
        h = scan_fwd(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        return scan_bwd(a, h, h0, dh.contiguous(), want_h0=ctx.needs_input_grad[2])


def _apply(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h through the autograd.Function when a gradient is wanted, else the bare forward:
    autograd's bookkeeping is a fair part of the op's cost at small sizes."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (h0 is not None and h0.requires_grad)):
        return _CpuScan.apply(a, b, h0)
    return scan_fwd(a, b, h0)


def linear_scan_cpu(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """a, b [B, T, D] on CPU, h0 [B, D] or None -> (h, h_T); fp32 inside (fp64 stays fp64), b's dtype out."""
    for name, x in (("a", a), ("b", b), ("h0", h0)):
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"kernel='cpu': {name} is on {x.device}; the fused CPU scan takes CPU tensors")
    if compute_dtype(b) not in _DTYPES:
        raise ValueError(f"kernel='cpu': b has dtype {b.dtype}; expected a float type (fp32 inside, fp64 kept)")
    return scan_in_compute_dtype(_apply, a, b, h0)
