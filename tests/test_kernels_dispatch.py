"""Kernel dispatch: availability is cheap and honest, unavailable paths fail by name,
`auto` picks the fastest runnable path and says so once."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
import torch

from archlab.kernels import KernelUnavailableError, available_paths, resolve_kernel
from archlab.kernels._dispatch import _logged
from archlab.kernels.retention import retention
from archlab.kernels.scan import linear_scan
from archlab.kernels.ssd import ssd

CPU = torch.device("cpu")


def test_available_paths_imports_no_optional_package():
    code = ("import sys, archlab.kernels as k\n"
            "print([k.available_paths(op) for op in ('scan', 'ssd', 'retention')])\n"
            "bad = [m for m in ('triton', 'mamba_ssm', 'fla') if m in sys.modules]\n"
            "assert not bad, f'imported {bad}'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_reference_and_torch_always_available():
    for op in ("scan", "ssd", "retention"):
        paths = available_paths(op, "cpu")
        assert "torch" in paths and "reference" in paths, (op, paths)
        assert paths[-1] == "reference", f"{op}: reference must be the last (slowest) choice: {paths}"


def test_unknown_op_and_kernel_are_refused():
    with pytest.raises(ValueError, match=r"unknown op 'conv'"):
        available_paths("conv")
    with pytest.raises(ValueError, match=r"kernel='cuda' is not a kernel name"):
        resolve_kernel("scan", "cuda", CPU)
    with pytest.raises(KernelUnavailableError, match=r"op 'scan' has no 'fla' path"):
        linear_scan(torch.rand(1, 2, 3), torch.rand(1, 2, 3), kernel="fla")


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if importlib.util.find_spec("triton") is None:
        match = r"package 'triton'"
    else:
        match = r"TRITON_INTERPRET=1"
    with pytest.raises(KernelUnavailableError, match=match):
        linear_scan(torch.rand(1, 2, 3), torch.rand(1, 2, 3), kernel="triton")


def test_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fla" else real(name, *a))
    q = torch.rand(1, 1, 3, 2)
    with pytest.raises(KernelUnavailableError, match=r"package 'flash-linear-attention' \(import 'fla'\)"):
        retention(q, q, q, torch.tensor([0.5]), kernel="fla")


def test_auto_on_cpu_picks_fused_scan_or_torch_and_logs_once(caplog, monkeypatch):
    # even with the interpreter on, auto must not pick the (exact but slow) Triton interpreter;
    # the scan takes the fused C path where a C compiler exists, torch otherwise
    from archlab.kernels.scan.cpu_scan import find_compiler

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _logged.clear()
    scan_path = "cpu" if find_compiler() else "torch"
    with caplog.at_level(logging.INFO, logger="archlab.kernels"):
        for _ in range(3):
            assert resolve_kernel("scan", "auto", CPU) == scan_path
            assert resolve_kernel("ssd", "auto", CPU) == "torch"
            assert resolve_kernel("retention", "auto", CPU) == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "archlab.kernels"]
    assert len(lines) == 3, lines
    assert any(f"scan on cpu uses the '{scan_path}' path" in m for m in lines), lines


def test_auto_results_equal_explicit_torch():
    x = torch.randn(1, 9, 2, 3)
    dt, A = torch.rand(1, 9, 2), -torch.rand(2)
    Bm = Cm = torch.randn(1, 9, 2, 4)
    assert torch.equal(ssd(x, dt, A, Bm, Cm, chunk_size=4)[0],
                       ssd(x, dt, A, Bm, Cm, chunk_size=4, kernel="torch")[0])
