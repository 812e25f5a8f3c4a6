"""Independently recurrent neural network (Li et al. 2018).

Each layer: h_t = act(W x_t + u * h_{t-1} + b), with a per-neuron recurrent weight u
(a vector, not a matrix: neurons do not talk to each other inside a layer; they mix
across layers). |u| is constrained by the parametrisation u = u_max * tanh(u_raw), so
|u| < u_max always (the paper clips u to keep gradients from exploding over long
sequences; a smooth bound keeps its gradient defined everywhere).

Computation paths:
- act = "relu" (the paper's) or "tanh": the recurrence is nonlinear, so it is a
  sequential loop over time (the input projection W x_t for all t is one matmul outside
  the loop; only the elementwise update runs per step).
- act = "identity": h_t = u * h_{t-1} + (W x_t + b) is a diagonal linear recurrence and
  runs through `archlab.kernels.scan.linear_scan` (config `kernel`).
`step()` is the same update one position at a time and equals the forward in every case.
Layers stack with pre-LayerNorm residuals (the paper's residual IndRNN), when widths match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import SkipStack
from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.scan import linear_scan

_ACTS = ("relu", "tanh", "identity")


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 2
    activation: str = "relu"  # relu | tanh | identity (identity -> linear scan)
    u_max: float = 1.0  # |u| < u_max
    dropout: float = 0.0  # between layers
    residual: bool = True
    kernel: str = "auto"  # linear_scan path, used only by activation="identity"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, activation="relu"),
    # the seed LSTM's shape (2 x 512) so the recurrent baselines compare
    "seed": Config(d_model=512, n_layers=2, activation="relu", dropout=0.1),
}

# exact parameter count of build_model("indrnn", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 52256, "seed": 1316096}


class IndRNNLayer(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, activation: str, u_max: float, kernel: str):
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"indrnn: model.activation must be one of {_ACTS}, found {activation!r}")
        if not u_max > 0:
            raise ValueError(f"indrnn: model.u_max must be > 0, found {u_max}")
        self.activation, self.u_max, self.kernel = activation, u_max, kernel
        self.d_in, self.d_hidden = d_in, d_hidden
        self.inp = nn.Linear(d_in, d_hidden)
        # the paper initialises u uniformly in (0, 1); here inside (0, 0.99 u_max)
        u0 = torch.rand(d_hidden) * 0.99
        self.u_raw = nn.Parameter(torch.atanh(u0))
        self.last_path = None

    @property
    def u(self) -> torch.Tensor:
        return self.u_max * torch.tanh(self.u_raw)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "tanh":
            return torch.tanh(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_in] -> [B, T, d_hidden]
        wx = self.inp(x)
        u = self.u.to(wx.dtype)
        if self.activation == "identity":
            a = u.expand_as(wx)
            self.last_path = "scan:" + resolve_kernel("scan", self.kernel, x.device)
            h, _ = linear_scan(a, wx, kernel=self.last_path[5:])
            return h
        self.last_path = "sequential"
        h = wx.new_zeros(wx.shape[0], self.d_hidden)
        out = []
        for t in range(wx.shape[1]):  # nonlinear recurrence: no parallel form
            h = self._act(wx[:, t] + u * h)
            out.append(h)
        return torch.stack(out, dim=1)

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        p = self.inp.weight  # zeros in the parameters' dtype (fp64 tests, bf16 models)
        return torch.zeros(batch, self.d_hidden, device=device or p.device, dtype=p.dtype)

    def step(self, x_t: torch.Tensor, h: torch.Tensor):
        h = self._act(self.inp(x_t) + self.u.to(x_t.dtype) * h)
        return h, h


class IndRNNBackbone(SkipStack):
    def __init__(self, cfg: Config, d_input: int):
        super().__init__(d_input, cfg.d_model, cfg.n_layers,
                         lambda d_in: IndRNNLayer(d_in, cfg.d_model, cfg.activation, cfg.u_max, cfg.kernel),
                         residual=cfg.residual, dropout=cfg.dropout)

    @property
    def kernel_path(self) -> str:
        """Which path the last forward ran: "sequential" (relu/tanh) or "scan:<path>" (identity)."""
        return self.layers[0].last_path or "not run yet"


def build(config: Config, d_input: int) -> nn.Module:
    return IndRNNBackbone(config, d_input)
