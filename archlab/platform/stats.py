"""Statistics for comparisons: confidence intervals, paired tests, Holm's adjustment, verdicts.

One module (DESIGN.md, round 2) that the leaderboard, the registry's champion rule,
`archlab evaluate` and the report all read, so they can never disagree on a verdict.

Two kinds of pairing are used on the platform:
- by seed: confirm runs of two architectures trained with the same seed (init + data
  order) are paired; n is the number of seeds (small: 2-5), so Student t is used;
- by window: the per-window scores of a model and of a baseline on the identical
  validation windows are paired; n is the number of windows (thousands), which gives an
  interval even for a single run.

Conventions: `mode="max"` when higher scores are better (cosine), `"min"` for losses. A
difference is always reported as a - b in score units; `better` means a beats b.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """Mean with a two-sided Student-t confidence interval; lo/hi are NaN when n < 2."""

    mean: float
    std: float  # sample standard deviation (ddof=1); 0.0 when n < 2
    n: int
    lo: float
    hi: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _as_array(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).reshape(-1)
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"statistics: non-finite value among {x.size} values")
    return x


def t_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean and `level` Student-t interval of `values` (mean +- t_{n-1} * sd / sqrt(n))."""
    from scipy import stats

    x = _as_array(values)
    n = int(x.size)
    if n == 0:
        raise ValueError("t_interval: no values")
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, 0.0, n, math.nan, math.nan, level)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half, level)


@dataclass(frozen=True)
class Comparison:
    """a - b, paired: the interval of the mean difference and the two-sided p-value of a
    paired t-test (H0: mean difference 0)."""

    diff: Interval
    p: float

    def to_dict(self) -> dict[str, float]:
        return {"diff": self.diff.mean, "lo": self.diff.lo, "hi": self.diff.hi, "n": self.diff.n,
                "std": self.diff.std, "p": self.p}


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Paired comparison of `a` and `b` (same length; element i of each is one seed or one
    window). With n < 2 no test is possible: p is NaN. When every difference is the same
    value the t statistic is undefined: p = 1 if that value is 0 (identical draws), else 0."""
    from scipy import stats

    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"paired: a has {x.size} values and b {y.size}; pairs need equal lengths")
    d = x - y
    iv = t_interval(d, level)
    if d.size < 2:
        return Comparison(iv, math.nan)
    if np.allclose(d, d[0], rtol=0.0, atol=1e-15):
        return Comparison(iv, 1.0 if abs(d[0]) <= 1e-15 else 0.0)
    p = float(stats.ttest_1samp(d, 0.0).pvalue)
    return Comparison(iv, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order. NaN stays NaN and is not
    counted among the m hypotheses. Adjusted p >= raw p, monotone in raw p, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    idx = [i for i in range(p.size) if not math.isnan(p[i])]
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


BETTER, TIE, WORSE = "better", "tie", "worse"


def verdict(comparison: Comparison, p_adjusted: float, mode: str = "max", alpha: float = 0.05) -> str:
    """`better` / `worse` when the adjusted p is below alpha (direction from the sign of the
    mean difference and `mode`), else `tie`. No test possible (NaN) is a tie."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', found {mode!r}")
    if math.isnan(p_adjusted) or p_adjusted >= alpha or comparison.diff.mean == 0:
        return TIE
    a_higher = comparison.diff.mean > 0
    return BETTER if a_higher == (mode == "max") else WORSE


def verdicts(
    comparisons: dict[str, Comparison], mode: str = "max", alpha: float = 0.05
) -> dict[str, dict[str, float | str]]:
    """Holm-adjust one family of comparisons (e.g. every architecture vs the best baseline)
    and give each its verdict: name -> {"verdict", "p", "p_adj", "diff", "lo", "hi", "n"}."""
    names = sorted(comparisons)
    adj = holm([comparisons[n].p for n in names])
    out: dict[str, dict[str, float | str]] = {}
    for name, p_adj in zip(names, adj):
        c = comparisons[name]
        out[name] = {**c.to_dict(), "p_adj": p_adj, "verdict": verdict(c, p_adj, mode, alpha)}
    return out


# Window-level comparison against the best baseline, one per run. The driver calls
# `window_comparison` with the run's per-window scores (metrics.window_scores) and the
# baselines' per-window scores on the identical windows (baselines.baseline_window_scores)
# and logs the float entries as run metrics, "best_baseline" as a tag; the leaderboard
# reads them back under these names.
WINDOW_METRICS = ("diff_vs_best_baseline", "diff_vs_best_baseline_lo", "diff_vs_best_baseline_hi",
                  "diff_vs_best_baseline_p", "diff_vs_best_baseline_n")


def best_baseline(baseline_scores: dict[str, Sequence[float]] | dict[str, float], mode: str = "max") -> str:
    """Name of the best baseline by mean score (`mode`), ties broken by name so every
    caller picks the same one. Values may be per-window arrays or means."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', found {mode!r}")
    if not baseline_scores:
        raise ValueError("best_baseline: no baselines")
    means = {k: float(np.mean(_as_array(np.atleast_1d(v)))) for k, v in baseline_scores.items()}
    sign = -1.0 if mode == "max" else 1.0
    return min(sorted(means), key=lambda k: sign * means[k])


def window_comparison(
    model_scores: Sequence[float],
    baseline_scores: dict[str, Sequence[float]] | Sequence[float],
    mode: str = "max",
    level: float = 0.95,
) -> dict[str, float | str]:
    """Paired per-window comparison of one model with the best baseline (or with the one
    baseline given as an array) on the identical windows: the mean score difference
    model - baseline, its `level` t-interval, the two-sided paired-test p and n, under
    the names of WINDOW_METRICS, plus "best_baseline" (the name; "" for an array)."""
    if isinstance(baseline_scores, dict):
        name = best_baseline(baseline_scores, mode)
        base = baseline_scores[name]
    else:
        name, base = "", baseline_scores
    c = paired(model_scores, base, level)
    lo_, hi_, p_, n_ = WINDOW_METRICS[1:]
    return {"best_baseline": name, WINDOW_METRICS[0]: c.diff.mean, lo_: c.diff.lo, hi_: c.diff.hi,
            p_: c.p, n_: float(c.diff.n)}
