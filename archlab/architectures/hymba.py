"""Hymba (Dong et al. 2024): attention heads and SSM heads in parallel on the same input.

Layer (NVlabs barebones_hymba, with archlab parts):
    n = RMSNorm(x)
    m = ( beta_a * RMSNorm(Attn(n)) + beta_s * RMSNorm(SSM(n)) ) / 2
    x = x + m;   x = x + GatedMLP(RMSNorm(x))
beta_a, beta_s are the two branch norms' per-channel weights (the paper's beta1, beta2); the
SSM branch is the registry's mamba2 mixer (Mamba2Mixer, SSD dispatch; Hymba itself uses a
Mamba-1 scan), the attention branch is grouped-query attention with RoPE (HymbaAttention).
Both branches project back to d_model before their norms (the reference fuses the branches
at width expand * d_model before one out_proj; with a linear out_proj the two are the same
family, and here each branch is the existing module as is).

Meta tokens (`n_meta` = M > 0): M learned vectors prepended before layer 0 and stripped at
the end; both branches see them (they prime the SSM state and serve as attention sinks).
RoPE positions count them. Sliding-window layers (every layer not in `global_layers`, when
`window` > 0): query t sees keys s with t - window < s <= t (the window includes t itself,
griffin's LocalMQA convention; barebones_hymba's `q - kv <= W` is window W + 1 here) and,
always, the meta tokens s < M.

routing_stats() reports `attn_share` = mean|beta_a| / (mean|beta_a| + mean|beta_s|) per
layer: the learned attention / SSM ratio (0.5 at init).

step() primes each layer's state with the meta tokens in init_state, then decodes one
position at a time; the attention keeps every key (a rolling window cache is not built).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    kv_heads: int = 4
    window: int = 64  # sliding window of the non-global layers (0 = every layer global)
    global_layers: list = field(default_factory=lambda: [0, 3, -1])  # first, middle, last
    n_meta: int = 16
    d_ffn: int = 0  # GatedMLP hidden width (0 = 4 d_model)
    rope_base: float = 10000.0
    # SSM branch (Mamba-2 mixer)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 64
    kernel: str = "auto"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=3, n_heads=4, kv_heads=2, window=4, global_layers=[0, -1], n_meta=2,
                    d_ffn=64, d_state=8, headdim=16, chunk_size=16),
    # seed 002's Hymba hybrid, 33.5M parameters
    "seed": Config(d_model=512, n_layers=6, n_heads=8, kv_heads=4, window=64, global_layers=[0, 3, -1],
                   n_meta=16, d_state=16, headdim=64, chunk_size=64),
}

PARAM_COUNTS = {"debug": 100340, "seed": 34052064}


def attention_mask(T: int, window: int, n_meta: int, device=None) -> torch.Tensor:
    """[T, T] bool, True = visible: causal; with window > 0 also t - s < window, or s < n_meta."""
    t = torch.arange(T, device=device)
    delta = t[:, None] - t[None, :]
    mask = delta >= 0
    if window > 0:
        mask = mask & ((delta < window) | (t[None, :] < n_meta))
    return mask


class HymbaAttention(nn.Module):
    """Grouped-query causal attention with RoPE, optionally windowed with always-visible meta
    tokens: x [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, n_heads: int, kv_heads: int, window: int, n_meta: int, rope_base: float):
        super().__init__()
        if d % n_heads or (d // n_heads) % 2 or n_heads % kv_heads:
            raise ValueError(f"hymba: model.d_model={d} must split into model.n_heads={n_heads} heads of even "
                             f"size, and model.kv_heads={kv_heads} must divide n_heads")
        self.n_heads, self.kv_heads, self.head_dim = n_heads, kv_heads, d // n_heads
        self.window, self.n_meta, self.base = window, n_meta, rope_base
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        from archlab.architectures.griffin import rotate

        q = self.q(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.kv(x).unflatten(-1, (2 * self.kv_heads, self.head_dim)).transpose(1, 2).chunk(2, dim=1)
        return rotate(q, pos, self.base), rotate(k, pos, self.base), v  # k, v (B, Hkv, T, hd)

    def _attend(self, q, k, v, mask):
        rep = self.n_heads // self.kv_heads  # each kv head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, hd)
        return self.out(o.transpose(1, 2).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        q, k, v = self._qkv(x, pos)
        return self._attend(q, k, v, attention_mask(T, self.window, self.n_meta, x.device))

    def init_state(self, batch: int, device=None):
        return {"k": None, "v": None, "pos": 0}

    def step(self, x_t: torch.Tensor, st):
        t = st["pos"]
        q, k, v = self._qkv(x_t.unsqueeze(1), torch.tensor([t], device=x_t.device))
        if st["k"] is not None:
            k, v = torch.cat([st["k"], k], dim=2), torch.cat([st["v"], v], dim=2)
        mask = attention_mask(t + 1, self.window, self.n_meta, x_t.device)[-1:]  # row t: (1, t+1)
        return self._attend(q, k, v, mask)[:, 0], {"k": k, "v": v, "pos": t + 1}


class HymbaMixer(nn.Module):
    """(beta_a * RMSNorm(attn(x)) + beta_s * RMSNorm(ssm(x))) / 2."""

    def __init__(self, attn: nn.Module, ssm: nn.Module, d: int):
        super().__init__()
        self.attn, self.ssm = attn, ssm
        self.norm_attn = nn.RMSNorm(d, eps=1e-5)  # weight = beta_a
        self.norm_ssm = nn.RMSNorm(d, eps=1e-5)  # weight = beta_s

    def fuse(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (self.norm_attn(a) + self.norm_ssm(s)) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.attn(x), self.ssm(x))

    def init_state(self, batch: int, device=None):
        from archlab.architectures.mixers import mixer_init_state

        return self.attn.init_state(batch, device), mixer_init_state(self.ssm, batch, device)

    def step(self, x_t: torch.Tensor, state):
        a, sa = self.attn.step(x_t, state[0])
        s, ss = self.ssm.step(x_t, state[1])
        return self.fuse(a, s), (sa, ss)

    def routing_stats(self) -> dict:
        with torch.no_grad():
            ba = self.norm_attn.weight.abs().mean().item()
            bs = self.norm_ssm.weight.abs().mean().item()
        return {"attn_share": ba / max(ba + bs, 1e-12)}


class HymbaBackbone(nn.Module):
    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        from archlab.architectures.common import input_projection
        from archlab.architectures.hawk import GatedMLP
        from archlab.architectures.mixers import HybridBlock, build_mixer

        d, L = cfg.d_model, cfg.n_layers
        if L < 1 or cfg.n_meta < 0 or cfg.window < 0:
            raise ValueError(f"hymba: need model.n_layers >= 1, n_meta >= 0, window >= 0; found "
                             f"{L}, {cfg.n_meta}, {cfg.window}")
        bad = [i for i in cfg.global_layers if not -L <= int(i) < L]
        if bad:
            raise ValueError(f"model.global_layers: indices {bad} outside 0..{L - 1} (negatives count from the end)")
        glob = {int(i) % L for i in cfg.global_layers}
        self.d_model, self.n_meta = d, cfg.n_meta
        self.windows = [0 if (i in glob or cfg.window == 0) else cfg.window for i in range(L)]
        self.in_proj = input_projection(d_input, d)
        self.meta = nn.Parameter(torch.randn(cfg.n_meta, d) * 0.02) if cfg.n_meta else None
        self.layers = nn.ModuleList(
            HybridBlock(d, HymbaMixer(HymbaAttention(d, cfg.n_heads, cfg.kv_heads, w, cfg.n_meta, cfg.rope_base),
                                      build_mixer("mamba2", d, vars(cfg), i), d),
                        GatedMLP(d, cfg.d_ffn or 4 * d))
            for i, w in enumerate(self.windows)
        )
        self.norm_f = nn.RMSNorm(d, eps=1e-5)

    @property
    def kernel_path(self) -> str:
        return f"ssd:{self.layers[0].mixer.ssm.last_path or 'not run yet'}+attn:sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        h = self.in_proj(x)
        if self.meta is not None:
            h = torch.cat([self.meta.to(h.dtype).expand(h.shape[0], -1, -1), h], dim=1)
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h[:, self.n_meta:])

    def init_state(self, batch: int, device=None):
        states = [layer.init_state(batch, device) for layer in self.layers]
        for m in range(self.n_meta):  # prime every layer with the meta tokens
            h = self.meta[m].expand(batch, -1)
            for i, layer in enumerate(self.layers):
                h, states[i] = layer.step(h, states[i])
        return states

    def step(self, x_t: torch.Tensor, state):
        h, new = self.in_proj(x_t), []
        for layer, s in zip(self.layers, state):
            h, s = layer.step(h, s)
            new.append(s)
        return self.norm_f(h), new


def build(config: Config, d_input: int) -> nn.Module:
    return HymbaBackbone(config, d_input)
