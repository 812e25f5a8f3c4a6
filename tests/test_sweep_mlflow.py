"""The vertical slice end to end with the real components: local Ray with 2 DDP workers
(gloo), Ray Data, Tune + Optuna + ASHA, a real `mlflow server` on 127.0.0.1 (SQLite)."""

import numpy as np
import pytest
import torch

from archlab.platform.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_result(ray_local, mlflow_server, tmp_path_factory, sample_dataset):
    from archlab.platform.sweep import run_sweep

    store = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={mlflow_server}", f"sweep.storage_path={store}",
        "sweep.name=slice-test", "sweep.archs=[lstm, transformer]", "sweep.num_samples=4",
        "train.num_workers=2", "train.cpus_per_worker=1",
    ], smoke_test=True)
    return cfg, run_sweep(cfg)


def test_one_child_run_per_trial_with_flattened_params_and_epoch_metrics(sweep_result, mlflow_server):
    from mlflow.tracking import MlflowClient

    cfg, result = sweep_result
    assert len(result["trials"]) == 4
    assert not [t for t in result["trials"] if t["error"]]
    c = MlflowClient(mlflow_server)
    children = c.search_runs([result["experiment_id"]],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    assert len(children) == len(result["trials"])
    assert sorted(r.info.run_name for r in children) == sorted(f"trial-{t['trial_id']}" for t in result["trials"])
    assert {r.data.tags["archlab.arch"] for r in children} == {"lstm", "transformer"}
    for run in children:
        p = run.data.params
        assert p["train.num_workers"] == "2" and p["data.dataset_id"] == "2e576f95bab2c034"
        assert p["world_size"] == "2" and p["precision"] in ("fp32", "bf16")
        assert "lr" not in p  # changes during a run: a metric, not a param
        hist = c.get_metric_history(run.info.run_id, "val_cosine_seed")
        assert [m.step for m in hist] == list(range(1, len(hist) + 1))  # one value per epoch, no duplicates
        assert run.info.status == "FINISHED"
        # the trial's final model is logged to this very run
        trial = next(t for t in result["trials"] if t["run_id"] == run.info.run_id)
        logged = c.get_logged_model(trial["model_uri"].split("/")[-1])
        assert logged.source_run_id == run.info.run_id and logged.name == "model"
    # baselines logged on the parent, computed on the same windows
    parent = c.get_run(result["parent_run_id"]).data.metrics
    assert parent["baseline.linear_average.cosine"] > parent["baseline.persistence.cosine"] > 0.2


def test_a_registry_version_per_architecture_and_champion_loads(sweep_result, mlflow_server, sample_dataset):
    from archlab.platform import modelstore
    from archlab.platform.data import read_vector_docs
    from archlab.platform.tracking import list_models

    cfg, result = sweep_result
    names = {d["name"] for d in result["registry"]}
    assert names == {"archlab-vector-lstm", "archlab-vector-transformer"}
    models = list_models(mlflow_server, "archlab-vector")
    for name in names:
        versions = [m for m in models if m["name"] == name]
        assert versions and versions[0]["tags"]["dataset_id"] == "2e576f95bab2c034"
        assert versions[0]["tags"]["metric"] == "val_cosine_seed"
        assert any("champion" in m["aliases"] for m in versions)
        model = modelstore.load_model(f"models:/{name}@champion", mlflow_server)  # weights + spec
        docs = read_vector_docs([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
        x = torch.as_tensor(np.stack([d[:6] for d in docs if len(d) >= 6]))
        pred = model(x[:, :-1])
        assert pred.shape == (len(x), 5, 384)
        torch.testing.assert_close(pred.norm(dim=-1), torch.ones(len(x), 5), atol=1e-4, rtol=0)


def test_leaderboard_has_every_arch_and_the_baselines(sweep_result):
    cfg, result = sweep_result
    rows = result["leaderboard"]["rows"]
    entries = {r["entry"]: r for r in rows}
    assert {"lstm", "transformer", "linear_average", "persistence", "mean_vector", "random"} <= set(entries)
    values = [r["val_cosine_seed"] for r in rows]
    assert values == sorted(values, reverse=True)
    assert "| linear_average | baseline |" in result["leaderboard"]["markdown"]


def test_every_vector_trial_carries_its_window_level_ci_against_the_best_baseline(sweep_result, mlflow_server):
    """finalize logs stats.window_comparison for each trial: the paired per-window CI of
    the difference to the best baseline, which the leaderboard shows for a single run."""
    from mlflow.tracking import MlflowClient

    from archlab.platform.stats import WINDOW_METRICS

    cfg, result = sweep_result
    c = MlflowClient(mlflow_server)
    parent = c.get_run(result["parent_run_id"]).data.metrics
    best = max((k for k in parent if k.startswith("baseline.") and k.endswith(".cosine")), key=parent.get)
    for t in result["trials"]:
        run = c.get_run(t["run_id"])
        m = run.data.metrics
        assert set(WINDOW_METRICS) <= set(m), sorted(m)
        assert m["diff_vs_best_baseline_lo"] <= m["diff_vs_best_baseline"] <= m["diff_vs_best_baseline_hi"]
        assert run.data.tags["archlab.best_baseline"] == best[len("baseline."):-len(".cosine")]
        # the mean difference is the run's own seed-protocol cosine minus the baseline's (the
        # worker evaluated under its precision, the driver in fp32)
        tol = 2e-4 if run.data.params.get("precision") == "fp32" else 2e-2
        assert m["diff_vs_best_baseline"] == pytest.approx(m["val_cosine_seed"] - parent[best], abs=tol)
        assert m["diff_vs_best_baseline_n"] == parent[best.replace(".cosine", ".n_windows")]
    d_base = {r["entry"]: r.get("d_base") for r in result["leaderboard"]["rows"] if r["kind"] == "model"}
    assert all(v is not None for v in d_base.values()), d_base
