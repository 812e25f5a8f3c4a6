"""Diagonal linear recurrence. Public entry: `linear_scan(a, b, h0=None, kernel="auto")`."""

from __future__ import annotations

from archlab.kernels.scan.reference import linear_scan_ref


def linear_scan(a, b, h0=None, *, kernel: str = "auto"):
    """h_t = a_t * h_{t-1} + b_t over [B, T, D]; returns (h [B, T, D], h_T [B, D])."""
    if kernel in ("auto", "reference"):
        return linear_scan_ref(a, b, h0)
    raise ValueError(f"kernel={kernel!r} is not available for linear_scan (available: reference)")
