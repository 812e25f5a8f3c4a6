"""One registry of sequence mixers and FFNs, so a hybrid's layer pattern is data.

A mixer maps [B, T, d_model] -> [B, T, d_model] causally; an FFN maps per position. Every
entry builds the class an existing architecture already uses (imported lazily, never
copied or renamed), so a hybrid's attention layer *is* gpt2's CausalSelfAttention, its
Mamba layer *is* mamba2's Mamba2Mixer (and so runs the SSD dispatch: mamba_ssm's kernels on
CUDA when installed, archlab's chunked SSD otherwise), and so on. Two entries need a thin
adapter because the existing class is not a plain x -> y mixer: `rwkv` (TimeMix returns its
carried state too) and `s4d` (S4DKernel works on [B, H, T]; the adapter adds SSMBlock's
GELU -> Linear -> GLU output, without SSMBlock's norm and residual). `mixer_class(kind)`
names the existing class inside each entry (tests check it is the architecture's own).

    build_mixer(kind, d_model, opts, layer_idx=0) -> nn.Module
    build_ffn(kind, d_model, opts) -> nn.Module | None       ("none" -> None)
    layer_kinds(pattern, n_layers) -> list[str]               (pattern repeated over n_layers)
    HybridBlock(d_model, mixer, ffn): x + mixer(RMSNorm(x)), then + ffn(RMSNorm(.))
    HybridStack(d_input, d_model, mixers, ffns, ...): in_proj -> blocks -> RMSNorm

`opts` is a flat dict of options (a hybrid's Config fields); each mixer takes the ones
that are fields of its own architecture's Config (n_heads, d_state, window, ...) over that
Config's defaults, so the same names mean the same thing as in the architecture.

Stepping: `mixer_init_state(mixer, batch, device)` and `mixer.step(x_t, state)`; mixers
without a recurrent form (hyena) have `MIXERS[kind].step = False` and a stack containing
one refuses to step.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MixerSpec:
    name: str
    arch: str  # the architecture module whose Config and class the mixer comes from
    cls: str  # the existing class inside the mixer (its own module path)
    step: bool  # has init_state/step
    summary: str
    make: Callable[[Any, Any, int], nn.Module]  # (arch module, arch Config, layer_idx) -> mixer


def _cls(path: str):
    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


class RWKVTimeMix(nn.Module):
    """rwkv.TimeMix as a plain mixer: forward(x) -> y; the state is (last x, WKV state)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        from archlab.architectures.rwkv import TimeMix

        self.att = TimeMix(cfg, layer_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.att(x)[0]

    def init_state(self, batch: int, device=None):
        return None  # TimeMix starts from zeros when given None

    def step(self, x_t: torch.Tensor, state):
        last, S = state if state is not None else (None, None)
        y, last, S = self.att(x_t.unsqueeze(1), last, S)
        return y[:, 0], (last, S)


class S4DMixer(nn.Module):
    """s4d.S4DKernel as a mixer: y = GLU(out(GELU(SSM(x)))), SSMBlock's branch without its
    LayerNorm and residual (the HybridBlock supplies both). x [B, T, H] -> [B, T, H]."""

    def __init__(self, cfg):
        super().__init__()
        from archlab.architectures.s4d import KERNELS, S4DKernel

        H = cfg.d_model
        self.kernel = "fft" if cfg.kernel == "auto" else cfg.kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {cfg.kernel!r}")
        self.ssm = S4DKernel(H, cfg.d_state, cfg.dt_min, cfg.dt_max, cfg.init)
        self.out = nn.Linear(H, 2 * H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ssm(x.transpose(1, 2), self.kernel).transpose(1, 2)  # (B, T, H)
        return F.glu(self.out(F.gelu(y)), dim=-1)

    def init_state(self, batch: int, device=None):
        cdtype = torch.complex128 if self.ssm.D.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch, *self.ssm.C.shape[:2], dtype=cdtype, device=device)

    def step(self, x_t: torch.Tensor, s):
        y, s = self.ssm.step(x_t, s)
        return F.glu(self.out(F.gelu(y)), dim=-1), s


def _rglru(mod, cfg, layer_idx):
    d_rnn = mod._rnn_width(cfg.d_model, cfg.rnn_expand, cfg.rnn_heads)
    return mod.RecurrentBlock(cfg.d_model, d_rnn, cfg.rnn_heads, cfg.conv_width, cfg.c, cfg.kernel)


def _heads(kind, inner):
    def make(mod, cfg, layer_idx):
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"{kind} mixer: model.d_model={cfg.d_model} must be divisible by "
                             f"model.n_heads={cfg.n_heads}")
        return inner(mod, cfg, layer_idx)
    return make


A = "archlab.architectures"
MIXERS: dict[str, MixerSpec] = {s.name: s for s in [
    MixerSpec("attention", "gpt2", f"{A}.gpt2.CausalSelfAttention", True,
              "full causal softmax attention (SDPA), no positions of its own",
              _heads("attention", lambda m, c, i: m.CausalSelfAttention(c))),
    MixerSpec("local_attention", "griffin", f"{A}.griffin.LocalMQA", True,
              "sliding-window multi-query attention with RoPE (window incl. self)",
              lambda m, c, i: m.LocalMQA(c.d_model, c.n_heads, c.window, c.rope_base)),
    MixerSpec("mamba2", "mamba2", f"{A}.mamba2.Mamba2Mixer", True,
              "Mamba-2 SSD mixer through archlab.kernels.ssd (mamba_ssm on CUDA when installed)",
              lambda m, c, i: m.Mamba2Mixer(c)),
    MixerSpec("retnet", "retnet", f"{A}.retnet.MultiScaleRetention", True,
              "multi-scale retention through archlab.kernels.retention",
              _heads("retnet", lambda m, c, i: m.MultiScaleRetention(c))),
    MixerSpec("rwkv", "rwkv", f"{A}.rwkv.TimeMix", True, "RWKV-6 time-mix (adapter RWKVTimeMix)",
              lambda m, c, i: RWKVTimeMix(c, i)),
    MixerSpec("hyena", "hyena", f"{A}.hyena.HyenaOperator", False, "Hyena implicit long convolution",
              lambda m, c, i: m.HyenaOperator(c)),
    MixerSpec("linformer", "linformer", f"{A}.linformer.CausalLinformerAttention", True,
              "causal blockwise Linformer attention (needs T <= max_len)",
              _heads("linformer", lambda m, c, i: m.CausalLinformerAttention(c))),
    MixerSpec("performer", "performer", f"{A}.performer.FavorAttention", True,
              "causal FAVOR+ attention through archlab.kernels.retention",
              _heads("performer", lambda m, c, i: m.FavorAttention(c, i))),
    MixerSpec("rglru", "hawk", f"{A}.hawk.RecurrentBlock", True,
              "Hawk/Griffin RG-LRU recurrent block through archlab.kernels.scan", _rglru),
    MixerSpec("s4d", "s4d", f"{A}.s4d.S4DKernel", True, "diagonal S4 (adapter S4DMixer)",
              lambda m, c, i: S4DMixer(c)),
]}

# seed 000 names the attention types full | linformer | performer
ALIASES = {"full": "attention", "attn": "attention", "swa": "local_attention"}


def _spec(kind: str) -> MixerSpec:
    kind = ALIASES.get(kind, kind)
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer {kind!r}; known mixers: {', '.join(MIXERS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return MIXERS[kind]


def mixer_class(kind: str) -> type:
    """The existing architecture class a registry-built mixer of `kind` is (or wraps)."""
    return _cls(_spec(kind).cls)


def mixer_config(kind: str, d_model: int, opts: dict[str, Any] | None = None):
    """The mixer's architecture Config: its defaults, d_model, and the `opts` it has fields for."""
    spec = _spec(kind)
    mod = importlib.import_module(f"{A}.{spec.arch}")
    fields = {f.name for f in dataclasses.fields(mod.Config)}
    picked = {k: v for k, v in (opts or {}).items() if k in fields and k != "d_model"}
    return dataclasses.replace(mod.Config(), **picked, d_model=d_model)


def build_mixer(kind: str, d_model: int, opts: dict[str, Any] | None = None, layer_idx: int = 0) -> nn.Module:
    spec = _spec(kind)
    mod = importlib.import_module(f"{A}.{spec.arch}")
    return spec.make(mod, mixer_config(kind, d_model, opts), layer_idx)


def mixer_init_state(mixer: nn.Module, batch: int, device=None):
    """The mixer's zero state. Mamba2Mixer keeps its state layout in Mamba2Backbone (conv
    window [B, conv_dim, d_conv], SSM state [B, H, P, N] in A_log's precision); built here
    the same way, so mamba2.py is untouched."""
    if hasattr(mixer, "init_state"):
        return mixer.init_state(batch, device)
    from archlab.architectures.mamba2 import Mamba2Mixer

    if isinstance(mixer, Mamba2Mixer):
        w = mixer.conv1d.weight
        return (torch.zeros(batch, w.shape[0], w.shape[-1], device=device, dtype=w.dtype),
                torch.zeros(batch, mixer.nheads, mixer.headdim, mixer.d_state, device=device,
                            dtype=mixer.A_log.dtype))
    raise NotImplementedError(f"mixer {type(mixer).__name__} has no recurrent step")


# the path of mixers that do not record one: SDPA picks its own backend; linformer has one
STATIC_PATHS = {"attention": "sdpa", "local_attention": "sdpa", "linformer": "torch"}


def mixer_path(mixer: nn.Module, kind: str = "") -> str:
    """The kernel path the mixer's last forward took (or its only path)."""
    inner = getattr(mixer, "att", None) or getattr(mixer, "lru", None) or mixer
    found = getattr(inner, "last_path", None) or getattr(inner, "kernel", None)
    return str(found or STATIC_PATHS.get(ALIASES.get(kind, kind), "not run yet"))


# ---- FFNs ------------------------------------------------------------------------------

FFNS = ("dense", "gelu", "moe", "mode", "none")


def build_ffn(kind: str, d_model: int, opts: dict[str, Any] | None = None) -> nn.Module | None:
    """"dense": hawk's GatedMLP (GELU-gated, hidden d_ffn); "gelu": GELU MLP (hidden d_ffn);
    "moe": moe.SparseMoE of SwiGLU experts (hidden d_ffn each); "mode": the same with
    `n_noop` integrated no-op experts; "none": no FFN (Mamba-2's block). d_ffn defaults to
    4 * d_model (dense, gelu) and 2 * d_model (experts)."""
    opts = dict(opts or {})
    if kind == "none":
        return None
    if kind == "dense":
        from archlab.architectures.hawk import GatedMLP

        return GatedMLP(d_model, opts.get("d_ffn") or 4 * d_model)
    if kind == "gelu":
        from archlab.architectures.common import gelu_mlp

        return gelu_mlp(d_model, opts.get("d_ffn") or 4 * d_model)
    if kind in ("moe", "mode"):
        from archlab.architectures.moe import SparseMoE

        n_noop = int(opts.get("n_noop", 0)) if kind == "mode" else 0
        if kind == "mode" and n_noop < 1:
            raise ValueError(f"ffn 'mode' needs model.n_noop >= 1 no-op experts, found {n_noop}")
        return SparseMoE(d_model, n_experts=int(opts.get("n_experts", 16)), top_k=int(opts.get("top_k", 2)),
                         d_hidden=int(opts.get("d_expert") or 2 * d_model), n_noop=n_noop,
                         capacity_factor=float(opts.get("capacity_factor", 0.0)),
                         renormalize=bool(opts.get("renormalize", True)),
                         lb_weight=float(opts.get("lb_weight", 0.01)),
                         z_weight=float(opts.get("z_weight", 0.001)))
    raise ValueError(f"unknown ffn {kind!r}; known: {', '.join(FFNS)}")


def layer_kinds(pattern: list[str], n_layers: int, field: str = "model.pattern") -> list[str]:
    """pattern[i % len(pattern)] for i < n_layers; errors name the field."""
    if not isinstance(pattern, (list, tuple)) or not pattern:
        raise ValueError(f"{field} must be a non-empty list, found {pattern!r}")
    if n_layers < 1:
        raise ValueError(f"model.n_layers must be >= 1, found {n_layers}")
    return [pattern[i % len(pattern)] for i in range(n_layers)]


# ---- blocks and stacks --------------------------------------------------------------------

class HybridBlock(nn.Module):
    """x + mixer(RMSNorm(x)), then x + ffn(RMSNorm(x)) (mamba's Block; no FFN when ffn is None)."""

    def __init__(self, d_model: int, mixer: nn.Module, ffn: nn.Module | None):
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = mixer
        self.norm2 = nn.RMSNorm(d_model, eps=1e-5) if ffn is not None else None
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x if self.ffn is None else x + self.ffn(self.norm2(x))

    def init_state(self, batch: int, device=None):
        return mixer_init_state(self.mixer, batch, device)

    def step(self, x_t: torch.Tensor, state):  # x_t [B, d_model]
        y, state = self.mixer.step(self.norm1(x_t), state)
        x_t = x_t + y
        return (x_t if self.ffn is None else x_t + self.ffn(self.norm2(x_t))), state


class HybridStack(nn.Module):
    """[B, T, d_input] -> [B, T, d_model]: in_proj -> (+ learned positions when max_len > 0)
    -> HybridBlock per layer -> RMSNorm. `mixers` / `ffns` are per-layer kind lists;
    `opts` (a hybrid's Config as a dict) supplies the mixers' and FFNs' options."""

    def __init__(self, d_input: int, d_model: int, mixers: list[str], ffns: list[str],
                 opts: dict[str, Any], *, max_len: int = 0):
        super().__init__()
        if len(mixers) != len(ffns):
            raise ValueError(f"{len(mixers)} mixers but {len(ffns)} ffns: one each per layer")
        self.d_model = d_model
        self.layer_kinds = [ALIASES.get(k, k) for k in mixers]
        self.ffn_kinds = list(ffns)
        self.stepping = all(_spec(k).step for k in mixers)
        # depth-dependent inits (rwkv's schedule) need the stack's depth
        opts = {"n_layers": len(mixers), **opts}
        from archlab.architectures.common import input_projection, learned_positions

        self.in_proj = input_projection(d_input, d_model)
        self.wpe = learned_positions(max_len, d_model) if max_len > 0 else None
        self.layers = nn.ModuleList(
            HybridBlock(d_model, build_mixer(k, d_model, opts, i), build_ffn(f, d_model, opts))
            for i, (k, f) in enumerate(zip(mixers, ffns))
        )
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)

    def _check_len(self, T: int) -> None:
        if self.wpe is not None and T > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds model.max_len={self.wpe.num_embeddings}")

    def embed(self, x: torch.Tensor, t0: int = 0) -> torch.Tensor:
        h = self.in_proj(x)
        if self.wpe is None:
            return h
        T = x.shape[1] if x.dim() == 3 else 1
        self._check_len(t0 + T)
        pos = self.wpe.weight[t0:t0 + T]
        return h + (pos if x.dim() == 3 else pos[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.norm_f(h)

    @property
    def kernel_path(self) -> str:
        seen = {}
        for kind, layer in zip(self.layer_kinds, self.layers):
            seen.setdefault(kind, mixer_path(layer.mixer, kind))
        return "+".join(f"{k}:{p}" for k, p in seen.items())

    def init_state(self, batch: int, device=None):
        if not self.stepping:
            bad = sorted({k for k in self.layer_kinds if not _spec(k).step})
            raise NotImplementedError(f"mixer(s) {', '.join(bad)} have no recurrent step")
        return {"pos": 0, "layers": [layer.init_state(batch, device) for layer in self.layers]}

    def step(self, x_t: torch.Tensor, state):  # [B, d_input] -> [B, d_model]
        h = self.embed(x_t, state["pos"])
        new = []
        for layer, s in zip(self.layers, state["layers"]):
            h, s = layer.step(h, s)
            new.append(s)
        return self.norm_f(h), {"pos": state["pos"] + 1, "layers": new}
