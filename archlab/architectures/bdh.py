"""Baby Dragon Hatchling (BDH, Kosowski et al. 2509.26507), the block of the official code
(pathwaycom/bdh bdh.py, read at HEAD 714bc80; written here from its equations).

One set of weights is used by every layer: encoder E and value encoder E_v, each
(n_heads, D, N), and decoder Dec (n_heads * N, D), with N = mult * D / n_heads neurons per
head. With LN = LayerNorm without affine and x = LN(input), each of the n_layers layers does

    xs = ReLU(x @ E)                                   (B, nh, T, N)  sparse, >= 0
    a  = LN(tril(R(xs) R(xs)^T, diagonal=-1) @ x)      (B, nh, T, D)  Q = K = xs, V = x
    ys = ReLU(a @ E_v)                                 (B, nh, T, N)  sparse, >= 0
    h  = dropout(xs * ys)                              Hebbian-like gating
    x  = LN(x + LN(concat_heads(h) @ Dec))

R is RoPE over the N neuron dimensions (pairs (2i, 2i+1) share the frequency
1 / (2^16)^(2i / N) / (2 pi) cycles per position). The attention has no softmax and no
scale, and `diagonal=-1` keeps strictly past tokens, so position 0 reads nothing (a = 0).

Because it is linear attention, `step()` is exact recurrence: per layer and head the state
S_t = sum_{tau < t} R_tau(xs_tau)^T x_tau (N x D), and a_t = LN(R_t(xs_t) S_t).

Departures from the official model: the embedding and output head are the platform's
(io.TokenModel: a tied LM head after an affine LayerNorm; the official lm_head is an untied
D x V matrix), so the backbone's parameters are E, E_v and Dec only: 3 * mult * D^2,
independent of n_layers. `routing_stats()` reports the fraction of non-zero entries of xs,
ys and xs * ys (the paper reports about 5% active at scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import input_projection


@dataclass
class Config:
    d_model: int = 256  # the official n_embd
    n_layers: int = 6  # applications of the one shared layer
    n_heads: int = 4
    mult: int = 128  # the official mlp_internal_dim_multiplier: N = mult * d_model / n_heads
    dropout: float = 0.1
    rope_theta: float = 65536.0  # 2^16, as the official code


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=2, mult=8, dropout=0.0),
    # the anchors' CPU size: N = 512 neurons per head
    "cpu": Config(d_model=128, n_layers=6, n_heads=4, mult=16, dropout=0.1),
    # the official default (25.2M in the shared weights)
    "seed": Config(d_model=256, n_layers=6, n_heads=4, mult=128, dropout=0.1),
}

# exact parameter count of build_model("bdh", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 74528, "cpu": 983936, "seed": 25560064}


def rope_freqs(n: int, theta: float) -> torch.Tensor:
    """Cycles per position for each of n neuron dims; pairs (2i, 2i+1) share one frequency."""
    paired = torch.div(torch.arange(n, dtype=torch.float64), 2, rounding_mode="floor") * 2
    return (1.0 / theta ** (paired / n) / (2 * math.pi)).float()  # (n,)


def rope(v: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (v_2i, v_2i+1) of v [..., T, N] by angle 2 pi frac(pos * freq); pos [T]."""
    phase = (pos.to(freqs.dtype)[:, None] * freqs) % 1.0 * (2 * math.pi)  # (T, N)
    cos, sin = phase.cos().to(v.dtype), phase.sin().to(v.dtype)
    # (v0, v1) -> (-v1, v0) on each pair
    rot = torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).reshape(v.shape)
    return v * cos + rot * sin


class BDHBackbone(nn.Module):
    """[B, T, d_input] -> [B, T, d_model]; causal. State: {"pos", "S": one (B, nh, N, D)
    linear-attention state per layer}."""

    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        D, nh = cfg.d_model, cfg.n_heads
        if (cfg.mult * D) % nh:
            raise ValueError(f"bdh: model.mult * model.d_model = {cfg.mult * D} must be divisible by model.n_heads={nh}")
        N = cfg.mult * D // nh
        if N % 2:
            raise ValueError(f"bdh: neurons per head N = mult * d_model / n_heads = {N} must be even (RoPE pairs)")
        if cfg.n_layers < 1:
            raise ValueError(f"bdh: model.n_layers must be >= 1, found {cfg.n_layers}")
        self.d_model, self.n_heads, self.n_neurons, self.n_layers = D, nh, N, cfg.n_layers
        self.in_proj = input_projection(d_input, D)
        # the official init: all three N(0, 0.02)
        self.encoder = nn.Parameter(torch.empty(nh, D, N).normal_(std=0.02))
        self.encoder_v = nn.Parameter(torch.empty(nh, D, N).normal_(std=0.02))
        self.decoder = nn.Parameter(torch.empty(nh * N, D).normal_(std=0.02))
        self.drop = nn.Dropout(cfg.dropout)
        self.register_buffer("freqs", rope_freqs(N, cfg.rope_theta), persistent=False)
        # running sums of the non-zero fractions (n_layers, 3), kept on the activations'
        # device so recording never synchronises; a plain attribute, not a buffer, so it
        # is neither saved nor broadcast by DDP
        self._stats: torch.Tensor | None = None
        self._stat_n = 0

    @staticmethod
    def _ln(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:])  # no affine, as the official `ln`

    def _record(self, level: int, xs: torch.Tensor, ys: torch.Tensor, xy: torch.Tensor) -> None:
        with torch.no_grad():
            if self._stats is None or self._stats.device != xs.device:
                self._stats = torch.zeros(self.n_layers, 3, dtype=torch.float32, device=xs.device)
            self._stats[level] += torch.stack([(t > 0).float().mean() for t in (xs, ys, xy)])
        if level == self.n_layers - 1:
            self._stat_n += 1

    def _mix(self, x: torch.Tensor, xs: torch.Tensor, a: torch.Tensor, level: int) -> torch.Tensor:
        """The layer after the attention: x, a [B, nh or 1, T, D]; xs [B, nh, T, N]."""
        B, _, T, _ = xs.shape
        ys = F.relu(self._ln(a) @ self.encoder_v)  # (B, nh, T, N)
        xy = xs * ys
        self._record(level, xs, ys, xy)  # before dropout: the model's own sparsity
        h = self.drop(xy)
        y = h.transpose(1, 2).reshape(B, 1, T, self.n_heads * self.n_neurons) @ self.decoder  # (B, 1, T, D)
        return self._ln(x + self._ln(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        B, T, _ = x.shape
        x = self._ln(self.in_proj(x)).unsqueeze(1)  # (B, 1, T, D): V is shared by the heads
        pos = torch.arange(T, device=x.device)
        for level in range(self.n_layers):
            xs = F.relu(x @ self.encoder)  # (B, nh, T, N)
            xr = rope(xs, pos, self.freqs)
            scores = (xr @ xr.mT).tril(diagonal=-1)  # (B, nh, T, T): strictly past keys
            x = self._mix(x, xs, scores @ x, level)
        return x.squeeze(1)

    def init_state(self, batch: int, device=None) -> dict:
        S = [torch.zeros(batch, self.n_heads, self.n_neurons, self.d_model, device=device) for _ in range(self.n_layers)]
        return {"pos": 0, "S": S}

    def step(self, x_t: torch.Tensor, state: dict):
        """x_t [B, d_input] -> (y_t [B, d_model], state): a_t reads S before adding token t."""
        t = state["pos"]
        x = self._ln(self.in_proj(x_t))[:, None, None, :]  # (B, 1, 1, D)
        pos = torch.tensor([t], device=x.device)
        new_S = []
        for level, S in enumerate(state["S"]):
            S = S.to(x.dtype)
            xs = F.relu(x @ self.encoder)  # (B, nh, 1, N)
            xr = rope(xs, pos, self.freqs)
            a = xr @ S  # (B, nh, 1, D)
            new_S.append(S + xr.mT @ x)  # + k_t^T v_t: (B, nh, N, 1) @ (B, 1, 1, D)
            x = self._mix(x, xs, a, level)
        return x[:, 0, 0], {"pos": t + 1, "S": new_S}

    def routing_stats(self) -> dict[str, float]:
        """Mean fraction of non-zero activations since the last call, over layers and per layer."""
        if self._stat_n == 0 or self._stats is None:
            return {}
        frac = (self._stats / self._stat_n).cpu()  # (n_layers, 3)
        out = {}
        for j, name in enumerate(("bdh_x_active", "bdh_y_active", "bdh_xy_active")):
            out[name] = frac[:, j].mean().item()
            for level in range(self.n_layers):
                out[f"{name}.layer{level}"] = frac[level, j].item()
        self._stats.zero_()
        self._stat_n = 0
        return out


def build(config: Config, d_input: int) -> nn.Module:
    return BDHBackbone(config, d_input)
