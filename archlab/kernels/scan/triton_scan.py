"""Diagonal linear recurrence, the chunked Triton kernel (CUDA; CPU under TRITON_INTERPRET=1).

One program per (batch row, block of BLOCK_D channels) walks T in chunks of CHUNK steps:
it loads a [CHUNK, BLOCK_D] tile of a and b, scans it in parallel with
`tl.associative_scan` on pairs (a, b) under the composition of affine maps
    (a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2),
applies the incoming state h_in as h = A_cum h_in + B_cum, stores the tile and carries its
last row to the next chunk. Channels are independent, so the grid parallelises over B and
D, and the state never leaves registers. Accumulation is in fp32 whatever the input dtype.

The backward pass (autograd.Function) runs the same kernel in reverse time with a shifted
by one step: g_t = dL/dh_t + a_{t+1} g_{t+1}; then db = g, da_t = g_t h_{t-1}, dh0 = a_0 g_0.
triton is imported by this module only; archlab.kernels imports it lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # apply (a1, b1) first, then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_kernel(a_ptr, b_ptr, h0_ptr, out_ptr, T, D,
                 HAS_H0: tl.constexpr, REVERSE: tl.constexpr, SHIFT: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * D + d, mask=dmask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = pid_b * T * D  # inputs are contiguous [B, T, D]
    for c0 in range(0, T, CHUNK):
        s = c0 + tl.arange(0, CHUNK)  # processing order within the sequence
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        m = (s < T)[:, None] & dmask[None, :]
        # SHIFT=1 reads a_{t+1} (the backward's decay); past the end it is 0 (nothing follows)
        ta = t + SHIFT
        ma = m & ((ta >= 0) & (ta < T))[:, None]
        av = tl.load(a_ptr + base + ta[:, None] * D + d[None, :], mask=ma, other=0.0).to(tl.float32)
        bv = tl.load(b_ptr + base + t[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        a_cum, b_cum = tl.associative_scan((av, bv), axis=0, combine_fn=_affine_combine)
        hc = a_cum * h[None, :] + b_cum  # (CHUNK, BLOCK_D)
        tl.store(out_ptr + base + t[:, None] * D + d[None, :], hc, mask=m)
        last = tl.minimum(c0 + CHUNK, T) - 1
        h = tl.sum(tl.where((s == last)[:, None], hc, 0.0), axis=0)  # the tile's last valid row


def _launch(a, b, h0, reverse: bool, shift: int, chunk: int) -> torch.Tensor:
    bsz, t, d = b.shape
    out = torch.empty(bsz, t, d, dtype=torch.float32, device=b.device)
    if t == 0:
        return out
    block_d = min(64, triton.next_power_of_2(d))
    grid = (bsz, triton.cdiv(d, block_d))
    _scan_kernel[grid](a, b, h0 if h0 is not None else b, out, t, d,
                       HAS_H0=h0 is not None, REVERSE=reverse, SHIFT=shift,
                       CHUNK=chunk, BLOCK_D=block_d)
    return out


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = _launch(a, b, h0, reverse=False, shift=0, chunk=chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        g = _launch(a, dh.float().contiguous(), None, reverse=True, shift=1, chunk=ctx.chunk)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]) if h0 is None else h0[:, None].float(),
                            h[:, :-1]], dim=1)  # (B, T, D): h_{t-1}
        da = (g * h_prev).to(a.dtype)
        dh0 = (a[:, 0].float() * g[:, 0]).to(h0.dtype) if h0 is not None else None
        return da, g, dh0, None


def linear_scan_triton(a, b, h0=None, chunk_size: int | None = None):
    """a, b [B, T, D], h0 [B, D] or None -> (h [B, T, D], h_T [B, D]); fp32 accumulation, b's dtype out.

    chunk_size: time steps per tile, rounded up to a power of two (Triton tiles need one).
    """
    dtype = b.dtype
    chunk = triton.next_power_of_2(max(1, chunk_size or 32))
    a_, b_ = a.contiguous(), b.contiguous()
    h0_ = None if h0 is None else h0.contiguous()
    h = _TritonScan.apply(a_, b_, h0_, chunk)
    t = b.shape[1]
    h_T = h[:, -1] if t > 0 else (h.new_zeros(b.shape[0], b.shape[2]) if h0 is None else h0_.float())
    return h.to(dtype), h_T.to(dtype)
