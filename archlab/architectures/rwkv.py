"""RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch"): time-mix + channel-mix blocks.

Time-mix, per head (head size K), with token shift sx_t = x_{t-1} - x_t:
    data-dependent lerp: x_* = x + sx * (mu_* + LoRA_*(x + sx * mu_x))   for * in w, k, v, r, g
    r, k, v, g = W_r x_r, W_k x_k, W_v x_v, SiLU(W_g x_g)
    decay    w_t = exp(-exp(d + LoRA_d(x_w)))         (per channel, data-dependent, in (0, 1))
    WKV:     o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),  S_t = diag(w_t) S_{t-1} + k_t^T v_t
    out      = W_o(GroupNorm_heads(o) * g)
u is the "bonus" for the current token. Channel-mix: k = relu(W_k x_k)^2,
out = sigmoid(W_r x_r) * W_v k, with its own token shift. Block: x + TM(LN(x)), x + CM(LN(x));
LayerNorm ln0 on the backbone input (as RWKV does on its embeddings). Init follows RWKV-6's
per-layer schedule (mu, decay speeds and bonus depend on the layer's depth).

WKV paths (`kernel`), all computing the same map:
- "sequential": the recurrence above, one step at a time (the definition);
- "chunked" ("auto" on CPU): exact chunked form. Inside a chunk, with inclusive cumulative
  log decays c_t and exclusive e_t = c_{t-1}, o_t = r_t (u k_t) v_t
  + sum_{s<t} (sum_K r_t k_s exp(e_t - c_s)) v_s + (r_t exp(e_t)) S_0. Every exponent is a
  sum of log decays over a non-empty or empty range, so <= 0: nothing overflows, no division;
- "fla": flash-linear-attention's `chunk_rwkv6` (CUDA; "auto" picks it when fla is
  importable and the tensors are on CUDA). fla is imported inside the call only.
`backbone.kernel_path` says which path the last forward ran. step() is a length-1
forward carrying (last x, WKV state) per layer.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import SteppedStack


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    head_size: int = 64  # K = V per head; n_heads = d_model / head_size
    d_ff: int = 0  # channel-mix width; 0 = RWKV-6's 3.5 d_model (rounded down to a multiple of 32)
    mix_lora: int = 32  # rank of the token-shift LoRA (5 of them)
    decay_lora: int = 64  # rank of the decay LoRA
    chunk_size: int = 16
    kernel: str = "auto"  # "auto" | "chunked" | "sequential" | "fla"


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, head_size=8, mix_lora=8, decay_lora=8, chunk_size=16),
    "seed": Config(d_model=512, n_layers=6, head_size=64, mix_lora=32, decay_lora=64),
}

# exact count of build_model("rwkv", "vector", FLAVORS[f], d_in=768); tests check it
PARAM_COUNTS = {"debug": 81824, "seed": 22662400}

KERNELS = ("chunked", "sequential", "fla")


def wkv_sequential(r, k, v, logw, u, state=None):
    """The WKV-6 recurrence. r, k, logw [B, H, T, K]; v [B, H, T, V]; u [H, K] (bonus);
    logw = log of the decay (<= 0); state [B, H, K, V] or None. Returns (o [B, H, T, V], S)."""
    b, h, t, kd = r.shape
    S = r.new_zeros(b, h, kd, v.shape[-1]) if state is None else state
    w = torch.exp(logw)
    out = []
    for i in range(t):
        kv = k[:, :, i, :, None] * v[:, :, i, None, :]  # (B, H, K, V)
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, :, i], S + u[None, :, :, None] * kv))
        S = w[:, :, i, :, None] * S + kv
    o = torch.stack(out, dim=2) if out else v.new_zeros(v.shape)
    return o, S


def wkv_chunked(r, k, v, logw, u, state=None, chunk_size: int = 16):
    """The same map as `wkv_sequential`, chunk by chunk (see the module docstring)."""
    b, h, t, kd = r.shape
    S = r.new_zeros(b, h, kd, v.shape[-1]) if state is None else state
    strict = torch.tril(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=r.device), -1)
    out = []
    for s0 in range(0, t, chunk_size):
        sl = slice(s0, min(s0 + chunk_size, t))
        rc, kc, vc, lw = r[:, :, sl], k[:, :, sl], v[:, :, sl], logw[:, :, sl]
        L = rc.shape[2]
        c = torch.cumsum(lw, dim=2)  # inclusive (B, H, L, K)
        e = c - lw  # exclusive: log decay from chunk start up to (not incl.) t
        # pairwise decay exp(e_t - c_s) for s < t: exponent <= 0; masked entries set to 0
        mask = strict[:L, :L, None]  # (L, L, 1)
        diff = (e[:, :, :, None, :] - c[:, :, None, :, :]).masked_fill(~mask, float("-inf"))
        A = torch.einsum("bhtk,bhsk,bhtsk->bhts", rc, kc, torch.exp(diff))  # (B, H, L, L)
        bonus = (rc * u[None, :, None, :] * kc).sum(-1, keepdim=True)  # (B, H, L, 1)
        o = A @ vc + bonus * vc + torch.einsum("bhtk,bhkv->bhtv", rc * torch.exp(e), S)
        out.append(o)
        last = c[:, :, -1:, :]  # total log decay of the chunk (B, H, 1, K)
        S = torch.exp(last[:, :, 0, :, None]) * S + torch.einsum("bhsk,bhsv->bhkv", kc * torch.exp(last - c), vc)
    o = torch.cat(out, dim=2) if out else v.new_zeros(v.shape)
    return o, S


def wkv_fla(r, k, v, logw, u, state=None):
    from fla.ops.rwkv6 import chunk_rwkv6  # CUDA/Triton dependency: imported here only

    args = [x.transpose(1, 2).contiguous() for x in (r, k, v, logw)]  # fla layout (B, T, H, K)
    kwargs = dict(scale=1.0, initial_state=state, output_final_state=True)
    if "head_first" in inspect.signature(chunk_rwkv6).parameters:  # older fla defaults to True
        kwargs["head_first"] = False
    o, S = chunk_rwkv6(*args, u, **kwargs)
    return o.transpose(1, 2), S


def resolve_wkv(kernel: str, device: torch.device) -> str:
    if kernel == "auto":
        fla_ok = device.type == "cuda" and importlib.util.find_spec("fla") is not None
        return "fla" if fla_ok else "chunked"
    if kernel == "fla":
        if importlib.util.find_spec("fla") is None:
            raise RuntimeError("model.kernel='fla' needs the package 'flash-linear-attention' (import 'fla'); "
                               "it is not installed")
        if device.type != "cuda":
            raise RuntimeError(f"model.kernel='fla' needs CUDA tensors; found tensors on {device.type!r}")
        return "fla"
    if kernel in KERNELS:
        return kernel
    raise ValueError(f"model.kernel: expected one of auto, {', '.join(KERNELS)}; found {kernel!r}")


def _shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} for every t ([B, T, C]); position 0 takes `last` (zeros when None)."""
    prev = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([prev, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        C, K = cfg.d_model, cfg.head_size
        if C % K:
            raise ValueError(f"model.head_size={K} must divide model.d_model={C}")
        self.H, self.K, self.chunk_size, self.kernel = C // K, K, cfg.chunk_size, cfg.kernel
        r0 = layer_id / max(cfg.n_layers - 1, 1)  # 0 -> 1 with depth
        r1 = 1.0 - layer_id / cfg.n_layers  # 1 -> ~0 with depth
        ddd = torch.arange(C, dtype=torch.float32) / C
        self.mu_x = nn.Parameter(1.0 - ddd ** r1)
        # token-shift mixing weights for w, k, v, r, g (RWKV-6's per-layer schedule)
        self.mu = nn.Parameter(torch.stack([1.0 - ddd ** r1, 1.0 - ddd ** r1, 1.0 - (ddd ** r1 + 0.3 * r0),
                                            1.0 - ddd ** (0.5 * r1), 1.0 - ddd ** (0.5 * r1)]))  # (5, C)
        self.mix_w1 = nn.Parameter(torch.zeros(C, 5 * cfg.mix_lora))
        self.mix_w2 = nn.Parameter(torch.empty(5, cfg.mix_lora, C).uniform_(-0.01, 0.01))
        n = torch.arange(C, dtype=torch.float32)
        self.decay = nn.Parameter(-6 + 5 * (n / max(C - 1, 1)) ** (0.7 + 1.3 * r0))
        self.decay_w1 = nn.Parameter(torch.zeros(C, cfg.decay_lora))
        self.decay_w2 = nn.Parameter(torch.empty(cfg.decay_lora, C).uniform_(-0.01, 0.01))
        bonus = r0 * (1 - n / max(C - 1, 1)) + ((n + 1) % 3 - 1) * 0.1
        self.bonus = nn.Parameter(bonus.view(self.H, K))  # u
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.H, C, eps=64e-5)
        for p in (self.mu_x, self.mu, self.decay, self.bonus):
            p._no_weight_decay = True
        self.last_path = None

    def _project(self, x: torch.Tensor, prev: torch.Tensor):
        """x, prev [B, T, C] -> r, k, v, logw [B, H, T, K] and g [B, T, C]."""
        sx = prev - x
        xxx = torch.tanh((x + sx * self.mu_x) @ self.mix_w1).unflatten(-1, (5, -1))  # (B, T, 5, R)
        m = torch.einsum("btfr,frc->fbtc", xxx, self.mix_w2)  # (5, B, T, C)
        xw, xk, xv, xr, xg = (x + sx * (self.mu[i] + m[i]) for i in range(5))
        with torch.autocast(x.device.type, enabled=False):  # the decay in the parameters' fp32
            wd = self.decay.dtype
            lora = torch.tanh(xw.to(wd) @ self.decay_w1) @ self.decay_w2
            logw = -torch.exp(self.decay + lora)  # (B, T, C), < 0

        def heads(z):  # (B, T, C) -> (B, H, T, K)
            return z.unflatten(-1, (self.H, self.K)).transpose(1, 2)

        r, k, v = heads(self.receptance(xr)), heads(self.key(xk)), heads(self.value(xv))
        return r, k, v, heads(logw), F.silu(self.gate(xg))

    def _out(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # o (B, H, T, K), g (B, T, C)
        o = o.transpose(1, 2).flatten(-2)  # (B, T, C)
        o = self.ln_x(o.reshape(-1, o.shape[-1])).view_as(o)
        return self.output(o * g)

    def forward(self, x: torch.Tensor, last=None, S=None):
        """x [B, T, C] -> (y [B, T, C], last x [B, C], state S [B, H, K, K])."""
        r, k, v, logw, g = self._project(x, _shift(x, last))
        path = resolve_wkv(self.kernel, x.device)
        self.last_path = path
        with torch.autocast(x.device.type, enabled=False):  # decays and state in fp32 (or fp64)
            wd = self.decay.dtype
            r, k, v, logw, u = r.to(wd), k.to(wd), v.to(wd), logw.to(wd), self.bonus
            S = None if S is None else S.to(wd)
            if path == "fla":
                o, S = wkv_fla(r, k, v, logw, u, S)
            elif path == "chunked":
                o, S = wkv_chunked(r, k, v, logw, u, S, self.chunk_size)
            else:
                o, S = wkv_sequential(r, k, v, logw, u, S)
        return self._out(o.to(x.dtype), g), x[:, -1], S


class ChannelMix(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        C = cfg.d_model
        r1 = 1.0 - layer_id / cfg.n_layers
        ddd = torch.arange(C, dtype=torch.float32) / C
        self.mu_k = nn.Parameter(1.0 - ddd ** r1)
        self.mu_r = nn.Parameter(1.0 - ddd ** r1)
        d_ff = cfg.d_ff or max(int(3.5 * C) // 32 * 32, 32)
        self.key = nn.Linear(C, d_ff, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(d_ff, C, bias=False)

    def forward(self, x: torch.Tensor, last=None):  # x [B, T, C]
        sx = _shift(x, last) - x
        k = torch.relu(self.key(x + sx * self.mu_k)) ** 2
        return torch.sigmoid(self.receptance(x + sx * self.mu_r)) * self.value(k), x[:, -1]


class RWKVBlock(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.att = TimeMix(cfg, layer_id)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = ChannelMix(cfg, layer_id)

    def mix(self, x: torch.Tensor, state=None):
        """x [B, T, C] -> (x, state); state = (last x into time-mix, WKV state, last x into
        channel-mix) or None (a fresh sequence)."""
        a_last, S, f_last = state if state is not None else (None, None, None)
        y, a_last, S = self.att(self.ln1(x), a_last, S)
        x = x + y
        y, f_last = self.ffn(self.ln2(x), f_last)
        return x + y, (a_last, S, f_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)[0]

    def init_state(self, batch: int, device=None):
        C, dt = self.ln1.normalized_shape[0], self.att.decay.dtype  # the parameters' precision
        return (torch.zeros(batch, C, device=device, dtype=dt),
                torch.zeros(batch, self.att.H, self.att.K, self.att.K, device=device, dtype=dt),
                torch.zeros(batch, C, device=device, dtype=dt))

    def step(self, x_t: torch.Tensor, state):  # x_t [B, C]: a length-1 mix
        y, state = self.mix(x_t.unsqueeze(1), state)
        return y[:, 0], state


class RWKVBackbone(SteppedStack):
    norm_name = "ln_out"

    def __init__(self, cfg: Config, d_input: int):
        super().__init__(d_input, cfg.d_model, (RWKVBlock(cfg, i) for i in range(cfg.n_layers)),
                         nn.LayerNorm(cfg.d_model), inputs=lambda: {"ln0": nn.LayerNorm(cfg.d_model)})

    @property
    def kernel_path(self) -> str:
        return f"wkv:{self.layers[0].att.last_path or 'not run yet'}"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln0(self.in_proj(x))


def build(config: Config, d_input: int) -> nn.Module:
    return RWKVBackbone(config, d_input)
