"""Validation before training: each bad-input case on real data gives its message (file,
row, doc_id, column, expected, found), `skip` counts exactly what was injected, and the
streaming's row checker agrees with the validator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archlab.platform.prepare import parquet_to_token_shards, parquet_to_vector_shards
from archlab.platform.shards import DataError, build_manifest, load_manifest, read_shard_meta, write_shard
from archlab.platform.validate import check_rows, validate_dataset

D = 384


@pytest.fixture()
def clean(tmp_path, shared_data):
    """10 real articles of the shared vector set as canonical shards, 5 rows per file."""
    src = shared_data / "wikitext2-minilm384" / "valid.parquet"
    paths = parquet_to_vector_shards(src, tmp_path, split="valid", id_col="article_id", vectors_col="embeddings",
                                     texts_col="chunks_detok", max_docs=10, rows_per_shard=5)
    return tmp_path, paths, pq.read_table(src).slice(0, 10)


def _rows(path) -> tuple[list[str], list[np.ndarray]]:
    t = pq.read_table(path)
    vecs = [np.array(r.values.flatten(), dtype=np.float32).reshape(-1, D) for r in t.column("vectors").combine_chunks()]
    return t.column("doc_id").to_pylist(), vecs


def _rewrite(path, ids, vecs):
    """Write rows back as the same shard (as a user's own bad data would arrive)."""
    lengths = np.array([len(v) for v in vecs])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([v.reshape(-1, D) for v in vecs]).ravel() if lengths.sum() else np.zeros(0, np.float32)
    col = pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(flat), D))
    schema = pa.schema([("doc_id", pa.string()), ("vectors", pa.list_(pa.list_(pa.float32(), D)))])
    write_shard(path, pa.Table.from_arrays([pa.array(ids), col], schema=schema), read_shard_meta(path))


@pytest.fixture()
def corrupted(clean):
    root, paths, _ = clean
    ids0, v0 = _rows(paths[0])
    v0[0] = v0[0][:3]  # short: 3 vectors < context + 1 = 6
    v0[4] = np.zeros((0, D), np.float32)  # empty document
    _rewrite(paths[0], ids0, v0)
    ids1, v1 = _rows(paths[1])
    v1[1][3, 17] = np.nan
    v1[2][0, 0] = np.inf
    v1[3][7] = 0.0
    _rewrite(paths[1], ids1, v1)
    build_manifest(root)  # the data is bad, but the manifest describes it faithfully
    return root, paths, (ids0, v0), (ids1, v1)


def test_clean_real_split_passes(clean):
    root, paths, ref = clean
    rep = validate_dataset(root, split="valid", kind="vector", dim=D, min_len=6)
    assert rep.files == [str(p) for p in paths]
    assert (rep.rows_total, rep.rows_bad, rep.skipped, rep.issues) == (10, 0, {}, [])
    assert rep.items_total == sum(ref.column("n_chunks").to_pylist())
    assert rep.dataset_id == load_manifest(root)["content_hash"][:16]


def test_bad_rows_error_names_file_row_column(corrupted):
    root, paths, (ids0, _), _ = corrupted
    with pytest.raises(DataError) as e:
        validate_dataset(root, split="valid", kind="vector", dim=D, min_len=6)
    msg = str(e.value)
    assert f"2 bad row(s) in {paths[0]} (empty_doc=1, short_doc=1)" in msg
    assert f"{paths[0]}: row 0 (doc_id {ids0[0]!r}), column 'vectors': expected at least 6 items (context + 1), found 3" in msg
    assert f"{paths[0]}: row 4 (doc_id {ids0[4]!r}), column 'vectors': expected a non-empty document, found 0 vectors" in msg
    assert "--on-bad-rows=skip" in msg


def test_bad_rows_skip_counts_exactly(corrupted):
    root, paths, _, (ids1, _) = corrupted
    rep = validate_dataset(root, split="valid", kind="vector", dim=D, min_len=6, on_bad_rows="skip")
    assert rep.skipped == {"short_doc": 1, "empty_doc": 1, "nonfinite_vector": 2, "zero_vector": 1}
    assert (rep.rows_total, rep.rows_bad, len(rep.files)) == (10, 5, 2)
    p = paths[1]
    assert f"{p}: row 1 (doc_id {ids1[1]!r}), column 'vectors'[3]: expected finite values, found NaN" in rep.issues
    assert f"{p}: row 2 (doc_id {ids1[2]!r}), column 'vectors'[0]: expected finite values, found inf" in rep.issues
    assert f"{p}: row 3 (doc_id {ids1[3]!r}), column 'vectors'[7]: expected a non-zero vector, found all zeros" in rep.issues
    # min_len=1 no longer counts the 3-vector document as bad
    assert validate_dataset(root, split="valid", kind="vector", min_len=1, on_bad_rows="skip").rows_bad == 4


def test_check_rows_agrees_with_validator(corrupted):
    _, _, (_, v0), (_, v1) = corrupted
    for vecs, bad in ((v0, {0, 4}), (v1, {1, 2, 3})):
        batch = {"vectors": np.empty(len(vecs), dtype=object)}
        for i, v in enumerate(vecs):
            batch["vectors"][i] = v
        ok = check_rows(batch, kind="vector", dim=D, vocab_size=None, min_len=6)
        assert ok.dtype == bool and set(np.nonzero(~ok)[0]) == bad
    uniform = {"vectors": np.stack([v[:6] for v in v1[:3]])}  # (3, 6, D) when Ray makes it uniform
    assert check_rows(uniform, kind="vector", dim=D, vocab_size=None, min_len=6).tolist() == [True, False, False]
    wrong_dim = {"vectors": np.empty(1, dtype=object)}
    wrong_dim["vectors"][0] = np.ones((8, 768), np.float32)
    assert check_rows(wrong_dim, kind="vector", dim=D, vocab_size=None, min_len=6).tolist() == [False]


def _token_root(tmp_path, rows):
    src = tmp_path / "foreign_tokens.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(rows))], "ids": pa.array(rows, pa.list_(pa.int32()))}), src)
    parquet_to_token_shards(src, tmp_path / "ds", split="train", tokens_col="ids", id_col="id", vocab_size=300,
                            tokenizer="external")
    return tmp_path / "ds"


def test_token_ids_out_of_range_and_empty(tmp_path):
    rows = [list(range(10)), [1, 2, 3, 4, 5, 350, 7], [], [299, 0, 1]]
    root = _token_root(tmp_path, rows)
    path = root / "train" / "part-00000.parquet"
    assert pq.read_schema(path).field("tokens").type == pa.list_(pa.uint16())
    with pytest.raises(DataError, match=r"row 1 \(doc_id 'd1'\), column 'tokens'\[5\]: expected a token id in \[0, 300\), found 350"):
        validate_dataset(root, split="train", kind="token", vocab_size=300)
    rep = validate_dataset(root, split="train", kind="token", vocab_size=300, min_len=4, on_bad_rows="skip")
    assert rep.skipped == {"token_out_of_range": 1, "empty_doc": 1, "short_doc": 1}
    assert f"{path}: row 2 (doc_id 'd2'), column 'tokens': expected a non-empty document, found 0 tokens" in rep.issues
    batch = {"tokens": np.empty(len(rows), dtype=object)}
    for i, r in enumerate(rows):
        batch["tokens"][i] = np.array(r, dtype=np.int64)
    assert check_rows(batch, kind="token", dim=None, vocab_size=300, min_len=4).tolist() == [True, False, False, False]
    with pytest.raises(DataError, match=r"vocab_size expected <= 256 \(model config\), found 300"):
        validate_dataset(root, split="train", kind="token", vocab_size=256)


def test_truncated_file(clean):
    root, paths, _ = clean
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(DataError, match=rf"{paths[1]}: unreadable: truncated Parquet file"):
        validate_dataset(root, split="valid", kind="vector", dim=D)
    rep = validate_dataset(root, split="valid", kind="vector", dim=D, on_bad_rows="skip")
    assert rep.files == [str(paths[0])] and rep.bad_files == [str(paths[1])]
    assert rep.skipped == {"unreadable_file": 5} and rep.rows_bad == 5


def test_changed_file_and_missing_file_and_stray_file(clean):
    root, paths, _ = clean
    ids, vecs = _rows(paths[0])
    _rewrite(paths[0], ids[:4], vecs[:4])  # a valid shard, but not the one the manifest hashed
    with pytest.raises(DataError, match=rf"{paths[0]}: rows expected 5 \(manifest\), found 4"):
        validate_dataset(root, split="valid", kind="vector", on_bad_rows="skip")
    _rewrite(paths[0], ids[::-1], vecs[::-1])
    with pytest.raises(DataError, match=r"sha256 expected [0-9a-f]{16}\.\.\. \(manifest\), found [0-9a-f]{16}"):
        validate_dataset(root, split="valid", kind="vector")
    build_manifest(root)
    (root / "valid" / "part-00009.parquet").write_bytes(paths[1].read_bytes())
    rep = validate_dataset(root, split="valid", kind="vector")
    assert rep.rows_total == 10 and any("part-00009.parquet: not in the manifest" in m for m in rep.issues)
    paths[1].unlink()
    with pytest.raises(DataError, match=rf"{paths[1]}: listed in the manifest but missing"):
        validate_dataset(root, split="valid", kind="vector")


def test_config_mismatches(clean, tmp_path_factory):
    root, _, _ = clean
    with pytest.raises(DataError, match=r"dim expected 768 \(model config d_in\), found 384"):
        validate_dataset(root, split="valid", kind="vector", dim=768)
    with pytest.raises(DataError, match=r"kind expected 'token' \(the task\), found 'vector'"):
        validate_dataset(root, split="valid", kind="token")
    with pytest.raises(DataError, match=r"no split 'test'; splits: valid"):
        validate_dataset(root, split="test", kind="vector")
    with pytest.raises(DataError, match=r"no manifest"):
        validate_dataset(tmp_path_factory.mktemp("empty"), split="valid", kind="vector")
    # a shard whose footer disagrees with the manifest (someone swapped a file in)
    p = root / "valid" / "part-00000.parquet"
    meta = read_shard_meta(p)
    write_shard(p, pq.read_table(p), dataclasses.replace(meta, dim=385))
    with pytest.raises(DataError, match=r"metadata kind/dim/vocab expected \('vector', 384, None\), found \('vector', 385, None\)"):
        validate_dataset(root, split="valid", kind="vector")


@pytest.mark.slow
def test_mlflow_dataset_digest_is_dataset_id(clean, tmp_path):
    import mlflow

    from archlab.platform.validate import mlflow_dataset

    root, _, _ = clean
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            mlflow.log_input(mlflow_dataset(root), context="valid")
        got = mlflow.get_run(run.info.run_id).inputs.dataset_inputs[0]
    finally:
        mlflow.set_tracking_uri(None)
    assert got.dataset.digest == load_manifest(root)["content_hash"][:16]
    assert got.dataset.name == root.name and got.tags[0].value == "valid"
