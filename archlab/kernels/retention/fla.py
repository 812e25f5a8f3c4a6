"""Retention through flash-linear-attention's chunked Triton kernel, CUDA only.

Retention is simple gated linear attention with a per-head constant gate: fla's
`chunk_simple_gla` with g = log(gamma) at every step and scale = 1 (archlab applies its
own scaling in the model). fla is imported inside the call, never at import time.
fla's layout is [B, T, H, K] (`head_first=False`); ours is [B, H, T, K], so we transpose.
"""

from __future__ import annotations

import inspect

import torch

from archlab.kernels.retention.reference import check_retention_shapes


def retention_fla(q, k, v, gamma, *, chunk_size: int = 64, initial_state=None):
    check_retention_shapes(q, k, v, gamma, initial_state)
    from fla.ops.simple_gla import chunk_simple_gla

    b, h, t, _ = q.shape
    q_, k_, v_ = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, T, H, E)
    g = torch.log(gamma.float())[None, None, :].expand(b, t, h).contiguous()  # (B, T, H)
    kwargs = dict(g=g, scale=1.0, initial_state=initial_state, output_final_state=True)
    # older fla releases default to head_first=True; newer ones dropped the argument
    if "head_first" in inspect.signature(chunk_simple_gla).parameters:
        kwargs["head_first"] = False
    o, final_state = chunk_simple_gla(q_, k_, v_, **kwargs)
    return o.transpose(1, 2), final_state  # (B, H, T, V), (B, H, K, V)
