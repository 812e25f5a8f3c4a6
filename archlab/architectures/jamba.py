"""Jamba (Lieber et al. 2024): Mamba layers interleaved with attention, MoE FFN every other
layer, composed from the mixer registry (architectures/mixers.py).

Layer i (HF Jamba's rule):
    mixer = attention  if i % attn_every == attn_offset % attn_every  else mamba2
    ffn   = moe        if i % moe_every  == moe_offset % moe_every    else dense
and every layer is `x + mixer(RMSNorm(x))`, then `+ ffn(RMSNorm(.))`. The attention type is
`attn_type`: "full" (gpt2's causal attention, no positions: the Mamba layers carry order,
as in Jamba), "linformer" (causal blockwise Linformer, T <= max_len) or "performer"
(causal FAVOR+); with Mamba-2 (SSD) in place of Jamba's Mamba-1.

Seed 000's "Hybrid Mamba-Attention" is `(i + 1) % attn_every == 0`, i.e. attn_offset = -1
(a negative offset counts from the end of each group): 5 Mamba : 1 attention at attn_every
6, the default (HF Jamba's is every 8 at offset 4). The MoE is archlab's SparseMoE (moe.py): dropless top-k,
fp32 router, Switch load-balancing and ST-MoE z losses through aux.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTN_TYPES = {"full": "attention", "linformer": "linformer", "performer": "performer"}


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 24
    attn_every: int = 6
    attn_offset: int = -1  # -1: the last layer of each group (seed 000)
    attn_type: str = "full"  # full | linformer | performer
    n_heads: int = 8
    moe_every: int = 2
    moe_offset: int = 1
    n_experts: int = 16
    top_k: int = 2
    d_expert: int = 1024
    d_ffn: int = 0  # dense FFN hidden width (0 = 4 d_model)
    capacity_factor: float = 0.0
    renormalize: bool = True
    lb_weight: float = 0.01
    z_weight: float = 0.001
    # Mamba-2 layers
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 64
    kernel: str = "auto"  # SSD path (archlab.kernels.ssd)
    # linformer / performer attention
    k: int = 128
    block_size: int = 64
    nb_features: int = 256
    max_len: int = 1024  # linformer's projection length (T <= max_len); unused by full/performer
    dropout: float = 0.0


FLAVORS = {
    "debug": Config(d_model=32, n_layers=4, attn_every=2, attn_offset=1, n_heads=4, n_experts=4, top_k=2,
                    d_expert=32, d_ffn=64, d_state=16, headdim=16, chunk_size=16, k=8, block_size=8,
                    nb_features=16, max_len=1024),
    # seed 000: d_model 512, 24 layers, attention every 6th; seed 002 / Jamba: 16 experts top-2
    # (8 experts of 512 keep the total at seed 000's ~150M)
    "seed": Config(d_model=512, n_layers=24, attn_every=6, attn_offset=-1, n_heads=8, n_experts=8, top_k=2,
                   d_expert=512, d_state=64, headdim=64, chunk_size=64),
}

PARAM_COUNTS = {"debug": 111832, "seed": 151434432}


def layer_plan(config: Config) -> tuple[list[str], list[str]]:
    """(mixer kind per layer, ffn kind per layer) from the period/offset rules."""
    from archlab.architectures.moe import periodic

    if config.attn_type not in ATTN_TYPES:
        raise ValueError(f"model.attn_type: expected one of {', '.join(ATTN_TYPES)}, found {config.attn_type!r}")
    attn = periodic(config.n_layers, config.attn_every, config.attn_offset, "attn")
    moe = periodic(config.n_layers, config.moe_every, config.moe_offset, "moe")
    mixers = [ATTN_TYPES[config.attn_type] if a else "mamba2" for a in attn]
    return mixers, ["moe" if m else "dense" for m in moe]


def build(config: Config, d_input: int) -> nn.Module:
    from archlab.architectures.mixers import HybridStack

    mixers, ffns = layer_plan(config)
    return HybridStack(d_input, config.d_model, mixers, ffns, dict(vars(config), bias=True))
