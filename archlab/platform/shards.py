"""The canonical shard schema, shard metadata and the dataset manifest.

A dataset is a folder:

    <dataset>/manifest.json            kind, dim or vocab, per-split shards, content hash
    <dataset>/<split>/part-00000.parquet ...

Shards hold one row per document:
- vector: `doc_id` string, `vectors` list<fixed_size_list<float32, D>>, optional `texts` list<string>
- token:  `doc_id` string, `tokens` list<int32> (uint8 / uint16 where the vocab allows)
The schema's facts live in each file's key-value metadata under b"archlab", so a mismatch
is refused from the footer alone, on the driver, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
META_KEY = b"archlab"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad data: the message names the file, row/column or field, expected and found."""


@dataclass
class ShardMeta:
    kind: str  # "vector" | "token"
    schema_version: int = SCHEMA_VERSION
    dim: int | None = None  # vector
    normalized: bool | None = None  # vector
    embedder: str | None = None  # vector
    vocab_size: int | None = None  # token
    tokenizer: str | None = None  # token
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def vector_schema(dim: int, with_texts: bool = False):
    import pyarrow as pa

    fields = [
        pa.field("doc_id", pa.string()),
        pa.field("vectors", pa.list_(pa.list_(pa.float32(), dim))),
    ]
    if with_texts:
        fields.append(pa.field("texts", pa.list_(pa.string())))
    return pa.schema(fields)


def token_dtype(vocab_size: int):
    import pyarrow as pa

    if vocab_size <= 256:
        return pa.uint8()
    if vocab_size <= 65536:
        return pa.uint16()
    return pa.int32()


def token_schema(vocab_size: int):
    import pyarrow as pa

    return pa.schema([pa.field("doc_id", pa.string()), pa.field("tokens", pa.list_(token_dtype(vocab_size)))])


def write_shard(path: str | os.PathLike, table, meta: ShardMeta) -> None:
    """Write atomically: a crash mid-write leaves no half shard under the final name."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: meta.to_bytes()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with these 4 bytes


def unreadable_reason(path: str | os.PathLike, error: BaseException | None = None) -> str:
    """What is wrong with a file that should be Parquet, in a few words: permission denied,
    empty, not Parquet (what it starts with), truncated (no footer), or corrupt (the
    reader's own first line). Reads at most the first and last 4 bytes."""
    path = Path(path)
    if isinstance(error, PermissionError):
        return "permission denied (cannot open it for reading)"
    if path.is_dir():
        return "a folder, not a file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except PermissionError:
        return "permission denied (cannot open it for reading)"
    except OSError as e:
        return f"cannot read it ({type(e).__name__}: {e.strerror or e})"
    if size == 0:
        return "empty file (0 bytes)"
    if head != PARQUET_MAGIC:
        return f"not a Parquet file (starts with {head!r}, a Parquet file starts with {PARQUET_MAGIC!r})"
    if size < 12 or tail != PARQUET_MAGIC:
        return f"truncated Parquet file ({size} bytes, the footer is missing: it does not end with {PARQUET_MAGIC!r})"
    detail = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else "unknown"
    return f"corrupt Parquet file ({type(error).__name__ if error else 'error'}: {detail})"


def unreadable(path: str | os.PathLike, error: BaseException | None = None, hint: str = "") -> DataError:
    """The one-line DataError for a file that cannot be read as Parquet ("unreadable" is the
    word validate's on_bad_rows=skip looks for)."""
    return DataError(f"{path}: unreadable: {unreadable_reason(path, error)}{hint}")


def read_shard_meta(path: str | os.PathLike) -> ShardMeta:
    """The archlab metadata of one shard, read from the Parquet footer only."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        md = pq.read_schema(path).metadata or {}
    except Exception as e:  # permission denied / empty / truncated / not parquet
        raise unreadable(path, e) from None
    if META_KEY not in md:
        raise DataError(
            f"{path}: not an archlab shard (no 'archlab' key in the Parquet metadata); "
            "convert it with `archlab data prepare --from parquet ...`"
        )
    raw = json.loads(md[META_KEY])
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version expected {SCHEMA_VERSION}, found {raw.get('schema_version')}"
        )
    return ShardMeta(**raw)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(root: str | os.PathLike, name: str | None = None, extra: dict | None = None) -> dict:
    """Scan `<root>/<split>/*.parquet`, check the shards agree, write manifest.json.

    The content hash (sha256 over every shard's relative path and sha256) is the dataset
    id that MLflow runs and registry versions refer to."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(root)
    splits: dict[str, list[dict]] = {}
    first: ShardMeta | None = None
    hasher = hashlib.sha256()
    for shard in sorted(root.glob("*/*.parquet")):
        meta = read_shard_meta(shard)
        if first is None:
            first = meta
        elif (meta.kind, meta.dim, meta.vocab_size) != (first.kind, first.dim, first.vocab_size):
            raise DataError(
                f"{shard}: kind/dim/vocab {meta.kind}/{meta.dim}/{meta.vocab_size} differs from "
                f"the dataset's {first.kind}/{first.dim}/{first.vocab_size}"
            )
        pf = pq.ParquetFile(shard)
        col = "vectors" if meta.kind == "vector" else "tokens"
        n_items = int(pc.sum(pf.read(columns=[col]).column(col).combine_chunks().value_lengths()).as_py() or 0)
        rel = shard.relative_to(root).as_posix()
        digest = file_sha256(shard)
        hasher.update(f"{rel}\0{digest}\n".encode())
        splits.setdefault(shard.parent.name, []).append(
            {"file": rel, "rows": pf.metadata.num_rows, "items": n_items, "sha256": digest}
        )
    if first is None:
        raise DataError(f"{root}: no shards found under <split>/*.parquet")
    manifest = {
        "name": name or root.name,
        "schema_version": SCHEMA_VERSION,
        "kind": first.kind,
        "dim": first.dim,
        "vocab_size": first.vocab_size,
        "normalized": first.normalized,
        "embedder": first.embedder,
        "tokenizer": first.tokenizer,
        "splits": splits,
        "content_hash": hasher.hexdigest(),
        **(extra or {}),
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def load_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise DataError(f"{root}: data path does not exist")
    if not path.exists():
        raise DataError(f"{path}: no manifest; make the dataset with `archlab data prepare` or `archlab data manifest {root}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt manifest ({e})") from None
    except PermissionError:
        raise DataError(f"{path}: unreadable: permission denied (cannot open it for reading)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None


def dataset_id(manifest: dict) -> str:
    """Short, stable id of a dataset's content (first 16 hex digits of its content hash)."""
    return manifest["content_hash"][:16]


def split_files(root: str | os.PathLike, manifest: dict, split: str) -> list[str]:
    root = Path(root)
    if split not in manifest["splits"]:
        raise DataError(
            f"{root / MANIFEST}: no split {split!r}; splits: {', '.join(manifest['splits'])}"
        )
    return [str(root / s["file"]) for s in manifest["splits"][split]]
