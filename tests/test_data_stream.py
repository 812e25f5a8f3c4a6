"""Training input: windows cut on the fly, token packing, driver-side refusals."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from archlab.platform.config import load_config
from archlab.platform.data import inspect_dataset, token_windows, vector_windows
from archlab.platform.shards import DataError, ShardMeta, build_manifest, token_schema, write_shard


def _docs(sample_dataset):
    t = pq.read_table(sample_dataset / "valid" / "part-00000.parquet", columns=["vectors"])
    return t, [np.asarray(d, dtype=np.float32) for d in t.column("vectors").to_pylist()]


def test_vector_windows_are_every_run_inside_each_document(sample_dataset):
    table, docs = _docs(sample_dataset)
    for length, stride in ((6, 1), (4, 3)):
        x = vector_windows(table, dim=384, length=length, stride=stride)["x"]
        expected = [d[s: s + length] for d in docs for s in range(0, len(d) - length + 1, stride)]
        assert x.shape == (len(expected), length, 384)
        np.testing.assert_array_equal(x, np.stack(expected))
    # a slice of the table (as Ray Data hands batches over) keeps document boundaries
    part = vector_windows(table.slice(5, 3), dim=384, length=6)["x"]
    expected = [d[s: s + 6] for d in docs[5:8] for s in range(len(d) - 5)]
    np.testing.assert_array_equal(part, np.stack(expected))


def test_token_windows_pack_documents_with_separator():
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    table = pa.table({"tokens": pa.array(docs, type=pa.list_(pa.uint8()))})
    x = token_windows(table, length=4, separator=0)["x"]
    # stream: 1 2 3 0 4 5 0 0 6 7 8 9 0 -> three windows of 4, the tail "0" is dropped
    np.testing.assert_array_equal(x, [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    mask = np.array([True, False, True, True])
    x = token_windows(table, length=3, separator=9, row_mask=mask)["x"]
    np.testing.assert_array_equal(x, [[1, 2, 3], [9, 9, 6], [7, 8, 9]])


def _copy_sample(sample_dataset, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(sample_dataset, dst)
    return dst


def test_inspect_accepts_the_sample_and_returns_its_facts(sample_dataset):
    info = inspect_dataset(load_config(None, [f"data.path={sample_dataset}"]))
    assert (info.kind, info.dim, info.dataset_id) == ("vector", 384, "2e576f95bab2c034")


def test_missing_path_and_wrong_task_are_refused(sample_dataset, tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data path does not exist"):
        inspect_dataset(load_config(None, [f"data.path={tmp_path / 'nowhere'}"]))
    with pytest.raises(DataError, match=r"manifest\.json: kind expected 'token' \(train\.task\), found 'vector'"):
        inspect_dataset(load_config(None, [f"data.path={sample_dataset}", "train.task=token"]))


def test_dim_mismatch_names_file_field_expected_found(sample_dataset):
    with pytest.raises(DataError, match=r"train/part-00000\.parquet: vector dim expected 768 \(config data\.dim\), found 384"):
        inspect_dataset(load_config(None, [f"data.path={sample_dataset}", "data.dim=768"]))


def test_shard_disagreeing_with_manifest_is_refused(sample_dataset, tmp_path):
    ds = _copy_sample(sample_dataset, tmp_path)
    m = json.loads((ds / "manifest.json").read_text())
    m["dim"] = 768  # e.g. a manifest from another embedder
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"part-00000\.parquet: dim expected 768 \(manifest\), found 384"):
        inspect_dataset(load_config(None, [f"data.path={ds}"]))


def test_truncated_and_foreign_shards_name_the_file(sample_dataset, tmp_path):
    ds = _copy_sample(sample_dataset, tmp_path)
    shard = ds / "valid" / "part-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: unreadable: truncated Parquet file \(\d+ bytes, the footer is missing"):
        inspect_dataset(load_config(None, [f"data.path={ds}"]))
    pq.write_table(pa.table({"x": [1, 2]}), shard)
    with pytest.raises(DataError, match=r"valid/part-00000\.parquet: not an archlab shard"):
        inspect_dataset(load_config(None, [f"data.path={ds}"]))


def test_token_dataset_vocab_and_separator_checked(tmp_path):
    root = tmp_path / "tok"
    for split in ("train", "valid"):
        table = pa.table({"doc_id": ["a", "b"], "tokens": pa.array([[1, 2, 3] * 50, [4, 5] * 40], type=pa.list_(pa.uint8()))},
                         schema=token_schema(256))
        write_shard(root / split / "part-00000.parquet", table, ShardMeta(kind="token", vocab_size=256, tokenizer="byte"))
    build_manifest(root)
    info = inspect_dataset(load_config(None, [f"data.path={root}", "train.task=token"]))
    assert (info.vocab_size, info.separator) == (256, 0)
    with pytest.raises(DataError, match=r"vocab_size expected 512 \(config data\.vocab_size\), found 256"):
        inspect_dataset(load_config(None, [f"data.path={root}", "train.task=token", "data.vocab_size=512"]))
    with pytest.raises(DataError, match=r"data\.separator=300: expected a token id in \[0, 256\)"):
        inspect_dataset(load_config(None, [f"data.path={root}", "train.task=token", "data.separator=300"]))


@pytest.mark.slow
def test_ray_streaming_matches_numpy_windows_and_splits_equally(ray_local, sample_dataset):
    from archlab.platform.data import make_ray_datasets, materialized_windows

    cfg = load_config(None, [f"data.path={sample_dataset}", "data.max_valid_windows=0"])
    info = inspect_dataset(cfg)
    ds = make_ray_datasets(cfg, info)
    table, docs = _docs(sample_dataset)
    valid = materialized_windows(ds["valid"])
    expected = vector_windows(table, dim=384, length=6)["x"]
    assert valid.shape == expected.shape
    # same windows (Ray may reorder blocks): compare sorted fingerprints
    fp = lambda a: np.sort(a.reshape(len(a), -1) @ np.linspace(1, 2, 6 * 384))  # noqa: E731
    np.testing.assert_allclose(fp(valid), fp(expected), rtol=1e-6)
    # equal per-worker shards: DDP never waits on a worker that ran out of data
    a, b = ds["train"].streaming_split(2, equal=True)
    import threading

    counts = {}

    def consume(name, it):
        counts[name] = sum(len(batch["x"]) for batch in it.iter_batches(batch_size=256))

    threads = [threading.Thread(target=consume, args=(n, it)) for n, it in (("a", a), ("b", b))]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert counts["a"] == counts["b"] > 0


@pytest.mark.slow
def test_small_train_split_is_read_once_and_cached(ray_local, sample_dataset, tmp_path):
    """Under data.cache_train_mb the train windows are cut once per job: trials and epochs
    iterate the cached blocks, so they no longer need the files; above it they stream."""
    from archlab.platform.data import make_ray_datasets, train_windows_bytes

    root = _copy_sample(sample_dataset, tmp_path)
    cfg = load_config(None, [f"data.path={root}", "data.max_valid_windows=64"])
    info = inspect_dataset(cfg)
    size = train_windows_bytes(cfg, info)
    items = sum(s["items"] for s in json.loads((root / "manifest.json").read_text())["splits"]["train"])
    assert size == items * 6 * 384 * 4 >= 6931 * 6 * 384 * 4  # an upper bound: one window per vector
    cached = make_ray_datasets(cfg, info)["train"]
    streamed = make_ray_datasets(load_config(None, [f"data.path={root}", "data.cache_train_mb=0",
                                                    "data.max_valid_windows=64"]), info)["train"]
    assert "ReadFilesParquetV2" in repr(streamed) and "ReadFilesParquetV2" not in repr(cached)
    for f in (root / "train").glob("*.parquet"):
        f.rename(f.with_suffix(".moved"))  # the files are gone: only a cache can still serve windows
    n = sum(len(b["x"]) for b in cached.iter_batches(batch_size=1024))
    assert n == 6931


def test_bad_rows_error_names_the_row_and_skip_drops_it_from_the_windows(sample_dataset, tmp_path):
    from archlab.platform.data import WindowCutter
    from archlab.platform.shards import read_shard_meta

    ds = _copy_sample(sample_dataset, tmp_path)
    shard = ds / "valid" / "part-00000.parquet"
    meta = read_shard_meta(shard)
    table = pq.read_table(shard)
    docs = table.column("vectors").to_pylist()
    docs[2][3][7] = float("nan")
    table = table.set_column(1, "vectors", pa.array(docs, type=table.schema.field("vectors").type))
    write_shard(shard, table, meta)
    build_manifest(ds)
    with pytest.raises(DataError, match=r"part-00000\.parquet.*row 2"):
        inspect_dataset(load_config(None, [f"data.path={ds}"]))
    cfg = load_config(None, [f"data.path={ds}", "data.on_bad_rows=skip"])
    info = inspect_dataset(cfg)
    cut = WindowCutter(cfg.to_dict(), 384, None, 0, 1)
    kept = cut(pq.read_table(shard, columns=["vectors"]))["x"]
    clean = [np.asarray(d, np.float32) for i, d in enumerate(docs) if i != 2]
    assert kept.shape[0] == sum(len(d) - 5 for d in clean) and np.isfinite(kept).all()
    assert info.files["valid"] == [str(shard)]
