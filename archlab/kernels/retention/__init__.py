"""RetNet retention. Public entries: `retention(...)` and `retention_step(...)`."""

from __future__ import annotations

from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.retention.reference import check_retention_shapes, retention_ref, retention_step_ref
from archlab.kernels.retention.torch_impl import (retention_chunkwise, retention_parallel,
                                                  retention_recurrent)

__all__ = ["retention", "retention_step", "retention_ref", "retention_parallel",
           "retention_recurrent", "retention_chunkwise"]

MODES = ("auto", "parallel", "recurrent", "chunkwise")


def retention(q, k, v, gamma, *, mode: str = "auto", chunk_size: int = 64, initial_state=None,
              kernel: str = "auto"):
    """Retention: per head S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t.

    q, k [B, H, T, K]; v [B, H, T, V]; gamma [H] in (0, 1); initial_state [B, H, K, V] or None.
    Returns (o [B, H, T, V], final_state [B, H, K, V]). No scaling or normalisation inside.
    kernel: "auto" | "reference" | "torch" | "fla". mode (torch path only): "parallel",
    "recurrent", "chunkwise", or "auto" = chunkwise (one chunk, i.e. parallel, when T <= chunk_size).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a retention mode; expected one of {list(MODES)}")
    path = resolve_kernel("retention", kernel, q.device)
    if path == "reference":
        return retention_ref(q, k, v, gamma, initial_state=initial_state)
    if path == "fla":
        from archlab.kernels.retention.fla import retention_fla

        return retention_fla(q, k, v, gamma, chunk_size=chunk_size, initial_state=initial_state)
    if mode == "parallel":
        return retention_parallel(q, k, v, gamma, initial_state=initial_state)
    if mode == "recurrent":
        return retention_recurrent(q, k, v, gamma, initial_state=initial_state)
    return retention_chunkwise(q, k, v, gamma, chunk_size=chunk_size, initial_state=initial_state)


def retention_step(q_t, k_t, v_t, gamma, state):
    """One decoding step. q_t, k_t [B, H, K]; v_t [B, H, V]; gamma [H]; state [B, H, K, V] or None.

    Returns (o_t [B, H, V], state [B, H, K, V]) in q_t's dtype; the state is kept in fp32 when
    given in fp32 (pass an fp32 state for long bf16 decodes).
    """
    if q_t.dim() != 3 or tuple(k_t.shape) != tuple(q_t.shape):
        raise ValueError(f"q_t and k_t must both be [B, H, K]; found {list(q_t.shape)} and {list(k_t.shape)}")
    if v_t.dim() != 3 or tuple(v_t.shape[:2]) != tuple(q_t.shape[:2]):
        raise ValueError(f"v_t must be [B, H, V] with [B, H] = {list(q_t.shape[:2])}; found {list(v_t.shape)}")
    if tuple(gamma.shape) != (q_t.shape[1],):
        raise ValueError(f"gamma must be [H] = [{q_t.shape[1]}]; found {list(gamma.shape)}")
    b, h, dk = q_t.shape
    if state is not None and tuple(state.shape) != (b, h, dk, v_t.shape[-1]):
        raise ValueError(f"state must be [B, H, K, V] = {[b, h, dk, v_t.shape[-1]]}; found {list(state.shape)}")
    sdtype = state.dtype if state is not None else q_t.dtype
    s32 = None if state is None else state.float()
    o_t, s32 = retention_step_ref(q_t.float(), k_t.float(), v_t.float(), gamma.float(), s32)
    return o_t.to(q_t.dtype), s32.to(sdtype)
