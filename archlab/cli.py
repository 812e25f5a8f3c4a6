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
SmokeOpt = typer.Option(False, "--smoke-test", help="debug flavors, tiny budget: seconds to a couple of minutes on CPU.")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Optional[Path], sets: Optional[list[str]], smoke: bool):
    from archlab.platform.config import load_config

    return load_config(config, sets or [], smoke_test=smoke)


def _fail(e: Exception) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def _user_errors():
    from archlab.architectures.registry import UnknownArchitectureError
    from archlab.platform.config import ConfigError
    from archlab.platform.shards import DataError

    return (ConfigError, DataError, UnknownArchitectureError)


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
        flag = "[green]champion[/]" if d["promoted"] else "kept previous champion"
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
def train(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt, smoke_test: bool = SmokeOpt) -> None:
    """Train one architecture (model.arch) with Ray Train DDP; track and register it."""
    _setup_logging()
    try:
        cfg = _load(config, set_, smoke_test)
        from archlab.platform.leaderboard import render
        from archlab.platform.sweep import run_train

        result = run_train(cfg)
    except _user_errors() as e:
        _fail(e)
    render(result["leaderboard"])
    _print_registry(result["registry"])
    _where(result)


@app.command()
def sweep(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    smoke_test: bool = SmokeOpt,
    resume: bool = typer.Option(False, "--resume", help="Resume the latest sweep of this name (Tuner.restore)."),
) -> None:
    """Ray Tune sweep: Optuna TPE over architectures and their spaces, ASHA early stopping."""
    _setup_logging()
    try:
        cfg = _load(config, set_, smoke_test)
        from archlab.platform.leaderboard import render
        from archlab.platform.sweep import run_sweep

        result = run_sweep(cfg, resume=resume)
    except _user_errors() as e:
        _fail(e)
    render(result["leaderboard"])
    _print_registry(result["registry"])
    n_err = sum(1 for t in result["trials"] if t.get("error"))
    print(f"sweep {result['sweep_id']}: {len(result['trials'])} trials, {n_err} errored")
    _where(result)
    if n_err == len(result["trials"]):
        raise typer.Exit(1)


@app.command()
def demo(
    set_: Optional[list[str]] = SetOpt,
    smoke_test: bool = SmokeOpt,
) -> None:
    """The main job: a sweep on the shipped WikiText-2 sample, leaderboard, champion."""
    sweep(config=CONFIGS / "demo.yaml", set_=set_, smoke_test=smoke_test, resume=False)


@app.command()
def leaderboard(
    experiment: str = typer.Option("archlab", "--experiment", "-e", help="MLflow experiment (= sweep name)."),
    sweep_id: Optional[str] = typer.Option(None, "--sweep", help="A sweep id, e.g. archlab-3 (default: latest)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./mlflow.db"),
) -> None:
    """Print a sweep's leaderboard (models and baselines) from MLflow."""
    from archlab.platform.config import load_config
    from archlab.platform.leaderboard import latest_parent, leaderboard as make, render
    from archlab.platform.runtime import tracking_uri as resolve

    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
    try:
        exp_id, parent = latest_parent(uri, experiment, sweep_id)
    except KeyError as e:
        _fail(e)
    metric = parent.data.params.get("train.task", "vector")
    metric, mode = ("val_cosine_seed", "max") if metric == "vector" else ("val_loss", "min")
    render(make(uri, exp_id, parent.info.run_id, metric, mode))


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
    print("accuracy at the scored positions (vector: nearest-value retrieval)")
    print("state = recurrent state bytes at batch 1 (fp32); kv/tok = cache bytes per token")
    for line in table_lines(result):
        print(line)
    print("widths: " + "; ".join(f"{a}: {', '.join(f'{k}={v}' for k, v in o.items())}"
                                 for a, o in result.widths.items()))
    _where({"tracking_uri": uri})


@app.command()
def models(
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri"),
    prefix: str = typer.Option("archlab", "--prefix"),
    predict: Optional[str] = typer.Option(None, "--predict", help="Load models:/NAME@champion and score it on the sample."),
) -> None:
    """List registered model versions, their tags and aliases (champion)."""
    from rich.console import Console
    from rich.table import Table

    from archlab.platform import tracking
    from archlab.platform.config import load_config
    from archlab.platform.runtime import tracking_uri as resolve

    uri = resolve(load_config(None, [f"tracking.uri={tracking_uri}"] if tracking_uri else []))
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
        import mlflow.pytorch
        import numpy as np
        import torch

        from archlab.platform.config import REPO_SAMPLE
        from archlab.platform.data import read_vector_docs
        from archlab.platform.shards import load_manifest, split_files

        mlflow.set_tracking_uri(uri)
        model = mlflow.pytorch.load_model(f"models:/{predict}@champion")
        docs = read_vector_docs(split_files(REPO_SAMPLE, load_manifest(REPO_SAMPLE), "valid"), 384)
        x = torch.as_tensor(np.stack([d[:6] for d in docs if len(d) >= 6]))
        pred = model(x[:, :-1])[:, -1]
        cos = torch.nn.functional.cosine_similarity(pred, x[:, -1], dim=-1).mean()
        print(f"{predict}@champion: {len(x)} predictions, norm {pred.norm(dim=-1).mean():.4f}, "
              f"mean cosine to the true next vector {cos:.4f}")


@app.command()
def submit(
    address: str = typer.Option(os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"), "--address"),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
    args: list[str] = typer.Argument(..., help="archlab arguments for the job, e.g. sweep --smoke-test"),
) -> None:
    """Submit `archlab <args>` as a Ray job with this directory as the working dir."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from archlab.platform.runtime import submit_job, wait_for_job

    client = JobSubmissionClient(address)
    entry = "archlab " + " ".join(args)
    job_id = submit_job(client, entrypoint=entry, runtime_env={"working_dir": ".", "excludes": [
        ".venv", ".git", "archlab_runs", "mlflow.db", "mlruns"]})
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
