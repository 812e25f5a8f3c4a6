"""No orphans: the local Ray a driver started does not outlive it.

A SIGKILLed driver cannot shut its Ray down, and Ray's dashboard and runtime-env agents
were seen outliving it for minutes (one holding port 52365). So every process of a local
Ray that archlab starts carries a marker in its environment, ARCHLAB_RAY_OWNER=<uuid>
(Ray's processes inherit the driver's environment, and /proc/<pid>/environ keeps it even
where Ray renames a process to `ray::IDLE`). An owner record (driver pid and start time,
the uuid) goes to `$RAY_TMPDIR or $TMPDIR / archlab-ray-owners/`, and:
- a watchdog process (outside the driver's process group) waits for the driver to die
  and then stops every process carrying its uuid;
- every archlab start does the same for any record whose driver is dead (in case the
  watchdog was killed too).
Only processes with a uuid archlab wrote are ever signalled: Ray instances started by
anything else on the machine (other users, other jobs, `ray start`) have no marker.
Linux only (/proc); elsewhere nothing is recorded and nothing is stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger("archlab")

MARKER = "ARCHLAB_RAY_OWNER"
_PROC = Path("/proc")


def owners_dir() -> Path:
    return Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "archlab-ray-owners"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22):
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, start_time: int | None) -> bool:
    now = _start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def marked_pids(owner: str) -> list[int]:
    """Pids of the processes whose environment carries ARCHLAB_RAY_OWNER=<owner>."""
    needle = f"{MARKER}={owner}".encode()
    out = []
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's process
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry.name))
    return out


def stop_owner(owner: str, grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process marked with `owner`, SIGKILL what is left after `grace_s`.
    Returns the pids signalled."""
    pids = marked_pids(owner)
    starts = {p: _start_time(p) for p in pids}
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p, starts[p]) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if alive(p, starts[p]):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    return pids


def record_path(owner: str) -> Path:
    return owners_dir() / f"{owner}.json"


def new_owner() -> str:
    """A uuid for a local Ray about to start, recorded with this driver's identity."""
    owner = uuid.uuid4().hex
    if not _PROC.is_dir():
        return owner
    d = owners_dir()
    d.mkdir(parents=True, exist_ok=True)
    rec = {"owner": owner, "driver_pid": os.getpid(), "driver_start": _start_time(os.getpid())}
    record_path(owner).write_text(json.dumps(rec))
    return owner


def start_watchdog(owner: str) -> subprocess.Popen | None:
    """A process that outlives a SIGKILLed driver and then stops its Ray. It runs in its
    own session, so a Ctrl-C or a kill of the driver's process group does not take it."""
    if not _PROC.is_dir():
        return None
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen(
        [sys.executable, "-m", "archlab.platform.orphans", str(record_path(owner))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True,
    )


def reap_dead_owners() -> list[int]:
    """Stop the Ray processes of every recorded driver that is no longer alive; remove
    their records. Returns the pids signalled."""
    d = owners_dir()
    stopped: list[int] = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else ():
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if alive(rec["driver_pid"], rec.get("driver_start")):
            continue
        pids = stop_owner(rec["owner"])
        if pids:
            log.warning("stopped %d process(es) of a local Ray left by dead driver pid %d",
                        len(pids), rec["driver_pid"])
        stopped += pids
        f.unlink(missing_ok=True)
    return stopped


def watch(record: Path, poll_s: float = 1.0) -> None:
    rec = json.loads(record.read_text())
    while alive(rec["driver_pid"], rec.get("driver_start")):
        time.sleep(poll_s)
    stop_owner(rec["owner"])
    record.unlink(missing_ok=True)


if __name__ == "__main__":  # the watchdog: python -m archlab.platform.orphans <record>
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(Path(sys.argv[1]))
