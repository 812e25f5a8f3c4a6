"""Retention, the pure-PyTorch fast paths: parallel, recurrent and chunkwise forms.

All three compute what `reference.retention_ref` defines, in fp32, differentiable by
autograd (gamma included). Decay powers are exp(n * log gamma): n >= 0 everywhere they
are used, so they only underflow (to the correct 0), never overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archlab.kernels.retention.reference import check_retention_shapes, retention_step_ref


def _decay_matrix(log_gamma: torch.Tensor, n: int) -> torch.Tensor:
    """D[h, i, j] = gamma_h^(i - j) for i >= j, else 0. Shape (H, n, n)."""
    idx = torch.arange(n, device=log_gamma.device, dtype=torch.float32)
    dist = idx[:, None] - idx[None, :]  # (n, n)
    causal = dist >= 0
    # clamp before exp so the masked (negative-distance) entries cannot overflow
    D = torch.exp(log_gamma[:, None, None] * dist.clamp(min=0))
    return D * causal


def retention_parallel(q, k, v, gamma, *, initial_state=None):
    """The parallel (attention-like) form: o = ((Q K^T) * D) V, plus the initial state's share."""
    check_retention_shapes(q, k, v, gamma, initial_state)
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    lg = torch.log(gamma.float())  # (H,)
    t = q.shape[2]
    o = ((q @ k.transpose(-1, -2)) * _decay_matrix(lg, t)) @ v  # (B, H, T, V)
    pos = torch.arange(t, device=q.device, dtype=torch.float32)
    to_end = torch.exp(lg[:, None] * (t - 1 - pos))  # (H, T): gamma^(T-1-s)
    S = (k * to_end[..., None]).transpose(-1, -2) @ v  # (B, H, K, V)
    if initial_state is not None:
        S0 = initial_state.float()
        o = o + (q @ S0) * torch.exp(lg[:, None] * (pos + 1))[..., None]  # gamma^(t+1) q_t S0
        S = S + torch.exp(lg * t)[:, None, None] * S0
    return o.to(dtype), S.to(dtype)


def retention_recurrent(q, k, v, gamma, *, initial_state=None):
    """The recurrent form, one `retention_step` per position (the decoding path, batched)."""
    check_retention_shapes(q, k, v, gamma, initial_state)
    dtype = q.dtype
    q, k, v, g = q.float(), k.float(), v.float(), gamma.float()
    b, h, t, dk = q.shape
    S = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.float()
    outs = []
    # unbind, not q[:, :, i]: per-step indexing makes autograd's backward quadratic in T
    for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2)):
        o_t, S = retention_step_ref(q_t, k_t, v_t, g, S)
        outs.append(o_t)
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h, 0, v.shape[-1]).float()
    return o.to(dtype), S.to(dtype)


def retention_chunkwise(q, k, v, gamma, *, chunk_size: int = 64, initial_state=None):
    """The chunkwise form: parallel inside chunks of `chunk_size`, recurrent across them."""
    check_retention_shapes(q, k, v, gamma, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; found {chunk_size}")
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    lg = torch.log(gamma.float())  # (H,)
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    pad = (-t) % chunk_size
    if pad:  # zero q/k/v on padded steps: they add nothing, and their outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    c, l = (t + pad) // chunk_size, chunk_size
    Q, K, V = (x.reshape(b, h, c, l, x.shape[-1]) for x in (q, k, v))  # (B, H, c, l, E)

    inner = ((Q @ K.transpose(-1, -2)) * _decay_matrix(lg, l)[:, None]) @ V  # (B, H, c, l, V)

    # A chunk's state after its last real step: the last chunk has only `last` real steps,
    # so its decays count from there (padding must not decay the final state).
    idx = torch.arange(l, device=q.device, dtype=torch.float32)
    lens = torch.full((c,), float(l), device=q.device)
    lens[-1] = t - (c - 1) * l
    expo = (lens[:, None] - 1 - idx[None, :]).clamp(min=0)  # (c, l); padded rows have k = 0
    w = torch.exp(lg[:, None, None] * expo)  # (H, c, l): gamma^(len-1-j)
    chunk_states = (K * w[..., None]).transpose(-1, -2) @ V  # (B, H, c, K, V)
    chunk_decay = torch.exp(lg[:, None] * lens)  # (H, c): gamma^len

    S = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.float()
    entering = []
    for i in range(c):
        entering.append(S)
        S = chunk_decay[:, i, None, None] * S + chunk_states[:, :, i]
    S_in = torch.stack(entering, dim=2)  # (B, H, c, K, V)

    cross = (Q @ S_in) * torch.exp(lg[:, None] * (idx + 1))[:, None, :, None]  # (B, H, c, l, V)
    o = (inner + cross).reshape(b, h, c * l, dv)[:, :, :t]
    return o.to(dtype), S.to(dtype)
