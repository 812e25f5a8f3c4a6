"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"), stacked with pre-norm residual
blocks and an MLP.

One minLSTM layer on x_t (width d_model -> hidden d_hidden = expand * d_model):
    f_t = sigmoid(W_f x_t), i_t = sigmoid(W_i x_t)     gates, from the input only
    f'_t, i'_t = f_t / (f_t + i_t), i_t / (f_t + i_t)   normalised so the state's scale is
                                                        independent of time (the paper's
                                                        length-independence scaling)
    c_t = W_h x_t
    h_t = f'_t * h_{t-1} + i'_t * c_t
No gate reads h_{t-1}, so this is the diagonal linear scan h_t = a_t h_{t-1} + b_t with
a = f', b = i' * c: training runs it through `archlab.kernels.scan.linear_scan`, `step`
runs the same formula one token at a time.

Block (pre-norm residual): x = x + W_o minLSTM(RMSNorm(x));  x = x + MLP(RMSNorm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import LinearScanRecurrence


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    expand: int = 2  # minLSTM hidden width = expand * d_model (the paper's expansion factor)
    mlp_expand: int = 4  # MLP hidden = mlp_expand * d_model; 0 disables the MLP sub-block
    kernel: str = "auto"  # linear_scan path: "auto" | "reference" | "torch" | "triton"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, expand=2, mlp_expand=2),
    "seed": Config(d_model=512, n_layers=6, expand=2, mlp_expand=4),
}

# exact build_model("min_lstm", "vector", FLAVORS[f], d_in=768) parameter counts
PARAM_COUNTS = {"debug": 75328, "seed": 25997056}


class MinLSTM(LinearScanRecurrence):
    """x [B, T, d] -> h [B, T, d_hidden]; the gates depend on x only, so it is a linear scan."""

    def __init__(self, d: int, d_hidden: int, kernel: str):
        super().__init__(kernel)
        self.d_hidden = d_hidden
        # one matmul for forget gate, input gate and candidate
        self.in_proj = nn.Linear(d, 3 * d_hidden)

    def coefficients(self, x: torch.Tensor):
        """(a, b) of h_t = a_t h_{t-1} + b_t, in fp32 (the recurrence is sensitive to a)."""
        kf, ki, c = self.in_proj(x).to(torch.promote_types(x.dtype, torch.float32)).chunk(3, dim=-1)
        # f / (f + i) with f = sigmoid(kf), i = sigmoid(ki), as a softmax over the pair
        # of log-gates: the same value, computed without dividing by a tiny f + i
        w = torch.softmax(torch.stack([F.logsigmoid(kf), F.logsigmoid(ki)]), dim=0)
        return w[0], w[1] * c


def build(config: Config, d_input: int) -> nn.Module:
    # the same pre-norm residual stack as minGRU (composition, not a copy): only the mixer differs
    from archlab.architectures.min_gru import MinGRUBackbone

    return MinGRUBackbone(config, d_input, mixer_cls=MinLSTM)
