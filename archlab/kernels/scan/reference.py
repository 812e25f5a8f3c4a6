"""Diagonal linear recurrence, the sequential definition (fp32, the source of truth)."""

from __future__ import annotations

import torch


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """h_t = a_t * h_{t-1} + b_t.

    a, b: [B, T, D]; h0: [B, D] or None (zeros). Returns (h [B, T, D], h_T [B, D]),
    computed in fp32 and cast back to b's dtype.
    """
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"a and b must both be [B, T, D]; found {list(a.shape)} and {list(b.shape)}")
    dtype = b.dtype
    # at least fp32 (bf16/fp16 inputs), fp64 stays fp64
    ct = torch.promote_types(b.dtype, torch.float32)
    a32, b32 = a.to(ct), b.to(ct)
    h = torch.zeros_like(b32[:, 0]) if h0 is None else h0.to(ct)
    out = []
    # unbind, not a32[:, t]: indexing one step at a time would make autograd's backward
    # allocate a full [B, T, D] gradient per step (quadratic in T)
    for a_t, b_t in zip(a32.unbind(1), b32.unbind(1)):
        h = a_t * h + b_t
        out.append(h)
    hs = torch.stack(out, dim=1) if out else b32.new_zeros(b32.shape)
    return hs.to(dtype), h.to(dtype)
