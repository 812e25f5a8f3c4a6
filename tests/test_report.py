"""`archlab report` on a hand-populated MLflow store with metric histories and an Optuna
journal: the HTML's images decode as PNGs of non-trivial size, nothing is fetched from
the network, and everything is logged on the parent run."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from archlab.platform import leaderboard as lb
from archlab.platform import report, study, tracking
from archlab.platform.config import load_config
from tests.conftest import assert_self_contained_report

ARCHS = ("lstm", "transformer")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
        yield _populate(tmp_path)


def _populate(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, ["sweep.name=rep", f"sweep.storage_path={tmp_path / 'runs'}"])
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "rep")
    parent = tracking.parent_run(c, exp, "rep-1", cfg.to_dict())
    tracking.log_metrics(c, parent, {"baseline.linear_average.cosine": 0.48, "baseline.random.cosine": 0.0})
    rng = np.random.default_rng(0)
    storage = study.journal_storage(study.journal_path(tmp_path / "runs", "rep-1"))
    st = optuna.create_study(study_name="rep-1", storage=storage, direction="maximize",
                             sampler=optuna.samplers.RandomSampler(seed=0))
    fps = {"lstm": 2e6, "transformer": 5e6}

    def trial_run(name, arch, stage, lr, d_model, final, seed=None):
        run = tracking.child_run(c, exp, parent, "rep-1", name, arch,
                                 {"train": {"lr": lr}, "model": {"params": {"d_model": d_model}}})
        c.set_tag(run, lb.TAG_STAGE, stage)
        if seed is not None:
            c.set_tag(run, lb.TAG_CONFIRM_SEED, str(seed))
        for step in range(1, 5):  # four evaluations on the budget grid
            tracking.log_metrics(c, run, {"val_cosine_seed": final - 0.1 / step + 0.01 * rng.standard_normal(),
                                          "train_flops": fps[arch] * 1000 * step, "samples_seen": 1000 * step},
                                 step=step)
        tracking.log_metrics(c, run, {"val_cosine_seed": final, "train_flops": fps[arch] * 4000}, step=4)

    for i in range(6):
        arch = ARCHS[i % 2]
        st.enqueue_trial({"arch": arch})  # alternate, like sweep.allocation=equal
        t = st.ask()
        assert t.suggest_categorical("arch", list(ARCHS)) == arch  # the sweep's define-by-run space
        lr = t.suggest_float(f"{arch}.train.lr", 5e-4, 5e-3, log=True)
        d = t.suggest_categorical(f"{arch}.model.d_model", [16, 32])
        score = 0.6 + 0.05 * np.log10(lr / 5e-4) + (0.02 if d == 32 else 0) + (0.05 if arch == "lstm" else 0)
        st.tell(t, score)
        trial_run(f"s{i}", arch, "search", lr, d, score)
    for seed in range(3):
        trial_run(f"c-lstm-{seed}", "lstm", "confirm", 2e-3, 32, 0.70 + 0.003 * seed, seed)
        trial_run(f"c-tr-{seed}", "transformer", "confirm", 2e-3, 32, 0.66 + 0.004 * seed, seed)
    return uri, c, parent, tmp_path


def test_report_html_is_self_contained_and_logged(sweep):
    uri, c, parent, tmp_path = sweep
    page = report.make_report(uri, "rep", tmp_path / "out")
    text = page.read_text()
    assert_self_contained_report(text, 6)  # curves, pareto, leaderboard, two slice plots, importances
    assert "better" in text and "importances:" not in text  # the journal was read
    assert "No parameter importances" not in text  # and gave importances for both archs
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.html", "curves.png", "pareto.png", "leaderboard.png", "importances.png",
            "slices_lstm.png", "slices_transformer.png"} <= names
    logged = {a.path for a in c.list_artifacts(parent, "report")}
    assert {f"report/{n}" for n in names} == logged


def test_pareto_front_and_missing_journal(sweep):
    assert report.pareto_front([(1, 0.5), (2, 0.4), (3, 0.7), (3, 0.6), (4, 0.7)], "max") == [(1, 0.5), (3, 0.7)]
    assert report.pareto_front([(1, 5.0), (2, 4.0), (3, 4.5)], "min") == [(1, 5.0), (2, 4.0)]
    uri, c, parent, root = sweep
    page = report.make_report(uri, "rep", root / "out2", journal=root / "nowhere.journal", log_artifacts=False)
    assert "no Optuna journal" in page.read_text()


def test_cli_report_prints_the_path(sweep):
    from typer.testing import CliRunner

    from archlab.cli import app

    uri, c, parent, root = sweep
    res = CliRunner().invoke(app, ["report", "-e", "rep", "--out", str(root / "cli"), "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert str(root / "cli" / "report.html") in res.output.replace("\n", "")


def test_sweep_writes_its_report_under_the_sweeps_storage(sweep):
    uri, c, parent, root = sweep
    cfg = load_config(None, ["sweep.name=rep", f"sweep.storage_path={root / 'runs'}", f"tracking.uri={uri}"])
    page = report.sweep_report(cfg, {"sweep_id": "rep-1", "tracking_uri": uri})
    assert page == root / "runs" / "rep-1" / "report" / "report.html"
    assert (page.parent / "importances.png").is_file()  # found the journal beside Tune's folder
