"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"), stacked with pre-norm residual
blocks and an MLP.

One minGRU layer on x_t (width d_model -> hidden d_hidden = expand * d_model):
    z_t = sigmoid(W_z x_t)            update gate, from the input only
    c_t = W_h x_t                     candidate, no tanh and no dependence on h_{t-1}
    h_t = (1 - z_t) * h_{t-1} + z_t * c_t
Because neither gate nor candidate reads h_{t-1}, the recurrence is the diagonal linear
scan h_t = a_t h_{t-1} + b_t with a = 1 - z, b = z * c: training runs it in parallel
through `archlab.kernels.scan.linear_scan`, `step` runs the same formula one token at a time.

Block (pre-norm residual, as the paper's language-model stack):
    x = x + W_o minGRU(RMSNorm(x));   x = x + MLP(RMSNorm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import LinearScanRecurrence, SteppedStack


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    expand: int = 2  # minGRU hidden width = expand * d_model (the paper's expansion factor)
    mlp_expand: int = 4  # MLP hidden = mlp_expand * d_model; 0 disables the MLP sub-block
    kernel: str = "auto"  # linear_scan path: "auto" | "reference" | "torch" | "triton"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, expand=2, mlp_expand=2),
    "seed": Config(d_model=512, n_layers=6, expand=2, mlp_expand=4),
}

# exact build_model("min_gru", "vector", FLAVORS[f], d_in=768) parameter counts
PARAM_COUNTS = {"debug": 71104, "seed": 22845184}


class MinGRU(LinearScanRecurrence):
    """x [B, T, d] -> h [B, T, d_hidden]; the gates depend on x only, so it is a linear scan."""

    def __init__(self, d: int, d_hidden: int, kernel: str):
        super().__init__(kernel)
        self.d_hidden = d_hidden
        # one matmul for gate and candidate
        self.in_proj = nn.Linear(d, 2 * d_hidden)

    def coefficients(self, x: torch.Tensor):
        """(a, b) of h_t = a_t h_{t-1} + b_t, in fp32 (the recurrence is sensitive to a)."""
        k, c = self.in_proj(x).to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
        z = torch.sigmoid(k)
        return 1.0 - z, z * c


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm residual block around a scan mixer (`mixer_cls(d, d_hidden, kernel)`:
    MinGRU here, MinLSTM in min_lstm.py), then an optional MLP sub-block."""

    def __init__(self, config, mixer_cls=None):
        super().__init__()
        d, dh = config.d_model, config.expand * config.d_model
        self.norm1 = nn.RMSNorm(d)
        self.rnn = (mixer_cls or MinGRU)(d, dh, config.kernel)
        self.out_proj = nn.Linear(dh, d)
        self.mlp = None
        if config.mlp_expand > 0:
            self.norm2 = nn.RMSNorm(d)
            self.mlp = MLP(d, config.mlp_expand * d)

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.rnn.d_hidden, device=device)  # fp32, [B, d_hidden]

    def _mlp(self, x):
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.norm1(x))
        return self._mlp(x + self.out_proj(h))

    def step(self, x_t: torch.Tensor, h: torch.Tensor):
        y, h = self.rnn.step(self.norm1(x_t), h)
        return self._mlp(x_t + self.out_proj(y)), h


class MinGRUBackbone(SteppedStack):
    """A stack of `Block`s; min_lstm.py builds the same stack with its MinLSTM mixer."""

    layers_name = "blocks"

    def __init__(self, config, d_input: int, mixer_cls=None):
        for name in ("d_model", "n_layers", "expand"):
            if getattr(config, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, found {getattr(config, name)}")
        super().__init__(d_input, config.d_model,
                         (Block(config, mixer_cls) for _ in range(config.n_layers)),
                         nn.RMSNorm(config.d_model))
        self.d_hidden = config.expand * config.d_model

    @property
    def kernel_path(self) -> str:
        """Which linear_scan path the last forward ran (step() is always the plain recurrence)."""
        return f"scan:{self.blocks[0].rnn.last_path or 'not run yet'}"


def build(config: Config, d_input: int) -> nn.Module:
    return MinGRUBackbone(config, d_input)
