"""`archlab train`: 2 DDP workers (gloo), a worker failure mid-run resumes from the last
checkpoint into the same MLflow run, and nothing is logged twice."""

import pytest

from archlab.platform.config import load_config

pytestmark = pytest.mark.slow


def test_failure_resumes_from_checkpoint_into_the_same_run(ray_local, tmp_path, sample_dataset):
    from mlflow.tracking import MlflowClient

    from archlab.platform.sweep import run_train

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.epochs=3", "train.fail_once_at_epoch=1", "train.max_failures=1",
        "train.num_workers=2",
    ], smoke_test=True)
    result = run_train(cfg)
    assert result["metrics"]["epoch"] == 3
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("archlab").experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    assert [r.info.run_id for r in children] == [result["run_id"]]
    hist = c.get_metric_history(result["run_id"], "val_cosine_seed")
    assert [m.step for m in hist] == [1, 2, 3]  # epoch 2 ran once, after the resume
    steps = c.get_metric_history(result["run_id"], "step")
    assert [int(m.value) for m in steps] == [12, 24, 36]  # the optimizer step counter resumed too
    assert result["registry"] and result["registry"][0]["name"] == "archlab-vector-lstm"
