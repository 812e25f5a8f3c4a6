"""Diagonal linear recurrence. Public entry: `linear_scan(a, b, h0=None, kernel="auto", chunk_size=None)`."""

from __future__ import annotations

import torch

from archlab.kernels import _flops
from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.scan.cpu_scan import linear_scan_cpu
from archlab.kernels.scan.reference import linear_scan_ref
from archlab.kernels.scan.torch_scan import linear_scan_torch

__all__ = ["linear_scan", "linear_scan_ref", "linear_scan_torch"]


def _check(a, b, h0) -> None:
    if b.dim() != 3:
        raise ValueError(f"b must be [B, T, D]; found shape {list(b.shape)}")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"a must have b's shape {list(b.shape)}; found {list(a.shape)}")
    if h0 is not None and tuple(h0.shape) != (b.shape[0], b.shape[2]):
        raise ValueError(f"h0 must be [B, D] = {[b.shape[0], b.shape[2]]}; found {list(h0.shape)}")


def linear_scan(a, b, h0=None, *, kernel: str = "auto", chunk_size: int | None = None):
    """h_t = a_t * h_{t-1} + b_t over [B, T, D] (a of any sign); h0 [B, D] or None (zeros).

    Returns (h [B, T, D], h_T [B, D]) in b's dtype, computed in fp32. Differentiable in a,
    b and h0 on every path. kernel: "auto" | "reference" | "torch" | "cpu" | "triton".
    "cpu" is the fused C loop (built on first use, see cpu_scan.py); if building it fails,
    "auto" logs why once and takes "torch", and an explicit "cpu" raises
    KernelUnavailableError with the compiler's message.
    chunk_size: time steps per block (None: a per-path default); results do not depend on it.
    """
    _check(a, b, h0)
    # the FLOP counter sees none of this (elementwise or fused): one multiply-add per
    # element forward; backward g_t = dh_t + a_{t+1} g_{t+1} and da_t = g_t h_{t-1}: three
    grad = (a.requires_grad or b.requires_grad) and torch.is_grad_enabled()
    _flops.note("linear_scan", 2 * b.numel(), 3 * b.numel() if grad else 0)
    path = resolve_kernel("scan", kernel, b.device)
    if path == "reference":
        return linear_scan_ref(a, b, h0)
    if path == "cpu":
        return linear_scan_cpu(a, b, h0)
    if path == "torch":
        return linear_scan_torch(a, b, h0, chunk_size)
    from archlab.kernels.scan.triton_scan import linear_scan_triton

    return linear_scan_triton(a, b, h0, chunk_size)
