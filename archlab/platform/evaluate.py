"""`archlab evaluate MODEL --data DIR --split NAME`: score a registered model on any
prepared split, next to every baseline on the same windows, with a paired 95% CI.

MODEL is `models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<run_id>/model` or
a logged model's `models:/m-<id>`. The order of work is what makes refusals cheap:
1. the model's spec is read from its MLmodel file and the split's facts from the
   dataset's manifest; a task, dim or vocab that does not match is refused here, naming
   both, before any data or weights are read;
2. the split is validated (archlab.platform.validate, as training does), its windows are
   cut, the model is rebuilt from its weights + spec (archlab.platform.modelstore);
3. metrics on those windows, for the model and every baseline, and the per-window paired
   comparison of the model with each baseline (archlab.platform.stats: t interval of the
   mean difference, Holm over the baselines, verdicts);
4. an evaluation run in MLflow, linked to the model: tags with the model's name, version
   and URI, the dataset id and split; the model as the run's input (MLflow 3 logged-model
   input) and the dataset as its dataset input; the version gets a tag pointing back.

Windows. Vector task: the seed protocol exactly as in training, the 5 context vectors ->
the 6th, every window of 6 consecutive vectors inside one document in document order
(the windows `baselines.baseline_window_scores` scores, so the pairs line up). Token task:
the documents packed with the separator 64 at a time, as the training's window cutter
receives them, into windows of `seq_len + 1` tokens (seq_len from the model's spec).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from archlab.platform.config import ConfigError
from archlab.platform.shards import DataError, dataset_id, load_manifest, split_files

SEED_CONTEXT = 5  # the seed protocol: 5 context vectors -> the 6th
EXPERIMENT = "archlab-evaluate"
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version>, models:/m-<id> or runs:/<run_id>/model"


# ------------------------------------------------------------------ what is evaluated
def resolve_model(model: str, tracking_uri: str) -> dict[str, Any]:
    """The model's URI, registry name/version (if registered), logged model id and the run
    that trained it. Unknown forms and missing versions name themselves."""
    from archlab.platform import modelstore, tracking

    c = tracking.client(tracking_uri)
    out: dict[str, Any] = {"model_uri": model, "name": None, "version": None}
    m_alias = re.fullmatch(r"models:/([^/@]+)@([^/]+)", model)
    m_version = re.fullmatch(r"models:/([^/@]+)/(\d+)", model)
    try:
        if m_alias:
            mv = c.get_model_version_by_alias(m_alias.group(1), m_alias.group(2))
        elif m_version:
            mv = c.get_model_version(m_version.group(1), m_version.group(2))
        elif model.startswith(("runs:/", "models:/m-")):
            mv = None
        else:
            raise ConfigError(f"MODEL {model!r}: expected {URI_FORMS}")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"MODEL {model!r}: not found in the registry at {tracking_uri} "
                          f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if mv is not None:
        out.update(name=mv.name, version=str(mv.version))
    info = modelstore.model_info(model, tracking_uri)
    out.update(model_id=info.model_id, run_id=info.run_id, spec=modelstore.read_spec(model, info=info))
    return out


def check_split(spec: dict[str, Any], manifest: dict[str, Any], root: Path, split: str, model_uri: str) -> None:
    """Refuse a split that cannot feed the model, naming both sides (manifest facts only)."""
    where = f"{root / 'manifest.json'} (split {split!r})"
    task, kind = spec.get("task"), manifest.get("kind")
    if kind != task:
        raise DataError(f"{where}: kind {kind!r} does not match the model {model_uri}: task {task!r}")
    if task == "vector" and manifest.get("dim") != spec.get("d_in"):
        raise DataError(f"{where}: dim {manifest.get('dim')} does not match the model {model_uri}: "
                        f"d_in {spec.get('d_in')}")
    if task == "token" and manifest.get("vocab_size") != spec.get("vocab_size"):
        raise DataError(f"{where}: vocab_size {manifest.get('vocab_size')} does not match the model "
                        f"{model_uri}: vocab_size {spec.get('vocab_size')}")
    if split not in manifest.get("splits", {}):
        raise DataError(f"{root / 'manifest.json'}: no split {split!r}; splits: {', '.join(manifest.get('splits', {}))}")


# ------------------------------------------------------------------ windows
def seed_windows(files: list[str], dim: int, context: int = SEED_CONTEXT) -> np.ndarray:
    """The seed protocol's windows [N, context + 1, D] float32, cut by the training's own
    cutter (data.vector_windows, stride 1): every run of context + 1 consecutive vectors
    inside one document, documents and starts in order, the order baseline_window_scores
    scores them in."""
    import pyarrow.parquet as pq

    from archlab.platform.data import vector_windows

    parts = [vector_windows(pq.read_table(f, columns=["vectors"]), dim=dim, length=context + 1)["x"] for f in files]
    x = np.concatenate(parts) if parts else np.zeros((0, context + 1, dim), np.float32)
    if not len(x):
        raise DataError(f"{files[0] if files else '?'}: no document has more than {context} vectors: "
                        "no seed-protocol windows")
    return x


def token_windows_split(files: list[str], seq_len: int, separator: int) -> np.ndarray:
    """Packed token windows [N, seq_len + 1] int64, cut as training cuts them
    (data.cut_windows: data.CUT_DOCS documents packed at a time)."""
    import functools

    from archlab.platform.data import cut_windows, token_windows

    parts = cut_windows(files, functools.partial(token_windows, length=seq_len + 1, separator=separator), "tokens")
    x = np.concatenate(parts) if parts else np.zeros((0, seq_len + 1), np.int64)
    if not len(x):
        raise DataError(f"{files[0] if files else '?'}: no window of {seq_len + 1} tokens in the split")
    return x


# ------------------------------------------------------------------ scoring
def _vector_scores(model, windows: np.ndarray, train_docs, eval_docs, seed: int):
    import torch

    from archlab.platform.baselines import baseline_window_scores, evaluate_baselines
    from archlab.platform.metrics import VectorMetrics, retrieval_accuracy, window_scores

    scores = window_scores(model, windows, "vector")  # (N,) seed-protocol cosine per window
    x = torch.as_tensor(windows)
    with torch.no_grad():
        pred = torch.cat([model(x[i: i + 512, :-1])[:, -1] for i in range(0, len(x), 512)]).float()
    target = x[:, -1]
    vm = VectorMetrics()
    vm.update(pred, target)
    m = vm.compute()
    metrics = {"cosine_seed": m["cosine"], "mse_seed": m["mse"],
               **{f"{k}_seed": v for k, v in m.items() if k.startswith("frac_")},
               # candidates: every window target, the set the baselines are scored against
               "retrieval_acc": retrieval_accuracy(pred, target, candidates=target)}
    base_scores = baseline_window_scores(train_docs, eval_docs, context=SEED_CONTEXT, seed=seed)
    base_full = evaluate_baselines(train_docs, eval_docs, context=SEED_CONTEXT, seed=seed)
    baselines = {name: {"cosine_seed": b["cosine"], "mse_seed": b["mse"],
                        **{f"{k}_seed": v for k, v in b.items() if k.startswith("frac_")},
                        "retrieval_acc": b["retrieval_acc"]} for name, b in base_full.items()}
    return scores, metrics, base_scores, baselines


def _token_scores(model, windows: np.ndarray, train_files: list[str], vocab: int, tokens_per_byte: float):
    import pyarrow.parquet as pq

    from archlab.platform.metrics import window_scores

    scores = window_scores(model, windows, "token")  # (N,) mean next-token loss per window
    loss = float(scores.mean())  # equal-length windows: the mean over all predicted tokens
    bpb = 1.0 / math.log(2) * tokens_per_byte
    metrics = {"loss": loss, "bpb": loss * bpb, "ppl": math.exp(min(loss, 50.0))}
    counts = np.ones(vocab, dtype=np.float64)  # add-one smoothing, as the sweep's baseline
    for f in train_files:
        col = pq.read_table(f, columns=["tokens"]).column("tokens").combine_chunks()
        counts += np.bincount(col.values.to_numpy(zero_copy_only=False), minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    base_scores = {"unigram": -logp[windows[:, 1:]].mean(axis=1),
                   "uniform": np.full(len(windows), math.log(vocab))}
    baselines = {n: {"loss": float(s.mean()), "bpb": float(s.mean()) * bpb} for n, s in base_scores.items()}
    return scores, metrics, base_scores, baselines


# ------------------------------------------------------------------ the command
def evaluate(model: str, data: str | Path, split: str, *, tracking_uri: str, train_split: str = "train",
             seed: int = 0, log: bool = True, experiment: str = EXPERIMENT) -> dict[str, Any]:
    """Score MODEL on `data`/`split` with the task's metrics, every baseline on the same
    windows and the paired per-window 95% CI of (model - best baseline). Returns the
    report (and logs it as an evaluation run unless `log` is False)."""
    from archlab.platform import modelstore, stats
    from archlab.platform.data import read_vector_docs
    from archlab.platform.validate import validate_dataset

    root = Path(data)
    target = resolve_model(model, tracking_uri)
    spec = target["spec"]
    manifest = load_manifest(root)
    check_split(spec, manifest, root, split, model)  # before any data or weights are read
    if train_split not in manifest["splits"]:
        raise DataError(f"{root / 'manifest.json'}: no split {train_split!r} for the baselines (mean vector, "
                        f"nearest neighbour, unigram); pass --train-split (splits: {', '.join(manifest['splits'])})")
    task = spec["task"]
    dim, vocab = manifest.get("dim"), manifest.get("vocab_size")
    seq_len = int(spec.get("seq_len") or 0)
    if task == "token" and seq_len < 1:
        raise ConfigError(f"{model}: its spec has no seq_len (a model logged before it was recorded)")
    for s in {split, train_split}:  # unreadable files and bad rows name themselves, as in training
        # min_len 1: a short document is no error here, it just gives no seed-protocol window
        validate_dataset(root, split=s, kind=task, dim=dim, vocab_size=vocab, min_len=1)
    files = split_files(root, manifest, split)
    net = modelstore.load_model(model, tracking_uri)
    if task == "vector":
        eval_docs = read_vector_docs(files, dim)
        train_docs = read_vector_docs(split_files(root, manifest, train_split), dim)
        windows = seed_windows(files, dim)
        scores, metrics, base_scores, baselines = _vector_scores(net, windows, train_docs, eval_docs, seed)
        metric, mode = "cosine_seed", "max"
    else:
        sep = int(manifest.get("separator_id", 0) or 0)
        windows = token_windows_split(files, seq_len, sep)
        tpb = float((manifest.get("tokens_per_byte_by_split") or {}).get(split) or manifest.get("tokens_per_byte") or 1.0)
        scores, metrics, base_scores, baselines = _token_scores(
            net, windows, split_files(root, manifest, train_split), vocab, tpb)
        metric, mode = "loss", "min"
    for name, s in base_scores.items():
        if len(s) != len(scores):  # the pairing is only valid on identical windows
            raise RuntimeError(f"baseline {name}: {len(s)} windows, the model {len(scores)}")
    comparisons = {name: stats.paired(scores, s) for name, s in base_scores.items()}
    pick = max if mode == "max" else min
    best = pick(base_scores, key=lambda n: float(base_scores[n].mean()))
    verdicts = stats.verdicts(comparisons, mode=mode)
    report = {
        **{k: target[k] for k in ("model_uri", "name", "version", "model_id", "run_id")},
        "arch": spec["arch"], "flavor": spec.get("flavor"), "task": task,
        "data": str(root), "split": split, "train_split": train_split,
        "dataset_id": dataset_id(manifest), "dataset": manifest.get("name", root.name),
        "model_dataset_id": spec.get("dataset_id"), "n_windows": int(len(scores)),
        "metric": metric, "mode": mode, "metrics": metrics, "baselines": baselines,
        "best_baseline": best, "vs_best": verdicts[best], "vs_baselines": verdicts, "experiment": experiment,
    }
    if log:
        report["evaluation_run_id"] = log_evaluation(report, root, tracking_uri, experiment)
    return report


def log_evaluation(report: dict[str, Any], root: Path, tracking_uri: str, experiment: str) -> str:
    """One FINISHED MLflow run holding the evaluation, linked to the model both ways."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput

    from archlab.platform import tracking
    from archlab.platform.validate import mlflow_dataset

    c = tracking.client(tracking_uri)
    exp_id = tracking.experiment_id(c, experiment)
    who = f"{report['name']}-v{report['version']}" if report["name"] else (report["run_id"] or "model")[:12]
    tags = {
        tracking.TAG_ROLE: "evaluation", tracking.TAG_ARCH: report["arch"],
        "archlab.model_uri": report["model_uri"], "archlab.model_name": report["name"] or "",
        "archlab.model_version": report["version"] or "", "archlab.model_id": report["model_id"] or "",
        "archlab.model_run_id": report["run_id"] or "", "archlab.dataset_id": report["dataset_id"],
        "archlab.dataset": report["dataset"], "archlab.split": report["split"], "archlab.data_path": report["data"],
        "archlab.best_baseline": report["best_baseline"], "archlab.verdict": str(report["vs_best"]["verdict"]),
    }
    run = c.create_run(exp_id, run_name=f"evaluate-{who}-{report['dataset_id']}-{report['split']}", tags=tags)
    rid = run.info.run_id
    try:
        best = report["vs_best"]
        flat = {f"model.{k}": v for k, v in report["metrics"].items()}
        flat.update({f"baseline.{n}.{k}": v for n, m in report["baselines"].items() for k, v in m.items()})
        flat.update({"n_windows": report["n_windows"], "diff_vs_best_baseline": best["diff"],
                     "diff_ci_lo": best["lo"], "diff_ci_hi": best["hi"], "diff_p": best["p"],
                     "diff_p_holm": best["p_adj"]})
        tracking.log_metrics(c, rid, {k: v for k, v in flat.items() if isinstance(v, (int, float)) and math.isfinite(v)})
        tracking.log_params(c, rid, {"model_uri": report["model_uri"], "split": report["split"],
                                     "train_split": report["train_split"], "data": report["data"],
                                     "n_windows": report["n_windows"]})
        ds = mlflow_dataset(root)._to_mlflow_entity()
        c.log_inputs(rid, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", report["split"])])],
                     models=[LoggedModelInput(report["model_id"])] if report["model_id"] else None)
        c.log_dict(rid, report, "evaluation.json")
        if report["name"]:
            c.set_model_version_tag(report["name"], report["version"],
                                    f"archlab.eval.{report['dataset_id']}.{report['split']}", rid)
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    c.set_terminated(rid, "FINISHED")
    return rid


def render(report: dict[str, Any]) -> None:
    """The model and every baseline side by side, then the CI line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    cols = list(report["metrics"])
    who = f"{report['name']} v{report['version']}" if report["name"] else report["model_uri"]
    table = Table(title=escape(f"{who} ({report['arch']}) on {report['dataset']} [{report['split']}], "
                               f"{report['n_windows']} windows"))
    for col in ["predictor", *cols, f"model - it ({report['metric']}, 95% CI)", "verdict (Holm)"]:
        table.add_column(col)
    table.add_row("[bold]model[/]", *(f"{report['metrics'][k]:.4f}" for k in cols), "", "")
    for name, m in sorted(report["baselines"].items(), key=lambda kv: -kv[1][report["metric"]]
                          if report["mode"] == "max" else kv[1][report["metric"]]):
        v = report["vs_baselines"][name]
        table.add_row(name, *(f"{m[k]:.4f}" if k in m else "-" for k in cols),
                      f"{v['diff']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]", str(v["verdict"]))
    con.print(table)
    b = report["vs_best"]
    con.print(f"model - best baseline ({report['best_baseline']}): {report['metric']} {b['diff']:+.4f}, "
              f"95% CI [{b['lo']:+.4f}, {b['hi']:+.4f}] (paired over {b['n']} windows, p={b['p']:.2g}, "
              f"Holm p={b['p_adj']:.2g}): {b['verdict']}", highlight=False)
    if report.get("evaluation_run_id"):
        con.print(f"logged evaluation run {report['evaluation_run_id']} in experiment {report['experiment']!r}")


def default_data(target: dict[str, Any], tracking_uri: str) -> str:
    """The dataset the model was trained on: its training run's `data.path` param."""
    from archlab.platform import tracking

    path = None
    if target.get("run_id"):
        path = tracking.client(tracking_uri).get_run(target["run_id"]).data.params.get("data.path")
    if not path:
        raise ConfigError(f"{target['model_uri']}: its training run records no data.path; pass --data DIR")
    return path


def predict_summary(model: str, data: str | Path | None, split: str, tracking_uri: str) -> str:
    """`archlab models --predict`: load the model as a registry user would and run it on a
    split's windows (the model's own d_in / vocab and seq_len, checked against the split)."""
    import torch

    from archlab.platform import modelstore

    target = resolve_model(model, tracking_uri)
    spec = target["spec"]
    root = Path(data or default_data(target, tracking_uri))
    manifest = load_manifest(root)
    check_split(spec, manifest, root, split, model)
    files = split_files(root, manifest, split)
    net = modelstore.load_model(model, tracking_uri)
    if spec["task"] == "vector":
        x = torch.as_tensor(seed_windows(files, manifest["dim"]))
        with torch.no_grad():
            pred = net(x[:, :-1])[:, -1]
        cos = torch.nn.functional.cosine_similarity(pred, x[:, -1], dim=-1).mean()
        return (f"{model} ({spec['arch']}, d_in {spec['d_in']}) on {root} [{split}]: {len(x)} predictions, "
                f"norm {pred.norm(dim=-1).mean():.4f}, mean cosine to the true next vector {cos:.4f}")
    from archlab.platform.metrics import window_scores

    x = token_windows_split(files, int(spec.get("seq_len") or 128), int(manifest.get("separator_id", 0) or 0))
    loss = float(window_scores(net, x, "token").mean())
    return (f"{model} ({spec['arch']}, vocab {spec['vocab_size']}) on {root} [{split}]: {len(x)} windows of "
            f"{x.shape[1] - 1} tokens, mean next-token loss {loss:.4f}")


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=float)
