"""Zoo I comparison: the four seed recipes against the six baselines on the same windows.

One process, no Ray: the same model code (`archlab.architectures.build_model`), the same
Trainer (`archlab.platform.trainer`: step, loss, clipping), metrics and baselines as the
platform, trained with the seed
recipe (MSE, AdamW lr 5e-4 wd 0.01, batch 32, clip 1.0, context 5, predicting at every
position of each 6-vector window) and evaluated with the seed protocol (5 context vectors
-> the next; the output at the window's last position). It adds what the platform's
leaderboard does not report: retrieval accuracy, training wall time, inference latency.

    python benchmarks/zoo1_compare.py --data ../shared/data/wikitext2-minilm384 \
        --archs lstm,gru_stack,transformer,amn --epochs 1 --out /tmp/zoo1

`--data` is either a folder with train.parquet / valid.parquet (column `embeddings`, the
shared data's schema) or an archlab dataset folder (manifest.json + canonical shards).
Prints a markdown leaderboard; writes leaderboard.md and results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from archlab.architectures import build_model, make_config
from archlab.architectures.io import count_params
from archlab.platform.baselines import evaluate_baselines, read_docs, retrieval_candidates, windows
from archlab.platform.metrics import VectorMetrics, inference_latency, retrieval_hits


def load_split(root: Path, split: str) -> list[np.ndarray]:
    if (root / "manifest.json").exists():
        from archlab.platform.shards import load_manifest, split_files

        files = split_files(root, load_manifest(root), split)
        return [d for f in files for d in read_docs(f, "vectors")]
    return read_docs(root / f"{split}.parquet", "embeddings")


class TrainWindows:
    """Every window of context + 1 vectors inside one train document, gathered on demand
    from the flat vector array (all 73k windows materialised would be ~675 MB at 384-D)."""

    def __init__(self, docs: list[np.ndarray], context: int):
        self.flat = torch.from_numpy(np.concatenate(docs).astype(np.float32))  # (total, D)
        starts, off = [], 0
        for d in docs:
            if len(d) > context:
                starts.append(off + np.arange(len(d) - context))
            off += len(d)
        self.starts = torch.from_numpy(np.concatenate(starts))
        self.span = torch.arange(context + 1)
        self.shape = (len(self.starts), context + 1, self.flat.shape[1])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.flat[self.starts[idx].unsqueeze(1) + self.span]  # (B, context + 1, D)


@torch.no_grad()
def evaluate(model, ctx: torch.Tensor, tgt: torch.Tensor, cands: torch.Tensor, batch: int = 512) -> dict:
    """Seed protocol on windows: ctx [N, context, D] -> prediction at the last position."""
    model.eval()
    m, hits = VectorMetrics(), 0
    for i in range(0, ctx.shape[0], batch):
        pred = model(ctx[i : i + batch])[:, -1]  # (b, D): the prediction after the full context
        m.update(pred, tgt[i : i + batch])
        hits += int(retrieval_hits(pred, tgt[i : i + batch], cands, dtype=torch.float32).sum())
    out = m.compute()
    out["retrieval_acc"] = hits / ctx.shape[0]
    return out


def trainer_config(args, epochs: int, steps_per_epoch: int):
    """The seed recipe as an archlab config: the Trainer runs the same step as a worker."""
    from archlab.platform.config import load_config

    return load_config(None, [
        f"train.lr={args.lr}", f"train.weight_decay={args.weight_decay}", f"train.batch_size={args.batch_size}",
        f"train.grad_clip={args.clip}", f"train.loss={args.loss}", "train.scheduler=none", f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps_per_epoch}", f"train.seed={args.seed}", "train.precision=fp32",
    ])


def train_one(arch: str, flavor: str, train_w: TrainWindows, valid: tuple, args) -> dict:
    from archlab.platform.trainer import Trainer

    torch.manual_seed(args.seed)
    d = train_w.shape[-1]
    model = build_model(arch, "vector", make_config(arch, flavor), d_in=d)
    g = torch.Generator().manual_seed(args.seed)
    n = train_w.shape[0]
    steps_per_epoch = n // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    trainer = Trainer(model, trainer_config(args, args.epochs, steps_per_epoch))
    history, stopped = [], False

    def batches(order: torch.Tensor, t0: float):
        nonlocal stopped
        for s in range(steps_per_epoch):
            if args.time_limit and trainer.train_time_s + time.perf_counter() - t0 > args.time_limit:
                # a safety cap on a shared machine: the steps actually run are reported
                print(f"  {arch}: time limit {args.time_limit:.0f}s reached at step {trainer.step}", flush=True)
                stopped = True
                return
            yield train_w[order[s * args.batch_size: (s + 1) * args.batch_size]]  # (B, context + 1, D)

    def log_progress(tr) -> None:
        if args.log_every and tr.step % args.log_every == 0:
            print(f"  {arch} step {tr.step} loss {tr.running_loss():.6f} ({tr.epoch_time_s():.0f}s)", flush=True)

    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=g)
        m = trainer.train_epoch(batches(order, time.perf_counter()), on_step=log_progress)
        with trainer.eval_weights() as eval_model:
            ev = evaluate(eval_model, *valid)
        ev.update(epoch=epoch + 1, step=trainer.step, train_loss=m["train_loss"])
        history.append(ev)
        print(f"  {arch} epoch {epoch + 1}: valid cosine {ev['cosine']:.4f} (train {trainer.train_time_s:.0f}s)",
              flush=True)
        if stopped:
            break
    final = dict(history[-1])
    one = valid[0][:1]  # a single context: latency of one prediction
    final.update(
        arch=arch,
        flavor=flavor,
        params=count_params(model),
        train_s=trainer.train_time_s,
        samples_per_s=trainer.step * args.batch_size / max(trainer.train_time_s, 1e-9),
        steps=trainer.step,
        train_windows=trainer.step * args.batch_size,
        time_limited=stopped,
        latency_ms_b1=1e3 * inference_latency(model, one, repeats=20, warmup=3),
        latency_ms_b256=1e3 * inference_latency(model, valid[0][:256], repeats=5),
        history=history,
    )
    return final


def to_markdown(rows: list[dict]) -> str:
    cols = ["entry", "cosine", "vs linear avg", "mse", "cos>0.5", "cos>0.7", "cos>0.85", "retrieval",
            "params", "steps", "train s", "ms/pred (b=1)", "ms/pred (b=256)"]
    base = next(r["cosine"] for r in rows if r["entry"] == "linear_average")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: -r["cosine"]):
        model = "params" in r
        lines.append("| " + " | ".join([
            f"**{r['entry']}**" if model else r["entry"],
            f"{r['cosine']:.4f}",
            f"{r['cosine'] - base:+.4f}",
            f"{r['mse']:.6f}",
            f"{r['frac_cos_gt_0.5']:.3f}",
            f"{r['frac_cos_gt_0.7']:.3f}",
            f"{r['frac_cos_gt_0.85']:.4f}",
            f"{r['retrieval_acc']:.4f}",
            f"{r['params']:,}" if model else "",
            f"{r.get('steps', r.get('step', ''))}" if model else "",
            f"{r['train_s']:.0f}" if model else "",
            f"{r['latency_ms_b1']:.3f}" if model else "",
            f"{r['latency_ms_b256']:.4f}" if model else "",
        ]) + " |")
    return "\n".join(lines) + "\n"


def merge(folders: list[Path], out: Path | None) -> None:
    """One leaderboard from several runs (e.g. one process per architecture); the
    baselines come from whichever run computed them."""
    base, models, args = {}, {}, []
    for f in folders:
        r = json.loads((f / "results.json").read_text())
        base = base or r["baselines"]
        models.update(r["models"])
        args.append(r["args"])
    if not base:
        raise SystemExit(f"--merge: none of {[str(f) for f in folders]} has baselines")
    rows = [{"entry": k, **v} for k, v in base.items()] + [{"entry": k, **v} for k, v in models.items()]
    md = to_markdown(rows)
    print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "leaderboard.md").write_text(md)
        (out / "results.json").write_text(json.dumps({"runs": args, "baselines": base, "models": models}, indent=2, default=float))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--archs", default="lstm,gru_stack,transformer,amn")
    ap.add_argument("--flavor", default="seed")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=0, help="per epoch; 0 = a full pass over the windows")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--context", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--time-limit", type=float, default=0, help="seconds of training per arch; 0 = none")
    ap.add_argument("--skip-baselines", action="store_true", help="models only (merge with a run that has them)")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="only combine the results.json of these --out folders into one leaderboard")
    ap.add_argument("--smoke-test", action="store_true", help="debug flavors, 20 steps, 3 valid documents")
    args = ap.parse_args()
    if args.merge is not None:
        merge(args.merge, args.out)
        return
    if args.data is None:
        ap.error("--data is required (unless --merge)")
    if args.smoke_test:
        args.flavor, args.max_steps, args.epochs, args.log_every = "debug", 20, 1, 0
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train_docs, valid_docs = load_split(args.data, "train"), load_split(args.data, "valid")
    if args.smoke_test:
        valid_docs = valid_docs[:3]  # models and baselines on the same few windows
    train_w = TrainWindows(train_docs, args.context)
    ctx, tgt = windows(valid_docs, args.context)
    cands = torch.from_numpy(retrieval_candidates(valid_docs, args.context))
    valid = (torch.from_numpy(ctx), torch.from_numpy(tgt), cands)
    print(f"data: {train_w.shape[0]} train windows, {ctx.shape[0]} valid windows, dim {ctx.shape[-1]} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    t0 = time.perf_counter()
    base = {} if args.skip_baselines else evaluate_baselines(train_docs, valid_docs, context=args.context, seed=args.seed)
    print(f"baselines ({time.perf_counter() - t0:.0f}s): "
          + ", ".join(f"{k} {v['cosine']:.4f}" for k, v in base.items()), flush=True)
    rows = [{"entry": k, **v} for k, v in base.items()]
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "baselines": base, "models": {}}
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        print(f"{arch} ({args.flavor}):", flush=True)
        r = train_one(arch, args.flavor, train_w, valid, args)
        results["models"][arch] = r
        rows.append({"entry": arch, **r})
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    md = to_markdown(rows) if base else ""
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "leaderboard.md").write_text(md)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    assert all(math.isfinite(r["cosine"]) for r in rows)


if __name__ == "__main__":
    main()
