"""MoDE, integrated (Raposo et al. 2024, "Mixture-of-Depths", section 3.5): no-op experts
inside the MoE router, so a token can skip the FFN's compute by routing to one.

The FFN of the MoDE layers is moe.SparseMoE with `n_experts` SwiGLU experts and `n_noop`
extra router slots whose expert is the zero function: y = sum over the k chosen slots of
w * Expert(x), with Expert = 0 for no-op slots, so a token that sends all k choices to
no-ops leaves the layer's FFN residual unchanged (x + 0) and costs only the router. The
router, its top-k, the renormalised weights and the auxiliary losses are the MoE's (fp32
router; Switch load balance over all E + n_noop slots, so no-ops are balanced like experts;
ST-MoE z-loss). The paper reports that integrated no-op experts beat simply lowering the
expert capacity; here routing to a no-op is a learned per-token choice, causal at every
position (token-choice routing reads only the token itself), so unlike Mixture-of-Depths'
expert-choice top-k over the sequence it needs no inference-time predictor.

The mixers come from the registry (`pattern`, repeated over n_layers): attention-only by
default; seed 004's Zamba-style Mamba-2 backbone with attention every 6th layer in the seed
flavor. routing_stats() adds `noop_frac` (the share of choices sent to no-op experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 12
    pattern: list = field(default_factory=lambda: ["mamba2"] * 5 + ["attention"])
    n_heads: int = 8
    n_experts: int = 8
    n_noop: int = 4  # integrated no-op experts
    top_k: int = 2
    d_expert: int = 1024
    mode_every: int = 1  # layer i's FFN is MoDE if i % mode_every == mode_offset, else dense
    mode_offset: int = 0
    d_ffn: int = 0
    capacity_factor: float = 0.0
    renormalize: bool = True
    lb_weight: float = 0.01
    z_weight: float = 0.001
    max_len: int = 0  # learned absolute positions (0 = none; attention-only patterns want some)
    # Mamba-2 layers of the pattern
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 64
    kernel: str = "auto"
    dropout: float = 0.0


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, pattern=["attention"], n_heads=4, n_experts=4, n_noop=2, top_k=2,
                    d_expert=32, max_len=1024, d_state=16, headdim=16, chunk_size=16),
    "seed": Config(d_model=512, n_layers=12, pattern=["mamba2"] * 5 + ["attention"], n_heads=8, n_experts=8,
                   n_noop=4, top_k=2, d_expert=1024),
}

PARAM_COUNTS = {"debug": 116288, "seed": 170504672}


def build(config: Config, d_input: int) -> nn.Module:
    from archlab.architectures.mixers import HybridStack, layer_kinds
    from archlab.architectures.moe import periodic

    if config.n_noop < 1:
        raise ValueError(f"model.n_noop must be >= 1 (MoDE's no-op experts), found {config.n_noop}")
    mixers = layer_kinds(config.pattern, config.n_layers)
    mode = periodic(config.n_layers, config.mode_every, config.mode_offset, "mode")
    return HybridStack(d_input, config.d_model, mixers, ["mode" if m else "dense" for m in mode],
                       dict(vars(config), bias=True), max_len=config.max_len)
