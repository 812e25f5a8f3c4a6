"""Scaffolding shared by the architecture modules: the input projection, the layer stacks,
the pre-norm residual block, the GELU MLP and the linear-scan recurrence.

These pieces only wire layers together (loops, residuals, norms, per-layer states); each
architecture keeps its own mixer and kernel code in its module. Attribute names are the
architecture's own (`Stack.layers_name` / `norm_name`, `PreNormBlock(names=...)`), so
state_dict keys do not depend on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def input_projection(d_input: int, d_model: int) -> nn.Module:
    """Identity when the input already has the residual width, else Linear(d_input -> d_model)."""
    return nn.Identity() if d_input == d_model else nn.Linear(d_input, d_model)


def gelu_mlp(d: int, hidden: int, dropout: float | None = None) -> nn.Sequential:
    """Linear(d -> hidden) -> GELU -> Linear(hidden -> d), then Dropout(dropout) if given."""
    layers = [nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def learned_positions(max_len: int, d_model: int, std: float = 0.02) -> nn.Embedding:
    """A position table [max_len, d_model] initialised N(0, std)."""
    wpe = nn.Embedding(max_len, d_model)
    nn.init.normal_(wpe.weight, std=std)
    return wpe


class Stack(nn.Module):
    """A causal backbone [B, T, d_input] -> [B, T, d_model]: in_proj -> layers -> final norm.

    `inputs()` builds the modules used on the way in (positions, an input norm), registered
    between in_proj and the layers; subclasses apply them in `embed`. `inputs` and `layers`
    are built in that order after in_proj, so parameters are created (and randomly
    initialised) in registration order. Subclasses name the layer list and the final norm
    (`layers_name`, `norm_name`). A Stack has no step: `SteppedStack` and `PositionalStack`
    add it.
    """

    layers_name = "layers"
    norm_name = "norm"

    def __init__(self, d_input: int, d_model: int, layers: Iterable[nn.Module], norm: nn.Module,
                 inputs: Callable[[], dict[str, nn.Module]] | None = None):
        super().__init__()
        self.d_model = d_model
        self.in_proj = input_projection(d_input, d_model)
        for name, module in (inputs() if inputs else {}).items():
            self.add_module(name, module)
        self.add_module(self.layers_name, nn.ModuleList(layers))
        self.add_module(self.norm_name, norm)

    @property
    def layer_list(self) -> nn.ModuleList:
        return getattr(self, self.layers_name)

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self, self.norm_name)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' input from the backbone's input, [B, T, d_input] or [B, d_input]."""
        return self.in_proj(x)

    def run_layers(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layer_list:
            h = layer(h)
        return h

    def step_layers(self, h: torch.Tensor, states):
        """One position through every layer: (h [B, d_model], states) -> (h, new states)."""
        new = []
        for layer, s in zip(self.layer_list, states):
            h, s = layer.step(h, s)
            new.append(s)
        return h, new

    def layer_states(self, batch: int, device=None) -> list:
        return [layer.init_state(batch, device) for layer in self.layer_list]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        return self.final_norm(self.run_layers(self.embed(x)))


class SteppedStack(Stack):
    """A Stack whose layers step (`layer.step(h, s)`, `layer.init_state(batch, device)`):
    the state is one entry per layer."""

    def init_state(self, batch: int, device=None) -> list:
        return self.layer_states(batch, device)

    def step(self, x_t: torch.Tensor, state):  # [B, d_input] -> [B, d_model]
        h, new = self.step_layers(self.embed(x_t), state)
        return self.final_norm(h), new


class PositionalStack(Stack):
    """A Stack with learned absolute positions (GPT-2 style): the layers read
    drop(in_proj(x) + wpe(t)), wpe = positions(), so T <= max_len. The state is {"pos": the next position,
    "layers": one entry per layer}; `arch` prefixes the length error."""

    arch = "model"

    def __init__(self, d_input: int, d_model: int, layers: Iterable[nn.Module], norm: nn.Module,
                 *, positions: Callable[[], nn.Embedding], dropout: float):
        super().__init__(d_input, d_model, layers, norm,
                         inputs=lambda: {"wpe": positions(), "drop": nn.Dropout(dropout)})
        self.max_len = self.wpe.num_embeddings

    def _check_len(self, T: int) -> None:
        if T > self.max_len:
            raise ValueError(f"{self.arch}: sequence length {T} exceeds model.max_len={self.max_len}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        self._check_len(T)
        h = self.drop(self.in_proj(x) + self.wpe(torch.arange(T, device=x.device)))
        return self.final_norm(self.run_layers(h))

    def init_state(self, batch: int, device=None) -> dict:
        return {"pos": 0, "layers": self.layer_states(batch, device)}

    def step(self, x_t: torch.Tensor, state):
        """x_t [B, d_input] -> (y_t [B, d_model], state); equals forward() at position state['pos']."""
        t = state["pos"]
        self._check_len(t + 1)
        h = self.drop(self.in_proj(x_t) + self.wpe.weight[t])
        h, layers = self.step_layers(h, state["layers"])
        return self.final_norm(h), {"pos": t + 1, "layers": layers}


class PreNormBlock(nn.Module):
    """x = x + drop(mixer(norm1(x))); x = x + drop(mlp(norm2(x))): the pre-norm residual block.

    `names` are the attribute (state_dict) names of norm1, mixer, norm2 and mlp. `dropout`
    adds a Dropout on both branches of the forward. `step` (inference, no dropout) and
    `init_state` go to the mixer's.
    """

    def __init__(self, norm1: nn.Module, mixer: nn.Module, norm2: nn.Module, mlp: nn.Module, *,
                 dropout: float | None = None, names=("norm1", "mixer", "norm2", "mlp")):
        super().__init__()
        self.names = tuple(names)
        for name, module in zip(self.names, (norm1, mixer, norm2, mlp)):
            self.add_module(name, module)
        self.drop = nn.Identity() if dropout is None else nn.Dropout(dropout)

    def _parts(self):
        return [self._modules[name] for name in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, mixer, norm2, mlp = self._parts()
        x = x + self.drop(mixer(norm1(x)))
        return x + self.drop(mlp(norm2(x)))

    def init_state(self, batch: int, device=None):
        return self._parts()[1].init_state(batch, device)

    def step(self, x_t: torch.Tensor, state):
        norm1, mixer, norm2, mlp = self._parts()
        y, state = mixer.step(norm1(x_t), state)
        x_t = x_t + y
        return x_t + mlp(norm2(x_t)), state


class HeadsAttention(nn.Module):
    """Base of attention mixers with a fused q/k/v projection: `_heads` splits it into
    n_heads heads, `_merge` joins them back through the output projection and dropout."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # (B, T, C) -> (B, H, T, dh)
        return [t.view(B, T, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v)]

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.drop(self.out(y.transpose(1, 2).reshape(B, T, -1)))  # (B, T, C)


class LinearScanRecurrence(nn.Module):
    """h_t = a_t h_{t-1} + b_t with (a, b) = self.coefficients(x) read from the input only
    (subclasses define `coefficients`): forward runs `archlab.kernels.scan.linear_scan`
    over T, step runs the same update for one position. States stay in the coefficients'
    precision (fp32 at least); outputs are cast back to the input's dtype."""

    def __init__(self, kernel: str):
        super().__init__()
        self.kernel = kernel
        self.last_path = None  # the linear_scan path the last forward ran

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        from archlab.kernels._dispatch import resolve_kernel
        from archlab.kernels.scan import linear_scan

        a, b = self.coefficients(x)
        self.last_path = resolve_kernel("scan", self.kernel, x.device)
        h, h_last = linear_scan(a, b, h0, kernel=self.last_path)
        return h.to(x.dtype), h_last

    def step(self, x_t: torch.Tensor, h: torch.Tensor):
        a, b = self.coefficients(x_t)
        h = a * h + b
        return h.to(x_t.dtype), h


class SkipStack(nn.Module):
    """Recurrent layers stacked without an input projection or final norm (IndRNN, QRNN):
    layer i maps width dims[i] -> d_model (dims = [d_input, d_model, ...]); with `residual`
    it reads LayerNorm(x) and adds x back where the widths match; dropout between layers.
    `make_layer(d_in)` builds a layer with forward, step and init_state(batch, device)."""

    def __init__(self, d_input: int, d_model: int, n_layers: int, make_layer, *,
                 residual: bool, dropout: float):
        super().__init__()
        self.d_model = d_model
        dims = [d_input] + [d_model] * n_layers
        self.layers = nn.ModuleList(make_layer(dims[i]) for i in range(n_layers))
        # a residual needs matching widths: layer i adds its input when dims[i] == d_model
        self.norms = nn.ModuleList(
            nn.LayerNorm(dims[i]) if residual else nn.Identity() for i in range(n_layers)
        )
        self.skips = [residual and dims[i] == d_model for i in range(n_layers)]
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_input] -> [B, T, d_model]
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            y = layer(norm(x))
            x = x + y if self.skips[i] else y
            if i < len(self.layers) - 1:
                x = self.drop(x)
        return x

    def init_state(self, batch: int, device=None) -> list:
        return [layer.init_state(batch, device) for layer in self.layers]

    def step(self, x_t: torch.Tensor, state):
        """x_t [B, d_input] -> (y_t [B, d_model], state); equals forward() position by position."""
        new = []
        for i, (layer, norm, s) in enumerate(zip(self.layers, self.norms, state)):
            y, s = layer.step(norm(x_t), s)
            new.append(s)
            x_t = x_t + y if self.skips[i] else y
            if i < len(self.layers) - 1:
                x_t = self.drop(x_t)
        return x_t, new
