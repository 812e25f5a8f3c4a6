"""Causal Transformer, the seed recipe: Linear(d_in -> d_model) scaled by sqrt(d_model)
(`scale_input`; see Config), sinusoidal positions,
pre-built `nn.TransformerEncoder` layers (post-norm, ReLU) with a causal mask, MLP head
d_model -> d_model -> d_out. `step()` decodes one position with a key/value cache and
equals the parallel forward in eval mode.

Seed flavor at 768-D (4 layers, 8 heads, ff 2048, d_model 512) has ~13.7M parameters;
the seed reports 17.8M for what it calls the same shape. archlab implements the listed
shape and tests its own count (see docs/architectures.md).

`ffn_sharing` / `attn_sharing` (off by default; Super Tiny Language Models): every layer
uses layer 0's feed-forward (linear1, linear2) / self-attention module, the same Parameter
objects; norms stay per layer (docs/architectures_zoo3_sharing.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 4096
    # Multiply the projected input by sqrt(d_model) before adding the sinusoidal positions
    # (Vaswani et al. 2017, sec. 3.4). Without it a unit-norm vector through the default
    # Linear init has entries ~0.03 against the positions' ~0.7: every window looks nearly
    # the same to the encoder, and the seed recipe trains it to the global mean vector
    # (measured: benchmarks/transformer_collapse.py, RESULTS.md). The field's default is
    # False so configs saved before it existed rebuild the same model; the flavors, which
    # every new config starts from, set True.
    scale_input: bool = False
    ffn_sharing: bool = False  # every layer uses layer 0's linear1 / linear2
    attn_sharing: bool = False  # every layer uses layer 0's self_attn


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, max_len=1024, scale_input=True),
    "seed": Config(d_model=512, n_layers=4, n_heads=8, d_ff=2048, dropout=0.1, scale_input=True),
}

# exact parameter count of build_model("transformer", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 68096, "seed": 13659904}

# longest sequence the model takes (the sinusoidal position table's length); the sweep driver refuses a longer
# data.context / data.seq_len before any worker starts (registry contract)
MAX_LENGTH_FIELD = "max_len"


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe  # (max_len, d_model)


class TransformerBackbone(nn.Module):
    # class-level default: backbones pickled before scale_input existed run unscaled
    input_scale = 1.0

    def __init__(self, config: Config, d_input: int):
        super().__init__()
        if d_input != config.d_model:
            raise ValueError(f"transformer backbone expects d_input == d_model ({config.d_model}), found {d_input}")
        if config.d_model % config.n_heads:
            raise ValueError(f"model.d_model={config.d_model} is not divisible by model.n_heads={config.n_heads}")
        self.d_model = config.d_model
        self.max_len = config.max_len
        self.input_scale = math.sqrt(config.d_model) if config.scale_input else 1.0
        self.register_buffer("pe", sinusoidal_positions(config.max_len, config.d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(
            config.d_model, config.n_heads, config.d_ff, config.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        # TransformerEncoder deep-copies `layer`; sharing assigns layer 0's modules back
        first = self.encoder.layers[0]
        for other in list(self.encoder.layers)[1:]:
            if config.ffn_sharing:
                other.linear1, other.linear2 = first.linear1, first.linear2
            if config.attn_sharing:
                other.self_attn = first.self_attn
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={self.max_len}")
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        h = self.drop(x * self.input_scale + self.pe[:T].to(x.dtype))
        return self.encoder(h, mask=mask, is_causal=True)


    def init_state(self, batch: int, device=None) -> dict:
        # per layer: cached keys and values (B, t, d_model), filled by step()
        return {"t": 0, "k": [None] * len(self.encoder.layers), "v": [None] * len(self.encoder.layers)}

    def step(self, x_t: torch.Tensor, state: dict):
        """One position with a key/value cache: x_t [B, d_model] -> (y_t [B, d_model], state).

        Inference path (dropout is not applied); equals forward() in eval mode."""
        t = state["t"]
        if t >= self.max_len:
            raise ValueError(f"step: position {t} exceeds model.max_len={self.max_len}")
        h = x_t * self.input_scale + self.pe[t].to(x_t.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.encoder.layers):
            attn = layer.self_attn
            B, d = h.shape
            nh, hd = attn.num_heads, d // attn.num_heads

            def sa(z, i=i, attn=attn):
                q, k, v = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (B, d) each
                if state["k"][i] is not None:
                    k = torch.cat([state["k"][i], k.unsqueeze(1)], dim=1)  # (B, t + 1, d)
                    v = torch.cat([state["v"][i], v.unsqueeze(1)], dim=1)
                else:
                    k, v = k.unsqueeze(1), v.unsqueeze(1)
                new_k.append(k)
                new_v.append(v)
                # (B, nh, 1, hd) against (B, nh, t + 1, hd): the newest query sees every cached key
                qh = q.view(B, nh, 1, hd)
                kh = k.view(B, -1, nh, hd).transpose(1, 2)
                vh = v.view(B, -1, nh, hd).transpose(1, 2)
                o = F.scaled_dot_product_attention(qh, kh, vh).reshape(B, d)
                return attn.out_proj(o)

            def ff(z, layer=layer):
                return layer.linear2(layer.activation(layer.linear1(z)))

            # post-norm, as the layers are built (norm_first=False)
            h = layer.norm1(h + sa(h))
            h = layer.norm2(h + ff(h))
        return h, {"t": t + 1, "k": new_k, "v": new_v}


def build(config: Config, d_input: int) -> nn.Module:
    return TransformerBackbone(config, d_input)


def build_head(config: Config, d_model: int, d_out: int) -> nn.Module:
    # seed: MLP head d_model -> d_model -> d_out
    return nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_out))
