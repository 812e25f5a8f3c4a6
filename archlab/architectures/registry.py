"""Lazy registry: architecture name -> spec -> module, imported only when used.

Adding an architecture = its module in this package + its search space in
`archlab/search_spaces/<name>.py` + one line in `_SPECS` below. Nothing here imports
torch at module import time, and an architecture whose optional dependency is missing
never breaks the others (its module imports that dependency only inside its fast path).

Module contract (every `architectures/<name>.py`):
- `Config`: a dataclass with plain fields (numbers, strings, bools, lists); it must
  round-trip through JSON (`dataclasses.asdict` -> json -> `Config(**d)`).
- `FLAVORS: dict[str, Config]` with at least `debug` (tiny, CPU, seconds).
- `build(config, d_input) -> nn.Module`: the causal backbone. It maps
  [B, T, d_input] -> [B, T, module.d_model] (set `self.d_model`), output t depends only
  on inputs <= t. Backbones that can step expose `init_state(batch, device=None)` and
  `step(x_t [B, d_input], state) -> (y_t [B, d_model], state)`, equal to the parallel forward.
- `PARAM_COUNTS: dict[str, int]`: the exact parameter count of
  `build_model(name, "vector", FLAVORS[flavor], d_in=768)` per documented flavor (token task
  with vocab 256 for vector-less architectures); the zoo invariant tests check it.
- optional `INPUT_PROJECTION = False`: the vector input goes straight into the backbone
  (the seed LSTM) instead of through Linear(d_in -> d_model).
- optional `build_head(config, d_model, d_out) -> nn.Module`: replaces the default
  Linear(d_model -> d_out) vector head (e.g. the seed Transformer's MLP head).
- optional `build_vector_model(config, d_in, d_out) -> nn.Module`: the whole vector model
  for architectures that are not backbone + head (AMN); it returns [B, T, d_out]. Such a
  model refuses `head="residual"` (AMN already is baseline + residual).
- optional `MAX_LENGTH_FIELD = "<Config field>"`: the field holding the longest sequence
  the model can take (learned positions, a fixed projection); the sweep driver refuses a
  `data.context` / `data.seq_len` above it before any worker starts.

Every vector model takes `head="plain" | "residual"` (io.VectorModel): the residual head
adds the linear-average baseline of the last `context` inputs to the head's output.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

TASKS = ("vector", "token")


class ArchConfigError(ValueError):
    """A bad architecture config (flavor, field name or field type): names the field,
    what was expected and what was found. A user error, refused on the driver."""


class UnknownArchitectureError(KeyError):
    """Raised for an architecture name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class ArchSpec:
    name: str
    module: str
    tasks: tuple[str, ...]
    summary: str
    # kernel paths this architecture can use (see archlab.kernels.available_paths)
    kernels: tuple[str, ...] = ()


def _s(name: str, tasks: tuple[str, ...], summary: str, kernels: tuple[str, ...] = ()) -> ArchSpec:
    return ArchSpec(name, f"archlab.architectures.{name}", tasks, summary, kernels)


BOTH = TASKS
_SPECS: dict[str, ArchSpec] = {
    s.name: s
    for s in [
        # Zoo I: the seed recipes
        _s("lstm", BOTH, "stacked LSTM, input fed directly (seed recipe)"),
        _s("gru_stack", BOTH, "residual GRU blocks with LayerNorm (seed recipe)"),
        _s("transformer", BOTH, "causal Transformer encoder, sinusoidal positions (seed recipe)"),
        _s("amn", ("vector",), "attention mixture over the linear-average baseline (seed recipe)"),
        # Zoo II: state-space, linear-attention and modern recurrent
        _s("mamba2", BOTH, "Mamba-2 (SSD, chunked)", ("ssd",)),
        _s("s4d", BOTH, "diagonal S4 (S4D-Lin / S4D-LegS init), FFT convolution + recurrent step"),
        _s("s4", BOTH, "S4 (DPLR kernel)"),
        _s("hyena", BOTH, "Hyena implicit long convolution + gating"),
        _s("retnet", BOTH, "multi-scale retention", ("retention",)),
        _s("rwkv", BOTH, "RWKV-6 time-mix + channel-mix"),
        _s("linformer", BOTH, "causal low-rank attention"),
        _s("performer", BOTH, "causal FAVOR+ attention"),
        _s("gpt2", BOTH, "GPT-2 blocks with learned positions"),
        _s("min_gru", BOTH, "minGRU (parallel scan)", ("scan",)),
        _s("min_lstm", BOTH, "minLSTM (parallel scan)", ("scan",)),
        _s("indrnn", BOTH, "independently recurrent neurons", ("scan",)),
        _s("qrnn", BOTH, "quasi-recurrent network (fo-pooling)", ("scan",)),
        _s("hawk", BOTH, "Hawk: RG-LRU recurrent blocks", ("scan",)),
        _s("griffin", BOTH, "Griffin: RG-LRU + local attention", ("scan",)),
        _s("elman", BOTH, "Elman ablation ladder (gating, spectral norm, log-space)"),
        # Zoo III: hybrids and sparse mixtures, composed from architectures/mixers.py
        _s("moe", BOTH, "sparse MoE transformer: top-k SwiGLU experts, fp32 router, balance + z losses"),
        _s("jamba", BOTH, "Jamba: Mamba-2, attention every attn_every layers, MoE every other",
           ("ssd", "retention")),
        _s("zamba", BOTH, "Zamba: Mamba-2 with one shared attention+MLP block on [h, x0], per-site LoRA", ("ssd",)),
        _s("hymba", BOTH, "Hymba: parallel attention + Mamba-2 heads, beta-scaled, meta tokens, SWA", ("ssd",)),
        _s("mode", BOTH, "MoDE (integrated): MoE with no-op experts in the router", ("ssd",)),
        _s("universal", BOTH, "Universal Transformer: one GPT-2 block applied n_steps times"),
        _s("mod", BOTH, "Mixture-of-Depths: top-k routed GPT-2 blocks, causal router threshold at eval"),
        _s("bdh", BOTH, "Baby Dragon Hatchling: shared-weight sparse ReLU linear attention"),
    ]
}


def list_specs() -> list[ArchSpec]:
    return list(_SPECS.values())


def get_spec(name: str) -> ArchSpec:
    try:
        return _SPECS[name]
    except KeyError:
        known = ", ".join(sorted(_SPECS))
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; known architectures: {known}"
        ) from None


def load_module(name: str):
    return importlib.import_module(get_spec(name).module)


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _matches(value: Any, tp) -> bool:
    """Does `value` (as YAML/JSON/--set give it) fit the annotation `tp`? Plain types,
    Optional/unions, Literal, list/tuple/dict of them; anything else is accepted."""
    if tp is Any or tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float (YAML writes 1 for 1.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):  # JSON turns tuples into lists
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and len(typing.get_args(tp)) == len(value):
            return all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(tp)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return True  # an annotation this check does not know: the dataclass decides


def check_field_types(name: str, config_cls, overrides: dict[str, Any]) -> None:
    """Refuse an override whose value does not fit the Config field's annotation, naming
    `model.<field>`, the expected type and the value found (before any worker builds it)."""
    hints = typing.get_type_hints(config_cls)
    for key, value in overrides.items():
        tp = hints.get(key)
        if tp is not None and not _matches(value, tp):
            raise ArchConfigError(
                f"model.{key}: expected {_type_name(tp)}, found {value!r} (architecture {name!r})"
            )


def make_config(name: str, flavor: str = "debug", overrides: dict[str, Any] | None = None):
    """The flavor's Config with `overrides` applied; unknown fields and flavors name
    themselves, and every override is type-checked against the Config's annotations."""
    mod = load_module(name)
    if flavor not in mod.FLAVORS:
        raise ArchConfigError(
            f"model.flavor: architecture {name!r} has no flavor {flavor!r}; flavors: {', '.join(mod.FLAVORS)}"
        )
    base = mod.FLAVORS[flavor]
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(base)}
    for key, value in overrides.items():
        if key not in fields:
            raise ArchConfigError(
                f"model.{key}: {name!r} has no such config field; fields: {', '.join(fields)}"
            )
    check_field_types(name, type(base), overrides)
    cfg = dataclasses.replace(base, **overrides)
    # Configs are data: refuse anything that would not survive JSON (Tune, Optuna, MLflow).
    try:
        json.dumps(dataclasses.asdict(cfg))
    except TypeError as e:
        raise ArchConfigError(f"{name} config is not JSON-serialisable: {e}") from None
    return cfg


def build_model(
    name: str,
    task: str,
    config,
    *,
    d_in: int | None = None,
    d_out: int | None = None,
    vocab_size: int | None = None,
    head: str = "plain",
    context: int | None = None,
):
    """Backbone + task IO for `task` ("vector" or "token"); see archlab.architectures.io.

    `head` ("plain" | "residual") and `context` (the residual head's baseline window, the
    data's `data.context`) are vector-task settings; the token task refuses "residual"."""
    spec = get_spec(name)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, found {task!r}")
    if task not in spec.tasks:
        raise ValueError(
            f"architecture {name!r} supports task(s) {', '.join(spec.tasks)}, not {task!r}"
        )
    from archlab.architectures import io

    mod = load_module(name)
    if task == "vector":
        if d_in is None:
            raise ValueError("vector task needs d_in")
        return io.VectorModel(mod, config, d_in=d_in, d_out=d_out or d_in, head=head, context=context)
    if head != "plain":
        raise ValueError(f"model.head={head!r} is a vector-task head; the token task has only 'plain'")
    if vocab_size is None:
        raise ValueError("token task needs vocab_size")
    return io.TokenModel(mod, config, vocab_size=vocab_size)
