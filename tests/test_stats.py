"""archlab.platform.stats against hand-computed values, and per-window baseline scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archlab.platform import stats


def test_t_interval_matches_hand_computation():
    # x = 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3) = 1.290994; t_{0.975, 3} = 3.182446
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5.0 / 3.0) / 2.0
    assert iv.mean == pytest.approx(2.5)
    assert iv.std == pytest.approx(1.2909944487358056)
    assert iv.n == 4
    assert iv.lo == pytest.approx(2.5 - half, rel=1e-9)
    assert iv.hi == pytest.approx(2.5 + half, rel=1e-9)
    assert iv.lo < iv.mean < iv.hi


def test_t_interval_single_value_has_no_interval():
    iv = stats.t_interval([0.7])
    assert iv.mean == 0.7 and iv.n == 1 and math.isnan(iv.lo) and math.isnan(iv.hi)


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        stats.t_interval([1.0, float("nan")])


def test_holm_against_hand_computation():
    # sorted p: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04); back in input order
    adj = stats.holm([0.04, 0.01, 0.02])
    assert adj == pytest.approx([0.04, 0.03, 0.04])
    # sorted 0.3 (x3 = 0.9), 0.5 (x2 = 1.0), 0.6 (x1 = 0.6, raised to 1.0: monotone)
    assert stats.holm([0.5, 0.6, 0.3]) == pytest.approx([1.0, 1.0, 0.9])


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_never_below_raw(seed):
    p = np.random.default_rng(seed).uniform(0, 1, size=7)
    adj = stats.holm(p)
    assert all(a >= r - 1e-15 for a, r in zip(adj, p))
    assert all(a <= 1.0 for a in adj)


def test_holm_ignores_nan():
    adj = stats.holm([0.01, float("nan"), 0.02])
    assert adj[0] == pytest.approx(0.02) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def test_identical_draws_are_a_tie():
    a = [0.41, 0.43, 0.40, 0.42]
    c = stats.paired(a, list(a))
    assert c.p == 1.0 and c.diff.mean == 0.0
    assert stats.verdicts({"x": c})["x"]["verdict"] == stats.TIE


def test_clear_gap_is_better_and_reverse_is_worse():
    # means 0.80 vs 0.78, sd 0.005, n 5, paired by seed
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(5)
    noise = (noise - noise.mean()) / noise.std(ddof=1) * 0.005
    a = 0.80 + noise
    b = 0.78 + np.roll(noise, 2)
    v = stats.verdicts({"a": stats.paired(a, b), "b": stats.paired(b, a)})
    assert v["a"]["verdict"] == stats.BETTER and v["b"]["verdict"] == stats.WORSE
    assert v["a"]["p_adj"] >= v["a"]["p"]
    assert v["a"]["lo"] > 0
    # for a loss (lower is better) the same numbers read the other way round
    assert stats.verdict(stats.paired(a, b), v["a"]["p_adj"], mode="min") == stats.WORSE


def test_paired_p_matches_scipy_ttest_rel():
    from scipy import stats as sps

    a = np.array([0.51, 0.55, 0.49, 0.53, 0.52])
    b = np.array([0.50, 0.52, 0.50, 0.50, 0.49])
    c = stats.paired(a, b)
    assert c.p == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert c.diff.mean == pytest.approx(float((a - b).mean()))


def test_paired_needs_equal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired([1.0, 2.0], [1.0])


def test_baseline_window_scores_average_to_evaluate_baselines(sample_dataset):
    from archlab.platform.baselines import baseline_window_scores, evaluate_baselines, read_docs

    train = read_docs(next((sample_dataset / "train").glob("*.parquet")), column="vectors")[:40]
    valid = read_docs(next((sample_dataset / "valid").glob("*.parquet")), column="vectors")[:20]
    agg = evaluate_baselines(train, valid, context=5, seed=3, retrieval=False)
    per = baseline_window_scores(train, valid, context=5, seed=3)
    for name, scores in per.items():
        assert len(scores) == agg[name]["n_windows"]
        assert scores.mean() == pytest.approx(agg[name]["cosine"], abs=1e-6), name


def test_window_comparison_picks_the_best_baseline_and_pairs_by_window():
    rng = np.random.default_rng(0)
    base = {"linear_average": 0.5 + 0.1 * rng.standard_normal(400), "random": rng.standard_normal(400) * 0.05}
    model = base["linear_average"] + 0.01 + 0.001 * rng.standard_normal(400)
    out = stats.window_comparison(model, base, mode="max")
    assert out["best_baseline"] == "linear_average"
    d = out["diff_vs_best_baseline"]
    assert d == pytest.approx(0.01, abs=5e-4)
    assert out["diff_vs_best_baseline_lo"] < d < out["diff_vs_best_baseline_hi"]
    # pairing removes the window-to-window spread (sd 0.1): the interval is ~1e-4 wide
    assert out["diff_vs_best_baseline_hi"] - out["diff_vs_best_baseline_lo"] < 1e-3
    assert out["diff_vs_best_baseline_p"] < 1e-10 and out["diff_vs_best_baseline_n"] == 400
    assert set(stats.WINDOW_METRICS) < set(out)
    # losses: the lowest mean is the best baseline
    assert stats.best_baseline({"unigram": 5.0, "uniform": 8.0}, mode="min") == "unigram"
    assert stats.best_baseline({"b": 1.0, "a": 1.0}) == "a"  # ties by name
    with pytest.raises(ValueError, match="equal lengths"):
        stats.window_comparison(model[:10], base)
