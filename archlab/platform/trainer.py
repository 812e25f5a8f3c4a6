"""A Ray-free Trainer: one step, one epoch, evaluation and the state dict, for any archlab
model on either task. The Ray worker (train.py, `train_fn_per_worker`) only adapts Ray
Data batches to it, reports and checkpoints; benchmarks and unit tests drive it directly
over in-memory tensors.

What it owns: the optimiser (AdamW, or schedule-free AdamW), the LR schedule with its
warm-up, the task loss plus the model's auxiliary losses (archlab.architectures.aux),
autocast, gradient accumulation (DDP `no_sync` on all but the last micro-batch) and
clipping, and the position in the run (optimizer step, epoch, batches of the current
epoch) so a checkpoint taken mid-epoch resumes where it stopped.

Host syncs: a step reads nothing back from the device. Losses are summed on the device;
the non-finite check records the first bad step on the device too and is read every
`check_every` optimizer steps, before every checkpoint and at the epoch's end, so a NaN
still raises FloatingPointError naming the step where it first appeared.

Under torch.distributed (initialised by the caller) every sum is all-reduced over the
workers before it becomes a metric, so metrics do not depend on the number of workers.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from archlab.architectures.aux import collect_aux_losses, collect_routing_stats, has_aux_losses, weighted_aux_total
from archlab.platform.config import ArchlabConfig

log = logging.getLogger("archlab")

STATE_FORMAT = 2  # 1: the epoch-only checkpoints written before the Trainer (no "format" key)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    """Sum metric sums over workers (each evaluated its own equal shard); identity when
    torch.distributed is not initialised. Every rank must pass the same keys."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def samples_per_step(cfg: ArchlabConfig) -> int:
    """Training windows one optimizer step consumes over all workers."""
    t = cfg.train
    return t.batch_size * t.ranks * t.grad_accum


def planned_steps(cfg: ArchlabConfig, data_info: dict[str, Any], flops_per_sample: float = 0.0) -> int:
    """Optimizer steps the whole run is planned to take (the LR schedule's length).

    train.budget kind epochs: epochs x steps per epoch, where steps per epoch = train
    windows // workers // batch_size // grad_accum (each worker gets an equal share and
    drops its last partial batch), capped by train.max_steps_per_epoch.
    `data_info["train_windows"]` is counted on the driver from the manifest
    (data.train_window_count: exact for vector windows at stride 1, an estimate for other
    strides and packed tokens). samples: ceil(value / samples per step); flops:
    ceil(value / (flops_per_sample x samples per step)), the step at which the run stops
    (`flops_per_sample` is measured on the worker; data_info["flops_per_sample"] if not
    given). seconds: unknown. 0 when unknown."""
    t = cfg.train
    kind = t.budget_kind
    if kind == "samples":
        return math.ceil(t.budget_value / samples_per_step(cfg))
    if kind == "flops":
        fps = float(flops_per_sample or data_info.get("flops_per_sample") or 0.0)
        return math.ceil(t.budget_value / (fps * samples_per_step(cfg))) if fps > 0 else 0
    if kind == "seconds":
        return 0
    per_epoch = 0
    windows = int(data_info.get("train_windows") or 0)
    if windows:
        per_epoch = windows // t.ranks // t.batch_size // t.grad_accum
    if t.max_steps_per_epoch:
        per_epoch = min(per_epoch, t.max_steps_per_epoch) if per_epoch else t.max_steps_per_epoch
    return t.epochs * per_epoch


def check_schedule(cfg: ArchlabConfig, data_info: dict[str, Any]) -> None:
    """On the driver: a schedule that needs the run's length gets one longer than its
    warm-up (the worker would refuse it only after Ray started)."""
    from archlab.platform.config import ConfigError

    t = cfg.train
    if t.optimizer == "schedule_free" or not (t.scheduler == "cosine" or t.warmup_frac):
        return
    if t.budget_kind == "flops" and not data_info.get("flops_per_sample"):
        return  # its length needs the model's FLOPs, measured on each worker (the worker refuses)
    total = planned_steps(cfg, data_info)
    warmup = t.warmup_steps or int(round(t.warmup_frac * total))
    if total <= (warmup if t.scheduler == "cosine" else 0):
        raise ConfigError(
            f"train.scheduler={t.scheduler}, train.warmup_frac={t.warmup_frac}: the run's planned steps ({total} = "
            + (f"train.epochs x train windows {data_info.get('train_windows')} // workers // batch_size // grad_accum, "
               f"capped by train.max_steps_per_epoch" if t.budget_kind == "epochs" else
               f"train.budget {t.budget_kind} {t.budget_value:g} / samples per step {samples_per_step(cfg)}")
            + f") must exceed the warm-up ({warmup})"
        )


def run_complete(cfg: ArchlabConfig, metrics: dict[str, Any]) -> bool:
    """Whether a report's (or checkpoint's) metrics are those of a finished run: its
    evaluation index reached the run's evaluations (kind epochs: the epoch count)."""
    return int(metrics.get("eval", metrics.get("epoch", 0)) or 0) >= cfg.train.n_evals


def example_batch(cfg: ArchlabConfig, data_info: dict[str, Any], device=None) -> torch.Tensor:
    """A batch of the shape training runs on (one worker's micro-batch): vector
    [batch_size, context + 1, dim] unit vectors, token [batch_size, seq_len + 1] ids. For
    `flops_per_sample`, whose count depends on shapes only (never on the values)."""
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    if cfg.train.task == "vector":
        x = F.normalize(torch.randn(b, cfg.data.context + 1, int(data_info["dim"]), generator=g), dim=-1)
    else:
        x = torch.randint(0, int(data_info["vocab_size"]), (b, cfg.data.seq_len + 1), generator=g)
    return x if device is None else x.to(device)


class LRSchedule:
    """lr(step) = base_lr x warm-up(step) x shape(step) x plateau scale, set on every
    parameter group before each optimizer step (step = steps already taken, 0-based).

    warm-up: (step + 1) / warmup for step < warmup, else 1 (schedulefree's own rule).
    shape: cosine = 0.5 (1 + cos(pi p)), p = (step - warmup) / (total - warmup) clipped to
    [0, 1] (so lr is 0 from the planned last step on); else 1.
    plateau: ReduceLROnPlateau's default rule on the epoch's val_loss (mode min, relative
    threshold 1e-4, no cooldown): after `patience` epochs without improvement the scale is
    multiplied by `factor`. Its state is plain numbers (checkpoints load weights_only).
    """

    def __init__(self, kind: str, base_lrs: list[float], *, warmup: int = 0, total: int = 0,
                 factor: float = 0.5, patience: int = 3, apply_warmup: bool = True):
        if kind == "cosine" and total <= warmup:
            raise ValueError(
                f"train.scheduler=cosine needs the planned number of steps ({total}) to exceed the warm-up "
                f"({warmup}); set train.max_steps_per_epoch or give data_info['train_windows']"
            )
        self.kind, self.base_lrs = kind, list(base_lrs)
        self.warmup = warmup if apply_warmup else 0
        self.total, self.factor, self.patience = total, factor, patience
        self.scale, self.best, self.bad_epochs = 1.0, math.inf, 0

    def factor_at(self, step: int) -> float:
        f = self.scale
        if step < self.warmup:
            f *= (step + 1) / self.warmup
        if self.kind == "cosine":
            p = min(max((step - self.warmup) / max(self.total - self.warmup, 1), 0.0), 1.0)
            f *= 0.5 * (1.0 + math.cos(math.pi * p))
        return f

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        f = self.factor_at(step)
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def on_epoch_end(self, val_loss: float) -> None:
        if self.kind != "plateau":
            return
        if val_loss < self.best * (1.0 - 1e-4):  # torch's rel threshold (inf * x stays inf)
            self.best, self.bad_epochs = val_loss, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.bad_epochs = float(state["scale"]), float(state["best"]), int(state["bad_epochs"])


def make_optimizer(model: torch.nn.Module, cfg: ArchlabConfig, warmup: int) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "schedule_free":
        import schedulefree

        # its own warm-up also weights the iterate average by lr (weight_lr_power), which a
        # schedule set from outside would not
        opt = schedulefree.AdamWScheduleFree(groups, lr=t.lr, warmup_steps=warmup)
        opt.train()
        return opt
    return torch.optim.AdamW(groups, lr=t.lr)


class Trainer:
    """Train and evaluate one model. `model` may be DDP-wrapped (the Ray worker passes
    `prepare_model`'s result); `batches` are dicts with "x" (as Ray Data gives them) or
    plain tensors: vector x [B, context + 1, D] float, token x [B, seq_len + 1] int64.

    `total_steps`: the run's planned optimizer steps (planned_steps), needed by cosine and
    warmup_frac. `precision`: "fp32" or "bf16" (autocast), as runtime.choose_precision
    decided. `flops_per_sample` (flops.flops_per_sample, or `measure_flops`) turns
    samples_seen into train_flops and is needed by a flops budget; `measure_peak` gives
    the peak `mfu` divides by. `fit` runs the whole budget (train.budget)."""

    def __init__(self, model: torch.nn.Module, cfg: ArchlabConfig, *, device=None, precision: str = "fp32",
                 total_steps: int = 0, tokens_per_byte: float = 1.0, check_every: int = 64,
                 loss: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
                 flops_per_sample: float = 0.0):
        t = cfg.train
        self._loss = loss  # batch_loss's replacement, if given
        self.cfg, self.model, self.module = cfg, model, unwrap(model)
        # train.compile: the training forward runs through torch.compile's wrapper of the same
        # module (same Parameters; state_dict, evaluation and DDP hooks use self.model)
        self.train_model = torch.compile(model) if t.compile else model
        self.device = device if device is not None else next(self.module.parameters()).device
        self.task, self.accum, self.check_every = t.task, t.grad_accum, max(1, check_every)
        self.tokens_per_byte = tokens_per_byte
        self.precision = precision
        self.autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                         if precision == "bf16" else nullcontext())
        if self.task == "vector":
            from archlab.platform.losses import make_loss

            self.loss_fn = make_loss(t.loss)
        self.total_steps = int(total_steps)
        if t.warmup_frac and self.total_steps <= 0:
            raise ValueError("train.warmup_frac needs the planned number of steps: set train.max_steps_per_epoch "
                             "or give data_info['train_windows']")
        self.warmup = t.warmup_steps or int(round(t.warmup_frac * self.total_steps))
        self.schedule_free = t.optimizer == "schedule_free"
        kind = t.scheduler
        if kind == "none":
            self.warmup = 0  # today's behaviour: the base lr from the first step
        if self.schedule_free and kind in ("plateau", "cosine"):
            log.warning("train.scheduler=%s ignored with train.optimizer=schedule_free: it has no schedule "
                        "beyond its warm-up (%d steps)", kind, self.warmup)
            kind = "constant"
        self.optimizer = make_optimizer(self.model, cfg, self.warmup if self.schedule_free else 0)
        self.schedule = LRSchedule(kind, [g["lr"] for g in self.optimizer.param_groups], warmup=self.warmup,
                                   total=self.total_steps, factor=t.plateau_factor, patience=t.plateau_patience,
                                   apply_warmup=not self.schedule_free)
        self.has_aux = has_aux_losses(self.module)
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.batches_in_epoch = 0  # micro-batches of the current epoch already trained
        self.train_time_s = 0.0  # training only, summed over evaluation intervals and restarts
        # compute accounting (docs/compute.md): cumulative over the run, restarts included
        self.world = world_size()
        # training windows of the optimizer steps taken, over all workers (equal batches, no
        # sync); a pass's last incomplete accumulation, dropped, is not counted
        self.samples_seen = 0
        self._pending = 0  # windows of the accumulation in progress
        self.flops_per_sample = float(flops_per_sample)
        self.peak_flops = math.nan  # one worker's measured matmul peak (measure_peak)
        self._peak_total = math.nan  # the sum over workers: what mfu divides by
        self.evals_done = 0  # evaluations on the budget grid (kind epochs: epochs)
        self.eval_step = -1  # the optimizer step of the latest evaluation
        self._done = False
        self._reset_epoch_sums()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- one step ----

    def _reset_epoch_sums(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)  # on the device: no per-step sync
        self._aux_sums: dict[str, torch.Tensor] = {}
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._samples, self._wait_s, self._time_s = 0, 0.0, 0.0
        self._micro = 0  # micro-batches trained since the last evaluation (kind epochs: of the epoch)
        self._t_start = None  # perf_counter since which training time runs (None: paused)

    @staticmethod
    def _x(batch) -> torch.Tensor:
        return batch["x"] if isinstance(batch, dict) else batch

    def _to_device(self, batch):
        if isinstance(batch, dict):
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch.to(self.device, non_blocking=True)

    @staticmethod
    def _batch_size(batch) -> int:
        if not isinstance(batch, dict):
            return batch.shape[0]
        return (batch["x"] if "x" in batch else next(v for v in batch.values() if torch.is_tensor(v))).shape[0]

    def batch_loss(self, model, batch) -> torch.Tensor:
        """The training loss of one micro-batch (already on the device): a scalar tensor,
        left on the device. Default: `task_loss` on batch["x"]. The `loss=` callable
        (model, batch) -> scalar, or a subclass overriding this method, replaces it for
        other layouts (the probes' loss at their marked positions only, archlab.platform.probe)."""
        if self._loss is not None:
            return self._loss(model, batch)
        return self.task_loss(model, self._x(batch))

    def task_loss(self, model, x: torch.Tensor) -> torch.Tensor:
        """Training loss at every position: x[:, 1:] predicted from x[:, :-1]."""
        if self.task == "vector":
            pred = model(x[:, :-1])  # (B, L-1, D), unit norm
            return self.loss_fn(pred.float(), x[:, 1:].float())
        logits = model(x[:, :-1])  # (B, L-1, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    def train_step(self, batch) -> bool:
        """Forward and backward one micro-batch; an optimizer step after every `grad_accum`
        micro-batches. Returns True when an optimizer step was taken."""
        batch = self._to_device(batch)
        last = (self.batches_in_epoch + 1) % self.accum == 0
        sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with self.autocast:
                loss = self.batch_loss(self.train_model, batch)
                if self.step == self.cfg.train.inject_nan_at_step:  # fault injection (tests): every rank, every try
                    loss = loss * float("nan")
                total = loss
                if self.has_aux:
                    aux = collect_aux_losses(self.module)
                    extra = weighted_aux_total(aux)
                    if extra is not None:
                        total = loss + extra
                    for name, (value, _) in aux.items():
                        v = value.detach().float()
                        self._aux_sums[name] = self._aux_sums[name] + v if name in self._aux_sums else v
            (total / self.accum).backward()
        total = total.detach()
        self._loss_sum += loss.detach().float()
        # the first micro-batch (counted over the run) whose loss was not finite, on the device
        here = self.step * self.accum + self.batches_in_epoch % self.accum
        self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(total),
                                      torch.full_like(self._first_bad, here), self._first_bad)
        self.batches_in_epoch += 1
        self._micro += 1
        n = self._batch_size(batch)
        self._samples += n
        self._pending += n * self.world  # every worker trains an equal batch (drop_last)
        if not last:
            return False
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.schedule.apply(self.optimizer, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += self._pending
        self._pending = 0
        if self.step % self.check_every == 0:
            self.check_finite()
        return True

    def check_finite(self) -> None:
        """Raise FloatingPointError if any training loss so far was NaN or inf (one host sync)."""
        bad = int(self._first_bad)
        if bad >= 0:
            step = bad // self.accum
            raise FloatingPointError(
                f"non-finite training loss at step {step} (micro-batch {bad % self.accum} of {self.accum}), "
                f"epoch {self.epoch} (arch={self.cfg.model.arch}, lr={self.lr():.3g})"
            )

    def running_loss(self) -> float:
        """Mean training loss of the current epoch so far (one host sync: for progress lines)."""
        return float(self._loss_sum) / max(self._micro, 1)

    def epoch_time_s(self) -> float:
        """Training time since the last evaluation (kind epochs: of the current epoch), a
        running pass counted up to now."""
        return self._time_s + (time.perf_counter() - self._t_start if self._t_start is not None else 0.0)

    def _pause(self) -> None:
        if self._t_start is not None:
            self._time_s += time.perf_counter() - self._t_start
            self._t_start = None

    def _resume(self) -> None:
        self._t_start = time.perf_counter()

    # ---- compute accounting ----

    def measure_flops(self, example_batch) -> float:
        """flops.flops_per_sample of this model on `example_batch` (one micro-batch of the
        training shape; cached per shape), kept for train_flops."""
        from archlab.platform import flops

        fn = self.loss_fn if self.task == "vector" and self._loss is None else None
        if self._loss is not None:
            raise ValueError("measure_flops: a Trainer with a custom loss= counts nothing here; "
                             "pass flops_per_sample= measured on that loss")
        self.flops_per_sample = flops.flops_per_sample(self.module, example_batch, self.task, loss_fn=fn)
        return self.flops_per_sample

    def measure_peak(self, seconds: float = 0.25) -> float:
        """flops.matmul_peak_flops on this worker's device in the dtype training runs in
        (bf16 under bf16 autocast, else fp32). Under torch.distributed every rank must call
        it: mfu divides by the sum of the workers' peaks."""
        from archlab.platform import flops

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        # 512^3 on CPU: ~30 ms a matmul on one thread, so the probe stays near `seconds`
        n = 512 if self.device.type == "cpu" else 1024
        self.peak_flops = flops.matmul_peak_flops(self.device, dtype, seconds=seconds, n=n)
        self._peak_total = all_reduce_sums({"peak": self.peak_flops}, self.device)["peak"]
        return self.peak_flops

    def train_flops(self) -> float:
        return self.flops_per_sample * self.samples_seen

    def elapsed_train_s(self) -> float:
        """Training time of the whole run so far (this worker's clock; restarts included)."""
        return self.train_time_s + self.epoch_time_s()

    def accounting(self) -> dict[str, float]:
        """The compute metrics (docs/compute.md): samples_seen, train_time_s, and with a
        measured flops_per_sample train_flops, with a measured peak peak_flops and mfu."""
        elapsed = self.elapsed_train_s()
        out = {"samples_seen": float(self.samples_seen), "train_time_s": elapsed}
        if self.flops_per_sample > 0:
            out.update(flops_per_sample=self.flops_per_sample, train_flops=self.train_flops())
            if math.isfinite(self.peak_flops):
                from archlab.platform import flops

                out.update(peak_flops=self.peak_flops,
                           mfu=flops.mfu(self.train_flops(), elapsed, self._peak_total))
        return out

    def spent(self) -> float:
        """The budget spent so far, in its unit (train.budget.kind). Seconds: the slowest
        worker's training time (one all-reduce when there are several), so every rank
        takes the same decision at the same step."""
        kind = self.cfg.train.budget_kind
        if kind == "samples":
            return float(self.samples_seen)
        if kind == "flops":
            return self.train_flops()
        if kind == "seconds":
            t = self.elapsed_train_s()
            if self.world > 1:
                import torch.distributed as dist

                v = torch.tensor([t], dtype=torch.float64, device=self.device)
                dist.all_reduce(v, op=dist.ReduceOp.MAX)
                t = float(v.item())
            return t
        return float(self.epoch)

    def grid_point(self, i: int) -> float:
        """The i-th evaluation point (1-based) of the budget grid: value x i / evals."""
        t = self.cfg.train
        return t.budget_value if i >= t.n_evals else t.budget_value * i / t.n_evals

    def budget_done(self) -> bool:
        return self.evals_done >= self.cfg.train.n_evals

    def lr(self) -> float:
        g = self.optimizer.param_groups[0]
        return float(g.get("scheduled_lr") or g["lr"]) if self.schedule_free else float(g["lr"])

    # ---- one epoch ----

    def train_epoch(self, batches: Iterable, valid_batches: Iterable | None = None,
                    on_step: Callable[["Trainer"], None] | None = None,
                    valid_ctx_batches: Iterable | None = None) -> dict[str, float]:
        """One pass over `batches` (at most train.max_steps_per_epoch optimizer steps).

        A Trainer restored mid-epoch first skips the batches that epoch already trained on
        (`batches_in_epoch`): given the same batch order, the resumed run sees exactly the
        batches the uninterrupted one would have. `on_step(trainer)` runs after every
        optimizer step (the worker's mid-epoch checkpoints); its time is not training time.
        With `valid_batches` (and `valid_ctx_batches`, see evaluate), evaluates at the end
        and moves the plateau schedule.
        Returns the epoch's metrics, summed over workers."""
        self._run_pass(batches, on_step)
        self.check_finite()
        metrics = self._finish_epoch()
        if valid_batches is not None:
            metrics.update(self.evaluate(valid_batches, valid_ctx_batches))
            self.schedule.on_epoch_end(metrics["val_loss"])
        return metrics

    def _run_pass(self, batches: Iterable, on_step: Callable[["Trainer"], None] | None = None,
                  stop: Callable[[], bool] | None = None) -> tuple[bool, int]:
        """Train on `batches` from the epoch's data position until they run out (or
        train.max_steps_per_epoch optimizer steps), or until `stop()` says so after an
        optimizer step. `on_step(self)` runs after every optimizer step, outside the timed
        training. Returns (whether the pass ran out, optimizer steps taken)."""
        self._train_mode()
        it = iter(batches)
        t0 = time.perf_counter()
        for _ in range(self.batches_in_epoch):  # a mid-epoch resume: the data position
            if next(it, None) is None:
                break
        self._wait_s += time.perf_counter() - t0
        max_micro = self.cfg.train.max_steps_per_epoch * self.accum
        steps0, ran_out = self.step, True
        self._resume()
        while not max_micro or self.batches_in_epoch < max_micro:
            t0 = time.perf_counter()
            batch = next(it, None)
            self._wait_s += time.perf_counter() - t0
            if batch is None:
                break
            if self.train_step(batch):
                if on_step is not None:
                    self._pause()
                    on_step(self)
                    self._resume()
                if stop is not None and stop():
                    ran_out = False
                    break
        if ran_out:  # an accumulation left incomplete at the end is dropped, as before the Trainer
            self.optimizer.zero_grad(set_to_none=True)
            self._pending = 0
        self._pause()
        return ran_out, self.step - steps0

    def _finish_epoch(self) -> dict[str, float]:
        self.epoch += 1
        self.batches_in_epoch = 0
        return self._interval_metrics()

    def _interval_metrics(self) -> dict[str, float]:
        """The training metrics since the last evaluation (kind epochs: of the epoch),
        summed over workers; starts the next interval."""
        sums = {"samples": float(self._samples), "loss": float(self._loss_sum),
                "micro": float(self._micro), "wait": self._wait_s}
        sums.update({f"aux.{k}": float(v) for k, v in self._aux_sums.items()})
        route = collect_routing_stats(self.module)  # {} at the cost of a cached empty list
        sums.update({f"route.{k}": v for k, v in route.items()})
        world = world_size()
        totals = all_reduce_sums(sums, self.device)
        t = max(self._time_s, 1e-9)
        self.train_time_s += self._time_s
        metrics = {
            "epoch": self.epoch,  # the platform's own step counter for ASHA (1-based)
            "step": self.step,
            "train_loss": totals["loss"] / max(totals["micro"], 1.0),
            "samples_per_s": totals["samples"] / t,
            "data_wait_frac": totals["wait"] / world / t,
            "lr": self.lr(),
            "train_time_s": self.train_time_s,
        }
        # aux losses: epoch mean per micro-batch, unweighted; routing stats: mean over workers
        metrics.update({f"aux_{k[4:]}": v / max(totals["micro"], 1.0) for k, v in totals.items() if k.startswith("aux.")})
        metrics.update({f"route_{k[6:]}": v / world for k, v in totals.items() if k.startswith("route.")})
        self._reset_epoch_sums()
        return metrics

    def fit(self, passes: Callable[[int], Iterable], valid: Callable[[], Iterable] | None = None, *,
            valid_ctx: Callable[[], Iterable] | None = None, on_step: Callable[["Trainer"], None] | None = None,
            on_eval: Callable[["Trainer", dict[str, float], bool], None] | None = None) -> dict[str, float]:
        """Train until train.budget is spent, evaluating on its grid; returns the last
        evaluation's metrics (train_epoch's, plus `accounting()` and `eval`, the
        evaluation index, 1-based).

        `passes(epoch)` gives the training batches of one pass over the data (the pass's
        shuffle may depend on `epoch`, passes completed); `valid()` / `valid_ctx()` fresh
        validation batches (see evaluate). `on_eval(trainer, metrics, last)` runs after
        every evaluation (the worker's report, checkpoint and MLflow log).

        kind epochs: train.epochs passes, an evaluation at every epoch end (train_epoch,
        exactly as before budgets existed). Other kinds: passes follow each other (each at
        most train.max_steps_per_epoch steps) until the budget is spent, checked after
        every optimizer step: samples/flops stop at the first step whose cumulative count
        reaches the value, seconds at the first whose train_time_s does. Evaluation i
        (1..train.evals) runs at the first optimizer step whose spend reaches
        value x i / evals; one step that crosses several points evaluates once, under the
        highest index. The plateau schedule moves at every evaluation."""
        t = self.cfg.train
        last: dict[str, float] = {}
        if t.budget_kind == "epochs":
            while self.epoch < t.epochs:
                last = self.train_epoch(passes(self.epoch), valid() if valid else None, on_step,
                                        valid_ctx() if valid_ctx else None)
                self.evals_done, self.eval_step = self.epoch, self.step
                last.update(self.accounting())
                last["eval"] = self.evals_done
                if on_eval is not None:
                    on_eval(self, last, self.epoch >= t.epochs)
            return last
        if t.budget_kind == "flops" and self.flops_per_sample <= 0:
            raise ValueError("train.budget.kind=flops needs the model's flops_per_sample (Trainer(flops_per_sample=) "
                             "or measure_flops)")
        n = t.n_evals
        out: dict[str, dict[str, float]] = {}

        def after_step(tr: "Trainer") -> None:
            spent = tr.spent()
            reached = tr.evals_done
            while reached < n and spent >= tr.grid_point(reached + 1):
                reached += 1
            if reached > tr.evals_done:
                tr.evals_done, tr.eval_step = reached, tr.step
                out["last"] = m = tr._evaluation(valid, valid_ctx)
                if on_eval is not None:
                    on_eval(tr, m, tr.budget_done())
            tr._done = tr.budget_done()
            if on_step is not None:
                on_step(tr)

        self._done = self.budget_done()
        while not self._done:
            ran_out, steps = self._run_pass(passes(self.epoch), after_step, stop=lambda: self._done)
            self.check_finite()
            if not ran_out:
                break
            if steps == 0:
                raise RuntimeError(
                    f"train.budget {t.budget_kind}={t.budget_value:g}: a pass over the training data gave no optimizer "
                    f"step (epoch {self.epoch}, {self.samples_seen} samples so far); the data is smaller than one "
                    "batch per worker x train.grad_accum")
            self.epoch += 1  # a pass completed: the next one reshuffles
            self.batches_in_epoch = 0
        return out.get("last", last)

    def _evaluation(self, valid, valid_ctx) -> dict[str, float]:
        """One evaluation on the budget grid: the training metrics since the previous one,
        the validation metrics (as at an epoch end), the accounting and the index."""
        self.check_finite()
        m = self._interval_metrics()
        if valid is not None:
            m.update(self.evaluate(valid(), valid_ctx() if valid_ctx else None))
            self.schedule.on_epoch_end(m["val_loss"])
        m.update(self.accounting())
        m["eval"] = self.evals_done
        self._train_mode()  # evaluation left the model in train mode; schedule-free back at y
        return m

    def _train_mode(self) -> None:
        self.model.train()
        if self.schedule_free:
            self.optimizer.train()  # y, the point gradients are taken at (idempotent)

    @contextmanager
    def eval_weights(self):
        """The weights to evaluate and checkpoint: schedule-free AdamW's averaged x (its docs
        require optimizer.eval() for both), the plain weights otherwise; eval mode inside."""
        was_training = self.model.training
        self.model.eval()
        if self.schedule_free:
            self.optimizer.eval()
        try:
            yield self.module
        finally:
            if self.schedule_free and was_training:
                self.optimizer.train()
            self.model.train(was_training)

    # ---- evaluation ----

    @torch.no_grad()
    def evaluate(self, batches: Iterable, ctx_batches: Iterable | None = None) -> dict[str, float]:
        """Metrics over this worker's validation batches, summed over workers. Vector:
        val_loss, val_cosine (every position), and the seed protocol (the last position of
        the seed windows, 5 context vectors -> the 6th: val_cosine_seed, val_mse_seed,
        val_frac_cos_gt_<thr>_seed, val_windows). With `ctx_batches` (the full-context
        windows of data.context + 1, given when data.context > 5): val_loss and val_cosine
        are measured on those (the windows the model trains on), and their last position
        gives val_cosine_ctx, val_mse_ctx, val_frac_cos_gt_<thr>_ctx, val_windows_ctx.
        Token: val_loss, val_ppl, val_bpb, val_tokens."""
        with self.eval_weights() as model:
            if self.task == "vector":
                return self._evaluate_vector(model, batches, ctx_batches)
            return self._evaluate_token(model, batches)

    def _vector_sums(self, model, batches, prefix: str) -> dict[str, float]:
        """Sums for every position ("<prefix>every.*"), the last position ("<prefix>last.*")
        and the loss over `batches` of windows x [B, L, D]."""
        from archlab.platform.metrics import VectorMetrics

        every, last = VectorMetrics(), VectorMetrics()
        loss_sum, n = 0.0, 0
        for batch in batches:
            x = self._x(batch).to(self.device)
            with self.autocast:
                pred = model(x[:, :-1])  # (B, L-1, D)
            pred = pred.float()
            target = x[:, 1:]
            d = pred.shape[-1]
            every.update(pred.reshape(-1, d), target.reshape(-1, d))
            # the window's whole context -> the next vector
            last.update(pred[:, -1], target[:, -1])
            loss_sum += float(self.loss_fn(pred.reshape(-1, d), target.reshape(-1, d))) * x.shape[0]
            n += x.shape[0]
        sums = {f"{prefix}every.{k}": v for k, v in every.sums().items()}
        sums.update({f"{prefix}last.{k}": v for k, v in last.sums().items()})
        sums[f"{prefix}loss_sum"], sums[f"{prefix}loss_n"] = loss_sum, float(n)
        return sums

    def _evaluate_vector(self, model, batches, ctx_batches=None) -> dict[str, float]:
        from archlab.platform.metrics import VectorMetrics

        sums = self._vector_sums(model, batches, "seed.")
        if ctx_batches is not None:
            sums.update(self._vector_sums(model, ctx_batches, "ctx."))
        sums = all_reduce_sums(sums, self.device)

        def part(prefix: str) -> dict[str, float]:
            return VectorMetrics.finalize({k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)})

        # val_loss / val_cosine: on the windows the model trains on (context + 1 vectors)
        full = "ctx." if ctx_batches is not None else "seed."
        ev = part(full + "every.")
        out = {"val_loss": sums[full + "loss_sum"] / max(sums[full + "loss_n"], 1.0), "val_cosine": ev["cosine"]}
        sd = part("seed.last.")
        out.update({"val_cosine_seed": sd["cosine"], "val_mse_seed": sd["mse"], "val_windows": sums["seed.last.n"]})
        out.update({f"val_{k}_seed": v for k, v in sd.items() if k.startswith("frac_")})
        if ctx_batches is not None:
            cx = part("ctx.last.")
            out.update({"val_cosine_ctx": cx["cosine"], "val_mse_ctx": cx["mse"], "val_windows_ctx": sums["ctx.last.n"]})
            out.update({f"val_{k}_ctx": v for k, v in cx.items() if k.startswith("frac_")})
        return out

    def _evaluate_token(self, model, batches) -> dict[str, float]:
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for batch in batches:
            x = self._x(batch).to(self.device)
            with self.autocast:
                logits = model(x[:, :-1])  # (B, L-1, V)
            nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum").double()
            count += x[:, 1:].numel()
        sums = all_reduce_sums({"nll": float(nll), "n": float(count)}, self.device)
        loss = sums["nll"] / max(sums["n"], 1.0)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) * self.tokens_per_byte,
            "val_tokens": sums["n"],
        }

    # ---- state ----

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume exactly: weights (schedule-free: the averaged x, as its docs
        require), optimizer, schedule, RNG, and the position (step, epoch, batches of this
        epoch with their partial sums). Tensors and plain Python values only, so
        `torch.load(..., weights_only=True)` reads it."""
        self.check_finite()  # never checkpoint weights a NaN has already reached
        with self.eval_weights() as model:
            # clone: after the block schedule-free swaps the same tensors back to y
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            opt = self.optimizer.state_dict()
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": STATE_FORMAT,
            "model": weights,
            "optimizer": opt,
            "schedule": self.schedule.state_dict(),
            "rng": rng,
            "step": self.step,
            "epoch": self.epoch,  # epochs completed
            "batches_in_epoch": self.batches_in_epoch,
            "train_time_s": self.train_time_s,
            # compute accounting: cumulative counters carry on after a restart
            "samples_seen": self.samples_seen,
            "flops_per_sample": self.flops_per_sample,
            "evals_done": self.evals_done,
            "eval_step": self.eval_step,
            "epoch_sums": {  # the sums since the last evaluation (kind epochs: of the epoch)
                "loss": float(self._loss_sum), "samples": self._samples, "wait_s": self._wait_s,
                "time_s": self.epoch_time_s(), "micro": self._micro,
                "aux": {k: float(v) for k, v in self._aux_sums.items()},
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.train_time_s = float(state.get("train_time_s", 0.0))
        self.samples_seen = int(state.get("samples_seen", 0))
        if not self.flops_per_sample and state.get("flops_per_sample"):
            self.flops_per_sample = float(state["flops_per_sample"])
        if "format" not in state:  # written before the Trainer: at an epoch end, plateau state apart
            self.epoch, self.batches_in_epoch = int(state["epoch"]) + 1, 0
            self.evals_done = self.epoch
            if state.get("scheduler"):
                old = state["scheduler"]
                self.schedule.best, self.schedule.bad_epochs = float(old.get("best", math.inf)), int(old.get("num_bad_epochs", 0))
                lrs = old.get("_last_lr") or []
                if lrs and self.schedule.base_lrs[0]:
                    self.schedule.scale = float(lrs[0]) / self.schedule.base_lrs[0]
            self._reset_epoch_sums()
        else:
            self.schedule.load_state_dict(state["schedule"])
            self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
            default_evals = self.epoch if self.cfg.train.budget_kind == "epochs" else 0
            self.evals_done = int(state.get("evals_done", default_evals))
            self.eval_step = int(state.get("eval_step", -1))
            self._reset_epoch_sums()
            sums = state.get("epoch_sums") or {}
            self._micro = int(sums.get("micro", self.batches_in_epoch))
            self._loss_sum += float(sums.get("loss", 0.0))
            self._samples = int(sums.get("samples", 0))
            self._wait_s, self._time_s = float(sums.get("wait_s", 0.0)), float(sums.get("time_s", 0.0))
            self._aux_sums = {k: torch.tensor(v, device=self.device) for k, v in (sums.get("aux") or {}).items()}
            rng = state.get("rng") or {}
            if "torch" in rng:
                torch.set_rng_state(rng["torch"].cpu())
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        if self.schedule_free:
            self.optimizer.train()  # the checkpoint holds x (eval mode); training continues at y
        self.optimizer.zero_grad(set_to_none=True)
