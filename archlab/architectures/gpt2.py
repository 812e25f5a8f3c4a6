"""GPT-2 blocks as a causal backbone (Radford et al. 2019).

Pre-LN blocks (LN -> causal self-attention -> residual, LN -> GELU MLP 4x -> residual),
learned absolute positions added to the input, a final LayerNorm. Attention runs through
`F.scaled_dot_product_attention(is_causal=True)`, which picks the fused kernel the device
offers (flash / memory-efficient on CUDA, the math path on CPU).

Initialisation as GPT-2: every Linear and the position table N(0, 0.02), biases zero, and
the two residual projections (attention out, MLP out) N(0, 0.02 / sqrt(2 * n_layers)) so
the residual stream's variance does not grow with depth.

`step()` is incremental decoding with a key/value cache; it equals the parallel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 768
    n_layers: int = 6
    n_heads: int = 12
    max_len: int = 1024  # GPT-2's block size: the learned position table's length
    dropout: float = 0.1
    bias: bool = True


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, max_len=1024, dropout=0.0),
    # seed ranges: n_layer [4, 6, 8, 10], n_head [6, 8, 12, 16]; 768 divides by all heads
    "seed": Config(d_model=768, n_layers=6, n_heads=12, max_len=1024, dropout=0.1),
}

# exact parameter count of build_model("gpt2", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 108192, "seed": 44496384}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.c_proj.residual_proj = True  # marks the 1/sqrt(2 n_layers) init
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_heads * self.d_head, dim=-1)
        # (B, T, C) -> (B, nh, T, hs)
        return [t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v)]

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head)  # (B, T, C)
        return self.resid_drop(self.c_proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self._out(y)

    def step(self, x_t: torch.Tensor, cache):
        """x_t [B, C]; cache (k, v) each [B, nh, t, hs] or None -> (y_t [B, C], cache)."""
        q, k, v = self._heads(x_t.unsqueeze(1))  # (B, nh, 1, hs)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        # the single query is the newest position: every cached key is in its past
        y = F.scaled_dot_product_attention(q, k, v)
        return self._out(y).squeeze(1), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.c_proj.residual_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def step(self, x_t: torch.Tensor, cache):
        a, cache = self.attn.step(self.ln_1(x_t), cache)
        x_t = x_t + a
        return x_t + self.mlp(self.ln_2(x_t)), cache


class GPT2Backbone(nn.Module):
    """[B, T, d_input] -> [B, T, d_model]; causal; T <= max_len."""

    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"gpt2: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
            )
        self.d_model = cfg.d_model
        self.max_len = cfg.max_len
        # the task IO already projects to d_model; only a foreign width needs a projection
        self.in_proj = nn.Identity() if d_input == cfg.d_model else nn.Linear(d_input, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self._init_weights(cfg.n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / math.sqrt(2 * n_layers) if getattr(m, "residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)

    # attention always goes through F.scaled_dot_product_attention, which picks its own
    # fused backend (flash / memory-efficient on CUDA, math on CPU)
    kernel_path = "sdpa"

    def _check_len(self, T: int) -> None:
        if T > self.max_len:
            raise ValueError(f"gpt2: sequence length {T} exceeds model.max_len={self.max_len}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        self._check_len(T)
        pos = torch.arange(T, device=x.device)
        h = self.drop(self.in_proj(x) + self.wpe(pos))
        for block in self.h:
            h = block(h)
        return self.ln_f(h)

    def init_state(self, batch: int, device=None):
        # position counter + one (k, v) cache per layer; caches start empty
        return {"pos": 0, "cache": [None] * len(self.h)}

    def step(self, x_t: torch.Tensor, state):
        """x_t [B, d_input] -> (y_t [B, d_model], state); equals forward() at position state['pos']."""
        t = state["pos"]
        self._check_len(t + 1)
        h = self.drop(self.in_proj(x_t) + self.wpe.weight[t])
        caches = []
        for block, cache in zip(self.h, state["cache"]):
            h, cache = block.step(h, cache)
            caches.append(cache)
        return self.ln_f(h), {"pos": t + 1, "cache": caches}


def build(config: Config, d_input: int) -> nn.Module:
    return GPT2Backbone(config, d_input)
