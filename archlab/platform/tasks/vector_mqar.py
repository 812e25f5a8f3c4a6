"""Vector MQAR: associative recall for the next-vector task. Random unit key and value
vectors (dim D, fresh per sequence), n_pairs of them as k_1 v_1 .. k_n v_n, then each key
queried once at a random place among random unit "noise" vectors; the model must output
the key's value vector right after the query.

Scored at the query positions by cosine to the true value and by nearest-value retrieval
among the sequence's n_pairs values. Chance: retrieval 1 / n_pairs; cosine 0 (a random
unit guess; predicting the mean of the values scores about 1/sqrt(n_pairs), reported as
`mean_value_cosine` by the baseline below).
"""

from __future__ import annotations

import numpy as np

from archlab.platform.tasks._probe import Probe, ProbeData


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class VectorMQAR(Probe):
    name = "vector_mqar"
    kind = "vector"
    metric = "retrieval_acc"

    @classmethod
    def generate(cls, n: int, seed: int, *, seq_len: int = 32, n_pairs: int = 4, dim: int = 32) -> ProbeData:
        if seq_len + 1 < 4 * n_pairs:
            raise ValueError(f"vector_mqar: seq_len={seq_len} too short for {n_pairs} pairs and queries "
                             f"(needs seq_len + 1 >= {4 * n_pairs})")
        params = {"seq_len": seq_len, "n_pairs": n_pairs, "dim": dim}
        rng = cls.rng(seed, params)
        seq = _unit(rng.standard_normal((n, seq_len + 1, dim)))  # noise everywhere first
        keys = _unit(rng.standard_normal((n, n_pairs, dim)))
        values = _unit(rng.standard_normal((n, n_pairs, dim)))
        seq[:, 0: 2 * n_pairs: 2], seq[:, 1: 2 * n_pairs: 2] = keys, values
        n_slots = (seq_len + 1 - 2 * n_pairs) // 2
        slots = np.sort(np.argsort(rng.random((n, n_slots)), axis=1)[:, :n_pairs], axis=1)
        order = np.argsort(rng.random((n, n_pairs)), axis=1)
        rows = np.arange(n)[:, None]
        qpos = 2 * n_pairs + 2 * slots
        seq[rows, qpos] = keys[rows, order]
        seq[rows, qpos + 1] = values[rows, order]
        inputs, targets = seq[:, :-1], seq[:, 1:]
        mask = np.zeros(inputs.shape[:2], dtype=bool)
        mask[rows, qpos] = True
        return ProbeData(inputs, np.where(mask[..., None], targets, 0.0).astype(np.float32), mask, params)

    @staticmethod
    def score(pred: np.ndarray, data: ProbeData) -> dict[str, float]:
        """Cosine to the true value and nearest-value retrieval at the query positions."""
        k = data.params["n_pairs"]
        values = data.inputs[:, 1: 2 * k: 2]  # (n, k, D) the sequence's own values
        p = _unit(np.asarray(pred, dtype=np.float64)[data.mask].reshape(-1, pred.shape[-1]))
        t = data.targets[data.mask]
        row = np.nonzero(data.mask)[0]
        cos = (p * t).sum(-1)
        sims = np.einsum("qd,qkd->qk", p, values[row])
        hit = sims.max(axis=1) <= cos + 1e-6  # the true value is (one of) the most similar
        return {"cosine": float(cos.mean()), "retrieval_acc": float(hit.mean())}

    @staticmethod
    def solve(data: ProbeData) -> np.ndarray:
        """Brute force: the value of the key most similar to the query."""
        k = data.params["n_pairs"]
        pred = np.zeros(data.inputs.shape, dtype=np.float32)
        keys, values = data.inputs[:, 0: 2 * k: 2], data.inputs[:, 1: 2 * k: 2]
        for i, t in zip(*np.nonzero(data.mask)):
            pred[i, t] = values[i, int(np.argmax(keys[i] @ data.inputs[i, t]))]
        return pred

    @staticmethod
    def mean_value_prediction(data: ProbeData) -> np.ndarray:
        """A context-aware baseline: the mean of the sequence's values at every position."""
        k = data.params["n_pairs"]
        mean = data.inputs[:, 1: 2 * k: 2].mean(axis=1, keepdims=True)
        return np.broadcast_to(mean, data.inputs.shape).copy()

    @staticmethod
    def chance(*, seq_len: int = 32, n_pairs: int = 4, dim: int = 32) -> float:
        return 1.0 / n_pairs


PROBE = VectorMQAR
