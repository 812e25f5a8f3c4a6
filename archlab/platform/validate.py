"""Validation of a dataset split before training, on the driver, and the row checker the
streaming uses to drop bad rows under `--on-bad-rows=skip`.

Two kinds of problem, treated differently:
- dataset problems: no manifest, a split or file the manifest names is missing, a file
  whose sha256 or row count differs from the manifest (the dataset id would be a lie),
  shard metadata whose kind/dim/vocab disagrees with the manifest or the model config.
  These always raise `DataError`: they are fixed by re-running prepare or `data manifest`,
  not by dropping rows. The one exception is an unreadable (truncated, corrupt) shard under
  `skip`: it is left out of `report.files` and its manifest rows are counted as skipped.
- bad rows: NaN/inf or zero vectors, empty documents, documents shorter than `min_len`
  (context + 1), token ids outside [0, vocab_size), null rows. Under `error` the first
  file with bad rows raises with its first few rows; under `skip` they are counted in
  `report.skipped` and the streaming drops them with `check_rows`.

Every message names the file, row, doc_id, column, what was expected and what was found.
The checks are vectorised over whole columns (numpy on the Arrow buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from archlab.platform.shards import (
    DataError,
    dataset_id,
    file_sha256,
    load_manifest,
    read_shard_meta,
    split_files,
    unreadable,
)

MAX_ISSUES = 20  # messages kept in the report; counts are always complete
REASONS = ("null_row", "nonfinite_vector", "zero_vector", "wrong_dim", "empty_doc", "short_doc",
           "token_out_of_range", "unreadable_file")


@dataclass
class ValidationReport:
    root: str
    split: str
    kind: str
    files: list[str] = field(default_factory=list)  # readable shards: what the streaming reads
    rows_total: int = 0
    rows_bad: int = 0  # distinct bad rows (a row may count under several reasons in `skipped`)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (under skip)
    issues: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    dataset_id: str = ""
    items_total: int = 0  # vectors or tokens in the readable shards

    def summary(self) -> str:
        head = (f"{self.root} [{self.split}] {self.kind}: {len(self.files)} file(s), {self.rows_total} rows, "
                f"{self.items_total} {'vectors' if self.kind == 'vector' else 'tokens'}, {self.rows_bad} bad rows")
        if self.skipped:
            head += " (skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) + ")"
        return "\n".join([head] + [f"  {m}" for m in self.issues])


# --------------------------------------------------------------- row flags
def _rows_with(flag_items: np.ndarray, row_of_item: np.ndarray, n_rows: int) -> np.ndarray:
    """Row mask: rows holding at least one flagged item."""
    out = np.zeros(n_rows, dtype=bool)
    out[row_of_item[flag_items]] = True
    return out


def _vector_flags(mat: np.ndarray, lengths: np.ndarray, min_len: int, null_items=None) -> tuple[dict, dict]:
    """mat (N_vectors, D) of all rows' vectors back to back; lengths (rows,).
    Returns (reason -> row mask, reason -> item mask) for the per-vector reasons."""
    n = len(lengths)
    row_of = np.repeat(np.arange(n), lengths)
    nonfinite = ~np.isfinite(mat).all(axis=1) if mat.size else np.zeros(len(mat), bool)
    if null_items is not None:
        nonfinite |= null_items
    zero = ~nonfinite & ~np.any(mat != 0, axis=1) if mat.size else np.zeros(len(mat), bool)
    rows = {
        "nonfinite_vector": _rows_with(nonfinite, row_of, n),
        "zero_vector": _rows_with(zero, row_of, n),
        "empty_doc": lengths == 0,
        "short_doc": (lengths > 0) & (lengths < min_len),
    }
    return rows, {"nonfinite_vector": nonfinite, "zero_vector": zero}


def _token_flags(ids: np.ndarray, lengths: np.ndarray, vocab_size: int | None, min_len: int) -> tuple[dict, dict]:
    n = len(lengths)
    row_of = np.repeat(np.arange(n), lengths)
    oor = (ids < 0) | (ids >= vocab_size) if vocab_size is not None else np.zeros(len(ids), bool)
    rows = {
        "token_out_of_range": _rows_with(oor, row_of, n),
        "empty_doc": lengths == 0,
        "short_doc": (lengths > 0) & (lengths < min_len),
    }
    return rows, {"token_out_of_range": oor}


def check_rows(batch: dict, *, kind: str, dim: int | None, vocab_size: int | None, min_len: int) -> np.ndarray:
    """True for each row of a Ray Data numpy batch that is fit to train on.

    batch["vectors"]: object array of (n_i, dim) arrays (or one (rows, n, dim) array when
    Ray made it uniform); batch["tokens"]: object array of 1-D int arrays (or (rows, n))."""
    col = batch["vectors" if kind == "vector" else "tokens"]
    rows = [np.asarray(r) if r is not None else None for r in col]
    n = len(rows)
    null = np.array([r is None for r in rows], dtype=bool)
    lengths = np.array([0 if r is None else len(r) for r in rows], dtype=np.int64)
    ok = ~null
    if kind == "vector":
        wrong = np.array([r is not None and len(r) > 0 and (r.ndim != 2 or (dim is not None and r.shape[1] != dim))
                          for r in rows], dtype=bool)
        ok &= ~wrong
        good = [r for r, w in zip(rows, wrong) if r is not None and not w and len(r)]
        d = good[0].shape[1] if good else (dim or 0)
        mat = np.concatenate(good).astype(np.float32, copy=False) if good else np.zeros((0, d), np.float32)
        lens = np.where(null | wrong, 0, lengths)
        # Rows dropped from `mat` (null / wrong dim) carry length 0 here so row_of lines up.
        flags, _ = _vector_flags(mat, lens, min_len)
        flags["empty_doc"] &= ~(null | wrong)
    elif kind == "token":
        flat = np.concatenate([r.astype(np.int64) for r in rows if r is not None]) if n - null.sum() else np.zeros(0, np.int64)
        flags, _ = _token_flags(flat, np.where(null, 0, lengths), vocab_size, min_len)
        flags["empty_doc"] &= ~null
    else:
        raise DataError(f"check_rows kind: expected 'vector' or 'token', found {kind!r}")
    for mask in flags.values():
        ok &= ~mask
    return ok


# ------------------------------------------------------------- per file
def _describe(reason: str, path, r: int, doc_id, col: str, item: int | None, lengths, min_len, vocab, found) -> str:
    where = f"{path}: row {r} (doc_id {doc_id!r}), column {col!r}"
    if reason == "nonfinite_vector":
        return f"{where}[{item}]: expected finite values, found {found}"
    if reason == "zero_vector":
        return f"{where}[{item}]: expected a non-zero vector, found all zeros"
    if reason == "token_out_of_range":
        return f"{where}[{item}]: expected a token id in [0, {vocab}), found {found}"
    if reason == "empty_doc":
        return f"{where}: expected a non-empty document, found 0 {'vectors' if col == 'vectors' else 'tokens'}"
    if reason == "short_doc":
        return f"{where}: expected at least {min_len} items (context + 1), found {lengths[r]}"
    if reason == "null_row":
        return f"{where}: expected a list, found null"
    return f"{where}: {reason}"


def _check_file(path: str, kind: str, dim, vocab, min_len: int, limit: int):
    """(n_rows, n_items, reason -> row mask, messages) for one readable shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = "vectors" if kind == "vector" else "tokens"
    try:
        table = pq.read_table(path, columns=["doc_id", col])
    except Exception as e:  # a footer that reads but pages that do not (truncated inside)
        raise unreadable(path, e, "; re-run `archlab data prepare`") from None
    arr = table.column(col).combine_chunks()
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, bool)
    lengths = np.asarray(arr.value_lengths().fill_null(0), dtype=np.int64)
    child = arr.flatten()  # skips the (empty) children of null rows, like lengths above
    if kind == "vector":
        if not pa.types.is_fixed_size_list(child.type) or child.type.list_size != dim:
            raise DataError(f"{path}: column 'vectors' expected list<fixed_size_list<float32, {dim}>>, found {arr.type}")
        # .values of the fixed-size child keeps null slots' storage, so rows stay aligned.
        vals = child.values.slice(child.offset * dim, len(child) * dim)
        mat = vals.to_numpy(zero_copy_only=False).reshape(-1, dim)  # (N_vectors, D); nulls -> NaN
        inull = child.is_null().to_numpy(zero_copy_only=False) if child.null_count else None
        flags, item_flags = _vector_flags(mat, lengths, min_len, inull)
        values = mat
    else:
        values = child.to_numpy(zero_copy_only=False).astype(np.int64)
        flags, item_flags = _token_flags(values, lengths, vocab, min_len)
    flags["empty_doc"] &= ~null
    flags["null_row"] = null
    msgs: list[str] = []
    starts = np.cumsum(lengths) - lengths
    ids = None
    for reason in REASONS:
        rows = np.nonzero(flags.get(reason, np.zeros(0, bool)))[0]
        for r in rows[: max(0, limit - len(msgs))]:
            ids = ids if ids is not None else table.column("doc_id").to_pylist()
            item = found = None
            if reason in item_flags:
                j = int(np.nonzero(item_flags[reason][starts[r]:starts[r] + lengths[r]])[0][0])
                item, v = j, values[starts[r] + j]
                found = (int(v) if kind == "token" else
                         ("NaN" if np.isnan(v).any() else "inf") if not np.isfinite(v).all() else None)
            msgs.append(_describe(reason, path, int(r), ids[r], col, item, lengths, min_len, vocab, found))
    return n, int(lengths.sum()), flags, msgs


# ----------------------------------------------------------- the dataset
def validate_dataset(root, *, split: str, kind: str, dim: int | None = None, vocab_size: int | None = None,
                     min_len: int = 1, on_bad_rows: str = "error") -> ValidationReport:
    """Check one split of a dataset folder against the model config (see module docstring)."""
    if on_bad_rows not in ("error", "skip"):
        raise DataError(f"--on-bad-rows: expected error|skip, found {on_bad_rows!r}")
    if kind not in ("vector", "token"):
        raise DataError(f"task kind: expected vector|token, found {kind!r}")
    root = Path(root)
    manifest = load_manifest(root)
    mpath = root / "manifest.json"
    if manifest.get("kind") != kind:
        raise DataError(f"{mpath}: kind expected {kind!r} (the task), found {manifest.get('kind')!r}")
    if kind == "vector" and dim is not None and manifest.get("dim") != dim:
        raise DataError(f"{mpath}: dim expected {dim} (model config d_in), found {manifest.get('dim')}")
    if kind == "token" and vocab_size is not None and (manifest.get("vocab_size") or 0) > vocab_size:
        raise DataError(f"{mpath}: vocab_size expected <= {vocab_size} (model config), found {manifest.get('vocab_size')}")
    files = split_files(root, manifest, split)
    rep = ValidationReport(root=str(root), split=split, kind=kind, dataset_id=dataset_id(manifest))
    check_dim = manifest.get("dim") if kind == "vector" else None
    check_vocab = manifest.get("vocab_size") if kind == "token" else None
    listed = set()
    for path, entry in zip(files, manifest["splits"][split]):
        listed.add(Path(path).resolve())
        try:
            if not Path(path).exists():
                raise DataError(f"{path}: listed in the manifest but missing; re-run `archlab data prepare`")
            meta = read_shard_meta(path)  # truncated footer -> DataError naming the file
            n, items, flags, msgs = _check_file(path, kind, check_dim, check_vocab, min_len, MAX_ISSUES - len(rep.issues))
        except DataError as e:
            if on_bad_rows == "skip" and ("unreadable" in str(e) or "missing" in str(e)):
                rep.bad_files.append(path)
                rep.skipped["unreadable_file"] = rep.skipped.get("unreadable_file", 0) + int(entry["rows"])
                rep.rows_bad += int(entry["rows"])
                rep.rows_total += int(entry["rows"])
                rep.issues.append(str(e))
                continue
            raise
        got = (meta.kind, meta.dim, meta.vocab_size)
        want = (manifest["kind"], manifest.get("dim"), manifest.get("vocab_size"))
        if got != want:
            raise DataError(f"{path}: metadata kind/dim/vocab expected {want}, found {got}")
        if n != entry["rows"]:
            raise DataError(f"{path}: rows expected {entry['rows']} (manifest), found {n}")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise DataError(
                f"{path}: sha256 expected {entry['sha256'][:16]}... (manifest), found {digest[:16]}...; the file changed "
                "after the manifest was written: re-run `archlab data prepare`, or `archlab data manifest` if intended"
            )
        bad = np.zeros(n, dtype=bool)
        for reason, mask in flags.items():
            if mask.any():
                rep.skipped[reason] = rep.skipped.get(reason, 0) + int(mask.sum())
                bad |= mask
        rep.rows_total += n
        rep.items_total += items
        rep.rows_bad += int(bad.sum())
        rep.issues.extend(msgs)
        rep.files.append(path)
        if bad.any() and on_bad_rows == "error":
            raise DataError(
                f"{int(bad.sum())} bad row(s) in {path} ("
                + ", ".join(f"{k}={int(v.sum())}" for k, v in flags.items() if v.any())
                + "); first:\n  " + "\n  ".join(msgs[:5])
                + "\nfix the data or pass --on-bad-rows=skip to train without these rows"
            )
    for stray in sorted((root / split).glob("*.parquet")):
        if stray.resolve() not in listed:
            rep.issues.append(f"{stray}: not in the manifest (ignored); `archlab data manifest {root}` adds it")
    if on_bad_rows == "error":
        rep.skipped = {}  # nothing was skipped: an error would have been raised
    return rep


def mlflow_dataset(root):
    """An MLflow dataset for `mlflow.log_input(ds, context=split)`: its digest is the
    dataset id (the manifest's content hash), its source the dataset folder or URI, so a
    run and a registered model version point at the exact data they were trained on."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    manifest = load_manifest(root)
    with warnings.catch_warnings():
        # A local path matches two equivalent source classes; MLflow warns and picks one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(root).resolve()))
    return MetaDataset(source, name=manifest.get("name", Path(root).name), digest=dataset_id(manifest))
