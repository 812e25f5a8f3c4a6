"""Shared fixtures: one local Ray per test session, the real shared data, tmp stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "wikitext2-minilm384-sample"
SHARED_DATA = Path(os.environ.get("ARCHLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_dataset() -> Path:
    """The real sample shipped in the repo (canonical vector shards + manifest)."""
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: the larger real datasets; tests that need them skip without it."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set ARCHLAB_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with logical CPUs: on 2 physical cores,
    1-CPU workers plus Ray Data read tasks starve and hang (STACK_NOTES)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONDONTWRITEBYTECODE": "1"}})
    yield ray
    ray.shutdown()
