"""Search efficiency (issue 12, item 7): Optuna TPE + ASHA against random search without
early stopping, on the same architectures, search spaces, trial count and per-trial
budget, `--repeats` times each (repeat r: sweep.seed = r), alternating arms in one local
Ray.

    python benchmarks/search_efficiency.py                 # shared vectors (prepared once into --work)
    python benchmarks/search_efficiency.py --smoke-test    # the shipped sample, tiny budget: checks it runs

Random search here is Optuna's RandomSampler over the very spaces and equal allocation the
TPE arm uses (sweep.sampler=random) with Tune's FIFOScheduler (sweep.early_stopping=none),
not Tune's BasicVariantGenerator: the two arms then differ only in how configs are drawn
and whether weak trials stop early.

Compute is counted training FLOPs (train_flops of each trial's final checkpoint, what an
ASHA-stopped trial spent up to its stop), cumulated over the trials in the order they
finished. Per repeat it prints: random's final best and the compute it took to first reach
it; the compute TPE + ASHA took to first reach random's final best ("never" if it did not),
its own best and its total compute; the ratio TPE / random of the compute to reach
random's best (goal <= 0.25). Copy the lines into BENCHMARKS.md with the command and date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


ARMS = {"tpe+asha": ["sweep.sampler=tpe", "sweep.early_stopping=asha"],
        "random": ["sweep.sampler=random", "sweep.early_stopping=none"]}


def timeline(result: dict, metric: str, mode: str) -> list[tuple[float, float, float]]:
    """(finish time, train FLOPs, score) of every trial with a checkpoint, in finish order."""
    out = []
    for t in result["trials"]:
        m = t.get("metrics") or {}
        if t.get("error") or not t.get("checkpoint") or metric not in m:
            continue
        finished = (Path(t["checkpoint"]) / "metrics.json").stat().st_mtime
        score = float(m[metric]) if mode == "max" else -float(m[metric])
        out.append((finished, float(m.get("train_flops", 0.0)), score))
    return sorted(out)


def compute_to_reach(line: list[tuple[float, float, float]], target: float) -> float | None:
    """Cumulative FLOPs at the first finished trial whose best-so-far reaches `target`."""
    spent, best = 0.0, -float("inf")
    for _, flops, score in line:
        spent += flops
        best = max(best, score)
        if best >= target - 1e-12:
            return spent
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke-test", action="store_true", help="the shipped sample, 4 trials of 2 x 4 steps")
    ap.add_argument("--data", default=None, help="an archlab vector dataset (default: the shared vectors)")
    ap.add_argument("--work", default="/tmp/archlab-search-efficiency", help="where the shared vectors are prepared")
    ap.add_argument("--archs", default="lstm,amn")
    ap.add_argument("--trials", type=int, default=24,
                    help="search trials per sweep (split equally over archs; TPE models after its 10 startup draws)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flavor", default="debug")
    ap.add_argument("--workers", type=int, default=0,
                    help="train.num_workers: 0 = local mode (trials train in their reused Tune actors; a "
                         "Ray Train run costs ~50 s of CPU in start-up on 2 cores, more than a trial here)")
    args = ap.parse_args()
    if args.smoke_test:
        args.trials, args.epochs, args.steps, args.repeats = 4, 2, 4, 1
    from archlab.platform.config import load_config
    from archlab.platform.runtime import start_local_ray
    from archlab.platform.sweep import run_sweep

    from data_pipeline import prepare_data  # benchmarks/: the shared vectors prepared once into --work

    data = Path(args.data) if args.data else prepare_data(Path(args.work), args.smoke_test)
    start_local_ray(8, log_to_driver=False)
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            lines, bests, walls = {}, {}, {}
            for arm, sets in ARMS.items():
                cfg = load_config(None, [
                    f"data.path={data}", f"tracking.uri=sqlite:///{tmp}/m.db", f"sweep.storage_path={tmp}/runs",
                    f"sweep.name=eff-{arm.replace('+', '-')}-{r}", f"sweep.archs=[{args.archs}]",
                    f"sweep.num_samples={args.trials}", f"sweep.seed={r}", "sweep.confirm.top_k=0",
                    f"model.flavor={args.flavor}", f"train.num_workers={args.workers}", f"train.epochs={args.epochs}",
                    f"train.max_steps_per_epoch={args.steps}", "data.max_valid_windows=1024",
                    "tracking.register_models=false", *sets,
                ], smoke_test=args.smoke_test)
                metric, mode = cfg.metric()
                t0 = time.perf_counter()
                result = run_sweep(cfg, progress=lambda line: None)
                walls[arm] = time.perf_counter() - t0
                lines[arm] = timeline(result, metric, mode)
                bests[arm] = max(s for _, _, s in lines[arm])
            sign = 1 if mode == "max" else -1
            target = bests["random"]
            rand_reach = compute_to_reach(lines["random"], target)
            tpe_reach = compute_to_reach(lines["tpe+asha"], target)
            ratio = tpe_reach / rand_reach if tpe_reach is not None and rand_reach else None
            if ratio is not None:
                ratios.append(ratio)
            row = {
                "repeat": r, "metric": metric, "random_best": sign * target,
                "random_flops_to_best": rand_reach, "random_flops_total": sum(f for _, f, _ in lines["random"]),
                "tpe_best": sign * bests["tpe+asha"], "tpe_flops_to_random_best": tpe_reach,
                "tpe_flops_total": sum(f for _, f, _ in lines["tpe+asha"]), "ratio": ratio,
                "wall_s": {k: round(v, 1) for k, v in walls.items()},
            }
            rows.append(row)
            reach = f"{tpe_reach:.3g}" if tpe_reach is not None else "never"
            print(f"repeat {r}: random best {metric} {row['random_best']:.4f} after {rand_reach:.3g} FLOPs "
                  f"(total {row['random_flops_total']:.3g}, {walls['random']:.0f} s); tpe+asha reached it after "
                  f"{reach} FLOPs, its best {row['tpe_best']:.4f} (total {row['tpe_flops_total']:.3g}, "
                  f"{walls['tpe+asha']:.0f} s); ratio {ratio if ratio is None else round(ratio, 3)}", flush=True)
    med = statistics.median(ratios) if ratios else None
    print(f"median ratio tpe+asha / random compute to random's best: {med if med is None else round(med, 3)} "
          f"({len(ratios)} of {len(rows)} repeats reached it; goal <= 0.25)")
    print("json " + json.dumps(rows))


if __name__ == "__main__":
    main()
