"""The sweep's Optuna study, persisted in a journal file beside Tune's run folder, so the
report (parameter importances) and `optuna-dashboard` can read it after the sweep.

The sweep passes `sweep_journal(storage, sweep_id)` (a JournalStorage) as OptunaSearch's
`storage=` with `study_name=sweep_id`; Ray pickles the searcher with its storage when it
checkpoints, and a resumed sweep appends to the same journal. Open it with

    pip install -e '.[dashboard]'
    optuna-dashboard <storage>/<sweep_id>/optuna.journal
"""

from __future__ import annotations

from pathlib import Path

JOURNAL = "optuna.journal"


def journal_path(storage: str | Path, sweep_id: str) -> Path:
    """<storage>/<sweep_id>/optuna.journal (the folder is Tune's run folder for the sweep)."""
    return Path(storage) / sweep_id / JOURNAL


def sweep_journal(storage: str, sweep_id: str):
    """The storage OptunaSearch gets: a journal under a local (or mounted) `storage`;
    None for object stores (s3://, gs://), where a file journal cannot live; Optuna then
    keeps the study in memory, as before."""
    if "://" in str(storage):
        import logging

        logging.getLogger("archlab").info("Optuna journal: none (storage %s is not a file system)", storage)
        return None
    return journal_storage(journal_path(storage, sweep_id))


def journal_storage(path: str | Path):
    """`optuna.storages.JournalStorage` over a `JournalFileBackend` at `path` (its folder is
    created; the file is appended to, never truncated)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def load_study(path: str | Path, study_name: str | None = None):
    """The study in the journal at `path` (the only one when `study_name` is None); a
    missing journal or study names what was looked for."""
    import optuna

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no Optuna journal (sweeps write one under their storage folder)")
    storage = journal_storage(path)
    names = optuna.get_all_study_names(storage)
    if study_name is None:
        if len(names) != 1:
            raise KeyError(f"{path}: {len(names)} studies ({', '.join(names) or 'none'}); name one")
        study_name = names[0]
    if study_name not in names:
        raise KeyError(f"{path}: no study {study_name!r}; studies: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=study_name, storage=storage)
