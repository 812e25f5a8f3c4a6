"""Ray Train layer 1: `train_fn_per_worker`, and `fit_trainer` which runs one TorchTrainer.

Per worker: build the model, `prepare_model` (DDP: gloo on CPU, nccl on GPU), stream
windows from the worker's equal shard, BF16 autocast where the device runs it natively,
AdamW, gradient accumulation and clipping, ReduceLROnPlateau, evaluation with metrics
all-reduced over workers, a checkpoint every epoch, and `ray.train.report`. Rank 0 logs
the epoch's metrics to the trial's MLflow run (an explicit run id made by the driver).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from archlab.platform.config import ArchlabConfig

log = logging.getLogger("archlab")

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
SPEC_FILE = "model_spec.json"


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
    return build_model(
        spec["arch"], spec["task"], arch_cfg, d_in=spec.get("d_in"), vocab_size=spec.get("vocab_size")
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: parameters marked `_no_weight_decay` (SSM A/dt, decay rates; mamba's
    convention) are never decayed, the rest get `weight_decay`."""
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (keep if getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    """Sum metric sums over workers (each evaluated its own equal shard of the windows)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _vector_loss(model, x, loss_fn):
    # x: (B, L, D); predict x[:, 1:] from x[:, :-1] at every position
    pred = model(x[:, :-1])  # (B, L-1, D), unit norm
    target = x[:, 1:]
    return loss_fn(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1, target.shape[-1]).float())


def _token_loss(model, x):
    # x: (B, L) int64; next-token cross-entropy at every position
    logits = model(x[:, :-1])  # (B, L-1, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, batches, cfg: ArchlabConfig, loss_fn, device, autocast, tokens_per_byte: float = 1.0):
    """Metrics over this worker's validation shard, summed over workers."""
    model.eval()
    if cfg.train.task == "vector":
        from archlab.platform.metrics import VectorMetrics

        every, seed = VectorMetrics(), VectorMetrics()
        loss_sum, n_batches = 0.0, 0
        for batch in batches:
            x = batch["x"].to(device)
            with autocast:
                pred = model(x[:, :-1])  # (B, L-1, D)
            pred = pred.float()
            target = x[:, 1:]
            d = pred.shape[-1]
            every.update(pred.reshape(-1, d), target.reshape(-1, d))
            # the seed protocol: the full context of `context` vectors -> the next one
            seed.update(pred[:, -1], target[:, -1])
            loss_sum += float(loss_fn(pred.reshape(-1, d), target.reshape(-1, d))) * x.shape[0]
            n_batches += x.shape[0]
        sums = {f"every.{k}": v for k, v in every.sums().items()}
        sums.update({f"seed.{k}": v for k, v in seed.sums().items()})
        sums["loss_sum"], sums["loss_n"] = loss_sum, float(n_batches)
        sums = _all_reduce_sums(sums, device)
        ev = VectorMetrics.finalize({k[6:]: v for k, v in sums.items() if k.startswith("every.")})
        sd = VectorMetrics.finalize({k[5:]: v for k, v in sums.items() if k.startswith("seed.")})
        out = {"val_loss": sums["loss_sum"] / max(sums["loss_n"], 1.0), "val_cosine": ev["cosine"]}
        out.update({"val_cosine_seed": sd["cosine"], "val_mse_seed": sd["mse"], "val_windows": sums["seed.n"]})
        out.update({f"val_{k}_seed": v for k, v in sd.items() if k.startswith("frac_")})
        return out
    nll, count = 0.0, 0.0
    for batch in batches:
        x = batch["x"].to(device)
        with autocast:
            logits = model(x[:, :-1])
        nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    sums = _all_reduce_sums({"nll": nll, "n": count}, device)
    loss = sums["nll"] / max(sums["n"], 1.0)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss / math.log(2) * tokens_per_byte,
        "val_tokens": sums["n"],
    }


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop. `config`: {"cfg": ArchlabConfig dict, "data_info": {...},
    "tracking_uri": str | None, "mlflow_run_id": str | None}."""
    import ray.train
    import ray.train.torch

    cfg = ArchlabConfig.model_validate(config["cfg"])
    data_info = config["data_info"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)

    device = ray.train.torch.get_device()
    from archlab.platform.runtime import choose_precision

    precision = choose_precision(cfg.train.precision, device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    )
    spec = model_spec(cfg, data_info)
    model = build_from_spec(spec)
    n_params = sum(p.numel() for p in model.parameters())
    model = ray.train.torch.prepare_model(model)

    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    sched = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience
        )
        if cfg.train.scheduler == "plateau"
        else None
    )
    if cfg.train.task == "vector":
        from archlab.platform.losses import make_loss

        loss_fn = make_loss(cfg.train.loss)
    else:
        loss_fn = None

    start_epoch, step, train_time_total = 0, 0, 0.0
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        train_time_total = state.get("train_time_s", 0.0)
        log.info("rank %d resumed from epoch %d (step %d)", rank, state["epoch"], step)

    client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(config["tracking_uri"])
        _log_params_once(client, config["mlflow_run_id"], {
            "precision": precision, "device": str(device.type), "world_size": world, "n_params": n_params,
        })

    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    accum = cfg.train.grad_accum
    for epoch in range(start_epoch, cfg.train.epochs):
        if cfg.train.fail_once_at_epoch == epoch and not restored:
            # fault injection for restart tests: fails only on a run that did not resume
            raise RuntimeError(f"injected failure at epoch {epoch} (train.fail_once_at_epoch)")
        model.train()
        t_epoch = time.perf_counter()
        t_wait, n_samples, loss_sum, n_micro = 0.0, 0, 0.0, 0
        batches = iter(train_shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.train.seed + epoch if cfg.data.shuffle_buffer else None,
            drop_last=True,  # equal shards + equal batch counts: no DDP collective waits forever
            prefetch_batches=2,  # keep windows ready while the step computes
        ))
        opt.zero_grad(set_to_none=True)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t_wait += time.perf_counter() - t0
            if batch is None:
                break
            x = batch["x"].to(device)
            last_micro = (n_micro + 1) % accum == 0
            sync = nullcontext() if (last_micro or not hasattr(model, "no_sync")) else model.no_sync()
            with sync:
                with autocast:
                    loss = _vector_loss(model, x, loss_fn) if loss_fn else _token_loss(model, x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss {loss.item()} at epoch {epoch}, step {step} "
                        f"(arch={cfg.model.arch}, lr={opt.param_groups[0]['lr']:.3g})"
                    )
                (loss / accum).backward()
            n_micro += 1
            if last_micro:
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            loss_sum += float(loss.detach())
            n_samples += x.shape[0]
            if cfg.train.max_steps_per_epoch and n_micro >= cfg.train.max_steps_per_epoch * accum:
                break
        train_time = time.perf_counter() - t_epoch
        train_time_total += train_time
        metrics = evaluate(
            _unwrap(model), valid_shard.iter_torch_batches(batch_size=256), cfg, loss_fn, device, autocast,
            tokens_per_byte=float(data_info.get("tokens_per_byte", 1.0)),
        )
        totals = _all_reduce_sums({"samples": n_samples, "loss": loss_sum, "micro": n_micro, "wait": t_wait}, device)
        metrics.update({
            "epoch": epoch + 1,  # the platform's own step counter for ASHA (1-based)
            "step": step,
            "train_loss": totals["loss"] / max(totals["micro"], 1.0),
            "samples_per_s": totals["samples"] / max(train_time, 1e-9),
            "data_wait_frac": totals["wait"] / world / max(train_time, 1e-9),
            "lr": opt.param_groups[0]["lr"],
            "train_time_s": train_time_total,  # training only, summed over epochs and restarts
        })
        if sched is not None:
            sched.step(metrics["val_loss"])
        if client is not None:
            _log_metrics(client, config["mlflow_run_id"], metrics, step=epoch + 1)

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({
                    "model": _unwrap(model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "epoch": epoch,
                    "step": step,
                    "train_time_s": train_time_total,
                }, Path(tmp) / STATE_FILE)
                (Path(tmp) / SPEC_FILE).write_text(json.dumps(spec))
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _log_params_once(client, run_id: str, params: dict[str, Any]) -> None:
    run = client.get_run(run_id)
    for k, v in params.items():
        if k not in run.data.params:  # a restarted worker logs the same run again
            client.log_param(run_id, k, v)


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=batch)


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

    `name` carries the trial id and never a timestamp: Ray resumes a run by its name."""
    import ray.train
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.train.use_gpu
    if use_gpu is None:
        import ray

        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "data_info": data_info,
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.train.cpus_per_worker)))}},
        ),
        datasets=datasets,
    )
    return trainer.fit()
