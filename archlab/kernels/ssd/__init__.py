"""Mamba-2 SSD. Public entry: `ssd(x, dt, A, B, C, chunk_size=64, initial_state=None, kernel="auto")`."""

from __future__ import annotations

from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.ssd.chunked import ssd_chunked
from archlab.kernels.ssd.reference import ssd_recurrent_ref, ssd_ref

__all__ = ["ssd", "ssd_ref", "ssd_recurrent_ref", "ssd_chunked"]


def ssd(x, dt, A, B, C, *, chunk_size: int = 64, initial_state=None, kernel: str = "auto"):
    """Mamba-2 SSD scan, per head: S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t.

    x [B, T, H, P]; dt [B, T, H] (already positive); A [H] (negative); B, C [B, T, H, N];
    initial_state [B, H, P, N] or None. Returns (y [B, T, H, P], final_state [B, H, P, N]).
    No D skip term (the model adds it). kernel: "auto" | "reference" | "torch" | "mamba_ssm".
    """
    path = resolve_kernel("ssd", kernel, x.device)
    if path == "torch":
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)
    if path == "reference":
        return ssd_ref(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)
    from archlab.kernels.ssd.mamba import ssd_mamba

    return ssd_mamba(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)
