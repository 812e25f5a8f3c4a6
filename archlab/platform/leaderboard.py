"""Leaderboards, read back from MLflow: the best trial per architecture next to the
baselines computed on the same validation windows (logged on the sweep's parent run)."""

from __future__ import annotations

from typing import Any

from archlab.platform import tracking

COLUMNS = {
    "vector": ["val_cosine_seed", "val_cosine", "val_mse_seed", "val_frac_cos_gt_0.5_seed",
               "retrieval_acc", "samples_per_s", "train_time_s", "latency_ms"],
    "token": ["val_loss", "val_bpb", "val_ppl", "samples_per_s", "train_time_s", "latency_ms"],
}


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


def leaderboard(uri: str, experiment_id: str, parent_id: str, metric: str, mode: str) -> dict[str, Any]:
    c = tracking.client(uri)
    parent = c.get_run(parent_id)
    task = "vector" if metric == "val_cosine_seed" else "token"
    children = c.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                             max_results=5000)
    best: dict[str, Any] = {}
    for run in children:
        value = run.data.metrics.get(metric)
        if value is None:
            continue
        arch = run.data.tags.get(tracking.TAG_ARCH, "?")
        cur = best.get(arch)
        if cur is None or (value > cur.data.metrics[metric] if mode == "max" else value < cur.data.metrics[metric]):
            best[arch] = run
    rows = []
    for arch, run in best.items():
        m = run.data.metrics
        rows.append({"entry": arch, "kind": "model", "run": run.info.run_name,
                     "params": run.data.params.get("n_params", ""),
                     "precision": run.data.params.get("precision", ""),
                     **{k: m.get(k) for k in COLUMNS[task]}})
    baseline_metric = "cosine" if task == "vector" else "val_loss"
    for key, value in parent.data.metrics.items():
        if key.startswith("baseline.") and key.endswith("." + baseline_metric):
            name = key[len("baseline."):-len("." + baseline_metric)]
            row = {"entry": name, "kind": "baseline", "run": "", "params": "", "precision": ""}
            if task == "vector":
                row.update({"val_cosine_seed": value, "val_mse_seed": parent.data.metrics.get(f"baseline.{name}.mse"),
                            "retrieval_acc": parent.data.metrics.get(f"baseline.{name}.retrieval_acc"),
                            "val_frac_cos_gt_0.5_seed": parent.data.metrics.get(f"baseline.{name}.frac_cos_gt_0.5")})
            else:
                row.update({"val_loss": value, "val_bpb": parent.data.metrics.get(f"baseline.{name}.val_bpb")})
            rows.append(row)
    rows.sort(key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0) if mode == "max" else (r.get(metric) or 0)))
    cols = ["entry", "kind", *COLUMNS[task], "params", "precision", "run"]
    return {"rows": rows, "columns": cols, "metric": metric, "mode": mode,
            "sweep_id": parent.data.tags.get(tracking.TAG_SWEEP), "markdown": to_markdown(rows, cols)}


# Short headers for the console (the MLflow markdown keeps the full metric names); the
# legend under the table spells out every abbreviation it used.
ABBREV = {
    "val_cosine_seed": "cos_seed", "val_cosine": "cos_all", "val_mse_seed": "mse_seed",
    "val_frac_cos_gt_0.5_seed": "cos>0.5", "retrieval_acc": "retr_acc", "samples_per_s": "samp/s",
    "train_time_s": "train_s", "latency_ms": "lat_ms", "val_loss": "loss", "val_bpb": "bpb",
    "val_ppl": "ppl", "precision": "prec",
}
# The console drops columns from the end of this order until the table fits; the board's
# own order decides where a kept column is shown. Columns not named here (added later)
# come after the metrics and before these.
_DROP_LAST = ("entry", "{metric}", "kind")
_DROP_FIRST = ("run", "precision", "params", "latency_ms", "train_time_s")
DEFAULT_WIDTH = 100


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _fmt_cell(col: str, v) -> str:
    """Console formatting: as few characters as the number needs to be read."""
    if v is None or v == "":
        return ""
    if col == "params":
        try:
            n = float(v)
        except ValueError:
            return str(v)
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"
    if col in ("samples_per_s",) and isinstance(v, (int, float)):
        return f"{v:,.0f}"
    if col in ("train_time_s",) and isinstance(v, (int, float)):
        return f"{v:.1f}"
    if col == "run" and isinstance(v, str) and v.startswith("trial-"):
        return v[len("trial-"):]
    return _fmt(v)


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def console_width() -> int:
    """$COLUMNS, else the terminal's width, else 100 (a pipe: CI logs, `ray job logs`)."""
    import shutil

    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


def _drop_order(columns: list[str], metric: str) -> list[str]:
    keep_last = [c.format(metric=metric) for c in _DROP_LAST]
    first = [c for c in _DROP_FIRST if c in columns]
    middle = [c for c in reversed(columns) if c not in keep_last and c not in first]
    return first + middle + [c for c in reversed(keep_last) if c in columns]


def _table(board: dict[str, Any], cols: list[str]):
    from rich import box
    from rich.table import Table

    table = Table(title=f"leaderboard {board.get('sweep_id') or ''} ({board['metric']}, {board['mode']})",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for col in cols:
        # no_wrap + overflow=ignore: a cell is shown whole or its column is not shown at all
        table.add_column(ABBREV.get(col, col), no_wrap=True, overflow="ignore",
                         justify="left" if col in ("entry", "kind", "run", "precision") else "right")
    for r in board["rows"]:
        table.add_row(*[_fmt_cell(c, r.get(c)) for c in cols], style="dim" if r["kind"] == "baseline" else None)
    return table


def fit_columns(board: dict[str, Any], width: int, console=None) -> list[str]:
    """The board's columns that fit `width` characters, dropping the least important first
    (run, precision, params, latency, train time, then any other, never the entry, the
    metric or the kind), measured by rich exactly as it will print them."""
    from rich.console import Console

    console = console or Console(width=width)
    cols = list(board["columns"])
    for drop in _drop_order(cols, board["metric"]):
        if console.measure(_table(board, cols), options=console.options.update_width(10**4)).maximum <= width:
            break
        if drop in (board["metric"], "entry"):
            break  # never hidden: a table this narrow is cut by the terminal, not by us
        cols.remove(drop)
    return cols


def render(board: dict[str, Any], console=None, width: int | None = None) -> None:
    """Print the board at the console's width (default: console_width()): the columns that
    fit, headers abbreviated, a legend for the abbreviations and a note of what is hidden."""
    from rich.console import Console

    width = width or (console.width if console is not None else console_width())
    console = console or Console(width=width)
    cols = fit_columns(board, width, console)
    console.print(_table(board, cols))
    legend = ", ".join(f"{ABBREV[c]}={c}" for c in cols if c in ABBREV and ABBREV[c] != c)
    if legend:
        console.print(legend, style="dim", highlight=False, soft_wrap=False)
    hidden = [c for c in board["columns"] if c not in cols]
    if hidden:
        console.print(f"not shown at {width} columns: {', '.join(hidden)} (wider terminal or COLUMNS=160; "
                      "all columns: leaderboard.md in the sweep's MLflow run)", style="dim", highlight=False)
