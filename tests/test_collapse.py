"""The collapse check (Ray-free): `prediction_self_cosine`, the sweep's per-trial
`val_pred_self_cos`, and the leaderboard's `collapsed` flag read back from a real MLflow
store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archlab.architectures import build_model, make_config
from archlab.platform import tracking
from archlab.platform.baselines import windows
from archlab.platform.leaderboard import COLLAPSE_THRESHOLD, format_board, leaderboard
from archlab.platform.metrics import prediction_self_cosine
from archlab.platform.sweep import _vector_final


def _sample_valid_windows(sample_dataset) -> np.ndarray:
    from archlab.platform.baselines import read_docs

    docs = read_docs(sample_dataset / "valid" / "part-00000.parquet", "vectors")
    ctx, tgt = windows(docs, 5)
    return np.concatenate([ctx, tgt[:, None]], axis=1)  # (N, 6, D)


def test_self_cosine_of_identical_unrelated_and_scaled_rows():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 64, generator=g)
    assert prediction_self_cosine(v.repeat(50, 1) * torch.rand(50, 1, generator=g)) == pytest.approx(1.0, abs=1e-12)
    # independent Gaussian directions in 64-D: mean cosine to their mean ~ 1/sqrt(N)
    assert prediction_self_cosine(torch.randn(2000, 64, generator=g)) < 0.1
    with pytest.raises(ValueError, match=r"expected predictions \[N, D\]"):
        prediction_self_cosine(torch.randn(3, 4, 5))


def test_linear_average_is_not_collapsed_and_the_mean_vector_is(sample_dataset):
    w = torch.from_numpy(_sample_valid_windows(sample_dataset))
    linear = prediction_self_cosine(w[:, :-1].mean(dim=1))
    assert 0.2 < linear < COLLAPSE_THRESHOLD, linear
    mean = F.normalize(w[:, -1].mean(dim=0), dim=-1)
    noisy = mean + 0.01 * torch.randn(len(w), w.shape[-1])  # a mean-vector model, a little noise
    assert prediction_self_cosine(noisy) > COLLAPSE_THRESHOLD


def test_trial_final_metrics_report_self_cosine(sample_dataset):
    w = _sample_valid_windows(sample_dataset)[:300]
    torch.manual_seed(0)
    model = build_model("gru_stack", "vector", make_config("gru_stack", "debug"), d_in=w.shape[-1],
                        head="residual", context=5).eval()
    got = _vector_final(model, w)
    # at init the residual model predicts the linear average: same self-cosine
    want = prediction_self_cosine(torch.from_numpy(w[:, :-1].mean(axis=1)))
    assert got["val_pred_self_cos"] == pytest.approx(want, abs=1e-5)
    assert 0.0 <= got["retrieval_acc"] <= 1.0


def test_leaderboard_flags_collapsed_models(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "collapse")
    parent = tracking.parent_run(c, exp, "collapse-1", {})
    tracking.log_metrics(c, parent, {"baseline.mean_vector.cosine": 0.27, "baseline.linear_average.cosine": 0.48})
    for arch, cos, self_cos in (("transformer", 0.266, 0.9999), ("lstm", 0.47, 0.61), ("gru_stack", 0.46, None)):
        run = tracking.child_run(c, exp, parent, "collapse-1", f"t-{arch}", arch, {})
        m = {"val_cosine_seed": cos, **({"val_pred_self_cos": self_cos} if self_cos is not None else {})}
        tracking.log_metrics(c, run, m)
    board = leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    rows = {r["entry"]: r for r in board["rows"]}
    assert rows["transformer"]["collapsed"] is True
    assert rows["lstm"]["collapsed"] is False and rows["gru_stack"]["collapsed"] is False  # no figure: no flag
    assert "collapsed" not in rows["mean_vector"] or not rows["mean_vector"]["collapsed"]
    assert "transformer: collapsed" in format_board(board)
