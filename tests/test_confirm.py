"""The confirm stage's pure parts and its registry rule, without Ray: the seed list, the
selection of the top-k search configs per architecture, and registration from confirm
runs with a real SQLite MLflow registry (a `worse` verdict is registered, never champion)."""

from types import SimpleNamespace

import numpy as np
import pytest

from archlab.platform import tracking
from archlab.platform.config import ConfigError, load_config
from archlab.platform.sweep import confirm_seeds, registry_candidates, select_confirm
from tests.test_champion import _model


def test_confirm_seeds_default_to_the_seeds_after_train_seed_and_two_under_smoke():
    assert confirm_seeds(load_config(None, [])) == [1, 2, 3]
    assert confirm_seeds(load_config(None, ["train.seed=7"])) == [8, 9, 10]
    assert confirm_seeds(load_config(None, [], smoke_test=True)) == [1, 2]
    assert confirm_seeds(load_config(None, ["sweep.confirm.seeds=[5, 3]"], smoke_test=True)) == [5, 3]
    assert load_config(None, []).sweep.confirm.top_k == 1


@pytest.mark.parametrize("override, field", [
    ("sweep.confirm.top_k=-1", "sweep.confirm.top_k"),
    ("sweep.confirm.seeds=[]", "sweep.confirm.seeds"),
    ("sweep.confirm.seeds=[1, 1]", "sweep.confirm.seeds"),
    ("sweep.confirm.seed=1", "sweep.confirm.seed"),
])
def test_bad_confirm_settings_are_one_line_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"{field}:" in str(e.value) and "\n" not in str(e.value)


def _trial(tid, arch, h, score, error=None):
    return {"trial_id": tid, "config": {"arch": arch, f"{arch}.train.lr": 1e-3}, "config_hash": h,
            "metrics": {"val_cosine_seed": score}, "error": error}


def test_select_confirm_takes_the_best_distinct_configs_of_each_arch_on_every_seed():
    trials = [
        _trial("a_00000", "lstm", "h1" * 8, 0.30), _trial("a_00001", "lstm", "h2" * 8, 0.40),
        _trial("a_00002", "lstm", "h2" * 8, 0.39),  # the same config again: counted once
        _trial("a_00003", "lstm", "h3" * 8, 0.35), _trial("a_00004", "lstm", "h4" * 8, 0.9, error="boom"),
        _trial("a_00005", "lstm", "h5" * 8, float("nan")),
        _trial("a_00006", "transformer", "t1" * 8, 0.20), _trial("a_00007", "transformer", "t2" * 8, 0.25),
    ]
    pts = select_confirm(trials, ["lstm", "transformer"], 2, [1, 2], "val_cosine_seed", "max", "s-1")
    picked = {(p["arch"], p["config_hash"][:2]) for p in pts}
    assert picked == {("lstm", "h2"), ("lstm", "h3"), ("transformer", "t2"), ("transformer", "t1")}
    assert len(pts) == 4 * 2
    # the same seed list for every architecture, seed by seed
    assert [p["seed"] for p in pts] == [1] * 4 + [2] * 4
    for arch in ("lstm", "transformer"):
        assert sorted(p["seed"] for p in pts if p["arch"] == arch) == [1, 1, 2, 2]
    ids = [p["trial_id"] for p in pts]
    assert len(set(ids)) == len(ids) and not set(ids) & {t["trial_id"] for t in trials}
    # a resumed job rebuilding the stage gets the very same points
    assert select_confirm(list(reversed(trials)), ["lstm", "transformer"], 2, [1, 2], "val_cosine_seed", "max",
                          "s-1") == pts
    # min mode (losses) takes the lowest; top_k 0: no stage
    low = select_confirm(trials, ["lstm"], 1, [1], "val_cosine_seed", "min", "s-1")
    assert [p["config_hash"][:2] for p in low] == ["h1"]
    assert select_confirm(trials, ["lstm"], 0, [1, 2], "val_cosine_seed", "max", "s-1") == []


def test_registration_from_confirm_runs_and_a_worse_verdict_never_becomes_champion(tmp_path, windows):
    """Two archs with three confirm seeds each under a parent whose best baseline scores
    0.48: lstm's seeds sit far below it (verdict `worse`), amn's above (`better`). The
    leaderboard computes the verdicts, register_models registers both; lstm gets no
    champion although its name has none yet, amn does, scored by its confirm mean."""
    from archlab.platform.leaderboard import leaderboard
    from archlab.platform.sweep import TAG_VERDICT, Job, register_models

    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, "confirm-rule")
    cfg = load_config(None, ["sweep.archs=[lstm, amn]", "sweep.confirm.seeds=[1, 2, 3]"])
    parent = tracking.parent_run(c, exp, "confirm-rule-1", cfg.to_dict())
    tracking.log_metrics(c, parent, {"baseline.linear_average.cosine": 0.48, "baseline.persistence.cosine": 0.30})
    scores = {"lstm": [0.105, 0.10, 0.11], "amn": [0.55, 0.56, 0.555]}
    trials = []
    for arch, vals in scores.items():
        model, spec = _model(arch)
        for seed, v in zip([1, 2, 3], vals):
            tid = f"confirm-rule-1-c{arch}-s{seed}"
            run_id = tracking.child_run(c, exp, parent, "confirm-rule-1", tid, arch, {"arch": arch},
                                        tags={"stage": "confirm", "confirm_seed": seed, "config_hash": arch * 4})
            tracking.log_metrics(c, run_id, {"val_cosine_seed": v})
            uri_m = tracking.log_model(uri, run_id, model, spec, windows[:2, :-1])
            trials.append({"trial_id": tid, "run_id": run_id, "model": model, "model_uri": uri_m, "spec": spec,
                           "metrics": {"val_cosine_seed": v}, "stage": "confirm", "confirm_seed": seed,
                           "config_hash": arch * 4, "error": None})
    board = leaderboard(uri, exp, parent, "val_cosine_seed", "max")
    rows = {r["entry"]: r for r in board["rows"] if r["kind"] == "model"}
    assert rows["lstm"]["vs_base"] == "worse" and rows["amn"]["vs_base"] == "better"
    assert rows["lstm"]["n"] == 3 and rows["lstm"]["ci_lo"] <= rows["lstm"]["mean"] <= rows["lstm"]["ci_hi"]
    job = Job(cfg, SimpleNamespace(dataset_id="x", name="sample"), {}, windows, {}, uri, str(tmp_path), exp)
    decisions = {d["name"]: d for d in register_models(job, trials, board)}
    lstm, amn = decisions["archlab-vector-lstm"], decisions["archlab-vector-amn"]
    assert not lstm["promoted"] and lstm["verdict"] == "worse" and "never champion" in lstm["reason"]
    assert amn["promoted"] and amn["verdict"] == "better"
    assert amn["score"] == pytest.approx(np.mean(scores["amn"]))  # the confirm mean, not one run
    versions = {v["name"]: v for v in tracking.list_models(uri, "archlab-vector")}
    v = versions["archlab-vector-lstm"]
    assert v["tags"][TAG_VERDICT] == "worse" and v["aliases"] == []
    assert "verdict worse" in v["tags"]["archlab.champion_decision"]
    assert float(v["tags"]["archlab.verdict_p_adj"]) < 0.05 and v["tags"]["archlab.verdict_by"] == "seed"
    with pytest.raises(Exception):
        c.get_model_version_by_alias("archlab-vector-lstm", "champion")
    a = versions["archlab-vector-amn"]
    assert a["aliases"] == ["champion"] and a["tags"][TAG_VERDICT] == "better"
    assert a["tags"]["archlab.confirm_n"] == "3" and a["tags"]["archlab.confirm_seeds"] == "1,2,3"
    assert a["run_id"] == next(t["run_id"] for t in trials if t["spec"]["arch"] == "amn" and t["confirm_seed"] == 1)
    # a resumed job registers nothing twice
    again = register_models(job, trials, board)
    assert all("already registered" in d["reason"] for d in again)
    assert len(tracking.list_models(uri, "archlab-vector")) == 2


def test_registry_candidate_is_the_best_config_by_confirm_mean_not_the_best_single_run():
    def t(h, seed, v):
        return {"trial_id": f"{h}-{seed}", "spec": {"arch": "lstm"}, "metrics": {"val_cosine_seed": v},
                "stage": "confirm", "confirm_seed": seed, "config_hash": h}

    # config a has the best single run (0.9) but the lower mean
    got = registry_candidates([t("a", 1, 0.9), t("a", 2, 0.1), t("b", 2, 0.6), t("b", 1, 0.5)],
                              "val_cosine_seed", "max", [1, 2])["lstm"]
    assert got["trial"]["config_hash"] == "b" and got["trial"]["confirm_seed"] == 1
    assert got["score"] == pytest.approx(0.55) and got["n"] == 2 and got["seeds"] == [1, 2]
    search = registry_candidates([{**t("a", 0, 0.3), "stage": "search"}, {**t("b", 0, 0.4), "stage": "search"}],
                                 "val_cosine_seed", "max")["lstm"]
    assert search["trial"]["config_hash"] == "b" and search["score"] is None and search["stage"] == "search"
