"""Ray's three layers (CONVENTIONS 9): train_fn_per_worker (train.py) -> train_driver_fn
(one Tune trial = one TorchTrainer) -> Tuner(train_driver_fn) with Optuna TPE over a
define-by-run space that first picks the architecture, and ASHA on the platform's epoch.

Everything that can be refused is refused here, on the driver, before any worker starts:
the config, every architecture name and its search space, the data (manifest, shard
footers, rows). MLflow gets a parent run per sweep and a child run per trial.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archlab.platform import tracking
from archlab.platform.config import ArchlabConfig, ConfigError
from archlab.platform.data import DatasetInfo
from archlab.search_spaces import MODEL_SETTINGS

log = logging.getLogger("archlab")


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


def prepare_job(cfg: ArchlabConfig) -> Job:
    from archlab.platform.data import inspect_dataset, make_ray_datasets, materialized_windows, train_window_count
    from archlab.platform.runtime import init_ray, storage_path, tracking_uri
    from archlab.platform.trainer import check_schedule

    info = inspect_dataset(cfg)  # before Ray starts: bad data fails fast
    n_windows = train_window_count(cfg, info)  # plans the LR schedule's length
    check_schedule(cfg, {"train_windows": n_windows})
    storage = storage_path(cfg)
    uri = tracking_uri(cfg)
    init_ray(cfg)
    datasets = make_ray_datasets(cfg, info)
    windows = materialized_windows(datasets["valid"])
    ctx_windows = materialized_windows(datasets["valid_ctx"]) if "valid_ctx" in datasets else None
    baselines = compute_baselines(cfg, info, windows, ctx_windows)
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment or cfg.sweep.name)
    data_info = {
        "dim": info.dim, "vocab_size": info.vocab_size, "dataset_id": info.dataset_id,
        "dataset_name": info.name, "tokens_per_byte": info.tokens_per_byte,
        "train_windows": n_windows, "valid_ctx": ctx_windows is not None,
    }
    return Job(cfg, info, datasets, windows, baselines, uri, storage, exp_id, data_info, ctx_windows)


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


def define_space(trial, archs: list[str], smoke: bool, overrides: dict, task: str | None = None) -> None:
    """Optuna define-by-run space: first the architecture, then that architecture's own
    parameters (names prefixed by the arch, so TPE models each branch separately)."""
    from archlab.search_spaces import load_space, suggest

    arch = trial.suggest_categorical("arch", archs)
    suggest(trial, arch, load_space(arch, smoke=smoke, overrides=overrides.get(arch), task=task))


def train_driver_fn(trial_config: dict[str, Any], *, base: dict, ctx: dict, datasets: dict) -> None:
    """Layer 2: one Tune trial launches one TorchTrainer and forwards its reports to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from archlab.platform.train import fit_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_cfg(base, trial_config)
    c = tracking.client(ctx["uri"])
    params = {"arch": cfg.model.arch, "trial_id": trial_id, **cfg.to_dict(),
              "data": {**cfg.to_dict()["data"], "dataset_id": ctx["data_info"]["dataset_id"]}}
    run_id = tracking.child_run(c, ctx["experiment_id"], ctx["parent_run_id"], ctx["sweep_id"],
                                trial_id, cfg.model.arch, params)
    fit_trainer(
        cfg, datasets, ctx["data_info"],
        name=f"train-trial_id={trial_id}",  # no timestamp: a restarted trial resumes its run
        storage=ctx["storage"], tracking_uri=ctx["uri"], run_id=run_id,
        callbacks=[TuneReportCallback()],
    )


def max_concurrent_trials(cfg: ArchlabConfig) -> int:
    """Trials that fit the cluster at once: each needs its workers plus room for Ray Data
    read tasks (one CPU), or they starve (STACK_NOTES)."""
    import ray

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    res = ray.cluster_resources()
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + 1.0
    n = int(res.get("CPU", 1) // per_trial)
    if cfg.train.use_gpu and res.get("GPU", 0):
        n = min(n, int(res["GPU"] // cfg.train.num_workers))
    return max(1, min(n, cfg.sweep.num_samples))


def _sweep_id(storage: str, name: str, resume: bool) -> str:
    """`<name>-<n>`: a new sweep takes the next free n; --resume takes the latest."""
    existing = sorted(
        (int(p.name.rsplit("-", 1)[1]) for p in Path(storage).glob(f"{name}-*") if p.name.rsplit("-", 1)[1].isdigit()),
    )
    if resume:
        if not existing:
            raise ConfigError(f"--resume: no earlier sweep named {name!r} under {storage}")
        return f"{name}-{existing[-1]}"
    return f"{name}-{(existing[-1] + 1) if existing else 1}"


def run_sweep(cfg: ArchlabConfig, resume: bool = False, progress=None) -> dict[str, Any]:
    """Layer 3: Tuner(train_driver_fn) with OptunaSearch + ConcurrencyLimiter + ASHA."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    check_archs(cfg, cfg.sweep.archs, cfg.smoke_test)
    job = prepare_job(cfg)
    metric, mode = cfg.metric()
    sweep_id = _sweep_id(job.storage, cfg.sweep.name, resume)
    c = tracking.client(job.uri)
    parent_id = tracking.parent_run(c, job.experiment_id, sweep_id, {
        **cfg.to_dict(), "data": {**cfg.to_dict()["data"], "dataset_id": job.info.dataset_id},
    })
    _log_baselines(c, parent_id, job.baselines)
    ctx = {"uri": job.uri, "experiment_id": job.experiment_id, "parent_run_id": parent_id,
           "sweep_id": sweep_id, "storage": job.storage, "data_info": job.data_info}
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, base=cfg.to_dict(), ctx=ctx, datasets=job.datasets),
        {"cpu": 0.01},  # the trial driver only waits on its TorchTrainer; Tune refuses 0
    )
    path = str(Path(job.storage) / sweep_id)
    if resume and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        n_conc = max_concurrent_trials(cfg)
        sampler = optuna.samplers.TPESampler(seed=cfg.sweep.seed, multivariate=True, group=True)
        # fairness: every architecture gets a trial before TPE chooses where to spend the rest
        first = [{"arch": a} for a in cfg.sweep.archs] if cfg.sweep.num_samples >= len(cfg.sweep.archs) else None
        searcher = OptunaSearch(
            space=functools.partial(define_space, archs=list(cfg.sweep.archs), smoke=cfg.smoke_test,
                                    overrides=cfg.sweep.space_overrides, task=cfg.train.task),
            metric=metric, mode=mode, sampler=sampler, points_to_evaluate=first,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=n_conc),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                        grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
                                        reduction_factor=cfg.sweep.reduction_factor),
                num_samples=cfg.sweep.num_samples,
                # the ConcurrencyLimiter above enforces n_conc; Tune ignores (and warns about)
                # max_concurrent_trials when the searcher is already limited
            ),
            run_config=tune.RunConfig(name=sweep_id, storage_path=job.storage,
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1),
        )
    grid = tuner.fit()
    trials = [_trial_outcome(result, job, parent_id) for result in grid]
    decisions = finalize(job, [t for t in trials if t.get("spec")], role_parent=parent_id)
    from archlab.platform.leaderboard import leaderboard

    board = leaderboard(job.uri, job.experiment_id, parent_id, metric, mode)
    tracking.log_metrics(c, parent_id, {"n_trials": len(trials), "n_errors": sum(1 for t in trials if t.get("error"))})
    c.log_text(parent_id, board["markdown"], "leaderboard.md")
    c.set_terminated(parent_id, "FINISHED")
    return {"sweep_id": sweep_id, "parent_run_id": parent_id, "trials": trials, "registry": decisions,
            "leaderboard": board, "experiment_id": job.experiment_id, "tracking_uri": job.uri}


def _log_baselines(c, run_id: str, baselines: dict[str, dict[str, float]]) -> None:
    if any(k.startswith("baseline.") for k in c.get_run(run_id).data.metrics):
        return  # a resumed sweep: same data, same windows, already logged
    tracking.log_metrics(c, run_id, {
        f"baseline.{name}.{k}": v for name, m in baselines.items() for k, v in m.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    })


def _trial_outcome(result, job: Job, parent_id: str) -> dict[str, Any]:
    """Read one finished trial: its child run, its last checkpoint and metrics."""
    import json

    metrics = dict(result.metrics or {})
    c = tracking.client(job.uri)
    trial_id = metrics.get("trial_id") or Path(result.path or "").name
    runs = c.search_runs([job.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                         max_results=5000)
    run = next((r for r in runs if r.data.tags.get(tracking.TAG_TRIAL) == str(trial_id)), None)
    ckpt_dir = metrics.get("checkpoint_path")
    metric, _ = job.cfg.metric()
    error = repr(result.error) if result.error else None
    if error is None and metric not in metrics:
        error = f"no result reported (the trial ended before its first evaluation: no {metric})"
    out = {"trial_id": trial_id, "metrics": metrics, "run_id": run.info.run_id if run else None, "error": error}
    if ckpt_dir and Path(ckpt_dir, "model_spec.json").exists():
        out["spec"] = json.loads(Path(ckpt_dir, "model_spec.json").read_text())
        out["checkpoint"] = ckpt_dir
    if run is not None:
        c.set_terminated(run.info.run_id, "FAILED" if error else "FINISHED")
    return out


def _load_trial_model(trial: dict[str, Any]):
    import torch

    from archlab.platform.train import STATE_FILE, build_from_spec

    model = build_from_spec(trial["spec"])
    state = torch.load(Path(trial["checkpoint"]) / STATE_FILE, map_location="cpu", weights_only=True)
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


def finalize(job: Job, trials: list[dict[str, Any]], role_parent: str | None = None) -> list[dict[str, Any]]:
    """Log every trial's final model to its run; register the best trial per architecture
    and move `champion` only if it beats the current one on the same windows."""
    cfg = job.cfg
    metric, mode = cfg.metric()
    example = job.valid_windows[:2, :-1]
    example = example.astype(np.float32 if cfg.train.task == "vector" else np.int64)
    best: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.get("run_id") is None:
            continue
        t["model"] = _load_trial_model(t)
        t["model_uri"] = tracking.log_model(job.uri, t["run_id"], t["model"], t["spec"], example)
        final = {"latency_ms": _latency_ms(t["model"], job.valid_windows, cfg.train.task)}
        if cfg.train.task == "vector":
            final.update(_vector_final(t["model"], job.valid_windows))
        t["metrics"].update(final)
        tracking.log_metrics(tracking.client(job.uri), t["run_id"], final)
        score = t["metrics"].get(metric)
        if score is None or (isinstance(score, float) and math.isnan(score)):
            continue
        arch = t["spec"]["arch"]
        cur = best.get(arch)
        if cur is None or (score > cur["metrics"][metric] if mode == "max" else score < cur["metrics"][metric]):
            best[arch] = t
    decisions = []
    if not cfg.tracking.register_models:
        return decisions
    for arch, t in sorted(best.items()):
        name = f"{cfg.tracking.registry_prefix}-{cfg.train.task}-{arch}"
        tags = {
            "arch": arch, "task": cfg.train.task, "dataset_id": job.info.dataset_id,
            "dataset": job.info.name, "metric": metric, "metric_value": f"{t['metrics'][metric]:.6f}",
            "run_id": t["run_id"], "trial_id": str(t["trial_id"]), "flavor": t["spec"]["flavor"],
        }
        d = tracking.register_and_maybe_promote(job.uri, t["model_uri"], name, tags=tags,
                                                candidate=t["model"], windows=job.valid_windows,
                                                task=cfg.train.task)
        decisions.append(d)
        log.info("registered %s v%s (%s)", name, d["version"], d.get("reason"))
    return decisions


def run_train(cfg: ArchlabConfig) -> dict[str, Any]:
    """`archlab train`: one TorchTrainer, no Tune; tracked and registered like a trial."""
    import json

    from archlab.platform.train import fit_trainer

    check_archs(cfg, [cfg.model.arch], cfg.smoke_test)
    job = prepare_job(cfg)
    c = tracking.client(job.uri)
    run_name = f"train-{cfg.model.arch}"
    sweep_id = _sweep_id(job.storage, run_name, resume=False)
    parent_id = tracking.parent_run(c, job.experiment_id, sweep_id, {
        **cfg.to_dict(), "data": {**cfg.to_dict()["data"], "dataset_id": job.info.dataset_id},
    })
    _log_baselines(c, parent_id, job.baselines)
    run_id = tracking.child_run(c, job.experiment_id, parent_id, sweep_id, sweep_id, cfg.model.arch,
                                {"arch": cfg.model.arch, **cfg.to_dict()})
    result = fit_trainer(cfg, job.datasets, job.data_info, name=sweep_id, storage=job.storage,
                         tracking_uri=job.uri, run_id=run_id)
    metrics = dict(result.metrics or {})
    trial = {"trial_id": sweep_id, "metrics": metrics, "run_id": run_id, "error": None}
    if result.checkpoint is not None:
        trial["checkpoint"] = result.checkpoint.path
        trial["spec"] = json.loads(Path(result.checkpoint.path, "model_spec.json").read_text())
    decisions = finalize(job, [trial] if "spec" in trial else [])
    c.set_terminated(run_id, "FINISHED")
    metric, mode = cfg.metric()
    from archlab.platform.leaderboard import leaderboard

    board = leaderboard(job.uri, job.experiment_id, parent_id, metric, mode)
    c.set_terminated(parent_id, "FINISHED")
    return {"sweep_id": sweep_id, "parent_run_id": parent_id, "run_id": run_id, "metrics": metrics,
            "registry": decisions, "leaderboard": board, "tracking_uri": job.uri}
