"""Which kernel path runs an op: availability checks, `auto` choice, clear errors.

Cheap by design: `available_paths` never imports triton, mamba_ssm or fla (the CLI calls
it to print `archlab archs`); it only asks `importlib.util.find_spec` and CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger("archlab.kernels")

KERNELS = ("auto", "reference", "torch", "cpu", "triton", "mamba_ssm", "fla")

# Paths each op implements, fastest first: `auto` takes the first available one.
# `reference` is last because it is the slow source of truth, never an automatic choice.
OPS: dict[str, tuple[str, ...]] = {
    # cpu first: the fused C scan (one memory pass; built on first use by the system C
    # compiler) when a compiler is present and the tensors are on CPU.
    # triton after torch: the Triton scan is verified only under the CPU interpreter and has
    # no GPU timing yet, so `auto` does not bet a user's run on it; kernel="triton" asks for it
    "scan": ("cpu", "torch", "triton", "reference"),
    "ssd": ("mamba_ssm", "torch", "reference"),
    "retention": ("fla", "torch", "reference"),
}

# The import name of each optional package behind a path, and what to install.
_PACKAGE = {"triton": ("triton", "triton"), "mamba_ssm": ("mamba_ssm", "mamba-ssm"),
            "fla": ("fla", "flash-linear-attention")}


class KernelUnavailableError(RuntimeError):
    """A kernel path was asked for explicitly but cannot run here (package or device)."""


# Set once when building the fused C scan failed in this process: `auto` stops choosing it
# and an explicit kernel="cpu" reports this message.
_cpu_build_error: str | None = None
# Set once the fused C scan is loaded in this process: from then on it can run whatever
# $CC or $PATH say, and scan dispatch on CPU skips the checks (they cost ~10 us a call, and
# several times that right after other work has pushed them out of the CPU's caches).
_cpu_loaded = False


def _cpu_ready() -> str | None:
    """Build (first call) and load the fused C scan; None when it works, else why not."""
    global _cpu_build_error, _cpu_loaded
    if _cpu_build_error is not None:
        return _cpu_build_error
    from archlab.kernels.scan.cpu_scan import BuildError, load_library

    try:
        load_library()
    except (BuildError, OSError) as err:  # OSError: the .so would not load
        _cpu_build_error = f"the fused C scan could not be built or loaded: {err}"
        log.warning("kernels: %s; scan falls back to the torch path", _cpu_build_error)
    else:
        _cpu_loaded = True
    return _cpu_build_error


def _interpret() -> bool:
    # Triton's CPU interpreter: exact but slow; only used when the user sets it (tests).
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_unavailable(op: str, path: str, device: torch.device | None) -> str | None:
    """None when `path` can run `op` on `device`; otherwise the reason, naming what is missing."""
    if op not in OPS:
        return f"unknown op {op!r}; expected one of {sorted(OPS)}"
    if path not in OPS[op]:
        return f"op {op!r} has no {path!r} path; its paths are {list(OPS[op])}"
    if path in ("reference", "torch"):
        return None
    if path == "cpu":
        if device is not None and device.type != "cpu":
            return f"tensors are on {device.type!r}: the fused C scan takes CPU tensors"
        if _cpu_loaded:
            return None
        if _cpu_build_error is not None:
            return _cpu_build_error
        from archlab.kernels.scan.cpu_scan import find_compiler  # builds nothing, imports no optional package

        if find_compiler() is None:
            return "no C compiler found (looked for $CC, cc, gcc, clang on PATH) to build the fused C scan"
        return None
    module, pip_name = _PACKAGE[path]
    if importlib.util.find_spec(module) is None:
        return f"package {pip_name!r} (import {module!r}) is not installed"
    cuda_here = torch.cuda.is_available()
    on_cuda = device.type == "cuda" if device is not None else cuda_here
    if path == "triton":
        if on_cuda or _interpret():
            return None
        if device is not None and device.type != "cuda":
            return (f"tensors are on {device.type!r}: the Triton path needs CUDA tensors, "
                    "or TRITON_INTERPRET=1 (set before triton is imported) to run on CPU")
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it on CPU)"
    # mamba_ssm and fla ship CUDA/Triton kernels with no CPU fallback.
    if not on_cuda:
        where = f"tensors are on {device.type!r}" if device is not None else "no CUDA device"
        return f"{where}: the {path!r} path needs CUDA tensors"
    return None


def available_paths(op: str, device: torch.device | str | None = None) -> list[str]:
    """Paths usable for `op` ("scan" | "ssd" | "retention") on this machine, fastest first.

    With `device`, for tensors on that device. Triton on CPU counts as available only under
    TRITON_INTERPRET=1 (the exact but slow interpreter used by the tests).
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    dev = torch.device(device) if device is not None else None
    return [p for p in OPS[op] if _why_unavailable(op, p, dev) is None]


_logged: set[tuple[str, str, str]] = set()


def resolve_kernel(op: str, kernel: str, device: torch.device) -> str:
    """The concrete path for `kernel` on `device`; raises KernelUnavailableError if it cannot run.

    `auto` takes the fastest available path, except Triton under the CPU interpreter (exact
    but hundreds of times slower than the torch path), and logs its choice once per
    (op, device type, path). Choosing "cpu" builds the fused C scan on first use (about a
    second); if that fails, `auto` takes the next path and an explicit "cpu" raises.
    """
    if _cpu_loaded and op == "scan" and device.type == "cpu" and (
            kernel == "cpu" or (kernel == "auto" and ("scan", "cpu", "cpu") in _logged)):
        return "cpu"  # the common case, decided before (see _cpu_loaded)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not a kernel name; expected one of {list(KERNELS)}")
    if kernel == "auto":
        for path in OPS[op]:
            if path == "triton" and device.type != "cuda":
                continue
            if _why_unavailable(op, path, device) is None:
                if path == "cpu" and _cpu_ready() is not None:
                    continue
                key = (op, device.type, path)
                if key not in _logged:
                    _logged.add(key)
                    log.info("kernels: %s on %s uses the %r path (auto)", op, device.type, path)
                return path
        raise KernelUnavailableError(f"no path available for {op!r} on {device}")  # unreachable: torch
    why = _why_unavailable(op, kernel, device)
    if why is None and kernel == "cpu":  # why is None: the op has a cpu path
        why = _cpu_ready()
    if why is not None:
        raise KernelUnavailableError(f"{op}: kernel={kernel!r} is unavailable: {why}")
    return kernel
