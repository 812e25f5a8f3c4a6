"""Kernel speed-ups on this machine: each fast path against its reference, side by side.

    python benchmarks/kernels.py                 # the BENCHMARKS.md table (a few minutes)
    python benchmarks/kernels.py --smoke         # seconds: tiny sizes, checks the script runs
    python benchmarks/kernels.py --malloc keep   # glibc keeps freed memory: no page faults
                                                 # on fresh outputs (see keep_freed_memory)

For every op and T it times the reference and the fast path in the same process,
interleaved (the machine is shared and noisy), forward only (under no_grad) and forward +
backward (y.backward(dy) with a fixed random upstream gradient of the op's main output:
the op alone, no loss reduction, no accumulation into existing .grad), and prints the
median times and their ratio as a Markdown table. Timings are CPU wall time with
torch.set_num_threads(--threads). Nothing here asserts a speed.

Scan paths: reference (sequential loop), torch (blocked two-level PyTorch scan), cpu (the
fused C scan, when a C compiler is present), and one_pass, which is not a scan but the
memory floor: one elementwise pass over the same tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from archlab.kernels import available_paths
from archlab.kernels.retention import retention, retention_ref
from archlab.kernels.scan import linear_scan
from archlab.kernels.ssd import ssd, ssd_recurrent_ref


def scan_case(B, T, D, gen):
    a = (0.9 + 0.1 * torch.rand(B, T, D, generator=gen)).requires_grad_()
    b = torch.randn(B, T, D, generator=gen).requires_grad_()
    h0 = torch.randn(B, D, generator=gen).requires_grad_()
    out = torch.empty(B, T, D)

    def one_pass():
        # the least any scan must do: read a and b once and write h once. Not a scan (no
        # carry), so the reference divided by this time bounds the speed-up of any
        # memory-bound scan on this machine.
        torch.addcmul(b.detach(), a.detach(), b.detach(), out=out)
        return (out,)

    return {"reference": lambda: linear_scan(a, b, h0, kernel="reference"),
            "torch": lambda: linear_scan(a, b, h0, kernel="torch"),
            **({"cpu": lambda: linear_scan(a, b, h0, kernel="cpu")} if "cpu" in available_paths("scan", "cpu") else {}),
            "one_pass": one_pass}, f"B{B}-T{T}-D{D}", [a, b, h0]


def ssd_case(B, T, H, P, N, gen, chunk):
    x = torch.randn(B, T, H, P, generator=gen).requires_grad_()
    dt = (torch.rand(B, T, H, generator=gen) * 0.1 + 0.001).requires_grad_()
    A = (-torch.rand(H, generator=gen) * 4 - 0.5).requires_grad_()
    Bm = torch.randn(B, T, H, N, generator=gen).requires_grad_()
    Cm = torch.randn(B, T, H, N, generator=gen).requires_grad_()
    return {"recurrent": lambda: ssd_recurrent_ref(x, dt, A, Bm, Cm),
            "reference": lambda: ssd(x, dt, A, Bm, Cm, chunk_size=chunk, kernel="reference"),
            "torch": lambda: ssd(x, dt, A, Bm, Cm, chunk_size=chunk, kernel="torch")}, \
        f"B{B}-T{T}-H{H}-P{P}-N{N}-C{chunk}", [x, dt, A, Bm, Cm]


def retention_case(B, H, T, K, V, gen, chunk):
    q = (torch.randn(B, H, T, K, generator=gen) / K ** 0.5).requires_grad_()
    k = torch.randn(B, H, T, K, generator=gen).requires_grad_()
    v = torch.randn(B, H, T, V, generator=gen).requires_grad_()
    gamma = (1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32))).requires_grad_()
    return {"reference": lambda: retention_ref(q, k, v, gamma),
            "parallel": lambda: retention(q, k, v, gamma, mode="parallel", kernel="torch"),
            "torch": lambda: retention(q, k, v, gamma, mode="chunkwise", chunk_size=chunk, kernel="torch")}, \
        f"B{B}-H{H}-T{T}-K{K}-V{V}-C{chunk}", [q, k, v, gamma]


def timed(fn, dy: torch.Tensor | None, leaves) -> float:
    """Seconds for fn's forward (dy None: under no_grad), or its forward + backward given
    the upstream gradient dy of its main output: y.backward(dy), the op alone, with no loss
    reduction and no accumulation into existing .grad (reset before the clock starts)."""
    if dy is not None:
        for x in leaves:
            x.grad = None
        t0 = time.perf_counter()
        fn()[0].backward(dy)
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
    return time.perf_counter() - t0


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep freed memory in the process instead of handing it back to
    the kernel (mallopt M_MMAP_THRESHOLD 32 MiB, its maximum, and M_TRIM_THRESHOLD 1 GiB).

    Why a benchmark needs this: every op returns fresh output tensors, and whether glibc
    serves them from memory the process already holds or from new pages depends on what was
    freed before. New pages cost a fault each, ~2 us per 4 KiB on this VM, i.e. ~1 ms per
    2 MiB output, five times the fused scan's own time at T = 1024, so with glibc's defaults
    a path's median depends on which path ran before it. Kept memory takes that out for
    every path alike (the reference's outputs included); it is what a caching allocator
    (jemalloc, tcmalloc, PyTorch's CUDA allocator) does.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        raise SystemExit(f"--malloc keep needs glibc (libc.so.6 with mallopt): {err}")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    if not ok:
        raise SystemExit("--malloc keep: glibc refused mallopt(M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB)")
    return "glibc keeps freed memory (mallopt M_MMAP_THRESHOLD=32MiB M_TRIM_THRESHOLD=1GiB)"


def measure(paths: dict, repeats: int, backward: bool, leaves) -> dict[str, float]:
    """Median seconds per path; one warm-up each (which also fixes a random upstream
    gradient per path, outside the clock), then the paths take turns, the order rotating
    by one each round so that no path always runs right after the same other one."""
    dys = {}
    for name, fn in paths.items():  # the warm-up, untimed
        with torch.set_grad_enabled(backward):
            y = fn()[0]
        dys[name] = None
        if backward:
            dys[name] = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
            y.backward(dys[name])
    times = {name: [] for name in paths}
    names = list(paths)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(paths[name], dys[name], leaves))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ops", default="scan,ssd,retention")
    ap.add_argument("--T", default="256,1024,4096")
    ap.add_argument("--batch", type=int, default=1, help="batch size for every op")
    ap.add_argument("--malloc", choices=("default", "keep"), default="default",
                    help="keep: glibc keeps freed memory, so fresh outputs cost no page faults "
                         "(see keep_freed_memory); default: glibc as configured")
    args = ap.parse_args()
    malloc = keep_freed_memory() if args.malloc == "keep" else "glibc malloc as configured"
    torch.set_num_threads(args.threads)
    Ts = [16, 40] if args.smoke else [int(t) for t in args.T.split(",")]
    repeats = 1 if args.smoke else args.repeats
    B = args.batch
    gen = torch.Generator().manual_seed(0)
    print(f"# kernels benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={args.threads}, repeats={repeats} (median), fp32, CPU, {malloc}, "
          f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| op | size | pass | reference ms | fast path | fast ms | speed-up |")
    print("|---|---|---|---:|---|---:|---:|")
    for op in args.ops.split(","):
        for T in Ts:
            if op == "scan":
                paths, size, leaves = scan_case(B, T, 16 if args.smoke else 512, gen)
                pairs = [("reference", "torch"), ("reference", "cpu"), ("reference", "one_pass")]
            elif op == "ssd":
                paths, size, leaves = ssd_case(B, T, *((2, 4, 4) if args.smoke else (4, 64, 64)), gen, chunk=64)
                pairs = [("recurrent", "torch"), ("reference", "torch")]
            elif op == "retention":
                paths, size, leaves = retention_case(B, *((2, T, 4, 4) if args.smoke else (4, T, 64, 64)), gen, chunk=64)
                pairs = [("reference", "torch"), ("reference", "parallel")]
            else:
                raise SystemExit(f"--ops: unknown op {op!r}; expected scan, ssd, retention")
            for backward in (False, True):
                live = {k: v for k, v in paths.items() if not (backward and k == "one_pass")}
                med = measure(live, repeats, backward, leaves)
                for ref, fast in pairs:
                    if fast not in med:
                        continue
                    print(f"| {op} | {size} | {'fwd+bwd' if backward else 'fwd'} | {med[ref] * 1e3:.1f} "
                          f"({ref}) | {fast} | {med[fast] * 1e3:.2f} | {med[ref] / med[fast]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
