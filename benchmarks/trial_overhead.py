"""Per-trial cost of a sweep on a small machine (issue 14): the same smoke trials (one
Train worker each, 4 optimizer steps, 64 validation windows, no confirm stage) run with
the trials at once that the cores hold (the default on a one-node local Ray,
sweep.max_concurrent_trials) and with the count the logical CPUs allow, side by side in
one local Ray, alternating, `--repeats` times each.

    python benchmarks/trial_overhead.py                      # lstm,transformer,gru_stack,amn, 2 repeats
    python benchmarks/trial_overhead.py --archs lstm,amn --repeats 1 --logical 4
    python benchmarks/trial_overhead.py --compare local --archs lstm,gru_stack,amn,elman,s4d,indrnn --repeats 1

Prints seconds per sweep and per trial and the ratio (logical / cores). A trial's cost on
2 cores is mostly Python processes starting (Train V2 starts a controller, a worker, a
placement-group cleaner, a synchronisation actor, a dataset manager and a split
coordinator per dataset for each training run), so this measures the platform's fixed
cost per trial, not training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "wikitext2-minilm384-sample"


def sweep_once(archs: list[str], concurrent: int, tmp: Path, tag: str, workers: int = 1) -> float:
    from archlab.platform.config import load_config
    from archlab.platform.sweep import run_sweep

    cfg = load_config(None, [
        f"data.path={SAMPLE}", f"tracking.uri=sqlite:///{tmp}/{tag}.db", f"sweep.storage_path={tmp}/{tag}",
        "sweep.name=overhead", f"sweep.archs=[{', '.join(archs)}]", f"sweep.num_samples={len(archs)}",
        f"train.num_workers={workers}", "train.epochs=1", "train.max_steps_per_epoch=4", "data.max_valid_windows=64",
        "tracking.register_models=false", "sweep.confirm.top_k=0", f"sweep.max_concurrent={concurrent}",
    ], smoke_test=True)
    t0 = time.perf_counter()
    result = run_sweep(cfg, progress=lambda line: None)
    wall = time.perf_counter() - t0
    errors = [t["error"] for t in result["trials"] if t["error"]]
    if errors:
        raise SystemExit(f"{tag}: trials errored: {errors}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="lstm,transformer,gru_stack,amn")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=8, help="the local Ray's logical CPUs (the tests' 8)")
    ap.add_argument("--logical", type=int, default=0,
                    help="trials at once for the logical-CPU arm (0: num_cpus // 2, one worker + one CPU each)")
    ap.add_argument("--compare", choices=["concurrency", "local"], default="concurrency",
                    help="concurrency: the cores' count of trials at once vs the logical CPUs'; local: "
                         "1 Train worker per trial vs local mode (train.num_workers 0), the cores' count at once")
    args = ap.parse_args()
    from archlab.platform.runtime import start_local_ray

    archs = args.archs.split(",")
    cores = max(1, os.cpu_count() or 1)
    logical = args.logical or max(1, args.num_cpus // 2)
    start_local_ray(args.num_cpus, log_to_driver=False)
    n_cores = min(cores, len(archs))
    if args.compare == "concurrency":  # arm: (trials at once, Train workers per trial)
        arms = {"cores": (n_cores, 1), "logical": (min(logical, len(archs)), 1)}
    else:
        arms = {"1 worker": (n_cores, 1), "local": (n_cores, 0)}
    walls: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for arm, (n, workers) in arms.items():
                w = sweep_once(archs, n, Path(tmp), f"{arm.replace(' ', '')}{r}", workers)
                walls[arm].append(w)
                print(f"repeat {r} {arm:8s} ({n} at once): {w:6.1f} s for {len(archs)} trials, "
                      f"{w / len(archs):5.1f} s a trial", flush=True)
    (a, wa), (b, wb) = ((arm, statistics.median(w)) for arm, w in walls.items())
    print(f"median ({cores} cores): {a} {wa:.1f} s, {b} {wb:.1f} s; ratio {b}/{a} {wb / wa:.2f}")


if __name__ == "__main__":
    main()
