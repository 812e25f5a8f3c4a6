"""The front door: README commands = what CI runs; the CLI stays light and stable."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    blocks = _bash_blocks(readme)
    main_job, tests = blocks[0], blocks[1]
    ci = (REPO / ".ci" / "run").read_text()
    setup_line = next(line for line in ci.splitlines() if line.startswith("python3.11 -m venv"))
    setup = setup_line.split(" || ")[0]
    test_line = next(line for line in ci.splitlines() if line.startswith("pytest "))
    assert tests == f"{setup} && {test_line}"
    # the main job uses the same setup, without the test tools, then runs the demo
    assert main_job == setup.replace(" -e '.[dev]'", " -e .") + " && archlab demo"


def test_help_does_not_import_heavy_packages():
    code = ("import sys; from archlab.cli import app; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_commands_and_flags_are_frozen():
    import typer.main

    from archlab.cli import app

    click_app = typer.main.get_command(app)
    commands = {name: sorted(p.opts[0] for p in cmd.params if p.opts and p.opts[0].startswith("-"))
                for name, cmd in click_app.commands.items()}
    assert commands["train"] == ["--config", "--set", "--smoke-test", "--verbose"]
    assert commands["sweep"] == ["--add-samples", "--config", "--resume", "--set", "--smoke-test", "--verbose"]
    assert commands["demo"] == ["--set", "--smoke-test", "--verbose"]
    assert commands["leaderboard"] == ["--experiment", "--format", "--sweep", "--tracking-uri", "--wide"]
    assert commands["models"] == ["--convert", "--data", "--predict", "--prefix", "--split", "--tracking-uri"]
    assert commands["evaluate"] == ["--data", "--experiment", "--json", "--log", "--seed", "--split",
                                    "--tracking-uri", "--train-split"]
    assert commands["report"] == ["--experiment", "--out", "--sweep", "--tracking-uri"]
    assert {"archs", "submit", "data"} <= set(commands)


def test_archs_lists_every_registered_architecture():
    from archlab.architectures import list_specs

    out = subprocess.run([sys.executable, "-m", "archlab.cli", "archs"], capture_output=True, text=True,
                         env={"COLUMNS": "250", "PATH": ""}, check=True)
    for spec in list_specs():
        assert spec.name in out.stdout
    assert "unavailable" not in out.stdout, out.stdout


@pytest.mark.slow
def test_demo_smoke_registers_every_arch_from_its_confirm_runs_in_the_store_it_is_given(smoke_demo):
    """The issue's check, verbatim: MLFLOW_TRACKING_URI=sqlite:///<tmp>/m.db archlab demo --smoke-test."""
    tmp_path, out = smoke_demo
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "linear_average" in out.stdout and "champion" in out.stdout
    from archlab.platform.tracking import list_models

    models = list_models(f"sqlite:///{tmp_path}/m.db", "archlab-vector")
    assert {m["name"] for m in models} == {"archlab-vector-lstm", "archlab-vector-transformer", "archlab-vector-amn"}
    # one version per arch (a fresh store), registered from its confirm runs (2 seeds); champion
    # unless its verdict against the best baseline is worse
    assert len(models) == 3 and all(m["tags"]["archlab.confirm_seeds"] == "1,2" for m in models)
    assert all(("champion" in m["aliases"]) == (m["tags"]["archlab.verdict_vs_baseline"] != "worse") for m in models)
    assert "confirm stage: 6 runs, 0 errored" in out.stdout
    assert (tmp_path / "archlab_runs").is_dir() and not (tmp_path / "mlflow.db").exists()
