"""Tasks as objects (DESIGN.md round 2). So far: the synthetic capability probes.

Each probe is one module here that defines a `Probe` subclass (see `_probe.py`): a
deterministic generator (the generator is the spec: no data files), a brute-force solver
that proves the answer is recoverable from the input, the chance level, and the metric.
Adding a probe = its module + one line in `PROBES` below.
"""

from __future__ import annotations

import importlib

PROBES: dict[str, str] = {
    "copy": "archlab.platform.tasks.copy",
    "selective_copy": "archlab.platform.tasks.selective_copy",
    "mqar": "archlab.platform.tasks.mqar",
    "vector_mqar": "archlab.platform.tasks.vector_mqar",
}


def get_probe(name: str):
    """The probe class registered as `name`; unknown names list the known ones."""
    if name not in PROBES:
        raise KeyError(f"unknown probe task {name!r}; known: {', '.join(sorted(PROBES))}")
    return importlib.import_module(PROBES[name]).PROBE
