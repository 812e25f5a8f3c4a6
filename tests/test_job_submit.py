"""`ray job submit` of the smoke sweep to a real head node started by this test."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, stop_group, wait_http

pytestmark = pytest.mark.slow


@pytest.fixture()
def head_node(tmp_path):
    """`ray start --head --block` on 127.0.0.1 in its own process group; only this head is
    stopped afterwards (never `ray stop`, which would stop every Ray on the machine)."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # loopback-only test head (STACK_NOTES)
    # the job's driver runs `archlab` from this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
         "--include-dashboard=true", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    if not wait_http(address + "/api/version", proc, timeout=180):
        stop_group(proc, timeout=10)
        pytest.fail(f"head node did not start:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
    yield address, env
    stop_group(proc, timeout=60)
    log.close()


def test_smoke_sweep_runs_as_a_ray_job(head_node, tmp_path):
    address, env = head_node
    # a clean working dir: what a user's checkout uploads (Ray honours .gitignore)
    work = tmp_path / "work"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", ".git", "archlab_runs", "mlflow.db", "__pycache__"))
    store = tmp_path / "m.db"
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
        "--", "archlab", "sweep", "--smoke-test", "--set", "sweep.num_samples=2", "--set", "sweep.name=jobtest",
        "--set", f"tracking.uri=sqlite:///{store}", "--set", f"sweep.storage_path={tmp_path / 'runs'}",
    ]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "succeeded" in text.lower(), text[-4000:]
    assert "sweep jobtest-1: 2 trials, 0 errored" in text, text[-4000:]
    from archlab.platform.tracking import list_models

    assert list_models(f"sqlite:///{store}", "archlab-vector")
