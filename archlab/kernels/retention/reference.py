"""Retention (RetNet), the source of truth: the recurrence, one step at a time, in fp32.

Per head, with state S_t [K, V] and a fixed decay gamma_h in (0, 1):
    S_t = gamma_h S_{t-1} + k_t^T v_t        o_t = q_t S_t
No scaling, normalisation or group norm here: the model applies them.
"""

from __future__ import annotations

import torch


def check_retention_shapes(q, k, v, gamma, initial_state) -> None:
    """Raise ValueError naming the argument whose shape does not fit q [B, H, T, K]."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, K]; found shape {list(q.shape)}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have q's shape {list(q.shape)}; found {list(k.shape)}")
    b, h, t, dk = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (b, h, t):
        raise ValueError(f"v must be [B, H, T, V] with [B, H, T] = {[b, h, t]}; found {list(v.shape)}")
    if not torch.is_tensor(gamma) or tuple(gamma.shape) != (h,):
        found = list(gamma.shape) if torch.is_tensor(gamma) else type(gamma).__name__
        raise ValueError(f"gamma must be a tensor [H] = [{h}]; found {found}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {[b, h, dk, v.shape[-1]]}; "
                         f"found {list(initial_state.shape)}")


def retention_step_ref(q_t, k_t, v_t, gamma, state):
    """One step. q_t, k_t [B, H, K], v_t [B, H, V], gamma [H], state [B, H, K, V] or None.

    Returns (o_t [B, H, V], new state [B, H, K, V]), in the inputs' precision (the caller
    picks it; `retention_ref` passes fp32).
    """
    kv = k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, V): outer product k_t^T v_t
    state = kv if state is None else gamma[:, None, None] * state + kv
    o_t = torch.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, state


def retention_ref(q, k, v, gamma, *, initial_state=None):
    """q, k [B, H, T, K], v [B, H, T, V], gamma [H] -> (o [B, H, T, V], final_state [B, H, K, V])."""
    check_retention_shapes(q, k, v, gamma, initial_state)
    dtype = q.dtype
    q, k, v, gamma = (x.float() for x in (q, k, v, gamma))
    b, h, t, dk = q.shape
    S = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    outs = []
    # unbind, not q[:, :, i]: per-step indexing makes autograd's backward quadratic in T
    for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2)):
        o_t, S = retention_step_ref(q_t, k_t, v_t, gamma, S)
        outs.append(o_t)
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h, 0, v.shape[-1])
    return o.to(dtype), S.to(dtype)
