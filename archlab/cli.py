"""`archlab` command line. Heavy imports (torch, ray, mlflow) happen inside commands, so
`archlab --help` stays fast."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compare sequence-model architectures with Ray Train/Tune, Optuna and MLflow.")

CONFIGS = Path(__file__).resolve().parent / "configs"

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (see archlab/configs/).")
SetOpt = typer.Option(None, "--set", "-s", help="Override, e.g. train.lr=1e-3 or model.d_model=64 (repeatable).")
SmokeOpt = typer.Option(False, "--smoke-test", help="debug flavors, tiny budget, 1 worker per trial: seconds to a few minutes on CPU.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Also print Ray's worker logs, Tune's per-trial tables and Ray Data progress (always in the Ray session's log files).")


def _setup_logging(verbose: bool = False) -> None:
    # --verbose: archlab's own DEBUG lines; Ray's output is the business of runtime.quiet_console
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("archlab").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Optional[Path], sets: Optional[list[str]], smoke: bool):
    from archlab.platform.config import load_config

    return load_config(config, sets or [], smoke_test=smoke)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _fail(e: BaseException, code: int = 2, label: str = "error") -> None:
    """A user error: one line on stderr (no traceback), exit `code` (2: refused input)."""
    from rich.markup import escape

    from rich.console import Console

    Console(stderr=True).print(f"[bold red]{label}:[/] {escape(_one_line(e))}", highlight=False,
                               markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors():
    from archlab.architectures.registry import ArchConfigError, UnknownArchitectureError
    from archlab.platform.config import ConfigError
    from archlab.platform.shards import DataError

    return (ConfigError, DataError, UnknownArchitectureError, ArchConfigError)


def _run_job(fn):
    """Run a train/sweep job: refused input exits 2, a training ended by a terminal error
    (non-finite loss, ...) exits 1, SIGINT/SIGTERM exit 130; each as one line on stderr.
    The job itself has ended its MLflow runs (FAILED / KILLED) before this prints."""
    from archlab.platform.failures import Interrupted, TrialFailed, install_signal_handlers

    install_signal_handlers()
    try:
        return fn()
    except _user_errors() as e:
        _fail(e)
    except TrialFailed as e:
        _fail(e, code=1, label="training failed")
    except (Interrupted, KeyboardInterrupt) as e:
        from archlab.platform import failures

        why = str(e) or (f"interrupted by {failures.last_signal}" if failures.last_signal else "interrupted")
        _fail(why, code=130, label="stopped")


def _where(result: dict) -> None:
    from rich.console import Console

    con = Console()
    uri = result.get("tracking_uri", "")
    con.print(f"MLflow store: {uri}")
    con.print(f"  UI: mlflow ui --backend-store-uri {uri} --port 5000   (then http://127.0.0.1:5000)")
    con.print("Ray dashboard (while Ray runs): http://127.0.0.1:8265")


def _print_registry(decisions: list[dict]) -> None:
    from rich.console import Console

    con = Console()
    for d in decisions:
        flag = ("[green]champion[/]" if d["promoted"] else
                "not champion" if d.get("verdict") == "worse" else "kept previous champion")
        con.print(f"registered {d['name']} v{d['version']} score={d['score']:.4f}: {flag} ({d.get('reason', '')})")


@app.command()
def archs() -> None:
    """List the architecture registry: tasks, flavors and kernel paths on this machine."""
    from rich.console import Console
    from rich.table import Table

    from archlab.architectures.registry import list_specs, load_module

    try:
        from archlab.kernels import available_paths
    except ImportError:  # pragma: no cover
        available_paths = None
    table = Table(title="archlab architectures")
    for col in ("name", "tasks", "flavors", "kernel paths here", "summary"):
        table.add_column(col)
    for spec in list_specs():
        try:
            flavors = ", ".join(load_module(spec.name).FLAVORS)
        except Exception as e:  # an arch with a broken optional dependency must not hide the others
            flavors = f"[red]unavailable: {type(e).__name__}: {e}[/]"
        paths = "; ".join(f"{op}: {'/'.join(available_paths(op))}" for op in spec.kernels) if available_paths else ""
        table.add_row(spec.name, ", ".join(spec.tasks), flavors, paths or "-", spec.summary)
    Console().print(table)


@app.command()
def train(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, smoke_test: bool = SmokeOpt,
          verbose: bool = VerboseOpt) -> None:
    """Train one architecture (model.arch) with Ray Train DDP; track and register it."""
    _setup_logging(verbose)
    from archlab.platform.leaderboard import render

    def job():
        from archlab.platform.sweep import run_train

        return run_train(_load(config, set_, smoke_test), verbose=verbose)

    result = _run_job(job)
    render(result["leaderboard"])
    _print_registry(result["registry"])
    _where(result)


@app.command()
def sweep(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    smoke_test: bool = SmokeOpt,
    resume: bool = typer.Option(False, "--resume", help="Resume the latest sweep of this name (Tuner.restore)."),
    add_samples: int = typer.Option(0, "--add-samples", metavar="K",
                                    help="With --resume: extend the sweep by K search trials (TPE continues "
                                         "from its study), then confirm and register over all of them."),
    verbose: bool = VerboseOpt,
) -> None:
    """Ray Tune sweep: Optuna TPE over architectures and their spaces, ASHA early stopping."""
    _setup_logging(verbose)
    from archlab.platform.leaderboard import render

    loaded = {}

    def job():
        from archlab.platform.sweep import run_sweep

        loaded["cfg"] = _load(config, set_, smoke_test)
        return run_sweep(loaded["cfg"], resume=resume, verbose=verbose, add_samples=add_samples)

    result = _run_job(job)
    render(result["leaderboard"])
    _print_registry(result["registry"])
    errored = [t for t in result["trials"] if t.get("error")]
    n_err = len(errored)
    print(f"sweep {result['sweep_id']}: {len(result['trials'])} trials, {n_err} errored")
    for t in errored:
        print(f"  trial {t['trial_id']}: {_one_line(t['error'])}")
    confirm = result.get("confirm") or []
    if confirm:
        c_err = [t for t in confirm if t.get("error")]
        print(f"confirm stage: {len(confirm)} runs, {len(c_err)} errored")
        for t in c_err:
            print(f"  confirm run {t['trial_id']}: {_one_line(t['error'])}")
    _where(result)
    if n_err == len(result["trials"]):
        raise typer.Exit(1)
    from archlab.platform.report import sweep_report

    try:
        print(f"report: {sweep_report(loaded['cfg'], result).resolve()}")
    except Exception as e:  # the sweep and its records are complete; only the page is missing
        print(f"report: not written ({type(e).__name__}: {_one_line(e)}); "
              f"try `archlab report -e {loaded['cfg'].tracking.experiment or loaded['cfg'].sweep.name}`")


@app.command()
def demo(
    set_: Optional[list[str]] = SetOpt,
    smoke_test: bool = SmokeOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """The main job: a sweep on the shipped WikiText-2 sample, leaderboard, champion."""
    sweep(config=CONFIGS / "demo.yaml", set_=set_, smoke_test=smoke_test, resume=False, add_samples=0, verbose=verbose)


@app.command()
def leaderboard(
    experiment: str = typer.Option("archlab", "--experiment", "-e", help="MLflow experiment (= sweep name)."),
    sweep_id: Optional[str] = typer.Option(None, "--sweep", help="A sweep id, e.g. archlab-3 (default: latest)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
    wide: bool = typer.Option(False, "--wide", help="Every column (default: fits 100 columns)."),
    fmt: str = typer.Option("table", "--format", help="table | markdown | csv | json"),
) -> None:
    """Print a sweep's leaderboard (models with CIs and verdicts, baselines) from MLflow."""
    from archlab.platform.config import load_config
    from archlab.platform.leaderboard import latest_parent, leaderboard as make, render
    from archlab.platform.runtime import tracking_uri as resolve

    if fmt not in ("table", "markdown", "csv", "json"):
        _fail(ValueError(f"--format must be table, markdown, csv or json, found {fmt!r}"))
    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    try:
        exp_id, parent = latest_parent(uri, experiment, sweep_id)
    except KeyError as e:
        _fail(e)
    metric = parent.data.params.get("train.task", "vector")
    metric, mode = ("val_cosine_seed", "max") if metric == "vector" else ("val_loss", "min")
    render(make(uri, exp_id, parent.info.run_id, metric, mode), fmt=fmt, wide=wide)


@app.command()
def report(
    experiment: str = typer.Option("archlab", "--experiment", "-e", help="MLflow experiment (= sweep name)."),
    sweep_id: Optional[str] = typer.Option(None, "--sweep", help="A sweep id (default: latest)."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for report.html and its PNGs."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
) -> None:
    """Write a sweep's self-contained report.html (curves, Pareto, verdicts, slices, importances)."""
    from archlab.platform.config import load_config
    from archlab.platform.report import make_report
    from archlab.platform.runtime import tracking_uri as resolve

    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    try:
        page = make_report(uri, experiment, out, sweep_id)
    except KeyError as e:
        _fail(e)
    print(f"report: {page.resolve()}")


@app.command()
def probe(
    archs: str = typer.Option(..., "--archs", help="Comma-separated architectures, e.g. transformer,mamba2,lstm."),
    preset: str = typer.Option("lite", "--preset", help="lite (minutes on CPU) | full (zoology-like grid, GPU)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated subset: mqar,copy,selective_copy,vector_mqar."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per (cell, lr), replacing the preset's."),
    seed: int = typer.Option(0, "--seed"),
    experiment: str = typer.Option("archlab-probe", "--experiment", "-e", help="MLflow experiment."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
) -> None:
    """Capability probes (copy, selective copy, MQAR, vector MQAR): accuracy per arch and cell."""
    _setup_logging()
    from archlab.platform.config import load_config
    from archlab.platform.probe import run_probe, table_lines
    from archlab.platform.runtime import tracking_uri as resolve

    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    names = [a.strip() for a in archs.split(",") if a.strip()]
    wanted = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None

    def progress(row: dict) -> None:
        acc = f"{row['accuracy']:.3f} (lr {row['best_lr']:g})" if "accuracy" in row else row.get("error", "")
        print(f"{row['arch']:<12} {row['task']} {row['cell']}: {acc}", flush=True)

    try:
        result = run_probe(names, preset, tasks=wanted, tracking_uri=uri, experiment=experiment, seed=seed,
                           steps=steps, on_row=progress)
    except (ValueError, KeyError) as e:
        _fail(e)
    print(f"probe {result.probe_id}: preset {result.preset}, best of lrs per cell")
    print("  accuracy at the scored positions (vector: nearest-value retrieval)")
    print("  state = recurrent state bytes at batch 1 (fp32), kv/tok = cache bytes per token")
    for line in table_lines(result):
        print(line)
    print("widths: " + "; ".join(f"{a}: {', '.join(f'{k}={v}' for k, v in o.items())}"
                                 for a, o in result.widths.items()))
    _where({"tracking_uri": uri})


@app.command()
def models(
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    prefix: str = typer.Option("archlab", "--prefix"),
    predict: Optional[str] = typer.Option(None, "--predict", help="Load models:/NAME@champion (or a model URI) and run it on --data/--split."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder for --predict (default: the one the model was trained on)."),
    split: str = typer.Option("valid", "--split", help="Split for --predict."),
    convert: Optional[str] = typer.Option(None, "--convert", help="Re-register NAME's old pickle-format versions as weights + spec."),
) -> None:
    """List registered model versions, their tags and aliases (champion)."""
    from rich.console import Console
    from rich.table import Table

    from archlab.platform import tracking
    from archlab.platform.config import load_config
    from archlab.platform.runtime import tracking_uri as resolve

    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    if convert:
        from archlab.platform import modelstore

        try:
            done = modelstore.convert(uri, convert)
        except (*_user_errors(), modelstore.ModelFormatError, modelstore.UnsafeFileError) as e:
            _fail(e)
        for d in done:
            print(f"converted {d['name']} v{d['from']} -> v{d['to']} (weights + spec)"
                  + (f"; moved {', '.join(d['aliases'])}" if d["aliases"] else ""))
        if not done:
            print(f"{convert}: no old-format version left to convert")
    rows = tracking.list_models(uri, prefix)
    table = Table(title=f"registered models at {uri}")
    for col in ("name", "version", "aliases", "arch", "dataset", "metric", "value", "decision"):
        table.add_column(col)
    for r in rows:
        t = r["tags"]
        table.add_row(r["name"], str(r["version"]), ",".join(r["aliases"]), t.get("arch", ""),
                      t.get("dataset_id", ""), t.get("metric", ""), t.get("metric_value", ""),
                      t.get("archlab.champion_decision", ""))
    Console().print(table)
    if predict:
        from archlab.platform import modelstore
        from archlab.platform.evaluate import predict_summary

        model_uri = predict if ":/" in predict else f"models:/{predict}@champion"
        try:
            print(predict_summary(model_uri, data, split, uri))
        except (*_user_errors(), modelstore.ModelFormatError, modelstore.UnsafeFileError) as e:
            _fail(e)


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-ID or runs:/RUN_ID/model"),
    data: Path = typer.Option(..., "--data", help="A prepared dataset folder (manifest.json)."),
    split: str = typer.Option("valid", "--split", help="The split to score."),
    train_split: str = typer.Option("train", "--train-split", help="The split the baselines learn from (mean vector, nearest neighbour, unigram)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
    experiment: str = typer.Option("archlab-evaluate", "--experiment", help="MLflow experiment of the evaluation run."),
    log_run: bool = typer.Option(True, "--log/--no-log", help="Log an evaluation run in MLflow."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Score a registered model on a prepared split next to every baseline, with a paired 95% CI."""
    from archlab.platform import modelstore
    from archlab.platform.config import load_config
    from archlab.platform.evaluate import evaluate as run_evaluate, render, to_json
    from archlab.platform.runtime import tracking_uri as resolve

    try:
        uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
        report = run_evaluate(model, data, split, tracking_uri=uri, train_split=train_split, seed=seed,
                              log=log_run, experiment=experiment)
    except (*_user_errors(), modelstore.ModelFormatError, modelstore.UnsafeFileError) as e:
        _fail(e)
    render(report)
    if json_out:
        json_out.write_text(to_json(report))


@app.command()
def submit(
    address: str = typer.Option(os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"), "--address"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    args: list[str] = typer.Argument(..., help="archlab arguments for the job, e.g. sweep --smoke-test"),
) -> None:
    """Submit `archlab <args>` as a Ray job with this directory as the working dir."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    from archlab.platform.runtime import submit_job, wait_for_job

    entry = "archlab " + " ".join(args)
    try:
        client = JobSubmissionClient(address)
        job_id = submit_job(client, entrypoint=entry, runtime_env={"working_dir": ".", "excludes": [
            ".venv", ".git", "archlab_runs", "mlflow.db", "mlruns"]})
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _fail(RuntimeError(
            f"the Ray head at {address} refused the submission ({first}): it runs with token "
            "authentication; give this shell its token with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=... "
            "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)"))
    print(f"submitted {job_id}: {entry}")
    if not wait:
        return
    status = wait_for_job(client, job_id)
    print(client.get_job_logs(job_id))
    print(f"job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        raise typer.Exit(1)


try:  # `archlab data ...` (prepare / validate / manifest / inspect)
    from archlab.platform.data_cli import app as _data_app

    app.add_typer(_data_app, name="data", help="Prepare, validate and inspect datasets.")
except ImportError:  # pragma: no cover - only while the data CLI is absent
    pass


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
