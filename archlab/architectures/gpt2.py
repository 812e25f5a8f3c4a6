"""GPT-2 blocks as a causal backbone (Radford et al. 2019).

Pre-LN blocks (LN -> causal self-attention -> residual, LN -> GELU MLP 4x -> residual),
learned absolute positions added to the input, a final LayerNorm. Attention runs through
`F.scaled_dot_product_attention(is_causal=True)`, which picks the fused kernel the device
offers (flash / memory-efficient on CUDA, the math path on CPU).

Initialisation as GPT-2: every Linear and the position table N(0, 0.02), biases zero, and
the two residual projections (attention out, MLP out) N(0, 0.02 / sqrt(2 * n_layers)) so
the residual stream's variance does not grow with depth.

`step()` is incremental decoding with a key/value cache; it equals the parallel forward.

Weight sharing across layers (Super Tiny Language Models 2405.14159, after MobileLLM
2402.16840), all off by default so the existing flavors are unchanged: `ffn_sharing` makes
every block's MLP the block-0 MLP module, `attn_sharing` does the same for the attention
(QKV and output projection); norms stay per layer. Sharing assigns the module, so every
layer holds the same Parameter objects: the optimiser sees each once and one update moves
every layer (copying `.data` would make independent Parameters on one storage, with their
own Adam states). `tie_io` ties the vector task's output head to the input projection
(see io.VectorModel); the token task always ties its LM head to the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import PositionalStack, PreNormBlock


@dataclass
class Config:
    d_model: int = 768
    n_layers: int = 6
    n_heads: int = 12
    max_len: int = 1024  # GPT-2's block size: the learned position table's length
    dropout: float = 0.1
    bias: bool = True
    ffn_sharing: bool = False  # every block uses block 0's MLP (the same Parameters)
    attn_sharing: bool = False  # every block uses block 0's attention
    tie_io: bool = False  # vector task: head weight = input projection weight^T


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, max_len=1024, dropout=0.0),
    # seed ranges: n_layer [4, 6, 8, 10], n_head [6, 8, 12, 16]; 768 divides by all heads
    "seed": Config(d_model=768, n_layers=6, n_heads=12, max_len=1024, dropout=0.1),
}

# exact parameter count of build_model("gpt2", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 108192, "seed": 44496384}

# longest sequence the model takes (the learned position table's length); the sweep driver refuses a longer
# data.context / data.seq_len before any worker starts (registry contract)
MAX_LENGTH_FIELD = "max_len"


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

    def init_state(self, batch: int, device=None):
        return None  # the key/value cache starts empty

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


class GPT2Backbone(PositionalStack):
    """[B, T, d_input] -> [B, T, d_model]; causal; T <= max_len. The state holds one (k, v)
    cache per layer."""

    layers_name, norm_name, arch = "h", "ln_f", "gpt2"

    def __init__(self, cfg: Config, d_input: int):
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"gpt2: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
            )
        blocks = (
            PreNormBlock(nn.LayerNorm(cfg.d_model, bias=cfg.bias), CausalSelfAttention(cfg),
                         nn.LayerNorm(cfg.d_model, bias=cfg.bias), MLP(cfg),
                         names=("ln_1", "attn", "ln_2", "mlp"))
            for _ in range(cfg.n_layers)
        )
        # positions N(0, 0.02) in _init_weights, with the Linears
        super().__init__(d_input, cfg.d_model, blocks, nn.LayerNorm(cfg.d_model, bias=cfg.bias),
                         positions=lambda: nn.Embedding(cfg.max_len, cfg.d_model), dropout=cfg.dropout)
        self._init_weights(cfg.n_layers)
        share_layers(self.h, ffn=cfg.ffn_sharing, attn=cfg.attn_sharing)

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


def share_layers(blocks: nn.ModuleList, *, ffn: bool, attn: bool) -> None:
    """Make every block's MLP (`ffn`) and/or attention (`attn`) block 0's module. The
    module is assigned, not its weights copied, so all layers hold one set of Parameters
    (the parameter count drops by (L - 1) x |module|); state_dict still lists every key."""
    for block in list(blocks)[1:]:
        if ffn:
            block.mlp = blocks[0].mlp
        if attn:
            block.attn = blocks[0].attn


def build(config: Config, d_input: int) -> nn.Module:
    return GPT2Backbone(config, d_input)
