"""The champion alias moves only when a new version beats the current one on the same
windows (both evaluated side by side, the champion rebuilt from its weights + spec), and
registry versions survive a failed promotion."""

import pytest
import torch

from archlab.platform import tracking


def _model(arch: str):
    """A real zoo model at initialisation, with a known quality on the sample: AMN starts
    near the linear-average baseline (~0.49 seed cosine), a fresh LSTM predicts noise (~0)."""
    from archlab.platform.config import load_config
    from archlab.platform.train import build_from_spec, model_spec

    spec = model_spec(load_config(None, [f"model.arch={arch}"]), {"dim": 384, "dataset_id": "x"})
    torch.manual_seed(0)
    return build_from_spec(spec).eval(), spec


def _register(uri, exp, arch, windows):
    model, spec = _model(arch)
    c = tracking.client(uri)
    run = c.create_run(exp)
    model_uri = tracking.log_model(uri, run.info.run_id, model, spec, windows[:2, :-1])
    return tracking.register_and_maybe_promote(
        uri, model_uri, "archlab-vector-test",
        tags={"arch": arch, "task": "vector", "run_id": run.info.run_id, "dataset_id": "x"},
        candidate=model, windows=windows, task="vector")


def test_champion_moves_only_to_a_better_model(tmp_path, windows):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp = tracking.experiment_id(tracking.client(uri), "champion-test")
    first = _register(uri, exp, "lstm", windows)
    assert first["promoted"] and first["reason"] == "no champion yet" and first["score"] < 0.1
    better = _register(uri, exp, "amn", windows)
    assert better["promoted"] and better["score"] > 0.4
    # the champion was rebuilt from its weights + spec and scored the same as when registered
    assert better["champion_score"] == pytest.approx(first["score"], abs=1e-6)
    worse = _register(uri, exp, "lstm", windows)
    assert not worse["promoted"] and "does not beat champion v2" in worse["reason"]
    c = tracking.client(uri)
    assert int(c.get_model_version_by_alias("archlab-vector-test", "champion").version) == 2
    versions = tracking.list_models(uri, "archlab-vector-test")
    assert [v["version"] for v in versions] == [3, 2, 1]  # nothing lost
    assert versions[1]["aliases"] == ["champion"]


@pytest.mark.slow
def test_registration_and_promotion_through_a_tracking_server(mlflow_server, windows):
    """The same rules against a real `mlflow server` (it validates sources a SQLite store accepts)."""
    exp = tracking.experiment_id(tracking.client(mlflow_server), "champion-server-test")
    first = _register(mlflow_server, exp, "lstm", windows)
    better = _register(mlflow_server, exp, "amn", windows)
    assert first["promoted"] and better["promoted"] and better["version"] != first["version"]
    from archlab.platform import modelstore

    champ = modelstore.load_model("models:/archlab-vector-test@champion", mlflow_server)
    x = torch.as_tensor(windows[:4, :-1])
    torch.testing.assert_close(champ(x), _model("amn")[0](x))
