"""`archlab data prepare`: make canonical shards (see shards.py) from other sources.

This module starts with the foreign-Parquet source (a user's own Parquet with named
columns), which is how the shipped sample under data/ was made.
"""

from __future__ import annotations

from pathlib import Path

from archlab.platform.shards import DataError, ShardMeta, vector_schema, write_shard


def parquet_to_vector_shards(
    src: str | Path,
    out_dir: str | Path,
    *,
    split: str,
    id_col: str,
    vectors_col: str,
    texts_col: str | None = None,
    max_docs: int | None = None,
    rows_per_shard: int = 10_000,
    embedder: str | None = None,
) -> list[Path]:
    """Convert a foreign Parquet file (one row per document, a list-of-vectors column)
    into canonical vector shards under `<out_dir>/<split>/`. Returns the shard paths."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: no such file")
    schema = pq.read_schema(src)
    for role, col in (("--id-col", id_col), ("--vectors-col", vectors_col), ("--texts-col", texts_col)):
        if col is not None and col not in schema.names:
            raise DataError(f"{src}: column {col!r} ({role}) not found; columns: {', '.join(schema.names)}")
    vtype = schema.field(vectors_col).type
    if not (pa.types.is_list(vtype) and pa.types.is_fixed_size_list(vtype.value_type)):
        raise DataError(
            f"{src}: column {vectors_col!r} expected list<fixed_size_list<float, D>>, found {vtype}"
        )
    dim = vtype.value_type.list_size
    cols = [id_col, vectors_col] + ([texts_col] if texts_col else [])
    table = pq.read_table(src, columns=cols)
    if max_docs is not None:
        table = table.slice(0, max_docs)
    flat = table.column(vectors_col).combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    norms = np.linalg.norm(flat.reshape(-1, dim), axis=1)
    normalized = bool(np.allclose(norms, 1.0, atol=1e-3))
    meta = ShardMeta(
        kind="vector",
        dim=dim,
        normalized=normalized,
        embedder=embedder or (schema.metadata or {}).get(b"model", b"").decode() or None,
        extra={"source": src.name},
    )
    out_schema = vector_schema(dim, with_texts=texts_col is not None)
    paths = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        part = table.slice(start, rows_per_shard)
        arrays = [
            part.column(id_col).cast(pa.string()),
            part.column(vectors_col).cast(out_schema.field("vectors").type),
        ]
        if texts_col:
            arrays.append(part.column(texts_col).cast(pa.list_(pa.string())))
        path = Path(out_dir) / split / f"part-{i:05d}.parquet"
        write_shard(path, pa.Table.from_arrays(arrays, schema=out_schema), meta)
        paths.append(path)
    return paths
