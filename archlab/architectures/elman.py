"""Elman ablation ladder: from the plain Elman RNN to a gated, norm-constrained, log-space,
competitive-output recurrent layer, one config switch per rung, pre-norm residual stacking.

One layer on x_t (hidden width d_hidden = expand * d_model):
    cand_t = tanh(W x_t + R h_{t-1} + b)
    d_t    = sigmoid(W_d x_t + b_d)       if gated, else d_t = 1 (the plain Elman RNN)
    h_t    = (1 - d_t) * h_{t-1} + d_t * cand_t
The recurrence matrix R is constrained by `constraint`:
    "free"               R as learned;
    "spectral_norm"      R * radius / max(sigma, radius), sigma = R's largest singular
                         value estimated by power iteration (one iteration per training
                         forward, warm-started, converged at init); the spectral radius
                         is then <= ||R||_2 <= radius (0.99), so h cannot blow up through R;
    "scaled_orthogonal"  R = radius * Q, Q = matrix_exp(S - S^T) orthogonal: every
                         singular value equals radius.
`log_space`: the state is carried as (log|h|, sign h) and the gated mix is a signed
log-sum-exp, with log(1 - d) and log d taken as logsigmoid of the gate pre-activation: the
same function as the linear form, but a slowly decaying state keeps its precision.
`compete`: the output is softmax(h within each of `compete_groups` groups) * SiLU(W_z x_t)
(units of a group compete for the output), instead of h itself.
Block: x = x + W_o layer(RMSNorm(x)).

h depends non-linearly on h_{t-1}, so there is no parallel scan: forward is the sequential
loop over t (input projections are batched over T first), and `step` is its body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archlab.architectures.common import SteppedStack

CONSTRAINTS = ("free", "spectral_norm", "scaled_orthogonal")
LOG_ZERO = -80.0  # log|h| of the zero state; exp(-80) ~ 2e-35 is still a normal fp32 number
LOG_EPS = 1e-30  # keeps log|x| finite at x == 0


@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 2
    expand: int = 1  # d_hidden = expand * d_model
    gated: bool = False
    constraint: str = "free"  # "free" | "spectral_norm" | "scaled_orthogonal"
    radius: float = 0.99  # spectral bound (spectral_norm) or scale (scaled_orthogonal)
    log_space: bool = False
    compete: bool = False
    compete_groups: int = 4  # d_hidden must be divisible by it


# The ladder: each rung adds one switch to the one before (debug sizes, so tests are fast);
# `seed` is the top rung at the seed width.
FLAVORS = {
    "debug": Config(d_model=32, n_layers=2),
    "gated": Config(d_model=32, n_layers=2, gated=True),
    "spectral": Config(d_model=32, n_layers=2, gated=True, constraint="spectral_norm"),
    "orthogonal": Config(d_model=32, n_layers=2, gated=True, constraint="scaled_orthogonal"),
    "logspace": Config(d_model=32, n_layers=2, gated=True, constraint="spectral_norm", log_space=True),
    "compete": Config(d_model=32, n_layers=2, gated=True, constraint="spectral_norm", log_space=True,
                      compete=True),
    "seed": Config(d_model=512, n_layers=2, gated=True, constraint="spectral_norm", log_space=True,
                   compete=True, compete_groups=8),
}

# exact build_model("elman", "vector", FLAVORS[f], d_in=768) parameter counts
PARAM_COUNTS = {"debug": 56320, "gated": 58432, "spectral": 58432, "orthogonal": 58432,
                "logspace": 58432, "compete": 60544, "seed": 3414784}


def _signed_logaddexp(la, sa, lb, sb):
    """log|s_a e^la + s_b e^lb| and its sign (s in {-1, +1})."""
    m = torch.maximum(la, lb)
    r = sa * torch.exp(la - m) + sb * torch.exp(lb - m)
    sign = torch.where(r < 0, -1.0, 1.0).to(r.dtype)
    return m + torch.log(r.abs() + LOG_EPS), sign


class ElmanLayer(nn.Module):
    """x [B, T, d] -> y [B, T, d_hidden]; sequential in T (h_t is non-linear in h_{t-1})."""

    def __init__(self, d: int, d_hidden: int, config: Config):
        super().__init__()
        self.config, self.d_hidden = config, d_hidden
        n_in = 1 + int(config.gated) + int(config.compete)  # candidate, gate, output gate
        self.in_proj = nn.Linear(d, n_in * d_hidden)
        bound = 1.0 / math.sqrt(d_hidden)
        if config.constraint == "scaled_orthogonal":
            # skew-symmetric generator; small init keeps Q = exp(S - S^T) near, not at, identity
            self.R_gen = nn.Parameter(torch.randn(d_hidden, d_hidden) * bound)
        else:
            self.R = nn.Parameter(torch.empty(d_hidden, d_hidden).uniform_(-bound, bound))
        if config.constraint == "spectral_norm":
            # power-iteration vector: a buffer, warm-started across forwards, converged now
            u = F.normalize(torch.randn(d_hidden), dim=0)
            self.register_buffer("u", u)
            self.power_iteration(50)

    @torch.no_grad()
    def power_iteration(self, n: int) -> None:
        """Refine `u` towards R's top left-singular vector (n iterations of u <- R R^T u)."""
        u = self.u
        for _ in range(n):
            v = F.normalize(self.R.t() @ u, dim=0)
            u = F.normalize(self.R @ v, dim=0)
        self.u.copy_(u)

    def recurrence_matrix(self) -> torch.Tensor:
        """The constrained R used by forward and step (gradients flow through it)."""
        c = self.config
        if c.constraint == "free":
            return self.R
        if c.constraint == "scaled_orthogonal":
            return c.radius * torch.linalg.matrix_exp(self.R_gen - self.R_gen.t())
        # sigma = u^T R v with u, v held fixed: torch's spectral_norm estimator
        u = self.u.clone()  # a later training forward updates the buffer in place
        v = F.normalize(self.R.t() @ u, dim=0).detach()
        sigma = u @ self.R @ v
        return self.R * (c.radius / torch.clamp_min(sigma, c.radius))

    def _split(self, z: torch.Tensor):
        """Input-side pre-activations (candidate, gate or None, output gate or None)."""
        parts = list(z.chunk(z.shape[-1] // self.d_hidden, dim=-1))
        cand = parts.pop(0)
        gate = parts.pop(0) if self.config.gated else None
        out_gate = parts.pop(0) if self.config.compete else None
        return cand, gate, out_gate

    def init_state(self, batch: int, device=None, dtype=None):
        # default: the parameters' dtype (fp32 in training, fp64 after .double() in tests)
        dtype = dtype or self.in_proj.weight.dtype
        if self.config.log_space:
            return (torch.full((batch, self.d_hidden), LOG_ZERO, device=device, dtype=dtype),
                    torch.ones(batch, self.d_hidden, device=device, dtype=dtype))
        return torch.zeros(batch, self.d_hidden, device=device, dtype=dtype)

    def _cell(self, wx, g, R, state):
        """One time step from the input pre-activations: returns (h_t, new state)."""
        if self.config.log_space:
            log_abs, sign = state
            h_prev = sign * torch.exp(log_abs)
        else:
            h_prev = state
        cand = torch.tanh(wx + h_prev @ R.t())
        if g is None:  # plain Elman: d = 1
            if self.config.log_space:
                return cand, (torch.log(cand.abs() + LOG_EPS), torch.where(cand < 0, -1.0, 1.0).to(cand.dtype))
            return cand, cand
        if self.config.log_space:
            # log((1 - d)|h|) and log(d |cand|), d = sigmoid(g): 1 - d = sigmoid(-g)
            la = F.logsigmoid(-g) + log_abs
            lb = F.logsigmoid(g) + torch.log(cand.abs() + LOG_EPS)
            sb = torch.where(cand < 0, -1.0, 1.0).to(cand.dtype)
            log_abs, sign = _signed_logaddexp(la, sign, lb, sb)
            return sign * torch.exp(log_abs), (log_abs, sign)
        d = torch.sigmoid(g)
        h = (1 - d) * h_prev + d * cand
        return h, h

    def _output(self, h: torch.Tensor, out_gate) -> torch.Tensor:
        if out_gate is None:
            return h
        groups = self.config.compete_groups
        comp = torch.softmax(h.unflatten(-1, (groups, -1)), dim=-1).flatten(-2)  # (..., G*k)
        return comp * F.silu(out_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.constraint == "spectral_norm":
            self.power_iteration(1)  # track R as it trains; step() then uses the same u
        R = self.recurrence_matrix()
        cand_in, gate, out_gate = self._split(self.in_proj(x))  # each (B, T, d_hidden)
        state = self.init_state(x.shape[0], x.device, torch.promote_types(x.dtype, torch.float32))
        ys = []
        for t in range(x.shape[1]):
            h, state = self._cell(cand_in[:, t], None if gate is None else gate[:, t], R, state)
            ys.append(h)
        h = torch.stack(ys, dim=1) if ys else x.new_zeros(x.shape[0], 0, self.d_hidden)
        return self._output(h, out_gate)

    def step(self, x_t: torch.Tensor, state):
        cand_in, gate, out_gate = self._split(self.in_proj(x_t))
        h, state = self._cell(cand_in, gate, self.recurrence_matrix(), state)
        return self._output(h, out_gate), state


class Block(nn.Module):
    def __init__(self, d: int, config: Config):
        super().__init__()
        dh = config.expand * d
        self.norm = nn.RMSNorm(d)
        self.rnn = ElmanLayer(d, dh, config)
        self.out_proj = nn.Linear(dh, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_proj(self.rnn(self.norm(x)))

    def step(self, x_t: torch.Tensor, state):
        y, state = self.rnn.step(self.norm(x_t), state)
        return x_t + self.out_proj(y), state

    def init_state(self, batch: int, device=None):
        return self.rnn.init_state(batch, device)


class ElmanBackbone(SteppedStack):
    layers_name = "blocks"

    def __init__(self, config: Config, d_input: int):
        if config.constraint not in CONSTRAINTS:
            raise ValueError(f"model.constraint must be one of {CONSTRAINTS}, found {config.constraint!r}")
        for name in ("d_model", "n_layers", "expand"):
            if getattr(config, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, found {getattr(config, name)}")
        dh = config.expand * config.d_model
        if config.compete and (config.compete_groups < 1 or dh % config.compete_groups):
            raise ValueError(f"model.compete_groups={config.compete_groups} must divide the hidden "
                             f"width expand * d_model = {dh}")
        if not 0 < config.radius <= 1:
            raise ValueError(f"model.radius must be in (0, 1], found {config.radius}")
        super().__init__(d_input, config.d_model,
                         (Block(config.d_model, config) for _ in range(config.n_layers)),
                         nn.RMSNorm(config.d_model))

    # h_t is non-linear in h_{t-1}: no scan kernel applies, forward is always the loop
    kernel_path = "loop"


def build(config: Config, d_input: int) -> nn.Module:
    return ElmanBackbone(config, d_input)
