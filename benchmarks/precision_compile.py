"""fp32 vs bf16 autocast vs `train.compile` (torch.compile), the Ray-free Trainer over
in-memory windows (overhead.py's plain loop), side by side in one run (issue 14):

    python benchmarks/precision_compile.py --data <prepared vectors> --archs amn,lstm,transformer --flavor seed
    python benchmarks/precision_compile.py --quick     # the shipped sample, debug AMN, few steps

For each arch every mode trains `--steps` optimizer steps `--rounds` times, the modes
interleaved round by round (fp32, bf16, compile, fp32, ...), after one untimed warm-up
pass per mode (compile's warm-up includes its compilation, reported apart). Prints the
median samples/s per mode and the ratios to fp32. bf16 is autocast on this CPU: fast only
where the CPU has native bf16 matmuls (avx512_bf16 / AMX); `lscpu` says which.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import SAMPLE, base_overrides, train_windows

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "compile": ("fp32", True), "compile+bf16": ("bf16", True)}


def make_trainer(args, arch: str, mode: str, tmp: Path, info_cache: dict):
    from archlab.platform.config import load_config
    from archlab.platform.data import inspect_dataset
    from archlab.platform.train import build_from_spec, model_spec
    from archlab.platform.trainer import Trainer

    precision, compile_ = MODES[mode]
    cfg = load_config(None, base_overrides(args, arch, args.data, tmp) + [f"train.compile={str(compile_).lower()}"])
    if "x" not in info_cache:
        info = inspect_dataset(cfg)
        info_cache.update(x=train_windows(cfg, info), dim=info.dim, vocab=info.vocab_size)
    torch.manual_seed(0)
    model = build_from_spec(model_spec(cfg, {"dim": info_cache["dim"], "vocab_size": info_cache["vocab"]}))
    return Trainer(model, cfg, precision=precision)


def batches(x: torch.Tensor, n: int, bs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    for s in range(n):
        i = (s * bs) % max(1, x.shape[0] - bs)
        yield x[order[i: i + bs]]


def timed_pass(trainer, x, steps: int, bs: int, seed: int) -> float:
    t0 = time.perf_counter()
    for b in batches(x, steps, bs, seed):
        trainer.train_step(b)
    trainer.check_finite()  # one host sync at the end, as the Trainer's own epoch does
    return steps * bs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--task", default="vector")
    ap.add_argument("--archs", default="amn,lstm,transformer")
    ap.add_argument("--flavor", default="seed")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per timed pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fp32,bf16,compile")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.data, args.archs, args.flavor, args.steps, args.rounds = args.data or SAMPLE, "amn", "debug", 10, 1
    if args.data is None:
        ap.error("--data is required (unless --quick)")
    args.precision = "fp32"  # base_overrides reads it; each mode sets its own precision
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(modes) - set(MODES)
    if bad:
        ap.error(f"--modes: unknown {sorted(bad)}; expected {', '.join(MODES)}")
    torch.set_num_threads(args.threads)
    print(f"# precision/compile: {args.task} {args.flavor}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.steps} steps x {args.rounds} rounds, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
          flush=True)
    lines = ["| model | " + " | ".join(f"{m} samples/s" for m in modes) + " | "
             + " | ".join(f"{m} / fp32" for m in modes if m != "fp32") + " | compile warm-up s |",
             "|" + "---|" * (2 * len(modes) + 1)]
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        cache: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            trainers, warm = {}, {}
            for m in modes:
                trainers[m] = make_trainer(args, arch, m, Path(tmp), cache)
                t0 = time.perf_counter()
                timed_pass(trainers[m], cache["x"], max(3, args.steps // 10), args.batch_size, 0)
                warm[m] = time.perf_counter() - t0
            rates = {m: [] for m in modes}
            for r in range(args.rounds):
                for m in modes:
                    rates[m].append(timed_pass(trainers[m], cache["x"], args.steps, args.batch_size, r + 1))
        med = {m: statistics.median(v) for m, v in rates.items()}
        base = med.get("fp32")
        cw = [f"{warm[m]:.0f}" for m in modes if MODES[m][1]]
        lines.append(f"| {arch} | " + " | ".join(f"{med[m]:,.0f}" for m in modes) + " | "
                     + " | ".join(f"{med[m] / base:.2f}x" if base else "-" for m in modes if m != "fp32")
                     + f" | {', '.join(cw) or '-'} |")
        print(f"  {arch}: " + ", ".join(f"{m} {med[m]:,.0f}" for m in modes), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
