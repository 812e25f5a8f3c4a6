"""Ray's three layers (CONVENTIONS 9): train_fn_per_worker (train.py) -> train_driver_fn
(one Tune trial = one TorchTrainer) -> Tuner(train_driver_fn) with Optuna TPE over a
define-by-run space that first picks the architecture, and ASHA on the run's budget
(train.budget: epochs, samples, FLOPs or seconds; asha_scheduler).

Everything that can be refused is refused here, on the driver, before any worker starts:
the config, every architecture name and its search space, the data (manifest, shard
footers, rows). MLflow gets a parent run per job and a child run per trial.

Reliability rules (issue 11):
- a job's identity is a UUID recorded with its parent run id in `<storage>/<sweep_id>/
  archlab_job.json`: a new job always makes new runs; `--resume` reuses that job's runs;
- a trial's final checkpoint and metrics are read from its Train run's checkpoints in the
  storage (not from Tune's last result, which a killed driver may have left stale); a
  restarted trial whose Train run had already finished reports those metrics again;
- a trial that ends with a terminal error (failures.TERMINAL_ERRORS) is FAILED, with the
  reason on its run, and not retried; a trial without a loadable checkpoint is an error;
- every run the job opened is ended FAILED or KILLED on every exit path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archlab.platform import leaderboard as leaderboard_tags, tracking
from archlab.platform.config import ArchlabConfig, ConfigError
from archlab.platform.data import DatasetInfo
from archlab.search_spaces import MODEL_SETTINGS

log = logging.getLogger("archlab")

CHAMPION_ALIAS = tracking.CHAMPION
JOB_FILE = "archlab_job.json"  # <storage>/<sweep_id>/: the job's UUID and its parent run
RESULT_FILE = "archlab_result.json"  # <storage>/<sweep_id>/: what run_sweep returns, as JSON
EXTEND_DIR = "extend"  # <storage>/<sweep_id>/extend-<n>: the n-th --add-samples' Tune run
TRIAL_FILE = "archlab_trial.json"  # in each Tune trial folder: trial id, run id, Train run, error
PRUNED_KEY = "pruned"  # in a trial's record once its checkpoints are deleted: its spec, metrics, model URI
TAG_CHECKPOINTS = "archlab.checkpoints"  # on a run: "pruned" once housekeeping deleted its checkpoints


@dataclass
class Job:
    """What the driver prepared once and every trial shares."""

    cfg: ArchlabConfig
    info: DatasetInfo
    datasets: dict[str, Any]
    valid_windows: np.ndarray  # the seed protocol's windows (data.valid_window_lengths)
    baselines: dict[str, dict[str, float]]
    uri: str
    storage: str
    experiment_id: str
    data_info: dict[str, Any] = field(default_factory=dict)
    ctx_windows: np.ndarray | None = None  # full-context windows, for a vector data.context > 5


def check_archs(cfg: ArchlabConfig, archs: list[str], smoke: bool) -> None:
    """Unknown names list the known ones; each arch supports the task, its search space
    loads, and its flavor builds with the overrides (a bad field names itself); every head
    the arch can get (model.head, its space's choices) is one it takes, and the sequence
    length the data gives it fits its maximum length field (MAX_LENGTH_FIELD)."""
    from archlab.architectures import get_spec, load_module, make_config
    from archlab.architectures.io import HEADS, residual_refusal
    from archlab.search_spaces import load_space

    task = cfg.train.task
    if task == "token" and cfg.model.head != "plain":
        raise ConfigError(
            f"model.head={cfg.model.head!r}: the residual head adds the linear-average baseline of the "
            "context vectors, a vector-task head; train.task='token' takes only model.head=plain"
        )
    for arch in cfg.sweep.space_overrides:
        if arch not in archs:
            raise ConfigError(f"sweep.space_overrides.{arch}: not one of sweep.archs ({', '.join(archs)})")
    for arch in archs:
        spec = get_spec(arch)
        if task not in spec.tasks:
            raise ConfigError(
                f"sweep.archs: {arch!r} supports task(s) {', '.join(spec.tasks)}, not train.task={task!r}"
            )
        space = load_space(arch, smoke=smoke, overrides=cfg.sweep.space_overrides.get(arch), task=task)
        overrides = cfg.model.arch_overrides() if arch == cfg.model.arch else {}
        arch_cfg = make_config(arch, cfg.model.flavor, overrides)
        mod = load_module(arch)
        head_choices = space.get("model.head", {}).get("choices", [])
        bad = [h for h in head_choices if h not in HEADS]
        if bad:
            raise ConfigError(f"search space of {arch}: model.head choices must be in {', '.join(HEADS)}, found {bad}")
        refusal = residual_refusal(mod) if task == "vector" else None
        if refusal and "residual" in {cfg.model.head, *head_choices}:
            where = "model.head" if cfg.model.head == "residual" else f"the search space of {arch} (model.head)"
            raise ConfigError(f"{where}: 'residual' is not available for {arch!r}: {refusal}")
        _check_max_length(cfg, arch, mod, arch_cfg, space)


def _check_max_length(cfg: ArchlabConfig, arch: str, mod, arch_cfg, space: dict) -> None:
    """A model with a fixed maximum length (learned positions, a fixed projection) must
    take the windows the data cuts: data.context vectors (vector) / data.seq_len tokens."""
    field = getattr(mod, "MAX_LENGTH_FIELD", None)
    if not field:
        return
    need, need_name = (cfg.data.context, "data.context") if cfg.train.task == "vector" else (cfg.data.seq_len, "data.seq_len")
    entry = space.get(f"model.{field}")
    if entry is None:
        found, src = getattr(arch_cfg, field), f"model.{field}"
    else:  # every value the sweep can sample must fit
        found = min(entry["choices"]) if "choices" in entry else entry["low"]
        src = f"the search space of {arch} (model.{field})"
    if found < need:
        how = (f"--set model.{field}={need}" if arch == cfg.model.arch and entry is None
               else f"sweep.space_overrides.{arch}.model.{field}: {{choices: [{need}]}}")
        raise ConfigError(
            f"{need_name}={need}: {arch!r} ({cfg.model.flavor} flavor) takes at most {found} positions "
            f"({src}); raise it ({how}) or shorten {need_name}"
        )


def _data_info(info: DatasetInfo) -> dict[str, Any]:
    return {
        "dim": info.dim, "vocab_size": info.vocab_size, "dataset_id": info.dataset_id,
        "dataset_name": info.name, "tokens_per_byte": info.tokens_per_byte,
    }


def check_model_builds(cfg: ArchlabConfig, info: DatasetInfo | dict[str, Any]) -> None:
    """Build the configured model once on the driver: a combination its Config accepts
    but its module refuses (d_model not divisible by n_heads, ...) fails here, naming the
    architecture, not in every worker."""
    from archlab.architectures.registry import ArchConfigError
    from archlab.platform.train import build_from_spec, model_spec

    data_info = info if isinstance(info, dict) else _data_info(info)
    try:
        build_from_spec(model_spec(cfg, data_info))
    except (ValueError, TypeError, AssertionError) as e:
        raise ArchConfigError(
            f"model: {cfg.model.arch!r} (flavor {cfg.model.flavor!r}) does not build with "
            f"{cfg.model.arch_overrides() or 'no overrides'}: {type(e).__name__}: {e}"
        ) from None


def prepare_job(cfg: ArchlabConfig, verbose: bool = False) -> Job:
    from archlab.platform.data import inspect_dataset, make_ray_datasets, materialized_windows, train_window_count
    from archlab.platform.runtime import check_shared_storage, init_ray, storage_path, tracking_uri
    from archlab.platform.trainer import check_schedule

    info = inspect_dataset(cfg)  # before Ray starts: bad data fails fast
    n_windows = train_window_count(cfg, info)  # plans the LR schedule's length
    check_schedule(cfg, {"train_windows": n_windows})
    check_model_builds(cfg, info)
    storage = storage_path(cfg)
    if cfg.train.num_workers == 0 and "://" in storage:
        raise ConfigError(f"train.num_workers: 0 (local mode) writes checkpoints itself and needs a file-system "
                          f"sweep.storage_path, found {storage!r}")
    uri = tracking_uri(cfg)
    init_ray(cfg, verbose=verbose)
    check_shared_storage(storage, cfg)  # before any worker starts
    datasets = make_ray_datasets(cfg, info)
    windows = materialized_windows(datasets["valid"])
    ctx_windows = materialized_windows(datasets["valid_ctx"]) if "valid_ctx" in datasets else None
    baselines = compute_baselines(cfg, info, windows, ctx_windows)
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment or cfg.sweep.name)
    return Job(cfg, info, datasets, windows, baselines, uri, storage, exp_id,
               {**_data_info(info), "train_windows": n_windows, "valid_ctx": ctx_windows is not None},
               ctx_windows)


def compute_baselines(cfg: ArchlabConfig, info: DatasetInfo, windows: np.ndarray,
                      ctx_windows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Baselines on exactly the validation windows the workers evaluate. Vector: on the
    seed-protocol windows under the usual names ("cosine", "mse", ...), and with
    `ctx_windows` (data.context > 5) on those too, as "<metric>_ctx" ("cosine_ctx", ...:
    logged as baseline.<name>.cosine_ctx)."""
    if info.kind == "vector":
        from archlab.platform.baselines import evaluate_baselines
        from archlab.platform.data import read_vector_docs

        train_docs = read_vector_docs(info.files[cfg.data.train_split], info.dim)
        # each window is one "document" of L vectors: one window per document, whose first
        # L - 1 vectors are the context
        out = evaluate_baselines(train_docs, list(windows), context=windows.shape[1] - 1, seed=cfg.train.seed)
        if ctx_windows is not None:
            full = evaluate_baselines(train_docs, list(ctx_windows), context=ctx_windows.shape[1] - 1,
                                      seed=cfg.train.seed)
            for name, m in full.items():
                out[name].update({f"{k}_ctx": v for k, v in m.items()})
        return out
    # token task: unigram (train frequencies) and uniform next-token losses
    import pyarrow.parquet as pq

    counts = np.ones(info.vocab_size, dtype=np.float64)  # add-one smoothing
    for f in info.files[cfg.data.train_split]:
        col = pq.read_table(f, columns=["tokens"]).column("tokens").combine_chunks()
        counts += np.bincount(col.values.to_numpy(zero_copy_only=False), minlength=info.vocab_size)
    logp = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    out = {}
    for name, loss in (("unigram", float(-logp[targets].mean())), ("uniform", math.log(info.vocab_size))):
        out[name] = {"val_loss": loss, "val_bpb": loss / math.log(2) * info.tokens_per_byte}
    return out


def trial_cfg(base: dict[str, Any], trial_config: dict[str, Any]) -> ArchlabConfig:
    """Apply one trial's sampled parameters ('<arch>.model.x', '<arch>.train.y') to the base."""
    arch = trial_config["arch"]
    d = copy.deepcopy(base)
    d["model"]["arch"] = arch
    if arch != base["model"]["arch"]:
        # overrides in the base config belong to the base arch only; flavor and head are
        # model settings of the whole sweep
        d["model"] = {"arch": arch, "flavor": base["model"]["flavor"],
                      "head": base["model"].get("head", "plain"), "params": {}}
    for key, value in trial_config.items():
        if not key.startswith(arch + "."):
            continue
        section, name = key[len(arch) + 1:].split(".", 1)
        if f"{section}.{name}" in MODEL_SETTINGS:
            d["model"][name] = value  # e.g. model.head: a ModelConfig field, not an arch field
        elif section == "model":
            d["model"].setdefault("params", {})[name] = value
        else:
            d[section][name] = value
    return ArchlabConfig.model_validate(d)


CONFIRM_KEY = leaderboard_tags.CONFIRM_KEY  # a confirm trial's Tune config: {CONFIRM_KEY: point}
CONFIRM_DIR = "confirm"  # the confirm stage's Tune run: <storage>/<sweep_id>/confirm


def config_hash(cfg: ArchlabConfig) -> str:
    """The `config_hash` tag: the resolved trial config without train.seed, so a search
    trial and its confirm runs on other seeds share it (docs/compare.md)."""
    import hashlib

    d = cfg.to_dict()
    d["train"].pop("seed", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def confirm_seeds(cfg: ArchlabConfig) -> list[int]:
    """The confirm stage's seeds, the same for every architecture: sweep.confirm.seeds, or
    train.seed + 1 .. train.seed + 3 (2 under smoke_test). Not train.seed itself: the
    search selected its winners on that seed, and retraining them on it would repeat the
    selection's optimism instead of measuring the config."""
    if cfg.sweep.confirm.seeds is not None:
        return list(cfg.sweep.confirm.seeds)
    n = 2 if cfg.smoke_test else 3
    return [cfg.train.seed + i for i in range(1, n + 1)]


def select_confirm(trials: list[dict[str, Any]], archs: list[str], top_k: int, seeds: list[int],
                   metric: str, mode: str, sweep_id: str) -> list[dict[str, Any]]:
    """The confirm stage's runs: per architecture (in `archs` order) its best `top_k`
    distinct configs (by config_hash) among the search trials that finished without error
    with a finite `metric`, each on every seed. Ties break by config hash, so a resumed
    job picks the same. Ordered seed by seed, so a stage cut short leaves complete pairs.

    A point's trial id, `<sweep_id>-c<hash>-s<seed>`, is a function of what it runs: never
    a search trial id (Tune's), and the same again when a resumed job has to rebuild the
    stage, so it finds its MLflow run and Train run back instead of duplicating them."""
    sign = -1.0 if mode == "max" else 1.0
    picked: list[dict[str, Any]] = []
    for arch in archs:
        ok = [t for t in trials if not t.get("error") and (t.get("config") or {}).get("arch") == arch
              and t.get("config_hash") and isinstance(t["metrics"].get(metric), (int, float))
              and math.isfinite(t["metrics"][metric])]
        ok.sort(key=lambda t: (sign * t["metrics"][metric], t["config_hash"]))
        seen: set[str] = set()
        for t in ok:
            if len(seen) >= top_k:
                break
            if t["config_hash"] not in seen:
                seen.add(t["config_hash"])
                picked.append(t)
    return [{"trial_id": f"{sweep_id}-c{t['config_hash'][:8]}-s{seed}", "seed": seed, "arch": t["config"]["arch"],
             "config": t["config"], "config_hash": t["config_hash"], "search_trial": str(t["trial_id"])}
            for seed in seeds for t in picked]


def define_space(trial, archs: list[str], smoke: bool, overrides: dict, task: str | None = None) -> None:
    """Optuna define-by-run space: first the architecture, then that architecture's own
    parameters (names prefixed by the arch, so TPE models each branch separately)."""
    from archlab.search_spaces import load_space, suggest

    arch = trial.suggest_categorical("arch", archs)
    suggest(trial, arch, load_space(arch, smoke=smoke, overrides=overrides.get(arch), task=task))


def latest_checkpoint(train_dir: str | Path, epoch_end: bool = False) -> tuple[str, dict[str, Any]] | None:
    """The Train run's last complete checkpoint (highest epoch in its metrics.json, with
    the model state and spec beside it) and its metrics, or None. `epoch_end`: only
    checkpoints of a finished epoch (with its evaluation), not mid-epoch ones
    (train.checkpoint_every_steps): a trial's final model is the one its metrics are of."""
    from archlab.platform.train import MID_EPOCH, SPEC_FILE, STATE_FILE

    best = None
    for d in Path(train_dir).glob("checkpoint_*"):
        if not ((d / STATE_FILE).is_file() and (d / SPEC_FILE).is_file() and (d / "metrics.json").is_file()):
            continue  # a checkpoint being written or deleted when the driver stopped
        try:
            metrics = json.loads((d / "metrics.json").read_text())
            json.loads((d / SPEC_FILE).read_text())
        except (OSError, ValueError):
            continue
        if epoch_end and metrics.get(MID_EPOCH):
            continue
        # evaluations on a budget grid share an epoch: the evaluation index, then the step
        key = (metrics.get("eval", metrics.get("epoch", 0)), metrics.get("epoch", 0), metrics.get("step", 0), d.name)
        if best is None or key > best[0]:
            best = (key, str(d), metrics)
    return None if best is None else (best[1], best[2])


def backfill_epoch_metrics(c, run_id: str, ckpt_metrics: dict[str, Any]) -> bool:
    """Log a checkpoint's epoch metrics (its metrics.json) to the run if the run lacks that
    epoch: the worker's buffered writes of the epoch Tune stopped the trial at (ASHA) can
    die with the worker before delivery, but the checkpoint holds them. Returns whether it
    logged. The run then shows the metrics of the model finalize logs."""
    from archlab.platform.train import MID_EPOCH

    key = "eval" if "eval" in ckpt_metrics else "epoch"  # the MLflow step: the evaluation index
    epoch = ckpt_metrics.get(key)
    if not isinstance(epoch, int) or ckpt_metrics.get(MID_EPOCH):
        return False
    if any(m.step == epoch for m in c.get_metric_history(run_id, key)):
        return False
    numeric = {k: float(v) for k, v in ckpt_metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    tracking.log_metrics(c, run_id, numeric, step=epoch)
    log.info("run %s: epoch %d metrics logged from its checkpoint (the worker's writes were lost)", run_id, epoch)
    return True


def attach_final_checkpoint(c, trial: dict[str, Any], train_dir) -> bool:
    """Give `trial` its Train run's final (epoch-end) checkpoint under `train_dir`: its
    path ("checkpoint"), its model spec ("spec") and its metrics over trial["metrics"]
    (the checkpoint is the model finalize logs; Tune's last result may be stale), logging
    them to the run if the worker's writes of that evaluation were lost
    (backfill_epoch_metrics). False, and `trial` untouched, if there is none."""
    found = latest_checkpoint(train_dir, epoch_end=True)
    if found is None:
        return False
    ckpt, ckpt_metrics = found
    if trial.get("run_id") is not None:
        backfill_epoch_metrics(c, trial["run_id"], ckpt_metrics)
    trial["metrics"] = {**trial.get("metrics", {}), **ckpt_metrics, "checkpoint_path": ckpt}
    trial["checkpoint"] = ckpt
    trial["spec"] = json.loads((Path(ckpt) / "model_spec.json").read_text())
    return True


def train_driver_fn(trial_config: dict[str, Any], *, base: dict, ctx: dict, datasets: dict) -> None:
    """Layer 2: one Tune trial launches one TorchTrainer and forwards its reports to Tune.

    A trial restarted after its Train run had finished (the sweep driver was killed after
    the last epoch) reports that run's last metrics again instead of training nothing. A
    terminal error ends the trial FAILED with its reason and returns: Tune would retry a
    raise, and the error would come back the same."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from archlab.platform.failures import TERMINAL_ERRORS, TrialFailed, describe
    from archlab.platform.train import fit_trainer
    from archlab.platform.trainer import run_complete

    tctx = tune.get_context()
    trial_id = tctx.get_trial_id()
    point = trial_config.get(CONFIRM_KEY)
    if point is not None:  # a confirm run: a search trial's config on one confirm seed
        trial_id, trial_config = point["trial_id"], point["config"]
    name = f"train-trial_id={trial_id}"  # no timestamp: a restarted trial resumes its run
    record = {"trial_id": trial_id, "train_dir": str(Path(ctx["storage"]) / name), "run_id": None, "error": None}
    # the trial's folder as a fresh actor's get_trial_dir() gives it: a reused actor
    # (local mode) gets its working directory there instead (Ray 2.60's reset_config)
    record_file = Path(tctx.get_storage().trial_driver_staging_path) / TRIAL_FILE
    c = tracking.client(ctx["uri"])
    stage_tags = {leaderboard_tags.TAG_STAGE: leaderboard_tags.STAGE_SEARCH}
    if point is not None:
        stage_tags = {leaderboard_tags.TAG_STAGE: leaderboard_tags.STAGE_CONFIRM,
                      leaderboard_tags.TAG_CONFIRM_SEED: str(point["seed"]), "archlab.search_trial": point["search_trial"]}
    try:
        cfg = trial_cfg(base, trial_config)
        if point is not None:
            cfg.train.seed = int(point["seed"])  # init and data order (train.py)
        check_model_builds(cfg, ctx["data_info"])
    except TERMINAL_ERRORS as e:  # a sampled combination the architecture refuses
        arch = trial_config.get("arch", "?")
        record["run_id"] = tracking.child_run(c, ctx["experiment_id"], ctx["parent_run_id"], ctx["sweep_id"],
                                              trial_id, arch, {"arch": arch, "trial_config": trial_config},
                                              tags=stage_tags)
        return _trial_failed(c, record, record_file, ctx["metric"], describe(e))
    params = {"arch": cfg.model.arch, "trial_id": trial_id, **cfg.to_dict(),
              "data": {**cfg.to_dict()["data"], "dataset_id": ctx["data_info"]["dataset_id"]}}
    record["run_id"] = tracking.child_run(c, ctx["experiment_id"], ctx["parent_run_id"], ctx["sweep_id"],
                                          trial_id, cfg.model.arch, params,
                                          tags={**stage_tags, leaderboard_tags.TAG_CONFIG_HASH: config_hash(cfg)})
    record_file.write_text(json.dumps(record))
    done = latest_checkpoint(record["train_dir"], epoch_end=True)
    if done is not None and run_complete(cfg, done[1]):
        tune.report({**done[1], "checkpoint_path": done[0]})
        return
    try:
        fit_trainer(
            cfg, datasets, ctx["data_info"], name=name,
            storage=ctx["storage"], tracking_uri=ctx["uri"], run_id=record["run_id"],
            callbacks=[TuneReportCallback()],
        )
    except TrialFailed as e:
        _trial_failed(c, record, record_file, ctx["metric"], str(e))


def _trial_failed(c, record: dict, record_file: Path, metric: str, error: str) -> None:
    """End a trial FAILED with its reason, for MLflow, for the driver (the trial record)
    and for Tune: a function trainable must report its metric before it returns; NaN
    makes Optuna count the trial as failed, and without `epoch` ASHA ignores it."""
    from ray import tune

    record["error"] = error
    tracking.end_run(c, record["run_id"], "FAILED", error)
    record_file.write_text(json.dumps(record))
    tune.report({metric: float("nan"), "archlab_error": error})


def allocation_points(cfg: ArchlabConfig, start: int = 0, n: int | None = None) -> list[dict[str, str]]:
    """The architecture of each search trial fixed in advance (OptunaSearch enqueues them;
    TPE samples the rest of each trial's parameters). sweep.allocation=equal: every trial,
    round-robin, so each architecture gets num_samples // len(archs) trials (the first
    num_samples % len(archs) one more). tpe: one trial per architecture first, then TPE
    picks the architecture too. `start`, `n`: trials start .. start + n - 1 of the sweep
    (default 0 .. num_samples - 1); `--add-samples` continues the round-robin where the
    sweep left it."""
    archs = list(cfg.sweep.archs)
    n = cfg.sweep.num_samples if n is None else n
    if cfg.sweep.allocation == "equal":
        return [{"arch": archs[i % len(archs)]} for i in range(start, start + n)]
    return [{"arch": a} for a in archs] if start == 0 and n >= len(archs) else []


def make_searcher(cfg: ArchlabConfig, storage=None, study_name: str | None = None, start: int = 0,
                  n: int | None = None):
    """The search stage's OptunaSearch: TPE (sweep.sampler=random: uniform draws) over each
    architecture's own space, with the architectures fixed by `allocation_points` (of
    trials start .. start + n - 1); `storage` (an Optuna journal) persists the study for
    the report and optuna-dashboard, and an extension of the sweep (`--add-samples`) loads
    the same study, so TPE continues from every trial the sweep has run."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    metric, mode = cfg.metric()
    if cfg.sweep.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.sweep.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed, multivariate=True, group=True,
                                             n_startup_trials=cfg.sweep.tpe_startup_trials)
    return OptunaSearch(
        space=functools.partial(define_space, archs=list(cfg.sweep.archs), smoke=cfg.smoke_test,
                                overrides=cfg.sweep.space_overrides, task=cfg.train.task),
        metric=metric, mode=mode,
        sampler=sampler,
        points_to_evaluate=allocation_points(cfg, start, n) or None,
        storage=storage, study_name=study_name,
    )


def reuse_actors(cfg: ArchlabConfig) -> bool:
    """Tune's reuse_actors: on in local mode (train.num_workers 0), where a trial trains in
    its own actor and a fresh actor per trial re-imports torch, dynamo, MLflow and Ray Train
    (~7 CPU-s each on this machine, most of a smoke trial); off with Ray Train workers, where
    the first reused trial hung (BENCHMARKS.md) and the trial actor only waits."""
    return cfg.train.num_workers == 0


def max_concurrent_trials(cfg: ArchlabConfig) -> int:
    """Trials that fit the cluster at once: each needs its workers plus room for Ray Data
    read tasks (one CPU), or they starve (STACK_NOTES). On a one-node cluster on this
    machine (a local Ray, whose CPUs are logical, more than the cores: STACK_NOTES) no
    more trials than the cores hold workers: on 2 cores, 8 one-worker smoke trials of the
    larger hybrids took 260 s 4 at once and 176 s 2 at once; 4 small ones 76 s either
    way (benchmarks/trial_overhead.py, BENCHMARKS.md)."""
    import ray

    from archlab.platform.runtime import one_local_node

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    res = ray.cluster_resources()
    per_worker = cfg.train.ranks * cfg.train.cpus_per_worker
    n = int(res.get("CPU", 1) // (per_worker + 1.0))
    if one_local_node():
        n = min(n, max(1, int((os.cpu_count() or 1) // max(per_worker, 1.0))))
    if cfg.train.use_gpu and res.get("GPU", 0):
        n = min(n, int(res["GPU"] // cfg.train.ranks))
    return max(1, min(n, cfg.sweep.num_samples))


def _sweep_id(storage: str, name: str, resume: bool) -> str:
    """`<name>-<n>`: a new sweep takes (and creates) the next free folder, so two jobs
    starting together never share one; --resume takes the latest."""
    def taken() -> list[int]:
        return sorted(int(p.name.rsplit("-", 1)[1]) for p in Path(storage).glob(f"{name}-*")
                      if p.name.rsplit("-", 1)[1].isdigit())

    existing = taken()
    if resume:
        if not existing:
            raise ConfigError(f"--resume: no earlier sweep named {name!r} under {storage}")
        return f"{name}-{existing[-1]}"
    n = (existing[-1] + 1) if existing else 1
    while True:
        try:
            (Path(storage) / f"{name}-{n}").mkdir(parents=True)
            return f"{name}-{n}"
        except FileExistsError:
            n += 1


def _job_record(storage: str, sweep_id: str, uri: str, resume: bool) -> dict[str, Any]:
    """The job's identity. New: a fresh UUID (runs are created for it). Resume: the UUID
    and parent run id this sweep recorded, on the same MLflow store."""
    path = Path(storage) / sweep_id / JOB_FILE
    if not resume:
        return {"job_id": uuid.uuid4().hex, "sweep_id": sweep_id, "tracking_uri": uri, "parent_run_id": None}
    if not path.is_file():
        raise ConfigError(f"--resume: {path} not found: sweep {sweep_id} has no recorded job to resume")
    rec = json.loads(path.read_text())
    if rec.get("tracking_uri") != uri:
        raise ConfigError(f"--resume: sweep {sweep_id} was tracked at {rec.get('tracking_uri')}, not {uri}")
    return rec


def _write_job_record(storage: str, rec: dict[str, Any]) -> None:
    _write_json(Path(storage) / rec["sweep_id"] / JOB_FILE, rec)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=_jsonable, indent=1))
    tmp.replace(path)  # atomic: a kill never leaves half a record


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@contextlib.contextmanager
def ends_runs_on_exit(c, exp_id: str, parent_id: str):
    """Whatever stops the job, its runs do not stay RUNNING: an interrupt (SIGINT, or
    SIGTERM turned into one by the CLI) ends them KILLED, an error FAILED with its text."""
    from archlab.platform.failures import describe

    try:
        yield
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            ended = tracking.end_open_runs(c, exp_id, parent_id, status, describe(e))
            log.warning("job stopped (%s): %d run(s) ended %s", describe(e), len(ended), status)
        except Exception as inner:  # the store itself may be what failed; keep the first error
            log.error("could not end the job's runs %s: %s", status, inner)
        raise


def run_sweep(cfg: ArchlabConfig, resume: bool = False, progress=None, verbose: bool = False,
              add_samples: int = 0) -> dict[str, Any]:
    """Layer 3: Tuner(train_driver_fn) with OptunaSearch + ConcurrencyLimiter + ASHA.

    The console shows archlab's progress lines (platform/progress.py), each passed to
    `progress` (a callable; default print); `verbose` adds Tune's per-trial tables and
    every Ray worker's output. `add_samples` K (with `resume`): extend the sweep by K
    search trials (an extension: its own Tune run, recorded in the job record, that a
    later --resume restores too), then confirm, register and report over all of them."""
    if add_samples < 0:
        raise ConfigError(f"--add-samples: expected a number of trials >= 1, found {add_samples}")
    if add_samples and not resume:
        raise ConfigError("--add-samples extends an earlier sweep: give --resume with it")
    check_archs(cfg, cfg.sweep.archs, cfg.smoke_test)
    job = prepare_job(cfg, verbose=verbose)
    sweep_id = _sweep_id(job.storage, cfg.sweep.name, resume)
    rec = _job_record(job.storage, sweep_id, job.uri, resume)
    c = tracking.client(job.uri)
    parent_id = tracking.parent_run(c, job.experiment_id, sweep_id, {
        **cfg.to_dict(), "data": {**cfg.to_dict()["data"], "dataset_id": job.info.dataset_id},
        "confirm_seeds": confirm_seeds(cfg) if cfg.sweep.confirm.top_k else [],
    }, job_id=rec["job_id"], run_id=rec["parent_run_id"])
    rec["parent_run_id"] = parent_id
    if add_samples:
        ext = rec.setdefault("extensions", [])
        ext.append({"name": f"{EXTEND_DIR}-{len(ext) + 1}", "samples": int(add_samples)})
    _write_job_record(job.storage, rec)
    with ends_runs_on_exit(c, job.experiment_id, parent_id):
        return _run_tuner(cfg, job, sweep_id, parent_id, resume, verbose, progress, rec.get("extensions", []))


def _run_tuner(cfg: ArchlabConfig, job: Job, sweep_id: str, parent_id: str, resume: bool,
               verbose: bool = False, progress=None, extensions: list[dict[str, Any]] = ()) -> dict[str, Any]:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from archlab.platform.study import sweep_journal

    metric, mode = cfg.metric()
    c = tracking.client(job.uri)
    _log_baselines(c, parent_id, job.baselines)
    ctx = {"uri": job.uri, "experiment_id": job.experiment_id, "parent_run_id": parent_id,
           "sweep_id": sweep_id, "storage": job.storage, "data_info": job.data_info, "metric": metric}
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, base=cfg.to_dict(), ctx=ctx, datasets=job.datasets),
        # the trial driver only waits on its TorchTrainer (Tune refuses 0); in local mode
        # (train.num_workers 0) it trains, with one worker's CPUs
        {"cpu": cfg.train.cpus_per_worker if cfg.train.num_workers == 0 else 0.01},
    )
    def search_tuner(storage: str, name: str, start: int, n: int):
        path = f"{storage.rstrip('/')}/{name}"
        if resume and tune.Tuner.can_restore(path):
            return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        n_conc = max(1, min(max_concurrent_trials(cfg), n))
        searcher = make_searcher(cfg, sweep_journal(job.storage, sweep_id), sweep_id, start=start, n=n)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=n_conc),
                scheduler=asha_scheduler(cfg),
                num_samples=n, reuse_actors=reuse_actors(cfg),
                # the ConcurrencyLimiter above enforces n_conc; Tune ignores (and warns about)
                # max_concurrent_trials when the searcher is already limited
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      verbose=1 if verbose else 0, callbacks=[_progress(cfg, progress)]),
        )

    _say_where_logs_go(job.storage, sweep_id, verbose)
    results = list(search_tuner(job.storage, sweep_id, 0, cfg.sweep.num_samples).fit())
    start = cfg.sweep.num_samples
    for ext in extensions:  # --add-samples: each extension its own Tune run in the sweep's folder
        print(f"{ext['name']}: {ext['samples']} more search trials (trials {start + 1}-{start + ext['samples']})",
              flush=True)
        results += list(search_tuner(f"{job.storage.rstrip('/')}/{sweep_id}", ext["name"], start,
                                     ext["samples"]).fit())
        start += ext["samples"]
    trials = [_trial_outcome(result, job, parent_id) for result in results]
    ok = [t for t in trials if t.get("spec") and not t.get("error")]
    log_final_models(job, ok)  # before the confirm stage: a kill there keeps the search's models
    prune_checkpoints(job, ok)  # only now: each pruned trial's model is in MLflow
    confirm = _run_confirm(cfg, job, sweep_id, parent_id, resume, trainable, ok, verbose, progress,
                           [e["name"] for e in extensions])
    confirm_ok = [t for t in confirm if t.get("spec") and not t.get("error")]
    decisions, board = finalize(job, [*ok, *confirm_ok], parent_id)
    n_errors = sum(1 for t in trials if t.get("error"))
    tracking.log_metrics(c, parent_id, {"n_trials": len(trials), "n_errors": n_errors, "n_confirm_runs": len(confirm),
                                        "n_confirm_errors": sum(1 for t in confirm if t.get("error"))})
    c.log_text(parent_id, board["markdown"], "leaderboard.md")
    tracking.end_run(c, parent_id, "FINISHED")
    result = {"sweep_id": sweep_id, "parent_run_id": parent_id, "trials": trials, "confirm": confirm,
              "registry": decisions, "leaderboard": board, "experiment_id": job.experiment_id,
              "tracking_uri": job.uri}
    # the job's outcome for scripts (and `ray job submit` users, who get no return value):
    # written last, so its presence says the job finished
    # without the live torch models the trials carry (each one is logged at its model_uri)
    _write_json(Path(job.storage) / sweep_id / RESULT_FILE,
                {**result, **{k: [{f: v for f, v in t.items() if f != "model"} for t in result[k]]
                              for k in ("trials", "confirm")}})
    return result


def _run_confirm(cfg: ArchlabConfig, job: Job, sweep_id: str, parent_id: str, resume: bool, trainable,
                 search: list[dict[str, Any]], verbose: bool = False, progress=None,
                 extensions: list[str] = ()) -> list[dict[str, Any]]:
    """The confirm stage: select_confirm's runs (each a search config on one confirm seed)
    as a second Tune run of train_driver_fn, every trial to train.epochs (no searcher, no
    early stopping), in `<storage>/<sweep_id>/confirm`. `--resume` restores that run
    (errored trials retried, finished ones kept) like the search's; a job killed before
    the stage saved its state rebuilds the same points, whose trial ids find their runs.

    After `--add-samples` (`extensions`: their names, oldest first) the earlier stages are
    restored and the points they did not run (new configs among the top_k) run in
    `confirm-<extension>`; confirm runs of configs no longer in the top_k stay (more
    evidence, never deleted)."""
    from ray import tune

    points = select_confirm(search, list(cfg.sweep.archs), cfg.sweep.confirm.top_k, confirm_seeds(cfg),
                            *cfg.metric(), sweep_id)
    if not points:
        return []
    metric, mode = cfg.metric()
    storage = f"{job.storage.rstrip('/')}/{sweep_id}"
    names = [CONFIRM_DIR, *(f"{CONFIRM_DIR}-{e}" for e in extensions)]
    out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        path = f"{storage}/{name}"
        if resume and tune.Tuner.can_restore(path):
            out += [_trial_outcome(result, job, parent_id)
                    for result in tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()]
            continue
        if i < len(names) - 1:
            continue  # an earlier stage that never started: the last one runs what it missed
        done = {str(t["trial_id"]) for t in out}
        todo = [p for p in points if p["trial_id"] not in done]
        if not todo:
            break
        tuner = tune.Tuner(
            trainable,
            param_space={CONFIRM_KEY: tune.grid_search(todo)},
            tune_config=tune.TuneConfig(metric=metric, mode=mode,
                                        max_concurrent_trials=max(1, min(max_concurrent_trials(cfg), len(todo))),
                                        reuse_actors=reuse_actors(cfg)),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      verbose=1 if verbose else 0, callbacks=[_progress(cfg, progress)]),
        )
        print(f"confirm stage: {len(todo)} runs ({cfg.sweep.confirm.top_k} config(s) per architecture x "
              f"seeds {', '.join(map(str, confirm_seeds(cfg)))}"
              f"{f'; {len(points) - len(todo)} ran before' if len(todo) < len(points) else ''})", flush=True)
        out += [_trial_outcome(result, job, parent_id) for result in tuner.fit()]
    return out


# ASHA's time attribute per train.budget.kind: a metric every evaluation reports
BUDGET_TIME_ATTR = {"epochs": "epoch", "samples": "samples_seen", "flops": "train_flops", "seconds": "train_time_s"}


def asha_budget(cfg: ArchlabConfig) -> tuple[str, float, float]:
    """(time_attr, max_t, grace_period) of the sweep's ASHA, in the budget's unit, so its
    rungs compare architectures at equal compute. epochs: ("epoch", train.epochs,
    min(sweep.grace_period, epochs)), as before budgets. Other kinds: max_t = the budget
    value and sweep.grace_period counts evaluation points: grace = value x
    min(grace_period, evals) / evals; the rungs are grace x reduction_factor^k, on
    evaluation points when train.evals is grace_period x a power of reduction_factor
    (default 8 evaluations, grace 1, factor 2: rungs at 1/8, 1/4, 1/2 of the budget)."""
    t = cfg.train
    if t.budget_kind == "epochs":
        return "epoch", float(t.epochs), float(min(cfg.sweep.grace_period, t.epochs))
    n = t.n_evals
    return BUDGET_TIME_ATTR[t.budget_kind], t.budget_value, t.budget_value * min(cfg.sweep.grace_period, n) / n


def asha_scheduler(cfg: ArchlabConfig):
    """The sweep's ASHAScheduler on the budget (asha_budget); Tune's FIFOScheduler (no
    early stopping) under sweep.early_stopping=none."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.early_stopping == "none":
        return FIFOScheduler()

    time_attr, max_t, grace = asha_budget(cfg)
    if cfg.train.budget_kind == "epochs":  # integers, exactly as before budgets
        max_t, grace = int(max_t), int(grace)
    return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=grace,
                         reduction_factor=cfg.sweep.reduction_factor)


def _progress(cfg: ArchlabConfig, out=None):
    """The console's per-trial progress lines, on ASHA's time attribute and budget."""
    from archlab.platform.progress import trial_progress

    metric, mode = cfg.metric()
    time_attr, max_t, _ = asha_budget(cfg)
    return trial_progress(metric, mode, time_attr=time_attr, max_t=int(max_t) if time_attr == "epoch" else max_t,
                          **({"out": out} if out is not None else {}))


def _say_where_logs_go(storage: str, name: str, verbose: bool) -> None:
    from archlab.platform.progress import ray_log_dir

    logs = ray_log_dir()
    if not verbose and logs:
        print(f"Ray's worker, raylet, Train and Data logs: {logs} (--verbose prints them here)")
    print(f"trial results and errors: {storage.rstrip('/')}/{name}", flush=True)  # a URI stays a URI


def _log_baselines(c, run_id: str, baselines: dict[str, dict[str, float]]) -> None:
    if any(k.startswith("baseline.") for k in c.get_run(run_id).data.metrics):
        return  # a resumed sweep: same data, same windows, already logged
    tracking.log_metrics(c, run_id, {
        f"baseline.{name}.{k}": v for name, m in baselines.items() for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    })


def _trial_outcome(result, job: Job, parent_id: str) -> dict[str, Any]:
    """Read one trial: its record (trial id, run, terminal error), then its final
    checkpoint and metrics from its Train run's checkpoints, not from Tune's last result
    (after a driver kill that may be stale or point at a deleted checkpoint). A trial
    without a loadable checkpoint is an error, never skipped."""
    c = tracking.client(job.uri)
    rec_file = Path(result.path or "") / TRIAL_FILE
    rec = json.loads(rec_file.read_text()) if rec_file.is_file() else {}
    trial_id = rec.get("trial_id") or (result.metrics or {}).get("trial_id") or Path(result.path or "").name
    run_id = rec.get("run_id")
    if run_id is None:  # the trial died before writing its record: find its run by tag
        runs = c.search_runs([job.experiment_id], max_results=1, filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{tracking.TAG_TRIAL}` = '{trial_id}'"))
        run_id = runs[0].info.run_id if runs else None
    error = rec.get("error") or (repr(result.error) if result.error else None)
    metrics = dict(result.metrics or {})
    out = {"trial_id": trial_id, "metrics": metrics, "run_id": run_id, "error": error}
    config = dict(result.config or {})
    point = config.get(CONFIRM_KEY)
    if point is not None:
        out.update(stage=leaderboard_tags.STAGE_CONFIRM, confirm_seed=int(point["seed"]),
                   config=point["config"], config_hash=point["config_hash"])
    else:
        try:  # the hash the trial's run is tagged with (train_driver_fn)
            h = config_hash(trial_cfg(job.cfg.to_dict(), config))
        except Exception:  # a config the platform refuses: an errored trial, never confirmed
            h = None
        out.update(stage=leaderboard_tags.STAGE_SEARCH, config=config, config_hash=h)
    out["record_file"] = str(rec_file)
    found = rec.get("train_dir") and attach_final_checkpoint(c, out, rec["train_dir"])
    if not found and error is None and rec.get(PRUNED_KEY):
        # housekeeping deleted its checkpoints after its final model was logged to MLflow
        # (prune_checkpoints): the record keeps what the job reads of it
        kept = rec[PRUNED_KEY]
        out.update(metrics={**metrics, **kept["metrics"]}, spec=kept["spec"], model_uri=kept["model_uri"],
                   checkpoint=None, pruned=True)
        found = True
    if not found and error is None:
        where = rec.get("train_dir") or result.path
        error = out["error"] = f"no loadable checkpoint under {where} (the trial ended before its first epoch)"
    if run_id is not None:
        status = c.get_run(run_id).info.status
        if error and status != "FAILED":
            tracking.end_run(c, run_id, "FAILED", error)
        elif not error and status != "FINISHED":
            tracking.end_run(c, run_id, "FINISHED")
    return out


def _load_trial_model(trial: dict[str, Any]):
    from archlab.platform.modelstore import torch_load_safe
    from archlab.platform.train import STATE_FILE, build_from_spec

    model = build_from_spec(trial["spec"])
    # weights_only: a checkpoint holds tensors and plain data; a pickled object is refused
    state = torch_load_safe(Path(trial["checkpoint"]) / STATE_FILE, map_location="cpu")
    model.load_state_dict(state["model"])
    return model.eval()


def _vector_final(model, windows: np.ndarray) -> dict[str, float]:
    """On the seed-protocol predictions of every validation window: retrieval accuracy
    with the baselines' candidate set (every window's target, see
    archlab.platform.baselines.retrieval_candidates) and the collapse check
    `val_pred_self_cos` (mean cosine of the predictions to their own mean)."""
    import torch

    from archlab.platform.metrics import prediction_self_cosine, retrieval_accuracy

    x = torch.as_tensor(windows).float()
    with torch.no_grad():
        pred = torch.cat([model(x[i: i + 512, :-1])[:, -1] for i in range(0, len(x), 512)])
    return {"retrieval_acc": retrieval_accuracy(pred, x[:, -1], candidates=x[:, -1]),
            "val_pred_self_cos": prediction_self_cosine(pred)}


def _latency_ms(model, windows: np.ndarray, task: str) -> float:
    """Milliseconds per prediction on the driver's CPU, one thread, 256 windows at once."""
    import torch

    from archlab.platform.metrics import inference_latency

    x = torch.as_tensor(windows[:256, :-1])
    x = x.float() if task == "vector" else x.long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1000.0 * inference_latency(model, x, repeats=3)
    finally:
        torch.set_num_threads(threads)


TAG_MODEL_URI = "archlab.model_uri"  # set on a run once its final model is logged


def _registered_version(c, name: str, run_id: str):
    """The version of `name` already registered from `run_id` (a resumed job), or None."""
    try:
        versions = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except Exception:  # no such registered model yet
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def _baseline_window_scores(job: Job) -> dict[str, np.ndarray]:
    """Every baseline's per-window cosine on the seed-protocol validation windows (the
    values whose means are the logged baseline.<name>.cosine)."""
    from archlab.platform.baselines import baseline_window_scores
    from archlab.platform.data import read_vector_docs

    train_docs = read_vector_docs(job.info.files[job.cfg.data.train_split], job.info.dim)
    w = job.valid_windows
    return baseline_window_scores(train_docs, list(w), context=w.shape[1] - 1, seed=job.cfg.train.seed)


def _window_comparison(model, job: Job, base_scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """The model's paired per-window comparison with the best baseline (stats.WINDOW_METRICS):
    what the leaderboard shows as d_base with its 95% CI, available for a single run."""
    from archlab.platform.metrics import window_scores
    from archlab.platform.stats import window_comparison

    return window_comparison(window_scores(model, job.valid_windows, "vector"), base_scores, mode="max")


def log_final_models(job: Job, trials: list[dict[str, Any]]) -> None:
    """Log every trial's final model to its run, with its final metrics (latency, and for
    vectors retrieval, collapse check and the window-level comparison with the best
    baseline). Sets t["model"], t["model_uri"] and updates t["metrics"].

    Idempotent for a resumed job: a run whose model is already logged (tag
    archlab.model_uri) is not logged again. A trial whose checkpoint does not load is an
    error (its run FAILED). Trials this call (or an earlier one) logged or failed are
    skipped, so a job may call it once per stage and finalize again at the end."""
    cfg = job.cfg
    c = tracking.client(job.uri)
    example = job.valid_windows[:2, :-1]
    example = example.astype(np.float32 if cfg.train.task == "vector" else np.int64)
    base_scores = None  # the baselines' per-window scores, computed once, when first needed
    for t in trials:
        if t.get("run_id") is None or t.get("model_uri") or t.get("error"):
            continue
        try:
            t["model"] = _load_trial_model(t)
        except Exception as e:
            from archlab.platform.failures import describe

            t["error"] = f"checkpoint {t['checkpoint']} does not load: {describe(e)}"
            tracking.end_run(c, t["run_id"], "FAILED", t["error"])
            continue
        run = c.get_run(t["run_id"])
        final = {"latency_ms": _latency_ms(t["model"], job.valid_windows, cfg.train.task)}
        if cfg.train.task == "vector":
            final.update(_vector_final(t["model"], job.valid_windows))
            if base_scores is None:
                base_scores = _baseline_window_scores(job)
            comparison = _window_comparison(t["model"], job, base_scores)
            final.update({k: v for k, v in comparison.items() if k != "best_baseline" and not math.isnan(v)})
            c.set_tag(t["run_id"], leaderboard_tags.TAG_BEST_BASELINE, comparison["best_baseline"])
        if TAG_MODEL_URI in run.data.tags:
            t["model_uri"] = run.data.tags[TAG_MODEL_URI]
            final = {k: run.data.metrics.get(k, v) for k, v in final.items()}  # logged once, before the kill
        else:
            t["model_uri"] = tracking.log_model(job.uri, t["run_id"], t["model"], t["spec"], example)
            tracking.log_metrics(c, t["run_id"], final)
            c.set_tag(t["run_id"], TAG_MODEL_URI, t["model_uri"])
        t["metrics"].update(final)


def prune_plan(cfg: ArchlabConfig, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search trials whose checkpoints housekeeping deletes (sweep.keep_checkpoints = k):
    those ASHA stopped before their budget's end (trainer.run_complete), whose final model
    is logged to MLflow, and that are not among the k best of their architecture by the
    sweep's metric. Trials that ran their whole budget, errored trials and confirm runs
    keep theirs. k None: none."""
    from archlab.platform.trainer import run_complete

    k = cfg.sweep.keep_checkpoints
    if k is None:
        return []
    metric, mode = cfg.metric()
    sign = -1.0 if mode == "max" else 1.0
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        if t.get("stage", leaderboard_tags.STAGE_SEARCH) == leaderboard_tags.STAGE_SEARCH and not t.get("error") \
                and t.get("spec") and _finite_score(t, metric) is not None:
            by_arch.setdefault(t["spec"]["arch"], []).append(t)
    out = []
    for ts in by_arch.values():
        ts.sort(key=lambda t: (sign * _finite_score(t, metric), str(t["trial_id"])))
        out += [t for t in ts[k:] if t.get("model_uri") and t.get("checkpoint")
                and not run_complete(cfg, t["metrics"])]
    return out


def prune_checkpoints(job: Job, trials: list[dict[str, Any]]) -> list[str]:
    """Delete the checkpoints of prune_plan's trials, each only after its record (the Tune
    trial folder's TRIAL_FILE) holds what a resumed job reads instead: spec, final metrics
    and the logged model's URI (_trial_outcome). Tags each run archlab.checkpoints=pruned.
    Returns the trial ids pruned."""
    import shutil

    c = tracking.client(job.uri)
    done = []
    for t in prune_plan(job.cfg, trials):
        rec_file = Path(t.get("record_file") or "")
        if not rec_file.is_file():
            continue  # nothing to resume from without the record: keep the checkpoints
        rec = json.loads(rec_file.read_text())
        metrics = {k: v for k, v in t["metrics"].items() if k != "checkpoint_path"
                   and isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v))}
        rec[PRUNED_KEY] = {"spec": t["spec"], "metrics": metrics, "model_uri": t["model_uri"]}
        _write_json(rec_file, rec)
        train_dir = Path(rec.get("train_dir") or Path(t["checkpoint"]).parent)
        for d in [*train_dir.glob("checkpoint_*"), *train_dir.glob(".tmp-checkpoint_*")]:
            shutil.rmtree(d, ignore_errors=True)
        c.set_tag(t["run_id"], TAG_CHECKPOINTS, "pruned")
        t.update(checkpoint=None, pruned=True)
        t["metrics"].pop("checkpoint_path", None)
        done.append(str(t["trial_id"]))
    if done:
        log.info("housekeeping: deleted the checkpoints of %d stopped trial(s) outside the %d best of their "
                 "architecture (their models are in MLflow)", len(done), job.cfg.sweep.keep_checkpoints)
    return done


def finalize(job: Job, trials: list[dict[str, Any]], parent_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Log every trial's final model and window comparison (log_final_models: those not
    logged yet), then build the leaderboard from MLflow (verdicts against the best
    baseline), then register per architecture (register_models), which needs those
    verdicts. Returns (registry decisions, leaderboard). Idempotent for a resumed job."""
    from archlab.platform.leaderboard import leaderboard

    log_final_models(job, trials)
    board = leaderboard(job.uri, job.experiment_id, parent_id, *job.cfg.metric())
    return register_models(job, [t for t in trials if t.get("model_uri") and not t.get("error")], board), board


def _finite_score(t: dict[str, Any], metric: str) -> float | None:
    v = t["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def registry_candidates(trials: list[dict[str, Any]], metric: str, mode: str,
                        seeds: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per architecture, what the registry gets: {"trial", "score", "n", "stage"}.

    With confirm runs: the config with the best mean over its confirm seeds (ties by
    config hash), registered from its run on the first seed (by `seeds` order, else the
    lowest): a run not picked for its own score; "score" is that mean, "n" its seeds.
    Without: the best search trial, "score" None (register_and_maybe_promote evaluates it)."""
    sign = -1.0 if mode == "max" else 1.0
    order = {s: i for i, s in enumerate(seeds or [])}
    out: dict[str, dict[str, Any]] = {}
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        if _finite_score(t, metric) is not None:
            by_arch.setdefault(t["spec"]["arch"], []).append(t)
    for arch, ts in sorted(by_arch.items()):
        confirm = [t for t in ts if t.get("stage") == leaderboard_tags.STAGE_CONFIRM]
        if confirm:
            groups: dict[str, list[dict[str, Any]]] = {}
            for t in confirm:
                groups.setdefault(t["config_hash"], []).append(t)
            means = {h: sum(_finite_score(t, metric) for t in g) / len(g) for h, g in groups.items()}
            h = min(sorted(means), key=lambda k: sign * means[k])
            g = sorted(groups[h], key=lambda t: (order.get(t["confirm_seed"], len(order)), t["confirm_seed"]))
            out[arch] = {"trial": g[0], "score": means[h], "n": len(g), "stage": leaderboard_tags.STAGE_CONFIRM,
                         "seeds": [t["confirm_seed"] for t in g]}
        else:
            best = min(ts, key=lambda t: (sign * _finite_score(t, metric), str(t["trial_id"])))
            out[arch] = {"trial": best, "score": None, "n": 1, "stage": leaderboard_tags.STAGE_SEARCH, "seeds": []}
    return out


TAG_VERDICT = "archlab.verdict_vs_baseline"  # better | tie | worse | none (no test possible)


def register_models(job: Job, trials: list[dict[str, Any]], board: dict[str, Any]) -> list[dict[str, Any]]:
    """Register each architecture's candidate (registry_candidates) with its verdict
    against the best baseline from `board` (the leaderboard's: by seed over confirm runs,
    by window for a single run), and move `champion` to it only when it beats the current
    champion on the same windows, by the confirm mean when there are confirm runs. A
    version whose verdict is `worse` is registered but never champion.

    Idempotent for a resumed job: a run already registered under a name gets no second
    version."""
    cfg = job.cfg
    metric, mode = cfg.metric()
    c = tracking.client(job.uri)
    decisions: list[dict[str, Any]] = []
    if not cfg.tracking.register_models:
        return decisions
    rows = {r["entry"]: r for r in board.get("rows", []) if r.get("kind") == "model"}
    for arch, cand in registry_candidates(trials, metric, mode, confirm_seeds(cfg)).items():
        t = cand["trial"]
        name = f"{cfg.tracking.registry_prefix}-{cfg.train.task}-{arch}"
        done = _registered_version(c, name, t["run_id"])
        if done is not None:
            tags = done.tags or {}
            d = {"name": name, "version": done.version, "score": float(tags.get("archlab.eval_score", "nan")),
                 "promoted": CHAMPION_ALIAS in (done.aliases or []), "verdict": tags.get(TAG_VERDICT, ""),
                 "reason": f"already registered before the resume ({tags.get('archlab.champion_decision', '')})"}
            decisions.append(d)
            continue
        row = rows.get(arch, {})
        verdict = row.get("vs_base") or "none"
        p_adj = row.get("p_base_adj")
        p_txt = f"{p_adj:.4g}" if isinstance(p_adj, float) and math.isfinite(p_adj) else ""
        base = board.get("best_baseline") or ""
        tags = {
            "arch": arch, "task": cfg.train.task, "dataset_id": job.info.dataset_id,
            "dataset": job.info.name, "metric": metric, "metric_value": f"{t['metrics'][metric]:.6f}",
            "run_id": t["run_id"], "trial_id": str(t["trial_id"]), "flavor": t["spec"]["flavor"],
            "archlab.stage": cand["stage"], TAG_VERDICT: verdict, "archlab.verdict_p_adj": p_txt,
            "archlab.verdict_by": row.get("vs_base_by") or "", "archlab.best_baseline": base,
        }
        if t.get("config_hash"):
            tags["archlab.config_hash"] = t["config_hash"]
        if cand["stage"] == leaderboard_tags.STAGE_CONFIRM:
            tags.update({"archlab.confirm_mean": f"{cand['score']:.6f}", "archlab.confirm_n": str(cand["n"]),
                         "archlab.confirm_seeds": ",".join(map(str, cand["seeds"]))})
        blocked = None
        if verdict == "worse":
            blocked = (f"never champion: verdict worse than the best baseline {base} "
                       f"(by {row.get('vs_base_by') or '?'}, Holm-adjusted p {p_txt or '-'})")
        if t.get("model") is None:  # its checkpoints pruned: the logged model (prune_checkpoints)
            from archlab.platform.modelstore import load_model

            t["model"] = load_model(t["model_uri"], job.uri)
        d = tracking.register_and_maybe_promote(job.uri, t["model_uri"], name, tags=tags,
                                                candidate=t["model"], windows=job.valid_windows,
                                                task=cfg.train.task, score=cand["score"], blocked=blocked)
        d["verdict"] = verdict
        decisions.append(d)
        log.info("registered %s v%s (%s)", name, d["version"], d.get("reason"))
    return decisions


def run_train(cfg: ArchlabConfig, verbose: bool = False) -> dict[str, Any]:
    """`archlab train`: one TorchTrainer, no Tune; tracked and registered like a trial.
    Always a new job: new parent and child runs, a new Train run folder."""
    check_archs(cfg, [cfg.model.arch], cfg.smoke_test)
    job = prepare_job(cfg, verbose=verbose)
    c = tracking.client(job.uri)
    sweep_id = _sweep_id(job.storage, f"train-{cfg.model.arch}", resume=False)
    rec = _job_record(job.storage, sweep_id, job.uri, resume=False)
    parent_id = tracking.parent_run(c, job.experiment_id, sweep_id, {
        **cfg.to_dict(), "data": {**cfg.to_dict()["data"], "dataset_id": job.info.dataset_id},
    }, job_id=rec["job_id"])
    rec["parent_run_id"] = parent_id
    _write_job_record(job.storage, rec)
    with ends_runs_on_exit(c, job.experiment_id, parent_id):
        return _train_one(cfg, job, sweep_id, parent_id, verbose)


def _train_one(cfg: ArchlabConfig, job: Job, sweep_id: str, parent_id: str, verbose: bool = False) -> dict[str, Any]:
    from archlab.platform.failures import TrialFailed
    from archlab.platform.train import fit_trainer

    c = tracking.client(job.uri)
    _log_baselines(c, parent_id, job.baselines)
    run_id = tracking.child_run(c, job.experiment_id, parent_id, sweep_id, sweep_id, cfg.model.arch,
                                {"arch": cfg.model.arch, **cfg.to_dict(),
                                 "data": {**cfg.to_dict()["data"], "dataset_id": job.info.dataset_id}},
                                tags={leaderboard_tags.TAG_STAGE: leaderboard_tags.STAGE_SEARCH,
                                      leaderboard_tags.TAG_CONFIG_HASH: config_hash(cfg)})
    from archlab.platform.progress import RunFollower

    _say_where_logs_go(job.storage, sweep_id, verbose)
    try:
        time_attr, max_t, _ = asha_budget(cfg)
        with RunFollower(sweep_id, cfg.model.arch, *cfg.metric(), epochs=max_t, time_attr=time_attr) as follower:
            result = fit_trainer(cfg, job.datasets, job.data_info, name=sweep_id, storage=job.storage,
                                 tracking_uri=job.uri, run_id=run_id, callbacks=[follower.callback()])
    except TrialFailed as e:  # terminal: the run is FAILED with its reason, nothing is retried
        tracking.end_run(c, run_id, "FAILED", str(e))
        raise
    trial = {"trial_id": sweep_id, "metrics": dict(result.metrics or {}), "run_id": run_id, "error": None}
    attach_final_checkpoint(c, trial, Path(job.storage) / sweep_id)
    metrics = trial["metrics"]
    decisions, board = finalize(job, [trial] if "spec" in trial else [], parent_id)
    if trial.get("error") or "spec" not in trial:
        reason = trial.get("error") or f"no loadable checkpoint under {Path(job.storage) / sweep_id}"
        tracking.end_run(c, run_id, "FAILED", reason)
        raise TrialFailed(reason)
    tracking.end_run(c, run_id, "FINISHED")
    tracking.end_run(c, parent_id, "FINISHED")
    return {"sweep_id": sweep_id, "parent_run_id": parent_id, "run_id": run_id, "metrics": metrics,
            "registry": decisions, "leaderboard": board, "tracking_uri": job.uri}
