"""`archlab evaluate`: a registered model (trained here Ray-free, logged as weights + spec,
registered in a tmp SQLite store) is scored on the shipped sample next to every baseline
on the same windows, with a paired 95% CI, and the evaluation run is logged and linked to
the model version; a split that does not fit the model is refused before any data loads."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from archlab.platform import evaluate as E
from archlab.platform import modelstore, tracking
from archlab.platform.shards import DataError, ShardMeta, build_manifest, token_schema, write_shard

runner = CliRunner()
NAME = "archlab-vector-amn"


def _train_amn(sample_dataset, steps: int = 40):
    """AMN debug trained for a few steps on the sample's train windows (plain loop, MSE)."""
    from archlab.platform.config import load_config
    from archlab.platform.losses import make_loss
    from archlab.platform.train import build_from_spec, model_spec

    cfg = load_config(None, [f"data.path={sample_dataset}", "model.arch=amn"])
    spec = model_spec(cfg, {"dim": 384, "dataset_id": "2e576f95bab2c034"})
    torch.manual_seed(0)
    model = build_from_spec(spec)
    x = torch.as_tensor(E.seed_windows([str(sample_dataset / "train" / "part-00000.parquet")], 384))  # (N, 6, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = make_loss("mse")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        b = x[torch.randint(len(x), (64,), generator=g)]
        pred = model(b[:, :-1])
        loss = loss_fn(pred.reshape(-1, 384), b[:, 1:].reshape(-1, 384))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), spec


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sample_dataset):
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "evaluate-test")
    model, spec = _train_amn(sample_dataset)
    run = c.create_run(exp, run_name="train-amn-1")
    tracking.log_params(c, run.info.run_id, {"data": {"path": str(sample_dataset)}})
    model_uri = modelstore.log_model(uri, run.info.run_id, model, spec, modelstore._example(spec))
    c.set_terminated(run.info.run_id, "FINISHED")
    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(model_uri, NAME)
    c.set_registered_model_alias(NAME, "champion", mv.version)
    return uri, model, spec, run.info.run_id


def test_evaluate_scores_the_model_next_to_every_baseline_with_a_paired_ci(registered, sample_dataset):
    from archlab.platform.baselines import BASELINES, baseline_window_scores, evaluate_baselines
    from archlab.platform.data import read_vector_docs
    from archlab.platform.metrics import window_scores
    from archlab.platform.stats import paired

    uri, model, spec, train_run = registered
    rep = E.evaluate(f"models:/{NAME}@champion", sample_dataset, "valid", tracking_uri=uri)
    valid = read_vector_docs([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
    train = read_vector_docs([str(sample_dataset / "train" / "part-00000.parquet")], 384)
    # the seed protocol's windows: every 6 consecutive vectors of a document
    assert rep["n_windows"] == sum(len(d) - 5 for d in valid if len(d) > 5)
    assert (rep["name"], rep["version"], rep["run_id"]) == (NAME, "1", train_run)
    want = evaluate_baselines(train, valid, context=5, seed=0)
    assert set(rep["baselines"]) == set(BASELINES)
    for name in BASELINES:  # the same figures the sweep logs for its baselines
        assert rep["baselines"][name]["cosine_seed"] == pytest.approx(want[name]["cosine"], abs=1e-6)
        assert rep["baselines"][name]["retrieval_acc"] == pytest.approx(want[name]["retrieval_acc"])
    m = rep["metrics"]
    assert set(m) == {"cosine_seed", "mse_seed", "frac_cos_gt_0.5_seed", "frac_cos_gt_0.7_seed",
                      "frac_cos_gt_0.85_seed", "retrieval_acc"}
    assert 0.3 < m["cosine_seed"] < 0.8 and 0 <= m["frac_cos_gt_0.7_seed"] <= m["frac_cos_gt_0.5_seed"] <= 1
    # the paired CI against the best baseline, recomputed independently on the same windows
    best = max(want, key=lambda n: want[n]["cosine"])
    assert rep["best_baseline"] == best
    windows = E.seed_windows([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
    # the same windows as the seed protocol's own definition, in the baselines' order
    np.testing.assert_array_equal(windows[:, -1], np.concatenate([d[5:] for d in valid if len(d) > 5]))
    ours = window_scores(model, windows, "vector")
    ref = paired(ours, baseline_window_scores(train, valid, context=5, seed=0)[best])
    b = rep["vs_best"]
    assert b["diff"] == pytest.approx(m["cosine_seed"] - want[best]["cosine"], abs=1e-6)
    assert (b["lo"], b["hi"], b["n"]) == (pytest.approx(ref.diff.lo), pytest.approx(ref.diff.hi), rep["n_windows"])
    assert b["lo"] < b["diff"] < b["hi"] and b["verdict"] in ("better", "tie", "worse")
    assert rep["vs_baselines"]["random"]["verdict"] == "better"  # a trained model beats noise


def test_the_evaluation_run_is_logged_and_linked_to_the_model_version(registered, sample_dataset):
    uri, _, _, train_run = registered
    rep = E.evaluate(f"models:/{NAME}/1", sample_dataset, "valid", tracking_uri=uri, experiment="eval-x")
    c = tracking.client(uri)
    run = c.get_run(rep["evaluation_run_id"])
    t = run.data.tags
    assert run.info.status == "FINISHED"
    assert (t["archlab.model_name"], t["archlab.model_version"], t["archlab.split"]) == (NAME, "1", "valid")
    assert t["archlab.dataset_id"] == "2e576f95bab2c034" and t["archlab.model_run_id"] == train_run
    assert t["archlab.role"] == "evaluation" and t["archlab.best_baseline"] == rep["best_baseline"]
    md = run.data.metrics
    assert md["model.cosine_seed"] == pytest.approx(rep["metrics"]["cosine_seed"])
    assert md["diff_ci_lo"] == pytest.approx(rep["vs_best"]["lo"]) and md["diff_ci_hi"] == pytest.approx(rep["vs_best"]["hi"])
    assert md["baseline.linear_average.cosine_seed"] == pytest.approx(rep["baselines"]["linear_average"]["cosine_seed"])
    assert [i.model_id for i in run.inputs.model_inputs] == [rep["model_id"]]
    assert run.inputs.dataset_inputs[0].dataset.digest == "2e576f95bab2c034"
    mv = c.get_model_version(NAME, "1")
    assert mv.tags["archlab.eval.2e576f95bab2c034.valid"] == run.info.run_id  # version -> run


def test_cli_prints_metrics_and_the_ci(registered, sample_dataset, tmp_path):
    from archlab.cli import app

    uri, _, _, train_run = registered
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["evaluate", f"runs:/{train_run}/model", "--data", str(sample_dataset), "--split", "valid",
                              "--tracking-uri", uri, "--json", str(out)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "linear_average" in text and "cosine_seed" in text and "random" in text
    assert "model - best baseline (" in text and "95% CI [" in text and "logged evaluation run" in text
    rep = json.loads(out.read_text())
    assert rep["name"] is None and rep["run_id"] == train_run and math.isfinite(rep["vs_best"]["lo"])


def _forbid_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data or weights were read before the split was refused")

    import archlab.platform.data as data_mod
    import archlab.platform.validate as validate_mod

    monkeypatch.setattr(data_mod, "read_vector_docs", boom)
    monkeypatch.setattr(validate_mod, "validate_dataset", boom)
    monkeypatch.setattr(modelstore, "load_model", boom)
    monkeypatch.setattr(E, "token_windows_split", boom)
    monkeypatch.setattr(E, "seed_windows", boom)


def test_a_split_whose_dim_does_not_match_is_refused_before_loading_data(registered, sample_dataset, tmp_path, monkeypatch):
    from archlab.cli import app

    uri = registered[0]
    ds = tmp_path / "ds768"
    shutil.copytree(sample_dataset, ds)
    m = json.loads((ds / "manifest.json").read_text())
    m["dim"] = 768
    (ds / "manifest.json").write_text(json.dumps(m))
    _forbid_loading(monkeypatch)
    with pytest.raises(DataError, match=rf"{ds}/manifest.json \(split 'valid'\): dim 768 does not match the model "
                                        rf"models:/{NAME}@champion: d_in 384"):
        E.evaluate(f"models:/{NAME}@champion", ds, "valid", tracking_uri=uri)
    res = runner.invoke(app, ["evaluate", f"models:/{NAME}@champion", "--data", str(ds), "--tracking-uri", uri])
    assert res.exit_code == 2 and "dim 768 does not match" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def _token_dataset(root, vocab):
    ids = np.arange(400) % vocab
    for split in ("train", "valid"):
        t = pa.table({"doc_id": ["a", "b"], "tokens": pa.array([ids[:300].tolist(), ids[:200].tolist()],
                                                               type=pa.list_(token_schema(vocab).field("tokens").type.value_type))},
                     schema=token_schema(vocab))
        write_shard(root / split / "part-00000.parquet", t, ShardMeta(kind="token", vocab_size=vocab, tokenizer="byte"))
    build_manifest(root)
    return root


def test_task_and_vocab_mismatches_are_refused_naming_both(registered, tmp_path, monkeypatch):
    import mlflow

    from archlab.platform.config import load_config
    from archlab.platform.train import build_from_spec, model_spec

    uri = registered[0]
    tok = _token_dataset(tmp_path / "tok300", 300)
    # a token model (vocab 256) registered the same way
    spec = model_spec(load_config(None, ["model.arch=transformer", "train.task=token", "data.seq_len=16"]),
                      {"vocab_size": 256, "dataset_id": "t"})
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, "evaluate-test"))
    mu = modelstore.log_model(uri, run.info.run_id, build_from_spec(spec), spec, modelstore._example(spec))
    mlflow.set_tracking_uri(uri)
    mlflow.register_model(mu, "archlab-token-transformer")
    _forbid_loading(monkeypatch)
    with pytest.raises(DataError, match=r"kind 'token' does not match the model models:/archlab-vector-amn/1: task 'vector'"):
        E.evaluate(f"models:/{NAME}/1", tok, "valid", tracking_uri=uri)
    with pytest.raises(DataError, match=r"vocab_size 300 does not match the model models:/archlab-token-transformer/1: vocab_size 256"):
        E.evaluate("models:/archlab-token-transformer/1", tok, "valid", tracking_uri=uri)


def test_token_model_gets_loss_bpb_and_unigram_uniform_baselines(registered, tmp_path):
    import mlflow

    from archlab.platform.config import load_config
    from archlab.platform.train import build_from_spec, model_spec

    uri = registered[0]
    tok = _token_dataset(tmp_path / "tok256", 256)
    spec = model_spec(load_config(None, ["model.arch=transformer", "train.task=token", "data.seq_len=16"]),
                      {"vocab_size": 256, "dataset_id": "t"})
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(c, "evaluate-test"))
    torch.manual_seed(0)
    mu = modelstore.log_model(uri, run.info.run_id, build_from_spec(spec), spec, modelstore._example(spec))
    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(mu, "archlab-token-transformer-b")
    rep = E.evaluate(f"models:/archlab-token-transformer-b/{mv.version}", tok, "valid", tracking_uri=uri, log=False)
    # 2 documents of 300 and 200 tokens + separators packed into windows of 17
    assert rep["n_windows"] == (300 + 1 + 200 + 1) // 17
    assert set(rep["baselines"]) == {"unigram", "uniform"} and rep["mode"] == "min"
    assert rep["baselines"]["uniform"]["loss"] == pytest.approx(math.log(256))
    assert rep["metrics"]["bpb"] == pytest.approx(rep["metrics"]["loss"] / math.log(2))
    # an untrained model is near uniform; the unigram of train (ids 0..255 evenly) is too
    assert abs(rep["metrics"]["loss"] - math.log(256)) < 1.0
    assert rep["best_baseline"] in ("unigram", "uniform") and "evaluation_run_id" not in rep


def test_models_predict_uses_the_models_own_dim_and_the_given_split(registered, sample_dataset):
    from archlab.cli import app

    uri, _, _, _ = registered
    res = runner.invoke(app, ["models", "--tracking-uri", uri, "--predict", NAME, "--split", "valid"],
                        env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    # no --data: the dataset its training run recorded; the windows of the seed protocol
    assert f"models:/{NAME}@champion (amn, d_in 384) on {sample_dataset} [valid]: 1555 predictions" in text
    assert "mean cosine to the true next vector 0." in text


def test_model_argument_forms_are_checked(registered):
    from archlab.platform.config import ConfigError

    uri = registered[0]
    with pytest.raises(ConfigError, match=r"MODEL 'archlab-vector-amn': expected models:/<name>@<alias>"):
        E.resolve_model(NAME, uri)
    with pytest.raises(ConfigError, match=r"MODEL 'models:/archlab-vector-amn@nope': not found in the registry"):
        E.resolve_model(f"models:/{NAME}@nope", uri)
    with pytest.raises(ConfigError, match=r"MODEL 'models:/archlab-vector-amn/9': not found in the registry"):
        E.resolve_model(f"models:/{NAME}/9", uri)
