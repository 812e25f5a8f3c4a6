"""Metrics for the vector task.

`VectorMetrics` accumulates plain sums (counts, sums of cosines, of squared errors), so
a DDP caller can all-reduce `sums()` across workers and only then `finalize` them into
means: the result is the same whatever the number of workers.

`retrieval_accuracy` is the stand-in for the seed's "vec2text accuracy": a prediction
counts as right when the true next vector is its nearest neighbour (by cosine) among a
candidate set.

`prediction_self_cosine` is the collapse check: the mean cosine of a set of predictions to
their own mean. A model that predicts (nearly) one vector for every context scores ~1
(the seed-recipe transformer that learned the global mean vector scored 1.000 on the
sample); real predictors sit well below (the leaderboard's COLLAPSE_THRESHOLD flags > 0.98).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

THRESHOLDS = (0.5, 0.7, 0.85)


class VectorMetrics:
    """Accumulator over batches of predictions [N, D] and targets [N, D].

    `sums()` keys: "n", "cos_sum", "cos_sq_sum", "mse_sum" (sum over rows of the row's mean
    squared error) and "n_cos_gt_<thr>" per threshold. `finalize(sums)` gives "n", "cosine",
    "cosine_std", "mse" and "frac_cos_gt_<thr>"."""

    thresholds = THRESHOLDS

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, float] = {"n": 0.0, "cos_sum": 0.0, "cos_sq_sum": 0.0, "mse_sum": 0.0}
        for thr in self.thresholds:
            self._sums[f"n_cos_gt_{thr}"] = 0.0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"metrics: pred {list(pred.shape)} and target {list(target.shape)} differ in shape")
        d = pred.shape[-1]
        # (N, D) in fp64 so long accumulations stay exact to ~1e-12
        p = pred.detach().reshape(-1, d).double()
        t = target.detach().reshape(-1, d).double()
        cos = F.cosine_similarity(p, t, dim=-1, eps=1e-12)
        s = self._sums
        s["n"] += float(p.shape[0])
        s["cos_sum"] += float(cos.sum())
        s["cos_sq_sum"] += float((cos * cos).sum())
        s["mse_sum"] += float(((p - t) ** 2).mean(dim=-1).sum())
        for thr in self.thresholds:
            s[f"n_cos_gt_{thr}"] += float((cos > thr).sum())

    def sums(self) -> dict[str, float]:
        return dict(self._sums)

    @staticmethod
    def finalize(sums: dict[str, float]) -> dict[str, float]:
        n = float(sums["n"])
        if n <= 0:
            raise ValueError(f"metrics: finalize needs at least one prediction, found n={n}")
        mean = sums["cos_sum"] / n
        var = max(sums.get("cos_sq_sum", mean * mean * n) / n - mean * mean, 0.0)
        out = {"n": n, "cosine": mean, "cosine_std": var**0.5, "mse": sums["mse_sum"] / n}
        for thr in THRESHOLDS:
            out[f"frac_cos_gt_{thr}"] = sums[f"n_cos_gt_{thr}"] / n
        return out

    def compute(self) -> dict[str, float]:
        """Single-process shortcut for `finalize(sums())`."""
        return self.finalize(self._sums)


@torch.no_grad()
def retrieval_hits(
    pred: torch.Tensor,
    target: torch.Tensor,
    candidates: torch.Tensor | None = None,
    block: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Boolean [N]: is target i the nearest neighbour of pred i among the candidates?

    candidates None: the batch's own targets (in-batch retrieval, N candidates).
    candidates [M, D]: the distractors; the true target always competes, whether or not
    it is among them (a copy of it in `candidates` ties with it and counts as a hit).
    dtype float32 is ~2x faster for large candidate sets (the baselines' 7k x 7k)."""
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"retrieval: expected pred and target [N, D], found {list(pred.shape)} and {list(target.shape)}")
    p = F.normalize(pred.detach().to(dtype), dim=-1, eps=1e-12)
    t = F.normalize(target.detach().to(dtype), dim=-1, eps=1e-12)
    c = t if candidates is None else F.normalize(candidates.detach().to(p.device, dtype), dim=-1, eps=1e-12)
    if c.shape[-1] != p.shape[-1]:
        raise ValueError(f"retrieval: candidates have dim {c.shape[-1]}, predictions {p.shape[-1]}")
    true_sim = (p * t).sum(-1)  # (N,)
    # the same dot product computed by two routes (row sum vs matmul) differs in the last bits
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    hits = []
    for i in range(0, p.shape[0], block):
        best = (p[i : i + block] @ c.T).max(dim=1).values  # (n_block,) best candidate per row
        hits.append(true_sim[i : i + block] >= best - tol)
    return torch.cat(hits)


def retrieval_accuracy(pred: torch.Tensor, target: torch.Tensor, candidates: torch.Tensor | None = None) -> float:
    """Share of rows whose true next vector is the nearest candidate of the prediction
    (see `retrieval_hits`; default candidates = the batch's targets)."""
    if pred.shape[0] == 0:
        raise ValueError("retrieval: no predictions")
    return float(retrieval_hits(pred, target, candidates).double().mean())


@torch.no_grad()
def prediction_self_cosine(pred: torch.Tensor) -> float:
    """Mean cosine of predictions [N, D] to their own mean direction (the mean of the
    unit-normalised rows): 1.0 when every row points the same way, ~0 for unrelated rows."""
    if pred.dim() != 2 or pred.shape[0] == 0:
        raise ValueError(f"self-cosine: expected predictions [N, D] with N >= 1, found {list(pred.shape)}")
    p = F.normalize(pred.detach().double(), dim=-1, eps=1e-12)  # (N, D)
    centre = F.normalize(p.mean(dim=0), dim=-1, eps=1e-12)  # (D,)
    return float((p @ centre).mean())


@torch.no_grad()
def inference_latency(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds per prediction for `model(x)` (median over `repeats` calls, after `warmup`),
    counting one prediction per row of the batch (the seed protocol: a context -> next)."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    times.sort()
    return times[len(times) // 2] / x.shape[0]


@torch.no_grad()
def window_scores(model: torch.nn.Module, windows, task: str, batch: int = 512):
    """Per-window scores [N] (numpy float64) of `model` on windows [N, L+1(, D)]:
    vector task: the seed protocol's cosine (the context -> the last vector, higher is
    better); token task: the window's mean next-token loss (lower is better). Their mean
    is the comparison metric; kept per window they pair with baselines' scores."""
    import numpy as np

    model.eval()
    out = []
    for i in range(0, len(windows), batch):
        x = torch.as_tensor(windows[i: i + batch])
        if task == "vector":
            x = x.float()
            pred = model(x[:, :-1])[:, -1].double()
            out.append(F.cosine_similarity(pred, x[:, -1].double(), dim=-1, eps=1e-12).numpy())
        else:
            x = x.long()
            logits = model(x[:, :-1]).float()  # (B, L, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            out.append(nll.reshape(x.shape[0], -1).double().mean(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0)
