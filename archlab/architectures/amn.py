"""AMN, the attention mixture network (seed recipe), vector task only.

At every position t (the seed protocol reads position context-1 of a window):
- baseline_t = mean(x_s, s <= t): the linear-average predictor, made causal as a running
  mean of the prefix (or of the last `window` vectors when window > 0);
- one attention head over the same prefix: query = Linear(d_in -> d_attn)(x_t) (the latest
  vector asks), keys = Linear(d_in -> d_attn)(x_s), values = the raw context vectors x_s,
  so weighted_t = sum_s a_ts x_s lives in the input space;
- residual MLP on [baseline_t, weighted_t]: Linear(2 d_in -> d_hidden), GELU,
  Linear(d_hidden -> d_in);
- output = baseline_t + residual_t (the task IO L2-normalises it).
The MLP's last layer starts at zero, so an untrained AMN predicts exactly the linear
average and training only has to learn the correction (the seed's framing: beat it).

Seed flavor at 768-D: d_attn 256, d_hidden 512 -> 1,574,656 parameters (seed: 1.5M).
AMN is not a backbone + head, so it provides `build_vector_model` (registry contract);
the registry refuses the token task for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_attn: int = 256  # context / query encoder width
    d_hidden: int = 512  # residual MLP hidden width
    dropout: float = 0.0  # inside the residual MLP
    window: int = 0  # 0: baseline and attention cover the whole prefix; k > 0: the last k


FLAVORS = {
    "debug": Config(d_attn=16, d_hidden=32),
    "seed": Config(d_attn=256, d_hidden=512),
}

# exact parameter count of build_model("amn", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 99136, "seed": 1574656}


class AMN(nn.Module):
    """forward(x: [B, T, d_in]) -> [B, T, d_in] (un-normalised; output t predicts x[t+1])."""

    def __init__(self, config: Config, d_in: int, d_out: int):
        super().__init__()
        if d_out != d_in:
            raise ValueError(
                f"amn predicts in its input space (baseline + residual): d_out must equal d_in={d_in}, found {d_out}"
            )
        if config.window < 0:
            raise ValueError(f"model.window must be >= 0 (0 = whole prefix), found {config.window}")
        self.d_in, self.d_attn, self.window = d_in, config.d_attn, config.window
        self.ctx_enc = nn.Linear(d_in, config.d_attn)
        self.query_enc = nn.Linear(d_in, config.d_attn)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_in, config.d_hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_hidden, d_in),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _allowed(self, T: int, device) -> torch.Tensor:
        """(T, T) bool: position t may see position s (s <= t, and within the window)."""
        t = torch.arange(T, device=device)
        diff = t.unsqueeze(1) - t.unsqueeze(0)  # (T, T): t - s
        ok = diff >= 0
        if self.window > 0:
            ok = ok & (diff < self.window)
        return ok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        allowed = self._allowed(T, x.device)
        # baseline: masked mean over the visible prefix; a (T, T) averaging matrix keeps it
        # exactly causal and window-aware without cumsum drift over long documents
        avg = allowed.to(x.dtype)
        avg = avg / avg.sum(dim=1, keepdim=True)
        baseline = torch.matmul(avg, x)  # (T, T) @ (B, T, D) -> (B, T, D)

        q = self.query_enc(x)  # (B, T, A)
        k = self.ctx_enc(x)  # (B, T, A)
        scores = q @ k.transpose(1, 2) / math.sqrt(self.d_attn)  # (B, T, T): row t, col s
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = F.softmax(scores, dim=-1)
        weighted = attn @ x  # (B, T, D): attention over raw context vectors

        residual = self.mlp(torch.cat([baseline, weighted], dim=-1))  # (B, T, 2D) -> (B, T, D)
        return baseline + residual


def build_vector_model(config: Config, d_in: int, d_out: int) -> nn.Module:
    return AMN(config, d_in, d_out)
