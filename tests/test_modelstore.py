"""Registered models are weights + spec, rebuilt from archlab's code: they load and predict
through archlab and through mlflow.pyfunc without unpickling, survive a module move, refuse
a pickled object in place of weights, and models of the old pickle format still load."""

import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from archlab.platform import modelstore, tracking

MARKER = Path("/tmp/archlab-test-pickle-ran")


class Evil:
    """Unpickling this runs code: it creates MARKER. No archlab loader may ever run it."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


def _spec_and_model(arch="amn", task="vector"):
    from archlab.platform.config import load_config
    from archlab.platform.train import build_from_spec, model_spec

    cfg = load_config(None, [f"model.arch={arch}", f"train.task={task}"])
    spec = model_spec(cfg, {"dim": 384, "vocab_size": 256, "dataset_id": "abc"})
    torch.manual_seed(0)
    return spec, build_from_spec(spec).eval()


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = tracking.client(uri)
    return uri, c, tracking.experiment_id(c, "modelstore-test")


def _no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a loader unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.mark.parametrize("arch,task", [("amn", "vector"), ("transformer", "token")])
def test_logged_model_loads_by_every_uri_and_pyfunc_without_unpickling(store, arch, task, monkeypatch):
    import mlflow

    uri, c, exp = store
    spec, model = _spec_and_model(arch, task)
    example = modelstore._example(spec)
    run = c.create_run(exp)
    model_uri = modelstore.log_model(uri, run.info.run_id, model, spec, example)
    assert c.get_run(run.info.run_id).info.status == "RUNNING"  # logging does not end the run
    mv = mlflow.register_model(model_uri, f"t-{arch}")
    c.set_registered_model_alias(f"t-{arch}", "champion", mv.version)
    x = torch.as_tensor(example)
    with torch.no_grad():
        want = model(x)
    _no_unpickling(monkeypatch)
    for u in (f"models:/t-{arch}@champion", f"models:/t-{arch}/1", f"runs:/{run.info.run_id}/model", model_uri):
        got = modelstore.load_model(u, uri)
        with torch.no_grad():
            torch.testing.assert_close(got(x), want)  # token: tied embedding/LM head restored
    pred = mlflow.pyfunc.load_model(f"models:/t-{arch}@champion").predict(example)
    assert isinstance(pred, np.ndarray)
    np.testing.assert_allclose(pred, want.numpy(), atol=1e-6)
    assert modelstore.read_spec(f"models:/t-{arch}@champion", uri)["arch"] == arch


def test_model_folder_holds_no_pickle_and_no_class_path(tmp_path):
    spec, model = _spec_and_model()
    modelstore.save_model(tmp_path / "m", model=model, spec=spec, input_example=modelstore._example(spec))
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert modelstore.WEIGHTS_FILE in files and modelstore.SPEC_FILE in files
    assert not [f for f in files if f.endswith((".pkl", ".pth", ".pt", ".pickle"))]
    text = (tmp_path / "m" / "MLmodel").read_text() + (tmp_path / "m" / modelstore.SPEC_FILE).read_text()
    assert "archlab.architectures" not in text  # the arch is named by its registry name
    assert "loader_module: archlab.platform.modelstore" in text


def test_loading_survives_the_architecture_module_moving(tmp_path, monkeypatch):
    """The registry now finds `amn` in another module and the old path no longer imports:
    a pickled model would break; weights + spec rebuild through the registry."""
    import dataclasses

    from archlab.architectures import registry

    spec, model = _spec_and_model("amn")
    modelstore.save_model(tmp_path / "m", model=model, spec=spec)
    moved = sys.modules["archlab.architectures.amn"]
    monkeypatch.setitem(sys.modules, "archlab_moved_amn", moved)
    monkeypatch.setitem(sys.modules, "archlab.architectures.amn", None)  # import now fails
    monkeypatch.setitem(registry._SPECS, "amn", dataclasses.replace(registry._SPECS["amn"], module="archlab_moved_amn"))
    x = torch.as_tensor(modelstore._example(spec))
    with torch.no_grad():
        torch.testing.assert_close(modelstore.load_model(str(tmp_path / "m"))(x), model(x))


def test_a_pickled_object_in_place_of_the_weights_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    spec, model = _spec_and_model()
    folder = tmp_path / "m"
    modelstore.save_model(folder, model=model, spec=spec)
    (folder / modelstore.WEIGHTS_FILE).write_bytes(pickle.dumps({"w": torch.zeros(2), "x": Evil()}))
    with pytest.raises(modelstore.UnsafeFileError, match=r"weights\.safetensors refused: not a safetensors"):
        modelstore.load_model(str(folder))
    assert not MARKER.exists()


def test_a_pickled_object_in_a_checkpoint_is_refused_naming_the_file(tmp_path):
    from archlab.platform.sweep import _load_trial_model
    from archlab.platform.train import STATE_FILE

    MARKER.unlink(missing_ok=True)
    spec, model = _spec_and_model()
    good = tmp_path / "good"
    good.mkdir()
    torch.save({"model": model.state_dict(), "epoch": 1, "step": 10, "note": "plain"}, good / STATE_FILE)
    loaded = _load_trial_model({"spec": spec, "checkpoint": str(good)})  # tensors + plain data load
    x = torch.as_tensor(modelstore._example(spec))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model": model.state_dict(), "hook": Evil()}, bad / STATE_FILE)
    with pytest.raises(modelstore.UnsafeFileError, match=rf"{bad / STATE_FILE}: refused: it holds a pickled object"):
        _load_trial_model({"spec": spec, "checkpoint": str(bad)})
    assert not MARKER.exists()


def _log_old_format(uri, run_id, model, spec, example):
    """What tracking.log_model wrote before weights + spec (a pickled nn.Module)."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(model.eval(), name="model", input_example=example,
                                        serialization_format="pickle", metadata={"archlab": spec},
                                        pip_requirements=["torch", "archlab"]).model_uri


@pytest.mark.parametrize("arch,task", [("amn", "vector"), ("transformer", "token")])
def test_a_model_registered_in_the_old_format_loads_with_a_warning_and_converts(store, arch, task):
    import mlflow

    uri, c, exp = store
    spec, model = _spec_and_model(arch, task)
    example = modelstore._example(spec)
    run = c.create_run(exp)
    mv = mlflow.register_model(_log_old_format(uri, run.info.run_id, model, spec, example), "old")
    c.set_registered_model_alias("old", "champion", mv.version)
    x = torch.as_tensor(example)
    with pytest.warns(DeprecationWarning, match="old archlab model format"):
        old = modelstore.load_model("models:/old@champion", uri)
    with torch.no_grad():
        torch.testing.assert_close(old(x), model(x))
    done = modelstore.convert(uri, "old")
    assert done == [{"name": "old", "from": 1, "to": 2, "aliases": ["champion"]}]
    assert int(c.get_model_version_by_alias("old", "champion").version) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the converted version is the new format
        new = modelstore.load_model("models:/old@champion", uri)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    assert modelstore.convert(uri, "old") == []  # nothing left to convert


def test_an_old_format_model_needing_a_foreign_global_is_refused(store):
    import mlflow

    MARKER.unlink(missing_ok=True)
    uri, c, exp = store
    spec, model = _spec_and_model()
    model.hook = Evil()  # what a tampered (or foreign) pickled model could carry
    run = c.create_run(exp)
    mlflow.register_model(_log_old_format(uri, run.info.run_id, model, spec, modelstore._example(spec)), "bad")
    MARKER.unlink(missing_ok=True)  # logging pickled it (and a round trip check may have run it)
    with pytest.warns(DeprecationWarning), pytest.raises(modelstore.UnsafeFileError, match="model.pth refused"):
        modelstore.load_model("models:/bad/1", uri)
    assert not MARKER.exists()


def test_models_convert_command(store):
    import mlflow
    from typer.testing import CliRunner

    from archlab.cli import app

    uri, c, exp = store
    spec, model = _spec_and_model()
    run = c.create_run(exp)
    mv = mlflow.register_model(_log_old_format(uri, run.info.run_id, model, spec, modelstore._example(spec)),
                               "archlab-vector-amn")
    c.set_registered_model_alias("archlab-vector-amn", "champion", mv.version)
    res = CliRunner().invoke(app, ["models", "--tracking-uri", uri, "--convert", "archlab-vector-amn"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "converted archlab-vector-amn v1 -> v2 (weights + spec); moved champion" in res.output
    res = CliRunner().invoke(app, ["models", "--tracking-uri", uri, "--convert", "archlab-vector-amn"])
    assert "archlab-vector-amn: no old-format version left to convert" in res.output


def _every_arch_and_task():
    from archlab.architectures import list_specs

    return [(s.name, t) for s in list_specs() for t in s.tasks]


@pytest.mark.parametrize("arch,task", _every_arch_and_task())
def test_every_architecture_round_trips_through_weights_and_spec(arch, task, tmp_path):
    """Tied or shared tensors, buffers and every zoo module's state survive safetensors."""
    spec, model = _spec_and_model(arch, task)
    modelstore.save_model(tmp_path / "m", model=model, spec=spec)
    back = modelstore.load_model(str(tmp_path / "m"))
    x = torch.as_tensor(modelstore._example(spec))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    assert back.state_dict().keys() == model.state_dict().keys()
