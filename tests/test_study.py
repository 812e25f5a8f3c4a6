"""The Optuna journal: written through OptunaSearch (as the sweep does), read back by
optuna.load_study; no Ray cluster needed."""

import pickle

import optuna
import pytest

from archlab.platform import study


def _space(trial):
    arch = trial.suggest_categorical("arch", ["lstm", "transformer"])
    trial.suggest_float(f"{arch}.train.lr", 1e-4, 1e-2, log=True)


def test_optuna_search_writes_a_journal_that_load_study_reads(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    path = study.journal_path(tmp_path / "runs", "demo-1")
    searcher = OptunaSearch(space=_space, metric="val_cosine_seed", mode="max", study_name="demo-1",
                            storage=study.journal_storage(path), sampler=optuna.samplers.TPESampler(seed=0))
    for i in range(4):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"val_cosine_seed": 0.1 * i})
    pickle.loads(pickle.dumps(searcher))  # Tune checkpoints the searcher with its storage
    assert path.is_file() and path.parent.name == "demo-1"
    loaded = optuna.load_study(study_name="demo-1", storage=study.journal_storage(path))
    assert [t.value for t in loaded.trials] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(t.state == optuna.trial.TrialState.COMPLETE and "arch" in t.params for t in loaded.trials)
    assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(study.load_study(path).trials) == 4  # the only study: no name needed
    with pytest.raises(KeyError, match="no study 'other'"):
        study.load_study(path, "other")
    with pytest.raises(FileNotFoundError, match="no Optuna journal"):
        study.load_study(tmp_path / "missing.journal")


def test_object_store_storage_gets_no_file_journal(tmp_path):
    assert study.sweep_journal("s3://bucket/archlab", "demo-1") is None
    assert study.sweep_journal(str(tmp_path), "demo-1") is not None
    assert (tmp_path / "demo-1").is_dir()
