"""Universal Transformer (Dehghani et al. 1807.03819) without halting: one GPT-2 block
applied `n_steps` times.

h_0 = drop(in_proj(x) + wpe(t)); h_{s+1} = block(h_s + step_emb[s]) for s < n_steps;
output ln_f(h_{n_steps}). The block (pre-LN causal self-attention + GELU MLP, gpt2.py's
modules) is one module, so its Parameters exist once: the parameter count does not depend
on `n_steps` (except the optional per-step embedding, n_steps x d_model), while compute
grows linearly with it. `step_embedding` adds a learned vector per recurrence step (the
paper's timestep signal; positions are added once at the input, as in GPT-2).

Not implemented: adaptive computation time (ACT halting with a ponder cost); every token
runs all `n_steps`.

`step()` decodes one position: one key/value cache per recurrence step (each step's
attention reads a different input), so it equals the parallel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from archlab.architectures.common import PreNormBlock, input_projection
from archlab.architectures.gpt2 import MLP, CausalSelfAttention


@dataclass
class Config:
    d_model: int = 512
    n_heads: int = 8
    n_steps: int = 6  # how many times the one block is applied
    step_embedding: bool = True  # a learned vector added before each application
    max_len: int = 1024
    dropout: float = 0.1
    bias: bool = True
    tie_io: bool = False  # vector task: head weight = input projection weight^T (io.TiedHead)


FLAVORS = {
    "debug": Config(d_model=32, n_heads=4, n_steps=3, max_len=1024, dropout=0.0),
    # seed-sized: GPT-2-seed width; 6 applications of one block have the compute of
    # gpt2's 6-layer seed flavor with one sixth of its block parameters
    "seed": Config(d_model=768, n_heads=12, n_steps=6, max_len=1024, dropout=0.1),
}

# exact parameter count of build_model("universal", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 95584, "seed": 9061632}


class UniversalBackbone(nn.Module):
    """[B, T, d_input] -> [B, T, d_model]; causal; T <= max_len. State: {"pos": next
    position, "steps": one (k, v) cache per recurrence step}."""

    kernel_path = "sdpa"  # the block's attention is gpt2's F.scaled_dot_product_attention

    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"universal: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
            )
        if cfg.n_steps < 1:
            raise ValueError(f"universal: model.n_steps must be >= 1, found {cfg.n_steps}")
        self.d_model, self.n_steps, self.max_len = cfg.d_model, cfg.n_steps, cfg.max_len
        self.in_proj = input_projection(d_input, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.step_emb = nn.Embedding(cfg.n_steps, cfg.d_model) if cfg.step_embedding else None
        self.block = PreNormBlock(nn.LayerNorm(cfg.d_model, bias=cfg.bias), CausalSelfAttention(cfg),
                                  nn.LayerNorm(cfg.d_model, bias=cfg.bias), MLP(cfg),
                                  names=("ln_1", "attn", "ln_2", "mlp"))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's init, with the residual projections scaled by the unrolled depth: the
        # residual stream sums 2 * n_steps branch outputs, as in an n_steps-layer GPT-2
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.n_steps) if getattr(m, "residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wpe.weight, std=0.02)
        if self.step_emb is not None:
            nn.init.normal_(self.step_emb.weight, std=0.02)

    def _check_len(self, T: int) -> None:
        if T > self.max_len:
            raise ValueError(f"universal: sequence length {T} exceeds model.max_len={self.max_len}")

    def _step_input(self, h: torch.Tensor, s: int) -> torch.Tensor:
        return h if self.step_emb is None else h + self.step_emb.weight[s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        T = x.shape[1]
        self._check_len(T)
        h = self.drop(self.in_proj(x) + self.wpe(torch.arange(T, device=x.device)))
        for s in range(self.n_steps):
            h = self.block(self._step_input(h, s))
        return self.ln_f(h)

    def init_state(self, batch: int, device=None) -> dict:
        return {"pos": 0, "steps": [self.block.init_state(batch, device) for _ in range(self.n_steps)]}

    def step(self, x_t: torch.Tensor, state: dict):
        """x_t [B, d_input] -> (y_t [B, d_model], state); equals forward() at position state['pos']."""
        t = state["pos"]
        self._check_len(t + 1)
        h = self.drop(self.in_proj(x_t) + self.wpe.weight[t])
        caches = []
        for s, cache in enumerate(state["steps"]):
            h, cache = self.block.step(self._step_input(h, s), cache)
            caches.append(cache)
        return self.ln_f(h), {"pos": t + 1, "steps": caches}


def build(config: Config, d_input: int) -> nn.Module:
    return UniversalBackbone(config, d_input)
