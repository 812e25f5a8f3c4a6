"""The console while a sweep or a training run works: one progress line per running trial
(budget done, best metric so far, samples/s) under a one-line status, instead of Tune's
per-trial config and result tables and Ray's forwarded worker logs (those stay in files:
see `ray_log_dir`). `--verbose` brings Ray's own output back beside these lines.

Lines are plain text no wider than 100 columns, so they read the same in a terminal, a
CI log and `ray job logs`. Imported only by the sweep and train drivers (it imports Ray).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from ray.train import UserCallback
from ray.tune import Callback

from archlab.platform.leaderboard import CONFIRM_KEY

# short metric names for the progress lines (the leaderboard has its own column names)
ABBREV = {
    "val_cosine_seed": "cos_seed", "val_cosine": "cos_all", "val_mse_seed": "mse_seed",
    "retrieval_acc": "retr_acc", "val_loss": "loss", "val_bpb": "bpb", "val_ppl": "ppl",
}

BAR = 8  # characters of the budget bar
WIDTH = 100
# the budget's unit as the line names it (ASHA's time attribute -> label)
UNITS = {"epoch": "epoch", "samples_seen": "samples", "train_flops": "FLOPs", "train_time_s": "sec"}


def _amount(v: float) -> str:
    """12 -> "12", 61.3 -> "61.3", 1.5e12 -> "1.5T": short budget amounts (2 significant
    digits from 1000 on)."""
    if abs(v) < 1000:
        return f"{v:g}" if float(v).is_integer() else f"{v:.3g}"
    for suffix, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15)):
        x = float(f"{v / scale:.2g}")
        if abs(x) < 1000 or suffix == "P":
            return f"{x:g}{suffix}"
    return f"{v:g}"  # unreachable


def progress_line(trial_id: str, arch: str, status: str, done: float, total: float,
                  metric: str, best: float | None, samples_per_s: float | None, unit: str = "epoch") -> str:
    """`  40976d68 lstm         RUNNING  epoch 1/4   [##------]  25% best cos_seed 0.3186 443 samples/s`

    `unit`: the budget's (ASHA's time attribute: epoch, samples_seen, train_flops,
    train_time_s), amounts shortened (1.2T/5T FLOPs). Cut to 100 characters."""
    frac = min(max(done / total, 0.0), 1.0) if total else 0.0
    filled = round(frac * BAR)
    best_s = f"{best:.4f}" if best is not None else "-"
    sps = "" if samples_per_s is None else (f"{samples_per_s:,.0f} samples/s" if samples_per_s < 10_000
                                             else f"{_amount(samples_per_s)} samples/s")
    done_s = f"{done:g}/{total:g}" if unit == "epoch" else f"{_amount(done)}/{_amount(total)}"
    return (f"  {str(trial_id):<8} {arch[:12]:<12} {status[:7]:<7} {UNITS.get(unit, unit)} {done_s:<5} "
            f"[{'#' * filled}{'-' * (BAR - filled)}] {frac * 100:3.0f}% best {ABBREV.get(metric, metric)} "
            f"{best_s} {sps}").rstrip()[:WIDTH]


def trial_label(trial_id: str, config: dict[str, Any]) -> tuple[str, str]:
    """A progress line's (trial, architecture) columns. A search trial: its Tune trial id
    and sampled `arch`. A confirm run (its config is {CONFIRM_KEY: point},
    sweep.select_confirm): `c<config hash, 6 digits>-s<seed>` (its run is named
    `trial-<sweep>-c<8 digits>-s<seed>`) and the arch of the search config it repeats."""
    point = config.get(CONFIRM_KEY)
    if isinstance(point, dict):
        arch = point.get("arch") or point.get("config", {}).get("arch", "?")
        return f"c{str(point.get('config_hash', '?'))[:6]}-s{point.get('seed', '?')}", str(arch)
    return str(trial_id), str(config.get("arch", "?"))


def ray_log_dir() -> str | None:
    """This Ray session's log folder (workers' stdout/stderr, raylet, Train, Data), where
    the quiet console's hidden output goes."""
    try:
        import ray

        node = ray._private.worker._global_node  # set once ray.init has run in this process
        return f"{node.get_session_dir_path()}/logs" if node is not None else None
    except Exception:  # pragma: no cover - a Ray without this private attribute
        return None


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a > b if mode == "max" else a < b)


class _State:
    """What the console knows of one trial."""

    def __init__(self, name: str, arch: str):
        self.name, self.arch, self.status = name, arch, "PENDING"
        self.done, self.best, self.sps = 0.0, None, None


class TrialProgress(Callback):
    """A Tune callback (it runs on the driver): a status line and one line per running
    trial every `interval_s` and whenever a trial ends; a final summary. It is pickled with
    the Tuner's RunConfig, so `--resume` brings it back (setup() restarts its clock)."""

    def __init__(self, metric: str, mode: str, time_attr: str, max_t: float,
                 interval_s: float = 10.0, out: Callable[[str], None] | None = None):
        self.metric, self.mode, self.time_attr, self.max_t = metric, mode, time_attr, max_t
        self.interval_s, self.out = interval_s, out or _print
        self.trials: dict[str, _State] = {}
        self.t0 = self.last = time.monotonic()
        self.changed = False

    def setup(self, **info):
        self.t0 = self.last = time.monotonic()

    def _state(self, trial) -> _State:
        if trial.trial_id not in self.trials:
            self.trials[trial.trial_id] = _State(*trial_label(trial.trial_id, trial.config or {}))
        return self.trials[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._state(trial).status = "RUNNING"
        self.changed = True

    def on_trial_result(self, iteration, trials, trial, result, **info):
        s = self._state(trial)
        s.status = "RUNNING"
        s.done = float(result.get(self.time_attr, s.done) or 0)
        if result.get("samples_per_s") is not None:
            s.sps = float(result["samples_per_s"])
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and value == value and _better(float(value), s.best, self.mode):
            s.best = float(value)

    def _end(self, trial, status: str):
        s = self._state(trial)
        if status == "TERMINATED":  # by ASHA (a weak trial) before its budget, else done
            status = "STOPPED" if s.done < self.max_t else "DONE"
        s.status = status
        self.out(progress_line(s.name, s.arch, status, s.done, self.max_t, self.metric,
                               s.best, s.sps, unit=self.time_attr))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "ERROR")
        self.out(f"  {trial.trial_id} failed; its error: {trial.error_file or trial.local_path}")

    def status_lines(self, trials) -> list[str]:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        elapsed = time.monotonic() - self.t0
        head = f"[{int(elapsed // 60)}:{int(elapsed % 60):02d}] trials: " + " | ".join(
            f"{n} {k}" for k, n in sorted(counts.items()))
        best = [(s.best, s.name, s.arch) for s in self.trials.values() if s.best is not None]
        if best:
            v, name, arch = (max if self.mode == "max" else min)(best)
            head += f"   best {ABBREV.get(self.metric, self.metric)} {v:.4f} ({arch} {name})"
        lines = [head]
        for t in trials:
            if t.status == "RUNNING":
                s = self._state(t)
                lines.append(progress_line(s.name, s.arch, "RUNNING", s.done, self.max_t, self.metric,
                                           s.best, s.sps, unit=self.time_attr))
        return lines

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last >= self.interval_s or (self.changed and now - self.last >= 2.0):
            self.last, self.changed = now, False
            for line in self.status_lines(trials):
                self.out(line)

    def on_experiment_end(self, trials, **info):
        for line in self.status_lines(trials):
            self.out(line)


def _print(line: str) -> None:
    print(line, flush=True)


def trial_progress(metric: str, mode: str, time_attr: str, max_t: float, **kwargs) -> TrialProgress:
    """The quiet console's progress callback for a Tuner's RunConfig."""
    return TrialProgress(metric, mode, time_attr, max_t, **kwargs)


class TrainProgress(UserCallback):
    """A Ray Train callback (it runs in Train's controller actor, not on the driver): hands
    rank 0's report to the driver's RunFollower through a queue actor."""

    KEYS = ("epoch", "samples_per_s", "samples_seen", "train_flops", "train_time_s")

    def __init__(self, queue, metric: str):
        self.queue, self.metric = queue, metric

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0] if metrics else {}
        try:
            self.queue.put_nowait({k: first[k] for k in (*self.KEYS, self.metric) if k in first})
        except Exception:  # progress is a courtesy: never fail the run for it
            pass


class RunFollower:
    """`archlab train` has no Tune loop on the driver: a thread prints a progress line for
    each report that TrainProgress forwards (pass `callback()` to the TorchTrainer)."""

    def __init__(self, name: str, arch: str, metric: str, mode: str, epochs: float,
                 out: Callable[[str], None] | None = None, time_attr: str = "epoch"):
        """`epochs`: the budget in `time_attr`'s unit (epochs, or samples_seen, train_flops,
        train_time_s for a train.budget of another kind)."""
        from ray.util.queue import Queue

        self.name, self.arch, self.metric, self.mode, self.epochs = name, arch, metric, mode, epochs
        self.time_attr = time_attr
        self.out = out or _print
        # num_cpus=0: a queue must never take a CPU a worker needs (3-CPU nodes, 2-CPU workers)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="archlab-progress", daemon=True)
        self.best: float | None = None
        self.lines = 0

    def callback(self) -> TrainProgress:
        return TrainProgress(self.queue, self.metric)

    def show(self, report: dict) -> None:
        value = report.get(self.metric)
        if isinstance(value, (int, float)) and value == value and _better(float(value), self.best, self.mode):
            self.best = float(value)
        done = float(report.get(self.time_attr, 0))
        status = "DONE" if done >= self.epochs else "RUNNING"  # the sweep's words, within the 7-wide column
        self.out(progress_line(self.name, self.arch, status, done, self.epochs, self.metric, self.best,
                               report.get("samples_per_s"), unit=self.time_attr))
        self.lines += 1

    def _loop(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.show(self.queue.get(timeout=1.0))
            except Empty:
                continue
            except Exception as e:  # the queue actor went away: stop following, keep training
                print(f"progress: {type(e).__name__}: {e}", file=sys.stderr)
                return

    def __enter__(self) -> "RunFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            while not self.queue.empty():  # reports that landed after the last get
                self.show(self.queue.get_nowait())
        finally:
            self.queue.shutdown()
