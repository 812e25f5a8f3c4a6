"""The every-architecture smoke sweep through the whole platform: every registered
architecture on the vector task, one trial each, in local mode (train.num_workers 0: each
trial trains in its Tune trial's process, ~9 s a trial on 2 cores against ~28 s with one
Ray Train worker, benchmarks/trial_overhead.py --compare local). Ray Train's own path is
the same for every architecture and is tested by the demo, DDP, job, fault and multi-node
tests. (The token task's smoke sweep, a byte LM on the real WikiText-2 bytes, runs as a
Ray job in test_job_submit.py.)"""

import math

import pytest

from archlab.architectures import list_specs
from archlab.platform.config import load_config

pytestmark = pytest.mark.slow


def test_smoke_sweep_includes_every_architecture(ray_local, tmp_path, sample_dataset):
    from archlab.platform.sweep import run_sweep

    archs = [s.name for s in list_specs() if "vector" in s.tasks]
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
        f"sweep.storage_path={tmp_path / 'runs'}", "sweep.name=zoo", f"sweep.archs=[{', '.join(archs)}]",
        f"sweep.num_samples={len(archs)}", "train.num_workers=0", "train.epochs=1",
        "train.max_steps_per_epoch=4", "data.max_valid_windows=64", "tracking.register_models=false",
        "sweep.confirm.top_k=0",  # every arch runs; a confirm stage would double the CI time
    ], smoke_test=True)
    result = run_sweep(cfg)
    errors = {t["trial_id"]: t["error"] for t in result["trials"] if t["error"]}
    assert not errors, errors
    swept = {t["spec"]["arch"] for t in result["trials"]}
    assert swept == set(archs)  # the fairness enqueue gives every architecture its trial
    for t in result["trials"]:
        assert math.isfinite(t["metrics"]["val_cosine_seed"]), t
        assert t["model_uri"]  # every trial's final model is logged
        assert t["checkpoint"].startswith(str(tmp_path / "runs" / f"train-trial_id={t['trial_id']}"))
    board = {r["entry"] for r in result["leaderboard"]["rows"]}
    assert set(archs) | {"linear_average", "persistence"} <= board
