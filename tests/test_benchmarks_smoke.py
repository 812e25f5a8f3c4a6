"""The kernel benchmark scripts run end to end (tiny sizes): a BENCHMARKS.md command that
no longer runs would otherwise go unnoticed until someone re-measures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from archlab.kernels.scan.cpu_scan import find_compiler
from tests.conftest import needs_cc

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| op ") and not line.startswith("| size ")]


@pytest.mark.parametrize("malloc", ["default", "keep"])
def test_kernels_benchmark_smoke(malloc):
    out = run_script("benchmarks/kernels.py", "--smoke", "--malloc", malloc)
    rows = table_rows(out)
    ops = {r[0] for r in rows}
    assert ops == {"scan", "ssd", "retention"}, out
    for r in rows:  # speed-up column is reference / fast, a positive ratio
        assert r[-1].endswith("x") and float(r[-1][:-1]) > 0, r
    assert ("keeps freed memory" in out) == (malloc == "keep"), out.splitlines()[0]
    fast = {r[4] for r in rows if r[0] == "scan"}
    assert {"torch", "one_pass"} <= fast and (("cpu" in fast) == (find_compiler() is not None)), fast


@needs_cc
def test_scan_walk_benchmark_smoke():
    rows = table_rows(run_script("benchmarks/scan_walk.py", "--smoke"))
    assert [(r[1], r[2]) for r in rows] == [("fwd", "cold"), ("fwd", "warm"), ("bwd", "cold"), ("bwd", "warm")]
    for r in rows:
        assert float(r[3]) > 0 and float(r[4]) > 0, r


def test_overhead_benchmark_plain_loop_smoke():
    # the Ray modes run the platform (minutes); the plain-loop mode checks the script and
    # the Trainer over in-memory windows cut by the platform's own functions
    out = run_script("benchmarks/overhead.py", "--quick", "--modes", "plain")
    rows = [r for r in table_rows(out) if r[0] == "amn"]
    assert len(rows) == 1 and rows[0][1].split()[0].replace(",", "").isdigit(), out
    assert float(rows[0][1].split()[0].replace(",", "")) > 0, out


def test_precision_benchmark_smoke():
    # fp32 and bf16 only: compile's first compilation (~30 s) is tested in test_trainer.py
    out = run_script("benchmarks/precision_compile.py", "--quick", "--modes", "fp32,bf16")
    rows = [r for r in table_rows(out) if r[0] == "amn"]
    assert len(rows) == 1, out
    assert float(rows[0][1].replace(",", "")) > 0 and float(rows[0][2].replace(",", "")) > 0, out
    assert rows[0][3].endswith("x"), out  # bf16 / fp32
