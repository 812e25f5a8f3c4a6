"""Griffin (De et al. 2024): Hawk's RG-LRU residual blocks interleaved with local
(sliding-window) causal multi-query attention.

The layer pattern is data: `pattern` is a list of mixer names repeated over `n_layers`,
layer i uses pattern[i % len(pattern)] (the paper: two recurrent blocks per local-attention
block, ["rglru", "rglru", "local_attn"]). Every layer is the same residual block
(x + mixer(RMSNorm(x)), then x + GatedMLP(RMSNorm(x))) composed from hawk.py's parts.

Local attention: n_heads query heads share one key/value head (MQA), rotary positions on
queries and keys, and position t attends to positions t - window + 1 .. t. Causality and
locality both come from the band mask. `step` keeps a rolling cache of the last `window`
keys and values, so stepping costs O(window) per token whatever the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import SteppedStack
from archlab.architectures.hawk import RecurrentBlock, _rnn_width, residual_block

MIXERS = ("rglru", "local_attn")


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    pattern: list = field(default_factory=lambda: ["rglru", "rglru", "local_attn"])
    n_heads: int = 8  # query heads of the local attention (one shared key/value head)
    window: int = 128  # local attention span, including the current position
    rnn_expand: float = 1.0
    rnn_heads: int = 8
    conv_width: int = 4
    mlp_expand: int = 3
    c: float = 8.0
    rope_base: float = 10000.0
    kernel: str = "auto"  # linear_scan path of the RG-LRU layers


FLAVORS = {
    "debug": Config(d_model=32, n_layers=3, n_heads=4, window=8, rnn_heads=2, mlp_expand=2),
    "seed": Config(d_model=512, n_layers=6, n_heads=8, window=128, rnn_expand=1.5,
                   rnn_heads=8, mlp_expand=3),
}

# exact build_model("griffin", "vector", FLAVORS[f], d_in=768) parameter counts
PARAM_COUNTS = {"debug": 80544, "seed": 21492480}


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding. x [..., T, k] (k even), pos [T] integer positions."""
    k = x.shape[-1]
    dt = torch.promote_types(x.dtype, torch.float32)  # angles in at least fp32 (large t)
    inv_freq = base ** (-torch.arange(0, k, 2, device=x.device, dtype=dt) / k)
    ang = pos.to(dt)[:, None] * inv_freq  # (T, k/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class LocalMQA(nn.Module):
    """Sliding-window causal multi-query attention: x [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, n_heads: int, window: int, rope_base: float):
        super().__init__()
        if d % n_heads or (d // n_heads) % 2:
            raise ValueError(f"model.d_model={d} must split into model.n_heads={n_heads} "
                             f"heads of even size (rotary positions rotate pairs)")
        if window < 1:
            raise ValueError(f"model.window must be >= 1, found {window}")
        self.n_heads, self.head_dim, self.window, self.base = n_heads, d // n_heads, window, rope_base
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * self.head_dim, bias=False)  # one shared key/value head
        self.out = nn.Linear(d, d, bias=False)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        q = self.q(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)  # (B, H, T, k)
        k, v = self.kv(x).unsqueeze(-3).chunk(2, dim=-1)  # (B, 1, T, k) each
        return rotate(q, pos, self.base), rotate(k, pos, self.base), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        q, k, v = self._qkv(x, pos)
        if T > 2 * self.window:
            o = self._blocked(q, k, v)
        else:
            # band mask: key s is visible from query t iff t - window < s <= t
            delta = pos[:, None] - pos[None, :]
            mask = (delta >= 0) & (delta < self.window)  # (T, T)
            # the single key/value head is broadcast to every query head (a view, no copy)
            shape = (B, self.n_heads, T, self.head_dim)
            o = F.scaled_dot_product_attention(q, k.expand(shape), v.expand(shape), attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(-2))  # (B, T, H*k)

    def _blocked(self, q, k, v):
        """Band attention in O(T * window) memory: queries in blocks of `window` positions,
        each block sees its own keys and the previous block's (all a window can reach)."""
        B, H, T, K = q.shape
        W = self.window
        n = -(-T // W)  # blocks; the tail is padded, padded queries are dropped at the end
        pad = n * W - T
        q = F.pad(q, (0, 0, 0, pad)).unflatten(2, (n, W))  # (B, H, n, W, K)
        # keys of block j: [block j-1, block j], a zero block before the first
        k = F.pad(k, (0, 0, W, pad)).unflatten(2, (n + 1, W))  # (B, 1, n+1, W, K)
        v = F.pad(v, (0, 0, W, pad)).unflatten(2, (n + 1, W))
        k2 = torch.cat([k[:, :, :-1], k[:, :, 1:]], dim=3)  # (B, 1, n, 2W, K)
        v2 = torch.cat([v[:, :, :-1], v[:, :, 1:]], dim=3)
        # query i of block j sits at j*W + i, key s of its window at (j-1)*W + s
        i = torch.arange(W, device=q.device)[:, None]
        s = torch.arange(2 * W, device=q.device)[None, :]
        delta = i + W - s  # query position - key position, the same for every block
        mask = (delta >= 0) & (delta < W)  # (W, 2W)
        # the zero block before the first is not a position: mask it for block 0
        first = torch.ones(n, 1, 2 * W, dtype=torch.bool, device=q.device)
        first[0, 0, :W] = False
        mask = mask[None] & first  # (n, W, 2W)
        shape = (B, H, n, 2 * W, K)
        o = F.scaled_dot_product_attention(q, k2.expand(shape), v2.expand(shape), attn_mask=mask)
        return o.flatten(2, 3)[:, :, :T]  # (B, H, T, K)

    def init_state(self, batch: int, device=None):
        # rolling caches of rotated keys and values (B, 1, <=window, k), and the next position
        empty = torch.zeros(batch, 1, 0, self.head_dim, device=device)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def step(self, x_t: torch.Tensor, state):
        pos = torch.tensor([state["pos"]], device=x_t.device)
        q, k, v = self._qkv(x_t.unsqueeze(1), pos)  # q (B, H, 1, k), k/v (B, 1, 1, k)
        keys = torch.cat([state["k"].to(k.dtype), k], dim=2)[:, :, -self.window:]
        vals = torch.cat([state["v"].to(v.dtype), v], dim=2)[:, :, -self.window:]
        B, n = x_t.shape[0], keys.shape[2]
        o = F.scaled_dot_product_attention(q, keys.expand(B, self.n_heads, n, self.head_dim),
                                           vals.expand(B, self.n_heads, n, self.head_dim))
        y = self.out(o.squeeze(2).flatten(-2))  # (B, H*k)
        return y, {"k": keys, "v": vals, "pos": state["pos"] + 1}


class GriffinBackbone(SteppedStack):
    layers_name = "blocks"

    def __init__(self, config: Config, d_input: int):
        if not config.pattern or any(m not in MIXERS for m in config.pattern):
            raise ValueError(f"model.pattern must be a non-empty list of {MIXERS}, found {config.pattern}")
        if config.d_model < 1 or config.n_layers < 1:
            raise ValueError(f"model.d_model and model.n_layers must be >= 1, found "
                             f"{config.d_model} and {config.n_layers}")
        d = config.d_model
        d_rnn = _rnn_width(d, config.rnn_expand, config.rnn_heads)
        kinds = [config.pattern[i % len(config.pattern)] for i in range(config.n_layers)]

        def mixer(kind: str) -> nn.Module:
            if kind == "rglru":
                return RecurrentBlock(d, d_rnn, config.rnn_heads, config.conv_width, config.c, config.kernel)
            return LocalMQA(d, config.n_heads, config.window, config.rope_base)

        super().__init__(d_input, d, (residual_block(d, mixer(kind), config.mlp_expand) for kind in kinds),
                         nn.RMSNorm(d))
        self.layer_kinds = kinds

    @property
    def kernel_path(self) -> str:
        """RG-LRU layers' linear_scan path in the last forward, and the attention form."""
        lrus = [b.mixer.lru for b in self.blocks if isinstance(b.mixer, RecurrentBlock)]
        scan = (lrus[0].last_path or "not run yet") if lrus else "none"
        return f"scan:{scan}+local_attn:sdpa"


def build(config: Config, d_input: int) -> nn.Module:
    return GriffinBackbone(config, d_input)
