"""Performer with causal FAVOR+ attention (Choromanski et al. 2021).

Softmax attention exp(q.k / sqrt(d)) is replaced by an unbiased positive random-feature
estimate phi(q).phi(k), with (x scaled by d^-1/4 so that exp(q'.k') = exp(q.k / sqrt(d)))

    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),     W [m, d]: positive orthogonal random features

(rows of W drawn in orthogonal blocks by QR of a Gaussian matrix, each row rescaled to the
norm of an independent Gaussian vector so its marginal is still N(0, I)). Causality comes
from prefix sums:

    o_t = phi(q_t) S_t / phi(q_t) z_t,    S_t = S_{t-1} + phi(k_t)^T v_t,   z_t = z_{t-1} + phi(k_t)

which is exactly retention with decay gamma = 1 on (phi(q), phi(k), [v, 1]): the last value
column carries the normaliser z. So the forward calls `archlab.kernels.retention.retention`
(chunkwise: parallel inside chunks, prefix sums across them; config `kernel`, `chunk_size`),
and `step()` calls `retention_step`, keeping a state of [m, d_head + 1] per head: O(1) in T.

Features are computed in fp32 with autocast off (exp of a bf16 projection loses the
estimate). Each query's features are divided by their own maximum, which cancels exactly in
the ratio; keys get no data-dependent stabiliser because any shared one would have to look
at future keys. Their exponent is bounded by |w|^2 / 2 (about d/2), safe in fp32 for
d_head <= 128.

The random features are buffers drawn from a fixed seed (`feature_seed` + layer index), so
the forward and `step()` use the same W, and a checkpoint reloads them. `redraw_features(seed)`
draws fresh ones (the paper redraws periodically during training; archlab leaves when to the
training loop and keeps the draw reproducible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from archlab.architectures.common import HeadsAttention, PositionalStack, PreNormBlock, gelu_mlp, learned_positions
from archlab.kernels._dispatch import resolve_kernel
from archlab.kernels.retention import retention, retention_step


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    nb_features: int = 256  # m random features per head
    feature_seed: int = 0
    max_len: int = 1024  # learned absolute positions
    dropout: float = 0.1
    chunk_size: int = 64  # retention chunkwise block
    kernel: str = "auto"  # retention path


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, nb_features=16, max_len=1024, dropout=0.0,
                    chunk_size=16),
    "seed": Config(d_model=512, n_layers=4, n_heads=8, nb_features=256, max_len=1024, dropout=0.1),
}

# exact parameter count of build_model("performer", "vector", FLAVORS[f], d_in=768)
PARAM_COUNTS = {"debug": 108192, "seed": 13922560}

# longest sequence the model takes (the learned position table's length); the sweep driver refuses a longer
# data.context / data.seq_len before any worker starts (registry contract)
MAX_LENGTH_FIELD = "max_len"


def orthogonal_gaussian_features(m: int, d: int, seed: int) -> torch.Tensor:
    """W [m, d]: rows orthogonal within each block of d, row norms distributed as |N(0, I_d)|."""
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-m // d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        # LAPACK's Q is not Haar-distributed (its signs follow R's diagonal); fixing the signs
        # makes it so. Without this the kernel estimate stalls at a biased ~6% error.
        q = q * torch.sign(torch.diagonal(r))
        blocks.append(q.T)  # rows orthonormal
    w = torch.cat(blocks, dim=0)[:m]
    norms = torch.randn(m, d, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).float()


def favor_features(x: torch.Tensor, proj: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features. x [B, H, T, d] -> [B, H, T, m], fp32."""
    d, m = x.shape[-1], proj.shape[0]
    x = x.float() * d ** -0.25
    wx = x @ proj.float().T  # (B, H, T, m)
    expo = wx - 0.5 * (x * x).sum(-1, keepdim=True)
    if is_query:  # a per-query constant cancels between numerator and denominator
        expo = expo - expo.amax(dim=-1, keepdim=True).detach()
    return torch.exp(expo) / math.sqrt(m)


def favor_causal(q, k, v, proj, *, chunk_size: int = 64, kernel: str = "auto"):
    """Causal FAVOR+ attention. q, k [B, H, T, d], v [B, H, T, dv], proj [m, d] -> [B, H, T, dv]."""
    fq, fk = favor_features(q, proj, True), favor_features(k, proj, False)
    ones = v.new_ones(v.shape[:-1] + (1,))
    v1 = torch.cat([v.float(), ones.float()], dim=-1)  # (B, H, T, dv + 1): last column -> z
    gamma = torch.ones(q.shape[1], device=q.device)
    o, _ = retention(fq, fk, v1, gamma, mode="chunkwise", chunk_size=chunk_size, kernel=kernel)
    return _normalise(o).to(v.dtype)


def _normalise(o: torch.Tensor) -> torch.Tensor:
    # o [..., dv + 1] = [phi(q) S, phi(q) z]; the clamp only matters if every feature underflowed
    return o[..., :-1] / o[..., -1:].clamp_min(1e-30)


class FavorAttention(HeadsAttention):
    def __init__(self, cfg: Config, layer: int):
        super().__init__(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.chunk_size, self.kernel = cfg.chunk_size, cfg.kernel
        self.register_buffer("proj", torch.empty(cfg.nb_features, self.d_head))
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64))
        self.redraw_features(cfg.feature_seed + layer)
        self.last_path = None

    @torch.no_grad()
    def redraw_features(self, seed: int) -> None:
        w = orthogonal_gaussian_features(self.proj.shape[0], self.d_head, seed)
        self.proj.copy_(w.to(self.proj.device))
        self.seed.fill_(int(seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        self.last_path = resolve_kernel("retention", self.kernel, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = favor_causal(q, k, v, self.proj, chunk_size=self.chunk_size, kernel=self.last_path)
        return self._merge(y.to(x.dtype))

    def init_state(self, batch: int, device=None):
        return None  # retention_step starts from a zero state

    def step(self, x_t: torch.Tensor, state):
        """x_t [B, C]; state [B, H, m, dh + 1] or None -> (y_t [B, C], state)."""
        q, k, v = self._heads(x_t.unsqueeze(1))  # (B, H, 1, dh)
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            fq = favor_features(q, self.proj, True)[:, :, 0]  # (B, H, m)
            fk = favor_features(k, self.proj, False)[:, :, 0]
            v1 = torch.cat([v[:, :, 0].float(), v.new_ones(v.shape[:2] + (1,)).float()], dim=-1)
            gamma = torch.ones(self.n_heads, device=x_t.device)
            o, state = retention_step(fq, fk, v1, gamma, state)  # o (B, H, dh + 1)
            y = _normalise(o)
        return self._merge(y.unsqueeze(2).to(x_t.dtype)).squeeze(1), state


class PerformerBackbone(PositionalStack):
    """[B, T, d_input] -> [B, T, d_model]; causal; T <= max_len. Pre-LN blocks (FAVOR+
    attention, GELU MLP 4x) with learned positions, as GPT-2."""

    layers_name, norm_name, arch = "blocks", "ln_f", "performer"

    def __init__(self, cfg: Config, d_input: int):
        if cfg.d_model % cfg.n_heads:
            raise ValueError(
                f"performer: model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}"
            )
        if cfg.nb_features < 1:
            raise ValueError(f"performer: model.nb_features must be >= 1, found {cfg.nb_features}")
        blocks = (
            PreNormBlock(nn.LayerNorm(cfg.d_model), FavorAttention(cfg, i), nn.LayerNorm(cfg.d_model),
                         gelu_mlp(cfg.d_model, 4 * cfg.d_model, cfg.dropout),
                         names=("ln_1", "attn", "ln_2", "mlp"))
            for i in range(cfg.n_layers)
        )
        super().__init__(d_input, cfg.d_model, blocks, nn.LayerNorm(cfg.d_model),
                         positions=lambda: learned_positions(cfg.max_len, cfg.d_model), dropout=cfg.dropout)

    @property
    def kernel_path(self) -> str:
        """Which retention path the last forward ran (step() always uses retention_step)."""
        return f"retention:{self.blocks[0].attn.last_path or 'not run yet'}"

    def redraw_features(self, seed: int) -> None:
        """Fresh random features for every layer (layer i draws from seed + i)."""
        for i, block in enumerate(self.blocks):
            block.attn.redraw_features(seed + i)


def build(config: Config, d_input: int) -> nn.Module:
    return PerformerBackbone(config, d_input)
