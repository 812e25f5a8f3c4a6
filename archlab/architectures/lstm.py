"""Stacked LSTM, the seed recipe: input fed directly (no projection), dropout between
layers, every position's hidden state -> Linear(d_model -> d_out).

Seed flavor at 768-D: 2 x 512 -> 5.12M parameters (the seed reports 5.1M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

INPUT_PROJECTION = False  # the seed feeds the vectors straight into the LSTM


@dataclass
class Config:
    d_model: int = 512  # hidden size
    n_layers: int = 2
    dropout: float = 0.2


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, dropout=0.0),
    "seed": Config(d_model=512, n_layers=2, dropout=0.2),
}

# exact parameter count of build_model("lstm", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 136448, "seed": 5120768}


class LSTMBackbone(nn.Module):
    def __init__(self, config: Config, d_input: int):
        super().__init__()
        self.d_model = config.d_model
        self.lstm = nn.LSTM(
            d_input,
            config.d_model,
            num_layers=config.n_layers,
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        y, _ = self.lstm(x)
        return y

    def init_state(self, batch: int, device=None):
        # (n_layers, B, d_model) hidden and cell states, in the weights' dtype (fp64 tests)
        z = torch.zeros(self.lstm.num_layers, batch, self.d_model, device=device, dtype=self.lstm.weight_hh_l0.dtype)
        return (z, z.clone())

    def step(self, x_t: torch.Tensor, state):  # [B, d_input] -> [B, d_model]
        y, state = self.lstm(x_t.unsqueeze(1), state)
        return y.squeeze(1), state


def build(config: Config, d_input: int) -> nn.Module:
    return LSTMBackbone(config, d_input)
