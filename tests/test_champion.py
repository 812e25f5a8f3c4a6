"""The champion alias moves only when a new version beats the current one on the same
windows (both evaluated side by side), and registry versions survive a failed promotion."""

import numpy as np
import pytest
import torch
from torch import nn

from archlab.platform import tracking


class Fixed(nn.Module):
    """A predictor with a known quality: the normalised mean of the context (the linear
    average baseline) or its negation (the worst possible)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = nn.Parameter(torch.tensor(float(sign)), requires_grad=False)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        run = x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
        return torch.nn.functional.normalize(self.sign * run, dim=-1)


@pytest.fixture()
def windows(sample_dataset):
    from archlab.platform.data import read_vector_docs

    docs = read_vector_docs([str(sample_dataset / "valid" / "part-00000.parquet")], 384)
    return np.stack([d[s: s + 6] for d in docs for s in range(0, len(d) - 5, 7)])


def _register(uri, exp, model, windows):
    c = tracking.client(uri)
    run = c.create_run(exp)
    model_uri = tracking.log_model(uri, run.info.run_id, model, {"arch": "fixed"}, windows[:2, :-1])
    return tracking.register_and_maybe_promote(
        uri, model_uri, "archlab-vector-fixed",
        tags={"arch": "fixed", "task": "vector", "run_id": run.info.run_id, "dataset_id": "x"},
        candidate=model, windows=windows, task="vector")


def test_champion_moves_only_to_a_better_model(tmp_path, windows):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp = tracking.experiment_id(tracking.client(uri), "champion-test")
    first = _register(uri, exp, Fixed(-1.0), windows)
    assert first["promoted"] and first["reason"] == "no champion yet" and first["score"] < 0
    better = _register(uri, exp, Fixed(1.0), windows)
    assert better["promoted"] and better["score"] > 0.4
    assert better["champion_score"] == pytest.approx(first["score"], abs=1e-6)
    worse = _register(uri, exp, Fixed(-1.0), windows)
    assert not worse["promoted"] and "does not beat champion v2" in worse["reason"]
    c = tracking.client(uri)
    assert int(c.get_model_version_by_alias("archlab-vector-fixed", "champion").version) == 2
    versions = tracking.list_models(uri, "archlab-vector-fixed")
    assert [v["version"] for v in versions] == [3, 2, 1]  # nothing lost
    assert versions[1]["aliases"] == ["champion"]


@pytest.mark.slow
def test_registration_and_promotion_through_a_tracking_server(mlflow_server, windows):
    """The same rules against a real `mlflow server` (it validates sources a SQLite store accepts)."""
    exp = tracking.experiment_id(tracking.client(mlflow_server), "champion-server-test")
    first = _register(mlflow_server, exp, Fixed(-1.0), windows)
    better = _register(mlflow_server, exp, Fixed(1.0), windows)
    assert first["promoted"] and better["promoted"] and better["version"] != first["version"]
    import mlflow.pytorch

    mlflow.set_tracking_uri(mlflow_server)
    champ = mlflow.pytorch.load_model("models:/archlab-vector-fixed@champion")
    x = torch.as_tensor(windows[:4, :-1])
    torch.testing.assert_close(champ(x), Fixed(1.0)(x))
