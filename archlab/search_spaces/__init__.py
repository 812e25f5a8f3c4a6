"""Per-architecture search spaces, as data.

Each `search_spaces/<arch>.py` exports:
- `SPACE`: the seeds' recommended ranges, used by full sweeps;
- `SMOKE`: a small space over the `debug` flavor for smoke sweeps (seconds per trial).
Keys are dotted config paths: `model.<Config field>`, `model.head` (a model setting of
every vector architecture, not a Config field: see MODEL_SETTINGS) or
`train.<TrainConfig field>`.
Values are one of:
    {"choices": [...]}                       categorical
    {"low": x, "high": y, "log": bool}       float (log-uniform when log)
    {"low": i, "high": j, "int": True}       integer
Data, not code: a space round-trips through JSON and is logged with the sweep.
"""

from __future__ import annotations

import importlib
from typing import Any


# `model.<name>` keys that are settings of the platform's ModelConfig, not architecture
# Config fields: the sweep puts them in cfg.model.<name>, not in cfg.model.params
MODEL_SETTINGS = ("model.head",)
# entries that only mean something for the vector task: a token sweep drops them from an
# architecture's own space (and refuses them in a user's override)
VECTOR_ONLY = ("model.head",)


def load_space(
    arch: str,
    smoke: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
    task: str | None = None,
) -> dict[str, dict[str, Any]]:
    """The arch's space (SMOKE when smoke), with entries replaced by `overrides`
    (config `sweep.space_overrides.<arch>`). task "token" leaves out VECTOR_ONLY entries."""
    from archlab.architectures.registry import get_spec

    get_spec(arch)  # unknown names list the known ones
    mod = importlib.import_module(f"archlab.search_spaces.{arch}")
    own = dict(mod.SMOKE if smoke else mod.SPACE)
    if task == "token":
        for key in VECTOR_ONLY:
            own.pop(key, None)
            if key in (overrides or {}):
                raise ValueError(
                    f"sweep.space_overrides.{arch}.{key}: a vector-task setting, but train.task='token'"
                )
    space = {**own, **(overrides or {})}
    for key, spec in space.items():
        if not key.startswith(("model.", "train.")):
            raise ValueError(f"search_spaces/{arch}.py: key {key!r} must start with 'model.' or 'train.'")
        if not ("choices" in spec or ("low" in spec and "high" in spec)):
            raise ValueError(f"search_spaces/{arch}.py: {key}: expected 'choices' or 'low'/'high', found {spec}")
    return space


def suggest(trial, arch: str, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sample `space` on an Optuna trial. Parameter names are prefixed with the arch so
    the conditional (define-by-run) space keeps one distribution per name."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        name = f"{arch}.{key}"
        if "choices" in spec:
            out[key] = trial.suggest_categorical(name, list(spec["choices"]))
        elif spec.get("int"):
            out[key] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            out[key] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return out
