"""Helpers for kernel tests: one tolerance rule, and NaN-poisoned `torch.empty`.

`assert_close` compares by relative RMS error, rms(actual - expected) / rms(expected),
which is robust to a few near-zero entries where elementwise rtol is meaningless, and
names the quantity, the error and the tolerance when it fails. Tolerances by dtype follow
the fla/mamba practice of loosening for bf16 inputs.
"""

from __future__ import annotations

import contextlib

import torch

# relative RMS error allowed, by the dtype the fast path ran in
RMS_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((a - e).pow(2).mean().sqrt() / denom)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Raise AssertionError unless shapes match, `actual` is finite and rel-RMS error <= tol."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {list(actual.shape)}, expected {list(expected.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite values (NaN-poisoned buffer left unwritten?)")
    err = rel_rms(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}")


@contextlib.contextmanager
def nan_poisoned_empty():
    """Within the block, torch.empty / empty_like / Tensor.new_empty return NaN-filled
    floating tensors, so a kernel that reads or returns an unwritten buffer shows NaNs."""
    orig_empty, orig_like, orig_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(orig_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(orig_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: poison(orig_new(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = orig_empty, orig_like, orig_new


def grads_of(outputs, inputs, seed: int = 0):
    """Gradients of a fixed random projection of `outputs` w.r.t. `inputs` (None where unused).

    The projection weights come from their own generator, so two paths given the same
    inputs get the same cotangents.
    """
    gen = torch.Generator().manual_seed(seed)
    loss = 0.0
    for out in outputs:
        w = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
        loss = loss + (out.float() * w).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)
