"""Fast paths beside plain-PyTorch references, one folder per op.

Ops (each `kernels/<op>/` has `reference.py`, the source of truth, and fast paths):
- `scan`: diagonal linear recurrence h_t = a_t * h_{t-1} + b_t   -> `linear_scan`
- `ssd`: Mamba-2 chunked state-space duality                     -> `ssd`
- `retention`: RetNet multi-scale retention                      -> `retention`

Every public op takes `kernel="auto" | "reference" | "torch" | "cpu" | "triton" | "mamba_ssm" | "fla"`
("cpu": the fused C scan, scan only).
Importing this package imports neither triton nor mamba-ssm nor fla: availability is
decided with `importlib.util.find_spec` and `torch.cuda.is_available()` only.
"""

from __future__ import annotations

from archlab.kernels._dispatch import KERNELS, OPS, KernelUnavailableError, available_paths, resolve_kernel

__all__ = ["KERNELS", "OPS", "KernelUnavailableError", "available_paths", "resolve_kernel"]
