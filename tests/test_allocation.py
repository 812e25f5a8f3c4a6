"""sweep.allocation: who decides how many search trials each architecture gets. Driven
through the search stage's real OptunaSearch (sweep.make_searcher), with results fed back
as Tune would, without training anything."""

from __future__ import annotations

from collections import Counter

import pytest

from archlab.platform.config import load_config
from archlab.platform.sweep import allocation_points, make_searcher

ARCHS = ["lstm", "gru_stack", "transformer"]


def _suggest(cfg, n: int, score) -> list[dict]:
    """`n` configs from the search stage's real searcher, the i-th completed with score(i, config)."""
    metric, _ = cfg.metric()
    searcher, out = make_searcher(cfg), []
    for i in range(n):
        out.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {metric: score(i, out[-1]), "epoch": 1})
    return out


def _run(allocation: str, n: int, score) -> tuple[Counter, list[str]]:
    cfg = load_config(None, [f"sweep.archs={ARCHS}", f"sweep.num_samples={n}",
                             f"sweep.allocation={allocation}"], smoke_test=True)
    configs = _suggest(cfg, n, lambda i, config: score(config["arch"]))
    for config in configs:  # TPE sampled each trial's own space
        assert any(k.startswith(config["arch"] + ".") for k in config), config
    order = [config["arch"] for config in configs]
    return Counter(order), order


def test_equal_allocation_gives_every_architecture_the_same_number_of_search_trials():
    # transformer scores far ahead from its first trial: TPE alone would favour it
    score = {"lstm": 0.1, "gru_stack": 0.1, "transformer": 0.9}.get
    got, order = _run("equal", 6, score)
    assert got == {"lstm": 2, "gru_stack": 2, "transformer": 2}
    assert order == ARCHS * 2  # round-robin: the split holds at any point of the search
    got, _ = _run("equal", 7, score)
    assert got == {"lstm": 3, "gru_stack": 2, "transformer": 2}


def test_tpe_allocation_fixes_only_the_first_trial_of_each_architecture():
    cfg = load_config(None, [f"sweep.archs={ARCHS}", "sweep.num_samples=6", "sweep.allocation=tpe"],
                      smoke_test=True)
    assert allocation_points(cfg) == [{"arch": a} for a in ARCHS]
    got, order = _run("tpe", 12, {"lstm": 0.1, "gru_stack": 0.1, "transformer": 0.9}.get)
    assert order[:3] == ARCHS and sum(got.values()) == 12


def test_allocation_is_validated():
    from archlab.platform.config import ConfigError

    with pytest.raises(ConfigError, match="allocation"):
        load_config(None, ["sweep.allocation=greedy"])


def test_concurrent_trials_are_capped_by_the_cores_on_a_one_node_local_ray(monkeypatch):
    """Logical CPUs (8 on 2 cores, STACK_NOTES) would give 4 one-worker trials at once,
    which on 2 cores took up to 1.48x the wall time of 2 (benchmarks/trial_overhead.py); on a
    one-node local Ray the cores cap the count, on a cluster the CPUs decide."""
    import ray

    from archlab.platform import sweep

    from archlab.platform import runtime

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 2)

    def count(local: bool, *sets: str) -> int:
        monkeypatch.setattr(runtime, "one_local_node", lambda: local)
        return sweep.max_concurrent_trials(load_config(None, ["sweep.num_samples=10", *sets]))

    assert count(False, "train.num_workers=1") == 4  # 8 CPUs // (1 worker + 1 for Ray Data)
    assert count(True, "train.num_workers=1") == 2  # 2 cores, one worker each
    assert count(True, "train.num_workers=2") == 1
    assert count(False, "train.num_workers=2") == 2
    assert count(True, "sweep.max_concurrent=3") == 3  # an explicit count is kept


def test_random_sampler_and_no_early_stopping_are_the_search_baseline():
    """sweep.sampler=random draws uniformly inside the same spaces and allocation;
    sweep.early_stopping=none runs every trial its whole budget (Tune's FIFOScheduler)."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from archlab.platform.sweep import asha_scheduler

    cfg = load_config(None, [f"sweep.archs={ARCHS}", "sweep.num_samples=6", "sweep.sampler=random",
                             "sweep.early_stopping=none"], smoke_test=True)
    searcher = make_searcher(cfg)
    assert isinstance(searcher._sampler, optuna.samplers.RandomSampler)
    assert type(asha_scheduler(cfg)) is FIFOScheduler
    assert isinstance(asha_scheduler(load_config(None, [], smoke_test=True)), ASHAScheduler)
    drawn = [config["arch"] for config in _suggest(cfg, 6, lambda i, config: 0.5)]
    assert drawn == ARCHS * 2  # the equal allocation holds for random draws too
    with pytest.raises(Exception, match="sampler"):
        load_config(None, ["sweep.sampler=grid"])


def test_tpe_draws_its_startup_trials_as_random_search_does():
    """TPE's first sweep.tpe_startup_trials trials are the uniform draws RandomSampler
    makes with the same seed: below that count TPE is random search (BENCHMARKS.md)."""
    def draws(*sets: str) -> list[dict]:
        cfg = load_config(None, ["sweep.archs=[lstm]", "sweep.num_samples=6", *sets], smoke_test=True)
        return _suggest(cfg, 6, lambda i, config: 0.1 * i)

    random = draws("sweep.sampler=random")
    assert draws() == random  # 6 trials < the default 10 startup trials
    assert draws("sweep.tpe_startup_trials=2")[:2] == random[:2]
    assert draws("sweep.tpe_startup_trials=2")[2:] != random[2:]  # TPE models from trial 3 on
