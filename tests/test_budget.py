"""Compute budgets (train.budget, docs/compute.md): runs given the same FLOPs stop within one
optimizer step of them whatever the architecture, evaluations sit on the budget grid, the
LR schedule's length follows the budget, the cumulative counters survive a restart, and
ASHA's rungs are in the budget's unit. Ray-free (the Trainer over in-memory tensors) apart
from one `archlab train` run through real Ray Train and MLflow."""

from __future__ import annotations

import io

import pytest
import torch

from archlab.architectures import build_model, make_config
from archlab.platform import flops
from archlab.platform.config import ConfigError, load_config
from archlab.platform.losses import make_loss
from archlab.platform.trainer import Trainer, planned_steps, samples_per_step
from tests.test_trainer import D, vector_batches

B = 8


def batches(n: int = 5, length: int = 6, seed: int = 0) -> list[dict]:
    """Learnable sequences of B windows (test_trainer's: a fixed rotation, unit norm)."""
    return vector_batches(n, B, length, seed)


def cfg_for(arch: str, *overrides: str):
    return load_config(None, [f"model.arch={arch}", f"train.batch_size={B}", "train.num_workers=1", "train.lr=3e-3",
                              *overrides])


def build(arch: str):
    torch.manual_seed(0)
    return build_model(arch, "vector", make_config(arch, "debug"), d_in=D)


def fps_of(arch: str, data) -> float:
    return flops.flops_per_sample(build(arch), data[0]["x"], "vector", loss_fn=make_loss("mse"))


def run(cfg, data, fps: float = 0.0, on_step=None, trainer: Trainer | None = None, peak: bool = False):
    """fit() over `data` as every pass, 2 validation batches; the evaluations it made."""
    tr = trainer or Trainer(build(cfg.model.arch), cfg, total_steps=planned_steps(cfg, {}, fps), flops_per_sample=fps)
    if peak:
        tr.measure_peak(seconds=0.05)
    evals = []
    tr.fit(lambda epoch: data, lambda: data[:2], on_step=on_step,
           on_eval=lambda t, m, last: evals.append({**m, "last": last}))
    return tr, evals


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_a_flops_budget_stops_within_one_optimizer_step_of_it(arch):
    data = batches(5)
    fps = {a: fps_of(a, data) for a in ("lstm", "transformer")}
    assert fps["lstm"] != fps["transformer"]  # counted on the model, so the budgets mean different step counts
    # the same FLOPs for both: 13 steps of the costlier one, more of the other; passes of 5 steps
    budget = 12.5 * B * max(fps.values())
    cfg = cfg_for(arch, "train.budget.kind=flops", f"train.budget.value={budget}", "train.evals=4",
                  "train.scheduler=cosine", "train.warmup_frac=0.1")
    per_step = fps[arch] * samples_per_step(cfg)
    tr, evals = run(cfg, data, fps[arch], peak=True)
    assert tr.train_flops() >= budget and tr.train_flops() - per_step < budget
    assert tr.step == planned_steps(cfg, {}, fps[arch]) == tr.total_steps  # the LR schedule ends at the stop
    assert tr.epoch >= 1  # the budget spans several passes over the data
    # evaluations: 4, each at the first optimizer step whose cumulative FLOPs reach its grid point
    assert [e["eval"] for e in evals] == [1, 2, 3, 4] and [e["last"] for e in evals] == [False] * 3 + [True]
    for i, e in enumerate(evals, 1):
        point = budget * i / 4
        assert e["train_flops"] == e["samples_seen"] * fps[arch] == e["step"] * per_step
        assert e["train_flops"] >= point > e["train_flops"] - per_step
        assert {"val_cosine_seed", "train_loss", "flops_per_sample", "peak_flops", "mfu", "train_time_s"} <= set(e)
    assert evals[-1]["step"] == tr.step and evals[-1]["train_flops"] == tr.train_flops()
    assert evals[-1]["peak_flops"] > 0 and 0 < evals[-1]["mfu"] < 1
    times = [e["train_time_s"] for e in evals]
    assert times == sorted(times) and times[0] > 0


def test_a_samples_budget_and_its_grid():
    data = batches(5)
    cfg = cfg_for("lstm", "train.budget.kind=samples", "train.budget.value=100", "train.evals=5", "train.grad_accum=2")
    assert samples_per_step(cfg) == 16 and planned_steps(cfg, {}) == 7  # ceil(100 / 16)
    tr, evals = run(cfg, data)
    assert tr.samples_seen >= 100 > tr.samples_seen - 16 and tr.step == 7
    # grid 20, 40, 60, 80, 100 samples; a step is 16 samples (2 micro-batches of 8)
    assert [(e["eval"], e["step"], e["samples_seen"]) for e in evals] == [
        (1, 2, 32), (2, 3, 48), (3, 4, 64), (4, 5, 80), (5, 7, 112)]
    # the odd micro-batch at each pass end (5 per pass, 2 per step) is dropped with its
    # incomplete accumulation and not counted: the count is that of the optimizer steps
    assert "train_flops" not in evals[0]  # no flops_per_sample measured: no FLOP metrics


def test_a_step_that_crosses_several_grid_points_evaluates_once_under_the_highest():
    data = batches(5)
    cfg = cfg_for("lstm", "train.budget.kind=samples", "train.budget.value=16", "train.evals=8")
    tr, evals = run(cfg, data)
    assert [(e["eval"], e["samples_seen"]) for e in evals] == [(4, 8), (8, 16)] and evals[-1]["last"]


def test_a_seconds_budget_stops_on_train_time():
    data = batches(5)
    cfg = cfg_for("lstm", "train.budget.kind=seconds", "train.budget.value=0.3", "train.evals=2")
    tr, evals = run(cfg, data)
    assert [e["eval"] for e in evals] == [1, 2]
    assert evals[-1]["train_time_s"] >= 0.3 and evals[0]["train_time_s"] >= 0.15
    assert planned_steps(cfg, {}) == 0


def test_epochs_budget_is_the_epoch_loop():
    """kind=epochs (the default) is train.epochs train_epoch calls, metric for metric."""
    data = batches(4)
    cfg = cfg_for("lstm", "train.epochs=3")
    ref = Trainer(build("lstm"), cfg)
    loop = [ref.train_epoch(data, data[:2]) for _ in range(3)]
    tr, evals = run(cfg, data)
    assert [e["eval"] for e in evals] == [1, 2, 3] == [e["epoch"] for e in evals]
    for a, b in zip(loop, evals):
        assert set(a) < set(b) and b["samples_seen"] == 4 * B * b["epoch"]
        for k in ("val_loss", "train_loss", "step", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-6), k
    for p, q in zip(ref.module.parameters(), tr.module.parameters()):
        assert torch.equal(p, q)


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_counters_survive_a_restart_from_a_mid_pass_checkpoint():
    data = batches(5)
    cfg = cfg_for("lstm", "train.budget.kind=flops", f"train.budget.value={12 * B * fps_of('lstm', data)}",
                  "train.evals=4", "train.scheduler=cosine")
    fps = fps_of("lstm", data)
    ref, ref_evals = run(cfg, data, fps)
    assert ref.step == 12

    class Killed(Exception):
        pass

    snap = {}

    def kill_at_7(tr):  # step 7: the second pass's 2nd batch, after evaluation 2 (step 6)
        if tr.step == 7:
            snap["state"] = _save_load(tr.state_dict())
            raise Killed

    with pytest.raises(Killed):
        run(cfg, data, fps, on_step=kill_at_7)
    s = snap["state"]
    assert (s["step"], s["epoch"], s["batches_in_epoch"], s["samples_seen"], s["evals_done"]) == (7, 1, 2, 56, 2)
    torch.manual_seed(999)
    resumed = Trainer(build("lstm"), cfg, total_steps=planned_steps(cfg, {}, fps), flops_per_sample=fps)
    resumed.load_state_dict(s)
    assert resumed.train_flops() == 56 * fps and resumed.train_time_s > 0
    tr, evals = run(cfg, data, trainer=resumed)
    assert [e["eval"] for e in evals] == [3, 4]  # the index carries on; nothing evaluated twice
    for a, b in zip(evals, ref_evals[2:]):
        for k in ("step", "samples_seen", "train_flops", "epoch"):
            assert a[k] == b[k], k
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    assert evals[-1]["train_time_s"] > s["train_time_s"]  # cumulative over the restart
    for p, q in zip(tr.module.parameters(), ref.module.parameters()):
        assert torch.equal(p, q)
    # a run restored after its last evaluation has nothing left to do
    again = Trainer(build("lstm"), cfg, total_steps=12, flops_per_sample=fps)
    again.load_state_dict(_save_load(tr.state_dict()))
    assert run(cfg, data, trainer=again)[1] == [] and again.step == 12


@pytest.mark.parametrize("overrides, words", [
    (["train.budget.kind=flop"], ["train.budget.kind", "epochs, samples, flops, seconds", "'flop'"]),
    (["train.budget.kind=flops"], ["train.budget.value", "kind=flops", "None"]),
    (["train.budget.kind=samples", "train.budget.value=0"], ["train.budget.value", "> 0", "0.0"]),
    (["train.budget.kind=epochs", "train.budget.value=3"], ["train.budget.value", "expected 4", "found 3"]),
    (["train.evals=3"], ["train.evals", "expected 4", "found 3"]),
    (["train.budget.kind=seconds", "train.budget.value=60", "train.scheduler=cosine"],
     ["train.budget.kind=seconds", "train.scheduler=cosine"]),
])
def test_budget_config_errors_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_default_budget_is_the_epochs():
    t = load_config(None, ["train.epochs=3"]).train
    assert (t.budget_kind, t.budget_value, t.n_evals, t.budget) == ("epochs", 3.0, 3, None)
    t = load_config(None, ["train.budget.kind=flops", "train.budget.value=1e9"]).train
    assert (t.budget_kind, t.budget_value, t.n_evals) == ("flops", 1e9, 8)


def test_asha_rungs_are_in_flops():
    from archlab.platform.sweep import asha_budget, asha_scheduler

    cfg = load_config(None, ["train.budget.kind=flops", "train.budget.value=8e12", "train.evals=8",
                             "sweep.grace_period=1", "sweep.reduction_factor=2"])
    sched = asha_scheduler(cfg)
    assert sched._time_attr == "train_flops" and sched._max_t == 8e12
    milestones = sorted(m for m, _ in sched._brackets[0]._rungs)
    assert milestones == pytest.approx([1e12, 2e12, 4e12, 8e12])  # 1/8, 1/4, 1/2, 1 of the budget: evaluation points
    assert asha_budget(load_config(None, ["train.budget.kind=samples", "train.budget.value=1000",
                                          "train.evals=4", "sweep.grace_period=2"])) == ("samples_seen", 1000.0, 500.0)
    # kind=epochs: exactly the scheduler before budgets existed
    ep = asha_scheduler(load_config(None, ["train.epochs=4", "sweep.grace_period=1"]))
    assert ep._time_attr == "epoch" and ep._max_t == 4 and sorted(m for m, _ in ep._brackets[0]._rungs) == [1, 2, 4]


def test_progress_line_shows_the_budget_unit():
    from archlab.platform.progress import progress_line

    line = progress_line("aaaa1111", "transformer", "RUNNING", 1.2e12, 5e12, "val_cosine_seed", 0.3, 443.2,
                         unit="train_flops")
    assert "FLOPs 1.2T/5T [##------]  24%" in line and len(line) <= 100, line
    assert "epoch 2/4" in progress_line("a", "lstm", "RUNNING", 2, 4, "val_loss", None, None)


@pytest.mark.slow
def test_flops_budget_run_logs_compute_metrics_through_ray(ray_local, tmp_path, sample_dataset):
    """`archlab train` with train.budget.kind=flops on a local Ray, in local mode (the
    worker function in the driver's process: a Ray Train worker runs the same function,
    and its DDP path is test_reliability.py's): the worker
    measures flops_per_sample (the same count as here) and the matmul peak, stops at the
    optimizer step that reaches the budget, and logs the compute metrics at every
    evaluation (MLflow step = evaluation index), over more than one pass of the data.
    The same run is the end-to-end check of a 64-vector context with head=residual: it
    evaluates, logs the collapse check, and the registered spec carries head and context.
    (One run for both.)"""
    import math

    from mlflow.tracking import MlflowClient

    from archlab.platform.data import inspect_dataset
    from archlab.platform.sweep import run_train
    from archlab.platform.train import _run_loss, build_from_spec, model_spec
    from archlab.platform.trainer import example_batch

    uri = f"sqlite:///{tmp_path}/m.db"
    base = [f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
            "model.arch=lstm", "train.num_workers=0", "train.max_steps_per_epoch=6",
            "model.head=residual", "data.context=64",
            # 29 of the sample's 60 train documents are shorter than 65 vectors: the data check
            # refuses them as short_doc unless told to train without them
            "data.on_bad_rows=skip"]
    probe = load_config(None, base, smoke_test=True)  # batch 16
    info = inspect_dataset(probe)
    data_info = {"dim": info.dim, "vocab_size": info.vocab_size}
    torch.manual_seed(0)
    fps = flops.flops_per_sample(build_from_spec(model_spec(probe, data_info)), example_batch(probe, data_info),
                                 "vector", loss_fn=_run_loss(probe))
    budget = fps * 16 * 8.5  # 9 steps: one pass of 6, then 3 of the next
    cfg = load_config(None, [*base, "train.budget.kind=flops", f"train.budget.value={budget}", "train.evals=3"],
                      smoke_test=True)
    result = run_train(cfg)
    assert result["metrics"]["eval"] == 3 and result["metrics"]["step"] == 9
    c = MlflowClient(uri)
    rid = result["run_id"]
    assert c.get_run(rid).data.params["planned_steps"] == "9"

    def hist(name):
        return sorted((m.step, m.value) for m in c.get_metric_history(rid, name))

    tf = hist("train_flops")
    assert [s for s, _ in tf] == [1, 2, 3]
    for (i, v), steps in zip(tf, (3, 6, 9)):  # grid: 8.5 x (1/3, 2/3, 1) steps -> first steps 3, 6, 9
        assert v == pytest.approx(fps * 16 * steps) and v >= budget * i / 3
    assert [v for _, v in hist("samples_seen")] == [48, 96, 144]
    assert [s for s, _ in hist("val_cosine_seed")] == [1, 2, 3]
    assert all(v == pytest.approx(fps) for _, v in hist("flops_per_sample"))
    peaks = hist("peak_flops")
    assert peaks and all(v > 0 for _, v in peaks)
    mfus = [v for _, v in hist("mfu")]
    assert len(mfus) == 3 and all(0 < v < 1 for v in mfus)
    times = [v for _, v in hist("train_time_s")]
    assert times == sorted(times) and times[0] > 0
    assert result["registry"] and result["registry"][0]["name"] == "archlab-vector-lstm"
    # the 64-vector context with the residual head, end to end
    m = result["metrics"]
    assert math.isfinite(m["val_cosine_seed"]) and m["val_windows"] > 0
    run = c.get_run(rid)
    assert 0.0 < run.data.metrics["val_pred_self_cos"] <= 1.0
    row = next(r for r in result["leaderboard"]["rows"] if r["entry"] == "lstm")
    # 9 steps from the linear average: far from one vector for every context
    assert row["collapsed"] is False and row["val_pred_self_cos"] == run.data.metrics["val_pred_self_cos"]
    from archlab.platform import modelstore

    model = modelstore.load_model(f"models:/{result['registry'][0]['name']}/{result['registry'][0]['version']}", uri)
    assert (model.head_type, model.context) == ("residual", 64)
