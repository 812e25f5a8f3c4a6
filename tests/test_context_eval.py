"""Longer contexts (issue 13 item 2), Ray-free on the shipped sample: at data.context > 5
training cuts windows of context + 1, validation keeps the seed protocol's windows
(5 vectors -> the 6th: the same windows, count and baseline figures as at context 5) and
adds the full-context set behind val_cosine_ctx and baseline.<name>.cosine_ctx."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from archlab.platform.config import load_config
from archlab.platform.data import (
    WindowCutter, inspect_dataset, read_vector_docs, train_window_count, valid_window_lengths,
)
from archlab.platform.sweep import compute_baselines
from archlab.platform.train import build_from_spec, model_spec
from archlab.platform.trainer import Trainer


def _cfg(sample, context: int, *extra: str):
    return load_config(None, [f"data.path={sample}", f"data.context={context}", "model.flavor=debug", *extra])


def _valid_windows(cfg, info) -> dict[str, np.ndarray]:
    """The validation window sets as make_ray_datasets cuts them (same WindowCutter), read
    with pyarrow instead of Ray Data."""
    out = {}
    for name, length in valid_window_lengths(cfg).items():
        cut = WindowCutter(cfg.to_dict(), info.dim, None, info.separator, 1, length)
        out[name] = np.concatenate([cut(pq.read_table(f, columns=["vectors"]))["x"]
                                    for f in info.files[cfg.data.valid_split]])
    return out


def test_context_5_has_only_the_seed_windows(sample_dataset):
    assert valid_window_lengths(_cfg(sample_dataset, 5)) == {"valid": 6}
    assert valid_window_lengths(_cfg(sample_dataset, 3)) == {"valid": 4}  # shorter contexts as before
    assert valid_window_lengths(_cfg(sample_dataset, 64)) == {"valid": 6, "valid_ctx": 65}


@pytest.mark.parametrize("context", [16, 64])
def test_seed_protocol_windows_and_baselines_unchanged_at_a_longer_context(sample_dataset, context):
    cfg5, cfg = _cfg(sample_dataset, 5), _cfg(sample_dataset, context)
    info5, info = inspect_dataset(cfg5), inspect_dataset(cfg)
    # the sample has documents shorter than 65 vectors: still valid, they give seed windows
    assert info.files == info5.files
    w5, w = _valid_windows(cfg5, info5), _valid_windows(cfg, info)
    assert set(w5) == {"valid"} and set(w) == {"valid", "valid_ctx"}
    assert w["valid"].shape == w5["valid"].shape == (1555, 6, 384)
    assert np.array_equal(w["valid"], w5["valid"])
    docs = read_vector_docs(info.files["valid"], 384)
    assert len(w["valid_ctx"]) == sum(max(0, len(d) - context) for d in docs)
    assert w["valid_ctx"].shape[1] == context + 1

    b5 = compute_baselines(cfg5, info5, w5["valid"])
    b = compute_baselines(cfg, info, w["valid"], w["valid_ctx"])
    for name in b5:
        for k, v in b5[name].items():
            assert b[name][k] == pytest.approx(v, abs=1e-12), (name, k)  # the seed figures, unchanged
    assert not any(k.endswith("_ctx") for m in b5.values() for k in m)
    la = b["linear_average"]
    assert la["n_windows"] == 1555 and la["n_windows_ctx"] == len(w["valid_ctx"])
    # the full-context average is a different baseline on different windows
    assert math.isfinite(la["cosine_ctx"]) and abs(la["cosine_ctx"] - la["cosine"]) > 1e-4


def test_train_window_count_is_exact_with_documents_shorter_than_the_context(sample_dataset):
    cfg = _cfg(sample_dataset, 64)
    info = inspect_dataset(cfg)
    docs = read_vector_docs(info.files["train"], 384)
    assert any(len(d) <= 64 for d in docs)
    assert train_window_count(cfg, info) == sum(max(0, len(d) - 64) for d in docs)


def test_trainer_trains_and_evaluates_at_context_16_on_the_sample(sample_dataset):
    """A residual model at context 16: at initialisation it predicts the linear average,
    so its seed metric equals the 5-vector baseline and its ctx metric the 16-vector one
    (the model's evaluation and the driver's baselines use the same windows); a few
    steps later it still reports every metric, on the same counts."""
    torch.manual_seed(0)
    cfg = _cfg(sample_dataset, 16, "model.arch=lstm", "model.head=residual", "train.batch_size=32",
               "train.scheduler=constant")
    info = inspect_dataset(cfg)
    w = _valid_windows(cfg, info)
    base = compute_baselines(cfg, info, w["valid"], w["valid_ctx"])["linear_average"]
    model = build_from_spec(model_spec(cfg, {"dim": 384}))
    trainer = Trainer(model, cfg)

    def batches(x: np.ndarray, b: int = 256):
        return [{"x": torch.from_numpy(x[i: i + b])} for i in range(0, len(x), b)]

    m0 = trainer.evaluate(batches(w["valid"]), batches(w["valid_ctx"]))
    assert m0["val_windows"] == 1555 and m0["val_windows_ctx"] == len(w["valid_ctx"])
    assert m0["val_cosine_seed"] == pytest.approx(base["cosine"], abs=1e-5)
    assert m0["val_cosine_ctx"] == pytest.approx(base["cosine_ctx"], abs=1e-5)
    assert m0["val_mse_ctx"] == pytest.approx(base["mse_ctx"], abs=1e-6)

    train = [{"x": torch.from_numpy(x)} for x in np.split(_train_windows(cfg, info)[:32 * 8], 8)]
    assert train[0]["x"].shape == (32, 17, 384)  # training at every position of 17-vector windows
    m = trainer.train_epoch(train, batches(w["valid"]), valid_ctx_batches=batches(w["valid_ctx"]))
    assert m["step"] == 8 and math.isfinite(m["train_loss"])
    assert (m["val_windows"], m["val_windows_ctx"]) == (m0["val_windows"], m0["val_windows_ctx"])
    for k in ("val_cosine_seed", "val_cosine_ctx", "val_mse_ctx", "val_frac_cos_gt_0.5_ctx", "val_loss", "val_cosine"):
        assert math.isfinite(m[k]), k
    assert m["val_cosine_ctx"] != m0["val_cosine_ctx"]  # it trained


def test_context_5_evaluation_reports_no_ctx_metrics(sample_dataset):
    cfg = _cfg(sample_dataset, 5, "model.arch=lstm")
    info = inspect_dataset(cfg)
    w = _valid_windows(cfg, info)
    m = Trainer(build_from_spec(model_spec(cfg, {"dim": 384})), cfg).evaluate(
        [{"x": torch.from_numpy(w["valid"][:300])}])
    assert m["val_windows"] == 300 and not any(k.endswith("_ctx") for k in m)


def _train_windows(cfg, info) -> np.ndarray:
    cut = WindowCutter(cfg.to_dict(), info.dim, None, info.separator, 1)
    return np.concatenate([cut(pq.read_table(f, columns=["vectors"]))["x"] for f in info.files["train"]])
