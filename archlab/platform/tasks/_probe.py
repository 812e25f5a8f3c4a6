"""What every probe task shares: the generated data, scoring at the marked positions.

Layout of generated data (aligned for a causal model: output t predicts targets[t]):
- token probes: inputs [N, T] int64, targets [N, T] int64, mask [N, T] bool (the positions
  scored; elsewhere targets hold IGNORE so cross-entropy skips them);
- vector probes: inputs [N, T, D] float32, targets [N, T, D] float32 (unit rows at the
  marked positions, zeros elsewhere), mask [N, T] bool.
Token ids 0 and 1 are reserved: 0 is the noise/blank token, 1 the separator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
NOISE, SEP, FIRST_DATA = 0, 1, 2


@dataclass
class ProbeData:
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    params: dict[str, Any]

    def __len__(self) -> int:
        return len(self.inputs)


class Probe:
    """Base class. Subclasses set `name`, `kind` ("token" | "vector") and implement
    `generate(n, seed, **params)`, `solve(data) -> predictions`, `chance(**params)`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    mode: ClassVar[str] = "max"

    @classmethod
    def rng(cls, seed: int, params: dict[str, Any]) -> np.random.Generator:
        # one stream per (probe, seed, difficulty): changing one cell never moves another
        key = [seed, *(hash_param(v) for _, v in sorted(params.items()))]
        return np.random.default_rng([abs(hash_param(cls.name)), *key])

    @staticmethod
    def token_accuracy(pred_ids: np.ndarray, data: ProbeData) -> dict[str, float]:
        """Exact-match accuracy over the marked positions, and the fraction of sequences
        with every marked position right."""
        right = (np.asarray(pred_ids) == data.targets) & data.mask
        per_seq = right.sum(axis=1) == data.mask.sum(axis=1)
        return {"accuracy": float(right.sum() / max(data.mask.sum(), 1)), "seq_accuracy": float(per_seq.mean())}


def hash_param(v: Any) -> int:
    """A stable (process-independent) integer for a parameter value; Python's hash() of a
    str changes with PYTHONHASHSEED, which would break determinism across runs."""
    import zlib

    return zlib.crc32(repr(v).encode())
