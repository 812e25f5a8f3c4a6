"""Leaderboards, read back from MLflow: the best trial per architecture next to the
baselines computed on the same validation windows (logged on the sweep's parent run).

Vector models whose predictions are nearly one vector (`val_pred_self_cos`, logged by the
sweep's finalize, above COLLAPSE_THRESHOLD) carry the flag `collapsed`."""

from __future__ import annotations

from typing import Any

from archlab.platform import tracking

# a vector model whose predictions' mean cosine to their own mean
# (metrics.prediction_self_cosine) is above this predicts nearly one vector whatever the
# context: flagged "collapsed". Here, not in metrics.py, so the leaderboard stays torch-free.
COLLAPSE_THRESHOLD = 0.98

COLUMNS = {
    "vector": ["val_cosine_seed", "val_cosine", "val_mse_seed", "val_frac_cos_gt_0.5_seed",
               "retrieval_acc", "val_pred_self_cos", "samples_per_s", "train_time_s", "latency_ms"],
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
                     "flag": _flag(m, task), **{k: m.get(k) for k in COLUMNS[task]}})
    baseline_metric = "cosine" if task == "vector" else "val_loss"
    for key, value in parent.data.metrics.items():
        if key.startswith("baseline.") and key.endswith("." + baseline_metric):
            name = key[len("baseline."):-len("." + baseline_metric)]
            row = {"entry": name, "kind": "baseline", "run": "", "params": "", "precision": "", "flag": ""}
            if task == "vector":
                row.update({"val_cosine_seed": value, "val_mse_seed": parent.data.metrics.get(f"baseline.{name}.mse"),
                            "retrieval_acc": parent.data.metrics.get(f"baseline.{name}.retrieval_acc"),
                            "val_frac_cos_gt_0.5_seed": parent.data.metrics.get(f"baseline.{name}.frac_cos_gt_0.5")})
            else:
                row.update({"val_loss": value, "val_bpb": parent.data.metrics.get(f"baseline.{name}.val_bpb")})
            rows.append(row)
    rows.sort(key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0) if mode == "max" else (r.get(metric) or 0)))
    cols = ["entry", "kind", *COLUMNS[task], "params", "precision", "run"]
    if task == "vector":
        cols.insert(2, "flag")
    return {"rows": rows, "columns": cols, "metric": metric, "mode": mode,
            "sweep_id": parent.data.tags.get(tracking.TAG_SWEEP), "markdown": to_markdown(rows, cols)}


def _flag(metrics: dict[str, float], task: str) -> str:
    """"collapsed" for a vector model predicting nearly one vector whatever the context."""
    self_cos = metrics.get("val_pred_self_cos")
    return "collapsed" if task == "vector" and self_cos is not None and self_cos > COLLAPSE_THRESHOLD else ""


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def to_markdown(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render(board: dict[str, Any], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # wide enough for every column even when stdout is a pipe (CI logs, ray job logs)
    console = console or Console(width=max(160, Console().width))
    table = Table(title=f"leaderboard {board.get('sweep_id') or ''} ({board['metric']}, {board['mode']})")
    for col in board["columns"]:
        table.add_column(col, justify="left" if col in ("entry", "kind", "flag", "run", "precision") else "right",
                         no_wrap=col == "entry", min_width=17 if col == "entry" else None)
    for r in board["rows"]:
        style = "dim" if r["kind"] == "baseline" else None
        table.add_row(*[_fmt(r.get(c)) for c in board["columns"]], style=style)
    console.print(table)
