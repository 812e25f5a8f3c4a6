"""SSD through mamba-ssm's fused Triton kernel (`mamba_chunk_scan_combined`), CUDA only.

mamba-ssm is imported here, inside the call, never at import time of archlab (it fails to
import without its CUDA extension: STACK_NOTES). Its argument convention matches ours:
x [B,T,H,P], dt [B,T,H], A [H], B/C [B,T,G,N] with G groups (we pass G = H), and it
returns the final state as [B, H, P, N]. dt is already positive here, so no softplus.
"""

from __future__ import annotations

from archlab.kernels.ssd.reference import check_ssd_shapes


def ssd_mamba(x, dt, A, B, C, *, chunk_size: int = 64, initial_state=None):
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    y, final_state = mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, initial_states=initial_state,
        dt_softplus=False, return_final_states=True)
    return y, final_state
