"""MLflow: experiments, a parent run per sweep, one child run per trial, the registry.

Rules (DESIGN.md):
- one experiment per sweep name; a parent run per job; each trial is a child run made
  with MlflowClient, named `trial-<trial_id>` and found again by its tag under its parent
  when the trial restarts, so a restart never duplicates it;
- a run's identity is its MLflow run id, recorded with the job's UUID in the job's storage
  folder: a new job always creates new runs (never looked up by name, so two jobs with
  the same sweep id never merge), and only `--resume` of that very job reuses them;
- every run a job opened is ended on every exit path: FINISHED, FAILED (with the error
  text in the `archlab.error` tag) or KILLED;
- params are flattened with dotted keys; what changes during a run (lr, epoch) is a metric;
- the best trial per (architecture, task, dataset) is registered as a model version with
  tags (with a confirm stage: the best config by its mean over the confirm seeds), and
  gets the `champion` alias only when it beats the current champion on the same
  validation windows (the champion evaluated here; the candidate by its confirm mean, or
  evaluated beside it), and never when its verdict against the best baseline is `worse`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

log = logging.getLogger("archlab")

TAG_SWEEP = "archlab.sweep_id"
TAG_ROLE = "archlab.role"
TAG_TRIAL = "archlab.trial_id"
TAG_ARCH = "archlab.arch"
TAG_JOB = "archlab.job_id"
TAG_ERROR = "archlab.error"
CHAMPION = "champion"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # another job created it between the lookup and the create
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _find_runs(c, exp_id: str, filter_string: str, max_results: int = 10):
    return c.search_runs([exp_id], filter_string=filter_string, max_results=max_results,
                         order_by=["attributes.start_time DESC"])


def parent_run(c, exp_id: str, sweep_id: str, params: dict[str, Any], *, job_id: str | None = None,
               run_id: str | None = None) -> str:
    """The job's parent run. A new job (run_id None) always gets a new run tagged with its
    job id (a fresh UUID when the caller has none: probe jobs, tests); a resumed job passes
    the run id it recorded and gets that run back, refused if the run belongs to another job."""
    if job_id is None:
        if run_id is not None:
            raise ValueError("parent_run: resuming a run (run_id) needs the job id it was recorded with")
        import uuid

        job_id = uuid.uuid4().hex
    if run_id is not None:
        run = c.get_run(run_id)
        if run.data.tags.get(TAG_JOB) != job_id:
            raise ValueError(f"MLflow run {run_id} belongs to job {run.data.tags.get(TAG_JOB)!r}, not {job_id!r}")
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=sweep_id,
                       tags={TAG_SWEEP: sweep_id, TAG_ROLE: "parent", TAG_JOB: job_id})
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def child_run(c, exp_id: str, parent_id: str, sweep_id: str, trial_id: str, arch: str, params: dict,
              tags: dict[str, str] | None = None) -> str:
    """Exactly one child run per trial under its parent: a restarted trial (or a trial of
    a resumed job) gets its run back; the parent id is the job's own, so runs of another
    job with the same sweep and trial ids are never matched. `tags`: extra tags (stage,
    confirm_seed, config_hash: docs/compare.md), set again on a run found back."""
    found = _find_runs(
        c, exp_id, f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_id}'", 1
    )
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        for k, v in (tags or {}).items():
            if found[0].data.tags.get(k) != str(v):
                c.set_tag(run_id, k, str(v))
        return run_id
    job_id = c.get_run(parent_id).data.tags.get(TAG_JOB, "")
    run = c.create_run(
        exp_id,
        run_name=f"trial-{trial_id}",
        tags={"mlflow.parentRunId": parent_id, TAG_TRIAL: trial_id, TAG_ARCH: arch,
              TAG_SWEEP: sweep_id, TAG_ROLE: "trial", TAG_JOB: job_id,
              **{k: str(v) for k, v in (tags or {}).items()}},
    )
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def end_run(c, run_id: str, status: str, error: str | None = None) -> None:
    """End a run; FAILED and KILLED runs carry the reason in the `archlab.error` tag."""
    if error:
        c.set_tag(run_id, TAG_ERROR, error[:5000])  # MLflow caps a tag value at 8000 chars
    c.set_terminated(run_id, status)


def end_open_runs(c, exp_id: str, parent_id: str, status: str, error: str | None = None) -> list[str]:
    """End the parent and every child still RUNNING (trials in flight when the driver
    stopped) with `status`. Returns the run ids ended."""
    children = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                             max_results=5000)
    ended = []
    for run in [*children, c.get_run(parent_id)]:
        if run.info.status in ("RUNNING", "SCHEDULED"):
            end_run(c, run.info.run_id, status, error)
            ended.append(run.info.run_id)
    return ended


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = flatten(params)
    existing = c.get_run(run_id).data.params
    todo = [Param(k, v[:6000]) for k, v in flat.items() if k not in existing]
    for i in range(0, len(todo), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=todo[i: i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def log_model(uri: str, run_id: str, model, spec: dict[str, Any], example: np.ndarray) -> str:
    """Log the model to the run as weights + spec (archlab.platform.modelstore: safetensors,
    rebuilt from archlab's code on load, never a pickle). Returns the model URI."""
    from archlab.platform import modelstore

    return modelstore.log_model(uri, run_id, model, spec, example)


@np.errstate(all="ignore")
def evaluate_windows(model, windows: np.ndarray, task: str, batch: int = 512) -> float:
    """The comparison metric on given windows: seed-protocol cosine (vector, higher is
    better) or mean next-token loss (token, lower is better)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.as_tensor(windows[i: i + batch])
            if task == "vector":
                pred = model(x[:, :-1].float())[:, -1]
                total += float(F.cosine_similarity(pred, x[:, -1].float(), dim=-1).sum())
                n += x.shape[0]
            else:
                logits = model(x[:, :-1].long())
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               x[:, 1:].reshape(-1).long(), reduction="sum"))
                n += x[:, 1:].numel()
    return total / max(n, 1)


def register_and_maybe_promote(
    uri: str,
    model_uri: str,
    name: str,
    *,
    tags: dict[str, str],
    candidate,
    windows: np.ndarray,
    task: str,
    score: float | None = None,
    blocked: str | None = None,
) -> dict[str, Any]:
    """Register `model_uri` as a new version of `name`; move `champion` to it only when it
    beats the current champion on the same windows. Returns what was decided.

    `score`: the candidate's score when it is known better than one evaluation of
    `candidate` gives it (the confirm stage's mean over seeds, on these windows); the
    current champion is evaluated on `windows` as before. `blocked`: a reason the version
    must never be champion (its verdict against the best baseline is `worse`): it is
    registered, the alias stays where it is, and the reason goes into its
    `archlab.champion_decision` tag."""
    import mlflow

    c = client(uri)
    mlflow.set_tracking_uri(uri)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, description=f"archlab {tags.get('task')} models, architecture {tags.get('arch')}")
    # mlflow.register_model resolves MLflow 3's `models:/m-...` logged-model URIs; a raw
    # create_model_version with that URI is accepted by a SQLite store but refused (400)
    # by a tracking server.
    mv = mlflow.register_model(model_uri, name, tags=tags, await_registration_for=60)
    higher = task == "vector"
    new_score = float(score) if score is not None else evaluate_windows(candidate, windows, task)
    decision = {"name": name, "version": mv.version, "score": new_score, "promoted": False}
    try:
        current = c.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        current = None
    if blocked:
        decision["reason"] = blocked
    elif current is None:
        decision.update(promoted=True, reason="no champion yet")
    else:
        try:
            from archlab.platform import modelstore

            # rebuilt from its spec; an old pickle-format champion loads by the deprecation path
            champ = modelstore.load_model(f"models:/{name}@{CHAMPION}", uri)
            champ_score = evaluate_windows(champ, windows, task)
        except Exception as e:  # a champion that cannot run on these windows is not comparable
            champ_score = None
            decision["reason"] = f"champion v{current.version} not comparable on this data ({type(e).__name__}: {e})"
        if champ_score is not None:
            decision["champion_score"] = champ_score
            better = new_score > champ_score if higher else new_score < champ_score
            decision["promoted"] = bool(better)
            decision["reason"] = (
                f"{'beats' if better else 'does not beat'} champion v{current.version}: "
                f"{new_score:.4f} vs {champ_score:.4f} on the same {len(windows)} windows"
            )
    if decision["promoted"]:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    c.set_model_version_tag(name, mv.version, "archlab.champion_decision", decision.get("reason", ""))
    c.set_model_version_tag(name, mv.version, "archlab.eval_score", f"{new_score:.6f}")
    return decision


def list_models(uri: str, prefix: str | None = None) -> list[dict[str, Any]]:
    """Registered archlab models with their versions, tags and aliases."""
    c = client(uri)
    out = []
    for rm in c.search_registered_models(max_results=1000):
        if prefix and not rm.name.startswith(prefix):
            continue
        aliases = {}
        for a, v in (rm.aliases or {}).items():
            aliases.setdefault(str(v), []).append(a)
        for mv in c.search_model_versions(f"name = '{rm.name}'"):
            out.append({
                "name": rm.name, "version": int(mv.version), "aliases": aliases.get(str(mv.version), []),
                "tags": dict(mv.tags or {}), "run_id": mv.run_id, "source": mv.source,
            })
    return sorted(out, key=lambda r: (r["name"], -r["version"]))
