"""Training input: canonical shards -> Ray Data windows -> per-worker torch batches.

Driver side (`inspect_dataset`): the manifest and every shard footer are checked against
the task and the model before any worker starts. Workers side: each worker streams its
equal share with `get_dataset_shard(...).iter_torch_batches`.

Windows are cut on the fly inside `map_batches`:
- vector: every run of context + 1 consecutive vectors inside one document (stride
  `data.stride`), as x [n, context + 1, D] float32;
- vector validation: the seed protocol's windows (SEED_CONTEXT + 1 = 6 vectors, or
  context + 1 when data.context is shorter), the same windows whatever data.context is,
  and, when data.context > SEED_CONTEXT, a second set "valid_ctx" of context + 1 vectors
  for the full-context metric (val_cosine_ctx); see `valid_window_lengths`;
- token: documents of a batch concatenated with a separator between them (packing), cut
  into non-overlapping runs of seq_len + 1 tokens, as x [n, seq_len + 1] int64.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from archlab.platform.config import ArchlabConfig
from archlab.platform.shards import DataError, dataset_id, load_manifest, read_shard_meta, split_files

log = logging.getLogger("archlab")

# The seed protocol (seed 001, ../shared/data/README.md): 5 context vectors -> the 6th.
# Validation keeps it at every data.context so that figures stay comparable.
SEED_CONTEXT = 5


def seed_context(context: int) -> int:
    """Context vectors of the seed-protocol validation windows for a data.context: 5, or
    data.context itself when it is shorter (as before longer contexts existed)."""
    return min(int(context), SEED_CONTEXT)


def valid_window_lengths(cfg: ArchlabConfig) -> dict[str, int]:
    """Validation window sets -> window length. Token: {"valid": seq_len + 1}. Vector:
    {"valid": seed_context + 1} and, only when data.context > SEED_CONTEXT,
    {"valid_ctx": context + 1} (at context <= 5 the two would be the same windows, so
    val_cosine_ctx and baseline.<name>.cosine_ctx are not produced there)."""
    if cfg.train.task != "vector":
        return {"valid": cfg.data.seq_len + 1}
    out = {"valid": seed_context(cfg.data.context) + 1}
    if cfg.data.context > SEED_CONTEXT:
        out["valid_ctx"] = cfg.data.context + 1
    return out


@dataclass
class DatasetInfo:
    root: str
    kind: str  # "vector" | "token"
    dataset_id: str
    name: str
    dim: int | None
    vocab_size: int | None
    separator: int
    files: dict[str, list[str]]  # split -> shard paths
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    tokens_per_byte: float = 1.0  # for bits-per-byte of non-byte tokenizers


def inspect_dataset(cfg: ArchlabConfig) -> DatasetInfo:
    """Refuse a dataset that cannot feed this config, naming the file and field.

    Runs on the driver before any Ray worker starts. Row-level checks (NaN, zero vectors,
    short documents, token ids out of range) run through archlab.platform.validate."""
    root = Path(cfg.data.path)
    manifest = load_manifest(root)
    task = cfg.train.task
    if manifest.get("kind") != task:
        raise DataError(
            f"{root / 'manifest.json'}: kind expected {task!r} (train.task), found {manifest.get('kind')!r}"
        )
    files = {s: split_files(root, manifest, s) for s in (cfg.data.train_split, cfg.data.valid_split)}
    for split, paths in files.items():
        if not paths:
            raise DataError(f"{root / 'manifest.json'}: split {split!r} lists no shards")
        for p in paths:
            try:
                meta = read_shard_meta(p)  # unreadable / truncated / foreign files name themselves
            except DataError:
                if cfg.data.on_bad_rows == "skip":
                    continue  # the validator counts it and leaves it out of the stream
                raise
            if meta.kind != task:
                raise DataError(f"{p}: kind expected {task!r}, found {meta.kind!r}")
            if task == "vector" and meta.dim != manifest.get("dim"):
                raise DataError(f"{p}: dim expected {manifest.get('dim')} (manifest), found {meta.dim}")
            if task == "token" and meta.vocab_size != manifest.get("vocab_size"):
                raise DataError(
                    f"{p}: vocab_size expected {manifest.get('vocab_size')} (manifest), found {meta.vocab_size}"
                )
    dim, vocab = manifest.get("dim"), manifest.get("vocab_size")
    first = files[cfg.data.train_split][0]
    if task == "vector" and cfg.data.dim is not None and dim != cfg.data.dim:
        raise DataError(f"{first}: vector dim expected {cfg.data.dim} (config data.dim), found {dim}")
    if task == "token" and cfg.data.vocab_size is not None and vocab != cfg.data.vocab_size:
        raise DataError(
            f"{first}: vocab_size expected {cfg.data.vocab_size} (config data.vocab_size), found {vocab}"
        )
    separator = cfg.data.separator
    if separator is None:
        separator = int(manifest.get("separator_id", 0) or 0)
    if task == "token" and not (0 <= separator < (vocab or 0)):
        raise DataError(f"data.separator={separator}: expected a token id in [0, {vocab})")
    readable = _validate_rows(cfg, root, dim, vocab)
    if cfg.data.on_bad_rows == "skip":
        # skip also means: stream only the shards the validator could read
        files = {s: [p for p in paths if str(Path(p).resolve()) in readable[s]] for s, paths in files.items()}
        for split, paths in files.items():
            if not paths:
                raise DataError(f"{root}: split {split!r} has no readable shard left to train on")
    return DatasetInfo(
        root=str(root),
        kind=task,
        dataset_id=dataset_id(manifest),
        name=manifest.get("name", root.name),
        dim=dim,
        vocab_size=vocab,
        separator=separator,
        files=files,
        manifest=manifest,
        # bits-per-byte is measured on the validation split: use that split's ratio
        tokens_per_byte=float((manifest.get("tokens_per_byte_by_split") or {}).get(cfg.data.valid_split)
                              or manifest.get("tokens_per_byte", 1.0) or 1.0),
    )


def _validate_rows(cfg: ArchlabConfig, root: Path, dim, vocab) -> dict[str, set[str]]:
    """Row-level checks (archlab.platform.validate); returns the readable shards per split."""
    from archlab.platform.validate import validate_dataset

    # a vector document is bad if it cannot give one seed-protocol window; a shorter one than
    # data.context + 1 still counts in the seed protocol and gives no full-context window
    min_len = seed_context(cfg.data.context) + 1 if cfg.train.task == "vector" else 1
    readable = {}
    for split in (cfg.data.train_split, cfg.data.valid_split):
        report = validate_dataset(
            root, split=split, kind=cfg.train.task, dim=dim, vocab_size=vocab,
            min_len=min_len, on_bad_rows=cfg.data.on_bad_rows,
        )
        if report.rows_bad or report.bad_files:
            log.warning("%s/%s: skipping %d bad rows (%s) and %d unreadable files",
                        root, split, report.rows_bad, report.skipped, len(report.bad_files))
        readable[split] = {str(Path(f).resolve()) for f in report.files}
    return readable


# ---- window cutting (runs inside Ray Data tasks; pure numpy so it is testable alone) ----


def _doc_vectors(table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """pyarrow table with `vectors` -> (flat [N, dim] float32, offsets [docs + 1])."""
    col = table.column("vectors").combine_chunks()
    offsets = col.offsets.to_numpy()
    flat = col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    # sliced list arrays keep absolute offsets into the child array
    return flat.astype(np.float32, copy=False), offsets


def vector_windows(table, *, dim: int, length: int, stride: int = 1, row_mask=None) -> dict[str, np.ndarray]:
    """Every window of `length` consecutive vectors inside one document -> x [n, length, dim]."""
    flat, offsets = _doc_vectors(table, dim)
    starts = []
    for i in range(len(offsets) - 1):
        if row_mask is not None and not row_mask[i]:
            continue
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b - a >= length:
            starts.append(np.arange(a, b - length + 1, stride))
    if not starts:
        return {"x": np.zeros((0, length, dim), np.float32)}
    s = np.concatenate(starts)
    idx = s[:, None] + np.arange(length)[None, :]  # (n, length)
    return {"x": flat[idx]}  # (n, length, dim)


def token_windows(table, *, length: int, separator: int, row_mask=None) -> dict[str, np.ndarray]:
    """Pack the batch's documents (separator between them) and cut runs of `length` tokens."""
    col = table.column("tokens").combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    pieces = []
    for i in range(len(offsets) - 1):
        if row_mask is not None and not row_mask[i]:
            continue
        pieces.append(values[offsets[i]: offsets[i + 1]])
        pieces.append(np.array([separator], np.int64))
    if not pieces:
        return {"x": np.zeros((0, length), np.int64)}
    stream = np.concatenate(pieces)
    n = len(stream) // length  # the batch's tail (< length tokens) is dropped
    return {"x": stream[: n * length].reshape(n, length)}


def _row_mask(table, cfg_dict: dict, info_dim, info_vocab):
    """Rows to keep under on_bad_rows=skip (None = keep all, the validator already passed)."""
    if cfg_dict["data"]["on_bad_rows"] != "skip":
        return None
    from archlab.platform.validate import check_rows

    kind = cfg_dict["train"]["task"]
    col = "vectors" if kind == "vector" else "tokens"
    arr = table.column(col).combine_chunks()
    if kind == "vector":
        flat, offsets = _doc_vectors(table, info_dim)
        rows = np.empty(len(offsets) - 1, dtype=object)
        for i in range(len(rows)):
            rows[i] = flat[offsets[i]: offsets[i + 1]]
    else:
        rows = np.empty(len(arr), dtype=object)
        for i, r in enumerate(arr.to_numpy(zero_copy_only=False)):
            rows[i] = np.asarray(r)
    min_len = seed_context(cfg_dict["data"]["context"]) + 1 if kind == "vector" else 1
    return check_rows({col: rows}, kind=kind, dim=info_dim, vocab_size=info_vocab, min_len=min_len)


class WindowCutter:
    """Callable for map_batches(batch_format="pyarrow"). `length`: the vector window length
    (default data.context + 1; validation passes valid_window_lengths' values)."""

    def __init__(self, cfg_dict: dict, dim: int | None, vocab: int | None, separator: int, stride: int,
                 length: int | None = None):
        self.cfg = cfg_dict
        self.dim, self.vocab, self.sep, self.stride = dim, vocab, separator, stride
        self.length = length

    def __call__(self, table):
        mask = _row_mask(table, self.cfg, self.dim, self.vocab)
        if self.cfg["train"]["task"] == "vector":
            length = self.length or self.cfg["data"]["context"] + 1
            return vector_windows(table, dim=self.dim, length=length, stride=self.stride, row_mask=mask)
        length = self.cfg["data"]["seq_len"] + 1
        return token_windows(table, length=length, separator=self.sep, row_mask=mask)


CUT_DOCS = 64  # documents per cutting batch: a token batch packs this many documents


def cut_windows(files: list[str], cutter, column: str, limit: int = 0) -> list[np.ndarray]:
    """The windows of `files`, cut on the driver with pyarrow, CUT_DOCS documents at a time
    (the grouping the streamed train split's map_batches uses), in file order: one array
    per batch, stopping once `limit` (0 = all) windows are cut. `cutter(table)` -> {"x":
    windows}: a WindowCutter, or vector_windows / token_windows with their arguments bound."""
    import pyarrow.parquet as pq

    parts, n = [], 0
    for f in files:
        table = pq.read_table(f, columns=[column])
        for start in range(0, table.num_rows, CUT_DOCS):
            x = cutter(table.slice(start, CUT_DOCS))["x"]
            if len(x):
                parts.append(x)
                n += len(x)
            if limit and n >= limit:
                return parts
    return parts


def _in_object_store(parts: list[np.ndarray], limit: int = 0):
    """A materialised Ray dataset with column "x", one block per part, put from the driver:
    no read or cut task has to start (on 2 cores each Ray Data stage took 10-40 s to
    schedule before its first row, whatever the size)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    if limit:
        kept, n = [], 0
        for x in parts:
            kept.append(x[: limit - n])
            n += len(kept[-1])
            if n >= limit:
                break
        parts = kept
    return ray.data.from_arrow([pa.table({"x": ArrowTensorArray.from_numpy(x)}) for x in parts])


def make_ray_datasets(cfg: ArchlabConfig, info: DatasetInfo) -> dict[str, Any]:
    """{"train": windows, "valid": seed-protocol windows, and for a vector data.context > 5
    "valid_ctx": full-context windows} (valid_window_lengths).

    Validation windows, and train windows up to data.cache_train_mb, are cut once per job
    on the driver (`cut_windows`) and put in Ray's object store, so every trial and epoch
    iterates those blocks and the driver's baselines see exactly the windows the workers
    evaluate. Larger train splits stream from the files each epoch (read -> cut tasks)."""
    import ray.data

    cfg_dict = cfg.to_dict()
    col = "vectors" if info.kind == "vector" else "tokens"

    def cutter(stride: int, length: int | None = None) -> WindowCutter:
        return WindowCutter(cfg_dict, info.dim, info.vocab_size, info.separator, stride, length)

    train_files = info.files[cfg.data.train_split]
    if caches_train(cfg, info):
        log.info("train windows (~%.0f MiB) cached in the object store (data.cache_train_mb=%d)",
                 train_windows_bytes(cfg, info) / 2**20, cfg.data.cache_train_mb)
        train = _in_object_store(cut_windows(train_files, cutter(cfg.data.stride), col))
    else:
        train = ray.data.read_parquet(train_files).select_columns([col]).map_batches(
            cutter(cfg.data.stride), batch_format="pyarrow", batch_size=CUT_DOCS)
    # block order shuffled per execution (each epoch), then a bounded local shuffle per worker
    train = train.randomize_block_order(seed=cfg.train.seed)
    out = {"train": train}
    for name, length in valid_window_lengths(cfg).items():
        limit = cfg.data.max_valid_windows
        parts = cut_windows(info.files[cfg.data.valid_split], cutter(1, length), col, limit)
        if not parts:
            raise DataError(f"{info.root}: split {cfg.data.valid_split!r} yields no windows of {length} items"
                            + (" (data.context + 1)" if name == "valid_ctx" else ""))
        out[name] = _in_object_store(parts, limit)
    return out


def train_windows_bytes(cfg: ArchlabConfig, info: DatasetInfo) -> int:
    """Estimated size of the train split's windows, from the manifest's item counts:
    vector windows of context + 1 float32 vectors at the given stride, or token windows of
    seq_len + 1 int64 tokens packed without overlap."""
    items = sum(int(s.get("items", 0)) for s in info.manifest.get("splits", {}).get(cfg.data.train_split, []))
    if info.kind == "vector":
        return items // cfg.data.stride * (cfg.data.context + 1) * int(info.dim or 0) * 4
    return items * 8 * (cfg.data.seq_len + 1) // cfg.data.seq_len


def train_window_count(cfg: ArchlabConfig, info: DatasetInfo) -> int:
    """Train windows per epoch, from the manifest's document (rows) and item counts, for
    planning the LR schedule (trainer.planned_steps). Vector, stride 1: exact (a document
    of n >= context + 1 vectors gives n - context windows; shorter ones are refused or
    skipped by validation, so with on_bad_rows=skip it is an upper bound). Other strides:
    (items - docs x context) / stride. Token: (items + docs separators) / (seq_len + 1),
    an upper bound by at most one window per packed batch of 64 documents."""
    shards = info.manifest.get("splits", {}).get(cfg.data.train_split, [])
    items = sum(int(s.get("items", 0)) for s in shards)
    docs = sum(int(s.get("rows", 0)) for s in shards)
    if info.kind == "vector" and cfg.data.context > SEED_CONTEXT:
        # validation only asks a document for seed_context + 1 vectors, so some may be
        # shorter than context + 1 (they give no train window): count from the lengths
        lengths = _doc_lengths(info.files[cfg.data.train_split])
        return int(sum(max(0, n - cfg.data.context - 1) // cfg.data.stride + (n > cfg.data.context)
                       for n in lengths))
    if info.kind == "vector":
        return max(0, items - docs * cfg.data.context) // cfg.data.stride
    return (items + docs) // (cfg.data.seq_len + 1)


def _doc_lengths(files: list[str]) -> list[int]:
    """Vectors per document of vector shards (reads the list offsets of the column)."""
    import pyarrow.parquet as pq

    out: list[int] = []
    for f in files:
        offsets = pq.read_table(f, columns=["vectors"]).column("vectors").combine_chunks().offsets.to_numpy()
        out.extend(int(n) for n in np.diff(offsets))
    return out


def caches_train(cfg: ArchlabConfig, info: DatasetInfo) -> bool:
    """Whether make_ray_datasets reads the train windows once per job (under
    data.cache_train_mb) rather than streaming them from the files every epoch."""
    return bool(cfg.data.cache_train_mb) and train_windows_bytes(cfg, info) <= cfg.data.cache_train_mb * 2**20


def read_vector_docs(files: list[str], dim: int) -> list[np.ndarray]:
    """Plain pyarrow read of vector shards -> one [n_i, dim] array per document (driver side,
    for baselines and the champion comparison)."""
    import pyarrow.parquet as pq

    docs: list[np.ndarray] = []
    for f in files:
        table = pq.read_table(f, columns=["vectors"])
        flat, offsets = _doc_vectors(table, dim)
        docs.extend(flat[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1))
    return docs


def materialized_windows(ds) -> np.ndarray:
    """All windows of a (materialised) Ray dataset as one array, on the driver: baselines
    and the champion comparison use exactly the windows the workers evaluate."""
    parts = [b["x"] for b in ds.iter_batches(batch_format="numpy", batch_size=4096)]
    return np.concatenate(parts) if parts else np.zeros((0,))
