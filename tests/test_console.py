"""The quiet console: a leaderboard whole at 100 columns, one progress line per running
trial, and the smoke demo's stdout free of Ray's per-rank and raylet output."""

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from archlab.platform.leaderboard import render

def _board_from_store(tmp_path, n_archs):
    """A real leaderboard read back from MLflow: n_archs models and six baselines."""
    from archlab.platform import tracking
    from archlab.platform.leaderboard import leaderboard

    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "console")
    parent = tracking.parent_run(c, exp, "console-1", {"sweep": {"archs": [f"arch_{i}" for i in range(n_archs)]}})
    tracking.log_metrics(c, parent, {f"baseline.{b}.cosine": 0.3 + 0.01 * i for i, b in enumerate(
        ["linear_average", "ewma", "persistence", "mean_vector", "nearest_neighbour", "random"])})
    for i in range(n_archs):
        run = tracking.child_run(c, exp, parent, "console-1", f"t{i}", f"architecture_{i}", {})
        tracking.log_metrics(c, run, {"val_cosine_seed": 0.4 + 0.001 * i, "val_cosine": 0.3242,
                                      "samples_per_s": 1234.5678, "train_time_s": 14.43, "latency_ms": 0.099,
                                      "val_mse_seed": 0.0025, "retrieval_acc": 0.0078})
    return leaderboard(uri, exp, parent, "val_cosine_seed", "max")


@pytest.mark.parametrize("n_archs", [2, 12])
def test_leaderboard_is_whole_at_100_columns(tmp_path, n_archs):
    from rich.console import Console

    buf = io.StringIO()
    render(_board_from_store(tmp_path, n_archs), console=Console(file=buf, width=100, color_system=None))
    text = buf.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, text
    assert "…" not in text, text  # no cut cell or header
    for i in range(n_archs):
        assert any(line.startswith(f"architecture_{i} ") for line in lines), text
    assert any(line.startswith("linear_average* ") for line in lines), text  # * marks a baseline


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


def test_a_confirm_runs_progress_line_names_its_architecture_and_seed():
    """A confirm trial's Tune config is {CONFIRM_KEY: point}: its line names its run
    (c<config hash>-s<seed>) and the arch of the search config it repeats, not `?`; the
    longest arch name still fits."""
    from archlab.platform.progress import trial_progress
    from archlab.platform.sweep import CONFIRM_KEY

    out = []
    cb = trial_progress("val_cosine_seed", "max", time_attr="epoch", max_t=2, interval_s=0.0, out=out.append)
    t = _trial("da529_00004", "lstm")
    t.config = {CONFIRM_KEY: {"trial_id": "demo-1-c1a2b3c4d-s2", "seed": 2, "arch": "transformer",
                              "config_hash": "1a2b3c4d5e6f", "config": {"arch": "transformer", "d_model": 64}}}
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    cb.on_trial_result(iteration=1, trials=[t], trial=t,
                       result={"epoch": 2, "val_cosine_seed": 0.5, "samples_per_s": 12345.0})
    t.status = "TERMINATED"
    cb.on_trial_complete(iteration=2, trials=[t], trial=t)
    assert re.search(r"^  c1a2b3c-s2 transformer +DONE +epoch 2/2 .* 12k samples/s$", out[-1]), out
    assert len(out[-1]) <= 100


def test_progress_callback_survives_the_tuner_pickle():
    """Tune pickles the RunConfig (callbacks included) for --resume."""
    import ray.cloudpickle as pickle

    from archlab.platform.progress import trial_progress

    cb = pickle.loads(pickle.dumps(trial_progress("val_loss", "min", "epoch", 2)))
    cb.setup()
    assert cb.metric == "val_loss" and cb.trials == {}


@pytest.mark.slow
def test_smoke_demo_console_is_quiet_and_the_leaderboard_whole(smoke_demo):
    _, out = smoke_demo
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = out.stdout
    assert "TrainingReport" not in text and "TrainingReport" not in out.stderr, text[-4000:]
    assert "(raylet)" not in text and "PYTHON worker processes" not in text, text[-4000:]
    assert "RayTrainWorker" not in text and "SplitCoordinator" not in text, text[-4000:]
    assert "Trial train_driver_fn" not in text  # no per-trial config/result tables
    # the progress lines: every trial ends with one (DONE or STOPPED by ASHA): the 4 search
    # trials and the confirm stage's 6 (3 archs x 2 seeds, all DONE: no ASHA there)
    ends = re.findall(r"^  (\w{8}) (lstm|transformer|amn) +(DONE|STOPPED) +epoch \d/2 ", text, flags=re.M)
    assert len({e[0] for e in ends}) == 4, text[-4000:]
    confirm_ends = re.findall(r"^  (c\w{6}-s([12])) (lstm|transformer|amn) +DONE +epoch 2/2 ", text, flags=re.M)
    assert len({e[0] for e in confirm_ends}) == 6, text[-4000:]
    assert {(arch, seed) for _, seed, arch in confirm_ends} == {(a, s) for a in ("lstm", "transformer", "amn")
                                                                for s in "12"}, text[-4000:]
    logs = re.search(r"^Ray's worker, raylet, Train and Data logs: (\S+) ", text, flags=re.M)
    assert logs and Path(logs.group(1)).is_dir(), text[:2000]
    board = text[text.index("leaderboard demo-1"):text.index("registered ")]
    assert "…" not in board, board
    assert max(len(line) for line in board.splitlines()) <= 100, board
    for name in ("linear_average*", "persistence*", "random*", "lstm", "transformer", "amn"):  # * = baseline
        assert re.search(rf"^{re.escape(name)} +-?\d\.\d{{4}}", board, flags=re.M), board
