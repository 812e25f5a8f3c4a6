"""Two Ray nodes on one machine (a head and a second raylet on loopback, token auth): a
2-worker trial spread over both, a node-local storage path refused up front, and
`archlab submit` refused without the token. Plus the storage rule without Ray."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from archlab.platform.config import ConfigError, load_config
from archlab.platform.runtime import check_shared_storage
from tests.conftest import RAY_HEAD_STOP_S, free_port, stop_group

BIN = Path(sys.executable).parent


def _nodes(n):
    return [{"NodeID": f"{i:02d}" + "ab" * 27, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True} for i in range(n)]


def test_storage_rule_without_ray(tmp_path):
    cfg = load_config(None, [f"sweep.storage_path={tmp_path}"])
    check_shared_storage(str(tmp_path), cfg, nodes=_nodes(1))  # one node: any path is shared
    check_shared_storage("s3://bucket/runs", cfg, nodes=_nodes(3))  # a URI every node reaches
    dead = _nodes(2)
    dead[1]["Alive"] = False
    check_shared_storage(str(tmp_path), cfg, nodes=dead)  # a dead node is not a node
    with pytest.raises(ConfigError, match=r"sweep.storage_path=.*a local path, but the Ray cluster has 2 nodes.*"
                                          r"s3://.*sweep.storage_shared=true"):
        check_shared_storage(str(tmp_path), cfg, nodes=_nodes(2))
    shared = load_config(None, [f"sweep.storage_path={tmp_path}", "sweep.storage_shared=true"])
    seen = {}

    def probe(nodes, folder, token):  # what _probe_nodes answers when node 1 has no such mount
        seen["marker"] = Path(folder, "driver").read_text() == token
        return {nodes[1]["NodeID"]}

    with pytest.raises(ConfigError, match=r"declared shared .* 1 of 2 nodes do not share it: 10\.0\.0\.1 "):
        check_shared_storage(str(tmp_path), shared, nodes=_nodes(2), probe=probe)
    assert seen["marker"]  # the driver wrote its marker before asking the nodes
    assert not list(tmp_path.glob(".archlab_shared_*"))  # and removed it afterwards
    check_shared_storage(str(tmp_path), shared, nodes=_nodes(2), probe=lambda nodes, folder, token: set())


def _get(url: str, token: str | None, timeout: float = 5.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own process group, so that only it and what it spawned
    are stopped afterwards (never `ray stop`: other Ray clusters run on this machine)."""
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(procs: list[subprocess.Popen], root: str) -> None:
    for p in procs:
        stop_group(p, timeout=RAY_HEAD_STOP_S)
    # a Ray process that left the group (a re-parented worker) still names our temp dir
    out = subprocess.run(["pgrep", "-f", root], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def two_nodes():
    """A head (node_a) and a second raylet (node_b) on 127.0.0.1, each with 3 CPUs, its own
    temp dir and free ports, token authentication on with a token of this test's own."""
    # short: Ray's socket paths under the temp dir must stay under 107 characters
    root = tempfile.mkdtemp(prefix="al-mn-", dir="/tmp")
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's driver runs `archlab`
    port, dash = free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=3", "--object-store-memory=300000000",
              # the fixed default agent port is taken by any other Ray on this machine
              f"--dashboard-agent-listen-port={free_port()}"]
    t0 = time.monotonic()
    procs = [_ray_start(["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                         f"--temp-dir={root}/a", '--resources={"node_a": 1}', *common], env, Path(root, "head.log"))]
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait(lambda: _get(url + "/api/version", token), procs, root, "the head's dashboard")
        procs.append(_ray_start([f"--address=127.0.0.1:{port}", f"--temp-dir={root}/b", '--resources={"node_b": 1}',
                                 *common], env, Path(root, "node_b.log")))
        _wait(lambda: len(_alive_nodes(url, token)) == 2, procs, root, "the second node")
        print(f"two nodes up in {time.monotonic() - t0:.0f} s")
        yield {"url": url, "gcs": f"127.0.0.1:{port}", "token": token, "env": env, "root": Path(root)}
    finally:
        _stop(procs[::-1], root)
        shutil.rmtree(root, ignore_errors=True)


def _alive_nodes(url: str, token: str) -> dict[str, dict]:
    """node id -> total resources, from the head's state API."""
    data = _get(url + "/api/v0/nodes?limit=100&detail=true", token)["data"]["result"]["result"]
    return {n["node_id"]: n.get("resources_total", {}) for n in data if n.get("state") == "ALIVE"}


def _wait(ready, procs, root, what, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if ready():
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(1)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in Path(root).glob("*.log"))
    pytest.fail(f"{what} did not come up in {timeout} s:\n{logs}")


def _archlab(args, env, cwd, timeout=900):
    return subprocess.run([str(BIN / "archlab"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_submit_without_the_token_is_refused(two_nodes, tmp_path):
    env = {k: v for k, v in two_nodes["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    out = _archlab(["submit", "--address", two_nodes["url"], "--no-wait", "--", "archs"], env, tmp_path, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "submitted" not in out.stdout, text[-3000:]
    assert "token" in text.lower() and "refused" in text.lower(), text[-3000:]


@pytest.mark.slow
def test_node_local_storage_is_refused_before_any_worker_starts(two_nodes, tmp_path):
    env = {**two_nodes["env"], "RAY_ADDRESS": two_nodes["gcs"]}
    t0 = time.monotonic()
    # Ray Train workers (the smoke default is local mode, whose trainer is this process)
    out = _archlab(["train", "--smoke-test", "--set", "train.num_workers=1",
                    "--set", f"sweep.storage_path={tmp_path / 'runs'}",
                    "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"], env, tmp_path, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "a local path, but the Ray cluster has 2 nodes" in text and "sweep.storage_shared=true" in text, text[-3000:]
    assert not list((tmp_path / "runs").glob("train-*")), "a trainer started before the refusal"
    print(f"refused in {time.monotonic() - t0:.0f} s")


@pytest.mark.slow
def test_two_worker_trial_spans_both_nodes_submitted_with_the_token(two_nodes, tmp_path):
    """Each node has 3 CPUs and each worker asks for 2, so the two workers cannot share a
    node: the trial runs only if Ray places one on each, which the state API confirms."""
    work = tmp_path / "work"  # the job's working dir (archlab itself is installed)
    work.mkdir()
    (work / "README").write_text("multi-node test job\n")
    runs, store = tmp_path / "runs", tmp_path / "m.db"
    t0 = time.monotonic()
    out = _archlab(["submit", "--address", two_nodes["url"], "--", "train", "--smoke-test",
                    "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=2",
                    "--set", f"sweep.storage_path={runs}", "--set", "sweep.storage_shared=true",
                    "--set", f"tracking.uri=sqlite:///{store}"], two_nodes["env"], work)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "SUCCEEDED" in text, text[-4000:]
    # the quiet console of `archlab train`: a progress line per epoch, from rank 0's reports
    assert re.search(r"^  train-lstm-1 lstm +RUNNING +epoch 1/2 .* samples/s$", text, flags=re.M), text[-4000:]
    assert re.search(r"^  train-lstm-1 lstm +DONE +epoch 2/2 +\[########\] 100% best cos_seed", text, flags=re.M)
    assert "TrainingReport" not in text, text[-4000:]
    print(f"trial job in {time.monotonic() - t0:.0f} s")
    nodes = _alive_nodes(two_nodes["url"], two_nodes["token"])
    actors = _get(two_nodes["url"] + "/api/v0/actors?limit=1000&detail=true&filter_keys=class_name"
                  "&filter_predicates=%3D&filter_values=RayTrainWorker", two_nodes["token"])["data"]["result"]["result"]
    where = sorted(next(k for k in ("node_a", "node_b") if k in nodes.get(a["node_id"], {})) for a in actors)
    assert where == ["node_a", "node_b"], (where, actors)
    # both nodes wrote where the driver reads: the checkpoint and the registered model
    assert list(runs.glob("train-lstm-1/checkpoint_*/model_spec.json")), sorted(str(p) for p in runs.rglob("*"))[:20]
    from archlab.platform.tracking import list_models

    assert list_models(f"sqlite:///{store}", "archlab-vector")
