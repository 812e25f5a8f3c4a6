"""The fused C scan's backward: channels walked high to low (the default) against low to high.

    python benchmarks/scan_walk.py               # the BENCHMARKS.md table (about a minute)
    python benchmarks/scan_walk.py --smoke       # seconds: tiny sizes, checks the script runs

The backward of h_t = a_t h_{t-1} + b_t walks time from the last row to the first. Inside
each row, archlab's kernel walks channels from high to low, so the whole walk descends
through memory; the earlier build walked them low to high (ascending runs inside a
descending sequence of rows). Both builds do the same loads, stores and arithmetic (the
tests check their gradients are bit-identical); this times them side by side, interleaved,
on the same tensors, calling the C entry points directly (no autograd, no allocation):

  cold: a 64 MiB buffer is written before each call, so a, h, dh and the outputs start
        outside the cache, as in a model where other layers ran in between;
  warm: the same call repeated at once.

The forward (one ascending walk, the same code in both builds) is timed too as a control:
its ratio should stay near 1. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from archlab.kernels.scan import cpu_scan

VARIANTS = {"descending (default)": (), "ascending (earlier)": ("ARCHLAB_SCAN_BWD_ASCENDING",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 3 repeats")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--sizes", default="1x256x512,1x1024x512,1x4096x512,4x1024x512,2x1023x60",
                    help="comma-separated BxTxD")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = ["2x40x16"] if args.smoke else args.sizes.split(",")
    repeats = 3 if args.smoke else args.repeats
    libs = {name: cpu_scan.load_library(d) for name, d in VARIANTS.items()}
    flush = torch.empty(64 * 1024 * 1024 // 4)
    gen = torch.Generator().manual_seed(0)
    print(f"# scan backward walk: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread, fp32, median of {repeats} interleaved calls, "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| size | pass | cache | descending us | ascending us | ascending / descending |")
    print("|---|---|---|---:|---:|---:|")
    for size in sizes:
        B, T, D = (int(x) for x in size.split("x"))
        a = 0.9 + 0.1 * torch.rand(B, T, D, generator=gen)
        b, dh = torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)
        h0 = torch.randn(B, D, generator=gen)
        h, da, db, dh0 = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a), torch.empty_like(h0)
        p = {k: x.data_ptr() for k, x in dict(a=a, b=b, h0=h0, h=h, dh=dh, da=da, db=db, dh0=dh0).items()}

        def fwd(lib):
            return lib.archlab_scan_fwd(0, p["a"], p["b"], p["h0"], p["h"], B, T, D, 1)

        def bwd(lib):
            return lib.archlab_scan_bwd(0, p["a"], p["h"], p["h0"], p["dh"], p["da"], p["db"], p["dh0"], B, T, D, 1)

        for lib in libs.values():  # warm-up: page in every buffer
            fwd(lib), bwd(lib)
        for pname, call in (("fwd", fwd), ("bwd", bwd)):
            for cache in ("cold", "warm"):
                times: dict[str, list[float]] = {name: [] for name in libs}
                for _ in range(repeats):
                    for name, lib in libs.items():
                        if cache == "cold":
                            flush.fill_(1.0)
                        else:
                            call(lib)
                        t0 = time.perf_counter()
                        rc = call(lib)
                        times[name].append(time.perf_counter() - t0)
                        if rc != 0:
                            raise SystemExit(f"{name} {pname} returned {rc}")
                med = [statistics.median(times[n]) * 1e6 for n in libs]
                print(f"| B{B}-T{T}-D{D} | {pname} | {cache} | {med[0]:.0f} | {med[1]:.0f} | "
                      f"{med[1] / med[0]:.2f}x |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
