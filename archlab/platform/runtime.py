"""Where things run and where results go: Ray, MLflow store, storage, precision."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from archlab.platform.config import ArchlabConfig, ConfigError

log = logging.getLogger("archlab")


def tracking_uri(cfg: ArchlabConfig) -> str:
    """config > $MLFLOW_TRACKING_URI > a SQLite store under the working directory.

    Relative sqlite paths are made absolute: Ray workers run in other directories."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def storage_path(cfg: ArchlabConfig) -> str:
    """Checkpoints and Tune state. On a cluster it must be storage every node sees."""
    path = cfg.sweep.storage_path or os.environ.get("ARCHLAB_STORAGE")
    remote = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if path is None:
        path = str(Path("archlab_runs").resolve())
    if "://" in path:
        return path  # s3://, gs://, ... validated by pyarrow when Ray opens it
    p = Path(path).resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".archlab_write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"sweep.storage_path={p}: not writable ({e})") from None
    if remote and cfg.sweep.storage_path is None and not os.environ.get("ARCHLAB_STORAGE"):
        log.warning(
            "RAY_ADDRESS is set but sweep.storage_path is not: checkpoints go to %s, which "
            "must be shared storage (NFS) visible to every node, or use s3://...", p
        )
    return str(p)


def alive_nodes(nodes: list[dict] | None = None) -> list[dict]:
    """The live nodes of `nodes` (default: ray.nodes() of the connected cluster)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def one_local_node() -> bool:
    """Whether the connected cluster is one node, this machine (a local Ray)."""
    from ray._private.services import get_node_ip_address

    alive = alive_nodes()
    return len(alive) == 1 and alive[0].get("NodeManagerAddress") == get_node_ip_address()


def check_shared_storage(storage: str, cfg: ArchlabConfig, nodes: list[dict] | None = None,
                         probe=None) -> None:
    """Refuse, before any worker starts, a storage path the cluster's nodes do not share.

    Ray Train workers on every node write checkpoints under `storage` and the driver reads
    them back, so on a cluster of more than one node a node-local folder loses them. A URI
    (s3://, gs://, ...) is shared by construction. A local path must be declared shared
    (`sweep.storage_shared: true`: an NFS mount at the same path on every node), and is
    then checked: the driver writes a marker there, a task pinned to each node must read
    it and write its own, and the driver must read every node's. `nodes` (ray.nodes())
    and `probe` (nodes, folder, token -> node ids that failed) are there for tests."""
    if "://" in storage:
        return
    alive = alive_nodes(nodes)
    if len(alive) <= 1:
        return
    if not cfg.sweep.storage_shared:
        raise ConfigError(
            f"sweep.storage_path={storage}: a local path, but the Ray cluster has {len(alive)} nodes, so "
            "checkpoints one node writes there are lost to the others. Use s3://bucket/path (or gs://...), "
            "or an NFS mount at the same path on every node declared with sweep.storage_shared=true "
            "(archlab then checks every node sees it)")
    import uuid

    token = uuid.uuid4().hex
    folder = Path(storage) / f".archlab_shared_{token[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "driver").write_text(token)
    try:
        failed = (probe or _probe_nodes)(alive, str(folder), token)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    if failed:
        names = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n in alive if n["NodeID"] in failed)
        raise ConfigError(
            f"sweep.storage_path={storage} is declared shared (sweep.storage_shared=true) but {len(failed)} of "
            f"{len(alive)} nodes do not share it: {names}. Mount the same storage at the same path on every "
            "node, or use s3://bucket/path")


def _probe_nodes(nodes: list[dict], folder: str, token: str, timeout_s: float = 120.0) -> set[str]:
    """Node ids where a task could not read the driver's marker, or whose own marker the
    driver cannot read. The task is pickled by value (stdlib only): a node needs nothing
    of archlab's to answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def visit(folder: str, token: str, node_id: str) -> bool:
        import os

        try:
            with open(os.path.join(folder, "driver")) as f:
                seen = f.read() == token
            with open(os.path.join(folder, node_id), "w") as f:
                f.write(token)
            return seen
        except OSError:
            return False

    task = ray.remote(num_cpus=0, max_retries=0)(visit)
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(folder, token, n["NodeID"]) for n in nodes}
    try:
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(f"sweep.storage_path: the shared-storage check did not hear from every node in "
                          f"{timeout_s:.0f} s (a node without free worker processes?)") from None
    return {nid for nid, ok in seen.items()
            if not ok or not (Path(folder) / nid).exists() or (Path(folder) / nid).read_text() != token}


def init_ray(cfg: ArchlabConfig, verbose: bool = False):
    """Connect to $RAY_ADDRESS / ray.address, or start a local Ray with logical CPUs.

    On 2 physical cores, 1-CPU workers plus Ray Data read tasks starve and hang, so a local
    Ray gets at least 8 logical CPUs (STACK_NOTES). The dashboard stays on: without it the
    first trainer's placement group was not released (STACK_NOTES). Workers' output is
    forwarded to this console only with `verbose`; it always goes to the session's log
    files (progress.ray_log_dir())."""
    import ray

    quiet_console(verbose)
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(_ENV)}, log_to_driver=verbose)
    else:
        start_local_ray(cfg.ray.num_cpus or max(8, 2 * (os.cpu_count() or 2)), log_to_driver=verbose,
                        idle_workers=cfg.ray.idle_workers)
    # ray.init replaces the driver's SIGTERM handler with one that calls sys.exit: put
    # archlab's back (when the CLI installed it), so SIGTERM ends the runs KILLED and exits 130
    from archlab.platform.failures import reinstall_signal_handlers

    reinstall_signal_handlers()
    return ray


def quiet_console(verbose: bool) -> None:
    """The driver's share of the quiet console (the workers' share is log_to_driver=False):
    Ray Data's progress bars and per-dataset INFO lines, Tune/Train INFO chatter, Optuna's
    experimental-feature warning. (Models are logged as safetensors + spec, not with
    mlflow.pytorch, so MLflow prints no pickle warning to drop.) `verbose` leaves everything
    as Ray and MLflow set it."""
    if verbose:
        return
    import warnings

    from ray.data import DataContext  # first: importing Ray Data configures its loggers

    for name in ("ray.data", "ray.tune", "ray.train", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Argument ``group`` is an experimental feature")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass
    ctx = DataContext.get_current()  # datasets made after this carry it to their workers
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "TOKENIZERS_PARALLELISM": "false"}
# a local Ray is one node that nobody drains: Train V2's PreemptionWatcher (one actor per
# training run, ~2.5 s of CPU to start on this machine's cores) has nothing to watch there
_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def system_config(num_cpus: int, idle_workers: int | None) -> dict:
    """The local Ray's raylet settings. The raylet starts workers min(physical cores,
    num_cpus) at a time and warns ("N PYTHON worker processes ...") at 4x that: the logical
    CPUs chosen in init_ray are deliberate, so they are the startup concurrency too."""
    sc = {"worker_maximum_startup_concurrency": int(num_cpus)}
    if idle_workers is not None:
        sc.update(num_workers_soft_limit=int(idle_workers), prestart_worker_first_driver=False)
    return sc


def start_local_ray(num_cpus: int, idle_workers: int | None = None, **kwargs) -> str:
    """Start a local Ray whose address every task and actor of this job knows.

    Ray's own actors (Train's PlacementGroupCleaner) look the cluster up by RAY_ADDRESS or
    by scanning the machine, and the scan fails when several Ray instances share a
    machine ("Found multiple active Ray instances"). So the GCS port is chosen first
    (RAY_GCS_SERVER_PORT, read by Ray when it starts a head) and RAY_ADDRESS goes into the
    job's runtime_env. Returns the GCS address.

    No orphans (orphans.py): Ray's processes are started with this driver's owner marker
    in their environment and a watchdog stops them when the driver dies, however it dies;
    first, what dead archlab drivers left is stopped (by their marker, nothing else).

    `idle_workers` (config `ray.idle_workers`): the raylet keeps at most that many idle
    worker processes and prestarts none; None leaves Ray's pool (num_cpus, prestarted)."""
    import socket

    import ray
    from ray._private.services import get_node_ip_address

    from archlab.platform import orphans

    orphans.reap_dead_owners()
    owner = orphans.new_owner()
    for attempt in range(3):
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        address = f"{get_node_ip_address()}:{port}"
        old = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ[orphans.MARKER] = owner  # inherited by every process of this Ray
        try:
            # address="local": without it, ray.init() attaches to any cluster a `ray start`
            # left on this machine instead of starting ours
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                     runtime_env={"env_vars": {**_ENV, **_LOCAL_ENV, "RAY_ADDRESS": address}},
                     _system_config=system_config(num_cpus, idle_workers), **kwargs)
            orphans.start_watchdog(owner)
            return address
        except Exception as e:  # the port was taken between choosing and binding it
            if attempt == 2 or ray.is_initialized():
                raise
            log.warning("local Ray did not start on GCS port %d (%s); trying another", port, e)
        finally:  # never leak the port choice (or the marker) into other child processes
            os.environ.pop(orphans.MARKER, None)
            if old is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = old
    raise AssertionError("unreachable")


def choose_precision(requested: str, device) -> str:
    """bf16 only where the device runs it natively; this class of CPU runs a bf16 matmul
    ~500x slower than fp32 (STACK_NOTES), so 'auto' means fp32 there."""
    import torch

    if requested == "fp32":
        return "fp32"
    native = False
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        native = _cpu_has_native_bf16()
    if requested == "bf16":
        if not native:
            log.warning("train.precision=bf16 requested on %s without native bf16: it will be slow", device)
        return "bf16"
    return "bf16" if native else "fp32"


_NATIVE_BF16_CPU: bool | None = None


def _cpu_has_native_bf16() -> bool:
    """Native = the CPU reports a bf16 instruction set AND a bf16 matmul measures no slower
    than 1.5x fp32. STACK_NOTES measured a machine where bf16 was ~500x slower; the flag
    alone is not trusted, the measurement decides (it takes a few milliseconds)."""
    global _NATIVE_BF16_CPU
    if _NATIVE_BF16_CPU is not None:
        return _NATIVE_BF16_CPU
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        _NATIVE_BF16_CPU = False
        return False
    import time

    import torch

    def best(dtype) -> float:
        a = torch.randn(256, 256).to(dtype)
        a @ a
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
        return min(times)

    _NATIVE_BF16_CPU = best(torch.bfloat16) <= 1.5 * best(torch.float32)
    return _NATIVE_BF16_CPU


def submit_job(client, *, entrypoint: str, runtime_env: dict | None = None,
               agent_timeout_s: float = 180.0, **kwargs) -> str:
    """`JobSubmissionClient.submit_job`, retried while the head has no job agent yet.

    A head answers HTTP before its dashboard agent has registered; until then Ray's job
    head waits only 10 s (WAIT_AVAILABLE_AGENT_TIMEOUT) and answers 500 "No available agent
    to submit job, please try again later". On a freshly started or loaded head that is a
    matter of seconds to a minute, so retry that one error; every other error is raised at
    once. Returns the job id."""
    import time

    deadline = time.monotonic() + agent_timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, **kwargs)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Ray head at {client.get_address()} had no job agent after "
                    f"{agent_timeout_s:.0f} s (last answer: {e})") from e
            log.warning("Ray head has no job agent yet; retrying the submission")
            time.sleep(3)


def wait_for_job(client, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0):
    """Poll a Ray job until it ends; returns its final JobStatus (SUCCEEDED, FAILED or
    STOPPED). Raises TimeoutError naming the job and its last status after `timeout_s`."""
    import time

    from ray.job_submission import JobStatus

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status
