"""`ray job submit` of the smoke sweep to a real head node started by this test."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RAY_HEAD_STOP_S, REPO, free_port, stop_group, wait_http

@pytest.fixture()
def head_node(tmp_path):
    """`ray start --head --block` on 127.0.0.1 in its own process group; only this head is
    stopped afterwards (never `ray stop`, which would stop every Ray on the machine)."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # loopback-only test head (STACK_NOTES)
    # the job's driver runs `archlab` from this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    # 8 logical CPUs on 2 cores (STACK_NOTES): the raylet starts workers min(cores, CPUs) at
    # a time and warns every driver at 4x that, so this head is told its startup concurrency,
    # as archlab's own local Ray is (runtime.start_local_ray). A head with real cores does
    # not need it.
    env["RAY_worker_maximum_startup_concurrency"] = "8"
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
         "--include-dashboard=true", "--disable-usage-stats",
         # fixed defaults (agent 52365, client server 10001) are taken when this session's
         # local Ray already runs: the agent then fails to bind and the head never takes jobs
         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    if not wait_http(address + "/api/version", proc, timeout=180):
        stop_group(proc, timeout=10)
        pytest.fail(f"head node did not start:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
    _wait_for_job_agent(address, tmp_path)
    yield address, env
    stop_group(proc, timeout=RAY_HEAD_STOP_S)
    log.close()


def _wait_for_job_agent(address, tmp_path):
    """The dashboard answers before its job agent registers (CI saw "No available agent to
    submit job" from a head that answered /api/version): a trivial job through archlab's
    retrying submit proves the head takes jobs before the test's `ray job submit`. (That CI
    failure's cause was the agent's port, held by the session's other Ray: see head_node.)"""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from archlab.platform.runtime import submit_job, wait_for_job

    client = JobSubmissionClient(address)
    job = submit_job(client, entrypoint="python -c \"print('agent ready')\"", agent_timeout_s=240)
    try:
        status = wait_for_job(client, job, timeout_s=240, poll_s=1)
    except TimeoutError as e:
        pytest.fail(f"probe {e}:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)


@pytest.mark.slow
def test_byte_lm_smoke_sweep_on_real_bytes_runs_as_a_ray_job(head_node, tmp_path, shared_data):
    """The token task (byte LM on the real WikiText-2 bytes, 2 Ray Train trials of 1 worker,
    both at once; DDP's 2 workers: test_reliability.py, test_multinode.py) submitted with
    `ray job submit` from a clean working dir: the job succeeds, its leaderboard's byte
    metrics agree with each other and beat a uniform guess, and both models are registered.
    (One job for the job-submission and token-task cases: each Ray Train run costs ~20 s
    of process start-up on 2 cores.)"""
    import json
    import math

    from archlab.platform.prepare import parquet_to_token_shards
    from archlab.platform.sweep import RESULT_FILE
    from archlab.platform.tracking import list_models

    address, env = head_node
    data = tmp_path / "bytes"
    for split in ("train", "valid"):
        parquet_to_token_shards(shared_data / "wikitext2-bytes" / f"{split}.parquet", data, split=split,
                                tokens_col="bytes", length_col="n_valid", docs="wikitext")
    # a clean working dir: what a user's checkout uploads (Ray honours .gitignore)
    work = tmp_path / "work"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", ".git", "archlab_runs", "mlflow.db", "__pycache__"))
    store, runs = tmp_path / "m.db", tmp_path / "runs"
    sets = [f"data.path={data}", "train.task=token", f"tracking.uri=sqlite:///{store}", f"sweep.storage_path={runs}",
            "sweep.name=jobtest", "sweep.archs=[lstm, transformer]", "sweep.num_samples=2", "train.num_workers=1",
            "data.seq_len=64", "data.max_valid_windows=128", "train.lr=3e-3", "train.max_steps_per_epoch=20",
            "sweep.confirm.top_k=0"]
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--", "archlab", "sweep", "--smoke-test", *(a for kv in sets for a in ("--set", kv))]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "succeeded" in text.lower(), text[-4000:]
    assert "sweep jobtest-1: 2 trials, 0 errored" in text, text[-4000:]
    # the quiet console under Ray Train (the smoke demo's trials run in local mode): no
    # Train report dumps, no raylet or worker chatter, no per-trial tables
    assert "TrainingReport" not in text and "(raylet)" not in text, text[-4000:]
    assert "RayTrainWorker" not in text and "SplitCoordinator" not in text, text[-4000:]
    assert "PYTHON worker processes" not in text and "Trial train_driver_fn" not in text, text[-4000:]
    # a job's driver returns nothing to the submitter: its outcome is the job's result file
    result = json.loads((runs / "jobtest-1" / RESULT_FILE).read_text())
    rows = {r["entry"]: r for r in result["leaderboard"]["rows"]}
    assert rows["uniform"]["val_bpb"] == pytest.approx(8.0)
    for arch in ("lstm", "transformer"):
        r = rows[arch]
        assert math.exp(r["val_loss"]) == pytest.approx(r["val_ppl"], rel=1e-6)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)  # byte tokens
        assert r["val_bpb"] < 8.0  # learned something: better than a uniform guess over 256 bytes
    assert {m["name"] for m in list_models(f"sqlite:///{store}", "archlab-token")} == {
        "archlab-token-lstm", "archlab-token-transformer"}


class _FakeClient:
    """Answers like Ray's JobSubmissionClient: `fails` times the given error, then a job id."""

    def __init__(self, error: str, fails: int):
        self.error, self.fails, self.calls = error, fails, 0

    def get_address(self):
        return "http://head:8265"

    def submit_job(self, *, entrypoint, runtime_env=None):
        self.calls += 1
        if self.calls <= self.fails:
            raise RuntimeError(f"Request failed with status code 500: {self.error}.")
        return "raysubmit_1"


def test_submit_retries_only_while_the_head_has_no_agent(monkeypatch):
    import time

    from archlab.platform import runtime

    monkeypatch.setattr(time, "sleep", lambda s: None)
    c = _FakeClient("No available agent to submit job, please try again later", fails=3)
    assert runtime.submit_job(c, entrypoint="archlab sweep") == "raysubmit_1" and c.calls == 4
    other = _FakeClient("Traceback ... ValueError: bad runtime_env", fails=1)
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        runtime.submit_job(other, entrypoint="archlab sweep")
    assert other.calls == 1  # any other error is not retried
    never = _FakeClient("No available agent to submit job", fails=10**6)
    with pytest.raises(RuntimeError, match=r"http://head:8265 had no job agent after 0 s"):
        runtime.submit_job(never, entrypoint="archlab sweep", agent_timeout_s=0)
