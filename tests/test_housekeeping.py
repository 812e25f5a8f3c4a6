"""Checkpoint housekeeping and `--add-samples` (issue 14 item 5), through the real platform:
a 12-trial smoke sweep (local mode, Ray Data, Tune + Optuna + ASHA, a confirm stage, a
SQLite MLflow store) with mid-epoch checkpoints, then `archlab sweep --resume
--add-samples 4` on it. The unit half (which checkpoints a run keeps): test_train_unit.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from archlab.platform.config import load_config

pytestmark = pytest.mark.slow

ARCHS = ("amn", "lstm")


def _checkpoints(t: dict) -> list[Path]:
    return sorted(Path(t["train_dir"]).glob("checkpoint_*"))


def _read(result_file: Path) -> dict:
    result = json.loads(result_file.read_text())
    for t in result["trials"] + result["confirm"]:
        t["train_dir"] = json.loads(Path(t["record_file"]).read_text())["train_dir"]
    return result


def _check_housekeeping(result: dict, cfg) -> list[dict]:
    """At most 2 checkpoints per trial (best + latest), none for ASHA-stopped search trials
    outside the `keep_checkpoints` best of their architecture, whose models stay loadable
    from MLflow. Returns those pruned trials."""
    from archlab.platform.modelstore import load_model
    from archlab.platform.trainer import run_complete

    metric = "val_cosine_seed"
    trials = result["trials"]
    assert not [t for t in trials + result["confirm"] if t["error"]]
    for t in trials + result["confirm"]:
        assert len(_checkpoints(t)) <= 2, (t["trial_id"], _checkpoints(t))
    pruned = []
    for arch in ARCHS:
        ranked = sorted((t for t in trials if t["spec"]["arch"] == arch), key=lambda t: -t["metrics"][metric])
        top, rest = ranked[:cfg.sweep.keep_checkpoints], ranked[cfg.sweep.keep_checkpoints:]
        for t in top:
            assert _checkpoints(t), f"{arch} top trial {t['trial_id']} lost its checkpoints"
        for t in rest:
            stopped = not run_complete(cfg, t["metrics"])
            assert bool(_checkpoints(t)) == (not stopped), (t["trial_id"], stopped, _checkpoints(t))
            if stopped:
                assert t["pruned"] and t["checkpoint"] is None and t["model_uri"]
                pruned.append(t)
    assert pruned, "no ASHA-stopped trial outside the top-k: the test would prove nothing"
    load_model(pruned[0]["model_uri"], result["tracking_uri"])  # its model is in MLflow
    return pruned


def test_housekeeping_prunes_stopped_trials_and_add_samples_extends_without_duplicates(tmp_path, sample_dataset):
    from mlflow.tracking import MlflowClient

    from archlab.platform.sweep import RESULT_FILE, TAG_CHECKPOINTS

    sets = [f"data.path={sample_dataset}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            f"sweep.storage_path={tmp_path / 'runs'}", "sweep.name=hk", f"sweep.archs=[{', '.join(ARCHS)}]",
            "sweep.num_samples=12", "sweep.max_concurrent=2", "sweep.keep_checkpoints=1",
            "sweep.confirm.seeds=[1]", "train.checkpoint_every_steps=4", "data.max_valid_windows=64"]
    cfg = load_config(None, sets, smoke_test=True)
    assert cfg.train.num_workers == 0 and cfg.train.epochs == 2 and cfg.train.max_steps_per_epoch == 12
    argv = [str(Path(sys.executable).parent / "archlab"), "sweep", "--smoke-test",
            *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    first = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    result_file = tmp_path / "runs" / "hk-1" / RESULT_FILE
    before = _read(result_file)
    assert len(before["trials"]) == 12
    pruned = _check_housekeeping(before, cfg)
    c = MlflowClient(before["tracking_uri"])
    assert all(c.get_run(t["run_id"]).data.tags.get(TAG_CHECKPOINTS) == "pruned" for t in pruned)

    result_file.unlink()  # written last: its presence afterwards says the extension finished
    more = subprocess.run([*argv, "--resume", "--add-samples", "4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert more.returncode == 0, (more.stdout + more.stderr)[-4000:]
    assert "extend-1: 4 more search trials (trials 13-16)" in more.stdout
    after = _read(result_file)
    assert after["sweep_id"] == "hk-1" and after["parent_run_id"] == before["parent_run_id"]
    trials = after["trials"]
    assert len(trials) == 16 and len({t["trial_id"] for t in trials}) == 16
    # the first 12 are the same trials with the same runs, not run again
    old = {t["trial_id"]: t["run_id"] for t in before["trials"]}
    assert {t["trial_id"]: t["run_id"] for t in trials if t["trial_id"] in old} == old
    # the round-robin allocation goes on: 8 trials per architecture
    assert sorted(t["spec"]["arch"] for t in trials) == sorted(ARCHS * 8)
    children = c.search_runs([after["experiment_id"]],
                             filter_string=f"tags.`mlflow.parentRunId` = '{after['parent_run_id']}'")
    search = [r for r in children if r.data.tags.get("stage") == "search"]
    assert len(search) == 16 and {r.data.tags["archlab.trial_id"] for r in search} == {t["trial_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in children)
    confirm = [r for r in children if r.data.tags.get("stage") == "confirm"]
    assert len(confirm) == len(after["confirm"]) >= len(before["confirm"]) == 2  # never rerun, never lost
    assert len({r.info.run_name for r in confirm}) == len(confirm)
    # the Optuna study holds every search trial once
    from archlab.platform.study import journal_path, load_study

    study = load_study(journal_path(tmp_path / "runs", "hk-1"), "hk-1")
    assert len(study.trials) == 16
    _check_housekeeping(after, cfg)
    # the registry saw the new trials: one version per architecture per candidate, no duplicates
    for arch in ARCHS:
        versions = c.search_model_versions(f"name = 'archlab-vector-{arch}'")
        assert len({v.run_id for v in versions}) == len(versions) >= 1
