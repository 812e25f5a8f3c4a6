"""Platform overhead: the Trainer over in-memory tensors (the plain loop) against
`archlab train` with 1 worker x 2 CPUs and 2 workers x 1 CPU, side by side in one run:
the same model, data, batch, threads and precision (issue 14). `local` (archlab train with
train.num_workers 0: the driver process trains, fed by Ray Data, no Ray Train) splits the
overhead into Ray Data's and Ray Train's parts.

    # the shared vectors as an archlab dataset, once (train and valid splits):
    archlab data prepare ../shared/data/wikitext2-minilm384/train.parquet --from parquet --kind vector \
        --id-col article_id --vectors-col embeddings --out /tmp/wt2v --split train
    archlab data prepare ../shared/data/wikitext2-minilm384/valid.parquet --from parquet --kind vector \
        --id-col article_id --vectors-col embeddings --out /tmp/wt2v --split valid
    python benchmarks/overhead.py --data /tmp/wt2v --archs amn,lstm,transformer --flavor seed --steps 300
    python benchmarks/overhead.py --quick            # the shipped sample, debug AMN, 20 steps

Each mode trains two epochs of `--steps` optimizer steps and reports the second one's
samples/s (the first pays for start-up: Ray Data's first batch, lazy inits, caches).
samples/s is training samples over the epoch's training time (data waits included,
evaluation excluded), summed over workers. The ratio plain / 1x2 is the overhead of the
platform with one worker; 2x1 / 1x2 is the 2-worker scaling efficiency at equal CPUs.
Take figures only on a quiet machine: other processes on the cores change every column.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "wikitext2-minilm384-sample"


def base_overrides(args, arch: str, root: Path, tmp: Path) -> list[str]:
    return [
        f"data.path={root}", f"model.arch={arch}", f"model.flavor={args.flavor}", f"train.task={args.task}",
        f"train.batch_size={args.batch_size}", "train.epochs=2", f"train.max_steps_per_epoch={args.steps}",
        f"train.precision={args.precision}", "train.scheduler=none", "data.max_valid_windows=256",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"sweep.storage_path={tmp}/runs", "tracking.register_models=false",
        "train.max_failures=0",
    ]


def train_windows(cfg, info) -> torch.Tensor:
    """All train windows of the dataset in memory, cut by the platform's own functions."""
    import pyarrow.parquet as pq

    from archlab.platform.data import token_windows, vector_windows

    parts = []
    for f in info.files[cfg.data.train_split]:
        if info.kind == "vector":
            parts.append(vector_windows(pq.read_table(f, columns=["vectors"]), dim=info.dim,
                                        length=cfg.data.context + 1, stride=cfg.data.stride)["x"])
        else:
            parts.append(token_windows(pq.read_table(f, columns=["tokens"]), length=cfg.data.seq_len + 1,
                                       separator=info.separator)["x"])
    return torch.from_numpy(np.concatenate(parts))


def plain(args, arch: str, root: Path, tmp: Path) -> dict:
    """The Trainer in this process over in-memory windows: no Ray, no DDP, no MLflow."""
    from archlab.platform.config import load_config
    from archlab.platform.data import inspect_dataset
    from archlab.platform.train import build_from_spec, model_spec
    from archlab.platform.trainer import Trainer

    cfg = load_config(None, base_overrides(args, arch, root, tmp))
    info = inspect_dataset(cfg)
    x = train_windows(cfg, info)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_from_spec(model_spec(cfg, {"dim": info.dim, "vocab_size": info.vocab_size}))
    trainer = Trainer(model, cfg)
    g = torch.Generator().manual_seed(0)

    def batches():
        order = torch.randperm(x.shape[0], generator=g)
        for s in range(x.shape[0] // args.batch_size):
            yield x[order[s * args.batch_size: (s + 1) * args.batch_size]]

    trainer.train_epoch(batches())  # warm-up epoch
    m = trainer.train_epoch(batches())
    return {"samples_per_s": m["samples_per_s"], "data_wait_frac": m["data_wait_frac"], "steps": m["step"]}


def platform(args, arch: str, root: Path, tmp: Path, workers: int, cpus: float) -> dict:
    """`archlab train` (run_train: driver, Ray Train workers, Ray Data, MLflow)."""
    from archlab.platform.config import load_config
    from archlab.platform.sweep import run_train

    cfg = load_config(None, base_overrides(args, arch, root, tmp) + [
        f"train.num_workers={workers}", f"train.cpus_per_worker={cpus}"])
    m = run_train(cfg)["metrics"]
    return {"samples_per_s": m["samples_per_s"], "data_wait_frac": m["data_wait_frac"], "steps": m["step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="archlab dataset folder (manifest.json)")
    ap.add_argument("--task", default="vector")
    ap.add_argument("--archs", default="amn,lstm,transformer")
    ap.add_argument("--flavor", default="seed")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per epoch (2 epochs, the 2nd timed)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="plain loop threads (= 1x2's CPUs)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--modes", default="plain,local,1x2,2x1",
                    help="any of plain, local (archlab train in local mode: Ray Data, no Ray Train), 1x2, 2x1")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    ap.add_argument("--idle-workers", type=int, default=None,
                    help="ray.idle_workers of the local Ray (default: Ray's pool of num_cpus, prestarted)")
    ap.add_argument("--quick", action="store_true", help="the shipped sample, debug AMN, 20 steps")
    args = ap.parse_args()
    if args.quick:
        args.data, args.archs, args.flavor, args.steps = args.data or SAMPLE, "amn", "debug", 20
    if args.data is None:
        ap.error("--data is required (unless --quick)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - {"plain", "local", "1x2", "2x1"}
    if bad:
        ap.error(f"--modes: unknown {sorted(bad)}; expected plain, local, 1x2, 2x1")
    if {"local", "1x2", "2x1"} & set(modes):
        from archlab.platform.config import load_config
        from archlab.platform.runtime import init_ray

        sets = [] if args.idle_workers is None else [f"ray.idle_workers={args.idle_workers}"]
        init_ray(load_config(None, sets))  # one local Ray for every platform run
    print(f"# overhead: {args.task} {args.flavor}, batch {args.batch_size}, {args.precision}, "
          f"{args.steps} steps/epoch (2nd epoch timed), {time.strftime('%Y-%m-%d')}", flush=True)
    results = {}
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        row = {}
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                if mode == "plain":
                    row[mode] = plain(args, arch, args.data, Path(tmp))
                else:
                    w, c = {"local": (0, float(args.threads)), "1x2": (1, float(args.threads)),
                            "2x1": (2, float(args.threads) / 2)}[mode]
                    row[mode] = platform(args, arch, args.data, Path(tmp), w, c)
            print(f"  {arch} {mode}: {row[mode]['samples_per_s']:,.0f} samples/s "
                  f"(data wait {row[mode]['data_wait_frac']:.1%})", flush=True)
        results[arch] = row
    cols = ["model"] + [f"{m} samples/s" for m in modes]
    if {"plain", "local"} <= set(modes):
        cols.append("plain / local")
    if {"plain", "1x2"} <= set(modes):
        cols.append("plain / 1x2")
    if {"1x2", "2x1"} <= set(modes):
        cols.append("2x1 / 1x2 (scaling)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arch, row in results.items():
        cells = [arch] + [f"{row[m]['samples_per_s']:,.0f} ({row[m]['data_wait_frac']:.0%} wait)" for m in modes]
        if "plain / local" in cols:
            cells.append(f"{row['plain']['samples_per_s'] / row['local']['samples_per_s']:.2f}x")
        if "plain / 1x2" in cols:
            cells.append(f"{row['plain']['samples_per_s'] / row['1x2']['samples_per_s']:.2f}x")
        if "2x1 / 1x2 (scaling)" in cols:
            cells.append(f"{row['2x1']['samples_per_s'] / row['1x2']['samples_per_s']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=2))


if __name__ == "__main__":
    main()
