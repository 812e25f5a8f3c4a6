"""`archlab data ...`: prepare, validate, manifest, inspect.

Mounted by archlab/cli.py as `app.add_typer(data_cli.app, name="data")`. Heavy imports
(pyarrow, ray, torch, sentence-transformers) happen inside the commands, so `--help`
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Prepare, validate and inspect datasets (canonical Parquet shards + manifest).",
                  no_args_is_help=True)

SMOKE_DOCS = 3  # --smoke-test: documents per split, enough to exercise every stage


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def prepare(
    src: Path = typer.Argument(..., help="Input: a UTF-8 text file (--from text) or a Parquet file (--from parquet)."),
    out: Path = typer.Option(..., "--out", help="Dataset folder; the split goes to <out>/<split>/."),
    source: str = typer.Option("text", "--from", help="text | parquet"),
    kind: str = typer.Option("token", "--kind", help="vector | token"),
    split: str = typer.Option("train", "--split"),
    tokenizer: str = typer.Option("byte", "--tokenizer", help="byte | bpe (text -> tokens)"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="BPE vocab (default 4096); byte is 256."),
    model: str = typer.Option("sentence-transformers/all-MiniLM-L6-v2", "--model",
                              help="Embedder name or local folder (text -> vectors)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Chunks per embedder batch."),
    num_actors: int = typer.Option(1, "--num-actors", help="Embedder actors in the Ray Data pool."),
    docs: Optional[str] = typer.Option(None, "--docs",
                                       help="Document cut: paragraph|line|file|wikitext|regex:<p> (text), row|wikitext|regex:<p> (parquet tokens)."),
    id_col: Optional[str] = typer.Option(None, "--id-col"),
    vectors_col: Optional[str] = typer.Option(None, "--vectors-col"),
    texts_col: Optional[str] = typer.Option(None, "--texts-col"),
    tokens_col: Optional[str] = typer.Option(None, "--tokens-col"),
    length_col: Optional[str] = typer.Option(None, "--length-col", help="Valid ids per row (rest is padding)."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Keep at most N documents (after --skip-docs)."),
    skip_docs: int = typer.Option(0, "--skip-docs",
                                  help="Leave out the first N documents of the cut: the split is documents "
                                       "[N, N + max-docs). E.g. train --max-docs 54, valid --skip-docs 54 "
                                       "from one file."),
    rows_per_shard: int = typer.Option(10_000, "--rows-per-shard"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the split is up to date."),
    smoke_test: bool = typer.Option(False, "--smoke-test", help=f"Only {SMOKE_DOCS} documents."),
) -> None:
    """Make canonical shards of one split, rebuild the manifest, report the dataset id."""
    from archlab.platform import prepare as P
    from archlab.platform.shards import DataError, dataset_id, load_manifest
    from archlab.platform.validate import validate_dataset

    if smoke_test:
        max_docs = min(max_docs or SMOKE_DOCS, SMOKE_DOCS)
    try:
        if source == "text" and kind == "token":
            paths = P.text_to_token_shards(src, out, split=split, tokenizer=tokenizer, vocab_size=vocab_size,
                                           docs=docs or "paragraph", max_docs=max_docs,
                                           skip_docs=skip_docs, rows_per_shard=rows_per_shard, force=force)
        elif source == "text" and kind == "vector":
            paths = P.text_to_vector_shards(src, out, split=split, model=model, batch_size=batch_size,
                                            num_actors=num_actors, docs=docs or "paragraph", max_docs=max_docs,
                                            skip_docs=skip_docs, rows_per_shard=rows_per_shard, force=force)
        elif source == "parquet" and kind == "vector":
            if not id_col or not vectors_col:
                raise DataError("--from parquet --kind vector: --id-col and --vectors-col are required")
            paths = P.parquet_to_vector_shards(src, out, split=split, id_col=id_col, vectors_col=vectors_col,
                                               texts_col=texts_col, max_docs=max_docs, skip_docs=skip_docs,
                                               rows_per_shard=rows_per_shard, force=force)
        elif source == "parquet" and kind == "token":
            if not tokens_col:
                raise DataError("--from parquet --kind token: --tokens-col is required")
            paths = P.parquet_to_token_shards(src, out, split=split, tokens_col=tokens_col, id_col=id_col,
                                              length_col=length_col, docs=docs or "row",
                                              vocab_size=vocab_size or 256, tokenizer=tokenizer,
                                              max_docs=max_docs, skip_docs=skip_docs,
                                              rows_per_shard=rows_per_shard, force=force)
        else:
            raise DataError(f"--from/--kind: expected text|parquet and vector|token, found {source!r}/{kind!r}")
        manifest = load_manifest(out)
        # Count (not refuse) bad rows here: training applies the user's policy later.
        report = validate_dataset(out, split=split, kind=kind, on_bad_rows="skip")
    except DataError as e:
        _fail(e)
    typer.echo(f"wrote {len(paths)} shard(s) to {out / split}")
    typer.echo(report.summary())
    typer.echo(f"dataset id {dataset_id(manifest)}")


@app.command()
def validate(
    root: Path = typer.Argument(..., help="Dataset folder (with manifest.json)."),
    split: str = typer.Option("train", "--split"),
    kind: Optional[str] = typer.Option(None, "--kind", help="vector | token (default: the manifest's)."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Model input dim to check against."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Model vocab to check against."),
    min_len: int = typer.Option(1, "--min-len", help="Shortest usable document (context + 1)."),
    on_bad_rows: str = typer.Option("error", "--on-bad-rows", help="error | skip"),
) -> None:
    """Check a split the way training does before any worker starts."""
    from archlab.platform.shards import DataError, load_manifest
    from archlab.platform.validate import validate_dataset

    try:
        kind = kind or load_manifest(root).get("kind")
        report = validate_dataset(root, split=split, kind=kind, dim=dim, vocab_size=vocab_size,
                                  min_len=min_len, on_bad_rows=on_bad_rows)
    except DataError as e:
        _fail(e)
    typer.echo(report.summary())
    typer.echo(f"dataset id {report.dataset_id}")


@app.command()
def manifest(
    root: Path = typer.Argument(..., help="Dataset folder: <root>/<split>/*.parquet"),
    name: Optional[str] = typer.Option(None, "--name"),
) -> None:
    """Rebuild manifest.json (shards, rows, items, sha256, content hash) from the shards."""
    from archlab.platform.prepare import manifest_extra
    from archlab.platform.shards import DataError, build_manifest, dataset_id

    try:
        m = build_manifest(root, name=name, extra=manifest_extra(root))
    except DataError as e:
        _fail(e)
    for split, entries in m["splits"].items():
        typer.echo(f"{split}: {len(entries)} shard(s), {sum(e['rows'] for e in entries)} rows, "
                   f"{sum(e['items'] for e in entries)} items")
    typer.echo(f"dataset id {dataset_id(m)}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A dataset folder or one shard file."),
    rows: int = typer.Option(2, "--rows", help="Rows to show from a shard."),
) -> None:
    """Show a dataset's manifest, or a shard's metadata, schema and first rows."""
    import dataclasses

    import pyarrow.parquet as pq

    from archlab.platform.shards import DataError, dataset_id, load_manifest, read_shard_meta

    try:
        if path.is_dir():
            m = load_manifest(path)
            facts = {k: v for k, v in m.items() if k not in ("splits", "content_hash")}
            typer.echo(json.dumps(facts, indent=2))
            for split, entries in m["splits"].items():
                typer.echo(f"{split}: {len(entries)} shard(s), {sum(e['rows'] for e in entries)} rows, "
                           f"{sum(e['items'] for e in entries)} items")
            typer.echo(f"dataset id {dataset_id(m)}")
            return
        meta = read_shard_meta(path)
        pf = pq.ParquetFile(path)
        typer.echo(json.dumps(dataclasses.asdict(meta), indent=2))
        typer.echo(f"rows {pf.metadata.num_rows}\n{pf.schema_arrow.remove_metadata()}")
        head = pf.read_row_group(0).slice(0, rows).to_pylist() if pf.metadata.num_row_groups else []
        tok = None
        if meta.kind == "token" and meta.tokenizer:
            from archlab.platform.tokenizers import load_tokenizer

            tok = load_tokenizer(meta.tokenizer, path.parent.parent)
        for r in head:
            if "vectors" in r:
                first = r.get("texts", [""])[0] if r.get("texts") else ""
                typer.echo(f"- {r['doc_id']}: {len(r['vectors'])} vectors; first text: {first[:80]!r}")
            else:
                text = tok.decode(r["tokens"][:200]) if tok else r["tokens"][:20]
                typer.echo(f"- {r['doc_id']}: {len(r['tokens'])} tokens; starts {text!r}")
    except DataError as e:
        _fail(e)
