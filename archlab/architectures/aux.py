"""Auxiliary losses and routing statistics: the one interface between models and the trainer.

Model code is single-device (CONVENTIONS 8), so a model never adds its own auxiliary
losses to the task loss or logs anything. Instead any submodule may define:

- ``aux_losses(self) -> dict[str, tuple[Tensor, float]]``: the auxiliary losses of its
  latest forward, each as ``(unweighted scalar loss, weight)``. Weights come from the
  architecture's Config (e.g. ``lb_weight``), so they are searchable like any field.
- ``routing_stats(self) -> dict[str, float]``: statistics accumulated since the last call
  (fraction of tokens per expert, router entropy, fraction routed, ...); the call resets
  them.

The trainer calls :func:`collect_aux_losses` after every forward and adds
``sum(weight * loss)`` to the task loss; it logs each loss by name (``aux_<name>``,
unweighted, averaged over the epoch) and :func:`collect_routing_stats` once per epoch.
Losses of the same name from several layers are summed (one load-balancing term per MoE
layer, as Switch and ST-MoE do); statistics of the same name are averaged over layers,
and per-layer values are kept under ``<name>.l<i>`` as well.
"""

from __future__ import annotations

from torch import nn


def _providers(model: nn.Module, method: str) -> list[nn.Module]:
    # The walk over modules is done once per model and method; the list is cached on the
    # root module (models do not add layers after construction).
    cache = model.__dict__.setdefault("_archlab_aux_providers", {})
    if method not in cache:
        cache[method] = [m for m in model.modules() if m is not model and callable(getattr(m, method, None))]
        if callable(getattr(type(model), method, None)):
            cache[method].insert(0, model)
    return cache[method]


def has_aux_losses(model: nn.Module) -> bool:
    return bool(_providers(model, "aux_losses"))


def collect_aux_losses(model: nn.Module) -> dict[str, tuple]:
    """name -> (summed unweighted loss, weight) over every module of `model` that has
    ``aux_losses()``; {} for models without any (no cost beyond a cached empty list)."""
    out: dict[str, tuple] = {}
    for m in _providers(model, "aux_losses"):
        for name, (loss, weight) in m.aux_losses().items():
            if name in out:
                prev, w = out[name]
                if w != weight:
                    raise ValueError(f"aux loss {name!r}: layers disagree on its weight ({w} vs {weight})")
                out[name] = (prev + loss, w)
            else:
                out[name] = (loss, float(weight))
    return out


def weighted_aux_total(aux: dict[str, tuple]):
    """sum(weight * loss) over `collect_aux_losses` output, or None when there is none."""
    total = None
    for loss, weight in aux.values():
        if weight:
            total = weight * loss if total is None else total + weight * loss
    return total


def collect_routing_stats(model: nn.Module) -> dict[str, float]:
    """Per-epoch routing statistics: each name averaged over the layers that report it,
    plus ``<name>.l<i>`` per reporting layer (i counts reporting layers in module order)."""
    per_name: dict[str, list[float]] = {}
    out: dict[str, float] = {}
    for i, m in enumerate(_providers(model, "routing_stats")):
        for name, value in m.routing_stats().items():
            per_name.setdefault(name, []).append(float(value))
            out[f"{name}.l{i}"] = float(value)
    for name, values in per_name.items():
        out[name] = sum(values) / len(values)
    return out
