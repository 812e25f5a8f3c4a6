"""Data pipeline benchmark (issue 3), one run, side by side:

1. read throughput of the same canonical shards (../shared/data/wikitext2-minilm384 train,
   prepared once into --work): plain `pyarrow.parquet.read_table` vs `ray.data.read_parquet`
   iterated to the end (rows, vectors and MB per second; best of --repeats);
2. the fraction of step time a training loop spends waiting for data: one architecture
   trained for --steps steps on the streaming windows the platform makes
   (`archlab.platform.data.make_ray_datasets`, the same `iter_torch_batches` call as the
   Ray Train worker, bounded local shuffle on), timing `next(batches)` against the
   whole step (forward, backward, clip, AdamW). Goal: under 5%. Run twice: streaming the
   train files every epoch (data.cache_train_mb=0) and with the train windows cached once
   per job (the default, data.cache_train_mb=1024).

    python benchmarks/data_pipeline.py                      # full: shared train, lstm debug, 300 steps
    python benchmarks/data_pipeline.py --smoke-test         # the shipped sample, 20 steps

Prints one line per measurement; copy the figures into BENCHMARKS.md with the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARCHLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def prepare_data(work: Path, smoke: bool) -> Path:
    """Canonical shards of the shared train/valid vectors (up to date after the first run)."""
    from archlab.platform.prepare import parquet_to_vector_shards

    if smoke:
        return REPO / "data" / "wikitext2-minilm384-sample"
    src = SHARED / "wikitext2-minilm384"
    if not src.exists():
        sys.exit(f"shared data {src} is absent (set ARCHLAB_SHARED_DATA)")
    for split in ("train", "valid"):
        # 100 documents per shard: several files, so Ray Data has parallel read tasks
        parquet_to_vector_shards(src / f"{split}.parquet", work, split=split, id_col="article_id",
                                 vectors_col="embeddings", texts_col="chunks_detok", rows_per_shard=100)
    return work


def read_throughput(files: list[str], repeats: int) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    size_mb = sum(os.path.getsize(f) for f in files) / 1e6

    def plain():
        rows = vecs = 0
        for f in files:
            col = pq.read_table(f, columns=["vectors"]).column("vectors")
            rows += len(col)
            vecs += int(pc.sum(pc.list_value_length(col)).as_py())
        return rows, vecs

    def raydata():
        rows = vecs = 0
        ds = ray.data.read_parquet(files).select_columns(["vectors"])
        for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            col = b.column("vectors")
            rows += len(col)
            vecs += int(pc.sum(pc.list_value_length(col)).as_py())
        return rows, vecs

    results = {}
    for name, fn in (("pyarrow", plain), ("ray.data", raydata)):
        # One untimed pass first: Ray Data's first read starts its worker processes and the
        # OS page cache fills for both readers; that start-up is printed, not averaged in.
        t0 = time.perf_counter()
        fn()
        print(f"read {name:9s}: cold first pass {time.perf_counter() - t0:.2f} s", flush=True)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rows, vecs = fn()
            times.append(time.perf_counter() - t0)
        best = min(times)
        results[name] = best
        print(f"read {name:9s}: {len(files)} files {size_mb:.1f} MB, {rows} docs, {vecs} vectors: "
              f"best {best:.3f} s (median {statistics.median(times):.3f} s) -> {vecs / best:,.0f} vectors/s, "
              f"{size_mb / best:.1f} MB/s", flush=True)
    print(f"read ratio ray.data / pyarrow time: {results['ray.data'] / results['pyarrow']:.2f}x", flush=True)


def data_wait(root: Path, arch: str, flavor: str, steps: int, batch_size: int, threads: int, cache_mb: int) -> None:
    import dataclasses

    import torch

    from archlab.platform.config import load_config
    from archlab.platform.data import caches_train, inspect_dataset, make_ray_datasets
    from archlab.platform.losses import make_loss
    from archlab.platform.train import _vector_loss, build_from_spec, model_spec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"data.path={root}", f"model.arch={arch}", f"model.flavor={flavor}",
                                 f"train.batch_size={batch_size}", "train.task=vector", "data.max_valid_windows=256",
                                 f"data.cache_train_mb={cache_mb}"])
    t0 = time.perf_counter()
    info = inspect_dataset(cfg)  # the driver-side validation, as before a real run
    t_validate = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = make_ray_datasets(cfg, info)["train"]
    t_make = time.perf_counter() - t0  # with the cache: reading and cutting every window, once
    mode = "cached (read once per job)" if caches_train(cfg, info) else "streaming (read every epoch)"
    spec = model_spec(cfg, {"dim": info.dim, "vocab_size": info.vocab_size, "dataset_id": info.dataset_id})
    model = build_from_spec(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = make_loss(cfg.train.loss)
    n_params = sum(p.numel() for p in model.parameters())
    batches = iter(ds.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=cfg.data.shuffle_buffer,
                                         local_shuffle_seed=0, drop_last=True))
    # The first batch pays for starting the streaming executor; a trainer pays it once per
    # epoch, so it is reported apart and left out of the steady-state fraction.
    t0 = time.perf_counter()
    batch = next(batches)
    first = time.perf_counter() - t0
    wait = total = 0.0
    done = 0
    losses = []
    while done < steps:
        t0 = time.perf_counter()
        if done:  # step 0 uses the batch fetched above
            batch = next(batches, None)
            if batch is None:
                break
        t1 = time.perf_counter()
        x = batch["x"]  # (B, context + 1, D)
        loss = _vector_loss(model, x, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        losses.append(loss.item())
        t2 = time.perf_counter()
        wait += t1 - t0 if done else 0.0
        total += t2 - t0 if done else t2 - t1
        done += 1
    print(f"validate (driver, {info.dataset_id}): {t_validate:.2f} s", flush=True)
    print(f"train windows {mode}, data.cache_train_mb={cache_mb}: datasets made in {t_make:.2f} s", flush=True)
    print(f"train {arch}/{flavor} ({n_params:,} params), batch {batch_size}, {done} steps, {threads} torch thread(s): "
          f"first batch {first:.2f} s; steady state {total / done * 1e3:.1f} ms/step, data wait "
          f"{wait / done * 1e3:.2f} ms/step = {100 * wait / total:.2f}% of step time; "
          f"loss {statistics.mean(losses[:10]):.4f} -> {statistics.mean(losses[-10:]):.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/archlab-bench-wikitext2-minilm384", help="prepared shards go here")
    ap.add_argument("--arch", default="lstm")
    ap.add_argument("--flavor", default="debug")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the training loop")
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for the local Ray (STACK_NOTES)")
    ap.add_argument("--smoke-test", action="store_true", help="shipped sample, 20 steps, 1 repeat")
    args = ap.parse_args()
    if args.smoke_test:
        args.steps, args.repeats = min(args.steps, 20), 1

    import ray

    from archlab.platform.shards import load_manifest, split_files

    t0 = time.perf_counter()
    root = prepare_data(Path(args.work), args.smoke_test)
    print(f"data {root} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    from archlab.platform.runtime import start_local_ray

    start_local_ray(args.num_cpus, log_to_driver=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        read_throughput(split_files(root, load_manifest(root), "train"), args.repeats)
        for cache_mb in (0, 1024):  # streaming, then the platform's default cache, side by side
            data_wait(root, args.arch, args.flavor, args.steps, args.batch_size, args.threads, cache_mb)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
