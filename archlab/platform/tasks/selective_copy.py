"""Selective copying (Gu & Dao 2023, the Mamba paper): `n_tokens` data tokens scattered at
random positions among noise tokens in a region of `length`, then the separator; the model
must reproduce the data tokens in order.

    seq    = region (length, noise 0 except n data tokens)  SEP  d_1 .. d_n
    inputs = seq[:-1], targets = seq[1:], scored at t = length .. length+n-1
"""

from __future__ import annotations

import numpy as np

from archlab.platform.tasks._probe import FIRST_DATA, IGNORE, NOISE, SEP, Probe, ProbeData


class SelectiveCopy(Probe):
    name = "selective_copy"
    kind = "token"

    @classmethod
    def generate(cls, n: int, seed: int, *, length: int = 64, n_tokens: int = 8, vocab: int = 16) -> ProbeData:
        if not 1 <= n_tokens <= length or vocab <= FIRST_DATA:
            raise ValueError(f"selective_copy: need 1 <= n_tokens <= length and vocab > {FIRST_DATA}, "
                             f"found n_tokens={n_tokens}, length={length}, vocab={vocab}")
        params = {"length": length, "n_tokens": n_tokens, "vocab": vocab}
        rng = cls.rng(seed, params)
        data = rng.integers(FIRST_DATA, vocab, size=(n, n_tokens))
        region = np.full((n, length), NOISE)
        # n_tokens distinct positions per row, in increasing order (order of appearance)
        pos = np.sort(np.argsort(rng.random((n, length)), axis=1)[:, :n_tokens], axis=1)
        np.put_along_axis(region, pos, data, axis=1)
        seq = np.concatenate([region, np.full((n, 1), SEP), data], axis=1)
        inputs, targets = seq[:, :-1].astype(np.int64), seq[:, 1:].astype(np.int64)
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, length:] = True
        return ProbeData(inputs, np.where(mask, targets, IGNORE), mask, params)

    @staticmethod
    def solve(data: ProbeData) -> np.ndarray:
        """Brute force: the non-noise tokens of the region, in order."""
        L, k = data.params["length"], data.params["n_tokens"]
        pred = np.zeros_like(data.inputs)
        for i, row in enumerate(data.inputs):
            found = row[:L][row[:L] != NOISE]
            pred[i, L: L + k] = found
        return pred

    @staticmethod
    def chance(*, length: int = 64, n_tokens: int = 8, vocab: int = 16) -> float:
        return 1.0 / (vocab - FIRST_DATA)


PROBE = SelectiveCopy
