"""RetNet (Sun et al. 2023, "Retentive Network"): multi-scale retention + FFN blocks.

Multi-scale retention (MSR), per head h with its own decay gamma_h = 1 - 2^(-5 - h):
    q = rot(x W_q), k = rot(x W_k) / sqrt(d_k), v = x W_v,
    S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t,
    MSR(x) = W_o (swish(x W_g) * GroupNorm_h(o)).
`rot` is a plain rotary position embedding (`rotary=True`; the paper's xPos without its
length-extrapolation scaling). The paper's normalisations of the decay matrix and of the
scores rescale each (position, head) row by one number, which the per-head GroupNorm
cancels; they are left out.

The retention itself is `archlab.kernels.retention.retention`, in one of three forms of
the same map (`mode`): "parallel" (masked attention-like, O(T^2)), "recurrent" (the state
recurrence), "chunkwise" (parallel inside chunks of `chunk_size`, recurrent across them;
"auto" = chunkwise). `step()` uses `retention_step`. tests/test_zoo2_ssm.py checks all
forms and stepping agree, outputs and input gradients.

Block: pre-LayerNorm residual, x + MSR(LN(x)), then x + FFN(LN(x)) with GELU, d_ff = 2 d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import PreNormBlock, SteppedStack, gelu_mlp


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    value_factor: int = 2  # v and gate width = value_factor * d_model (the paper's 2)
    d_ff: int = 1024
    rotary: bool = True
    dropout: float = 0.0
    mode: str = "auto"  # "auto" (= chunkwise) | "parallel" | "recurrent" | "chunkwise"
    chunk_size: int = 64
    kernel: str = "auto"  # "auto" | "torch" | "reference" | "fla"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, d_ff=64, chunk_size=16),
    "seed": Config(d_model=512, n_layers=6, n_heads=8, d_ff=1024, dropout=0.1),
}

# exact count of build_model("retnet", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 75296, "seed": 19696896}


def rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the last dim (pairs (2i, 2i+1)); x [..., T, K], pos [T] float."""
    K = x.shape[-1]
    wd = torch.promote_types(x.dtype, torch.float32)  # angles in >= fp32
    theta = 10000.0 ** (-torch.arange(0, K, 2, device=x.device, dtype=wd) / K)
    ang = pos.to(wd)[:, None] * theta  # (T, K/2)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class MultiScaleRetention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        if D % H:
            raise ValueError(f"model.d_model={D} is not divisible by model.n_heads={H}")
        if (D // H) % 2 and cfg.rotary:
            raise ValueError(f"rotary needs an even head dim; d_model/n_heads = {D // H}")
        self.H, self.dk, self.dv = H, D // H, cfg.value_factor * D // H
        self.rotary, self.mode, self.chunk_size, self.kernel = cfg.rotary, cfg.mode, cfg.chunk_size, cfg.kernel
        self.q = nn.Linear(D, D, bias=False)
        self.k = nn.Linear(D, D, bias=False)
        self.v = nn.Linear(D, self.H * self.dv, bias=False)
        self.g = nn.Linear(D, self.H * self.dv, bias=False)
        self.o = nn.Linear(self.H * self.dv, D, bias=False)
        self.group_norm = nn.GroupNorm(H, self.H * self.dv)
        # fixed multi-scale decays, one per head: a buffer, not learned
        self.register_buffer("gamma", 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)),
                             persistent=False)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """q, k [B, H, T, dk]; v [B, H, T, dv] for x [B, T, D] at positions pos [T]."""
        q = self.q(x).unflatten(-1, (self.H, self.dk)).transpose(1, 2)  # (B, H, T, dk)
        k = self.k(x).unflatten(-1, (self.H, self.dk)).transpose(1, 2) * self.dk ** -0.5
        v = self.v(x).unflatten(-1, (self.H, self.dv)).transpose(1, 2)  # (B, H, T, dv)
        if self.rotary:
            q, k = rotate(q, pos), rotate(k, pos)
        return q, k, v

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x [..., D], o [..., H, dv] -> [..., D]."""
        lead = o.shape[:-2]
        o = self.group_norm(o.reshape(-1, self.H * self.dv)).reshape(*lead, self.H * self.dv)
        return self.o(F.silu(self.g(x)) * o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        from archlab.kernels.retention import retention

        pos = torch.arange(x.shape[1], device=x.device)
        q, k, v = self._qkv(x, pos)
        o, _ = retention(q, k, v, self.gamma, mode=self.mode, chunk_size=self.chunk_size,
                         kernel=self.kernel)
        return self._out(x, o.transpose(1, 2).to(x.dtype))  # o (B, T, H, dv)

    def init_state(self, batch: int, device=None):
        # >= fp32 states: retention_step keeps an fp32 state fp32 (long bf16 decodes)
        dtype = torch.promote_types(self.q.weight.dtype, torch.float32)
        return torch.zeros(batch, self.H, self.dk, self.dv, device=device, dtype=dtype), 0

    def step(self, x_t: torch.Tensor, state):  # x_t [B, D]; state (S [B, H, dk, dv], t)
        from archlab.kernels.retention import retention_step

        S, t = state
        q, k, v = self._qkv(x_t.unsqueeze(1), torch.tensor([t], device=x_t.device))
        o, S = retention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.gamma, S)  # (B, H, dv)
        return self._out(x_t, o.to(x_t.dtype)), (S, t + 1)


def retnet_block(cfg: Config) -> PreNormBlock:
    """x + MSR(LN(x)), then x + FFN(LN(x)) (GELU), dropout on both branches."""
    return PreNormBlock(nn.LayerNorm(cfg.d_model), MultiScaleRetention(cfg), nn.LayerNorm(cfg.d_model),
                        gelu_mlp(cfg.d_model, cfg.d_ff), dropout=cfg.dropout,
                        names=("norm1", "msr", "norm2", "ffn"))


class RetNetBackbone(SteppedStack):
    def __init__(self, cfg: Config, d_input: int):
        if cfg.mode not in ("auto", "parallel", "recurrent", "chunkwise"):
            raise ValueError(f"model.mode: expected auto, parallel, recurrent or chunkwise; found {cfg.mode!r}")
        super().__init__(d_input, cfg.d_model, (retnet_block(cfg) for _ in range(cfg.n_layers)),
                         nn.LayerNorm(cfg.d_model))
        self._kernel = cfg.kernel
        self.last_device = None

    @property
    def kernel_path(self) -> str:
        from archlab.kernels._dispatch import resolve_kernel

        device = self.last_device or torch.device("cpu")
        return f"retention:{resolve_kernel('retention', self._kernel, device)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        self.last_device = x.device
        return super().forward(x)


def build(config: Config, d_input: int) -> nn.Module:
    return RetNetBackbone(config, d_input)
