"""Causal Transformer, the seed recipe: Linear(d_in -> d_model), sinusoidal positions,
pre-built `nn.TransformerEncoder` layers with a causal mask, MLP head
d_model -> d_model -> d_out.

Seed flavor at 768-D (4 layers, 8 heads, ff 2048, d_model 512) has ~13.7M parameters;
the seed reports 17.8M for what it calls the same shape. archlab implements the listed
shape and tests its own count (see docs/architectures.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 4096


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, max_len=1024),
    "seed": Config(d_model=512, n_layers=4, n_heads=8, d_ff=2048, dropout=0.1),
}

# exact parameter count of build_model("transformer", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 68096, "seed": 13659904}


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return pe  # (max_len, d_model)


class TransformerBackbone(nn.Module):
    def __init__(self, config: Config, d_input: int):
        super().__init__()
        if d_input != config.d_model:
            raise ValueError(f"transformer backbone expects d_input == d_model ({config.d_model}), found {d_input}")
        if config.d_model % config.n_heads:
            raise ValueError(f"model.d_model={config.d_model} is not divisible by model.n_heads={config.n_heads}")
        self.d_model = config.d_model
        self.max_len = config.max_len
        self.register_buffer("pe", sinusoidal_positions(config.max_len, config.d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(
            config.d_model, config.n_heads, config.d_ff, config.dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        T = x.shape[1]
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={self.max_len}")
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        h = self.drop(x + self.pe[:T].to(x.dtype))
        return self.encoder(h, mask=mask, is_causal=True)


def build(config: Config, d_input: int) -> nn.Module:
    return TransformerBackbone(config, d_input)


def build_head(config: Config, d_model: int, d_out: int) -> nn.Module:
    # seed: MLP head d_model -> d_model -> d_out
    return nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_out))
