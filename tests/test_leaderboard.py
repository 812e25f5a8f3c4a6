"""The leaderboard with uncertainty, on a real MLflow SQLite store populated by hand:
confirm statistics, window CIs, Holm-adjusted verdicts, edge and collapse flags,
the 100-column view and byte-identical output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from archlab.platform import leaderboard as lb
from archlab.platform import stats, tracking
from archlab.platform.config import load_config

LSTM = [0.801, 0.795, 0.806, 0.799, 0.803]  # mean 0.8008
TRANSFORMER = [0.781, 0.776, 0.785, 0.779, 0.778]  # ~0.78: clearly below lstm, paired by seed
BASELINES = {"linear_average": 0.48, "persistence": 0.40, "random": 0.001}


def _child(c, exp, parent, sweep, trial, arch, stage, value, lr, extra=None, seed=None):
    run_id = tracking.child_run(c, exp, parent, sweep, trial, arch,
                                {"arch": arch, "train": {"lr": lr}, "model": {"params": {"d_model": 256}}})
    c.set_tag(run_id, lb.TAG_STAGE, stage)
    c.set_tag(run_id, lb.TAG_CONFIG_HASH, f"{arch}-{lr}")
    if seed is not None:
        c.set_tag(run_id, lb.TAG_CONFIRM_SEED, str(seed))
    tracking.log_metrics(c, run_id, {"val_cosine_seed": value, "val_cosine": value - 0.01, **(extra or {})})
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('board')}/m.db"
    cfg = load_config(None, ["sweep.name=board", "sweep.archs=[lstm, transformer, gru_stack]",
                             "sweep.reference_arch=lstm"])
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "board")
    parent = tracking.parent_run(c, exp, "board-1", cfg.to_dict())
    tracking.log_metrics(c, parent, {f"baseline.{k}.cosine": v for k, v in BASELINES.items()})
    # search: lstm's best trial has lr 9e-3, at the top of its log range [1e-4, 1e-2]
    for i, (value, lr) in enumerate([(0.79, 9e-3), (0.70, 1e-3), (0.60, 2e-4)]):
        _child(c, exp, parent, "board-1", f"s-lstm-{i}", "lstm", "search", value, lr, {"train_flops": 1e12})
    for i, (value, lr) in enumerate([(0.77, 3e-4), (0.72, 5e-4)]):
        _child(c, exp, parent, "board-1", f"s-tr-{i}", "transformer", "search", value, lr, {"train_flops": 2e12})
    # gru_stack: no confirm runs, only its search trial with a window comparison logged
    rng = np.random.default_rng(1)
    base_w = 0.48 + 0.05 * rng.standard_normal(500)
    win = stats.window_comparison(base_w + 0.3 + 0.01 * rng.standard_normal(500),
                                  {"linear_average": base_w, "random": 0.01 * rng.standard_normal(500)})
    gru = _child(c, exp, parent, "board-1", "s-gru-0", "gru_stack", "search", 0.78, 1e-3)
    lb.log_window_comparison(c, gru, win)
    for seed, (a, b) in enumerate(zip(LSTM, TRANSFORMER)):
        r = _child(c, exp, parent, "board-1", f"c-lstm-{seed}", "lstm", "confirm", a, 9e-3, seed=seed)
        lb.log_window_comparison(c, r, stats.window_comparison(
            base_w + (a - 0.48) + 0.01 * rng.standard_normal(500), {"linear_average": base_w}))
        _child(c, exp, parent, "board-1", f"c-tr-{seed}", "transformer", "confirm", b, 3e-4,
               {"val_pred_self_cos": 0.99 if seed == 2 else 0.5}, seed=seed)
    return uri, exp, parent, win


def test_confirm_statistics_and_intervals(store):
    uri, exp, parent, win = store
    board = lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    rows = {r["entry"]: r for r in board["rows"]}
    assert set(rows) == {"lstm", "transformer", "gru_stack", *BASELINES}
    lstm = rows["lstm"]
    iv = stats.t_interval(LSTM)
    assert lstm["n"] == 5 and lstm["stage"] == "confirm"
    assert lstm["val_cosine_seed"] == pytest.approx(iv.mean) and lstm["mean"] == pytest.approx(iv.mean)
    assert lstm["ci_lo"] == pytest.approx(iv.lo) and lstm["ci_hi"] == pytest.approx(iv.hi)
    # the window CI shown is the first confirm seed's: about its own score - 0.48
    assert lstm["d_base_lo"] < lstm["d_base"] < lstm["d_base_hi"]
    assert lstm["d_base"] == pytest.approx(LSTM[0] - 0.48, abs=0.003)
    for r in (rows["lstm"], rows["transformer"]):
        assert r["ci_lo"] < r["mean"] < r["ci_hi"]
    # no confirm runs: the best search trial, n = 1, no interval, its window CI
    gru = rows["gru_stack"]
    assert gru["n"] == 1 and gru["stage"] == "search" and math.isnan(gru["ci_lo"]) and math.isnan(gru["std"])
    assert gru["d_base"] == pytest.approx(win["diff_vs_best_baseline"])
    assert gru["d_base_lo"] < gru["d_base"] < gru["d_base_hi"]
    assert gru["best_baseline"] == "linear_average"
    # search effort: trials and summed train_flops of stage=search runs only
    assert (lstm["search_trials"], lstm["search_flops"]) == (3, 3e12)
    assert (rows["transformer"]["search_trials"], rows["transformer"]["search_flops"]) == (2, 4e12)
    assert gru["search_flops"] is None
    values = [r["val_cosine_seed"] for r in board["rows"]]
    assert values == sorted(values, reverse=True)
    assert "| linear_average | baseline |" in board["markdown"]


def test_verdicts_against_best_baseline_and_reference(store):
    uri, exp, parent, _ = store
    board = lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    rows = {r["entry"]: r for r in board["rows"]}
    assert board["best_baseline"] == "linear_average" and board["reference"] == "lstm"
    for arch in ("lstm", "transformer", "gru_stack"):
        assert rows[arch]["vs_base"] == "better", rows[arch]
        assert rows[arch]["p_base_adj"] >= rows[arch]["p_base"]
    assert rows["lstm"]["vs_base_by"] == "seed" and rows["gru_stack"]["vs_base_by"] == "window"
    # transformer vs lstm, paired by seed: means 0.78 vs 0.80, sd ~0.004, n 5
    tr = rows["transformer"]
    assert tr["vs_ref"] == "worse" and tr["p_ref_adj"] < 0.05
    expected = stats.paired(TRANSFORMER, LSTM)
    assert tr["d_ref"] == pytest.approx(expected.diff.mean) and tr["d_ref_n"] == 5
    # Holm over the two non-reference archs: the adjusted p is at least the raw one
    assert tr["p_ref_adj"] >= tr["p_ref"]
    assert rows["lstm"]["vs_ref"] == "ref"
    # gru_stack has no confirm seeds to pair with the reference: no test, a tie
    assert rows["gru_stack"]["vs_ref"] == "tie" and math.isnan(rows["gru_stack"]["p_ref_adj"])
    # another reference changes the family
    other = lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max", reference_arch="transformer")
    assert {r["entry"]: r for r in other["rows"]}["lstm"]["vs_ref"] == "better"


def test_edge_and_collapse_flags(store):
    uri, exp, parent, _ = store
    board = lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    rows = {r["entry"]: r for r in board["rows"]}
    assert rows["lstm"]["edge"] == ["lr"]  # 9e-3 in [1e-4, 1e-2], log scale: 97.7% of the range
    assert rows["transformer"]["edge"] == []  # 3e-4 in [1e-4, 1e-3]: 48%
    assert rows["transformer"]["collapsed"] and not rows["lstm"]["collapsed"]
    text = lb.format_board(board)
    assert "lstm: edge: lr" in text and "transformer: collapsed" in text


def test_output_fits_100_columns_and_is_byte_identical(store):
    uri, exp, parent, _ = store
    for fmt in ("table", "markdown", "csv", "json"):
        a = lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), fmt)
        b = lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), fmt)
        assert a == b, fmt
    table = lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"))
    assert max(len(line) for line in table.splitlines()) <= 100, table
    assert "better" in table and "worse" in table
    wide = lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), "table", wide=True)
    assert "search_flops" in wide and "p_ref_adj" in wide and max(len(x) for x in wide.splitlines()) > 100
    data = json.loads(lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), "json"))
    assert data["reference"] == "lstm" and len(data["rows"]) == 6
    csv_lines = lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), "csv").splitlines()
    assert csv_lines[0].startswith("entry,kind,stage,n,val_cosine_seed") and len(csv_lines) == 7
    with pytest.raises(ValueError, match="--format"):
        lb.format_board(lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max"), "html")


def test_runs_without_stage_tags_are_search_trials(tmp_path):
    """A sweep from before the confirm stage: every child run is a search trial; the
    board falls back to each arch's best trial."""
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "old")
    parent = tracking.parent_run(c, exp, "old-1", load_config(None, []).to_dict())
    tracking.log_metrics(c, parent, {"baseline.linear_average.cosine": 0.48})
    for i, v in enumerate((0.5, 0.6)):
        run = tracking.child_run(c, exp, parent, "old-1", f"t{i}", "lstm", {"train": {"lr": 1e-3}})
        tracking.log_metrics(c, run, {"val_cosine_seed": v})
    board = lb.leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    row = next(r for r in board["rows"] if r["entry"] == "lstm")
    assert row["val_cosine_seed"] == 0.6 and row["n"] == 1 and row["search_trials"] == 2
    assert "vs_base" not in row  # one run and no window metrics logged: nothing to test, no verdict
    assert max(len(x) for x in lb.format_board(board).splitlines()) <= 100


def test_reference_arch_must_be_swept():
    from archlab.platform.config import ConfigError

    assert load_config(None, []).sweep.reference() == "lstm"
    with pytest.raises(ConfigError, match="reference_arch 'gru' is not one of archs"):
        load_config(None, ["sweep.reference_arch=gru"])


def test_cli_prints_the_board_in_each_format(store):
    from typer.testing import CliRunner

    from archlab.cli import app

    uri, *_ = store
    runner = CliRunner()
    base = ["leaderboard", "-e", "board", "--tracking-uri", uri]
    table = runner.invoke(app, base)
    assert table.exit_code == 0, table.output
    assert "lstm" in table.output and max(len(x) for x in table.output.splitlines()) <= 100
    assert runner.invoke(app, base).output == table.output
    out = runner.invoke(app, base + ["--format", "json"])
    assert json.loads(out.output)["best_baseline"] == "linear_average"
    bad = runner.invoke(app, base + ["--format", "html"])
    assert bad.exit_code == 2 and "--format must be" in bad.output


def test_token_task_lower_is_better(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "tok")
    parent = tracking.parent_run(c, exp, "tok-1", load_config(None, ["train.task=token"]).to_dict())
    tracking.log_metrics(c, parent, {"baseline.unigram.val_loss": 3.0, "baseline.unigram.val_bpb": 4.3,
                                     "baseline.uniform.val_loss": 5.5})
    losses = {"lstm": [2.50, 2.52, 2.49], "transformer": [2.61, 2.60, 2.63]}
    for arch, vals in losses.items():
        for seed, v in enumerate(vals):
            run = tracking.child_run(c, exp, parent, "tok-1", f"{arch}-{seed}", arch, {"train": {"lr": 1e-3}})
            c.set_tag(run, lb.TAG_STAGE, "confirm")
            c.set_tag(run, lb.TAG_CONFIRM_SEED, str(seed))
            tracking.log_metrics(c, run, {"val_loss": v, "val_bpb": v / math.log(2), "val_ppl": math.exp(v)})
    board = lb.leaderboard(uri, exp, parent, "val_loss", "min")
    assert [r["entry"] for r in board["rows"]] == ["lstm", "transformer", "unigram", "uniform"]
    rows = {r["entry"]: r for r in board["rows"]}
    assert board["best_baseline"] == "unigram" and rows["unigram"]["val_bpb"] == 4.3
    assert rows["lstm"]["vs_base"] == "better" and rows["transformer"]["vs_base"] == "better"
    assert rows["transformer"]["vs_ref"] == "worse"  # higher loss than lstm on every seed
    assert rows["lstm"]["val_loss"] == pytest.approx(np.mean(losses["lstm"]))
