"""Copying (Jelassi et al. 2024, "Repeat After Me"): a random string of `length` data
tokens, the separator, then the same string again; the copy is scored.

    seq    = s_1 .. s_L  SEP  s_1 .. s_L          (2L + 1 tokens)
    inputs = seq[:-1], targets = seq[1:], scored at t = L .. 2L-1 (target s_{t-L+1})
"""

from __future__ import annotations

import numpy as np

from archlab.platform.tasks._probe import FIRST_DATA, IGNORE, SEP, Probe, ProbeData


class Copy(Probe):
    name = "copy"
    kind = "token"

    @classmethod
    def generate(cls, n: int, seed: int, *, length: int = 32, vocab: int = 16) -> ProbeData:
        if vocab <= FIRST_DATA or length < 1:
            raise ValueError(f"copy: need vocab > {FIRST_DATA} and length >= 1, found vocab={vocab}, length={length}")
        rng = cls.rng(seed, {"length": length, "vocab": vocab})
        s = rng.integers(FIRST_DATA, vocab, size=(n, length))
        seq = np.concatenate([s, np.full((n, 1), SEP), s], axis=1)  # (n, 2L+1)
        inputs, targets = seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, length:] = True
        targets = np.where(mask, targets, IGNORE)
        return ProbeData(inputs, targets, mask, {"length": length, "vocab": vocab})

    @staticmethod
    def solve(data: ProbeData) -> np.ndarray:
        """Brute force: the token L positions back is the one to copy."""
        L = data.params["length"]
        pred = np.zeros_like(data.inputs)
        pred[:, L:] = data.inputs[:, : data.inputs.shape[1] - L]
        return pred

    @staticmethod
    def chance(*, length: int = 32, vocab: int = 16) -> float:
        return 1.0 / (vocab - FIRST_DATA)


PROBE = Copy
