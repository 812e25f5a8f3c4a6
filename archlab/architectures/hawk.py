"""Hawk (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention"):
residual blocks of an RG-LRU recurrent block and a gated MLP.

RG-LRU on x_t (width d_rnn, gates block-diagonal over `rnn_heads` heads as in the paper):
    r_t = sigmoid(W_a x_t + b_a)              recurrence gate
    i_t = sigmoid(W_x x_t + b_x)              input gate
    log a_t = c * r_t * log(sigmoid(Lambda))  a_t = a^(c r_t), a = sigmoid(Lambda), c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
No gate reads h_{t-1}, so h is the diagonal linear scan run by
`archlab.kernels.scan.linear_scan`. Lambda and the recurrence coefficients stay fp32 under
autocast (a_t close to 1 is where bf16 loses the memory). Lambda is initialised so that
a^c is uniform in [0.9, 0.999] (the paper's init).

Recurrent block (the paper's figure 2):
    y = W_out( GeLU(W_gate x) * RG-LRU(CausalConv1d_4(W_in x)) )
Residual block: x = x + RecurrentBlock(RMSNorm(x)); x = x + GatedMLP(RMSNorm(x)),
GatedMLP(x) = W_down(GeLU(W_1 x) * W_2 x) with expansion `mlp_expand` (3 in the paper).

`RecurrentBlock` and `residual_block` are reused by griffin.py (hybrids are compositions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import LinearScanRecurrence, PreNormBlock, SteppedStack


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    rnn_expand: float = 1.0  # RG-LRU width d_rnn = round(rnn_expand * d_model) (paper: 4/3)
    rnn_heads: int = 8  # block-diagonal gate heads; d_rnn must be divisible by it
    conv_width: int = 4
    mlp_expand: int = 3
    c: float = 8.0  # the RG-LRU's fixed exponent scale
    kernel: str = "auto"  # linear_scan path: "auto" | "reference" | "torch" | "triton"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, rnn_expand=1.0, rnn_heads=2, mlp_expand=2),
    "seed": Config(d_model=512, n_layers=6, rnn_expand=1.5, rnn_heads=8, mlp_expand=3),
}

# exact build_model("hawk", "vector", FLAVORS[f], d_in=768) parameter counts
PARAM_COUNTS = {"debug": 71616, "seed": 22983424}


def _rnn_width(d_model: int, rnn_expand: float, rnn_heads: int) -> int:
    d_rnn = int(round(rnn_expand * d_model))
    if d_rnn < 1 or d_rnn % rnn_heads:
        raise ValueError(
            f"model.rnn_expand * model.d_model = {d_rnn} must be a positive multiple of "
            f"model.rnn_heads={rnn_heads}"
        )
    return d_rnn


class BlockDiagonalLinear(nn.Module):
    """x [..., H * k] -> [..., H * k] with one k x k matrix per head (the paper's gate weights)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, k = heads, width // heads
        bound = 1.0 / math.sqrt(k)  # nn.Linear's default init, per head
        self.weight = nn.Parameter(torch.empty(heads, k, k).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(heads, k).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.unflatten(-1, (self.heads, -1))  # (..., H, k)
        y = torch.einsum("...hi,hij->...hj", xs, self.weight) + self.bias
        return y.flatten(-2)


class RGLRU(LinearScanRecurrence):
    """Real-Gated Linear Recurrent Unit: x [B, T, D] -> h [B, T, D] (plus the final state)."""

    def __init__(self, width: int, heads: int, c: float, kernel: str):
        super().__init__(kernel)
        self.c = c
        self.gate_a = BlockDiagonalLinear(width, heads)
        self.gate_x = BlockDiagonalLinear(width, heads)
        # a^c ~ U[0.9, 0.999]  =>  a = u^(1/c),  Lambda = logit(a)
        u = torch.empty(width).uniform_(0.9, 0.999)
        a = u.pow(1.0 / c)
        self.a_logit = nn.Parameter(torch.log(a) - torch.log1p(-a))
        # marker (mamba's convention) for an optimizer that keeps weight decay off decay
        # rates; platform/train.py's AdamW does not read it yet and decays every parameter
        self.a_logit._no_weight_decay = True

    def coefficients(self, x: torch.Tensor):
        """(a_t, b_t) of h_t = a_t h_{t-1} + b_t, fp32 whatever the autocast dtype."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 in tests
            r = torch.sigmoid(self.gate_a(x32))
            i = torch.sigmoid(self.gate_x(x32))
            # log a_t = c r_t log sigmoid(Lambda) = -c r_t softplus(-Lambda)
            log_a = -self.c * r * F.softplus(-self.a_logit.to(x32.dtype))
            a = torch.exp(log_a)
            # sqrt(1 - a^2) = sqrt(-expm1(2 log a)): exact near a -> 1; the floor keeps the
            # sqrt's gradient finite where a_t rounds to 1
            mult = torch.sqrt(torch.clamp_min(-torch.expm1(2.0 * log_a), 1e-12))
            return a, mult * (i * x32)


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time: x [B, T, D] -> [B, T, D]; y_t sees x_{t-w+1..t}."""

    def __init__(self, width: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        # left padding of k - 1 zeros, keep the first T outputs  # (B, D, T)
        return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)

    def init_state(self, batch: int, width: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, width, self.kernel_size - 1, device=device)  # last k-1 inputs

    def step(self, x_t: torch.Tensor, buf: torch.Tensor):
        window = torch.cat([buf.to(x_t.dtype), x_t.unsqueeze(-1)], dim=-1)  # (B, D, k)
        y = (window * self.conv.weight.squeeze(1)).sum(-1) + self.conv.bias
        return y, window[..., 1:]


class RecurrentBlock(nn.Module):
    """GeLU(W_gate x) * RG-LRU(conv(W_in x)) -> W_out: x [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, d_rnn: int, heads: int, conv_width: int, c: float, kernel: str):
        super().__init__()
        self.d_rnn = d_rnn
        self.in_proj = nn.Linear(d, 2 * d_rnn)  # [gate branch, recurrent branch]
        self.conv = CausalConv1d(d_rnn, conv_width)
        self.lru = RGLRU(d_rnn, heads, c, kernel)
        self.out_proj = nn.Linear(d_rnn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, u = self.in_proj(x).chunk(2, dim=-1)
        h, _ = self.lru(self.conv(u))
        return self.out_proj(F.gelu(gate) * h)

    def init_state(self, batch: int, device=None):
        return {"conv": self.conv.init_state(batch, self.d_rnn, device),
                "h": torch.zeros(batch, self.d_rnn, device=device)}

    def step(self, x_t: torch.Tensor, state):
        gate, u = self.in_proj(x_t).chunk(2, dim=-1)
        u, conv = self.conv.step(u, state["conv"])
        y, h = self.lru.step(u, state["h"])
        return self.out_proj(F.gelu(gate) * y), {"conv": conv, "h": h}


class GatedMLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.gelu(a) * b)


def residual_block(d: int, mixer: nn.Module, mlp_expand: int) -> PreNormBlock:
    """x + mixer(RMSNorm(x)), then x + GatedMLP(RMSNorm(x)); the mixer has forward/step."""
    return PreNormBlock(nn.RMSNorm(d), mixer, nn.RMSNorm(d), GatedMLP(d, mlp_expand * d))


class HawkBackbone(SteppedStack):
    layers_name = "blocks"

    def __init__(self, config: Config, d_input: int):
        if config.d_model < 1 or config.n_layers < 1:
            raise ValueError(f"model.d_model and model.n_layers must be >= 1, found "
                             f"{config.d_model} and {config.n_layers}")
        d = config.d_model
        d_rnn = _rnn_width(d, config.rnn_expand, config.rnn_heads)
        blocks = (
            residual_block(d, RecurrentBlock(d, d_rnn, config.rnn_heads, config.conv_width,
                                             config.c, config.kernel), config.mlp_expand)
            for _ in range(config.n_layers)
        )
        super().__init__(d_input, d, blocks, nn.RMSNorm(d))

    @property
    def kernel_path(self) -> str:
        """Which linear_scan path the last forward ran (step() is always the plain recurrence)."""
        return f"scan:{self.blocks[0].mixer.lru.last_path or 'not run yet'}"


def build(config: Config, d_input: int) -> nn.Module:
    return HawkBackbone(config, d_input)
