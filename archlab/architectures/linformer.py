"""Causal Linformer: low-rank (k) projection of keys and values along the sequence.

Plain Linformer (Wang et al. 2020) compresses the keys and values of the *whole*
sequence, K~ = E K with E [k, n], so every query sees a mix of future positions: it is
not causal. archlab's causal variant keeps the low-rank idea but restricts what each
query may see:

- the sequence is cut into blocks of `block_size` positions;
- a query in block j attends to (a) k compressed key/value rows that summarise only
  the blocks before j, K~_j = E[:, :s_j] K[:s_j] / sqrt(s_j) with s_j = j * block_size
  (the Linformer projection applied to the prefix, future columns of E left out; the
  1/sqrt(s_j) keeps the rows' scale independent of the prefix length), and
  (b) exact causal softmax attention over its own block, positions <= itself;
- (a) and (b) share one softmax, so the query distributes its attention between the
  compressed past and the exact recent positions.

Causality: output t reads the compressed rows of blocks wholly before t's block and the
keys of its own block up to t; nothing at t+1 or later enters either. The compressed
rows are prefix sums over blocks, so the forward is O(T (k + block_size)) per head
instead of O(T^2), and `step()` keeps a running k-row summary plus the current block's
keys (memory O(k + block_size), independent of T) and equals the parallel forward.

E (keys) and F (values) are learned per layer, shared across heads (the paper's
"headwise sharing"), shape [k, max_len]. Blocks are pre-LN (attention, GELU MLP 4x)
with learned absolute positions, as GPT-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import HeadsAttention, PositionalStack, PreNormBlock, gelu_mlp, learned_positions


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    k: int = 128  # low-rank dimension: compressed rows summarising the past blocks
    block_size: int = 64  # exact causal attention inside blocks of this many positions
    max_len: int = 1024
    dropout: float = 0.1


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, k=8, block_size=8, max_len=1024, dropout=0.0),
    "seed": Config(d_model=512, n_layers=4, n_heads=8, k=128, block_size=64, max_len=1024, dropout=0.1),
}

# exact parameter count of build_model("linformer", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 140960, "seed": 14971136}

# longest sequence the model takes (the E/F projections' and the learned positions' length); the sweep driver refuses a longer
# data.context / data.seq_len before any worker starts (registry contract)
MAX_LENGTH_FIELD = "max_len"


class CausalLinformerAttention(HeadsAttention):
    def __init__(self, cfg: Config):
        super().__init__(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.k, self.L = cfg.k, cfg.block_size
        # unit-variance entries: with the 1/sqrt(s) prefix scaling a compressed row has
        # the scale of a single key at any prefix length
        self.E = nn.Parameter(torch.randn(cfg.k, cfg.max_len))
        self.F = nn.Parameter(torch.randn(cfg.k, cfg.max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        L, r = self.L, self.k
        q, k, v = self._heads(x)
        nb = -(-T // L)
        pad = nb * L - T
        if pad:  # zero positions after the end: only later (masked) positions see them
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        qb, kb, vb = (t.reshape(B, self.n_heads, nb, L, self.d_head) for t in (q, k, v))  # (B, H, nb, L, dh)
        Eb = F.pad(self.E[:, :T], (0, pad)).reshape(r, nb, L).transpose(0, 1)  # (nb, r, L)
        Fb = F.pad(self.F[:, :T], (0, pad)).reshape(r, nb, L).transpose(0, 1)
        # per-block compressed rows, then an exclusive prefix sum over blocks, in at least
        # fp32 so long prefixes do not lose precision under bf16 autocast
        acc = torch.promote_types(q.dtype, torch.float32)
        pk = torch.einsum("nrl,bhnld->bhnrd", Eb.to(acc), kb.to(acc))  # (B, H, nb, r, dh)
        pv = torch.einsum("nrl,bhnld->bhnrd", Fb.to(acc), vb.to(acc))
        # exclusive by shifting, not cumsum - pk: the subtraction would round with block n's
        # own (partly future) keys and leak them into earlier positions at the last bit
        ck = F.pad(torch.cumsum(pk, dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # blocks strictly before n
        cv = F.pad(torch.cumsum(pv, dim=2)[:, :, :-1], (0, 0, 0, 0, 1, 0))
        s = torch.arange(nb, device=x.device, dtype=acc) * L  # prefix length per block
        scale = s.clamp(min=1).rsqrt().view(1, 1, nb, 1, 1)
        ck, cv = (ck * scale).to(q.dtype), (cv * scale).to(q.dtype)

        att_c = qb @ ck.transpose(-1, -2)  # (B, H, nb, L, r)
        att_l = qb @ kb.transpose(-1, -2)  # (B, H, nb, L, L)
        att = torch.cat([att_c, att_l], dim=-1) / math.sqrt(self.d_head)  # (B, H, nb, L, r + L)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([torch.ones(nb, L, r, dtype=torch.bool, device=x.device),
                          causal.expand(nb, L, L)], dim=-1)  # (nb, L, r + L)
        mask[0, :, :r] = False  # block 0 has no past to summarise
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = att[..., :r] @ cv + att[..., r:] @ vb  # (B, H, nb, L, dh)
        y = y.reshape(B, self.n_heads, nb * L, self.d_head)[:, :, :T]
        return self._merge(y)

    def init_state(self, batch: int, device=None):
        # running sums in at least fp32, like the forward's prefix sums
        acc = torch.promote_types(self.E.dtype, torch.float32)
        z = torch.zeros(batch, self.n_heads, self.k, self.d_head, device=device or self.E.device, dtype=acc)
        # the next position, running (unscaled) compressed sums of completed blocks and the
        # current block's k, v
        return {"t": 0, "ck": z, "cv": z.clone(), "lk": None, "lv": None}

    def step(self, x_t: torch.Tensor, st):
        q, k, v = self._heads(x_t.unsqueeze(1))  # (B, H, 1, dh)
        t = st["t"]
        n, i = divmod(t, self.L)
        lk = k if st["lk"] is None else torch.cat([st["lk"], k], dim=2)  # (B, H, i+1, dh)
        lv = v if st["lv"] is None else torch.cat([st["lv"], v], dim=2)
        att_l = q @ lk.transpose(-1, -2)  # (B, H, 1, i+1)
        if n > 0:
            scale = 1.0 / math.sqrt(n * self.L)
            ck, cv = (st["ck"] * scale).to(q.dtype), (st["cv"] * scale).to(q.dtype)
            att = torch.cat([q @ ck.transpose(-1, -2), att_l], dim=-1) / math.sqrt(self.d_head)
            att = att.softmax(dim=-1)
            y = att[..., : self.k] @ cv + att[..., self.k:] @ lv
        else:
            y = (att_l / math.sqrt(self.d_head)).softmax(dim=-1) @ lv
        st = dict(st, t=t + 1, lk=lk, lv=lv)
        if i == self.L - 1:  # block complete: fold it into the compressed past
            cols = slice(n * self.L, (n + 1) * self.L)
            acc = st["ck"].dtype
            st["ck"] = st["ck"] + torch.einsum("rl,bhld->bhrd", self.E[:, cols].to(acc), lk.to(acc))
            st["cv"] = st["cv"] + torch.einsum("rl,bhld->bhrd", self.F[:, cols].to(acc), lv.to(acc))
            st["lk"] = st["lv"] = None
        return self._merge(y).squeeze(1), st


class LinformerBackbone(PositionalStack):
    """[B, T, d_input] -> [B, T, d_model]; causal; T <= max_len. Pre-LN blocks (attention,
    GELU MLP 4x) with learned positions, as GPT-2."""

    layers_name, norm_name, arch = "blocks", "ln_f", "linformer"

    def __init__(self, cfg: Config, d_input: int):
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"linformer: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
            )
        for field in ("k", "block_size", "max_len"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"linformer: model.{field} must be >= 1, found {getattr(cfg, field)}")
        blocks = (
            PreNormBlock(nn.LayerNorm(cfg.d_model), CausalLinformerAttention(cfg), nn.LayerNorm(cfg.d_model),
                         gelu_mlp(cfg.d_model, 4 * cfg.d_model, cfg.dropout),
                         names=("ln_1", "attn", "ln_2", "mlp"))
            for _ in range(cfg.n_layers)
        )
        super().__init__(d_input, cfg.d_model, blocks, nn.LayerNorm(cfg.d_model),
                         positions=lambda: learned_positions(cfg.max_len, cfg.d_model), dropout=cfg.dropout)

    kernel_path = "torch"  # one path: the blockwise PyTorch form above


def build(config: Config, d_input: int) -> nn.Module:
    return LinformerBackbone(config, d_input)
