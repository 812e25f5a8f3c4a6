"""Compute accounting: training FLOPs per sample, counted on the real model, and the
device's matmul peak (for `mfu`).

`flops_per_sample` runs one forward + backward of the task's loss under
`torch.utils.flop_counter.FlopCounterMode` and divides by the batch size: what the model
runs is what is counted, never a 6N rule, because SSM, scan, convolution and
linear-attention mixers spend FLOPs very differently from a dense transformer. The
counter sees matmul-type ops only; kernels add analytic counts for their custom ops
through `archlab.kernels._flops` (docs/compute.md lists what is and is not seen).

Metric names the platform logs (DESIGN.md round 2, "budgets are compute"):
    flops_per_sample   this function's result, once per run (shape fixed by the config)
    train_flops        cumulative: flops_per_sample * samples_seen
    samples_seen       cumulative training samples (windows) over all workers
    peak_flops         `matmul_peak_flops` of the worker's device and dtype
    mfu                achieved FLOP/s (train_flops / train seconds) / peak_flops
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

_CACHE: dict[tuple, dict[str, float]] = {}


# Fused RNN ops (nn.LSTM / nn.GRU / nn.RNN) have no formula in torch's counter, so an LSTM
# would count only its head. Their matmuls are known from the weights: per token, one
# [G*H, in] and one [G*H, H] matrix-vector product per layer and direction (G = 4 LSTM,
# 3 GRU, 1 RNN), 2 FLOPs per multiply-add; the backward computes the input and the
# weight gradients of both, twice that. The gate nonlinearities are elementwise and,
# like every elementwise op here, not counted.
def _tokens(input_shape) -> int:
    return math.prod(input_shape[:-1])  # [T, B, in], [B, T, in] or packed [sum, in]


def _matrices(shapes) -> int:
    return sum(math.prod(s) for s in shapes if s is not None and len(s) == 2)


def _mkldnn_rnn_flop(input, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    return 2 * _tokens(input) * _matrices([w_ih, w_hh])


def _mkldnn_rnn_backward_flop(input, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    return 4 * _tokens(input) * _matrices([w_ih, w_hh])


def _cudnn_rnn_flop(input, weights, *args, out_shape=None, **kwargs) -> int:
    return 2 * _tokens(input) * _matrices(weights)


def _cudnn_rnn_backward_flop(input, weights, *args, out_shape=None, **kwargs) -> int:
    mask = args[-1] if args and isinstance(args[-1], (list, tuple)) else (True, True, True, True)
    wanted = int(bool(mask[0]) or bool(mask[1]) or bool(mask[2])) + int(bool(mask[3]))
    return 2 * wanted * _tokens(input) * _matrices(weights)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that
# F.scaled_dot_product_attention takes on CPU; same formula as the CUDA ones (dense
# T x T, causal masking not discounted: torch counts it that way on every device).
def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def _custom_formulas() -> dict:
    aten = torch.ops.aten
    out = {}
    for name, formula in (("mkldnn_rnn_layer", _mkldnn_rnn_flop),
                          ("mkldnn_rnn_layer_backward", _mkldnn_rnn_backward_flop),
                          ("_cudnn_rnn", _cudnn_rnn_flop), ("_cudnn_rnn_backward", _cudnn_rnn_backward_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop)):
        if hasattr(aten, name):  # builds without oneDNN / cuDNN lack the op
            out[getattr(aten, name)] = formula
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # DDP's backward hooks would all-reduce during the count: measure the bare module
    return model.module if hasattr(model, "module") else model


def _model_key(model: torch.nn.Module) -> str:
    """Architecture identity without a spec: class, config (when the model carries one)
    and every parameter's name and shape. Two models with the same key run the same ops."""
    cfg = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return json.dumps([type(model).__qualname__, repr(cfg), shapes], default=str)


def task_loss(task: str, loss_fn: Callable | None = None) -> Callable:
    """(model, batch) -> scalar loss, as training computes it: every position predicts the
    next one. vector: batch [B, L, D] float and `loss_fn(pred [N, D], target [N, D])`
    (default MSE); token: batch [B, L] int64 and next-token cross-entropy."""
    if task == "vector":
        if loss_fn is None:
            from archlab.platform.losses import make_loss

            loss_fn = make_loss("mse")

        def vector(model, x):
            pred = model(x[:, :-1])  # (B, L-1, D)
            d = pred.shape[-1]
            return loss_fn(pred.reshape(-1, d).float(), x[:, 1:].reshape(-1, d).float())

        return vector
    if task == "token":
        def token(model, x):
            logits = model(x[:, :-1])  # (B, L-1, V)
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

        return token
    raise ValueError(f"flops: task must be 'vector' or 'token', found {task!r}")


def count_training_flops(model: torch.nn.Module, example_batch: torch.Tensor, task: str,
                         loss_fn: Callable | None = None) -> dict[str, float]:
    """FLOPs of one forward + backward of the task loss on `example_batch` (whole batch).

    Returns {"forward", "backward", "total", "counted", "analytic", "batch_size"}:
    "counted" is FlopCounterMode's total, "analytic" what kernels noted for custom ops.
    The model is left as found: gradients, buffers (e.g. BatchNorm statistics) and the
    RNG state (dropout) are restored, so measuring never changes a training run."""
    from torch.utils.flop_counter import FlopCounterMode

    from archlab.kernels import _flops

    model = _unwrap(model)
    loss_of = task_loss(task, loss_fn)
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    devices = [example_batch.device] if example_batch.device.type == "cuda" else []
    counter = FlopCounterMode(display=False, custom_mapping=_custom_formulas())
    with torch.random.fork_rng(devices=devices), _flops.counting() as noted:
        with counter:
            loss = loss_of(model, example_batch)
        fwd = float(counter.get_total_flops())
        with counter:  # a second entry resets the counter: backward alone
            loss.backward()
        bwd = float(counter.get_total_flops())
    for n, p in model.named_parameters():
        p.grad = grads[n]
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    a_fwd = sum(v for k, v in noted.items() if k.endswith(".forward"))
    a_bwd = sum(v for k, v in noted.items() if k.endswith(".backward"))
    return {"forward": fwd + a_fwd, "backward": bwd + a_bwd, "total": fwd + bwd + a_fwd + a_bwd,
            "counted": fwd + bwd, "analytic": a_fwd + a_bwd, "batch_size": float(example_batch.shape[0])}


def flops_per_sample(model: torch.nn.Module, example_batch, task: str, loss_fn: Callable | None = None,
                     key: Any = None) -> float:
    """Training FLOPs (forward + backward) per sample (one window) at this batch's shape.

    example_batch: vector [B, L, D] float, token [B, L] int (L = context + 1 or seq_len + 1,
    as training sees it). Cached per (architecture, shape, dtype, task, key): `key` may be
    the model spec's JSON, else the model's class, config and parameter shapes are used.
    A loss with its own matmuls (InfoNCE) counts them: pass the run's `loss_fn`."""
    x = torch.as_tensor(example_batch)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"flops_per_sample: example_batch must be [B, L(, D)] with B >= 1, found {list(x.shape)}")
    model = _unwrap(model)
    x = x.to(next(model.parameters()).device) if any(True for _ in model.parameters()) else x
    cache_key = (key if key is not None else _model_key(model), tuple(x.shape), str(x.dtype), task,
                 getattr(loss_fn, "__qualname__", None))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = count_training_flops(model, x, task, loss_fn)
    c = _CACHE[cache_key]
    return c["total"] / c["batch_size"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      seconds: float = 0.5, n: int = 1024) -> float:
    """Achieved FLOP/s of repeated [n, n] @ [n, n] matmuls on `device` in `dtype` for about
    `seconds` (after one warm-up): the practical peak that `mfu` divides by. On CPU it
    uses the threads torch has (the worker's share, not the machine's)."""
    device = torch.device(device)
    if seconds <= 0:
        raise ValueError(f"matmul_peak_flops: seconds must be > 0, found {seconds}")
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    batch = 1
    while True:
        for _ in range(batch):
            torch.matmul(a, b, out=out)
        _sync(device)
        iters += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
        # fewer syncs once one matmul is known to be fast, but never past the time asked
        # for by more than about one matmul (a slow CPU thread takes ~0.2 s per matmul)
        batch = max(1, min(batch * 2, 64, int((seconds - elapsed) / (elapsed / iters))))
    peak = 2.0 * n**3 * iters / elapsed
    if not math.isfinite(peak) or peak <= 0:
        raise RuntimeError(f"matmul_peak_flops: measured {peak} FLOP/s on {device} ({dtype})")
    return peak


def mfu(train_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the measured peak (NaN
    when no time has passed or the peak is unknown)."""
    if seconds <= 0 or not peak_flops or peak_flops <= 0:
        return math.nan
    return train_flops / seconds / peak_flops
