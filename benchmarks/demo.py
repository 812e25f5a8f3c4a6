"""Run the README's main job (`archlab demo`) and print the BENCHMARKS.md line: wall time,
the best validation cosine (seed protocol) and the linear-average baseline on the same
windows, measured in the same run.

    python benchmarks/demo.py [--smoke-test] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from archlab.cli import CONFIGS
from archlab.platform.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke-test", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="archlab-demo-bench-"))
    os.chdir(work)  # a fresh local MLflow store and run folder, as on a new machine
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    from archlab.platform.sweep import run_sweep

    cfg = load_config(CONFIGS / "demo.yaml", args.set, smoke_test=args.smoke_test)
    result = run_sweep(cfg)
    wall = time.perf_counter() - t0
    rows = result["leaderboard"]["rows"]
    models = [r for r in rows if r["kind"] == "model"]
    best = max(models, key=lambda r: r["val_cosine_seed"])
    base = next(r for r in rows if r["entry"] == "linear_average")
    n_err = sum(1 for t in result["trials"] if t["error"])
    champions = [d["name"] for d in result["registry"] if d["promoted"]]
    print(result["leaderboard"]["markdown"])
    print(
        f"demo{' --smoke-test' if args.smoke_test else ''}: wall {wall:.0f} s, {len(result['trials'])} trials "
        f"({n_err} errored); best val cosine {best['val_cosine_seed']:.4f} ({best['entry']}) vs linear average "
        f"{base['val_cosine_seed']:.4f} on the same windows (ratio {best['val_cosine_seed'] / base['val_cosine_seed']:.3f}); "
        f"champions: {', '.join(champions) or 'none'}; store {work / 'mlflow.db'}"
    )


if __name__ == "__main__":
    main()
