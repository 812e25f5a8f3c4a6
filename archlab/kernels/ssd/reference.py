"""SSD (Mamba-2 state-space duality): the sources of truth, plain fp32 PyTorch.

Per head h, with state S_t [P, N]:
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T      y_t = S_t C_t

- `ssd_recurrent_ref`: that recurrence, one step at a time (the definition).
- `ssd_ref`: the chunked listing of the Mamba-2 paper (Dao & Gu 2024, "ssd_minimal"):
  intra-chunk quadratic form with a segment-sum decay mask, chunk states, inter-chunk
  state passing with a segment-sum over chunks, then the state-to-output term. Written
  here from the paper's algorithm; T is zero-padded to a multiple of `chunk_size` (a
  padded step has dt = 0: no decay, no input, so outputs and final state are unchanged).
Both compute in fp32 and cast y and the final state back to x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_ssd_shapes(x, dt, A, B, C, initial_state) -> None:
    """Raise ValueError naming the argument whose shape does not match x [B, T, H, P]."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, T, H, P]; found shape {list(x.shape)}")
    b, t, h, p = x.shape
    if tuple(dt.shape) != (b, t, h):
        raise ValueError(f"dt must be [B, T, H] = {[b, t, h]}; found {list(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"A must be [H] = [{h}]; found {list(A.shape)}")
    if B.dim() != 4 or tuple(B.shape[:3]) != (b, t, h):
        raise ValueError(f"B must be [B, T, H, N] with [B, T, H] = {[b, t, h]}; found {list(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C must have B's shape {list(B.shape)}; found {list(C.shape)}")
    n = B.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"initial_state must be [B, H, P, N] = {[b, h, p, n]}; "
                         f"found {list(initial_state.shape)}")


def ssd_recurrent_ref(x, dt, A, B, C, *, initial_state=None):
    """The recurrence step by step. x [B,T,H,P], dt [B,T,H], A [H], B/C [B,T,H,N].

    Returns (y [B, T, H, P], final_state [B, H, P, N]).
    """
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    dtype = x.dtype
    x, dt, A, B, C = (v.float() for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    n = B.shape[-1]
    S = x.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
    ys = []
    # unbind, not x[:, i]: per-step indexing makes autograd's backward allocate a full-size
    # gradient per step (quadratic in T)
    for dt_t, x_t, B_t, C_t in zip(dt.unbind(1), x.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t * A)  # (B, H)
        S = decay[..., None, None] * S + torch.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, B_t)
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C_t))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y.to(dtype), S.to(dtype)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above the diagonal.

    Summing the masked copies directly (rather than differencing one cumsum) keeps each
    entry exact to the terms it contains: no cancellation of two large cumulative sums.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T, T): a[..., i, j] = a_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~below, 0.0), dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_ref(x, dt, A, B, C, *, chunk_size: int = 64, initial_state=None):
    """The paper's chunked SSD listing. Same signature and results as `ssd_recurrent_ref`."""
    check_ssd_shapes(x, dt, A, B, C, initial_state)
    dtype = x.dtype
    x, dt, A, B, C = (v.float() for v in (x, dt, A, B, C))
    b, t, h, p = x.shape
    n = B.shape[-1]
    pad = (-t) % chunk_size
    if pad:  # dt = 0 on padded steps: decay 1 and no input
        x, B, C = (F.pad(v, (0, 0, 0, 0, 0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c, l = (t + pad) // chunk_size, chunk_size
    X = (x * dt[..., None]).reshape(b, c, l, h, p)
    Ad = (dt * A).reshape(b, c, l, h).permute(0, 3, 1, 2)  # (B, H, c, l): log-decay per step
    Bc, Cc = B.reshape(b, c, l, h, n), C.reshape(b, c, l, h, n)
    A_cum = torch.cumsum(Ad, dim=-1)  # (B, H, c, l)

    # 1. intra-chunk outputs (the quadratic "attention" form with decay mask L)
    L = torch.exp(segsum(Ad))  # (B, H, c, l, l)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, L, X)
    # 2. each chunk's state, from its own inputs only
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)  # (B, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, X)  # (B, c, H, P, N)
    # 3. inter-chunk recurrence on chunk boundaries, as one segment-sum over chunks
    init = x.new_zeros(b, 1, h, p, n) if initial_state is None else initial_state.float()[:, None]
    states = torch.cat([init, states], dim=1)  # (B, c+1, H, P, N)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output at each position of the chunk
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cum))
    y = (Y_diag + Y_off).reshape(b, c * l, h, p)[:, :t]
    return y.to(dtype), final_state.to(dtype)
