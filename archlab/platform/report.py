"""`archlab report`: one sweep as a self-contained HTML page and the PNGs behind it.

Reads only MLflow (runs, tags, metric histories) and the sweep's Optuna journal; writes
`report.html` (every image inline as base64, no scripts, no network) and the PNGs into
`out`, and logs them as artifacts under `report/` on the sweep's parent run.

Figures (matplotlib, Agg backend):
- curves.png: learning curves per architecture, the mean and 95% t band over confirm
  seeds (the best search trial when there are no confirm runs); x = train FLOPs when
  logged, else samples seen, else epochs;
- pareto.png: every run's final score against its train FLOPs, the Pareto frontier
  (best score at no more compute) marked;
- leaderboard.png: mean and 95% CI per architecture, baselines as lines; the table
  with verdicts and flags is beside it in the HTML;
- slices_<arch>.png: search trials' score against each searched parameter;
- importances.png: Optuna's fANOVA parameter importances per architecture.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from archlab.platform import leaderboard as lb
from archlab.platform import stats, tracking

X_KEYS = (("train_flops", "train FLOPs"), ("samples_seen", "samples seen"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": a legend outside the axes stays in
    _plt().close(fig)
    return path


def _arch_colors(archs) -> dict[str, Any]:
    """One distinct colour per architecture, the same in every plot of a report (the default
    cycle repeats after 10: a 20-architecture sweep drew amn and mamba2 in one blue)."""
    cmap = _plt().get_cmap("tab10" if len(archs) <= 10 else "tab20")
    return {a: cmap(i % cmap.N) for i, a in enumerate(sorted(archs))}


def _legend(ax) -> None:
    """In the axes for a few entries; beside them for more, so it never hides the curves or
    the title (20 architectures filled a 7-inch plot)."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= 6:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  ncol=1 + (len(handles) - 1) // 22)


def _history(c, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in c.get_metric_history(run_id, key)}


def curves_of(c, runs: list, metric: str) -> tuple[str, dict[str, list[tuple[list[float], list[float]]]]]:
    """x label and per run id the (x, y) points of `metric`, x on the first axis every run
    has (train FLOPs, samples seen, else the logged step = epoch)."""
    hist = {r.info.run_id: _history(c, r.info.run_id, metric) for r in runs}
    for key, label in X_KEYS:
        xs = {r.info.run_id: _history(c, r.info.run_id, key) for r in runs}
        if runs and all(xs[r.info.run_id] for r in runs if hist[r.info.run_id]):
            out = {}
            for rid, h in hist.items():
                steps = sorted(s for s in h if s in xs[rid])
                out[rid] = ([xs[rid][s] for s in steps], [h[s] for s in steps])
            return label, out
    return "epoch", {rid: (sorted(h), [h[s] for s in sorted(h)]) for rid, h in hist.items()}


def _arch_runs(runs: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags.get(tracking.TAG_ARCH, "?"), []).append(r)
    return out


def plot_curves(c, runs: list, metric: str, mode: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_arch = _arch_runs(runs)
    colors = _arch_colors(by_arch)
    for arch, rs in sorted(by_arch.items()):
        confirm = [r for r in rs if lb.stage(r) == lb.STAGE_CONFIRM]
        if not confirm:
            scored = [r for r in rs if lb._finite(r.data.metrics.get(metric))]
            if not scored:
                continue
            pick = max if mode == "max" else min
            confirm = [pick(scored, key=lambda r: r.data.metrics[metric])]
        label, pts = curves_of(c, confirm, metric)
        # confirm seeds share the budget grid: average point i across seeds
        n = min(len(pts[r.info.run_id][1]) for r in confirm)
        if n == 0:
            continue
        xs = [sum(pts[r.info.run_id][0][i] for r in confirm) / len(confirm) for i in range(n)]
        ivs = [stats.t_interval([pts[r.info.run_id][1][i] for r in confirm]) for i in range(n)]
        ax.plot(xs, [iv.mean for iv in ivs], marker="o", ms=3, color=colors[arch], label=f"{arch} (n={len(confirm)})")
        if len(confirm) > 1:
            ax.fill_between(xs, [iv.lo for iv in ivs], [iv.hi for iv in ivs], color=colors[arch], alpha=0.15)
    ax.set_xlabel(label if runs else "epoch")
    ax.set_ylabel(metric)
    ax.set_title("learning curves: mean and 95% t band over confirm seeds")
    _legend(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """(compute, score) points not beaten by any point with no more compute, by compute."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if mode == "max" else p[1])):
        if best is None or (y > best if mode == "max" else y < best):
            front.append((x, y))
            best = y
    return front


def plot_pareto(runs: list, metric: str, mode: str, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xkey, xlabel = next(((k, lab) for k, lab in X_KEYS + (("train_time_s", "train seconds"),)
                         if any(lb._finite(r.data.metrics.get(k)) for r in runs)), (None, "run"))
    points = []
    by_arch = _arch_runs(runs)
    colors = _arch_colors(by_arch)
    for arch, rs in sorted(by_arch.items()):
        pts = [(r.data.metrics[xkey] if xkey else i, r.data.metrics[metric]) for i, r in enumerate(rs)
               if lb._finite(r.data.metrics.get(metric)) and (xkey is None or lb._finite(r.data.metrics.get(xkey)))]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, label=arch, alpha=0.8, color=colors[arch])
            points += pts
    front = pareto_front(points, mode)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2,
                label="Pareto frontier")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=60, facecolors="none", edgecolors="black")
    if xkey in ("train_flops", "samples_seen") and points and min(p[0] for p in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"score vs compute ({len(points)} runs)")
    _legend(ax)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_board(board: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    models = [r for r in board["rows"] if r["kind"] == "model"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(models), 2) + 1.5))
    for i, r in enumerate(models):
        lo, hi = r.get("ci_lo"), r.get("ci_hi")
        err = [[r["mean"] - lo], [hi - r["mean"]]] if lb._finite(lo) and lb._finite(hi) else None
        ax.errorbar([r["mean"]], [i], xerr=err, fmt="o", capsize=4)
    # the best baseline only: the others (random ~ 0) would squeeze the intervals to dots
    for r in board["rows"]:
        if r["kind"] == "baseline" and r["entry"] == board.get("best_baseline") and lb._finite(r.get("mean")):
            ax.axvline(r["mean"], ls="--", lw=0.8, color="grey")
            ax.text(r["mean"], 1.01, r["entry"], transform=ax.get_xaxis_transform(), fontsize=7,
                    ha="center", va="bottom", color="grey")
    ax.set_yticks(range(len(models)), [f"{r['entry']} ({r.get('vs_base') or '-'})" for r in models])
    ax.invert_yaxis()
    ax.set_xlabel(f"{board['metric']} (mean, 95% t CI over confirm seeds)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def _param_value(run, key: str):
    section, name = key.split(".", 1)
    raw = run.data.params.get(f"model.params.{name}" if section == "model" else key)
    try:
        return float(raw)
    except (TypeError, ValueError):
        return raw


def plot_slices(runs: list, arch: str, metric: str, settings: dict, path: Path) -> Path | None:
    from archlab.search_spaces import load_space

    try:
        space = load_space(arch, smoke=settings["smoke"], overrides=settings["overrides"].get(arch))
    except Exception:
        return None
    search = [r for r in runs if lb.stage(r) == lb.STAGE_SEARCH and lb._finite(r.data.metrics.get(metric))]
    keys = sorted(k for k in space if any(_param_value(r, k) is not None for r in search))
    if not search or not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        vals = [(_param_value(r, key), r.data.metrics[metric]) for r in search if _param_value(r, key) is not None]
        if all(isinstance(v, float) for v, _ in vals):
            ax.scatter([v for v, _ in vals], [y for _, y in vals], s=16)
            if space[key].get("log"):
                ax.set_xscale("log")
            for bound in ("low", "high"):
                if bound in space[key]:
                    ax.axvline(float(space[key][bound]), ls=":", color="grey")
        else:
            cats = sorted({str(v) for v, _ in vals})
            ax.scatter([cats.index(str(v)) for v, _ in vals], [y for _, y in vals], s=16)
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(key.split(".", 1)[1])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{arch}: {len(search)} search trials")
    return _save(fig, path)


def importances(study, archs: list[str], skipped: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """fANOVA importances per architecture over its own completed trials (the space is
    conditional on the arch: each arch's parameters exist only in its trials). Archs
    without importances get their reason in `skipped`."""
    skipped = {} if skipped is None else skipped
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, dict[str, float]] = {}
    for arch in archs:
        trials = [t for t in done if t.params.get("arch") == arch]
        sub = optuna.create_study(direction=study.direction)
        sub.add_trials(trials)
        params = sorted({p for t in trials for p in t.params if p != "arch"})
        if len(trials) < 2 or not params:
            skipped[arch] = f"{len(trials)} completed trial(s), {len(params)} parameter(s)"
            continue
        try:
            imp = get_param_importances(sub, evaluator=FanovaImportanceEvaluator(seed=0), params=params)
        except Exception as e:  # e.g. a parameter that never varied; the rest of the report stands
            skipped[arch] = f"{type(e).__name__}: {e}"
            continue
        out[arch] = {k[len(arch) + 1:] if k.startswith(arch + ".") else k: float(v) for k, v in imp.items()}
    return out


def plot_importances(imp: dict[str, dict[str, float]], path: Path) -> Path | None:
    if not imp:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(imp), figsize=(3.4 * len(imp), 3), squeeze=False)
    for ax, (arch, vals) in zip(axes[0], sorted(imp.items())):
        names = sorted(vals, key=lambda k: -vals[k])
        ax.barh(names, [vals[k] for k in names])
        ax.invert_yaxis()
        ax.set_title(arch)
        ax.set_xlabel("importance (fANOVA)")
    return _save(fig, path)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(board: dict[str, Any]) -> str:
    cols = ["entry", "kind", "stage", "n", "mean", "ci_lo", "ci_hi", "d_base", "d_base_lo", "d_base_hi",
            "vs_base", "p_base_adj", "d_ref", "vs_ref", "p_ref_adj", "search_trials", "search_flops",
            "edge", "collapsed"]
    head = "".join(f"<th>{html.escape(board['metric'] if c == 'mean' else c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(lb._fmt(r.get(c), c))}</td>" for c in cols) + "</tr>"
                   for r in board["rows"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
       "text-align:right}td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}")


def default_journal(parent) -> Path | None:
    """<sweep.storage_path or ./archlab_runs>/<sweep_id>/optuna.journal, as the sweep wrote it."""
    from archlab.platform.study import journal_path

    import os

    storage = parent.data.params.get("sweep.storage_path")
    if storage in (None, "", "None"):  # as runtime.storage_path resolves it
        storage = os.environ.get("ARCHLAB_STORAGE") or str(Path("archlab_runs").resolve())
    if "://" in storage:
        return None
    return journal_path(storage, parent.data.tags.get(tracking.TAG_SWEEP, ""))


def make_report(uri: str, experiment: str, out: str | Path, sweep_id: str | None = None,
                journal: str | Path | None = None, log_artifacts: bool = True) -> Path:
    """Write <out>/report.html and its PNGs for the sweep (latest of `experiment` when
    `sweep_id` is None), log them on the sweep's parent run; returns the HTML's path."""
    exp_id, parent = lb.latest_parent(uri, experiment, sweep_id)
    task = parent.data.params.get("train.task", "vector")
    metric, mode = ("val_cosine_seed", "max") if task == "vector" else ("val_loss", "min")
    c = tracking.client(uri)
    board = lb.leaderboard(uri, exp_id, parent.info.run_id, metric, mode)
    runs = lb.child_runs(uri, exp_id, parent.info.run_id)
    settings = lb.parent_settings(parent)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = [(plot_curves(c, runs, metric, mode, out / "curves.png"), "learning curves per architecture"),
            (plot_pareto(runs, metric, mode, out / "pareto.png"), "best score vs train FLOPs, Pareto frontier"),
            (plot_board(board, out / "leaderboard.png"), "leaderboard: mean and 95% CI, best baseline dashed")]
    for arch, rs in sorted(_arch_runs(runs).items()):
        p = plot_slices(rs, arch, metric, settings, out / f"slices_{arch}.png")
        if p is not None:
            figs.append((p, f"{arch}: parameter slices over search trials"))
    journal = Path(journal) if journal is not None else default_journal(parent)
    note = ""
    try:
        from archlab.platform.study import load_study

        if journal is None:
            raise FileNotFoundError("the sweep's storage is not a file system: no journal")
        skipped: dict[str, str] = {}
        imp = importances(load_study(journal, board.get("sweep_id")), sorted(_arch_runs(runs)), skipped)
        p = plot_importances(imp, out / "importances.png")
        if p is not None:
            figs.append((p, "Optuna parameter importances (fANOVA) per architecture"))
        if skipped:
            note = "No parameter importances for " + "; ".join(f"{a} ({why})" for a, why in sorted(skipped.items()))
    except (FileNotFoundError, KeyError) as e:
        note = f"Parameter importances: {e}"
    title = f"archlab sweep {board.get('sweep_id') or ''}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>experiment {html.escape(experiment)}; {len(runs)} runs; metric {metric} ({mode}); "
             f"verdicts vs best baseline {html.escape(str(board.get('best_baseline')))} and reference "
             f"{html.escape(str(board.get('reference')))}, Holm-adjusted over architectures.</p>",
             "<h2>Leaderboard</h2>", _table(board), f"<pre>{html.escape(lb.to_table(board))}</pre>"]
    parts += [_img(p, cap) for p, cap in figs]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    parts.append("</body></html>\n")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    if log_artifacts:
        for p in [page] + [p for p, _ in figs]:
            c.log_artifact(parent.info.run_id, str(p), artifact_path="report")
    return page


def sweep_report(cfg, result: dict[str, Any]) -> Path:
    """The report `archlab sweep` / `demo` write when the sweep ends: into
    <storage>/<sweep_id>/report (./archlab_reports/<sweep_id> for object-store storage)."""
    from archlab.platform.runtime import storage_path
    from archlab.platform.study import journal_path

    storage = storage_path(cfg)
    local = "://" not in storage
    out = Path(storage) / result["sweep_id"] / "report" if local else Path("archlab_reports") / result["sweep_id"]
    return make_report(result["tracking_uri"], cfg.tracking.experiment or cfg.sweep.name, out,
                       sweep_id=result["sweep_id"],
                       journal=journal_path(storage, result["sweep_id"]) if local else None)
