"""`archlab probe`: the capability probes (archlab.platform.tasks) for a list of architectures.

Each cell of the grid is (task, difficulty). For every architecture and cell: a small lr
sweep (each lr trains a fresh model on freshly generated train data with the Trainer and
its masked-loss hook) and the best lr by test accuracy is kept, as zoology and MAD report
their grids. Scored on generated test data (another seed) with exact-match accuracy at the
marked positions (vector probes: nearest-value retrieval and cosine), next to the chance
level.

Models are built at the probe width: the arch's debug flavor with its width field set to
`preset.width` (`d_model`; AMN, which has none, `d_hidden`) and its feed-forward fields
scaled by the same factor; its length field raised to the longest sequence of the grid.
`probe_config` returns what it changed so the table and MLflow record it per arch.

Tracking is a sweep's: one MLflow parent run per probe job (tags archlab.sweep_id,
archlab.role=parent), one child per (arch, cell) (archlab.role=probe_cell, archlab.arch,
archlab.probe_task) holding the cell's params, the accuracy of every lr and the best.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

log = logging.getLogger("archlab")

WIDTH_FIELDS = ("d_model", "d_hidden")  # the first one a Config has is its width
# widths that follow the model width (scaled by width / the flavor's width when nonzero)
SCALED_FIELDS = ("d_ff", "d_ffn", "d_expert", "d_attn", "d_hidden")
ROLE_CELL = "probe_cell"


@dataclass(frozen=True)
class Cell:
    task: str
    params: dict[str, Any]
    steps: int = 0  # 0: the preset's

    @property
    def label(self) -> str:
        short = {"seq_len": "L", "n_pairs": "kv", "length": "L", "n_tokens": "n", "vocab": "V", "dim": "D"}
        return " ".join(f"{short.get(k, k)}={v}" for k, v in self.params.items())

    def seq_len(self) -> int:
        from archlab.platform.tasks import get_probe

        return get_probe(self.task).generate(1, 0, **self.params).inputs.shape[1]


@dataclass(frozen=True)
class Preset:
    name: str
    cells: tuple[Cell, ...]
    lrs: tuple[float, ...]
    steps: int  # optimizer steps per (cell, lr) unless the cell says otherwise
    batch_size: int = 32
    n_test: int = 256
    width: int = 64
    warmup_frac: float = 0.1
    weight_decay: float = 0.1


def _c(task: str, steps: int = 0, **params) -> Cell:
    return Cell(task, params, steps)


PRESETS: dict[str, Preset] = {
    # minutes on 2 CPU cores for a few archs (the CI smoke test runs a slice of it)
    "lite": Preset("lite", (
        _c("mqar", seq_len=64, n_pairs=4, vocab=64),
        _c("mqar", seq_len=256, n_pairs=4, vocab=64),
        _c("mqar", seq_len=128, n_pairs=16, vocab=64),
        _c("copy", length=16, vocab=16),
        _c("copy", length=64, vocab=16),
        _c("selective_copy", length=64, n_tokens=8, vocab=16),
        _c("vector_mqar", seq_len=32, n_pairs=4, dim=16),
    ), lrs=(1e-3, 3e-3), steps=400),
    # zoology-like: (L, kv) in {(64,4),(128,8),(256,16)} and more pairs; copy up to 256 and
    # beyond; a GPU job (hours on CPU)
    "full": Preset("full", (
        _c("mqar", seq_len=64, n_pairs=4, vocab=8192 // 32),
        _c("mqar", seq_len=128, n_pairs=8, vocab=8192 // 32),
        _c("mqar", seq_len=256, n_pairs=16, vocab=8192 // 32),
        _c("mqar", seq_len=256, n_pairs=64, vocab=8192 // 32),
        _c("mqar", seq_len=512, n_pairs=64, vocab=8192 // 32),
        *(_c("copy", length=n, vocab=32) for n in (16, 64, 256, 512)),
        *(_c("selective_copy", length=n, n_tokens=16, vocab=32) for n in (64, 256, 1024)),
        *(_c("vector_mqar", seq_len=L, n_pairs=k, dim=32) for L, k in ((64, 4), (128, 8), (256, 16))),
    ), lrs=(3e-4, 1e-3, 3e-3, 1e-2), steps=4000, batch_size=64, n_test=1000, width=128),
}


# ---- models at the probe width ----

def probe_config(arch: str, width: int, max_seq: int) -> tuple[Any, dict[str, Any]]:
    """(config, overrides): `arch`'s debug flavor at `width` and able to take `max_seq`
    positions. The overrides are what was changed, for the record."""
    from archlab.architectures.registry import load_module, make_config

    mod = load_module(arch)
    base = mod.FLAVORS["debug"]
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    wf = next((f for f in WIDTH_FIELDS if f in fields), None)
    if wf is None:
        raise ValueError(f"probe: {arch}'s Config has none of the width fields {', '.join(WIDTH_FIELDS)}")
    ratio = width / fields[wf]
    over: dict[str, Any] = {wf: width}
    for f in SCALED_FIELDS:
        if f != wf and isinstance(fields.get(f), int) and fields[f] > 0:
            over[f] = max(1, int(round(fields[f] * ratio)))
    length_field = getattr(mod, "MAX_LENGTH_FIELD", None) or ("max_len" if "max_len" in fields else None)
    if length_field and fields[length_field] < max_seq:
        over[length_field] = max_seq
    return make_config(arch, "debug", over), over


def build_probe_model(arch: str, kind: str, cfg, *, vocab: int = 0, dim: int = 0):
    from archlab.architectures import build_model

    if kind == "vector":
        return build_model(arch, "vector", cfg, d_in=dim)
    return build_model(arch, "token", cfg, vocab_size=vocab)


def _flatten_state(state, prefix: str = "") -> dict[str, Any]:
    import torch

    if torch.is_tensor(state):
        return {prefix: state}
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:  # positions (ints), empty caches (None)
        return {}
    out = {}
    for k, v in items:
        out.update(_flatten_state(v, f"{prefix}/{k}"))
    return out


def state_bytes(model, t1: int = 32, t2: int = 64) -> dict[str, Any]:
    """The recurrent state a step-wise decode keeps, at batch 1 (fp32 weights).

    Steps the backbone's `init_state(1)` / `step` over t2 random inputs and reads the state
    after t1 and after t2 steps, tensor by tensor (by its place in the state structure).
    Tensors whose size is the same at both are the fixed-size recurrent state
    (`state_bytes`); tensors that grow are a cache (attention's keys and values), reported
    as `cache_bytes_per_token` = growth / (t2 - t1). A pure attention model so has
    state_bytes 0 and a KV cache; a hybrid has both. Bounded caches (sliding windows,
    Linformer's current block) no larger than t1 count as state. Backbones without
    `step` (Hyena, AMN's whole-model vector path): None, with the reason."""
    import torch

    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "step") or not hasattr(backbone, "init_state"):
        return {"state_bytes": None, "cache_bytes_per_token": None,
                "how": "no step(): the model reads its whole input at every position (no fixed state)"}
    # the backbone's input width: the embedding's (token) or the input projection's (vector)
    width = model.embed.embedding_dim if hasattr(model, "embed") else (
        model.in_proj.out_features if hasattr(model.in_proj, "out_features") else model.d_in)
    g = torch.Generator().manual_seed(0)
    sizes: dict[int, dict[str, int]] = {}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            st = backbone.init_state(1)
            for t in range(1, t2 + 1):
                _, st = backbone.step(torch.randn(1, width, generator=g), st)
                if t in (t1, t2):
                    sizes[t] = {k: v.numel() * v.element_size() for k, v in _flatten_state(st).items()}
    except Exception as e:  # a step that cannot run here must not hide the accuracies
        return {"state_bytes": None, "cache_bytes_per_token": None, "how": f"step failed: {type(e).__name__}: {e}"}
    finally:
        model.train(was)
    a, b = sizes[t1], sizes[t2]
    fixed = sum(v for k, v in b.items() if a.get(k) == v)
    grown = sum(v - a.get(k, 0) for k, v in b.items() if a.get(k) != v)
    return {"state_bytes": int(fixed), "cache_bytes_per_token": grown / (t2 - t1),
            "how": f"init_state(1) + step x{t2}: fixed-size tensors = state, growing ones = cache"}


# ---- one (arch, cell, lr) ----

def masked_loss(kind: str):
    """The probes' training loss at the marked positions only: token cross-entropy (the
    targets hold IGNORE elsewhere), vector 1 - cosine averaged over the mask."""
    import torch.nn.functional as F

    if kind == "token":
        def loss(model, batch):
            logits = model(batch["inputs"])  # (B, T, V)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1),
                                   ignore_index=-100)
    else:
        def loss(model, batch):
            pred = model(batch["inputs"]).float()  # (B, T, D), unit rows
            mask = batch["mask"].float()  # (B, T)
            cos = (pred * batch["targets"]).sum(-1)
            return ((1.0 - cos) * mask).sum() / mask.sum().clamp(min=1.0)
    return loss


def _trainer_config(arch: str, kind: str, lr: float, steps: int, preset: Preset, seed: int):
    from archlab.platform.config import load_config

    return load_config(None, [
        f"model.arch={arch}", f"train.task={kind}", f"train.lr={lr}", f"train.batch_size={preset.batch_size}",
        "train.epochs=1", f"train.max_steps_per_epoch={steps}", "train.scheduler=cosine",
        f"train.warmup_frac={preset.warmup_frac}", f"train.weight_decay={preset.weight_decay}",
        "train.grad_clip=1.0", f"train.seed={seed}",
    ])


def predict(model, inputs: np.ndarray, kind: str, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            x = torch.as_tensor(inputs[i: i + batch])
            y = model(x)
            out.append((y.argmax(-1) if kind == "token" else y.float()).numpy())
    return np.concatenate(out)


def score(probe, pred: np.ndarray, data) -> dict[str, float]:
    if probe.kind == "token":
        return probe.token_accuracy(pred, data)
    s = probe.score(pred, data)
    return {"accuracy": s["retrieval_acc"], "cosine": s["cosine"]}


def train_cell(arch: str, cell: Cell, lr: float, preset: Preset, *, seed: int = 0,
               max_seq: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """Train a fresh probe-width model on `cell` at `lr`; its test metrics and timing."""
    import torch

    from archlab.platform.tasks import get_probe
    from archlab.platform.trainer import Trainer

    probe = get_probe(cell.task)
    steps = steps or cell.steps or preset.steps
    B = preset.batch_size
    train = probe.generate(steps * B, 2 * seed, **cell.params)  # one pass, never repeated
    test = probe.generate(preset.n_test, 2 * seed + 1, **cell.params)
    cfg, _ = probe_config(arch, preset.width, max_seq or train.inputs.shape[1])
    torch.manual_seed(seed)
    p = cell.params
    model = build_probe_model(arch, probe.kind, cfg, vocab=p.get("vocab", 0), dim=p.get("dim", 0))
    trainer = Trainer(model, _trainer_config(arch, probe.kind, lr, steps, preset, seed), total_steps=steps,
                      loss=masked_loss(probe.kind))
    x, y, m = (torch.as_tensor(a) for a in (train.inputs, train.targets, train.mask))
    batches = ({"inputs": x[i * B:(i + 1) * B], "targets": y[i * B:(i + 1) * B], "mask": m[i * B:(i + 1) * B]}
               for i in range(steps))
    t0 = time.perf_counter()
    ep = trainer.train_epoch(batches)
    with trainer.eval_weights() as model_eval:
        metrics = score(probe, predict(model_eval, test.inputs, probe.kind), test)
    metrics.update(train_loss=ep["train_loss"], train_s=time.perf_counter() - t0, steps=steps)
    return metrics


# ---- the grid ----

@dataclass
class ProbeResult:
    probe_id: str
    preset: str
    tracking_uri: str
    parent_run_id: str
    archs: list[str]
    cells: list[Cell]
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per (arch, cell)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)  # arch -> state_bytes()
    widths: dict[str, dict[str, Any]] = field(default_factory=dict)  # arch -> overrides used


def select_cells(preset: Preset, tasks: Iterable[str] | None) -> list[Cell]:
    from archlab.platform.tasks import PROBES

    cells = list(preset.cells)
    if tasks:
        tasks = list(tasks)
        bad = [t for t in tasks if t not in PROBES]
        if bad:
            raise ValueError(f"--tasks: unknown probe task(s) {', '.join(bad)}; known: {', '.join(sorted(PROBES))}")
        cells = [c for c in cells if c.task in tasks]
    if not cells:
        raise ValueError(f"preset {preset.name!r} has no cells for tasks {', '.join(tasks or [])}")
    return cells


def check_archs(archs: list[str], cells: list[Cell]) -> None:
    """Before anything trains: every name is registered and supports some cell's task."""
    from archlab.architectures.registry import get_spec
    from archlab.platform.tasks import get_probe

    if not archs:
        raise ValueError("--archs: at least one architecture is needed")
    kinds = {get_probe(c.task).kind for c in cells}
    for a in archs:
        spec = get_spec(a)  # UnknownArchitectureError names the known ones
        if not kinds & set(spec.tasks):
            raise ValueError(f"--archs: {a} supports task(s) {', '.join(spec.tasks)}, none of this grid's "
                             f"({', '.join(sorted(kinds))})")


def run_probe(archs: list[str], preset: str | Preset = "lite", *, tasks: Iterable[str] | None = None,
              tracking_uri: str | None = None, experiment: str = "archlab-probe", seed: int = 0,
              lrs: tuple[float, ...] | None = None, steps: int | None = None,
              on_row=None) -> ProbeResult:
    """Run the grid for `archs`; track it in MLflow; return every cell's best-lr result.

    `lrs` / `steps` replace the preset's (tests and quick looks). `on_row(row)` is called
    after each (arch, cell), e.g. to print progress."""
    from archlab.architectures.registry import get_spec
    from archlab.platform import tracking
    from archlab.platform.tasks import get_probe

    p = PRESETS[preset] if isinstance(preset, str) else preset
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {', '.join(PRESETS)}, found {preset!r}")
    if lrs:
        p = dataclasses.replace(p, lrs=tuple(lrs))
    cells = select_cells(p, tasks)
    check_archs(archs, cells)
    uri = tracking_uri or "sqlite:///mlflow.db"
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, experiment)
    probe_id = f"probe-{p.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = tracking.parent_run(c, exp_id, probe_id, {
        "probe.preset": p.name, "probe.archs": ",".join(archs), "probe.lrs": list(p.lrs),
        "probe.steps": steps or p.steps, "probe.batch_size": p.batch_size, "probe.width": p.width,
        "probe.n_test": p.n_test, "probe.seed": seed, "probe.cells": [f"{x.task} {x.label}" for x in cells],
    })
    result = ProbeResult(probe_id, p.name, uri, parent, list(archs), cells)
    max_seq = max(x.seq_len() for x in cells)
    for arch in archs:
        spec = get_spec(arch)
        cfg, over = probe_config(arch, p.width, max_seq)
        result.widths[arch] = over
        kind0 = "token" if "token" in spec.tasks else "vector"
        probe_model = build_probe_model(arch, kind0, cfg, vocab=64, dim=16)
        result.state[arch] = state_bytes(probe_model)
        for cell in cells:
            probe = get_probe(cell.task)
            row: dict[str, Any] = {"arch": arch, "task": cell.task, "cell": cell.label,
                                   "chance": probe.chance(**cell.params), "by_lr": {}}
            trial = f"{arch}|{cell.task}|{cell.label}"
            run_id = tracking.child_run(c, exp_id, parent, probe_id, trial, arch, {
                "probe.task": cell.task, **{f"probe.{k}": v for k, v in cell.params.items()},
                "model": over, "probe.lrs": list(p.lrs), "probe.steps": steps or cell.steps or p.steps,
            })
            c.set_tag(run_id, tracking.TAG_ROLE, ROLE_CELL)
            c.set_tag(run_id, "archlab.probe_task", cell.task)
            if probe.kind not in spec.tasks:
                row["error"] = f"{arch} has no {probe.kind} task"
                c.set_tag(run_id, "archlab.skipped", row["error"])
                c.set_terminated(run_id, "FINISHED")
                result.rows.append(row)
                continue
            best = None
            for lr in p.lrs:
                try:
                    m = train_cell(arch, cell, lr, p, seed=seed, max_seq=max_seq, steps=steps)
                except (FloatingPointError, RuntimeError, ValueError) as e:  # one bad lr is a result
                    row["by_lr"][lr] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                row["by_lr"][lr] = m
                tracking.log_metrics(c, run_id, {f"lr_{lr:g}.{k}": v for k, v in m.items()})
                if best is None or m["accuracy"] > best[1]["accuracy"]:
                    best = (lr, m)
            if best is None:
                row["error"] = "; ".join(f"lr {k:g}: {v['error']}" for k, v in row["by_lr"].items())
                c.set_terminated(run_id, "FAILED")
            else:
                row.update(best_lr=best[0], **best[1])
                summary = {"accuracy": best[1]["accuracy"], "best_lr": best[0], "chance": row["chance"]}
                summary.update({k: best[1][k] for k in ("seq_accuracy", "cosine") if k in best[1]})
                st = result.state[arch]
                if st["state_bytes"] is not None:
                    summary["state_bytes"] = st["state_bytes"]
                    summary["cache_bytes_per_token"] = st["cache_bytes_per_token"]
                tracking.log_metrics(c, run_id, summary)
                c.set_terminated(run_id, "FINISHED")
            result.rows.append(row)
            if on_row is not None:
                on_row(row)
    c.set_terminated(parent, "FINISHED")
    return result


# ---- the table ----

_TASK_SHORT = {"mqar": "mqar", "copy": "copy", "selective_copy": "sel", "vector_mqar": "vmqar"}


def _fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def table_lines(result: ProbeResult, max_width: int = 100) -> list[str]:
    """Accuracy (best lr) per arch and cell, then state bytes and KV cache bytes per token;
    columns wrap into several blocks to stay within `max_width` characters."""
    cols = [(c.task, c.label) for c in result.cells]
    acc = {(r["arch"], r["task"], r["cell"]): r for r in result.rows}
    name_w = max(8, *(len(a) for a in result.archs))
    head = [f"{_TASK_SHORT.get(t, t)} {lab}" for t, lab in cols]
    col_w = 7
    tail_w = 2 * 8
    per_block = max(1, (max_width - name_w - tail_w) // (col_w + 1))
    lines = []
    for start in range(0, len(cols), per_block):
        block = list(range(start, min(start + per_block, len(cols))))
        last = block[-1] == len(cols) - 1
        lines.append("")
        for ci in block:  # one header line per column: the columns are narrow
            lines.append(f"  [{ci + 1}] {head[ci]}  (chance {result_chance(result, cols[ci]):.3f})")
        hdr = f"{'arch':<{name_w}} " + " ".join(f"{'[' + str(ci + 1) + ']':>{col_w}}" for ci in block)
        if last:
            hdr += f" {'state':>7} {'kv/tok':>7}"
        lines.append(hdr)
        for a in result.archs:
            cells = []
            for ci in block:
                r = acc.get((a, *cols[ci]))
                cells.append(f"{'-' if r is None or 'accuracy' not in r else format(r['accuracy'], '.3f'):>{col_w}}")
            line = f"{a:<{name_w}} " + " ".join(cells)
            if last:
                st = result.state.get(a, {})
                kv = st.get("cache_bytes_per_token")
                line += f" {_fmt_bytes(st.get('state_bytes')):>7} {_fmt_bytes(kv) if kv else '0':>7}"
            lines.append(line)
    return lines


def result_chance(result: ProbeResult, col) -> float:
    from archlab.platform.tasks import get_probe

    cell = next(c for c in result.cells if (c.task, c.label) == col)
    return get_probe(cell.task).chance(**cell.params)
