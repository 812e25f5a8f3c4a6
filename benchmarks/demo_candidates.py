"""Candidate demo configs, Ray-free: each trains with the platform's Trainer on the shipped
sample (data/wikitext2-minilm384-sample) for the demo's step count and prints its seed-
protocol validation cosine next to the linear average on the same windows (all 1555
valid windows). Picks archlab/configs/demo.yaml's space (RESULTS.md "Demo candidates").
One seed per candidate: a ranking hint, not a verdict.

    python benchmarks/demo_candidates.py [--steps 432] [--only amn,lstm-res]

--steps default: the demo's 4 epochs x (6931 train windows // 2 workers // batch 32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from archlab.platform.config import load_config
from archlab.platform.data import WindowCutter, inspect_dataset
from archlab.platform.sweep import compute_baselines
from archlab.platform.train import build_from_spec, model_spec
from archlab.platform.trainer import Trainer

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "wikitext2-minilm384-sample"
# name -> --set overrides on top of the demo's recipe (seed flavor, batch 32)
CANDIDATES = {
    "lstm-plain": ["model.arch=lstm", "model.d_model=256", "model.n_layers=1", "train.lr=1e-3"],
    "lstm-res": ["model.arch=lstm", "model.head=residual", "model.d_model=256", "model.n_layers=1", "train.lr=1e-3"],
    "lstm-res-cos": ["model.arch=lstm", "model.head=residual", "model.d_model=256", "model.n_layers=1",
                     "train.lr=1e-3", "train.scheduler=cosine", "train.warmup_frac=0.05"],
    "transformer-res": ["model.arch=transformer", "model.head=residual", "model.d_model=128", "model.n_layers=2",
                        "model.n_heads=4", "model.d_ff=512", "train.lr=5e-4"],
    "amn": ["model.arch=amn", "model.d_attn=128", "model.d_hidden=256", "train.lr=1e-3"],
    "amn-cos": ["model.arch=amn", "model.d_attn=128", "model.d_hidden=256", "train.lr=1e-3",
                "train.scheduler=cosine", "train.warmup_frac=0.05"],
    "lstm-res-cos-3e-4": ["model.arch=lstm", "model.head=residual", "model.d_model=256", "model.n_layers=1",
                          "train.lr=3e-4", "train.scheduler=cosine", "train.warmup_frac=0.05"],
    "transformer-res-cos": ["model.arch=transformer", "model.head=residual", "model.d_model=128", "model.n_layers=2",
                            "model.n_heads=4", "model.d_ff=512", "train.lr=5e-4", "train.scheduler=cosine",
                            "train.warmup_frac=0.05"],
    "amn-cos-3e-4": ["model.arch=amn", "model.d_attn=128", "model.d_hidden=256", "train.lr=3e-4",
                     "train.scheduler=cosine", "train.warmup_frac=0.05"],
    "amn-cos-3e-3": ["model.arch=amn", "model.d_attn=128", "model.d_hidden=256", "train.lr=3e-3",
                     "train.scheduler=cosine", "train.warmup_frac=0.05"],
}


def windows(cfg, info, split: str, length: int) -> np.ndarray:
    cut = WindowCutter(cfg.to_dict(), info.dim, None, info.separator, 1, length)
    return np.concatenate([cut(pq.read_table(f, columns=["vectors"]))["x"] for f in info.files[split]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4 * (6931 // 2 // 32))
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(",")]
    base_cfg = load_config(None, [f"data.path={SAMPLE}", "model.flavor=seed", "train.batch_size=32"])
    info = inspect_dataset(base_cfg)
    valid = windows(base_cfg, info, "valid", 6)
    train = windows(base_cfg, info, "train", 6)
    lin = compute_baselines(base_cfg, info, valid)["linear_average"]["cosine"]
    vb = [{"x": torch.from_numpy(valid[i: i + 256])} for i in range(0, len(valid), 256)]
    print(f"linear average on the {len(valid)} valid windows: {lin:.4f}; {args.steps} steps x batch 32 each")
    for name in names:
        cfg = load_config(None, [f"data.path={SAMPLE}", "model.flavor=seed", "train.batch_size=32",
                                 f"train.max_steps_per_epoch={args.steps}", *CANDIDATES[name]])
        torch.manual_seed(0)
        model = build_from_spec(model_spec(cfg, {"dim": 384}))
        trainer = Trainer(model, cfg, total_steps=args.steps)
        rng = np.random.default_rng(0)
        order = np.concatenate([rng.permutation(len(train)) for _ in range(args.steps * 32 // len(train) + 1)])
        batches = [{"x": torch.from_numpy(train[order[i * 32:(i + 1) * 32]])} for i in range(args.steps)]
        t0 = time.perf_counter()
        m = trainer.train_epoch(batches, vb)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:16s} params {n / 1e6:5.2f}M  val_cosine_seed {m['val_cosine_seed']:.4f}  "
              f"vs linear average {m['val_cosine_seed'] - lin:+.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
