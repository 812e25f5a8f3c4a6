"""Registered models as weights + spec, rebuilt from archlab's code on load; safe file reads.

A model logged here is an MLflow model with two files and no pickle:

    model/MLmodel               flavors: archlab (format, files) and python_function
    model/weights.safetensors   the state dict (safetensors: a JSON header + raw tensor bytes)
    model/model_spec.json       archlab.platform.train.model_spec: arch (registry *name*),
                                flavor, task, the arch Config fields, d_in / vocab_size, ...

`load_model(uri)` reads the spec, builds the model with archlab's registry
(`build_from_spec`, by architecture name, so a class that moves to another module still
loads) and loads the weights strictly. The `python_function` flavor names this module as
its loader (`_load_pyfunc`), the way MLflow's built-in flavors do, so
`mlflow.pyfunc.load_model("models:/name@champion").predict(numpy)` works too, without a
cloudpickled python_model and without running code stored with the model.

Models logged before this format (mlflow.pytorch, a pickled nn.Module) still load, with a
deprecation warning: their tensors are read by torch's weights_only unpickler, which
constructs only allowlisted classes (nn.Module subclasses of torch.nn and archlab), and the
model is rebuilt from the spec that old format kept in the MLmodel metadata. `convert`
re-logs such a version in this format.

`torch_load_safe` is how archlab reads every torch file (checkpoints): weights_only=True,
and a pickled object in the file is refused with an error naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("archlab")

FLAVOR = "archlab"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model_spec.json"
LOADER_MODULE = "archlab.platform.modelstore"  # named in every MLmodel: keep this module here


class UnsafeFileError(ValueError):
    """A file archlab reads holds something other than tensors and plain data."""


class ModelFormatError(ValueError):
    """A logged model is not in a format archlab can rebuild."""


# ------------------------------------------------------------------ safe torch files
def torch_load_safe(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings, lists, dicts. A
    pickled object of any other type (a class instance, a function) is refused with an
    UnsafeFileError naming the file and the object; nothing in it runs."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{path}: refused: it holds a pickled object that is not tensors or plain data "
            f"(torch.load weights_only: {first}); archlab writes checkpoints as tensors and JSON only"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UnsafeFileError(f"{path}: unreadable torch file ({type(e).__name__}: {str(e).splitlines()[0]})") from None


# ------------------------------------------------------------------ the flavor
def _signature(spec: dict[str, Any]):
    """Batch and length free: [-1, -1, d_in] float32 -> [-1, -1, d_out] (vector) or
    [-1, -1] int64 -> [-1, -1, vocab] logits (token)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if spec["task"] == "vector":
        d = int(spec["d_in"])
        return ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, -1, d))]),
                              Schema([TensorSpec(np.dtype(np.float32), (-1, -1, d))]))
    v = int(spec["vocab_size"])
    return ModelSignature(Schema([TensorSpec(np.dtype(np.int64), (-1, -1))]),
                          Schema([TensorSpec(np.dtype(np.float32), (-1, -1, v))]))


def save_model(path, mlflow_model=None, *, model, spec: dict[str, Any], input_example=None,
               pip_requirements: list[str] | None = None, **_ignored) -> None:
    """Write the model folder (the flavor protocol `mlflow.models.Model.log` calls)."""
    import safetensors.torch
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_pip_requirements,
        _PythonEnv,
    )

    for key in ("arch", "task", "config"):
        if key not in spec:
            raise ModelFormatError(f"model spec: field {key!r} missing (found {sorted(spec)}); "
                                   "make it with archlab.platform.train.model_spec")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mlflow_model = mlflow_model or Model()
    # tied weights (the token model's LM head = its embedding) are stored once
    safetensors.torch.save_model(model, str(path / WEIGHTS_FILE), metadata={"format": "archlab", "version": str(FORMAT_VERSION)})
    (path / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
    if input_example is not None:
        _save_example(mlflow_model, np.asarray(input_example), str(path))
    mlflow_model.signature = _signature(spec)
    mlflow_model.metadata = {**(mlflow_model.metadata or {}), "archlab": spec}
    mlflow_model.add_flavor(FLAVOR, format_version=FORMAT_VERSION, weights=WEIGHTS_FILE, spec=SPEC_FILE,
                            arch=spec["arch"], task=spec["task"])
    pyfunc.add_to_model(mlflow_model, loader_module=LOADER_MODULE, data=".",
                        conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME)
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))
    conda_env, reqs, _ = _process_pip_requirements(
        pip_requirements or ["torch", "safetensors", "archlab"], None, None)
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    (path / _REQUIREMENTS_FILE_NAME).write_text("\n".join(reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def log_model(uri: str, run_id: str, model, spec: dict[str, Any], example: np.ndarray,
              name: str = "model") -> str:
    """Log `model` (weights + spec) to the run; returns the model URI (`models:/m-...`)."""
    import sys

    import mlflow
    from mlflow.models import Model

    mlflow.set_tracking_uri(uri)
    c = mlflow.MlflowClient(uri)
    before = c.get_run(run_id).info.status
    model = model.eval()
    # An active run puts the logged model in the run's experiment (runs:/<id>/model then
    # resolves); leaving the `with` ends the run FINISHED, so its status is put back.
    with mlflow.start_run(run_id=run_id):
        info = Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__], run_id=run_id,
                         model=model, spec=spec, input_example=example, metadata={"archlab": spec})
    if before != "FINISHED":
        c.update_run(run_id, status=before)
    return info.model_uri


# ------------------------------------------------------------------ loading
def _download(model_uri: str, dst: str) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst))


def model_info(model_uri: str, tracking_uri: str | None = None):
    """MLflow's ModelInfo of a logged model (model_id, run_id, metadata) from its MLmodel
    file alone, or ModelFormatError naming the URI."""
    import mlflow
    from mlflow.models import get_model_info

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        return get_model_info(model_uri)
    except Exception as e:
        raise ModelFormatError(f"{model_uri}: no such model ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_spec(model_uri: str, tracking_uri: str | None = None, info=None) -> dict[str, Any]:
    """The model's spec (arch, task, d_in / vocab_size, dataset_id, ...) from its MLmodel
    file alone: what callers check data against before they load any weights."""
    info = info or model_info(model_uri, tracking_uri)
    spec = (info.metadata or {}).get("archlab")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ModelFormatError(f"{model_uri}: not an archlab model (no 'archlab' spec in its MLmodel metadata)")
    return spec


def _load_dir(path: Path, source: str):
    """(model, spec) from a downloaded model folder, new or old format."""
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    mm = Model.load(str(path / MLMODEL_FILE_NAME))
    if FLAVOR in mm.flavors:
        conf = mm.flavors[FLAVOR]
        if int(conf.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelFormatError(f"{source}: archlab model format {conf.get('format_version')}, "
                                   f"this archlab reads up to {FORMAT_VERSION}: upgrade archlab")
        spec_path = path / conf.get("spec", SPEC_FILE)
        try:
            spec = json.loads(spec_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{source}: {spec_path.name} unreadable ({type(e).__name__}: {e})") from None
        return _rebuild(spec, _read_safetensors(path / conf.get("weights", WEIGHTS_FILE), source)), spec
    if "pytorch" in mm.flavors:
        return _load_legacy(path, mm, source)
    raise ModelFormatError(f"{source}: flavors {sorted(mm.flavors)}: expected 'archlab' (or the old 'pytorch')")


def _read_safetensors(path: Path, source: str) -> dict:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # a pickle, a truncated file, anything not safetensors
        raise UnsafeFileError(
            f"{source}: {path.name} refused: not a safetensors weights file ({type(e).__name__}: {e}); "
            "archlab models store tensors only"
        ) from None


def _rebuild(spec: dict[str, Any], state: dict):
    """Build the architecture by its registry name and load the weights strictly; tied
    weights saved once (safetensors) are restored by the model's own tying."""
    from archlab.platform.train import build_from_spec

    model = build_from_spec(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied parameter is stored under one of its names; the other is filled by the tie
    tied = {n for n in missing if _is_tied(model, n, state)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise ModelFormatError(
            f"weights do not fit {spec['arch']} ({spec.get('flavor')}): missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return model.eval()


def _is_tied(model, name: str, state: dict) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    if p is None:
        return False
    return any(other in state and params[other] is p for other in params if other != name)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The nn.Module (eval mode) of `models:/name@alias`, `models:/name/version`,
    `runs:/<run_id>/model` or a `models:/m-...` logged-model URI, rebuilt from its spec."""
    return load_model_and_spec(model_uri, tracking_uri)[0]


def load_model_and_spec(model_uri: str, tracking_uri: str | None = None):
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return _load_dir(_download(model_uri, tmp), model_uri)


# ------------------------------------------------------------------ the old format
def _allowed_legacy_global(qualname: str):
    """The object for one global of an old pickled model if it is harmless to construct or
    call: an nn.Module class of torch.nn or archlab (built empty, filled from plain state),
    an architecture's Config dataclass, or a torch.nn.functional function (a stored
    activation). Anything else (os.system, builtins.eval, ...) gives None: refused."""
    import dataclasses
    import importlib
    import inspect

    import torch

    mod_name, _, attr = qualname.rpartition(".")
    if not (mod_name.startswith("torch.nn") or mod_name.startswith("archlab.architectures")):
        return None
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        return obj
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and mod_name.startswith("archlab.architectures"):
        return obj
    if mod_name == "torch.nn.functional" and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        return obj
    return None


def _load_legacy(path: Path, mm, source: str):
    import torch

    spec = (mm.metadata or {}).get("archlab")
    data = path / mm.flavors["pytorch"].get("model_data", "data") / "model.pth"
    if not isinstance(spec, dict) or "config" not in spec or not data.exists():
        raise ModelFormatError(f"{source}: old pytorch-format model without an archlab spec or model.pth")
    warnings.warn(
        f"{source}: old archlab model format (a pickled nn.Module, mlflow.pytorch); loaded with torch's "
        f"weights_only unpickler and rebuilt from its spec. Convert it: `archlab models --convert NAME`",
        DeprecationWarning, stacklevel=3,
    )
    log.warning("%s: old pickle-format model, loaded by the deprecation path; convert it with "
                "`archlab models --convert`", source)
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(data))
    allowed, refused = [], []
    for g in needed:
        cls = _allowed_legacy_global(g)
        (allowed.append(cls) if cls is not None else refused.append(g))
    if refused:
        raise UnsafeFileError(
            f"{source}: {data.name} refused: it needs {', '.join(refused[:5])} to unpickle, which are not "
            "torch.nn / archlab module classes, architecture Configs or torch.nn.functional functions"
        )
    with torch.serialization.safe_globals(allowed):
        try:
            old = torch.load(str(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsafeFileError(f"{source}: {data.name} refused by the weights_only unpickler "
                                  f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return _rebuild(spec, old.state_dict()), spec


def convert(uri: str, name: str, version: str | int | None = None) -> list[dict[str, Any]]:
    """Re-log every old-format version of registered model `name` (or one `version`) in
    this format to the same run, register it as a new version with the same tags, and move
    the aliases that pointed at the old version. Returns one record per conversion."""
    import mlflow
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    from archlab.platform import tracking

    mlflow.set_tracking_uri(uri)
    c = tracking.client(uri)
    rm = c.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    done = []
    for mv in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda m: int(m.version)):
        if version is not None and str(mv.version) != str(version):
            continue
        if (mv.tags or {}).get("archlab.converted_to"):
            continue  # converted before: its new-format twin is already registered
        vuri = f"models:/{name}/{mv.version}"
        with tempfile.TemporaryDirectory() as tmp:
            path = _download(vuri, tmp)
            if FLAVOR in Model.load(str(path / MLMODEL_FILE_NAME)).flavors:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                model, spec = _load_dir(path, vuri)
        example = _example(spec)
        new_uri = log_model(uri, mv.run_id, model, spec, example)
        tags = {**dict(mv.tags or {}), "archlab.converted_from": str(mv.version)}
        new = mlflow.register_model(new_uri, name, tags=tags, await_registration_for=60)
        for a in aliases.get(str(mv.version), []):
            c.set_registered_model_alias(name, a, new.version)
        c.set_model_version_tag(name, mv.version, "archlab.converted_to", str(new.version))
        done.append({"name": name, "from": int(mv.version), "to": int(new.version),
                     "aliases": aliases.get(str(mv.version), [])})
    return done


def _example(spec: dict[str, Any]) -> np.ndarray:
    ctx = int(spec.get("context") or 5)
    if spec["task"] == "vector":
        x = np.random.default_rng(0).standard_normal((2, ctx, int(spec["d_in"]))).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    return np.zeros((2, ctx), np.int64)


# ------------------------------------------------------------------ pyfunc
class ArchlabPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: numpy in, numpy out.

    vector: [B, T, d_in] float32 -> [B, T, d_in] unit-norm predictions (row t predicts t+1);
    token: [B, T] int -> [B, T, vocab] logits."""

    def __init__(self, model, spec: dict[str, Any]):
        self.model, self.spec = model, spec

    def predict(self, model_input, params=None):
        import torch

        x = torch.as_tensor(np.asarray(model_input))
        x = x.float() if self.spec["task"] == "vector" else x.long()
        with torch.no_grad():
            return self.model(x).float().numpy()


def _load_pyfunc(data_path: str, model_config=None) -> ArchlabPyfunc:
    path = Path(data_path)
    model, spec = _load_dir(path, str(path))
    return ArchlabPyfunc(model, spec)
