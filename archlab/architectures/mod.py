"""Mixture-of-Depths (Raposo et al. 2404.02258) over GPT-2 blocks.

Every `route_every`-th block (layers i with i % route_every == route_offset; the paper
routes every other block) is routed; the others are plain gpt2 blocks. A routed block has
a router r_i = w . LN_1(x_i) + b, one scalar per token (LN_1 is the block's own input norm:
the raw residual stream grows with depth, and an unnormalised router is a known NaN source).

Training (expert choice): the block processes only the top k = max(1, ceil(capacity * T))
tokens of each sequence by r, gathered in their original order under a causal mask:
    x_i <- x_i + sigmoid(r_i) * (block(x_sel)_i - x_i)   for i in the top k, else x_i.
The sigmoid(r) multiplier puts the router on the gradient path. Positions are learned
absolute embeddings added at the input (GPT-2), so gathered tokens keep their positions.

Top-k over the sequence is not causal: whether token i is in the top k depends on the
router scores of later tokens (a test shows it). Inference therefore uses a causal rule:
route token i iff sigmoid(r_i) > 0.5, i.e. r_i > 0. The router is trained for it by the
paper's auxiliary loss, a binary cross-entropy of r against top-k membership
(`router_bce_weight`, reported through aux_losses() as `mod_router_bce`).
Why this rule and not the paper's second option (a separate MLP predictor on stopgrad(x)):
the threshold needs no extra module or stop-gradient path, the router that decides in
training is the one that decides at inference, and its agreement with top-k is measured
directly (`mod_router_agree`). Its cost: the BCE gradient reaches the residual stream, and
at inference the routed fraction is whatever the router learned, not exactly `capacity`
(`mod_threshold_frac` reports it). Eval mode (forward and `step`) uses the threshold; a
routed block then runs attention over the routed tokens only (a key mask), which equals
the gathered computation.

Short contexts: the vector task has T = context = 5, where the paper's C = 12.5% gives
k = 0. k = max(1, ceil(C * T)) keeps k >= 1 (C = 0.125 -> 1 of 5, 0.25 -> 2, 0.5 -> 3).
The predicting (last) position may be skipped by a routed block: it is one position like
any other here (the loss is at every position, and a causal rule cannot know which
position is last when stepping), and the dense blocks in between always process it, so it
still attends to its context and gets an MLP at every other layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import PositionalStack, PreNormBlock
from archlab.architectures.gpt2 import MLP, CausalSelfAttention


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    max_len: int = 1024
    dropout: float = 0.1
    bias: bool = True
    capacity: float = 0.25  # fraction of positions a routed block processes in training
    route_every: int = 2  # layers i with i % route_every == route_offset are routed
    route_offset: int = 1
    router_bce_weight: float = 0.1  # weight of the router's top-k BCE (the inference rule)


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, max_len=1024, dropout=0.0, capacity=0.5),
    # GPT-2-seed width at the anchors' 6 layers: routed layers 1, 3, 5
    "seed": Config(d_model=768, n_layers=6, n_heads=12, max_len=1024, dropout=0.1, capacity=0.25),
}

# exact parameter count of build_model("mod", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 108225, "seed": 44498691}


def capacity_k(capacity: float, T: int) -> int:
    """Tokens a routed block processes per sequence of length T in training: >= 1, <= T."""
    return max(1, min(T, math.ceil(capacity * T - 1e-9)))


def _block(cfg: Config) -> PreNormBlock:
    return PreNormBlock(nn.LayerNorm(cfg.d_model, bias=cfg.bias), CausalSelfAttention(cfg),
                        nn.LayerNorm(cfg.d_model, bias=cfg.bias), MLP(cfg),
                        names=("ln_1", "attn", "ln_2", "mlp"))


class RoutedBlock(nn.Module):
    """A gpt2 block behind a Mixture-of-Depths router: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.capacity, self.bce_weight = cfg.capacity, cfg.router_bce_weight
        self.block = _block(cfg)
        self.router = nn.Linear(cfg.d_model, 1)
        self._aux: torch.Tensor | None = None
        self._stats: dict[str, list] = {}  # name -> [sum, count] since routing_stats()

    def route_logits(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [...]
        return self.router(self.block.ln_1(x)).squeeze(-1)

    def _note(self, name: str, value: torch.Tensor | float) -> None:
        # device scalars, summed without a sync and read once per routing_stats() call
        v = value.detach().float() if torch.is_tensor(value) else float(value)
        acc = self._stats.setdefault(name, [0.0, 0])
        acc[0], acc[1] = acc[0] + v, acc[1] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.route_logits(x)  # (B, T)
        self._note("mod_threshold_frac", (r > 0).float().mean())
        if not self.training:
            self._aux = None
            return self.forward_masked(x, r > 0, r)
        B, T, D = x.shape
        k = capacity_k(self.capacity, T)
        idx = r.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), original order
        member = torch.zeros_like(r).scatter(1, idx, 1.0)
        self._aux = F.binary_cross_entropy_with_logits(r.float(), member.float())
        self._note("mod_topk_frac", k / T)
        self._note("mod_router_agree", ((r > 0).float() == member).float().mean())
        return self.forward_gathered(x, idx, r)

    def forward_gathered(self, x: torch.Tensor, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The block on the tokens idx [B, k] (ascending) only, causal among them."""
        gidx = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (B, k, D)
        x_sel = x.gather(1, gidx)
        delta = (self.block(x_sel) - x_sel) * torch.sigmoid(r.gather(1, idx)).unsqueeze(-1)
        return x.scatter_add(1, gidx, delta.to(x.dtype))  # idx has no repeats: x + delta at idx

    def forward_masked(self, x: torch.Tensor, routed: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The block where routed [B, T] (bool), run at full length with attention keys
        restricted to routed tokens (plus the query itself, so no row is empty: unrouted
        rows are discarded). Equals forward_gathered for the same token set."""
        blk = self.block
        T = x.shape[1]
        q, k, v = blk.attn._heads(blk.ln_1(x))  # (B, nh, T, hs)
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() & (routed[:, None, :] | eye)  # (B, T, T)
        h = x + blk.attn._out(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1)))
        h = h + blk.mlp(blk.ln_2(h))
        gate = torch.where(routed, torch.sigmoid(r), torch.zeros_like(r)).unsqueeze(-1)
        return x + gate * (h - x)

    def init_state(self, batch: int, device=None):
        return None  # (k, v, routed) caches, filled by step()

    def step(self, x_t: torch.Tensor, cache):
        """Eval-mode decoding with the threshold rule: x_t [B, D] -> (y_t, cache). Keys of
        unrouted tokens are cached but masked out."""
        blk = self.block
        r = self.route_logits(x_t)  # (B,)
        routed = r > 0
        q, k, v = blk.attn._heads(blk.ln_1(x_t).unsqueeze(1))  # (B, nh, 1, hs)
        keep = torch.ones_like(routed).unsqueeze(1)  # the query itself
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            keep = torch.cat([cache[2], keep], dim=1)  # (B, t + 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        h = x_t + blk.attn._out(y).squeeze(1)
        h = h + blk.mlp(blk.ln_2(h))
        gate = torch.where(routed, torch.sigmoid(r), torch.zeros_like(r)).unsqueeze(-1)
        keep = keep.clone()
        keep[:, -1] = routed
        return x_t + gate * (h - x_t), (k, v, keep)

    def aux_losses(self) -> dict:
        return {} if self._aux is None else {"mod_router_bce": (self._aux, self.bce_weight)}

    def routing_stats(self) -> dict[str, float]:
        out = {name: float(total) / n for name, (total, n) in self._stats.items()}
        self._stats = {}
        return out


class MoDBackbone(PositionalStack):
    """[B, T, d_input] -> [B, T, d_model]; causal in eval mode; T <= max_len."""

    layers_name, norm_name, arch = "h", "ln_f", "mod"
    kernel_path = "sdpa"

    def __init__(self, cfg: Config, d_input: int):
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"mod: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
        if not 0.0 < cfg.capacity <= 1.0:
            raise ValueError(f"mod: model.capacity must be in (0, 1], found {cfg.capacity}")
        if not 0 <= cfg.route_offset < cfg.route_every:
            raise ValueError(
                f"mod: model.route_offset must be in [0, route_every={cfg.route_every}), found {cfg.route_offset}"
            )
        self.routed_layers = [i for i in range(cfg.n_layers) if i % cfg.route_every == cfg.route_offset]
        blocks = (RoutedBlock(cfg) if i in self.routed_layers else _block(cfg) for i in range(cfg.n_layers))
        super().__init__(d_input, cfg.d_model, blocks, nn.LayerNorm(cfg.d_model, bias=cfg.bias),
                         positions=lambda: nn.Embedding(cfg.max_len, cfg.d_model), dropout=cfg.dropout)
        # GPT-2's init (the router included: N(0, 0.02), bias 0, so routing starts near
        # sigmoid(r) = 0.5 and the threshold routes about half the tokens)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if getattr(m, "residual_proj", False) else 0.02
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)


def build(config: Config, d_input: int) -> nn.Module:
    return MoDBackbone(config, d_input)
