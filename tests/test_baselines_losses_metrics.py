"""Losses, metrics and baselines against independent references (numpy / plain loops),
plus the README's baseline figures on the real wikitext2-minilm384 valid split."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archlab.platform.baselines import BASELINES, evaluate_baselines, read_docs, windows
from archlab.platform.losses import LOSSES, make_loss
from archlab.platform.metrics import VectorMetrics, inference_latency, retrieval_accuracy


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- losses


def test_loss_names_and_unknown_name():
    assert LOSSES == ("mse", "cosine", "infonce", "hybrid")
    with pytest.raises(ValueError, match="known losses: mse, cosine, infonce, hybrid"):
        make_loss("l1")
    with pytest.raises(ValueError, match="unexpected \\['temperature'\\]"):
        make_loss("mse", temperature=0.1)
    with pytest.raises(ValueError, match="weights keys"):
        make_loss("hybrid", weights={"mse": 1.0, "l2": 1.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_loss("infonce", temperature=0.0)


def test_mse_and_cosine_match_numpy():
    p, t = _unit(7, 5, seed=1), _unit(7, 5, seed=2)
    pn, tn = p.numpy(), t.numpy()
    assert make_loss()(p, t).item() == pytest.approx(((pn - tn) ** 2).mean(), rel=1e-6)
    cos = (pn * tn).sum(1) / np.linalg.norm(pn, axis=1) / np.linalg.norm(tn, axis=1)
    assert make_loss("cosine")(p, t).item() == pytest.approx((1 - cos).mean(), rel=1e-6)
    # leading dims flatten: [B, T, D] equals its [B*T, D] view
    assert make_loss("cosine")(p.view(7, 1, 5), t.view(7, 1, 5)).item() == pytest.approx((1 - cos).mean(), rel=1e-6)


def test_infonce_matches_explicit_log_softmax():
    p, t = _unit(6, 4, seed=3), _unit(6, 4, seed=4)
    tau = 0.2
    logits = (p.numpy() @ t.numpy().T) / tau
    ref = np.mean([-(logits[i, i] - math.log(np.exp(logits[i]).sum())) for i in range(6)])
    assert make_loss("infonce", temperature=tau)(p, t).item() == pytest.approx(ref, rel=1e-5)
    # perfect predictions of distinct targets at low temperature: loss near zero
    assert make_loss("infonce", temperature=0.01)(t, t).item() < 1e-3


def test_hybrid_is_the_weighted_sum_and_has_gradients():
    p = _unit(8, 6, seed=5).requires_grad_(True)
    t = _unit(8, 6, seed=6)
    w = {"mse": 2.0, "cosine": 0.5, "infonce": 0.25}
    got = make_loss("hybrid", weights=w, temperature=0.1)(p, t)
    ref = 2.0 * make_loss("mse")(p, t) + 0.5 * make_loss("cosine")(p, t) + 0.25 * make_loss("infonce", temperature=0.1)(p, t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-9)
    got.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics


def test_vector_metrics_match_numpy_and_merge_like_allreduce():
    p, t = _unit(50, 8, seed=7), _unit(50, 8, seed=8)
    alpha = torch.linspace(0.0, 4.0, 50, dtype=torch.float64).unsqueeze(1)
    p = torch.nn.functional.normalize(p + alpha * t, dim=-1)  # spread cosines across the thresholds
    whole = VectorMetrics()
    whole.update(p, t)
    # two "workers" each see half; summing their sums must give the same result
    a, b = VectorMetrics(), VectorMetrics()
    a.update(p[:20], t[:20])
    b.update(p[20:], t[20:])
    merged = {k: a.sums()[k] + b.sums()[k] for k in a.sums()}
    got, got_merged = whole.compute(), VectorMetrics.finalize(merged)
    pn, tn = p.numpy(), t.numpy()
    cos = (pn * tn).sum(1)
    assert got["n"] == 50
    assert got["cosine"] == pytest.approx(cos.mean(), abs=1e-12)
    assert got["cosine_std"] == pytest.approx(cos.std(), abs=1e-9)
    assert got["mse"] == pytest.approx(((pn - tn) ** 2).mean(), abs=1e-12)
    for thr in (0.5, 0.7, 0.85):
        assert got[f"frac_cos_gt_{thr}"] == pytest.approx((cos > thr).mean(), abs=1e-12)
    assert 0 < got["frac_cos_gt_0.85"] < got["frac_cos_gt_0.5"] < 1  # the data exercise the thresholds
    for k in got:
        assert got_merged[k] == pytest.approx(got[k], abs=1e-12), k
    with pytest.raises(ValueError, match="n=0"):
        VectorMetrics().compute()


def test_retrieval_accuracy():
    t = torch.eye(4, dtype=torch.float64)  # 4 orthogonal targets
    p = t.clone()
    p[3] = t[2] + 0.1 * t[3]  # row 3 points at target 2 instead of its own
    assert retrieval_accuracy(p, t) == pytest.approx(0.75)
    # with explicit distractors: a candidate closer than the true target makes a miss
    distract = torch.tensor([[1.0, 0.3, 0.0, 0.0]], dtype=torch.float64)
    p2 = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    t2 = t[:2]
    # row 0: cos(p, e0)=0.894 < cos(p, distractor)=0.985 -> miss; row 1: e1 (1.0) beats it (0.287) -> hit
    assert retrieval_accuracy(p2, t2, distract) == pytest.approx(0.5)
    # the true target competes even when absent from the candidates; a copy of it ties and counts
    assert retrieval_accuracy(p2[1:], t2[1:], t2[1:]) == 1.0


def test_inference_latency_is_per_prediction():
    model = torch.nn.Linear(4, 4)
    lat = inference_latency(model, torch.randn(16, 4), repeats=3)
    assert 0 < lat < 0.1 and model.training  # restored to train mode


# ---------------------------------------------------------------- baselines


def _docs(seed=0, n_docs=6, d=8):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_docs):
        n = int(rng.integers(3, 15))
        x = rng.standard_normal((n, d)).astype(np.float32)
        if i:  # a drifting walk so averages beat random
            x = np.cumsum(x, axis=0)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def _loop_reference(train, valid, c):
    """Window by window, in plain Python: the README's definitions."""
    norm = lambda v: v / np.linalg.norm(v)  # noqa: E731
    mean_vec = norm(np.concatenate(train).mean(0))
    keys = [(d[i], d[i + 1]) for d in train for i in range(len(d) - 1)]
    names = ("linear_average", "ewma", "persistence", "mean_vector", "nearest_neighbour")
    cos = {k: [] for k in names}
    hit = {k: [] for k in names}
    cands = [norm(d[i]) for d in valid for i in range(c, len(d))]  # every window target
    for d in valid:
        for i in range(len(d) - c):
            ctx, tgt = d[i : i + c], d[i + c]
            preds = {
                "linear_average": ctx.mean(0),
                "ewma": sum(0.5**k * ctx[c - 1 - k] for k in range(c)),
                "persistence": ctx[-1],
                "mean_vector": mean_vec,
                "nearest_neighbour": max(keys, key=lambda kv: float(norm(kv[0]) @ norm(ctx[-1])))[1],
            }
            for k, v in preds.items():
                cos[k].append(float(norm(v) @ norm(tgt)))
                best = max(float(norm(v) @ cand) for cand in cands)
                hit[k].append(cos[k][-1] >= best - 1e-5)
    n = len(cos["ewma"])
    return {k: float(np.mean(v)) for k, v in cos.items()}, {k: float(np.mean(v)) for k, v in hit.items()}, n


def test_baselines_match_a_plain_loop_reference():
    train, valid = _docs(1), _docs(2)
    c = 3
    got = evaluate_baselines(train, valid, context=c, seed=0)
    ref, ref_hits, n = _loop_reference(train, valid, c)
    assert set(got) == set(BASELINES)
    for k, v in ref.items():
        assert got[k]["cosine"] == pytest.approx(v, abs=1e-5), k
        assert got[k]["retrieval_acc"] == pytest.approx(ref_hits[k], abs=1e-12), k
        assert got[k]["n_windows"] == n == sum(max(len(d) - c, 0) for d in valid)
    assert abs(got["random"]["cosine"]) < 0.2
    ctx, tgt = windows(valid, c)
    assert ctx.shape == (n, c, 8) and tgt.shape == (n, 8)
    assert 0.0 < got["linear_average"]["retrieval_acc"] < 1.0  # the data exercise it


def test_baselines_refuse_bad_input():
    with pytest.raises(ValueError, match="context must be >= 1"):
        evaluate_baselines(_docs(1), _docs(2), context=0)
    with pytest.raises(ValueError, match="no valid document has more than context=50"):
        evaluate_baselines(_docs(1), _docs(2), context=50)


def test_readme_valid_figures(shared_data):
    """../shared/data/README.md: valid, context 5, 7,683 windows."""
    root = shared_data / "wikitext2-minilm384"
    if not root.exists():
        pytest.skip(f"{root} is absent")
    train = read_docs(root / "train.parquet", "embeddings")
    valid = read_docs(root / "valid.parquet", "embeddings")
    got = evaluate_baselines(train, valid, context=5, seed=0, retrieval=False)
    expected = {
        "linear_average": 0.500,
        "ewma": 0.484,
        "persistence": 0.397,
        "mean_vector": 0.307,
        "nearest_neighbour": 0.216,
        "random": 0.000,
    }
    for name, cos in expected.items():
        assert got[name]["n_windows"] == 7683
        assert got[name]["cosine"] == pytest.approx(cos, abs=0.002), name
