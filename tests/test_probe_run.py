"""`archlab probe`: the Trainer's masked-loss hook, state sizes, MLflow tracking of a probe
job, the CLI table, and the capability claims of issue 16 on CPU (attention recalls at
MQAR (L=64, 4 pairs); a small pure recurrent model does not at long L)."""

from __future__ import annotations


import mlflow
import pytest
import torch
import torch.nn.functional as F

from archlab.platform import probe as P
from archlab.platform.config import load_config
from archlab.platform.tasks import get_probe
from archlab.platform.trainer import Trainer


def _token_batch(n=8, seed=0):
    d = get_probe("mqar").generate(n, seed, seq_len=32, n_pairs=4, vocab=32)
    return d, {k: torch.as_tensor(v) for k, v in (("inputs", d.inputs), ("targets", d.targets), ("mask", d.mask))}


def _model(arch="gpt2", kind="token", **kw):
    cfg, _ = P.probe_config(arch, 32, 64)
    torch.manual_seed(0)
    return P.build_probe_model(arch, kind, cfg, **kw)


def test_masked_token_loss_is_cross_entropy_over_the_marked_positions_only():
    data, batch = _token_batch()
    model = _model(vocab=32)
    cfg = load_config(None, ["model.arch=gpt2", "train.task=token", "train.scheduler=none"])
    t = Trainer(model, cfg, loss=P.masked_loss("token"))
    got = t.batch_loss(model, batch)
    with torch.no_grad():
        logits = model(batch["inputs"])
    m = batch["mask"]
    marked = F.cross_entropy(logits[m], batch["targets"][m])
    assert torch.allclose(got, marked, atol=1e-6)
    # every position (the default next-token loss would see them all) gives another value
    everything = F.cross_entropy(logits[:, :-1].reshape(-1, 32), batch["inputs"][:, 1:].reshape(-1))
    assert abs(float(everything) - float(marked)) > 1e-3
    # and train_step goes through the hook: one step on only the marked positions
    before = [p.detach().clone() for p in model.parameters()]
    assert t.train_step(batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert abs(t.running_loss() - float(marked)) < 1e-5


def test_masked_vector_loss_ignores_unmarked_targets():
    d = get_probe("vector_mqar").generate(6, 0, seq_len=24, n_pairs=3, dim=8)
    model = _model("lstm", "vector", dim=8)
    batch = {"inputs": torch.as_tensor(d.inputs), "targets": torch.as_tensor(d.targets), "mask": torch.as_tensor(d.mask)}
    loss = P.masked_loss("vector")
    a = loss(model, batch)
    noisy = dict(batch, targets=torch.where(batch["mask"][..., None], batch["targets"], torch.randn_like(batch["targets"])))
    assert torch.allclose(a, loss(model, noisy))
    with torch.no_grad():
        pred = model(batch["inputs"])
    m = batch["mask"]
    assert torch.allclose(a, (1 - (pred[m] * batch["targets"][m]).sum(-1)).mean(), atol=1e-6)


def test_default_batch_loss_is_the_next_step_loss_on_x():
    data, batch = _token_batch()
    model = _model(vocab=32)
    cfg = load_config(None, ["model.arch=gpt2", "train.task=token", "train.scheduler=none"])
    t = Trainer(model, cfg)
    x = batch["inputs"]
    assert torch.allclose(t.batch_loss(model, {"x": x}), t.task_loss(model, x))


def test_state_bytes_attention_zero_with_a_kv_cache_recurrent_fixed():
    st = P.state_bytes(_model("gpt2", vocab=32))
    # gpt2 debug: 2 layers, keys and values of width 32 in fp32 per token, no fixed state
    assert st["state_bytes"] == 0 and st["cache_bytes_per_token"] == 2 * 2 * 32 * 4
    st = P.state_bytes(_model("lstm", vocab=32))
    assert st["state_bytes"] == 2 * 2 * 32 * 4 and st["cache_bytes_per_token"] == 0  # (h, c) x 2 layers
    assert P.state_bytes(_model("hyena", vocab=32))["state_bytes"] is None


def test_probe_config_sets_the_width_generically():
    _, over = P.probe_config("transformer", 64, 100)
    assert over == {"d_model": 64, "d_ff": 128}
    _, over = P.probe_config("amn", 64, 100)
    assert over["d_hidden"] == 64
    _, over = P.probe_config("hyena", 64, 600)
    assert over["max_len"] == 600


@pytest.mark.slow  # ~80 s under today's load: 8 tiny trainings + MLflow
def test_probe_job_tracked_in_mlflow_and_printed_within_100_columns(tmp_path):
    from typer.testing import CliRunner

    from archlab.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["probe", "--archs", "gpt2,min_gru", "--preset", "lite", "--tasks", "copy",
                                   "--steps", "2", "--tracking-uri", uri, "-e", "probe-test"])
    assert res.exit_code == 0, res.output
    table = res.output[res.output.index("probe probe-lite"):]
    assert all(len(line) <= 100 for line in table.splitlines() if not line.startswith(("MLflow", "  UI", "widths")))
    assert "gpt2" in table and "min_gru" in table and "copy L=16 V=16" in table
    c = mlflow.tracking.MlflowClient(uri)
    exp = c.get_experiment_by_name("probe-test")
    parents = c.search_runs([exp.experiment_id], "tags.`archlab.role` = 'parent'")
    assert len(parents) == 1 and parents[0].data.params["probe.preset"] == "lite"
    kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    # 2 archs x the lite preset's 2 copy cells, each FINISHED with its best accuracy and state size
    assert len(kids) == 4
    assert {(k.data.tags["archlab.arch"], k.data.params["probe.length"]) for k in kids} == {
        (a, n) for a in ("gpt2", "min_gru") for n in ("16", "64")}
    for k in kids:
        assert k.info.status == "FINISHED" and k.data.tags["archlab.role"] == P.ROLE_CELL
        assert 0.0 <= k.data.metrics["accuracy"] <= 1.0 and "best_lr" in k.data.metrics
        assert "lr_0.001.accuracy" in k.data.metrics and "lr_0.003.accuracy" in k.data.metrics
    gru = next(k for k in kids if k.data.tags["archlab.arch"] == "min_gru")
    assert gru.data.metrics["state_bytes"] > 0


def test_bad_probe_input_names_the_option():
    with pytest.raises(ValueError, match="--tasks: unknown probe task"):
        P.select_cells(P.PRESETS["lite"], ["nope"])
    with pytest.raises(KeyError, match="unknown architecture"):
        P.check_archs(["nope"], list(P.PRESETS["lite"].cells))
