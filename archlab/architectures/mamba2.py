"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): residual stack of Mamba-2 mixers.

Mixer, per token: in_proj -> [z, xBC, dt]; xBC -> causal depthwise conv1d -> SiLU ->
[x, B, C]; the SSD recurrence per head h (state S [P, N], scalar decay per head)
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T,   y_t = S_t C_t + D_h x_t,
with dt_t = softplus(dt_raw + dt_bias); then gated RMSNorm, y = RMSNorm(y * SiLU(z)) per
group, and out_proj. Block: x + mixer(RMSNorm(x)) (no MLP, as the reference Mamba-2 LM).

Paths (`kernel`):
- "auto": `mamba_ssm.Mamba2` when mamba-ssm is importable AND CUDA is available at build
  time; otherwise archlab's own mixer with `archlab.kernels.ssd.ssd(kernel="auto")`
  (the pure-PyTorch chunked SSD here; checked against the paper's listing in kernels/ssd).
- "mamba_ssm": force mamba_ssm.Mamba2 (error naming the missing package or device).
- "torch" | "reference": archlab's mixer with that SSD path.
Both mixers have the same parameter names and shapes (in_proj, conv1d, dt_bias, A_log, D,
norm.weight, out_proj), so a state dict moves between them. `backbone.kernel_path` says
which path the last forward ran.

Numerics: A_log and dt_bias are fp32 parameters and the SSM runs with autocast disabled
(fp32) whatever the surrounding precision. dt_bias is the inverse softplus of dt sampled
log-uniformly in [dt_min, dt_max]; it carries `_no_reinit = True` (mamba-ssm's marker) and
`_no_weight_decay = True`, so a generic initialiser that honours the marker leaves it alone.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 12
    d_state: int = 64  # N
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    headdim: int = 64  # P; n_heads = d_inner / headdim
    ngroups: int = 1  # B, C shared by n_heads / ngroups heads
    chunk_size: int = 64
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    kernel: str = "auto"  # "auto" | "mamba_ssm" | "torch" | "reference"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, d_state=16, headdim=16, chunk_size=16),
    "seed": Config(d_model=512, n_layers=12, d_state=64, headdim=64, chunk_size=64),
}

# exact count of build_model("mamba2", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 65752, "seed": 20635456}


def _use_mamba_ssm(kernel: str) -> bool:
    """Whether to build mamba_ssm.Mamba2; raises naming what is missing when forced."""
    if kernel == "mamba_ssm":
        if importlib.util.find_spec("mamba_ssm") is None:
            raise RuntimeError("model.kernel='mamba_ssm' needs the package 'mamba-ssm' "
                               "(pip install archlab[cuda]); it is not installed")
        if not torch.cuda.is_available():
            raise RuntimeError("model.kernel='mamba_ssm' needs a CUDA device; none is available")
        return True
    if kernel == "auto":
        return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None
    if kernel in ("torch", "reference"):
        return False
    raise ValueError(f"model.kernel: expected auto, mamba_ssm, torch or reference; found {kernel!r}")


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) per group of d / groups channels, one weight over all d
    (mamba-ssm's RMSNormGated with norm_before_gate=False; same parameter shape)."""

    def __init__(self, d: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y * F.silu(z)).unflatten(-1, (self.groups, -1))  # (..., G, d/G)
        g = g * torch.rsqrt(g.float().pow(2).mean(-1, keepdim=True) + self.eps).to(g.dtype)
        return g.flatten(-2) * self.weight


class Mamba2Mixer(nn.Module):
    """archlab's Mamba-2 mixer: [B, T, d_model] -> [B, T, d_model], plus step()."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        if self.d_inner % cfg.headdim:
            raise ValueError(f"model.headdim={cfg.headdim} must divide expand*d_model={self.d_inner}")
        self.nheads = self.d_inner // cfg.headdim
        if self.nheads % cfg.ngroups:
            raise ValueError(f"model.ngroups={cfg.ngroups} must divide n_heads={self.nheads}")
        self.headdim, self.ngroups, self.d_state = cfg.headdim, cfg.ngroups, cfg.d_state
        self.chunk_size, self.d_conv, self.kernel = cfg.chunk_size, cfg.d_conv, cfg.kernel
        self.conv_dim = self.d_inner + 2 * cfg.ngroups * cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1)
        # dt = softplus(dt_bias) at init lies log-uniformly in [dt_min, dt_max]
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))  # A in [-16, -1]
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.dt_bias._no_reinit = True
        self.norm = GatedRMSNorm(self.d_inner, cfg.ngroups)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.last_path = None

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _ssm_inputs(self, xBC: torch.Tensor, dt_raw: torch.Tensor):
        """(x [.., H, P], dt [.., H], A [H], B, C [.., H, N]) from conv output and raw dt, in
        A_log's precision: fp32 (fp64 in fp64 tests), never the autocast dtype."""
        wd = self.A_log.dtype
        x, B, C = torch.split(xBC.to(wd), [self.d_inner, self.ngroups * self.d_state,
                                            self.ngroups * self.d_state], dim=-1)
        rep = self.nheads // self.ngroups  # heads per group share B and C
        B = B.unflatten(-1, (self.ngroups, self.d_state)).repeat_interleave(rep, dim=-2)
        C = C.unflatten(-1, (self.ngroups, self.d_state)).repeat_interleave(rep, dim=-2)
        dt = F.softplus(dt_raw.to(wd) + self.dt_bias)
        A = -torch.exp(self.A_log)
        return x.unflatten(-1, (self.nheads, self.headdim)), dt, A, B, C

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [B, T, d_model]
        from archlab.kernels._dispatch import resolve_kernel
        from archlab.kernels.ssd import ssd

        T = u.shape[1]
        z, xBC, dt_raw = self._split(self.in_proj(u))
        # causal: conv1d pads d_conv-1 on both sides; keep the first T outputs
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))
        with torch.autocast(u.device.type, enabled=False):
            x, dt, A, B, C = self._ssm_inputs(xBC, dt_raw)
            path = "auto" if self.kernel == "auto" else self.kernel
            y, _ = ssd(x, dt, A, B, C, chunk_size=self.chunk_size, kernel=path)  # (B, T, H, P)
            y = y + self.D[:, None] * x
        self.last_path = resolve_kernel("ssd", path, u.device)
        y = self.norm(y.flatten(-2).to(z.dtype), z)
        return self.out_proj(y)

    def step(self, u_t: torch.Tensor, state):  # u_t [B, d_model]
        conv, S = state
        z, xBC, dt_raw = self._split(self.in_proj(u_t))
        conv = torch.cat([conv[:, :, 1:], xBC.unsqueeze(-1).to(conv.dtype)], dim=-1)  # last d_conv inputs
        w = self.conv1d.weight.squeeze(1)  # (conv_dim, d_conv)
        xBC = F.silu((conv * w).sum(-1) + self.conv1d.bias)
        with torch.autocast(u_t.device.type, enabled=False):
            x, dt, A, B, C = self._ssm_inputs(xBC, dt_raw)  # x (B, H, P), B/C (B, H, N)
            decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
            S = decay * S + (dt[..., None] * x).unsqueeze(-1) * B.unsqueeze(-2)
            y = (S * C.unsqueeze(-2)).sum(-1) + self.D[:, None] * x  # (B, H, P)
        y = self.norm(y.flatten(-2).to(z.dtype), z)
        return self.out_proj(y), (conv, S)


def _mamba_ssm_mixer(cfg: Config, layer_idx: int) -> nn.Module:
    from mamba_ssm import Mamba2  # CUDA-only dependency: imported here, never at module import

    return Mamba2(d_model=cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                  headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size,
                  dt_min=cfg.dt_min, dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                  layer_idx=layer_idx)


class Mamba2Backbone(nn.Module):
    def __init__(self, cfg: Config, d_input: int):
        super().__init__()
        self.d_model = cfg.d_model
        self.fast = _use_mamba_ssm(cfg.kernel)
        self.in_proj = nn.Identity() if d_input == cfg.d_model else nn.Linear(d_input, cfg.d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=1e-5) for _ in range(cfg.n_layers))
        self.mixers = nn.ModuleList(
            _mamba_ssm_mixer(cfg, i) if self.fast else Mamba2Mixer(cfg) for i in range(cfg.n_layers)
        )
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-5)

    @property
    def kernel_path(self) -> str:
        if self.fast:
            return "mamba_ssm.Mamba2"
        return f"ssd:{self.mixers[0].last_path or 'not run yet'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        h = self.in_proj(x)
        h = h.to(torch.promote_types(h.dtype, torch.float32))  # residual stream in fp32 (mamba's residual_in_fp32)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.norm_f(h)

    def init_state(self, batch: int, device=None):
        # mamba_ssm.Mamba2's cache has the same shapes: conv [B, conv_dim, d_conv],
        # ssm [B, n_heads, headdim, d_state]
        states = []
        for m in self.mixers:
            w = m.conv1d.weight  # conv cache in the conv's dtype, SSM state in A_log's (fp32)
            states.append((torch.zeros(batch, w.shape[0], w.shape[-1], device=device, dtype=w.dtype),
                           torch.zeros(batch, m.nheads, m.headdim, m.d_state, device=device,
                                       dtype=m.A_log.dtype)))
        return states

    def step(self, x_t: torch.Tensor, state):  # [B, d_input] -> [B, d_model]
        h = self.in_proj(x_t)
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        new = []
        for norm, mixer, s in zip(self.norms, self.mixers, state):
            if self.fast:  # mamba_ssm's step updates its cache in place: give it copies
                y, conv, ssm = mixer.step(norm(h).unsqueeze(1), s[0].clone(), s[1].clone())
                y, s = y.squeeze(1), (conv, ssm)
            else:
                y, s = mixer.step(norm(h), s)
            h = h + y
            new.append(s)
        return self.norm_f(h), new


def build(config: Config, d_input: int) -> nn.Module:
    return Mamba2Backbone(config, d_input)
