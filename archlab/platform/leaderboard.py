"""Leaderboards with uncertainty, read back from MLflow.

Per architecture: the mean, sd, n and 95% Student-t interval of the sweep metric over its
confirm runs (child runs tagged `stage=confirm`); without confirm runs, the best search
trial (n = 1, no interval). Next to it the window-level paired CI of the difference to
the best baseline (logged per run by the driver, see `WINDOW_METRICS`), and verdicts
(archlab.platform.stats) against the best baseline and against `sweep.reference_arch`,
Holm-adjusted over architectures. Baselines come from the sweep's parent run (computed
on the same validation windows).

Verdicts: against the best baseline, by seed when there are >= 2 confirm runs (the
baseline is deterministic, so this tests the seed mean against its value), else by window
(the single run's logged paired test); against the reference, paired by `confirm_seed`
(no test, `tie` with p shown as "-", when fewer than 2 seeds pair up).

Tags and metrics this module reads (the driver writes them):
    tags     stage = search | confirm, confirm_seed, config_hash, archlab.best_baseline,
             archlab.arch, mlflow.parentRunId
    metrics  the sweep metric, WINDOW_METRICS, train_flops (search cost),
             val_pred_self_cos (collapse flag, > COLLAPSE_COS)

Output is deterministic: rows sort by score then name, floats print in fixed formats, so
two calls on one store give identical bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from archlab.platform import stats, tracking
from archlab.platform.stats import WINDOW_METRICS

COLUMNS = {
    "vector": ["val_cosine_seed", "val_cosine", "val_mse_seed", "val_frac_cos_gt_0.5_seed",
               "retrieval_acc", "val_pred_self_cos", "samples_per_s", "train_time_s", "latency_ms"],
    "token": ["val_loss", "val_bpb", "val_ppl", "samples_per_s", "train_time_s", "latency_ms"],
}
TAG_STAGE, TAG_CONFIRM_SEED, TAG_CONFIG_HASH = "stage", "confirm_seed", "config_hash"
TAG_BEST_BASELINE = "archlab.best_baseline"
STAGE_SEARCH, STAGE_CONFIRM = "search", "confirm"
CONFIRM_KEY = "archlab_confirm"  # a confirm trial's Tune config: {CONFIRM_KEY: point (sweep.select_confirm)}
COLLAPSE_THRESHOLD = 0.98  # val_pred_self_cos above this: predictions barely depend on the input
COLLAPSE_COS = COLLAPSE_THRESHOLD  # the name the compare branch used
EDGE_FRACTION = 0.05  # best value within 5% of a bound (log scale for log parameters)
WIDTH = 100


def latest_parent(uri: str, experiment: str, sweep_id: str | None = None):
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in c.search_experiments())
        raise KeyError(f"no MLflow experiment {experiment!r} at {uri}; experiments: {names or 'none'}")
    filt = f"tags.`{tracking.TAG_ROLE}` = 'parent'"
    if sweep_id:
        filt += f" and tags.`{tracking.TAG_SWEEP}` = '{sweep_id}'"
    runs = c.search_runs([exp.experiment_id], filter_string=filt, max_results=1,
                         order_by=["attributes.start_time DESC"])
    if not runs:
        raise KeyError(f"experiment {experiment!r} has no sweep{' ' + sweep_id if sweep_id else ''}")
    return exp.experiment_id, runs[0]


def log_window_comparison(c, run_id: str, comparison: dict[str, Any]) -> None:
    """Log `stats.window_comparison(...)`'s result on a run: floats as metrics (NaN, e.g.
    p with one window, is skipped), the baseline's name as a tag."""
    tracking.log_metrics(c, run_id, {k: comparison[k] for k in WINDOW_METRICS
                                     if k in comparison and not math.isnan(float(comparison[k]))})
    if comparison.get("best_baseline"):
        c.set_tag(run_id, TAG_BEST_BASELINE, comparison["best_baseline"])


def child_runs(uri: str, experiment_id: str, parent_id: str) -> list:
    c = tracking.client(uri)
    runs = c.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                         max_results=5000)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def stage(run) -> str:
    # runs from before the confirm stage existed carry no stage tag: they were search trials
    return run.data.tags.get(TAG_STAGE, STAGE_SEARCH)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def parent_settings(parent) -> dict[str, Any]:
    """archs, reference arch, smoke flag and space overrides from the parent's params."""
    import yaml

    p = parent.data.params
    archs = json.loads(p["sweep.archs"]) if p.get("sweep.archs", "").startswith("[") else []
    ref = p.get("sweep.reference_arch")
    ref = ref if ref not in (None, "None", "") else (archs[0] if archs else None)
    overrides: dict[str, dict[str, dict[str, Any]]] = {}
    prefix = "sweep.space_overrides."
    for key, raw in p.items():
        # flattened: sweep.space_overrides.<arch>.<section>.<name>.<field> = value
        if key.startswith(prefix):
            arch, *mid, fld = key[len(prefix):].split(".")
            overrides.setdefault(arch, {}).setdefault(".".join(mid), {})[fld] = yaml.safe_load(raw)
    return {"archs": archs, "reference": ref, "smoke": p.get("smoke_test") == "True", "overrides": overrides}


def edge_params(run, arch: str, settings: dict[str, Any]) -> list[str]:
    """Search-space parameters whose value in `run` lies within EDGE_FRACTION of a bound
    of the arch's space (log scale when the space is log); names without the section."""
    from archlab.search_spaces import load_space

    try:
        space = load_space(arch, smoke=settings["smoke"], overrides=settings["overrides"].get(arch))
    except Exception:  # an arch no longer registered: no space to compare with
        return []
    out = []
    for key, spec in sorted(space.items()):
        if "choices" in spec or spec.get("low") is None:
            continue
        section, name = key.split(".", 1)
        raw = run.data.params.get(f"model.params.{name}" if section == "model" else key)
        try:
            v, lo, hi = float(raw), float(spec["low"]), float(spec["high"])
        except (TypeError, ValueError):
            continue
        if spec.get("log") and lo > 0 and v > 0:
            v, lo, hi = math.log(v), math.log(lo), math.log(hi)
        if hi <= lo:
            continue
        pos = (v - lo) / (hi - lo)
        if pos <= EDGE_FRACTION or pos >= 1 - EDGE_FRACTION:
            out.append(name)
    return out


def _baselines(parent, task: str) -> dict[str, dict[str, Any]]:
    m = parent.data.metrics
    key = "cosine" if task == "vector" else "val_loss"
    out = {}
    for k, value in m.items():
        if k.startswith("baseline.") and k.endswith("." + key):
            name = k[len("baseline."):-len("." + key)]
            if task == "vector":
                out[name] = {"val_cosine_seed": value, "val_mse_seed": m.get(f"baseline.{name}.mse"),
                             "retrieval_acc": m.get(f"baseline.{name}.retrieval_acc"),
                             "val_frac_cos_gt_0.5_seed": m.get(f"baseline.{name}.frac_cos_gt_0.5")}
            else:
                out[name] = {"val_loss": value, "val_bpb": m.get(f"baseline.{name}.val_bpb")}
    return out


def _arch_entry(arch: str, runs: list, metric: str, mode: str, task: str, settings) -> dict[str, Any] | None:
    """One architecture's row (before verdicts): confirm statistics or the best trial."""
    search = [r for r in runs if stage(r) == STAGE_SEARCH]
    confirm = [r for r in runs if stage(r) == STAGE_CONFIRM and _finite(r.data.metrics.get(metric))]
    scored = [r for r in search if _finite(r.data.metrics.get(metric))]
    best = None
    for r in scored:
        if best is None or _better(r.data.metrics[metric], best.data.metrics[metric], mode):
            best = r
    if confirm:
        # one seed, one value: a config retrained twice on a seed (top_k > 1) keeps its best
        by_seed: dict[str, Any] = {}
        for r in sorted(confirm, key=lambda r: r.info.run_id):
            s = r.data.tags.get(TAG_CONFIRM_SEED, r.info.run_id)
            if s not in by_seed or _better(r.data.metrics[metric], by_seed[s].data.metrics[metric], mode):
                by_seed[s] = r
        used = [by_seed[s] for s in sorted(by_seed, key=_seed_order)]
        rep = used[0]
    elif best is not None:
        used, rep = [best], best
    else:
        return None
    iv = stats.t_interval([r.data.metrics[metric] for r in used])
    row: dict[str, Any] = {"entry": arch, "kind": "model", "stage": stage(rep), "n": iv.n,
                           "std": iv.std if iv.n > 1 else math.nan, "ci_lo": iv.lo, "ci_hi": iv.hi,
                           "run": rep.info.run_name or "", "params": rep.data.params.get("n_params", ""),
                           "precision": rep.data.params.get("precision", "")}
    for k in COLUMNS[task]:
        vals = [r.data.metrics[k] for r in used if _finite(r.data.metrics.get(k))]
        row[k] = sum(vals) / len(vals) if vals else None
    row[metric] = iv.mean
    wm = rep.data.metrics
    row.update({"d_base": wm.get(WINDOW_METRICS[0]), "d_base_lo": wm.get(WINDOW_METRICS[1]),
                "d_base_hi": wm.get(WINDOW_METRICS[2]), "d_base_p": wm.get(WINDOW_METRICS[3]),
                "best_baseline": rep.data.tags.get(TAG_BEST_BASELINE, "")})
    flops = [r.data.metrics["train_flops"] for r in search if _finite(r.data.metrics.get("train_flops"))]
    row["search_trials"] = len(search)
    row["search_flops"] = sum(flops) if flops else None
    row["flops_per_sample"] = rep.data.metrics.get("flops_per_sample")
    row["edge"] = edge_params(best or rep, arch, settings)
    row["collapsed"] = any((r.data.metrics.get("val_pred_self_cos") or 0) > COLLAPSE_COS for r in used)
    row["_seed_scores"] = {r.data.tags.get(TAG_CONFIRM_SEED): r.data.metrics[metric] for r in used
                           if r.data.tags.get(TAG_CONFIRM_SEED) is not None}
    return row


def _seed_order(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _verdicts(rows: list[dict], base_name: str | None, base_value: float | None, ref: str | None,
              mode: str) -> None:
    """Fill vs_base / vs_ref (verdict, adjusted p, diff, CI) on model rows, in place."""
    nan = math.nan
    vs_base: dict[str, stats.Comparison] = {}
    for r in rows:
        seeds = list(r["_seed_scores"].values())
        if base_value is not None and len(seeds) >= 2:
            vs_base[r["entry"]] = stats.paired(seeds, [base_value] * len(seeds))
            r["vs_base_by"] = "seed"
        elif _finite(r.get("d_base")):
            lo, hi = r.get("d_base_lo"), r.get("d_base_hi")
            iv = stats.Interval(r["d_base"], nan, 0, lo if _finite(lo) else nan, hi if _finite(hi) else nan)
            vs_base[r["entry"]] = stats.Comparison(iv, r["d_base_p"] if _finite(r.get("d_base_p")) else nan)
            r["vs_base_by"] = "window"
    for name, v in stats.verdicts(vs_base, mode).items():
        r = next(x for x in rows if x["entry"] == name)
        r.update({"vs_base": v["verdict"], "p_base": v["p"], "p_base_adj": v["p_adj"]})
        if r["vs_base_by"] == "seed":
            r.update({"d_base_seed": v["diff"], "d_base_seed_lo": v["lo"], "d_base_seed_hi": v["hi"]})
    ref_row = next((r for r in rows if r["entry"] == ref), None)
    vs_ref: dict[str, stats.Comparison] = {}
    for r in rows:
        if ref_row is None or r is ref_row:
            continue
        common = sorted(set(r["_seed_scores"]) & set(ref_row["_seed_scores"]), key=_seed_order)
        a = [r["_seed_scores"][s] for s in common]
        b = [ref_row["_seed_scores"][s] for s in common]
        if common:
            vs_ref[r["entry"]] = stats.paired(a, b)
        else:
            iv = stats.Interval(r["mean"] - ref_row["mean"], 0.0, 1, nan, nan)
            vs_ref[r["entry"]] = stats.Comparison(iv, nan)
    for name, v in stats.verdicts(vs_ref, mode).items():
        r = next(x for x in rows if x["entry"] == name)
        r.update({"vs_ref": v["verdict"], "p_ref": v["p"], "p_ref_adj": v["p_adj"], "d_ref": v["diff"],
                  "d_ref_lo": v["lo"], "d_ref_hi": v["hi"], "d_ref_n": v["n"]})
    if ref_row is not None:
        ref_row["vs_ref"] = "ref"


def leaderboard(uri: str, experiment_id: str, parent_id: str, metric: str, mode: str,
                reference_arch: str | None = None) -> dict[str, Any]:
    """The sweep's board: {"rows", "columns" (wide), "markdown" (wide), "metric", "mode",
    "sweep_id", "reference", "best_baseline", "level"}; `render` prints it."""
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    task = "vector" if metric == "val_cosine_seed" else "token"
    settings = parent_settings(parent)
    ref = reference_arch or settings["reference"]
    by_arch: dict[str, list] = {}
    for run in child_runs(uri, experiment_id, parent_id):
        by_arch.setdefault(run.data.tags.get(tracking.TAG_ARCH, "?"), []).append(run)
    models = [row for arch in sorted(by_arch)
              if (row := _arch_entry(arch, by_arch[arch], metric, mode, task, settings)) is not None]
    for r in models:
        r["mean"] = r[metric]
    baselines = _baselines(parent, task)
    base_name = stats.best_baseline({k: v[metric] for k, v in baselines.items()}, mode) if baselines else None
    _verdicts(models, base_name, baselines[base_name][metric] if base_name else None,
              ref if ref in by_arch else None, mode)
    rows = [{k: v for k, v in r.items() if k != "_seed_scores"} for r in models]
    for name in sorted(baselines):
        rows.append({"entry": name, "kind": "baseline", "stage": "", "run": "", "params": "", "precision": "",
                     "mean": baselines[name][metric], **baselines[name]})
    rows.sort(key=lambda r: (not _finite(r.get(metric)),
                             -(r.get(metric) or 0.0) if mode == "max" else (r.get(metric) or 0.0), r["entry"]))
    cols = WIDE_HEAD + COLUMNS[task][1:] + WIDE_TAIL
    board = {"rows": rows, "columns": [metric if c == "mean" else c for c in cols], "metric": metric,
             "mode": mode, "sweep_id": parent.data.tags.get(tracking.TAG_SWEEP), "reference": ref,
             "best_baseline": base_name, "level": 0.95, "task": task}
    board["markdown"] = to_markdown(board)
    return board


WIDE_HEAD = ["entry", "kind", "stage", "n", "mean", "std", "ci_lo", "ci_hi", "d_base", "d_base_lo",
             "d_base_hi", "d_base_p", "vs_base", "vs_base_by", "p_base_adj", "d_ref", "d_ref_lo", "d_ref_hi", "vs_ref",
             "p_ref_adj"]
WIDE_TAIL = ["search_trials", "search_flops", "flops_per_sample", "edge", "collapsed", "params",
             "precision", "run"]


def _fmt(v, col: str = "") -> str:
    """Fixed formats (identical bytes for identical stores)."""
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, list):
        return ",".join(v)
    if isinstance(v, int) and not col.endswith("flops"):
        return str(v)
    if col.endswith("flops") or col == "flops_per_sample":
        return f"{float(v):.3g}"
    if isinstance(v, float):
        if col.startswith("p_") or col.endswith("_p"):
            return "<0.001" if v < 0.001 else f"{v:.3f}"
        if col.startswith("d_"):
            return f"{v:+.4f}"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _cell(row: dict, col: str, metric: str) -> str:
    return _fmt(row.get(metric if col == metric else col), col)


def to_markdown(board: dict[str, Any]) -> str:
    cols = board["columns"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r, c, board["metric"]) for c in cols) + " |" for r in board["rows"]]
    return "\n".join(lines) + "\n"


def to_csv(board: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(board["columns"])
    for r in board["rows"]:
        w.writerow([_cell(r, c, board["metric"]) for c in board["columns"]])
    return buf.getvalue()


def to_json(board: dict[str, Any]) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    rows = [{k: clean(r.get(k)) for k in sorted(set(r) | {"mean"})} for r in board["rows"]]
    keep = {k: board[k] for k in ("metric", "mode", "sweep_id", "reference", "best_baseline", "level", "task")}
    return json.dumps({**keep, "rows": rows}, sort_keys=True, indent=1) + "\n"


def _compact_rows(board: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """The 100-column view: score with its CI half-width, window diff to the best
    baseline with its half-width, both verdicts with adjusted p, search effort, flags;
    the flags' details go into notes below the table."""
    head = ["entry", "score", "ci95", "n", "d_base", "vs_base", "vs_ref", "trials", "s_flops", "flags"]
    out, notes = [], []
    for r in board["rows"]:
        def pm(mid, lo, hi):
            if not _finite(mid):
                return ""
            if _finite(lo) and _finite(hi):
                return f"{mid:+.4f}±{(hi - lo) / 2:.4f}"
            return f"{mid:+.4f}"

        ci = f"±{(r['ci_hi'] - r['ci_lo']) / 2:.4f}" if _finite(r.get("ci_lo")) and _finite(r.get("ci_hi")) else ""

        def vp(verdict, p):
            if not verdict:
                return ""
            return verdict if verdict == "ref" or not _finite(p) else f"{verdict} {_fmt(p, 'p_')}"

        flags = []
        if r.get("edge"):
            flags.append("edge")
            notes.append(f"{r['entry']}: edge: {', '.join(r['edge'])} (best value within 5% of a search bound)")
        if r.get("collapsed"):
            flags.append("coll")
            notes.append(f"{r['entry']}: collapsed (val_pred_self_cos > {COLLAPSE_COS})")
        model = r["kind"] == "model"
        out.append([r["entry"] if model else f"{r['entry']}*", _fmt(r.get("mean")), ci,
                    str(r.get("n", "")) if model else "",
                    pm(r.get("d_base"), r.get("d_base_lo"), r.get("d_base_hi")),
                    vp(r.get("vs_base"), r.get("p_base_adj")), vp(r.get("vs_ref"), r.get("p_ref_adj")),
                    str(r.get("search_trials", "")) if model else "", _fmt(r.get("search_flops"), "search_flops"),
                    ",".join(flags)])
    return head, out, notes


def _text_table(head: list[str], rows: list[list[str]], width: int) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    sep = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
    over = sum(widths) + sep * (len(widths) - 1) - width
    if over > 0:  # long entry names give way first
        widths[0] = max(8, widths[0] - over)
    lines = []
    for cells in [head] + rows:
        parts = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            cell = cell if len(cell) <= w else cell[: w - 1] + "~"
            parts.append(cell.ljust(w) if i == 0 or i == len(cells) - 1 else cell.rjust(w))
        lines.append((" " * sep).join(parts).rstrip())
    return lines


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent="  ") or [""]


def to_table(board: dict[str, Any], wide: bool = False, width: int = WIDTH) -> str:
    """Plain text. Default: fits `width` columns; wide: every column of the markdown."""
    title = (f"leaderboard {board.get('sweep_id') or ''}: {board['metric']} ({board['mode']}), "
             f"mean over confirm seeds, 95% t CI; vs best baseline {board.get('best_baseline') or '-'}, "
             f"vs reference {board.get('reference') or '-'}, Holm-adjusted p")
    if wide:
        cols = board["columns"]
        rows = [[_cell(r, c, board["metric"]) for c in cols] for r in board["rows"]]
        return "\n".join([title] + _text_table(cols, rows, 10**6)) + "\n"
    head, rows, notes = _compact_rows(board)
    lines = _wrap(title, width) + _text_table(head, rows, width)
    lines += _wrap("* baseline (same windows). d_base: window-level paired diff to the best baseline "
                   "± 95% half-width; ci95: seed CI half-width; s_flops: search FLOPs.", width)
    for note in notes:
        lines += _wrap(note, width)
    return "\n".join(lines) + "\n"


def format_board(board: dict[str, Any], fmt: str = "table", wide: bool = False, width: int = WIDTH) -> str:
    if fmt == "table":
        return to_table(board, wide, width)
    if fmt == "markdown":
        return board["markdown"]
    if fmt == "csv":
        return to_csv(board)
    if fmt == "json":
        return to_json(board)
    raise ValueError(f"--format must be table, markdown, csv or json, found {fmt!r}")


def render(board: dict[str, Any], console=None, fmt: str = "table", wide: bool = False) -> None:
    """Print the board (plain text, so a pipe and a terminal get the same bytes)."""
    import sys

    text = format_board(board, fmt, wide)
    (console.file if console is not None and hasattr(console, "file") else sys.stdout).write(text)
