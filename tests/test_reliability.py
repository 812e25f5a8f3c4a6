"""Issue 11, driver side: run identity, exact resume, terminal user errors, refusal on the
driver, runs ended on every exit path, no orphaned Ray processes.

Fast tests use no Ray; the fault-injection ones (real local Ray, real MLflow) are slow.
RELIABILITY.md lists each case with the figure it gave and the command reproducing it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from archlab.platform import orphans, tracking
from archlab.platform.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("RAY_ADDRESS", None)  # always a local Ray of the test's own
    return env


def _archlab(args: list[str], cwd: Path, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "archlab.cli", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _short_tmp() -> Path:
    # Ray's unix sockets live under RAY_TMPDIR and must stay under ~107 characters
    return Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))


# ---------------------------------------------------------------- refused on the driver


@pytest.mark.parametrize("override, expect", [
    ("model.d_model=abc", "error: model.d_model: expected int, found 'abc'"),
    ("model.dropout=[1]", "error: model.dropout: expected float, found [1]"),
    ("model.foo=1", "error: model.foo: 'lstm' has no such config field"),
    ("model.flavor=huge", "error: model.flavor: architecture 'lstm' has no flavor 'huge'"),
])
def test_bad_architecture_field_is_one_line_exit_2_and_starts_no_ray(tmp_path, override, expect):
    ray_tmp = _short_tmp()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = _archlab(["train", "--smoke-test", "--set", override, "--set", f"sweep.storage_path={tmp_path / 'runs'}",
                  "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"], tmp_path, timeout=120, RAY_TMPDIR=str(ray_tmp))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expect), r.stderr[-2000:]
    assert not (ray_tmp / "ray").exists()  # no Ray started
    assert not (tmp_path / "m.db").exists()  # no run created
    # the bound is 5 s; the CPU time is what this process costs, the wall time
    # depends on what else runs on the machine (2 shared cores here)
    assert cpu < 5.0, f"{cpu:.1f} s CPU ({wall:.1f} s wall)"
    print(f"FIGURE refused {override!r}: {cpu:.2f} s CPU, {wall:.2f} s wall")


def test_type_check_follows_the_config_annotations():
    from archlab.architectures.registry import ArchConfigError, make_config

    assert make_config("lstm", "debug", {"d_model": 48, "dropout": 0}).dropout == 0  # an int is a float
    with pytest.raises(ArchConfigError, match=r"model\.n_layers: expected int, found 2\.5"):
        make_config("lstm", "debug", {"n_layers": 2.5})
    with pytest.raises(ArchConfigError, match=r"model\.d_model: expected int, found True"):
        make_config("lstm", "debug", {"d_model": True})  # YAML `true` is not a size


# ---------------------------------------------------------------- run identity and lifecycle


def test_new_job_never_reuses_a_run_and_resume_needs_its_own_id(tmp_path):
    c = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(c, "identity")
    a = tracking.parent_run(c, exp, "train-lstm-1", {"model": {"d_model": 32}}, job_id="a")
    b = tracking.parent_run(c, exp, "train-lstm-1", {"model": {"d_model": 48}}, job_id="b")
    assert a != b
    assert c.get_run(b).data.params["model.d_model"] == "48"
    assert tracking.parent_run(c, exp, "train-lstm-1", {}, job_id="a", run_id=a) == a
    with pytest.raises(ValueError, match="belongs to job 'a'"):
        tracking.parent_run(c, exp, "train-lstm-1", {}, job_id="b", run_id=a)
    # children are found under their own parent only
    ca = tracking.child_run(c, exp, a, "train-lstm-1", "t1", "lstm", {})
    cb = tracking.child_run(c, exp, b, "train-lstm-1", "t1", "lstm", {})
    assert ca != cb and c.get_run(cb).data.tags[tracking.TAG_JOB] == "b"


def test_sweep_ids_are_reserved_and_resume_finds_the_recorded_job(tmp_path):
    from archlab.platform.config import ConfigError
    from archlab.platform.sweep import _job_record, _sweep_id, _write_job_record

    store = str(tmp_path)
    assert [_sweep_id(store, "s", False) for _ in range(3)] == ["s-1", "s-2", "s-3"]
    assert _sweep_id(store, "s", True) == "s-3"
    rec = _job_record(store, "s-3", "sqlite:///x.db", resume=False)
    with pytest.raises(ConfigError, match="has no recorded job"):
        _job_record(store, "s-3", "sqlite:///x.db", resume=True)
    _write_job_record(store, {**rec, "parent_run_id": "abc"})
    assert _job_record(store, "s-3", "sqlite:///x.db", resume=True)["job_id"] == rec["job_id"]
    with pytest.raises(ConfigError, match="was tracked at sqlite:///x.db"):
        _job_record(store, "s-3", "sqlite:///y.db", resume=True)


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt("SIGTERM"), "KILLED"), (RuntimeError("boom"), "FAILED")])
def test_every_exit_path_ends_the_runs(tmp_path, exc, status):
    from archlab.platform.sweep import ends_runs_on_exit

    c = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(c, "exits")
    parent = tracking.parent_run(c, exp, "s-1", {}, job_id="j")
    child = tracking.child_run(c, exp, parent, "s-1", "t1", "lstm", {})
    done = tracking.child_run(c, exp, parent, "s-1", "t2", "lstm", {})
    tracking.end_run(c, done, "FINISHED")
    with pytest.raises(type(exc)):
        with ends_runs_on_exit(c, exp, parent):
            raise exc
    assert c.get_run(parent).info.status == status and c.get_run(child).info.status == status
    assert c.get_run(done).info.status == "FINISHED"  # a finished trial stays finished
    assert type(exc).__name__ in c.get_run(child).data.tags[tracking.TAG_ERROR]


def test_latest_checkpoint_is_the_last_complete_one(tmp_path):
    from archlab.platform.sweep import latest_checkpoint

    def ckpt(name, epoch, complete=True):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"epoch": epoch, "val_cosine_seed": epoch / 10}))
        (d / "model_spec.json").write_text("{}")
        if complete:
            (d / "state.pt").write_bytes(b"x")

    assert latest_checkpoint(tmp_path) is None
    ckpt("checkpoint_2026-12-02_07-00-00.000001", 1)
    ckpt("checkpoint_2026-12-02_07-00-09.000001", 2)
    ckpt("checkpoint_2026-12-02_07-00-19.000001", 3, complete=False)  # being written at the kill
    path, metrics = latest_checkpoint(tmp_path)
    assert path.endswith("07-00-09.000001") and metrics["epoch"] == 2

    # a mid-epoch checkpoint after it is the resume point, but not a trial's final model
    d = tmp_path / "checkpoint_2026-12-02_07-00-29.000001"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"mid_epoch": 1, "epoch": 2, "step": 25}))
    (d / "model_spec.json").write_text("{}")
    (d / "state.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path)[0] == str(d)
    path, metrics = latest_checkpoint(tmp_path, epoch_end=True)
    assert path.endswith("07-00-09.000001") and metrics["epoch"] == 2


def test_a_restarted_worker_takes_the_newest_complete_mid_epoch_checkpoint_of_its_epoch(tmp_path):
    """Ray restores the checkpoint its controller registered; one uploaded after it (not yet
    polled) is newer. Taken: mid-epoch, same epoch, later step, and it must load."""
    import types

    import pyarrow.fs
    import torch

    from archlab.platform.train import newer_mid_epoch_checkpoint

    def ckpt(name, metrics, state=True):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "model_spec.json").write_text("{}")
        if state is True:
            torch.save({"step": metrics.get("step")}, d / "state.pt")
        elif state:
            (d / "state.pt").write_bytes(state)  # a copy cut short
        return d

    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), experiment_fs_path=str(tmp_path))
    assert newer_mid_epoch_checkpoint(storage, -1, 0) is None
    ckpt("checkpoint_a", {"mid_epoch": 1, "epoch": 0, "step": 5})
    b = ckpt("checkpoint_b", {"mid_epoch": 1, "epoch": 0, "step": 10})
    ckpt("checkpoint_c", {"mid_epoch": 1, "epoch": 0, "step": 15}, state=b"PK\x03 truncated")
    ckpt("checkpoint_d", {"epoch": 1, "step": 20, "val_cosine_seed": 0.3})  # epoch end: never taken
    ckpt("checkpoint_e", {"mid_epoch": 1, "epoch": 1, "step": 25})  # another epoch
    assert newer_mid_epoch_checkpoint(storage, -1, 0) == b  # fresh restart: the newest that loads
    assert newer_mid_epoch_checkpoint(storage, 5, 0) == b
    assert newer_mid_epoch_checkpoint(storage, 10, 0) is None  # Ray's is already the newest
    assert newer_mid_epoch_checkpoint(storage, 20, 1).name == "checkpoint_e"
    remote = types.SimpleNamespace(storage_filesystem=object(), experiment_fs_path=str(tmp_path))
    assert newer_mid_epoch_checkpoint(remote, -1, 0) is None


def test_an_epoch_whose_buffered_metrics_died_with_the_worker_is_logged_from_its_checkpoint(tmp_path):
    """ASHA stops a trial at an epoch's report; the worker's buffered MLflow writes of that
    epoch may die with it. The checkpoint's metrics.json holds them: they are logged once."""
    from archlab.platform.sweep import backfill_epoch_metrics

    c = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(c, "backfill")
    run = c.create_run(exp).info.run_id
    tracking.log_metrics(c, run, {"epoch": 1, "val_cosine_seed": 0.2}, step=1)
    ckpt = {"epoch": 2, "step": 40, "val_cosine_seed": 0.3, "train_loss": float("nan"), "flag": True}
    assert backfill_epoch_metrics(c, run, ckpt)
    hist = c.get_metric_history(run, "val_cosine_seed")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.2), (2, 0.3)]
    assert c.get_metric_history(run, "train_loss") == [] and c.get_metric_history(run, "flag") == []
    assert not backfill_epoch_metrics(c, run, ckpt)  # once
    assert not backfill_epoch_metrics(c, run, {"mid_epoch": 1, "epoch": 3, "step": 45})
    assert len(c.get_metric_history(run, "val_cosine_seed")) == 2


# ---------------------------------------------------------------- terminal errors


def test_terminal_errors_are_raised_at_once_transient_ones_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from archlab.architectures.registry import ArchConfigError
    from archlab.platform.failures import failure_policy, terminal_failure

    def group_error(*errs):
        return WorkerGroupError("workers failed", {i: UserExceptionWithTraceback(e, "tb") for i, e in enumerate(errs)})

    policy = failure_policy(FailureConfig(max_failures=3))
    nan = FloatingPointError("non-finite training loss nan at epoch 0, step 3")
    assert terminal_failure(group_error(RuntimeError("peer reset"), nan)) is nan
    assert policy.make_decision(group_error(nan)) == FailureDecision.RAISE
    assert policy.make_decision(group_error(ArchConfigError("model.d_model: ..."))) == FailureDecision.RAISE
    for _ in range(3):  # a lost worker is retried up to max_failures
        assert policy.make_decision(group_error(RuntimeError("actor died"))) == FailureDecision.RETRY
    assert policy.make_decision(group_error(RuntimeError("actor died"))) == FailureDecision.RAISE


# ---------------------------------------------------------------- no orphans


def _marked_sleeper(owner: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env={**os.environ, orphans.MARKER: owner}, start_new_session=True)


def test_dead_drivers_ray_is_stopped_by_its_marker_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    dead_driver = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_driver.wait()
    mine, other = _marked_sleeper("deadbeef"), _marked_sleeper("someone-else")
    unmarked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        time.sleep(0.5)  # let the sleepers exec (their environ is readable from then on)
        orphans.owners_dir().mkdir(parents=True)
        orphans.record_path("deadbeef").write_text(json.dumps(
            {"owner": "deadbeef", "driver_pid": dead_driver.pid, "driver_start": None}))
        # a live driver's record is left alone
        orphans.record_path("someone-else").write_text(json.dumps(
            {"owner": "someone-else", "driver_pid": os.getpid(), "driver_start": None}))
        assert orphans.reap_dead_owners() == [mine.pid]
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None and unmarked.poll() is None
        assert not orphans.record_path("deadbeef").exists() and orphans.record_path("someone-else").exists()
    finally:
        for p in (mine, other, unmarked):
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- fault injection (real Ray)


def _runs(c, exp_id):
    return c.search_runs([exp_id], max_results=1000)


@pytest.mark.slow
def test_two_train_jobs_on_one_store_get_their_own_runs(ray_local, tmp_path, sample_dataset):
    from archlab.platform.sweep import run_train

    uri = f"sqlite:///{tmp_path}/m.db"
    results = []
    for i, d_model in enumerate((32, 48)):
        cfg = load_config(None, [
            f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / f'runs{i}'}",
            # local mode (no Ray Train worker): what is tested is the jobs' run identity
            "model.arch=lstm", f"model.d_model={d_model}", "train.num_workers=0", "train.epochs=1",
        ], smoke_test=True)
        results.append(run_train(cfg))
    a, b = results
    assert a["sweep_id"] == b["sweep_id"] == "train-lstm-1"  # same folder name in each storage
    assert a["parent_run_id"] != b["parent_run_id"] and a["run_id"] != b["run_id"]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("archlab").experiment_id
    assert len(_runs(c, exp)) == 4
    for res, d_model in ((a, "32"), (b, "48")):
        run = c.get_run(res["run_id"])
        assert run.data.params["model.d_model"] == d_model and run.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(res["run_id"], "val_cosine_seed")] == [1]
    versions = tracking.list_models(uri, "archlab-vector-lstm")
    assert sorted(v["run_id"] for v in versions) == sorted([a["run_id"], b["run_id"]])


@pytest.mark.slow
def test_nan_trial_fails_once_with_its_reason_and_the_sweep_goes_on(ray_local, tmp_path, sample_dataset):
    from archlab.platform.sweep import run_sweep

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "sweep.name=nan-test", "sweep.archs=[lstm, transformer]", "sweep.num_samples=2",
        "train.num_workers=1", "train.max_failures=2",  # both trials at once (2 cores)
        # only lstm's trials diverge: a NaN loss at optimizer step 3 on every try
        'sweep.space_overrides={lstm: {train.inject_nan_at_step: {choices: [3]}}}',
        "sweep.confirm.top_k=0",  # the search's failure handling; no confirm stage needed
    ], smoke_test=True)
    t0 = time.perf_counter()
    result = run_sweep(cfg)
    wall = time.perf_counter() - t0
    by_arch = {}
    c = tracking.client(uri)
    for t in result["trials"]:
        by_arch[c.get_run(t["run_id"]).data.tags[tracking.TAG_ARCH]] = t
    bad, good = by_arch["lstm"], by_arch["transformer"]
    assert "FloatingPointError: non-finite training loss" in bad["error"]
    run = c.get_run(bad["run_id"])
    assert run.info.status == "FAILED" and "non-finite training loss" in run.data.tags[tracking.TAG_ERROR]
    assert good["error"] is None and c.get_run(good["run_id"]).info.status == "FINISHED"
    assert [d["name"] for d in result["registry"]] == ["archlab-vector-transformer"]
    secs = (run.info.end_time - run.info.start_time) / 1000
    print(f"FIGURE nan trial: FAILED after {secs:.1f} s (sweep {wall:.0f} s)")
    assert not [r for r in _runs(c, result["experiment_id"]) if r.info.status == "RUNNING"]


def _children(c, exp_id, parent_id):
    return c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000)


def _kill_test_sweep(sample_dataset, uri: str, store: Path, name: str, *sets: str) -> list[str]:
    """`archlab sweep` arguments of the driver-kill tests: lstm + transformer smoke trials,
    one at a time, one worker each, plus `sets` (`--set` values)."""
    args = ["sweep", "--smoke-test"]
    for kv in (f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={store}",
               f"sweep.name={name}", "sweep.archs=[lstm, transformer]", "sweep.num_samples=2",
               "sweep.max_concurrent=1", "train.num_workers=1", "ray.num_cpus=4", *sets):
        args += ["--set", kv]
    return args


def _start_driver(args: list[str], tmp_path: Path, ray_tmp: Path) -> subprocess.Popen:
    """The archlab CLI as a child process, its output in tmp_path/first.log."""
    log = open(tmp_path / "first.log", "w")
    return subprocess.Popen([sys.executable, "-m", "archlab.cli", *args], cwd=tmp_path,
                            env=_env(RAY_TMPDIR=str(ray_tmp)), stdout=log, stderr=subprocess.STDOUT)


def _wait_for(driver: subprocess.Popen, log: Path, found, timeout: float = 1200):
    """Poll `found()` every 0.5 s while `driver` runs; its first truthy value (asserted)."""
    deadline, hit = time.time() + timeout, None
    while time.time() < deadline and driver.poll() is None and not hit:
        hit = found()
        time.sleep(0.5)
    assert driver.poll() is None and hit, log.read_text()[-3000:]
    return hit


def _sigkill(driver: subprocess.Popen, ray_tmp: Path) -> float:
    """SIGKILL `driver`; the seconds until its Ray's processes (by owner marker) are gone."""
    owner = next(json.loads(f.read_text())["owner"] for f in (ray_tmp / "archlab-ray-owners").glob("*.json")
                 if json.loads(f.read_text())["driver_pid"] == driver.pid)
    assert orphans.marked_pids(owner)  # the driver's Ray is up
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    t_kill = time.perf_counter()
    while orphans.marked_pids(owner) and time.perf_counter() - t_kill < 60:
        time.sleep(0.5)
    left, t_gone = orphans.marked_pids(owner), time.perf_counter() - t_kill
    assert not left, f"Ray processes of the killed driver still alive after {t_gone:.0f} s: {left}"
    return t_gone


@pytest.mark.slow
def test_driver_sigkill_in_the_search_then_in_the_confirm_stage_resumes_every_run_once(tmp_path, sample_dataset):
    """`archlab sweep` SIGKILLed twice: once as the first search trial wrote its last
    checkpoint, and, after `--resume`, again as the first confirm run wrote its first one;
    a second `--resume` finishes. The killed drivers leave no Ray process; the search is
    not trained again after it finished; one run per trial and confirm run, each FINISHED
    with one metric point per epoch; the registry's versions come from the confirm runs."""
    ray_tmp = _short_tmp()
    uri = f"sqlite:///{tmp_path}/m.db"
    store = tmp_path / "runs"
    args = _kill_test_sweep(sample_dataset, uri, store, "kill-test", "sweep.confirm.seeds=[1]")
    confirm_glob = "train-trial_id=kill-test-1-c*/checkpoint_*/metrics.json"

    def search_done_ckpts():
        return [m for m in store.glob("train-trial_id=*/checkpoint_*/metrics.json")
                if "kill-test-1-c" not in str(m) and json.loads(m.read_text()).get("epoch") == 2
                and (m.parent / "state.pt").exists()]

    driver = _start_driver(args, tmp_path, ray_tmp)
    _wait_for(driver, tmp_path / "first.log", search_done_ckpts)
    t_gone = _sigkill(driver, ray_tmp)
    print(f"FIGURE driver SIGKILL: its Ray gone {t_gone:.1f} s after the kill")

    driver = _start_driver([*args, "--resume"], tmp_path, ray_tmp)  # writes first.log again
    _wait_for(driver, tmp_path / "first.log", lambda: next(iter(store.glob(confirm_glob)), None))
    search_ckpts = {p: p.stat().st_mtime for p in store.glob("train-trial_id=*/checkpoint_*/metrics.json")
                    if "kill-test-1-c" not in str(p)}
    assert len({p.parent.parent for p in search_ckpts}) == 2  # the search had finished
    _sigkill(driver, ray_tmp)

    r = _archlab([*args, "--resume"], tmp_path, timeout=1200, RAY_TMPDIR=str(ray_tmp))
    (tmp_path / "resume.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "2 trials, 0 errored" in r.stdout and "confirm stage: 2 runs, 0 errored" in r.stdout
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("kill-test").experiment_id
    runs = _runs(c, exp)
    parents = [x for x in runs if x.data.tags.get(tracking.TAG_ROLE) == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(c, exp, parents[0].info.run_id)
    assert len(children) == 4 == len(runs) - 1
    assert len({x.data.tags[tracking.TAG_TRIAL] for x in children}) == 4  # no duplicate runs
    assert not [x for x in runs if x.info.status != "FINISHED"]
    confirm = [x for x in children if x.data.tags.get("stage") == "confirm"]
    search = [x for x in children if x.data.tags.get("stage") == "search"]
    for group in (search, confirm):
        assert sorted(x.data.tags[tracking.TAG_ARCH] for x in group) == ["lstm", "transformer"]
    for x in children:
        assert "archlab.model_uri" in x.data.tags  # every trial's and confirm run's model is logged
        hist = c.get_metric_history(x.info.run_id, "val_cosine_seed")
        assert [m.step for m in hist] == [1, 2]  # one point per epoch, none twice
    assert all(x.data.tags["confirm_seed"] == "1" for x in confirm)
    # the search was not trained again: its checkpoints are the ones written before the kill
    assert {p: p.stat().st_mtime for p in search_ckpts} == search_ckpts
    versions = tracking.list_models(uri, "archlab-vector")
    assert sorted(v["name"] for v in versions) == ["archlab-vector-lstm", "archlab-vector-transformer"]
    assert {v["run_id"] for v in versions} == {x.info.run_id for x in confirm}
    # a fresh store: every version is champion but one whose verdict vs the best baseline is worse
    assert all(("champion" in v["aliases"]) == (v["tags"]["archlab.verdict_vs_baseline"] != "worse")
               for v in versions)


@pytest.mark.slow
def test_failed_train_leaves_no_running_run_and_names_the_reason(ray_local, tmp_path, sample_dataset):
    from archlab.platform.failures import TrialFailed
    from archlab.platform.sweep import run_train

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.num_workers=1", "train.max_failures=2", "train.inject_nan_at_step=3",
    ], smoke_test=True)
    with pytest.raises(TrialFailed, match=r"^FloatingPointError: non-finite training loss at step 3 .*epoch 0"):
        run_train(cfg)
    c = tracking.client(uri)
    runs = _runs(c, c.get_experiment_by_name("archlab").experiment_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    for r in runs:
        assert "non-finite training loss" in r.data.tags[tracking.TAG_ERROR]


@pytest.mark.slow
def test_sigterm_ends_the_runs_killed_exits_130_and_leaves_no_orphans(tmp_path, sample_dataset):
    ray_tmp = _short_tmp()
    uri = f"sqlite:///{tmp_path}/m.db"
    log = open(tmp_path / "train.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "archlab.cli", "train", "--smoke-test", "--set", f"data.path={sample_dataset}",
         "--set", f"tracking.uri={uri}", "--set", f"sweep.storage_path={tmp_path / 'runs'}",
         "--set", "train.num_workers=1", "--set", "train.epochs=200", "--set", "ray.num_cpus=4"],
        cwd=tmp_path, env=_env(RAY_TMPDIR=str(ray_tmp)), stdout=log, stderr=subprocess.STDOUT)
    ckpts = tmp_path / "runs" / "train-lstm-1"
    deadline = time.time() + 600
    while time.time() < deadline and driver.poll() is None and not list(ckpts.glob("checkpoint_*/metrics.json")):
        time.sleep(0.5)
    assert driver.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
    owner = next(json.loads(f.read_text())["owner"] for f in (ray_tmp / "archlab-ray-owners").glob("*.json")
                 if json.loads(f.read_text())["driver_pid"] == driver.pid)
    t0 = time.perf_counter()
    driver.send_signal(signal.SIGTERM)
    rc = driver.wait(timeout=120)
    t_exit = time.perf_counter() - t0
    out = (tmp_path / "train.log").read_text()
    assert rc == 130, out[-3000:]
    assert out.rstrip().splitlines()[-1].startswith("stopped: interrupted by SIGTERM"), out[-3000:]
    c = tracking.client(uri)
    runs = _runs(c, c.get_experiment_by_name("archlab").experiment_id)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    while orphans.marked_pids(owner) and time.perf_counter() - t0 < 90:
        time.sleep(0.5)
    assert not orphans.marked_pids(owner)
    print(f"FIGURE SIGTERM: exit 130 after {t_exit:.1f} s, runs KILLED, Ray gone {time.perf_counter() - t0:.1f} s")


@pytest.mark.slow
def test_ddp_worker_sigkill_mid_epoch_loses_less_than_the_checkpoint_interval(ray_local, tmp_path, sample_dataset):
    """Fault injection into a 2-worker DDP run (gloo): SIGKILL one Train worker in the middle
    of an epoch. Ray Train restarts the worker group, and the workers resume from the newest
    complete mid-epoch checkpoint in storage (train.checkpoint_every_steps), even one Ray's
    controller had not registered yet (a report waits for its 2 s poll), so fewer than the
    interval's steps are lost; no step is counted twice or missing, the run stays one MLflow
    run, and the optimizer step counter and the planned cosine schedule carry on. (One run
    for the DDP, step-checkpoint and worker-kill cases: each Ray Train run costs ~50 s of
    CPU in process start-up on 2 cores.)"""
    import threading

    from ray.util.state import list_actors

    from archlab.platform.sweep import run_train
    from archlab.platform.trainer import LRSchedule
    from archlab.platform.train import load_state

    every = 5
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.num_workers=2", "train.max_failures=1", f"train.checkpoint_every_steps={every}",
        "train.max_steps_per_epoch=60", "train.epochs=2", "train.scheduler=cosine", "train.warmup_frac=0.25",
    ], smoke_test=True)
    out: dict = {}
    job = threading.Thread(target=lambda: out.update(result=run_train(cfg)), daemon=True)
    job.start()

    def registered_step():
        """The step of the latest checkpoint Ray Train's controller has registered (its
        snapshot in storage), in epoch 0, or -1. A checkpoint on disk is not yet a resume
        point: the worker's report waits in a queue of one until the controller polls it
        (every 2 s), so a kill right after the upload restarts from the one before."""
        best = -1
        for p in (tmp_path / "runs").rglob("checkpoint_manager_snapshot.json"):
            try:
                latest = json.loads(p.read_text()).get("latest_checkpoint_result") or {}
            except (OSError, ValueError):  # being rewritten right now
                continue
            m = latest.get("metrics") or {}
            if m.get("epoch") == 0 and "step" in m:
                best = max(best, int(m["step"]))
        return best

    def on_disk_step():
        steps = [-1]
        for p in (tmp_path / "runs").rglob("state.pt"):
            try:
                s = load_state(p.parent)
            except Exception:  # being written or deleted right now
                continue
            if s["epoch"] == 0:
                steps.append(int(s["step"]))
        return max(steps)

    deadline = time.time() + 600
    while time.time() < deadline and registered_step() < 2 * every:
        assert job.is_alive(), "the run ended before the worker could be killed"
        time.sleep(0.2)
    # this session's own Ray (by its GCS address: others may run on the machine)
    workers = list_actors(address=ray_local.get_runtime_context().gcs_address,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2, workers
    registered = registered_step()
    os.kill(workers[0].pid, signal.SIGKILL)
    t_kill = time.time()
    time.sleep(0.5)  # the worker is gone: what is on disk now is all it wrote
    written = on_disk_step()
    job.join(timeout=900)
    assert not job.is_alive() and "result" in out
    result = out["result"]
    assert result["metrics"]["epoch"] == 2
    c = tracking.client(uri)
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["planned_steps"] == "120" and run.data.params["world_size"] == "2"
    exp = c.get_experiment_by_name("archlab").experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result['parent_run_id']}'")
    assert [r.info.run_id for r in children] == [result["run_id"]]  # the restart kept its run
    resumed = [m.value for m in c.get_metric_history(result["run_id"], "resumed_from_step")]
    steps = [int(m.value) for m in c.get_metric_history(result["run_id"], "step")]
    assert steps == [60, 120]  # no step counted twice, none missing
    # resumed from the newest checkpoint on disk (later than the registered one when the
    # controller had not polled it yet: train.newer_mid_epoch_checkpoint), so fewer than
    # `every` steps are lost: the worker was past step `written` and short of written + every
    assert resumed == [written, written] and registered <= written and written % every == 0 and 0 < written < 60, \
        (resumed, registered, written)
    assert [m.step for m in c.get_metric_history(result["run_id"], "val_cosine_seed")] == [1, 2]
    # the schedule carried on from the checkpoint's step: the epochs' last lr is the plan's
    sched = LRSchedule("cosine", [cfg.train.lr], warmup=30, total=120)
    lrs = [m.value for m in c.get_metric_history(result["run_id"], "lr")]
    assert lrs == pytest.approx([cfg.train.lr * sched.factor_at(s) for s in (59, 119)])
    runs = _runs(c, exp)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # the driver loaded the final checkpoint with weights_only=True to log and register it
    assert result["registry"] and result["registry"][0]["name"] == "archlab-vector-lstm"
    states = [load_state(p.parent) for p in (tmp_path / "runs").rglob("state.pt")]
    assert states and all(s["format"] == 2 for s in states) and max(s["step"] for s in states) == 120
    print(f"FIGURE worker SIGKILL (1 of 2 DDP workers): killed with step {written} on disk (Ray had registered step {registered}), "
          f"resumed from step {int(resumed[0])}: lost the < {every} steps after it; "
          f"run FINISHED {time.time() - t_kill:.0f} s after the kill")


@pytest.mark.slow
def test_mlflow_server_down_mid_run_stalls_no_epoch_and_loses_nothing(ray_local, tmp_path, sample_dataset):
    """Fault injection: the real `mlflow server` goes away for 30 s while `archlab train`
    runs (RELIABILITY.md also has a 60 s run). The worker's writes are buffered (platform/mlflow_buffer.py), so training keeps
    its pace (metric timestamps are taken when logged: their spacing is the epochs' pace),
    every epoch's metrics arrive once the server is back, and the run ends FINISHED."""
    import threading

    from mlflow.tracking import MlflowClient

    from archlab.platform.sweep import run_train
    from tests.conftest import free_port, start_mlflow_server, stop_group

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start(i):
        proc = start_mlflow_server(tmp_path, port, f"server-{i}")
        assert proc is not None, (tmp_path / f"server-{i}.log").read_text()[-2000:]
        return proc

    # ~1.5 s an epoch on 2 cores: 40 epochs (~60 s) outlast the 2 epochs before the outage
    # and the outage itself (the test asserts it), and most of the server's restart
    epochs, outage_s = 40, 30.0
    cfg = load_config(None, [
        f"data.path={sample_dataset}", f"tracking.uri={uri}", f"sweep.storage_path={tmp_path / 'runs'}",
        "model.arch=lstm", "train.num_workers=1", f"train.epochs={epochs}", "train.max_steps_per_epoch=12",
        "tracking.register_models=false",
    ], smoke_test=True)
    proc = start(0)
    out: dict = {}
    try:
        job = threading.Thread(target=lambda: out.update(result=run_train(cfg)), daemon=True)
        job.start()
        c = MlflowClient(uri)
        deadline = time.time() + 600
        run_id = None
        while time.time() < deadline and job.is_alive():  # wait for the second epoch's metrics
            runs = [r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])
                    if r.data.tags.get("archlab.role") == "trial"]
            if runs and len(c.get_metric_history(runs[0].info.run_id, "val_cosine_seed")) >= 2:
                run_id = runs[0].info.run_id
                break
            time.sleep(0.5)
        assert run_id is not None, "no epoch metrics arrived before the outage"
        stop_group(proc, timeout=20)  # the outage
        t_down = time.time()
        time.sleep(outage_s)
        assert job.is_alive(), "the run ended during the outage: make it longer"
        t_restart = time.time()  # from here the new server's start competes for the 2 cores
        proc = start(1)
        t_up = time.time()
        job.join(timeout=900)
        assert not job.is_alive() and "result" in out
    finally:
        stop_group(proc, timeout=20)
    c = MlflowClient(f"sqlite:///{tmp_path}/m.db")  # the server's store, read back directly
    run = c.get_run(out["result"]["run_id"])
    assert run.info.status == "FINISHED"
    hist = sorted(c.get_metric_history(run.info.run_id, "val_cosine_seed"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(1, epochs + 1))  # every epoch, once
    stamps = [m.timestamp / 1000 for m in hist]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # epochs that began and ended while no server ran (not the restart: a starting
    # `mlflow server` takes a core for seconds, which slows training on 2 cores but is
    # no stall of the buffer's making)
    during = [g for a, g in zip(stamps, gaps) if t_down <= a and a + g <= t_restart]
    restart = [g for a, g in zip(stamps, gaps) if t_restart < a + g and a <= t_up]
    before = sorted(g for a, g in zip(stamps, gaps) if a < t_down)
    assert len(during) >= 3, (during, t_down, t_restart)  # training went on while the server was down
    typical = before[len(before) // 2]
    # an epoch waits at most FLUSH_AFTER_LOG_S (1 s) for its metrics to be delivered
    assert max(during) <= typical + 1.0 + 0.5 * typical, (during, typical)
    print(f"FIGURE mlflow outage: {t_restart - t_down:.0f} s down, {len(during)} epochs logged meanwhile, "
          f"max epoch gap {max(during):.2f} s vs typical {typical:.2f} s (during the server's "
          f"{t_up - t_restart:.0f} s restart: {max(restart, default=float('nan')):.2f} s), "
          f"{epochs} of {epochs} epochs landed")
