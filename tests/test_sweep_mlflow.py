"""The vertical slice end to end, read back from the README demo's smoke run (the
`smoke_demo` fixture: `archlab demo --smoke-test` as a user runs it: a local Ray, trials
in local mode (trained in their Tune trial actors), Ray Data, Tune + Optuna + ASHA, a
confirm stage, a SQLite MLflow store): its store and the job's archlab_result.json. One
run serves the README, console and slice tests. The same slice under Ray Train (Train
workers): test_job_submit.py; a real `mlflow server` under Ray Train: test_reliability.py
and test_mlflow_buffer.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from archlab.platform.config import load_config

pytestmark = pytest.mark.slow

ARCHS = ("lstm", "transformer", "amn")  # archlab/configs/demo.yaml


@pytest.fixture(scope="module")
def sweep_result(smoke_demo):
    from archlab.cli import CONFIGS
    from archlab.platform.sweep import RESULT_FILE

    cwd, out = smoke_demo
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    cfg = load_config(CONFIGS / "demo.yaml", smoke_test=True)
    result = json.loads((cwd / "archlab_runs" / "demo-1" / RESULT_FILE).read_text())
    assert result["tracking_uri"] == f"sqlite:///{cwd}/m.db"
    return cfg, result, result["tracking_uri"]


def test_one_child_run_per_trial_with_flattened_params_and_epoch_metrics(sweep_result):
    from mlflow.tracking import MlflowClient

    cfg, result, uri = sweep_result
    assert len(result["trials"]) == 4
    assert not [t for t in result["trials"] if t["error"]]
    c = MlflowClient(uri)
    children = c.search_runs([result["experiment_id"]],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    every = result["trials"] + result["confirm"]
    assert len(children) == len(every)
    assert sorted(r.info.run_name for r in children) == sorted(f"trial-{t['trial_id']}" for t in every)
    assert {r.data.tags["archlab.arch"] for r in children} == set(ARCHS)
    for run in children:
        p = run.data.params
        # --smoke-test: local mode (2-worker DDP trials: test_reliability, test_multinode)
        assert p["train.num_workers"] == "0" and p["data.dataset_id"] == "2e576f95bab2c034"
        assert p["world_size"] == "1" and p["precision"] in ("fp32", "bf16")
        assert "lr" not in p  # changes during a run: a metric, not a param
        hist = c.get_metric_history(run.info.run_id, "val_cosine_seed")
        assert [m.step for m in hist] == list(range(1, len(hist) + 1))  # one value per epoch, no duplicates
        assert run.info.status == "FINISHED"
        # the trial's final model is logged to this very run
        trial = next(t for t in every if t["run_id"] == run.info.run_id)
        logged = c.get_logged_model(trial["model_uri"].split("/")[-1])
        assert logged.source_run_id == run.info.run_id and logged.name == "model"
    # baselines logged on the parent, computed on the same windows
    parent = c.get_run(result["parent_run_id"]).data.metrics
    assert parent["baseline.linear_average.cosine"] > parent["baseline.persistence.cosine"] > 0.2


def test_confirm_stage_retrains_the_best_config_of_each_arch_on_every_seed(sweep_result):
    from mlflow.tracking import MlflowClient

    cfg, result, uri = sweep_result
    c = MlflowClient(uri)
    children = c.search_runs([result["experiment_id"]],
                             filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    confirm = [r for r in children if r.data.tags.get("stage") == "confirm"]
    search = [r for r in children if r.data.tags.get("stage") == "search"]
    assert len(search) == len(result["trials"]) == 4 and len(confirm) + len(search) == len(children)
    assert len(confirm) == 3 * 1 * 2 == len(result["confirm"])  # archs x top_k x seeds
    assert not [t for t in result["confirm"] if t["error"]]
    hashes = {r.data.tags["config_hash"] for r in search}
    assert len(hashes) >= 2 and all(len(h) == 16 for h in hashes)
    for arch in ARCHS:
        runs = [r for r in confirm if r.data.tags["archlab.arch"] == arch]
        # the same seeds for every arch; the seed is the run's train.seed (init + data order)
        assert sorted(r.data.tags["confirm_seed"] for r in runs) == ["1", "2"]
        assert all(r.data.params["train.seed"] == r.data.tags["confirm_seed"] for r in runs)
        assert all(r.info.status == "FINISHED" and "archlab.model_uri" in r.data.tags for r in runs)
        # both seeds retrain one config: the arch's best search trial, by its hash
        best = max((r for r in search if r.data.tags["archlab.arch"] == arch),
                   key=lambda r: r.data.metrics["val_cosine_seed"])
        assert {r.data.tags["config_hash"] for r in runs} == {best.data.tags["config_hash"]}
        assert {r.data.tags["archlab.search_trial"] for r in runs} == {best.data.tags["archlab.trial_id"]}
        # confirm runs train every epoch: no early stopping
        assert all([m.step for m in c.get_metric_history(r.info.run_id, "val_cosine_seed")] == [1, 2] for r in runs)
    assert not {r.data.tags["archlab.trial_id"] for r in confirm} & {r.data.tags["archlab.trial_id"] for r in search}


def test_leaderboard_rows_are_confirm_means_with_cis_and_print_the_same_bytes_twice(sweep_result):
    from archlab.platform.leaderboard import format_board, leaderboard

    cfg, result, uri = sweep_result
    models = [r for r in result["leaderboard"]["rows"] if r["kind"] == "model"]
    assert {r["entry"] for r in models} == set(ARCHS)
    for r in models:
        assert r["stage"] == "confirm" and r["n"] == 2
        assert r["ci_lo"] <= r["mean"] <= r["ci_hi"] and r["ci_lo"] < r["ci_hi"]
        assert r["vs_base"] in ("better", "tie", "worse") and r["vs_base_by"] == "seed"
        assert r["p_base_adj"] >= r["p_base"]
    args = (uri, result["experiment_id"], result["parent_run_id"], *cfg.metric())
    one, two = leaderboard(*args), leaderboard(*args)
    for fmt, wide in (("table", False), ("table", True), ("markdown", False), ("csv", False), ("json", False)):
        assert format_board(one, fmt, wide).encode() == format_board(two, fmt, wide).encode()
    assert format_board(one, "markdown") == result["leaderboard"]["markdown"]


def test_a_registry_version_per_architecture_from_its_confirm_runs(sweep_result, sample_dataset):
    """Registered from the confirm runs, tagged with the leaderboard's verdict against the
    best baseline; `worse` is never champion, anything else is (a fresh store has no
    champion to beat). Each registered model loads from weights + spec and predicts unit
    vectors for the sample's windows."""
    from archlab.platform import modelstore
    from archlab.platform.data import read_vector_docs
    from archlab.platform.tracking import list_models

    cfg, result, uri = sweep_result
    names = {d["name"] for d in result["registry"]}
    assert names == {f"archlab-vector-{a}" for a in ARCHS}
    models = list_models(uri, "archlab-vector")
    rows = {r["entry"]: r for r in result["leaderboard"]["rows"] if r["kind"] == "model"}
    confirm_runs = {t["run_id"]: t for t in result["confirm"]}
    for name in names:
        versions = [m for m in models if m["name"] == name]
        assert len(versions) == 1 and versions[0]["tags"]["dataset_id"] == "2e576f95bab2c034"
        v = versions[0]
        assert v["tags"]["metric"] == "val_cosine_seed"
        arch = v["tags"]["arch"]
        assert v["run_id"] in confirm_runs and v["tags"]["archlab.stage"] == "confirm"
        assert v["tags"]["archlab.verdict_vs_baseline"] == rows[arch]["vs_base"]
        assert v["tags"]["archlab.best_baseline"] == result["leaderboard"]["best_baseline"] == "linear_average"
        assert float(v["tags"]["archlab.eval_score"]) == pytest.approx(rows[arch]["mean"], abs=1e-6)  # confirm mean
        if rows[arch]["vs_base"] == "worse":
            assert v["aliases"] == [] and "never champion" in v["tags"]["archlab.champion_decision"]
        else:
            assert v["aliases"] == ["champion"]
        model = modelstore.load_model(f"models:/{name}/{v['version']}", uri)  # weights + spec
        docs = read_vector_docs([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
        x = torch.as_tensor(np.stack([d[:6] for d in docs if len(d) >= 6]))
        pred = model(x[:, :-1])
        assert pred.shape == (len(x), 5, 384)
        torch.testing.assert_close(pred.norm(dim=-1), torch.ones(len(x), 5), atol=1e-4, rtol=0)


def test_leaderboard_has_every_arch_and_the_baselines(sweep_result):
    _, result, _ = sweep_result
    rows = result["leaderboard"]["rows"]
    entries = {r["entry"]: r for r in rows}
    assert {*ARCHS, "linear_average", "persistence", "mean_vector", "random"} <= set(entries)
    values = [r["val_cosine_seed"] for r in rows]
    assert values == sorted(values, reverse=True)
    assert "| linear_average | baseline |" in result["leaderboard"]["markdown"]


def test_every_vector_trial_carries_its_window_level_ci_against_the_best_baseline(sweep_result):
    """finalize logs stats.window_comparison for each trial: the paired per-window CI of
    the difference to the best baseline, which the leaderboard shows for a single run."""
    from mlflow.tracking import MlflowClient

    from archlab.platform.stats import WINDOW_METRICS

    cfg, result, uri = sweep_result
    c = MlflowClient(uri)
    parent = c.get_run(result["parent_run_id"]).data.metrics
    best = max((k for k in parent if k.startswith("baseline.") and k.endswith(".cosine")), key=parent.get)
    for t in result["trials"] + result["confirm"]:
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


def test_the_smoke_demos_report_is_self_contained_logged_and_its_journal_loads(smoke_demo, sweep_result):
    """The report `archlab demo --smoke-test` wrote at the end (and printed the path of):
    its images decode as PNGs of non-trivial size, nothing is fetched from the network, its
    files are artifacts of the sweep's parent run, and `optuna.load_study` reads the
    sweep's journal with one trial per search trial."""
    import optuna
    from mlflow.tracking import MlflowClient

    from archlab.platform import study
    from tests.conftest import assert_self_contained_report

    cwd, out = smoke_demo
    _, result, uri = sweep_result
    page = cwd / "archlab_runs" / "demo-1" / "report" / "report.html"
    assert f"report: {page}" in out.stdout.replace("\n", ""), out.stdout[-2000:]
    text = page.read_text()
    assert_self_contained_report(text, 5)  # curves, pareto, leaderboard, slices, importances
    for arch in ARCHS:
        assert arch in text
    names = {p.name for p in page.parent.iterdir()}
    assert "report.html" in names and len([n for n in names if n.endswith(".png")]) >= 5
    c = MlflowClient(uri)
    run = c.get_run(result["parent_run_id"])
    root = run.info.artifact_uri.removeprefix("file://")
    if not root.startswith("/"):  # a relative artifact root is the demo's working dir's
        root = str(cwd / root)
    logged = {p.name for p in (Path(root) / "report").iterdir()}
    assert names == logged
    st = optuna.load_study(study_name="demo-1",
                           storage=study.journal_storage(study.journal_path(cwd / "archlab_runs", "demo-1")))
    assert len(st.trials) == len(result["trials"]) == 4
