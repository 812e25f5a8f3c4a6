"""Ray Train layer 1: `train_fn_per_worker`, and `fit_trainer` which runs one TorchTrainer.

The step, the epoch, evaluation and the state dict are the Ray-free `Trainer`
(archlab/platform/trainer.py). The worker here only adapts Ray to it: build the model,
`prepare_model` (DDP: gloo on CPU, nccl on GPU), feed the worker's equal shard of Ray Data
batches, report every evaluation (epoch ends, or the train.budget grid: Trainer.fit; and
every `train.checkpoint_every_steps` optimizer steps) with a checkpoint, and let rank 0
log the evaluation's metrics to the trial's MLflow run (an explicit run id made by the
driver, step = evaluation index) through a background buffer (mlflow_buffer.py).

Compute accounting (docs/compute.md): each worker measures the model's flops_per_sample
on a batch of the run's shape and its device's matmul peak once at start-up; every
evaluation carries the cumulative samples_seen, train_flops, train_time_s and mfu, which
the Trainer's state carries over a restart.

Mid-epoch resume: the state holds the number of batches the epoch had trained on, and the
resumed worker skips that many batches of the epoch's stream before training. With one
worker the stream (block order and local shuffle, both seeded) repeats, so the resumed
run sees exactly the batches it would have; with several workers Ray Data's streaming
split hands blocks to workers as they ask, so the skipped count is exact (the schedule,
step counter and epoch length are unchanged) but which windows a worker skips may differ
from the ones it had trained on: an epoch may then repeat some windows and miss others.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from archlab.platform.config import ArchlabConfig
from archlab.platform.trainer import all_reduce_sums as _all_reduce_sums  # noqa: F401 (kept importable)
from archlab.platform.trainer import param_groups  # noqa: F401 (others import it from here)
from archlab.platform.trainer import Trainer, example_batch, planned_steps
from archlab.platform.trainer import unwrap as _unwrap  # noqa: F401

log = logging.getLogger("archlab")

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
SPEC_FILE = "model_spec.json"
# Set on the metrics of a mid-epoch checkpoint report: Tune does not see those reports
# (they carry no new evaluation; see TuneEpochReportCallback), Train keeps the checkpoint.
MID_EPOCH = "mid_epoch"
# After logging an evaluation's metrics (which follows its report) the worker waits this
# long at most for MLflow to take them; the last evaluation waits for all (MlflowBuffer.close).
FLUSH_AFTER_LOG_S = 1.0


def model_spec(cfg: ArchlabConfig, data_info: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the model outside Ray (driver, registry, users)."""
    from archlab.architectures import make_config

    arch_cfg = make_config(cfg.model.arch, cfg.model.flavor, cfg.model.arch_overrides())
    import dataclasses

    return {
        "arch": cfg.model.arch,
        "flavor": cfg.model.flavor,
        "task": cfg.train.task,
        "config": dataclasses.asdict(arch_cfg),
        "head": cfg.model.head,
        "d_in": data_info.get("dim"),
        "vocab_size": data_info.get("vocab_size"),
        "context": cfg.data.context,
        "seq_len": cfg.data.seq_len,  # token windows: `archlab evaluate` cuts the same length
        "dataset_id": data_info.get("dataset_id"),
    }


def build_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    from archlab.architectures import build_model, load_module

    mod = load_module(spec["arch"])
    arch_cfg = mod.Config(**spec["config"])
    # specs written before model.head existed have no "head": they are plain models
    return build_model(
        spec["arch"], spec["task"], arch_cfg, d_in=spec.get("d_in"), vocab_size=spec.get("vocab_size"),
        head=spec.get("head", "plain"), context=spec.get("context"),
    )


def _vector_loss(model, x, loss_fn):
    # x: (B, L, D); predict x[:, 1:] from x[:, :-1] at every position
    pred = model(x[:, :-1])  # (B, L-1, D), unit norm
    target = x[:, 1:]
    return loss_fn(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1, target.shape[-1]).float())


def _token_loss(model, x):
    # x: (B, L) int64; next-token cross-entropy at every position
    logits = model(x[:, :-1])  # (B, L-1, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _run_loss(cfg: ArchlabConfig):
    """The vector loss training uses (its own matmuls, e.g. InfoNCE, are counted); None
    for tokens (cross-entropy)."""
    if cfg.train.task != "vector":
        return None
    from archlab.platform.losses import make_loss

    return make_loss(cfg.train.loss)


def load_state(path: str | Path, device="cpu") -> dict[str, Any]:
    """A checkpoint folder's state file: tensors and plain containers only, read without
    unpickling code (`weights_only=True`)."""
    return torch.load(Path(path) / STATE_FILE, map_location=device, weights_only=True)


def newer_mid_epoch_checkpoint(storage, after_step: int, epoch: int, evals_done: int | None = None) -> Path | None:
    """A complete mid-epoch checkpoint of this Train run on local (or shared) storage that
    is later than the one Ray Train restored (`after_step`; -1: none) and in the same
    epoch, or None.

    Ray Train registers a reported checkpoint only when its controller polls the worker
    (every 2 s), and a worker's report waits in a queue of one: a worker killed right
    after an upload restarts up to two intervals back. The files are already in storage,
    so the restart takes the newest loadable one, and a SIGKILLed worker loses fewer than
    `train.checkpoint_every_steps` steps. Only mid-epoch checkpoints of the restored epoch
    are taken: an epoch-end report the controller never saw must be made again (it feeds
    Tune and ASHA), so it is recomputed; likewise one past an evaluation on the budget grid
    the restored state has not done (`evals_done`, the "eval" of a mid-epoch report). Every rank reads the same files, no writer is
    alive at a restart, so all ranks choose the same one. Remote storage: None (Ray's)."""
    import pyarrow.fs

    try:
        if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            return None
        base = Path(storage.experiment_fs_path)
    except Exception:  # a storage context without these (older Ray): keep Ray's choice
        return None
    found = []
    for d in base.glob("checkpoint_*"):
        try:
            m = json.loads((d / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if evals_done is not None and m.get("eval", evals_done) != evals_done:
            continue
        if m.get(MID_EPOCH) and m.get("epoch") == epoch and int(m.get("step", -1)) > after_step \
                and (d / STATE_FILE).is_file() and (d / SPEC_FILE).is_file():
            found.append((int(m["step"]), d))
    for _, d in sorted(found, reverse=True):
        try:
            load_state(d)  # a copy cut short by the kill does not load: take the one before
            return d
        except Exception:
            continue
    return None


LOCAL_KEEP = 2  # local mode without a score: the newest two, as CheckpointConfig(num_to_keep=2)


def _write_checkpoint(trainer: Trainer, spec: dict, metrics: dict[str, Any], d: Path) -> None:
    torch.save(trainer.state_dict(), d / STATE_FILE)
    (d / SPEC_FILE).write_text(json.dumps(spec))
    (d / "metrics.json").write_text(json.dumps(metrics))


def checkpoint_score(metrics: dict[str, Any], score: tuple[str, str]) -> float:
    """A checkpoint's rank for keeping (higher is better): its evaluation's `score`
    = (metric, mode) value, sign-flipped for mode min; -inf for a mid-epoch checkpoint or a
    missing or non-finite value (what Ray Train's CheckpointManager does with NaN)."""
    metric, mode = score
    v = metrics.get(metric)
    if metrics.get(MID_EPOCH) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return float("-inf")
    return float(v) if mode == "max" else -float(v)


def persist_local(trainer: Trainer, spec: dict, metrics: dict[str, Any], train_dir: Path,
                  score: tuple[str, str] | None = None) -> Path:
    """Local mode (train.num_workers 0) has no Train controller to persist checkpoints: write
    one under `train_dir` as `checkpoint_<eval>_<step>` (written aside, then renamed, so a
    kill never leaves half of one under that name), then keep what Ray Train's
    CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric) keeps: this newest
    one and the best evaluated one by `score` (metric, mode), at most 2; without `score`,
    the LOCAL_KEEP newest. The sweep reads them as it reads Ray Train's
    (sweep.latest_checkpoint)."""
    import shutil

    train_dir.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint_{int(metrics.get('eval', 0)):05d}_{trainer.step:010d}"
    tmp = train_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_checkpoint(trainer, spec, metrics, tmp)
    final = train_dir / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    others = sorted(p for p in train_dir.glob("checkpoint_*") if p.is_dir() and p != final)
    if score is None:
        keep = set(others[-(LOCAL_KEEP - 1):])
    else:
        def rank(d: Path) -> float:
            try:
                return checkpoint_score(json.loads((d / "metrics.json").read_text()), score)
            except (OSError, ValueError):
                return float("-inf")

        ranked = [(rank(d), d) for d in others]
        best = max(ranked, key=lambda r: r[0], default=None)  # ties: the first, the older one
        # the new one is the best when it scores at least as well: nothing else to keep
        keep = {best[1]} if best is not None and best[0] > checkpoint_score(metrics, score) else set()
    for old in others:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def newest_local_checkpoint(train_dir: Path) -> Path | None:
    """The newest checkpoint under a local-mode run's folder that loads, or None."""
    for d in sorted((p for p in train_dir.glob("checkpoint_*") if p.is_dir()), reverse=True):
        try:
            load_state(d)
            return d
        except Exception:  # cut short by a kill: take the one before
            continue
    return None


def _report(trainer: Trainer, spec: dict, metrics: dict[str, Any], rank: int, local: dict | None = None) -> None:
    """`ray.train.report` with a checkpoint written by rank 0 (every rank must call it).
    Local mode (`local`: {"dir": the run's folder, "tune": inside a Tune trial}): the
    checkpoint is written to the run's folder here, and an evaluation goes to Tune
    directly (`ray.tune.report`), which TuneReportCallback does for Train's controller."""
    import ray.train

    trainer.check_finite()  # on every rank, so a NaN ends all of them at the same point
    if local is not None:
        persist_local(trainer, spec, metrics, Path(local["dir"]), score=local.get("score"))
        local["last_metrics"] = metrics  # what fit_trainer returns
        if local.get("tune") and not metrics.get(MID_EPOCH):
            from ray import tune

            tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            _write_checkpoint(trainer, spec, metrics, Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_fn_per_worker(config: dict[str, Any], datasets: dict[str, Any] | None = None) -> None:
    """Ray Train worker loop. `config`: {"cfg": ArchlabConfig dict, "data_info": {...},
    "tracking_uri": str | None, "mlflow_run_id": str | None}, and in local mode "local":
    {"dir": the run's folder, "tune": bool}, with `datasets` the Ray datasets themselves:
    then this runs in the caller's process (fit_trainer) without Ray Train (whose API
    refuses calls from inside a Tune trial), as the one rank of a world of one."""
    import ray.train
    import ray.train.torch

    from archlab.platform.runtime import choose_precision

    cfg = ArchlabConfig.model_validate(config["cfg"])
    data_info = config["data_info"]
    local = config.get("local")  # local mode (train.num_workers 0): see _report
    ctx = None if local is not None else ray.train.get_context()
    rank, world = (0, 1) if ctx is None else (ctx.get_world_rank(), ctx.get_world_size())
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)

    if ctx is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = ray.train.torch.get_device()
    precision = choose_precision(cfg.train.precision, device)
    spec = model_spec(cfg, data_info)
    model = build_from_spec(spec)
    n_params = sum(p.numel() for p in model.parameters())
    model = model.to(device) if ctx is None else ray.train.torch.prepare_model(model)
    from archlab.platform import flops

    # compute accounting, once per worker start: the model's training FLOPs per sample at
    # the run's shape (cached per shape; before any DDP forward, so no all-reduce fires)
    # and, after the Trainer exists, this device's matmul peak in the dtype that runs
    fps = flops.flops_per_sample(model, example_batch(cfg, data_info, device), cfg.train.task,
                                 loss_fn=_run_loss(cfg))
    trainer = Trainer(model, cfg, device=device, precision=precision,
                      total_steps=planned_steps(cfg, data_info, flops_per_sample=fps),
                      tokens_per_byte=float(data_info.get("tokens_per_byte", 1.0)), flops_per_sample=fps)
    trainer.measure_peak()

    if local is not None:
        # no controller hands back a checkpoint: a restarted trial resumes from its folder
        restored = newest_local_checkpoint(Path(local["dir"]))
        if restored is not None:
            trainer.load_state_dict(load_state(restored, device))
    else:
        restored = ray.train.get_checkpoint()
        if restored:
            with restored.as_directory() as d:
                trainer.load_state_dict(load_state(d, device))
        newer = newer_mid_epoch_checkpoint(ctx.get_storage(), trainer.step if restored else -1, trainer.epoch,
                                           trainer.evals_done)
        if newer is not None:  # written and uploaded, but not yet registered by the controller
            trainer.load_state_dict(load_state(newer, device))
            restored = restored or newer
    if restored:
        log.info("rank %d resumed at epoch %d, batch %d of it (step %d)", rank, trainer.epoch,
                 trainer.batches_in_epoch, trainer.step)
    # the optimizer step this worker process resumed from (-1: a fresh start), logged with
    # every epoch's metrics so a restart and how much it lost can be read off the run
    resumed_from_step = trainer.step if restored else -1

    buffer = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        from archlab.platform.mlflow_buffer import MlflowBuffer

        buffer = MlflowBuffer(MlflowClient(config["tracking_uri"]), config["mlflow_run_id"])
        buffer.log_params({"precision": precision, "device": str(device.type), "world_size": world,
                           "n_params": n_params, "planned_steps": trainer.total_steps})
        # metrics (docs/compare.md, "Per child run"); the peak again at each restart's step
        buffer.log_metrics({"flops_per_sample": fps, "peak_flops": trainer.peak_flops}, step=trainer.evals_done)

    every = cfg.train.checkpoint_every_steps
    fail_at = cfg.train.fail_once_at_step

    def after_step(tr: Trainer) -> None:
        # a step that was just evaluated has its checkpoint already
        if every and tr.step % every == 0 and tr.eval_step != tr.step:
            # the metric NaN: a mid-epoch checkpoint ranks below every evaluated one for
            # CheckpointConfig's best-of (Ray sorts NaN last) instead of an error for a missing key
            _report(tr, spec, {MID_EPOCH: 1, "epoch": tr.epoch, "step": tr.step, "eval": tr.evals_done,
                               cfg.metric()[0]: float("nan")}, rank, local)
        if tr.step == fail_at and not restored:
            raise RuntimeError(f"injected failure after step {fail_at} (train.fail_once_at_step)")

    def shard(name: str):
        # local mode: the whole dataset (one rank); else this worker's equal share of it
        return datasets[name].iterator() if local is not None else ray.train.get_dataset_shard(name)

    train_shard = shard("train")
    valid_shard = shard("valid")
    # the full-context windows, given for a vector data.context > 5 (data.valid_window_lengths)
    valid_ctx_shard = shard("valid_ctx") if data_info.get("valid_ctx") else None

    def passes(epoch: int):
        if cfg.train.fail_once_at_epoch == epoch and not restored:
            # fault injection for restart tests: fails only on a run that did not resume
            raise RuntimeError(f"injected failure at epoch {epoch} (train.fail_once_at_epoch)")
        return train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed + epoch if cfg.data.shuffle_buffer else None,
            drop_last=True,  # equal shards + equal batch counts: no DDP collective waits forever
            prefetch_batches=2,  # keep windows ready while the step computes
        )

    def on_eval(tr: Trainer, metrics: dict[str, Any], last: bool) -> None:
        nonlocal buffer
        metrics["resumed_from_step"] = float(resumed_from_step)
        # the checkpoint first (report returns once it is in storage), then the MLflow log:
        # a run never shows an evaluation whose model is not on disk. Tune may stop the
        # trial right after this report (ASHA); the writes that then die with the worker
        # are logged from the checkpoint's metrics.json by the sweep (backfill_epoch_metrics)
        _report(tr, spec, metrics, rank, local)
        if buffer is not None:
            # MLflow step = evaluation index (kind epochs: the epoch, 1-based)
            buffer.log_metrics(metrics, step=int(metrics["eval"]))
            if last:
                buffer.close()
                buffer = None
            else:
                buffer.flush(FLUSH_AFTER_LOG_S)

    try:
        trainer.fit(
            passes, lambda: valid_shard.iter_torch_batches(batch_size=256),
            valid_ctx=(lambda: valid_ctx_shard.iter_torch_batches(batch_size=256)) if valid_ctx_shard else None,
            on_step=after_step if every or fail_at >= 0 else None, on_eval=on_eval,
        )
    except BaseException:
        if buffer is not None:  # the run failed: deliver what is queued, but do not hold the error long
            buffer.close(timeout_s=60.0)
        raise
    if buffer is not None:
        buffer.close()


def fit_trainer(
    cfg: ArchlabConfig,
    datasets: dict[str, Any],
    data_info: dict[str, Any],
    *,
    name: str,
    storage: str,
    tracking_uri: str | None,
    run_id: str | None,
    callbacks: list | None = None,
):
    """Run one TorchTrainer (layer 1 inside a Tune trial, or alone for `archlab train`).

    `name` carries the trial id and never a timestamp: Ray resumes a run by its name.
    A plain TuneReportCallback among `callbacks` is replaced by TuneEpochReportCallback,
    so mid-epoch checkpoint reports never reach Tune. A terminal worker error
    (failures.TERMINAL_ERRORS) is not retried and raises TrialFailed with a one-line
    reason; transient faults are retried up to max_failures. train.num_workers 0 (local
    mode) runs the loop in this process instead, with no TorchTrainer."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from archlab.platform.failures import TERMINAL_ERRORS, TrialFailed, describe, terminal_failure, trainer_class

    loop_config = {"cfg": cfg.to_dict(), "data_info": data_info, "tracking_uri": tracking_uri, "mlflow_run_id": run_id}
    local = cfg.train.num_workers == 0
    metric, mode = cfg.metric()  # what a run's best checkpoint is kept by (docs/training.md)
    if local:
        # the loop runs here, without Ray Train (its API refuses calls from inside a Tune
        # trial, and its local mode persists no checkpoint): it writes its checkpoints
        # and reports to Tune itself (_report); Tune's FailureConfig retries a fault
        loop_config["local"] = {"dir": str(Path(storage) / name),
                                "tune": any(isinstance(cb, TuneReportCallback) for cb in callbacks or []),
                                "score": [metric, mode]}
        try:
            train_fn_per_worker(loop_config, datasets)
        except TERMINAL_ERRORS as e:  # the loop's own exception; Tune retries anything else
            raise TrialFailed(describe(e)) from None
        return ray.train.Result(metrics=loop_config["local"].get("last_metrics"), checkpoint=None, path=None,
                                error=None)
    callbacks = [_tune_epoch_report_callback()() if type(cb) is TuneReportCallback else cb for cb in callbacks or []]

    use_gpu = cfg.train.use_gpu
    if use_gpu is None:
        import ray

        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = trainer_class()(  # a TorchTrainer that does not retry terminal errors (failures.py)
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # the latest checkpoint (Ray always keeps it: restarts resume from it) and the
            # best evaluated one, at most 2 per run (docs/operations.md, housekeeping)
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric,
                                                         checkpoint_score_order=mode),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.train.cpus_per_worker)))}},
        ),
        datasets=datasets,
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        terminal = terminal_failure(e)
        if terminal is None:
            raise  # a transient fault that outlived its retries
        raise TrialFailed(describe(terminal)) from None



@functools.lru_cache(maxsize=None)
def _tune_epoch_report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneEpochReportCallback(TuneReportCallback):
        """TuneReportCallback for epoch-end reports only. A mid-epoch checkpoint report
        (metrics with MID_EPOCH) has no evaluation: Tune's searcher (OptunaSearch reads the
        metric from every result) and ASHA (time_attr epoch) must not see it; Train keeps
        its checkpoint, and a restarted trial resumes from it through Train's own state."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get(MID_EPOCH):
                return
            super().after_report(run_context, metrics, checkpoint)

    return TuneEpochReportCallback


def __getattr__(name: str):
    # ray.tune stays out of `import archlab.platform.train` (CLI start-up time)
    if name == "TuneEpochReportCallback":
        return _tune_epoch_report_callback()
    raise AttributeError(name)
