"""The quiet console: a leaderboard whole at 100 columns, one progress line per running
trial, and the smoke demo's stdout free of Ray's per-rank and raylet output."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from archlab.platform.leaderboard import COLUMNS, render

ENTRIES = ["linear_average", "ewma", "nearest_neighbour", "lstm", "transformer"]


def _board(extra_columns=()):
    cols = ["entry", "kind", *COLUMNS["vector"], *extra_columns, "params", "precision", "run"]
    rows = []
    for i, name in enumerate(ENTRIES):
        model = name in ("lstm", "transformer")
        row = {"entry": name, "kind": "model" if model else "baseline", "val_cosine_seed": 0.5 - 0.1 * i,
               "val_mse_seed": 0.0025 + i * 1e-4, "val_frac_cos_gt_0.5_seed": 0.6 - 0.1 * i, "retrieval_acc": 0.0078}
        if model:
            row.update({"val_cosine": 0.3242, "samples_per_s": 1234.5678, "train_time_s": 14.43,
                        "latency_ms": 0.099, "params": "756096", "precision": "fp32", "run": "trial-a5fb3267"})
            row.update({c: 123456.789 for c in extra_columns})
        rows.append(row)
    return {"rows": rows, "columns": cols, "metric": "val_cosine_seed", "mode": "max", "sweep_id": "demo-1"}


def _rendered(board, width):
    from rich.console import Console

    buf = io.StringIO()
    render(board, console=Console(file=buf, width=width, color_system=None))
    return buf.getvalue()


@pytest.mark.parametrize("extra", [(), ("flops_per_sample", "train_flops", "val_ci95_low")])
def test_leaderboard_is_whole_at_100_columns(extra):
    text = _rendered(_board(extra), 100)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    assert "…" not in text, text  # no cut cell or header, whatever columns the board has
    for name in ENTRIES:
        assert any(line.startswith(name + " ") for line in lines), text
    header = next(line for line in lines if line.startswith("entry"))
    assert "cos_seed" in header and "kind" in header
    assert "cos_seed=val_cosine_seed" in text  # the legend names what was abbreviated
    assert "not shown at 100 columns:" in text and "run" in text.split("not shown at 100 columns:")[1]


def test_leaderboard_shows_every_column_when_wide_enough():
    board = _board()
    text = _rendered(board, 220)
    header = next(line for line in text.splitlines() if line.startswith("entry"))
    for col in ("cos_all", "mse_seed", "retr_acc", "samp/s", "lat_ms", "params", "prec", "run"):
        assert col in header.split(), header
    assert "not shown" not in text
    assert "a5fb3267" in text and "756k" in text and "1,235" in text


def _trial(tid, arch, status="RUNNING"):
    return SimpleNamespace(trial_id=tid, config={"arch": arch}, status=status, error_file=None, local_path="/x")


def test_progress_prints_one_line_per_running_trial():
    from archlab.platform.progress import trial_progress

    out = []
    cb = trial_progress("val_cosine_seed", "max", time_attr="epoch", max_t=4, interval_s=0.0, out=out.append)
    a, b, c = _trial("aaaa1111", "lstm"), _trial("bbbb2222", "transformer"), _trial("cccc3333", "gru", "PENDING")
    for t in (a, b):
        cb.on_trial_start(iteration=0, trials=[a, b, c], trial=t)
    cb.on_trial_result(iteration=1, trials=[a, b, c], trial=a, result={"epoch": 1, "val_cosine_seed": 0.30, "samples_per_s": 443.2})
    cb.on_trial_result(iteration=2, trials=[a, b, c], trial=a, result={"epoch": 2, "val_cosine_seed": 0.25, "samples_per_s": 450.0})
    cb.on_step_end(iteration=2, trials=[a, b, c])
    status, *rows = out
    assert status.startswith("[0:00] trials: 1 PENDING | 2 RUNNING") and "best cos_seed 0.3000 (lstm aaaa1111)" in status
    assert len(rows) == 2  # one per RUNNING trial, none for the pending one
    assert re.search(r"aaaa1111 lstm +RUNNING +epoch 2/4 +\[####----\]  50% best cos_seed 0.3000 450 samples/s", rows[0]), rows
    assert "bbbb2222 transformer" in rows[1] and "epoch 0/4" in rows[1] and "best cos_seed -" in rows[1]
    out.clear()
    a.status = "TERMINATED"
    cb.on_trial_complete(iteration=3, trials=[a, b, c], trial=a)  # before its budget: ASHA stopped it
    assert "aaaa1111 lstm" in out[0] and "STOPPED" in out[0]
    assert all(len(line) <= 100 for line in out + rows + [status])


def test_progress_callback_survives_the_tuner_pickle():
    """Tune pickles the RunConfig (callbacks included) for --resume."""
    import ray.cloudpickle as pickle

    from archlab.platform.progress import trial_progress

    cb = pickle.loads(pickle.dumps(trial_progress("val_loss", "min", "epoch", 2)))
    cb.setup()
    assert cb.metric == "val_loss" and cb.trials == {}


@pytest.mark.slow
def test_smoke_demo_console_is_quiet_and_the_leaderboard_whole(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "COLUMNS": "100"}
    env.pop("RAY_ADDRESS", None)
    archlab = str(Path(sys.executable).parent / "archlab")
    out = subprocess.run([archlab, "demo", "--smoke-test", "--set", f"sweep.storage_path={tmp_path / 'runs'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = out.stdout
    assert "TrainingReport" not in text and "TrainingReport" not in out.stderr, text[-4000:]
    assert "(raylet)" not in text and "PYTHON worker processes" not in text, text[-4000:]
    assert "RayTrainWorker" not in text and "SplitCoordinator" not in text, text[-4000:]
    assert "Trial train_driver_fn" not in text  # no per-trial config/result tables
    # the progress lines: every trial ends with one (DONE or STOPPED by ASHA)
    ends = re.findall(r"^  \w{8} (lstm|transformer) +(DONE|STOPPED) +epoch \d/2 ", text, flags=re.M)
    assert len(ends) == 4, text[-4000:]
    logs = re.search(r"^Ray's worker, raylet, Train and Data logs: (\S+) ", text, flags=re.M)
    assert logs and Path(logs.group(1)).is_dir(), text[:2000]
    board = text[text.index("leaderboard demo-1"):text.index("registered ")]
    assert "…" not in board, board
    assert max(len(line) for line in board.splitlines()) <= 100, board
    for name in ("linear_average", "persistence", "random", "lstm", "transformer"):
        assert re.search(rf"^{name} +(baseline|model) +-?\d\.\d{{4}}", board, flags=re.M), board
