"""The input/output convention the scan's fast paths share: compute in at least fp32 on
contiguous inputs, return (h, h_T) in b's dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch


def compute_dtype(b: torch.Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 inputs run in fp32); fp64 stays fp64."""
    return torch.promote_types(b.dtype, torch.float32)


def _in(x: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """x as a contiguous ct tensor: x itself when it already is one (the common case, where
    .to and .contiguous would return x too, but at a dispatcher call apiece: at small sizes
    these calls are a fair part of a fast path's whole cost)."""
    return x if x.dtype == ct and x.is_contiguous() else x.to(ct).contiguous()


def scan_in_compute_dtype(apply: Callable, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None):
    """h = apply(a, b, h0) on contiguous copies in compute_dtype(b) -> (h [B, T, D], h_T [B, D])
    in b's dtype. h_T is h's last step, or h0 (zeros without one) when T = 0."""
    dtype, ct = b.dtype, compute_dtype(b)
    a32, b32 = _in(a, ct), _in(b, ct)
    h032 = None if h0 is None else _in(h0, ct)
    h = apply(a32, b32, h032)
    h_T = h[:, -1] if b.shape[1] > 0 else (b32.new_zeros(b.shape[0], b.shape[2]) if h0 is None else h032)
    return (h, h_T) if dtype == ct else (h.to(dtype), h_T.to(dtype))
