"""`archlab data ...` commands (the Typer sub-app) on the real shared data, and the tokenizers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from archlab.platform.data_cli import app
from archlab.platform.prepare import split_documents
from archlab.platform.shards import load_manifest
from archlab.platform.tokenizers import SEP_ID, ByteTokenizer, load_tokenizer, train_bpe

runner = CliRunner()


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def test_help_stays_light():
    code = ("import sys; from archlab.platform.data_cli import app; "
            "from typer.testing import CliRunner; r = CliRunner().invoke(app, ['prepare', '--help']); "
            "assert r.exit_code == 0 and '--on-bad-rows' not in r.output and '--vectors-col' in r.output, r.output; "
            "print(sorted(m for m in ('ray', 'torch', 'pyarrow', 'sentence_transformers', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prepare_text_smoke_then_validate_manifest_inspect(tmp_path, shared_data):
    txt = shared_data / "wikitext2-text" / "valid.txt"
    out = tmp_path / "bytes"
    code, text = _run("prepare", txt, "--out", out, "--from", "text", "--kind", "token", "--docs", "wikitext",
                      "--split", "valid", "--smoke-test")
    assert code == 0, text
    docs = split_documents(txt.read_text(encoding="utf-8"), "wikitext")[:3]
    n_bytes = sum(len(d.encode()) for d in docs)
    assert f"3 rows, {n_bytes} tokens, 0 bad rows" in text
    m = load_manifest(out)
    assert f"dataset id {m['content_hash'][:16]}" in text
    code, text = _run("validate", out, "--split", "valid", "--vocab-size", "256")
    assert code == 0 and f"dataset id {m['content_hash'][:16]}" in text
    code, text = _run("manifest", out)
    assert code == 0 and f"valid: 1 shard(s), 3 rows, {n_bytes} items" in text
    assert load_manifest(out)["content_hash"] == m["content_hash"]  # rebuilt from the same shards
    code, text = _run("inspect", out)
    assert code == 0 and '"tokenizer": "byte"' in text and '"separator_id": 0' in text
    code, text = _run("inspect", out / "valid" / "part-00000.parquet")
    assert code == 0 and "- valid:1: " in text and "starts ' = Frank <unk> = " in text


def test_prepare_parquet_sources_and_bad_row_policy(tmp_path, shared_data):
    out = tmp_path / "vec"
    code, text = _run("prepare", shared_data / "wikitext2-minilm384" / "valid.parquet", "--out", out,
                      "--from", "parquet", "--kind", "vector", "--id-col", "article_id", "--vectors-col", "embeddings",
                      "--texts-col", "chunks_detok", "--split", "valid", "--max-docs", "8")
    assert code == 0, text
    ref = pq.read_table(shared_data / "wikitext2-minilm384" / "valid.parquet").slice(0, 8)
    assert f"8 rows, {sum(ref.column('n_chunks').to_pylist())} vectors" in text
    shortest = min(ref.column("n_chunks").to_pylist())
    code, text = _run("validate", out, "--split", "valid", "--dim", "384", "--min-len", shortest + 1)
    assert code == 1 and "error: 1 bad row(s)" in text and f"found {shortest}" in text
    code, text = _run("validate", out, "--split", "valid", "--min-len", shortest + 1, "--on-bad-rows", "skip")
    assert code == 0 and "1 bad rows (skipped: short_doc=1)" in text
    code, text = _run("validate", out, "--split", "valid", "--dim", "768")
    assert code == 1 and "dim expected 768 (model config d_in), found 384" in text
    code, text = _run("prepare", shared_data / "wikitext2-minilm384" / "valid.parquet", "--out", out,
                      "--from", "parquet", "--kind", "vector")
    assert code == 1 and "--id-col and --vectors-col are required" in text
    code, text = _run("prepare", shared_data / "wikitext2-bytes" / "valid.parquet", "--out", tmp_path / "tok",
                      "--from", "parquet", "--kind", "token", "--tokens-col", "bytes", "--length-col", "n_valid",
                      "--docs", "wikitext", "--split", "valid")
    assert code == 0 and "60 rows, 1121681 tokens, 0 bad rows" in text


def test_prepare_skip_docs_from_the_command_line(tmp_path, shared_data):
    txt = shared_data / "wikitext2-text" / "valid.txt"
    out = tmp_path / "split"
    base = ("prepare", txt, "--out", out, "--from", "text", "--kind", "token", "--docs", "wikitext")
    code, text = _run(*base, "--split", "train", "--max-docs", "58")
    assert code == 0, text
    code, held = _run(*base, "--split", "valid", "--skip-docs", "58")
    assert code == 0, held
    docs = split_documents(txt.read_text(encoding="utf-8"), "wikitext")
    assert f"58 rows, {sum(len(d.encode()) for d in docs[:58])} tokens, 0 bad rows" in text
    assert f"[valid] token: 1 file(s), 2 rows, {sum(len(d.encode()) for d in docs[58:])} tokens, 0 bad rows" in held
    code, text = _run(*base, "--split", "valid", "--skip-docs", "-1")
    assert code == 1 and "error: --skip-docs: expected an integer >= 0, found -1" in text
    code, text = _run(*base, "--split", "valid", "--skip-docs", "60")
    assert code == 1 and f"error: {txt}: --skip-docs 60 leaves no documents: found 60 document(s)" in text
    code, text = _run("prepare", "--help")
    assert code == 0 and "--skip-docs" in text


# ------------------------------------------------------------- tokenizers
def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    s = "Homarus gammarus — 60 cm (24 in) ü"
    ids = tok.encode(s)
    assert ids.dtype == np.uint8 and ids.tolist() == list(s.encode("utf-8"))
    assert tok.decode(ids) == s and tok.vocab_size == 256 and SEP_ID not in ids


def test_bpe_train_save_load(tmp_path, shared_data):
    lines = (shared_data / "wikitext2-text" / "valid.txt").read_text(encoding="utf-8").split("\n")[:2000]
    tok = train_bpe(lines, 512, tmp_path / "tokenizer.json")
    assert tok.vocab_size == 512 and tok.sep_id == 0
    again = load_tokenizer("bpe:tokenizer.json", tmp_path)
    for line in lines[:200]:
        ids = again.encode(line)
        assert again.decode(ids) == line  # byte-level: exact, no unknown tokens
        assert (ids != SEP_ID).all()
    assert again.encode("Ω never seen ∑").size > 0 and again.decode(again.encode("Ω never seen ∑")) == "Ω never seen ∑"
    with pytest.raises(Exception, match="expected 'byte' or 'bpe:<file>', found 'sentencepiece'"):
        load_tokenizer("sentencepiece")
