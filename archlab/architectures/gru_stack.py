"""Residual GRU stack, the seed recipe: Linear(d_in -> d_model) (the task IO's input
projection), then `n_layers` blocks of h = LayerNorm(h + Dropout(GRU(h))), every
position's hidden state -> Linear(d_model -> d_out) (the default vector head).

Seed flavor at 768-D: 4 blocks of 512 -> 7,095,552 parameters (the seed reports 7.1M).
Each block is its own single-layer GRU (not one multi-layer nn.GRU) because the residual
and the LayerNorm sit between layers.

`step()` runs one position through every block with the GRUs' hidden states as the
recurrent state; it equals the parallel forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    dropout: float = 0.0  # on each GRU's output before the residual add


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, dropout=0.0),
    "seed": Config(d_model=512, n_layers=4, dropout=0.0),
}

# exact parameter count of build_model("gru_stack", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 62752, "seed": 7095552}


class GRUBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.gru = nn.GRU(d_model, d_model, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor, h0: torch.Tensor | None = None):
        y, hn = self.gru(h, h0)  # y (B, T, d), hn (1, B, d)
        return self.norm(h + self.drop(y)), hn


class GRUStackBackbone(nn.Module):
    def __init__(self, config: Config, d_input: int):
        super().__init__()
        if d_input != config.d_model:
            raise ValueError(f"gru_stack backbone expects d_input == d_model ({config.d_model}), found {d_input}")
        if config.n_layers < 1:
            raise ValueError(f"model.n_layers must be >= 1, found {config.n_layers}")
        self.d_model = config.d_model
        self.blocks = nn.ModuleList(GRUBlock(config.d_model, config.dropout) for _ in range(config.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        h = x
        for block in self.blocks:
            h, _ = block(h)
        return h

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        # (n_layers, B, d): one GRU hidden state per block
        dtype = self.blocks[0].gru.weight_hh_l0.dtype
        return torch.zeros(len(self.blocks), batch, self.d_model, device=device, dtype=dtype)

    def step(self, x_t: torch.Tensor, state: torch.Tensor):  # [B, d] -> [B, d]
        h = x_t.unsqueeze(1)  # (B, 1, d)
        new = []
        for i, block in enumerate(self.blocks):
            h, hn = block(h, state[i : i + 1].contiguous())
            new.append(hn)
        return h.squeeze(1), torch.cat(new, dim=0)


def build(config: Config, d_input: int) -> nn.Module:
    return GRUStackBackbone(config, d_input)
