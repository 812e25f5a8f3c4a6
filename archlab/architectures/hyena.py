"""Hyena (Poli et al. 2023, "Hyena Hierarchy"): implicit long convolutions + data gating.

Hyena operator of order N on u [B, T, D]:
    [x_0, x_1, ..., x_{N-1}, v] = ShortConv(Linear(u))        (N+1 streams of width D)
    for i = N-1 .. 1:  v = h_i * (x_i . v) + bias_i . (x_i . v)  (long causal convolution)
    y = Linear(x_0 . v)
Each long filter h_i [D, T] is *implicit*: a small FFN with sine activations maps a
positional encoding of t (t/max_len and complex exponentials at `emb_dim // 2` frequencies)
to D values, multiplied by an exponential decay window exp(-|alpha_d| t / max_len) whose
rates are spread over the channels (fast- to slow-decaying), so the filter length is the
sequence length but its parameter count is not.

The long convolution is causal: FFT with zero padding to 2T (`kernel="fft"`, "auto") or
the same sum as a direct depthwise conv1d (`kernel="direct"`, O(T^2), for checking).
Positions are scaled by the fixed `max_len` (not by T), so output t does not depend on how
long the sequence is; T > max_len is refused.

Block: pre-LayerNorm residual, x + Hyena(LN(x)), then x + MLP(LN(x)) (GELU).
Hyena has no recurrent step (its filters are as long as the input): no init_state/step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import PreNormBlock, Stack, gelu_mlp


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    order: int = 2  # N: N-1 long convolutions, N gates
    filter_order: int = 64  # width of the implicit filter FFN
    emb_dim: int = 33  # positional features: t plus cos/sin at (emb_dim - 1) / 2 frequencies
    short_filter: int = 3  # explicit depthwise causal conv on the projections
    d_ff: int = 1024
    max_len: int = 2048
    dropout: float = 0.0
    kernel: str = "auto"  # "auto" (= "fft") | "fft" | "direct"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, order=2, filter_order=16, emb_dim=5, d_ff=64, max_len=256),
    "seed": Config(d_model=512, n_layers=6, order=2, filter_order=64, emb_dim=33, d_ff=1024, dropout=0.1),
}

# exact count of build_model("hyena", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 70336, "seed": 13706112}

# longest sequence the model takes (the implicit filters are defined on positions < max_len); the sweep driver refuses a longer
# data.context / data.seq_len before any worker starts (registry contract)
MAX_LENGTH_FIELD = "max_len"

KERNELS = ("fft", "direct")


def long_conv(u: torch.Tensor, h: torch.Tensor, kernel: str) -> torch.Tensor:
    """Causal y_t = sum_{s<=t} h_{t-s} u_s per channel; u [B, D, T], h [D, T] -> [B, D, T]."""
    T = u.shape[-1]
    if kernel == "fft":
        # FFT in at least fp32 (no bf16/fp16 FFT); zero-pad so the circular conv is linear
        wd = torch.promote_types(u.dtype, torch.float32)
        n = 2 * T
        y = torch.fft.irfft(torch.fft.rfft(u.to(wd), n=n) * torch.fft.rfft(h.to(wd), n=n), n=n)
        return y[..., :T].to(u.dtype)
    if kernel == "direct":
        return F.conv1d(F.pad(u, (T - 1, 0)), h.flip(-1).unsqueeze(1).to(u.dtype), groups=h.shape[0])
    raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {kernel!r}")


class Sin(nn.Module):
    """sin(w x) with a learned frequency per feature (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Positional encoding -> FFN(sin) -> exponential decay window: filters [channels, T]."""

    def __init__(self, channels: int, cfg: Config):
        super().__init__()
        if cfg.emb_dim < 3 or cfg.emb_dim % 2 == 0:
            raise ValueError(f"model.emb_dim must be odd and >= 3 (t plus cos/sin pairs); found {cfg.emb_dim}")
        self.max_len, self.bands = cfg.max_len, (cfg.emb_dim - 1) // 2
        fo = cfg.filter_order
        self.ffn = nn.Sequential(
            nn.Linear(cfg.emb_dim, fo), Sin(fo), nn.Linear(fo, fo), Sin(fo), nn.Linear(fo, fo), Sin(fo),
            nn.Linear(fo, channels, bias=False),
        )
        # decay rates such that the window falls to 1e-2 between 30% and 150% of max_len
        target = math.log(1e-2)
        self.register_buffer("deltas", torch.linspace(-target / 1.5, -target / 0.3, channels),
                             persistent=False)
        self.bias = nn.Parameter(torch.randn(channels))  # the skip term of each long conv

    def positions(self, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [T, emb_dim], t [T] in [0, T/max_len))."""
        n = torch.arange(T, device=device, dtype=dtype)
        t = n / self.max_len
        f = torch.linspace(1e-4, self.bands - 1, self.bands, device=device, dtype=dtype)
        ang = 2 * math.pi * n[:, None] / self.max_len * f  # (T, bands)
        return torch.cat([t[:, None], torch.cos(ang), torch.sin(ang)], dim=-1), t

    def forward(self, T: int, device) -> torch.Tensor:
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds model.max_len={self.max_len} "
                             "(the implicit filters' position scale); raise model.max_len")
        z, t = self.positions(T, device, self.bias.dtype)
        h = self.ffn(z)  # (T, channels)
        window = torch.exp(-t[:, None] * self.deltas.abs().to(t.dtype))  # (T, channels)
        return (h * window).transpose(0, 1)  # (channels, T)


class HyenaOperator(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.order < 2:
            raise ValueError(f"model.order must be >= 2, found {cfg.order}")
        D, N = cfg.d_model, cfg.order
        self.D, self.N = D, N
        self.kernel = "fft" if cfg.kernel == "auto" else cfg.kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {cfg.kernel!r}")
        self.in_proj = nn.Linear(D, (N + 1) * D)
        self.short = nn.Conv1d((N + 1) * D, (N + 1) * D, cfg.short_filter, groups=(N + 1) * D,
                               padding=cfg.short_filter - 1)
        self.filter = ImplicitFilter((N - 1) * D, cfg)
        self.out_proj = nn.Linear(D, D)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        T = u.shape[1]
        z = self.in_proj(u).transpose(1, 2)  # (B, (N+1) D, T)
        z = self.short(z)[..., :T]  # causal: keep the first T of the two-sided padding
        *x, v = z.split(self.D, dim=1)  # N gates x_0..x_{N-1} and the value, each (B, D, T)
        h = self.filter(T, u.device).split(self.D, dim=0)  # N-1 filters (D, T)
        bias = self.filter.bias.split(self.D)
        for i, x_i in enumerate(reversed(x[1:])):
            v = v * x_i
            v = long_conv(v, h[i], self.kernel) + bias[i][:, None] * v
        return self.out_proj((x[0] * v).transpose(1, 2))


class HyenaBackbone(Stack):
    """Pre-LayerNorm residual blocks: x + Hyena(LN(x)), then x + MLP(LN(x)); no step."""

    def __init__(self, cfg: Config, d_input: int):
        blocks = (
            PreNormBlock(nn.LayerNorm(cfg.d_model), HyenaOperator(cfg), nn.LayerNorm(cfg.d_model),
                         gelu_mlp(cfg.d_model, cfg.d_ff), dropout=cfg.dropout)
            for _ in range(cfg.n_layers)
        )
        super().__init__(d_input, cfg.d_model, blocks, nn.LayerNorm(cfg.d_model))
        self.kernel_path = "fft" if cfg.kernel == "auto" else cfg.kernel


def build(config: Config, d_input: int) -> nn.Module:
    return HyenaBackbone(config, d_input)
