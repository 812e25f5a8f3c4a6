"""`archlab train` through real Ray Train: 2 DDP workers (gloo) with
`train.checkpoint_every_steps`. A worker that fails mid-epoch resumes from the mid-epoch
checkpoint into the same MLflow run (the injected failure fires only on a run that did not
resume, so a run that restarted from scratch would fail twice and end FAILED); the step
counter and the planned cosine schedule carry on, and no metric is logged twice. (One run
for the DDP and the step-checkpoint cases: each Ray Train run costs ~20 s of process
start-up on 2 cores. A real SIGKILL of a worker: test_reliability.py.)"""

import pytest

from archlab.platform.config import load_config

pytestmark = pytest.mark.slow


def test_ddp_worker_failure_mid_epoch_resumes_from_the_step_checkpoint_into_the_same_run(
        ray_local, tmp_path, sample_dataset):
    from mlflow.tracking import MlflowClient

    from archlab.platform.sweep import run_train
    from archlab.platform.train import load_state
    from archlab.platform.trainer import LRSchedule

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.epochs=3", "train.num_workers=2", "train.max_failures=1",
        "train.checkpoint_every_steps=5", "train.fail_once_at_step=22",  # in epoch 1, after step 20's checkpoint
        "train.scheduler=cosine", "train.warmup_frac=0.25",
    ], smoke_test=True)  # 3 epochs x 12 steps
    result = run_train(cfg)
    assert result["metrics"]["epoch"] == 3
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("archlab").experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    assert [r.info.run_id for r in children] == [result["run_id"]]
    run = c.get_run(result["run_id"])
    assert run.data.params["planned_steps"] == "36" and run.data.params["world_size"] == "2"
    assert [m.step for m in c.get_metric_history(result["run_id"], "val_cosine_seed")] == [1, 2, 3]
    # the optimizer step counter resumed from the step-20 checkpoint, not from epoch 1's start
    assert [int(m.value) for m in c.get_metric_history(result["run_id"], "step")] == [12, 24, 36]
    assert [int(m.value) for m in c.get_metric_history(result["run_id"], "resumed_from_step")] == [-1, 20, 20]
    sched = LRSchedule("cosine", [cfg.train.lr], warmup=9, total=36)
    lrs = [m.value for m in c.get_metric_history(result["run_id"], "lr")]
    assert lrs == pytest.approx([cfg.train.lr * sched.factor_at(s) for s in (11, 23, 35)])
    # the driver loaded the final checkpoint with weights_only=True to log and register it
    assert result["registry"] and result["registry"][0]["name"] == "archlab-vector-lstm"
    states = [load_state(p.parent) for p in (tmp_path / "runs").rglob("state.pt")]
    assert states and all(s["format"] == 2 for s in states)
    assert max(s["step"] for s in states) == 36
