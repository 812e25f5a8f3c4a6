"""Non-learned baselines for next-vector prediction, scored on the same windows as models.

Window definition (as ../shared/data/README.md): every run of `context + 1` consecutive
vectors inside one document; the first `context` are the context, the last is the target.
A document with n vectors gives max(n - context, 0) windows.

Baselines (every prediction is L2-normalised):
- linear_average: mean of the context vectors;
- ewma: exponentially weighted context average, weight 0.5^k for the k-th vector back
  (k = 0 is the last context vector);
- persistence: the last context vector;
- mean_vector: the global mean of all train vectors (one prediction for every window);
- nearest_neighbour: the successor (next vector in its train document) of the train vector
  closest by cosine to the last context vector;
- random: a random unit vector per window (Gaussian, normalised, `seed`).

Each baseline gets the full VectorMetrics set, "n_windows", and "retrieval_acc" with the
candidate set = every window target of the evaluated split (see `retrieval_candidates`),
the same set the model comparison uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from archlab.platform.metrics import VectorMetrics, retrieval_hits

BASELINES = ("linear_average", "ewma", "persistence", "mean_vector", "nearest_neighbour", "random")


def read_docs(path: str | Path, column: str = "embeddings") -> list[np.ndarray]:
    """One float32 array [n_i, D] per Parquet row of a list<fixed_size_list<float, D>> column
    (the shared data's `embeddings`, or a canonical shard's `vectors`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    schema = pq.read_schema(path)
    if column not in schema.names:
        raise ValueError(f"{path}: column {column!r} not found; columns: {', '.join(schema.names)}")
    col = pq.read_table(path, columns=[column]).column(column).combine_chunks()
    vtype = col.type
    if not (pa.types.is_list(vtype) and pa.types.is_fixed_size_list(vtype.value_type)):
        raise ValueError(f"{path}: column {column!r} expected list<fixed_size_list<float, D>>, found {vtype}")
    dim = vtype.value_type.list_size
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flat = flat.reshape(-1, dim)  # (total vectors, D)
    offsets = col.offsets.to_numpy()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(col))]


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def windows(docs: list[np.ndarray], context: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """All windows: contexts [N, context, D] and targets [N, D] (float32)."""
    ctx, tgt = [], []
    for ctx_b, tgt_b in _window_blocks(docs, context, block=1 << 62):
        ctx.append(ctx_b)
        tgt.append(tgt_b)
    if not ctx:
        raise ValueError(f"no document has more than context={context} vectors: no windows")
    return np.concatenate(ctx), np.concatenate(tgt)


def retrieval_candidates(docs: list[np.ndarray], context: int = 5) -> np.ndarray:
    """The candidate set for retrieval accuracy: every window target of the split [N, D]."""
    return np.concatenate([d[context:] for d in docs if len(d) > context]).astype(np.float32)


def _window_blocks(docs: list[np.ndarray], context: int, block: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Windows in blocks of about `block`, so the full train set never sits in memory as
    [N, context, D] at once (76k windows x 5 x 384 floats would be ~580 MB)."""
    ctx_parts, tgt_parts, n = [], [], 0
    for d in docs:
        if len(d) <= context:
            continue
        d = np.asarray(d, dtype=np.float32)
        # (n - context, context, D): window i is d[i : i + context]
        view = np.lib.stride_tricks.sliding_window_view(d[:-1], context, axis=0).transpose(0, 2, 1)
        ctx_parts.append(view)
        tgt_parts.append(d[context:])
        n += len(d) - context
        if n >= block:
            yield np.ascontiguousarray(np.concatenate(ctx_parts)), np.concatenate(tgt_parts)
            ctx_parts, tgt_parts, n = [], [], 0
    if ctx_parts:
        yield np.ascontiguousarray(np.concatenate(ctx_parts)), np.concatenate(tgt_parts)


class _NearestNeighbour:
    """Successor lookup: keys = every train vector that has a successor in its document."""

    def __init__(self, train_docs: list[np.ndarray]):
        keys = [d[:-1] for d in train_docs if len(d) > 1]
        vals = [d[1:] for d in train_docs if len(d) > 1]
        if not keys:
            raise ValueError("nearest_neighbour: no train document has two or more vectors")
        self.keys = torch.from_numpy(_normalize(np.concatenate(keys)).astype(np.float32))
        self.vals = np.concatenate(vals).astype(np.float32)

    def __call__(self, query: np.ndarray, block: int = 2048) -> np.ndarray:
        q = torch.from_numpy(_normalize(query).astype(np.float32))
        idx = []
        for i in range(0, q.shape[0], block):
            idx.append((q[i : i + block] @ self.keys.T).argmax(dim=1))  # (block,) closest key
        return self.vals[torch.cat(idx).numpy()]


def baseline_predictions(
    ctx: np.ndarray, mean_vec: np.ndarray, nn: _NearestNeighbour, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Every baseline's (un-normalised) predictions [N, D] for contexts [N, context, D]."""
    n, c, d = ctx.shape
    w = 0.5 ** np.arange(c - 1, -1, -1, dtype=np.float32)  # oldest .. last = 0.5^(c-1) .. 1
    return {
        "linear_average": ctx.mean(axis=1),
        "ewma": np.einsum("ncd,c->nd", ctx, w),
        "persistence": ctx[:, -1],
        "mean_vector": np.broadcast_to(mean_vec, (n, d)),
        "nearest_neighbour": nn(ctx[:, -1]),
        "random": rng.standard_normal((n, d)).astype(np.float32),
    }


def evaluate_baselines(
    train_docs: list[np.ndarray],
    valid_docs: list[np.ndarray],
    context: int = 5,
    seed: int = 0,
    retrieval: bool = True,
) -> dict[str, dict[str, float]]:
    """Baseline name -> metrics ("cosine", "mse", "frac_cos_gt_*", "n_windows", and
    "retrieval_acc" when `retrieval`) on the windows of `valid_docs`; `train_docs` feed
    the global mean and the nearest-neighbour index."""
    if context < 1:
        raise ValueError(f"context must be >= 1, found {context}")
    if not any(len(d) > context for d in valid_docs):
        raise ValueError(f"baselines: no valid document has more than context={context} vectors (no windows)")
    dims = {np.asarray(d).shape[-1] for d in list(train_docs) + list(valid_docs) if len(d)}
    if len(dims) != 1:
        raise ValueError(f"baselines: all vectors must share one dim, found dims {sorted(dims)}")
    mean_vec = np.concatenate([d for d in train_docs if len(d)]).astype(np.float64).mean(axis=0).astype(np.float32)
    nn = _NearestNeighbour(train_docs)
    rng = np.random.default_rng(seed)
    metrics = {name: VectorMetrics() for name in BASELINES}
    hits = {name: 0 for name in BASELINES}
    cands = torch.from_numpy(retrieval_candidates(valid_docs, context)) if retrieval else None
    n_windows = 0
    for ctx, tgt in _window_blocks(valid_docs, context):
        n_windows += len(tgt)
        t = torch.from_numpy(tgt)
        for name, pred in baseline_predictions(ctx, mean_vec, nn, rng).items():
            p = torch.from_numpy(_normalize(np.asarray(pred, dtype=np.float32)))
            metrics[name].update(p, t)
            if cands is not None:
                hits[name] += int(retrieval_hits(p, t, cands, dtype=torch.float32).sum())
    out = {}
    for name in BASELINES:
        m = metrics[name].compute()
        m["n_windows"] = float(n_windows)
        if cands is not None:
            m["retrieval_acc"] = hits[name] / n_windows
        out[name] = m
    return out


def baseline_window_scores(
    train_docs: list[np.ndarray],
    valid_docs: list[np.ndarray],
    context: int = 5,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Baseline name -> per-window cosine [N] (float64) on the windows of `valid_docs`, in
    window order: the values whose means `evaluate_baselines` reports as "cosine" (same
    windows, same random draws for the same `seed`), kept per window so that a model's
    per-window scores can be paired with them (archlab.platform.stats.paired)."""
    if not any(len(d) > context for d in valid_docs):
        raise ValueError(f"baselines: no valid document has more than context={context} vectors (no windows)")
    mean_vec = np.concatenate([d for d in train_docs if len(d)]).astype(np.float64).mean(axis=0).astype(np.float32)
    nn = _NearestNeighbour(train_docs)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in BASELINES}
    for ctx, tgt in _window_blocks(valid_docs, context):
        t = torch.from_numpy(tgt).double()
        for name, pred in baseline_predictions(ctx, mean_vec, nn, rng).items():
            p = torch.from_numpy(_normalize(np.asarray(pred, dtype=np.float32))).double()
            parts[name].append(torch.nn.functional.cosine_similarity(p, t, dim=-1, eps=1e-12).numpy())
    return {name: np.concatenate(v) for name, v in parts.items()}
