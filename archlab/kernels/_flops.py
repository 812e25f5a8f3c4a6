"""Analytic FLOP counts that kernels report for work a FLOP counter cannot see.

`torch.utils.flop_counter.FlopCounterMode` counts matmul-type aten ops (mm, bmm, addmm,
convolution, scaled_dot_product_attention). It cannot see inside a fused C or Triton
kernel, and it does not count elementwise ops at all, so a diagonal linear scan, which is
nothing but multiply-adds, counts zero on every path. A kernel entry point calls `note`
with the algorithm's own count; `archlab.platform.flops` opens `counting()` around the
one forward+backward it measures and adds what was noted.

No dependency on the platform (CONVENTIONS 8): this module only keeps a counter.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

_ACTIVE: list[dict[str, float]] = []


def note(op: str, forward: float, backward: float = 0.0) -> None:
    """Add `forward` (and, when the caller will be differentiated, `backward`) FLOPs for
    `op` to every open `counting()`; a no-op outside one (the normal training path)."""
    for counts in _ACTIVE:
        counts[op + ".forward"] += float(forward)
        counts[op + ".backward"] += float(backward)


@contextlib.contextmanager
def counting() -> Iterator[dict[str, float]]:
    """Collect `note`s made inside the block: {"<op>.forward": n, "<op>.backward": n}."""
    counts: dict[str, float] = defaultdict(float)
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)
