"""The cluster launcher config and the KubeRay manifest: they parse, Ray's own schema
accepts the launcher config, and images, resources, versions, auth and the job's own
archlab settings agree with each other, with pyproject and with the README."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "archlab" / "cluster"


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def readme():
    return (REPO / "README.md").read_text()


def _pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', text).group(1)


def test_launcher_config_passes_rays_schema_and_is_self_consistent(launcher, readme):
    import json

    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # what `ray up` checks first
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    assert workers and all(v["min_workers"] <= v["max_workers"] <= launcher["max_workers"] for v in workers.values())
    head_start = " ".join(launcher["head_start_ray_commands"])
    worker_start = " ".join(launcher["worker_start_ray_commands"])
    port = re.search(r"ray start --head .*--port=(\d+)", head_start).group(1)
    assert f"ray start --address=$RAY_HEAD_IP:{port}" in worker_start  # workers join the head's GCS
    for cmds in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token ray start" in cmds  # every node, or nodes cannot talk
    # the README names what the config runs
    for t in types.values():
        assert f"`{t['node_config']['InstanceType']}`" in readme
        assert t["node_config"]["ImageId"] in readme
    assert "RAY_AUTH_MODE=token" in readme and f"GCS port {port}" in readme
    assert f"up to {max(v['max_workers'] for v in workers.values())} autoscaled" in readme


def _containers(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    return head, groups


def test_rayjob_manifest_agrees_with_pyproject_readme_and_archlab(rayjob, readme):
    from archlab.platform.config import load_config
    from archlab.platform.runtime import check_shared_storage

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == _pinned_ray()
    assert f"Ray {_pinned_ray()}" in readme
    assert spec["authOptions"]["mode"] == "token" and "authOptions" in readme
    head, groups = _containers(rayjob)
    images = {c["image"] for c in head} | {c["image"] for g in groups.values() for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, images  # one archlab image everywhere: same code on every node
    assert f"image `{images.pop()}`" in readme
    said = re.sub(r"\s+", " ", readme)
    lim = head[0]["resources"]["limits"]
    assert f"head ({lim['cpu']} CPUs, {lim['memory']})" in said
    for name, g in groups.items():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        lim = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert (f"`{name}` worker group ({lim['cpu']} CPUs, {lim['memory']}, {lim['nvidia.com/gpu']} "
                f"`nvidia.com/gpu` each, {g['replicas']} replicas, up to {g['maxReplicas']})") in said
    # the entrypoint is a valid archlab command: every --set is a real config field, and
    # its storage is one a multi-node cluster accepts
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["archlab", "sweep"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(None, sets)
    assert cfg.sweep.storage_path.startswith("s3://") and cfg.tracking.uri.startswith("http")
    nodes = [{"NodeID": f"{i}" * 56, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True} for i in range(3)]
    check_shared_storage(cfg.sweep.storage_path, cfg, nodes=nodes)
