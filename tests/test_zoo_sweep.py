"""Smoke sweeps through the whole platform: every registered architecture on the vector
task (one trial each), and the token task (byte LM) on the real WikiText-2 bytes."""

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
        f"sweep.num_samples={len(archs)}", "train.num_workers=1", "train.epochs=1",
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
    board = {r["entry"] for r in result["leaderboard"]["rows"]}
    assert set(archs) | {"linear_average", "persistence"} <= board


def test_byte_lm_smoke_sweep_on_real_bytes(ray_local, tmp_path, shared_data):
    from archlab.platform.prepare import parquet_to_token_shards
    from archlab.platform.sweep import run_sweep

    data = tmp_path / "bytes"
    for split in ("train", "valid"):
        parquet_to_token_shards(shared_data / "wikitext2-bytes" / f"{split}.parquet", data, split=split,
                                tokens_col="bytes", length_col="n_valid", docs="wikitext")
    cfg = load_config(None, [
        f"data.path={data}", "train.task=token", f"tracking.uri=sqlite:///{tmp_path}/m.db",
        f"sweep.storage_path={tmp_path / 'runs'}", "sweep.name=bytes", "sweep.archs=[lstm, transformer]",
        "sweep.num_samples=2", "train.num_workers=2", "data.seq_len=64", "data.max_valid_windows=128",
        "train.lr=3e-3", "train.max_steps_per_epoch=20", "sweep.confirm.top_k=0",
    ], smoke_test=True)
    result = run_sweep(cfg)
    assert not [t for t in result["trials"] if t["error"]]
    rows = {r["entry"]: r for r in result["leaderboard"]["rows"]}
    assert rows["uniform"]["val_bpb"] == pytest.approx(8.0)
    for arch in ("lstm", "transformer"):
        r = rows[arch]
        assert math.exp(r["val_loss"]) == pytest.approx(r["val_ppl"], rel=1e-6)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)  # byte tokens
        assert r["val_bpb"] < 8.0  # learned something: better than a uniform guess over 256 bytes
    assert {d["name"] for d in result["registry"]} == {"archlab-token-lstm", "archlab-token-transformer"}
