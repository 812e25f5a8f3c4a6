"""`train.checkpoint_every_steps` through real Ray Train: a worker that fails mid-epoch
resumes from the mid-epoch checkpoint (the injected failure fires only on a run that did
not resume, so a run that restarted from scratch would fail twice and end FAILED), the
step counter and the planned cosine schedule carry on, and no metric is logged twice.
Mid-epoch reports never reach Tune (TuneEpochReportCallback; fast, no Ray cluster)."""

import pytest

from archlab.platform.config import load_config


class Queue(list):
    put = list.append


def test_mid_epoch_reports_are_kept_from_tune():
    from archlab.platform.train import MID_EPOCH, TuneEpochReportCallback

    cb = object.__new__(TuneEpochReportCallback)  # no Tune session here: only the queue matters
    cb._training_actor_item_queue = Queue()
    cb.after_report(None, [{MID_EPOCH: 1, "epoch": 0, "step": 5}], None)
    cb.after_report(None, [{"epoch": 1, "step": 12, "val_cosine_seed": 0.3}], None)
    assert cb._training_actor_item_queue == [{"epoch": 1, "step": 12, "val_cosine_seed": 0.3}]


@pytest.mark.slow
def test_worker_failure_mid_epoch_resumes_from_the_step_checkpoint(ray_local, tmp_path, sample_dataset):
    from mlflow.tracking import MlflowClient

    from archlab.platform.sweep import run_train
    from archlab.platform.train import load_state
    from archlab.platform.trainer import LRSchedule

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.num_workers=1", "train.max_failures=1", "train.checkpoint_every_steps=5",
        "train.fail_once_at_step=8", "train.scheduler=cosine", "train.warmup_frac=0.25",
    ], smoke_test=True)  # 2 epochs x 12 steps
    result = run_train(cfg)
    assert result["metrics"]["epoch"] == 2
    c = MlflowClient(uri)
    run = c.get_run(result["run_id"])
    assert run.data.params["planned_steps"] == "24"  # 2 epochs x min(6931 windows // 16, 12)
    assert [int(m.value) for m in c.get_metric_history(result["run_id"], "step")] == [12, 24]
    assert [m.step for m in c.get_metric_history(result["run_id"], "val_cosine_seed")] == [1, 2]
    sched = LRSchedule("cosine", [cfg.train.lr], warmup=6, total=24)
    lrs = [m.value for m in c.get_metric_history(result["run_id"], "lr")]
    assert lrs == pytest.approx([cfg.train.lr * sched.factor_at(11), cfg.train.lr * sched.factor_at(23)])
    # the driver loaded the final checkpoint with weights_only=True to log and register it
    assert result["registry"] and result["registry"][0]["name"] == "archlab-vector-lstm"
    states = [load_state(p.parent) for p in (tmp_path / "runs").rglob("state.pt")]
    assert states and all(s["format"] == 2 for s in states)
    assert max(s["step"] for s in states) == 24
