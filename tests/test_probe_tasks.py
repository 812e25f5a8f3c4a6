"""Probe generators: deterministic by seed, solvable from the input (a brute-force solver
gets 100%), and chance levels that a random guesser actually scores."""

from __future__ import annotations

import numpy as np
import pytest

from archlab.platform.tasks import PROBES, get_probe
from archlab.platform.tasks._probe import FIRST_DATA, IGNORE

CELLS = {
    "copy": [{"length": 8, "vocab": 10}, {"length": 64, "vocab": 32}],
    "selective_copy": [{"length": 32, "n_tokens": 4, "vocab": 10}, {"length": 128, "n_tokens": 16, "vocab": 32}],
    "mqar": [{"seq_len": 64, "n_pairs": 4, "vocab": 64}, {"seq_len": 256, "n_pairs": 16, "vocab": 256}],
    "vector_mqar": [{"seq_len": 32, "n_pairs": 4, "dim": 16}, {"seq_len": 128, "n_pairs": 16, "dim": 64}],
}


def _score(probe, pred, data):
    return probe.score(pred, data) if probe.kind == "vector" else probe.token_accuracy(pred, data)


def test_every_registered_probe_is_covered():
    assert set(PROBES) == set(CELLS)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_deterministic_by_seed(name):
    probe = get_probe(name)
    for params in CELLS[name]:
        a, b = probe.generate(50, seed=7, **params), probe.generate(50, seed=7, **params)
        c = probe.generate(50, seed=8, **params)
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.targets, b.targets)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_brute_force_solver_gets_everything_right(name):
    probe = get_probe(name)
    for params in CELLS[name]:
        data = probe.generate(200, seed=0, **params)
        assert data.mask.any(axis=1).all(), "every sequence has scored positions"
        s = _score(probe, probe.solve(data), data)
        assert s[probe.metric] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["copy", "selective_copy", "mqar"])
def test_token_targets_are_aligned_and_masked(name):
    probe = get_probe(name)
    data = probe.generate(20, seed=1, **CELLS[name][0])
    assert data.inputs.dtype == np.int64 and data.inputs.shape == data.targets.shape
    assert (data.targets[~data.mask] == IGNORE).all()
    # a target is the next input token (targets = seq[1:], inputs = seq[:-1])
    rows, cols = np.nonzero(data.mask[:, :-1])
    np.testing.assert_array_equal(data.targets[rows, cols], data.inputs[rows, cols + 1])
    assert (data.targets[data.mask] >= FIRST_DATA).all()


@pytest.mark.parametrize("name", ["copy", "selective_copy", "mqar"])
def test_random_guess_scores_the_stated_chance(name):
    probe = get_probe(name)
    params = CELLS[name][1]
    data = probe.generate(400, seed=2, **params)
    rng = np.random.default_rng(0)
    vocab = params["vocab"]
    if name == "mqar":  # guess uniformly over the value half of the vocabulary
        lo = FIRST_DATA + (vocab - FIRST_DATA) // 2
        guess = rng.integers(lo, vocab, size=data.inputs.shape)
    else:
        guess = rng.integers(FIRST_DATA, vocab, size=data.inputs.shape)
    acc = probe.token_accuracy(guess, data)["accuracy"]
    chance = probe.chance(**params)
    n = data.mask.sum()
    assert abs(acc - chance) < 4 * np.sqrt(chance * (1 - chance) / n)


def test_mqar_theory_values():
    from archlab.platform.tasks.mqar import MQAR

    # vocab 64: 62 data tokens, 31 keys, 31 values
    assert MQAR.chance(seq_len=64, n_pairs=4, vocab=64) == pytest.approx(1 / 31)
    assert MQAR.informed_chance(seq_len=64, n_pairs=4, vocab=64) == pytest.approx(1 / 4)
    data = MQAR.generate(100, seed=0, seq_len=64, n_pairs=4, vocab=64)
    assert (data.mask.sum(axis=1) == 4).all()  # each key queried once
    keys = data.inputs[:, 0:8:2]
    assert all(len(set(r)) == 4 for r in keys.tolist()), "keys of a sequence are distinct"


def test_vector_mqar_chance_and_mean_baseline():
    from archlab.platform.tasks.vector_mqar import VectorMQAR

    params = {"seq_len": 64, "n_pairs": 8, "dim": 64}
    data = VectorMQAR.generate(300, seed=3, **params)
    rng = np.random.default_rng(1)
    guess = VectorMQAR.score(rng.standard_normal(data.inputs.shape), data)
    assert abs(guess["retrieval_acc"] - VectorMQAR.chance(**params)) < 0.05
    assert abs(guess["cosine"]) < 0.05
    mean = VectorMQAR.score(VectorMQAR.mean_value_prediction(data), data)
    assert mean["cosine"] == pytest.approx(1 / np.sqrt(8), abs=0.05)


def test_bad_difficulty_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="n_pairs=40"):
        get_probe("mqar").generate(1, 0, seq_len=64, n_pairs=40, vocab=64)
    with pytest.raises(ValueError, match="n_tokens=9"):
        get_probe("selective_copy").generate(1, 0, length=8, n_tokens=9)
    with pytest.raises(KeyError, match="known"):
        get_probe("nope")
