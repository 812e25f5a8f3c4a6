"""SSD, the chunked pure-PyTorch fast path (the default on CPU).

Same math as the paper's listing (`reference.ssd_ref`), arranged for speed and memory:
heads-first layout so the intra-chunk terms are batched matmuls instead of 4-operand
einsums, and the inter-chunk recurrence is a loop over chunk boundaries (T/chunk steps on
[B, H, P, N] states) instead of the listing's (T/chunk)^2 segment-sum, so memory stays
linear in T. Autograd differentiates it; fp32 internally, outputs cast to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archlab.kernels.ssd.reference import check_ssd_shapes


def ssd_chunked(x, dt, A, B, C, *, chunk_size: int = 64, initial_state=None):
    """x [B,T,H,P], dt [B,T,H] (> 0), A [H] (< 0), B/C [B,T,H,N] -> (y [B,T,H,P], state [B,H,P,N])."""
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; found {chunk_size}")
    dtype = x.dtype
    x, dt, A, B, C = (v.float() for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    n = B.shape[-1]
    pad = (-t) % chunk_size
    if pad:  # a padded step has dt = 0: decay exp(0) = 1 and zero input, so nothing changes
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, l = (t + pad) // chunk_size, chunk_size

    def heads_first(v):  # (B, c*l, H, E) -> (B, H, c, l, E)
        return v.reshape(b, c, l, h, v.shape[-1]).permute(0, 3, 1, 2, 4)

    X = heads_first(x * dt[..., None])  # (B, H, c, l, P): dt_t x_t
    Bc, Cc = heads_first(B), heads_first(C)  # (B, H, c, l, N)
    a_cum = torch.cumsum((dt * A).reshape(b, c, l, h).permute(0, 3, 1, 2), dim=-1)  # (B, H, c, l)

    # intra-chunk: y_i += sum_{j<=i} exp(a_cum_i - a_cum_j) (C_i . B_j) X_j; the exponent is
    # <= 0 on and below the diagonal, and the masked entries are -inf before exp (no overflow).
    diff = a_cum[..., :, None] - a_cum[..., None, :]  # (B, H, c, l, l)
    causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
    y = ((Cc @ Bc.transpose(-1, -2)) * decay) @ X  # (B, H, c, l, P)

    # each chunk's own contribution to the state at its end: sum_j exp(a_end - a_j) X_j B_j^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, c, l)
    chunk_states = (X * to_end[..., None]).transpose(-1, -2) @ Bc  # (B, H, c, P, N)
    chunk_decay = torch.exp(a_cum[..., -1])  # (B, H, c)

    # inter-chunk recurrence over chunk boundaries: S_in[k] is the state entering chunk k
    S = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
    entering = []
    for k in range(c):
        entering.append(S)
        S = chunk_decay[:, :, k, None, None] * S + chunk_states[:, :, k]
    S_in = torch.stack(entering, dim=2)  # (B, H, c, P, N)

    # the entering state's output at position i of the chunk, decayed by exp(a_cum_i)
    y = y + (Cc @ S_in.transpose(-1, -2)) * torch.exp(a_cum)[..., None]  # (B, H, c, l, P)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * l, h, p)[:, :t]  # (B, T, H, P)
    return y.to(dtype), S.to(dtype)
