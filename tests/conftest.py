"""Shared fixtures: one local Ray per test session, the real shared data, tmp stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "wikitext2-minilm384-sample"
SHARED_DATA = Path(os.environ.get("ARCHLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def _has_c_compiler() -> bool:
    from archlab.kernels.scan.cpu_scan import find_compiler

    return find_compiler() is not None


# The fused CPU scan is built by the system C compiler, which pip does not install; without
# one, `auto` takes the torch scan (tested on its own) and these tests have nothing to run.
needs_cc = pytest.mark.skipif(not _has_c_compiler(), reason="no C compiler on PATH for the fused CPU scan")


@pytest.fixture(scope="session")
def sample_dataset() -> Path:
    """The real sample shipped in the repo (canonical vector shards + manifest)."""
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the larger real datasets; tests that need them skip without it."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set ARCHLAB_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with logical CPUs: on 2 physical cores,
    1-CPU workers plus Ray Data read tasks starve and hang (STACK_NOTES)."""
    import ray

    from archlab.platform.runtime import start_local_ray

    if not ray.is_initialized():
        start_local_ray(8, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `ray start --block` shuts its head down gracefully on SIGTERM: ~33 s here, each time. A
# test that is over needs none of that; SIGKILL of the group 5 s later leaves no process
# (checked with pgrep on the head's ports), so the head fixtures stop theirs this way.
RAY_HEAD_STOP_S = 5


def stop_group(proc, timeout: float = 30) -> None:
    """Stop a process started with start_new_session=True, and everything it spawned:
    SIGTERM, then SIGKILL to the group if it has not exited `timeout` seconds later."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, proc, timeout: float) -> bool:
    """True once `url` answers 200; False if `proc` exits or time runs out. Anything else
    answering on the port (another service that took it first) counts as not ready."""
    import http.client
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.5)
    return False


def start_mlflow_server(root: Path, port: int, name: str = "server"):
    """A real `mlflow server` on 127.0.0.1:`port` with its SQLite store and artifacts under
    `root` (a restart on the same root and port serves the same store), its output in
    `root/<name>.log`. Returns the process (started in its own session: stop it with
    stop_group), or None if it did not answer /health."""
    import subprocess
    import sys

    log = open(root / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()  # the child holds its own copy
    if wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=300):
        return proc
    stop_group(proc, timeout=5)
    return None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` with a SQLite store, stopped by its PID. A port can be taken
    by another process between choosing and binding it: then try another."""
    root = tmp_path_factory.mktemp("mlflow")
    for attempt in range(3):
        port = free_port()
        proc = start_mlflow_server(root, port, f"server-{attempt}")
        if proc is not None:
            uri = f"http://127.0.0.1:{port}"
            break
    else:
        raise RuntimeError(f"mlflow server did not start; log:\n{(root / 'server-2.log').read_text()[-3000:]}")
    yield uri
    stop_group(proc, timeout=20)


def assert_self_contained_report(text: str, min_images: int) -> None:
    """A report.html's checks: at least `min_images` inline images, each a PNG of
    non-trivial size, and nothing fetched from the network (no URL, no script)."""
    import base64
    import re

    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= min_images, len(images)
    for b64 in images:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "http://" not in text and "https://" not in text and "<script" not in text


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory):
    """`archlab demo --smoke-test` run once, as the README's user runs it: in an empty folder,
    MLFLOW_TRACKING_URI naming a SQLite store there, a 100-column terminal. Returns (the
    folder, the CompletedProcess). The README test and the console test both read it."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/m.db", "COLUMNS": "100"}
    env.pop("RAY_ADDRESS", None)
    archlab = str(Path(sys.executable).parent / "archlab")
    out = subprocess.run([archlab, "demo", "--smoke-test"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=1800)
    return cwd, out


@pytest.fixture()
def windows(sample_dataset):
    """Seed-protocol windows (5 context vectors + the target) of the sample's validation
    shard, every 7th start: what the registry's champion comparison evaluates on."""
    import numpy as np

    from archlab.platform.data import read_vector_docs

    docs = read_vector_docs([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
    return np.stack([d[s: s + 6] for d in docs for s in range(0, len(d) - 5, 7)])
