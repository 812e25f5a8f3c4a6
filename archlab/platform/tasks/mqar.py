"""Multi-query associative recall (Arora et al. 2023, Zoology): `n_pairs` key-value pairs,
then each key queried once at a random place in the rest of the sequence; the model must
output the key's value right after the query.

    seq    = k_1 v_1 .. k_n v_n | noise ... k_j v_j ... noise      (seq_len + 1 tokens)
    inputs = seq[:-1], targets = seq[1:], scored where inputs[t] is a query key
Keys come from the lower half of the data vocabulary and values from the upper half, and
the keys of one sequence are distinct (so the answer is unique). Chance: a uniform guess
over the value vocabulary; a model that only learned "some value seen before" gets
1 / n_pairs (reported as `informed_chance`).
"""

from __future__ import annotations

import numpy as np

from archlab.platform.tasks._probe import FIRST_DATA, IGNORE, NOISE, Probe, ProbeData


def _vocab_split(vocab: int) -> tuple[int, int]:
    n_data = vocab - FIRST_DATA
    return FIRST_DATA + n_data // 2, vocab  # keys [FIRST_DATA, mid), values [mid, vocab)


class MQAR(Probe):
    name = "mqar"
    kind = "token"

    @classmethod
    def generate(cls, n: int, seed: int, *, seq_len: int = 64, n_pairs: int = 4, vocab: int = 64) -> ProbeData:
        mid, top = _vocab_split(vocab)
        if mid - FIRST_DATA < n_pairs:
            raise ValueError(f"mqar: vocab={vocab} gives {mid - FIRST_DATA} keys, fewer than n_pairs={n_pairs}")
        if seq_len + 1 < 4 * n_pairs:
            raise ValueError(f"mqar: seq_len={seq_len} too short for {n_pairs} pairs and their queries "
                             f"(needs seq_len + 1 >= {4 * n_pairs})")
        params = {"seq_len": seq_len, "n_pairs": n_pairs, "vocab": vocab}
        rng = cls.rng(seed, params)
        seq = np.full((n, seq_len + 1), NOISE, dtype=np.int64)
        keys = np.argsort(rng.random((n, mid - FIRST_DATA)), axis=1)[:, :n_pairs] + FIRST_DATA  # distinct
        values = rng.integers(mid, top, size=(n, n_pairs))
        seq[:, 0: 2 * n_pairs: 2], seq[:, 1: 2 * n_pairs: 2] = keys, values
        # queries: n_pairs non-overlapping (key, value) slots among the remaining positions
        n_slots = (seq_len + 1 - 2 * n_pairs) // 2
        slots = np.sort(np.argsort(rng.random((n, n_slots)), axis=1)[:, :n_pairs], axis=1)
        order = np.argsort(rng.random((n, n_pairs)), axis=1)  # which pair each slot asks for
        rows = np.arange(n)[:, None]
        qpos = 2 * n_pairs + 2 * slots  # (n, n_pairs) query positions in seq
        seq[rows, qpos] = keys[rows, order]
        seq[rows, qpos + 1] = values[rows, order]
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[rows, qpos] = True
        return ProbeData(inputs, np.where(mask, targets, IGNORE), mask, params)

    @staticmethod
    def solve(data: ProbeData) -> np.ndarray:
        """Brute force: look the query up in the row's key-value table."""
        k = data.params["n_pairs"]
        pred = np.zeros_like(data.inputs)
        for i, row in enumerate(data.inputs):
            table = dict(zip(row[0: 2 * k: 2].tolist(), row[1: 2 * k: 2].tolist()))
            for t in np.flatnonzero(data.mask[i]):
                pred[i, t] = table[int(row[t])]
        return pred

    @staticmethod
    def chance(*, seq_len: int = 64, n_pairs: int = 4, vocab: int = 64) -> float:
        mid, top = _vocab_split(vocab)
        return 1.0 / (top - mid)

    @staticmethod
    def informed_chance(*, seq_len: int = 64, n_pairs: int = 4, vocab: int = 64) -> float:
        return 1.0 / n_pairs


PROBE = MQAR
