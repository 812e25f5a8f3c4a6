"""Unreadable files (truncated, empty, not Parquet, permission denied) are refused with one
line naming the file and what was found, at `data prepare`, `data validate` and train
(inspect_dataset on the driver, before Ray starts)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from archlab.platform.config import load_config
from archlab.platform.data import inspect_dataset
from archlab.platform.data_cli import app as data_app
from archlab.platform.shards import DataError

runner = CliRunner()

REASONS = {
    "truncated": r"unreadable: truncated Parquet file \(\d+ bytes, the footer is missing",
    "empty": r"unreadable: empty file \(0 bytes\)",
    "not_parquet": r"unreadable: not a Parquet file \(starts with b'doc_'",
    "permission": r"unreadable: permission denied",
}


def _make_bad(path: Path, case: str, good: Path, monkeypatch) -> None:
    """Turn `path` into the bad file of `case`. Permission denied is simulated: as root
    chmod 000 does not deny reads, so the readers raise what the OS would (EACCES)."""
    if case == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not_parquet":
        path.write_text("doc_id,vectors\nd0,0.1\n")  # a CSV under a .parquet name
    else:
        shutil.copy(good, path)
        target = str(path.resolve())

        def deny(real):
            def f(src, *a, **k):
                if str(Path(src).resolve()) == target:
                    raise PermissionError(13, "Permission denied", str(src))
                return real(src, *a, **k)
            return f

        monkeypatch.setattr(pq, "read_schema", deny(pq.read_schema))
        monkeypatch.setattr(pq, "read_table", deny(pq.read_table))
        real_read_bytes = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self: deny(lambda p: real_read_bytes(Path(p)))(self))


def _one_line_error(output: str, path: Path, reason: str) -> None:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, output  # one line, no traceback
    assert lines[0].startswith(f"error: {path}: "), output
    assert re.search(reason, lines[0]), output


@pytest.fixture()
def dataset(sample_dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(sample_dataset, ds)
    return ds


@pytest.mark.parametrize("case", sorted(REASONS))
def test_prepare_refuses_an_unreadable_source_in_one_line(case, sample_dataset, tmp_path, monkeypatch):
    src = tmp_path / "src.parquet"
    _make_bad(src, case, sample_dataset / "valid" / "part-00000.parquet", monkeypatch)
    res = runner.invoke(data_app, ["prepare", str(src), "--out", str(tmp_path / "out"), "--from", "parquet",
                                   "--kind", "vector", "--id-col", "doc_id", "--vectors-col", "vectors"])
    assert res.exit_code == 1
    _one_line_error(res.output, src, REASONS[case])
    assert not (tmp_path / "out" / "valid").exists()


@pytest.mark.parametrize("case,reason", [
    ("empty", r"unreadable: empty file \(0 bytes\), expected UTF-8 text"),
    ("parquet", r"unreadable: not UTF-8 text \(byte 0x\w\w at offset \d+; it looks like a Parquet file\)"),
    ("permission", r"unreadable: permission denied"),
])
def test_prepare_from_text_refuses_what_is_not_utf8_text(case, reason, sample_dataset, tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    good = sample_dataset / "valid" / "part-00000.parquet"
    if case == "empty":
        src.write_bytes(b"")
    elif case == "parquet":
        shutil.copy(good, src)  # a Parquet file given as text
    else:
        _make_bad(src, "permission", good, monkeypatch)
    res = runner.invoke(data_app, ["prepare", str(src), "--out", str(tmp_path / "out"), "--from", "text",
                                   "--kind", "token"])
    assert res.exit_code == 1
    _one_line_error(res.output, src, reason)


@pytest.mark.parametrize("case", sorted(REASONS))
def test_validate_refuses_an_unreadable_shard_in_one_line(case, dataset, sample_dataset, monkeypatch):
    shard = dataset / "valid" / "part-00000.parquet"
    _make_bad(shard, case, sample_dataset / "valid" / "part-00000.parquet", monkeypatch)
    res = runner.invoke(data_app, ["validate", str(dataset), "--split", "valid"])
    assert res.exit_code == 1
    _one_line_error(res.output, shard, REASONS[case])


@pytest.mark.parametrize("case", sorted(REASONS))
def test_train_refuses_an_unreadable_shard_on_the_driver(case, dataset, sample_dataset, monkeypatch):
    import ray

    shard = dataset / "train" / "part-00000.parquet"
    _make_bad(shard, case, sample_dataset / "train" / "part-00000.parquet", monkeypatch)
    started = ray.is_initialized()
    with pytest.raises(DataError) as e:
        inspect_dataset(load_config(None, [f"data.path={dataset}"]))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{shard}: ")
    assert re.search(REASONS[case], msg), msg
    assert ray.is_initialized() == started  # refused before any Ray start


def test_archlab_train_prints_one_line_and_starts_no_ray(dataset, sample_dataset, monkeypatch):
    import ray

    from archlab.cli import app

    shard = dataset / "valid" / "part-00000.parquet"
    _make_bad(shard, "truncated", sample_dataset / "valid" / "part-00000.parquet", monkeypatch)
    started = ray.is_initialized()
    res = runner.invoke(app, ["train", "--set", f"data.path={dataset}", "--smoke-test"])
    assert res.exit_code == 2, res.output
    assert f"{shard}: unreadable: truncated Parquet file" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert ray.is_initialized() == started


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: chmod 000 does not deny root reads (the simulated case above covers it)")
def test_a_real_unreadable_permission_is_named(dataset):
    shard = dataset / "valid" / "part-00000.parquet"
    shard.chmod(0)
    try:
        res = runner.invoke(data_app, ["validate", str(dataset), "--split", "valid"])
        assert res.exit_code == 1
        _one_line_error(res.output, shard, REASONS["permission"])
    finally:
        shard.chmod(0o644)
