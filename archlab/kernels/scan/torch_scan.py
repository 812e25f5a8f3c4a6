"""Diagonal linear recurrence, the pure-PyTorch fast path (the default on CPU).

h_t = a_t * h_{t-1} + b_t for any sign of a. A two-level blocked scan: T is cut into
T/L chunks of L steps, and
  (1) every chunk is scanned from a zero state, all chunks at once (L vectorised steps on
      [B, T/L, D] slices), keeping only its end state and its product of a;
  (2) the state entering each chunk is carried across the T/L chunk boundaries;
  (3) every chunk is scanned again, all at once, from its true entering state, writing h.
Python runs 2L + T/L small steps instead of T (L ~ sqrt(T)), and the arithmetic is the
sequential one (products and sums, no logs or divisions), so it is as stable as the loop
for any T (tested to 16k) and for a of either sign or exactly zero. Re-scanning in (3)
instead of storing in-chunk products keeps it to a few passes over memory: on this CPU it
is bandwidth-bound, not compute-bound.

The backward pass is the same scan run backwards (a custom autograd.Function):
    g_t = dL/dh_t + a_{t+1} g_{t+1},   db_t = g_t,   da_t = g_t h_{t-1},   dh0 = a_0 g_0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from archlab.kernels.scan._io import scan_in_compute_dtype


def default_chunk(t: int) -> int:
    """About sqrt(T) (balances the 2L in-chunk steps against the T/L carry steps), in [8, 128]."""
    return int(min(128, max(8, 2 ** round(math.log2(max(t, 1)) / 2))))


def scan_fwd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk: int,
             reverse: bool = False) -> torch.Tensor:
    """fp32 forward, no autograd: a, b [B, T, D] contiguous, h0 [B, D] or None -> h [B, T, D].

    reverse=True runs time backwards (h_t = a_t h_{t+1} + b_t, h0 entering at t = T-1)
    without materialising flipped copies: the backward pass uses it.
    """
    bsz, t, d = b.shape
    if t == 0:
        return b.new_zeros(bsz, 0, d)
    pad = (-t) % chunk
    if pad:  # a = 1, b = 0 on padded steps (after the last step in scan order): a pass-through
        where = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)
        a = F.pad(a, where, value=1.0)
        b = F.pad(b, where)
    c = (t + pad) // chunk
    A4 = a.reshape(bsz, c, chunk, d)  # (B, c, L, D)
    # unbind once: per-step views [B, c, D] without a Python-level slice per step
    A, Bv = A4.unbind(2), b.reshape(bsz, c, chunk, d).unbind(2)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    chunks = range(c - 1, -1, -1) if reverse else range(c)
    # (1) each chunk's end state from a zero start (ping-pong buffers: no allocation per step)
    first = steps[0]
    s, spare = Bv[first].clone(), torch.empty_like(Bv[first])  # (B, c, D)
    for i in steps[1:]:
        torch.addcmul(Bv[i], A[i], s, out=spare)
        s, spare = spare, s
    p = torch.prod(A4, dim=2)  # (B, c, D): the chunk's product of a (order-free)
    # (2) carry[:, k] = state entering chunk k (in scan order)
    carry = b.new_empty(bsz, c, d)
    ends, prods, cr = s.unbind(1), p.unbind(1), carry.unbind(1)
    if h0 is not None:
        cr[chunks[0]].copy_(h0)
    else:
        cr[chunks[0]].zero_()
    for k, k_next in zip(chunks[:-1], chunks[1:]):
        torch.addcmul(ends[k], prods[k], cr[k], out=cr[k_next])
    # (3) re-scan every chunk from its entering state, writing h in place
    h = b.new_empty(bsz, c, chunk, d)
    H = h.unbind(2)
    prev = carry
    for i in steps:
        torch.addcmul(Bv[i], A[i], prev, out=H[i])
        prev = H[i]
    h = h.reshape(bsz, c * chunk, d)
    return h[:, pad:] if reverse else h[:, :t]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = scan_fwd(a, b, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        # g_t = dh_t + a_{t+1} g_{t+1}: a reverse scan whose decay at t is a_{t+1}; the last
        # step has nothing after it, hence the padded 1 (multiplying a zero state).
        a_next = F.pad(a[:, 1:], (0, 0, 0, 1), value=1.0)
        g = scan_fwd(a_next, dh.contiguous(), None, ctx.chunk, reverse=True)  # (B, T, D)
        da = torch.empty_like(a)  # da_t = g_t h_{t-1}
        torch.mul(g[:, 1:], h[:, :-1], out=da[:, 1:])
        if h0 is not None:
            torch.mul(g[:, 0], h0, out=da[:, 0])
            dh0 = a[:, 0] * g[:, 0]
        else:
            da[:, 0].zero_()
            dh0 = None
        return da, g, dh0, None


def linear_scan_torch(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                      chunk_size: int | None = None):
    """a, b [B, T, D], h0 [B, D] or None -> (h [B, T, D], h_T [B, D]); fp32 inside, b's dtype out."""
    chunk = chunk_size or default_chunk(b.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; found {chunk}")
    return scan_in_compute_dtype(lambda a_, b_, h0_: _LinearScan.apply(a_, b_, h0_, chunk), a, b, h0)
