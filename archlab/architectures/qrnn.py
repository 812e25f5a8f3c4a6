"""Quasi-recurrent neural network (Bradbury et al. 2017), fo-pooling.

Each layer: a causal convolution over time (window 2: the current and the previous input)
gives three pre-activations, Z = tanh, F = sigmoid, O = sigmoid, then fo-pooling

    c_t = f_t * c_{t-1} + (1 - f_t) * z_t,        h_t = o_t * c_t.

The only sequential part is the elementwise recurrence on c, a diagonal linear scan with
a_t = f_t and b_t = (1 - f_t) z_t, so training runs it through
`archlab.kernels.scan.linear_scan` (config `kernel`); `step()` runs it one position at a
time and equals the parallel forward. Layers stack; with `residual` the layer output is
added to its input (pre-LayerNorm residual), which keeps deep stacks trainable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archlab.architectures.common import SkipStack
from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.scan import linear_scan


@dataclass
class Config:
    d_model: int = 512  # hidden size (c and h)
    n_layers: int = 2
    window: int = 2  # convolution width over time: 1 (no look-back) or 2 (the paper's)
    dropout: float = 0.0  # between layers
    residual: bool = True  # pre-LayerNorm residual stacking; False = the paper's plain stack
    kernel: str = "auto"  # linear_scan path


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, window=2, dropout=0.0),
    # the seed LSTM's shape (2 x 512) so the two recurrent baselines compare
    "seed": Config(d_model=512, n_layers=2, window=2, dropout=0.1),
}

# exact parameter count of build_model("qrnn", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 62560, "seed": 3938560}


class QRNNLayer(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, window: int, kernel: str):
        super().__init__()
        if window not in (1, 2):
            raise ValueError(f"qrnn: model.window must be 1 or 2, found {window}")
        self.window, self.kernel = window, kernel
        self.d_in, self.d_hidden = d_in, d_hidden
        # one Linear over the concatenated window [x_{t-1}, x_t] == a width-`window` conv
        self.proj = nn.Linear(window * d_in, 3 * d_hidden)
        self.last_path = None

    def _gates(self, xw: torch.Tensor):
        z, f, o = self.proj(xw).chunk(3, dim=-1)
        return torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_in] -> [B, T, d_hidden]
        if self.window == 2:
            prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)  # x_{t-1}, zero at t=0
            x = torch.cat([prev, x], dim=-1)  # (B, T, 2 d_in)
        z, f, o = self._gates(x)
        self.last_path = resolve_kernel("scan", self.kernel, x.device)
        c, _ = linear_scan(f, (1 - f) * z, kernel=self.last_path)
        return o * c

    def init_state(self, batch: int, device=None):
        p = self.proj.weight  # zeros in the parameters' dtype (fp64 tests, bf16 models)
        kw = dict(device=device or p.device, dtype=p.dtype)
        return torch.zeros(batch, self.d_in, **kw), torch.zeros(batch, self.d_hidden, **kw)

    def step(self, x_t: torch.Tensor, state):
        """x_t [B, d_in]; state (x_{t-1} [B, d_in], c_{t-1} [B, d_hidden])."""
        x_prev, c = state
        xw = torch.cat([x_prev, x_t], dim=-1) if self.window == 2 else x_t
        z, f, o = self._gates(xw)
        c = f * c + (1 - f) * z
        return o * c, (x_t, c)


class QRNNBackbone(SkipStack):
    def __init__(self, cfg: Config, d_input: int):
        super().__init__(d_input, cfg.d_model, cfg.n_layers,
                         lambda d_in: QRNNLayer(d_in, cfg.d_model, cfg.window, cfg.kernel),
                         residual=cfg.residual, dropout=cfg.dropout)

    @property
    def kernel_path(self) -> str:
        """Which linear_scan path the last forward ran (step() is always the plain loop)."""
        return f"scan:{self.layers[0].last_path or 'not run yet'}"


def build(config: Config, d_input: int) -> nn.Module:
    return QRNNBackbone(config, d_input)
