"""Zamba / Zamba2 (Glorioso et al. 2024): a Mamba-2 backbone with ONE shared attention + MLP
block applied every `shared_every` layers on concat[h, x0], x0 = the input embeddings.

Mamba layer i (mixer from the registry: mamba2's Mamba2Mixer, SSD dispatch):
    plain:  h = h + Mamba_i(RMSNorm_i(h))
    hybrid (i % shared_every == shared_offset, call site j in hybrid order):
        t = P_j( Shared(concat[h, x0]; adapter_j) )        P_j: unshared Linear(D, D), no bias
        h = h + Mamba_i(RMSNorm_i(h + t))
The shared block's output only feeds the next Mamba layer's input; the residual stream keeps
h, so zeroing Mamba_i's out_proj makes hybrid layer i the identity whatever Shared does.

Shared block (Zamba2's attention decoder layer, no internal residuals), width W = 2D:
    a = o( Attn( q(n), k(n), v(n) ) ),  n = RMSNorm_W(concat)     o: W -> D
    y = down( GELU(gate) * up ),  [gate, up] = gate_up(RMSNorm_D(a))
Attention is causal softmax (SDPA) over n_heads heads of W / n_heads, without positions (the
Mamba layers carry order; Zamba2's RoPE option is not built).

Per-site LoRA (`adapter_rank` r; 0 = none): site j owns unshared low-rank deltas added to q,
k, v (W -> r -> W) and to gate_up (D -> r -> 2 d_ffn); their up sides start at zero, so at
init every site computes the same Shared output for the same input. Adapters and P_j are
indexed by hybrid order (HF transformers #47994 indexed them by global layer index).

The shared block is registered once (`self.shared`): the optimiser sees its parameters once
and every site uses the same Parameter objects. step() keeps one key/value cache per site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 12
    shared_every: int = 6  # a hybrid call site every k Mamba layers
    shared_offset: int = -1  # ... at i % k == offset % k: -1 = each group's last (Zamba1 HF: 6, 4)
    n_heads: int = 8  # of the shared attention at width 2 d_model
    d_ffn: int = 0  # shared MLP hidden width (0 = 4 d_model)
    adapter_rank: int = 64  # per-site LoRA rank; 0 = no adapters
    # Mamba-2 layers
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    chunk_size: int = 64
    kernel: str = "auto"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=4, shared_every=2, shared_offset=1, n_heads=4, adapter_rank=4,
                    d_state=16, headdim=16, chunk_size=16),
    # the anchors' small config scaled to the seeds' width: 2 call sites, one shared block
    "seed": Config(d_model=512, n_layers=12, shared_every=6, shared_offset=-1, n_heads=8, adapter_rank=64,
                   d_state=64, headdim=64, chunk_size=64),
}

PARAM_COUNTS = {"debug": 115664, "seed": 29353280}


class LoRA(nn.Module):
    """x -> up(down(x)), up zero-initialised (a zero delta at init)."""

    def __init__(self, d_in: int, rank: int, d_out: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class Site(nn.Module):
    """One hybrid call site's own parameters: the projection P_j and the LoRA adapters."""

    def __init__(self, d: int, d_ffn: int, rank: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        if rank > 0:
            self.q, self.k, self.v = (LoRA(2 * d, rank, 2 * d) for _ in range(3))
            self.gate_up = LoRA(d, rank, 2 * d_ffn)
        self.rank = rank

    def delta(self, name: str, x: torch.Tensor):
        return getattr(self, name)(x) if self.rank > 0 else 0.0


class SharedBlock(nn.Module):
    """Attention at width 2D (-> D) then a GELU-gated MLP; no residuals inside."""

    def __init__(self, d: int, n_heads: int, d_ffn: int):
        super().__init__()
        W = 2 * d
        if W % n_heads:
            raise ValueError(f"zamba: 2 * model.d_model = {W} must be divisible by model.n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, W // n_heads
        self.norm_in = nn.RMSNorm(W, eps=1e-5)
        self.q = nn.Linear(W, W, bias=False)
        self.k = nn.Linear(W, W, bias=False)
        self.v = nn.Linear(W, W, bias=False)
        self.o = nn.Linear(W, d, bias=False)
        self.norm_mid = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * d_ffn, bias=False)
        self.down = nn.Linear(d_ffn, d, bias=False)

    def _qkv(self, n: torch.Tensor, site: Site):
        def heads(z):  # (B, T, W) -> (B, H, T, hd)
            return z.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

        return [heads(getattr(self, p)(n) + site.delta(p, n)) for p in ("q", "k", "v")]

    def _mlp(self, a: torch.Tensor, site: Site) -> torch.Tensor:
        m = self.norm_mid(a)
        gate, up = (self.gate_up(m) + site.delta("gate_up", m)).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * up)

    def forward(self, c: torch.Tensor, site: Site) -> torch.Tensor:  # c [B, T, 2D] -> [B, T, D]
        q, k, v = self._qkv(self.norm_in(c), site)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self._mlp(self.o(a.transpose(1, 2).flatten(-2)), site)

    def step(self, c_t: torch.Tensor, site: Site, cache):  # c_t [B, 2D]; cache (k, v) or None
        q, k, v = self._qkv(self.norm_in(c_t).unsqueeze(1), site)  # (B, H, 1, hd)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v)  # the newest query sees every cached key
        return self._mlp(self.o(a.transpose(1, 2).flatten(-2)), site)[:, 0], (k, v)


class ZambaBackbone(nn.Module):
    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        from archlab.architectures.common import input_projection
        from archlab.architectures.mixers import build_mixer
        from archlab.architectures.moe import periodic

        if cfg.adapter_rank < 0:
            raise ValueError(f"model.adapter_rank must be >= 0 (0 = no adapters), found {cfg.adapter_rank}")
        d, d_ffn = cfg.d_model, cfg.d_ffn or 4 * cfg.d_model
        self.d_model = d
        self.hybrid = periodic(cfg.n_layers, cfg.shared_every, cfg.shared_offset, "shared")
        # site index (hybrid order) of each layer, -1 for plain Mamba layers
        order, j = [], 0
        for h in self.hybrid:
            order.append(j if h else -1)
            j += h
        if j == 0:
            raise ValueError(f"zamba: no layer i < model.n_layers={cfg.n_layers} has i % shared_every "
                             f"({cfg.shared_every}) == shared_offset ({cfg.shared_offset}): "
                             f"the shared block is never used")
        self.site_of = order
        self.in_proj = input_projection(d_input, d)
        self.norms = nn.ModuleList(nn.RMSNorm(d, eps=1e-5) for _ in range(cfg.n_layers))
        self.mixers = nn.ModuleList(build_mixer("mamba2", d, vars(cfg), i) for i in range(cfg.n_layers))
        self.shared = SharedBlock(d, cfg.n_heads, d_ffn)
        self.sites = nn.ModuleList(Site(d, d_ffn, cfg.adapter_rank) for _ in range(j))
        self.norm_f = nn.RMSNorm(d, eps=1e-5)

    @property
    def kernel_path(self) -> str:
        return f"ssd:{self.mixers[0].last_path or 'not run yet'}+shared_attn:sdpa"

    def site_input(self, h: torch.Tensor, x0: torch.Tensor, j: int) -> torch.Tensor:
        """What hybrid site j adds to the next Mamba layer's input: P_j(Shared(concat[h, x0]))."""
        return self.sites[j].proj(self.shared(torch.cat([h, x0], dim=-1), self.sites[j]))

    def layer(self, i: int, h: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Mamba layer i on the residual stream h [B, T, D], x0 the input embeddings."""
        j = self.site_of[i]
        u = h if j < 0 else h + self.site_input(h, x0, j)
        return h + self.mixers[i](self.norms[i](u))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.in_proj(x)
        h = x0
        for i in range(len(self.mixers)):
            h = self.layer(i, h, x0)
        return self.norm_f(h)

    def init_state(self, batch: int, device=None):
        from archlab.architectures.mixers import mixer_init_state

        return {"mamba": [mixer_init_state(m, batch, device) for m in self.mixers],
                "kv": [None] * len(self.sites)}

    def step(self, x_t: torch.Tensor, state):  # [B, d_input] -> [B, d_model]
        x0 = self.in_proj(x_t)
        h, mamba, kv = x0, [], list(state["kv"])
        for i, (norm, mixer, s) in enumerate(zip(self.norms, self.mixers, state["mamba"])):
            j = self.site_of[i]
            u = h
            if j >= 0:
                t, kv[j] = self.shared.step(torch.cat([h, x0], dim=-1), self.sites[j], kv[j])
                u = h + self.sites[j].proj(t)
            y, s = mixer.step(norm(u), s)
            h = h + y
            mamba.append(s)
        return self.norm_f(h), {"mamba": mamba, "kv": kv}


def build(config: Config, d_input: int) -> nn.Module:
    return ZambaBackbone(config, d_input)
