"""model.head and longer contexts on the driver (Ray-free): config, search space, trial
config, model spec, and the refusals made before any worker starts. Through real Ray
Train: test_budget.py's flops-budget run, at a 64-vector context with head=residual."""

from __future__ import annotations

import optuna
import pytest
import torch

from archlab.architectures import list_specs, load_module
from archlab.platform.config import ConfigError, load_config
from archlab.platform.sweep import check_archs, define_space, trial_cfg
from archlab.platform.train import build_from_spec, model_spec

VECTOR_ARCHS = [s.name for s in list_specs() if "vector" in s.tasks]
MAX_LEN_ARCHS = [n for n in VECTOR_ARCHS if getattr(load_module(n), "MAX_LENGTH_FIELD", None)]


def test_model_head_is_a_model_setting_not_an_arch_field():
    cfg = load_config(None, ["model.arch=transformer", "model.head=residual", "model.d_model=16"])
    assert cfg.model.head == "residual"
    assert cfg.model.arch_overrides() == {"d_model": 16}
    assert load_config(None, []).model.head == "plain"
    with pytest.raises(ConfigError, match=r"model\.head"):
        load_config(None, ["model.head=resid"])


def test_token_task_refuses_the_residual_head():
    cfg = load_config(None, ["train.task=token", "model.arch=lstm", "model.head=residual"], smoke_test=True)
    with pytest.raises(ConfigError, match=r"model\.head='residual'.*train\.task='token' takes only model\.head=plain"):
        check_archs(cfg, ["lstm"], smoke=True)
    # the arch's own space entry is dropped for tokens; a user's override is refused
    cfg = load_config(None, ["train.task=token", "sweep.archs=[lstm]",
                             "sweep.space_overrides={lstm: {model.head: {choices: [plain, residual]}}}"])
    with pytest.raises(ValueError, match=r"sweep\.space_overrides\.lstm\.model\.head: a vector-task setting"):
        check_archs(cfg, ["lstm"], smoke=False)
    check_archs(load_config(None, ["train.task=token", "sweep.archs=[lstm, transformer]"]),
                ["lstm", "transformer"], smoke=False)


def test_amn_refuses_the_residual_head_on_the_driver():
    cfg = load_config(None, ["model.arch=lstm", "model.head=residual"], smoke_test=True)
    with pytest.raises(ConfigError, match=r"model\.head: 'residual' is not available for 'amn': amn builds its own"):
        check_archs(cfg, ["lstm", "amn"], smoke=True)
    check_archs(cfg, ["lstm", "transformer"], smoke=True)
    cfg = load_config(None, ["sweep.archs=[amn]", "sweep.space_overrides={amn: {model.head: {choices: [residual]}}}"])
    with pytest.raises(ConfigError, match=r"search space of amn \(model\.head\): 'residual' is not available"):
        check_archs(cfg, ["amn"], smoke=False)


def test_sampled_head_lands_in_cfg_model_head():
    base = load_config(None, ["model.arch=lstm", "model.d_model=99", "model.head=residual"], smoke_test=True).to_dict()
    cfg = trial_cfg(base, {"arch": "transformer", "transformer.model.head": "plain", "transformer.model.d_model": 32})
    assert cfg.model.head == "plain" and cfg.model.arch_overrides() == {"d_model": 32}
    # the base's head is the sweep's, carried to every arch unless the space samples it
    cfg = trial_cfg(base, {"arch": "transformer", "transformer.model.d_model": 32})
    assert cfg.model.head == "residual"
    cfg = trial_cfg(base, {"arch": "lstm", "lstm.model.head": "plain"})
    assert cfg.model.head == "plain" and cfg.model.arch_overrides() == {"d_model": 99}


@pytest.mark.parametrize("task", ["vector", "token"])
def test_every_vector_space_offers_both_heads_for_vectors_only(task):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set] = {}
    archs = [a for a in VECTOR_ARCHS if a != "amn"]
    for _ in range(6 * len(archs)):
        trial = study.ask()
        define_space(trial, archs, smoke=False, overrides={}, task=task)
        arch = trial.params["arch"]
        seen.setdefault(arch, set()).add(trial.params.get(f"{arch}.model.head"))
        study.tell(trial, 0.0)
    if task == "vector":
        assert all(heads <= {"plain", "residual"} and None not in heads for heads in seen.values()), seen
        assert {"plain", "residual"} <= set().union(*seen.values())
    else:
        assert all(heads == {None} for heads in seen.values()), seen


def test_spec_carries_the_head_and_old_specs_build_plain():
    cfg = load_config(None, ["model.arch=gru_stack", "model.head=residual", "data.context=7"], smoke_test=True)
    spec = model_spec(cfg, {"dim": 12, "dataset_id": "x"})
    assert spec["head"] == "residual" and spec["context"] == 7
    model = build_from_spec(spec).eval()
    x = torch.nn.functional.normalize(torch.randn(2, 10, 12), dim=-1)
    with torch.no_grad():
        y = model(x)
    # position 9 sees the last 7 inputs (3..9): the linear average over data.context
    want = torch.nn.functional.normalize(x[:, 3:10].mean(dim=1), dim=-1)
    assert torch.allclose(y[:, 9], want, atol=1e-6)
    old = {k: v for k, v in spec.items() if k != "head"}  # a spec saved before model.head
    assert build_from_spec(old).head_type == "plain"


def test_context_64_passes_the_driver_for_every_vector_arch():
    cfg = load_config(None, ["data.context=64", "model.flavor=debug"])
    check_archs(cfg, VECTOR_ARCHS, smoke=False)
    check_archs(cfg, VECTOR_ARCHS, smoke=True)


@pytest.mark.parametrize("name", MAX_LEN_ARCHS)
def test_context_above_the_max_length_is_refused_naming_the_field(name):
    field = load_module(name).MAX_LENGTH_FIELD
    limit = getattr(load_module(name).FLAVORS["debug"], field)
    cfg = load_config(None, [f"data.context={limit + 1}", f"model.arch={name}"])
    with pytest.raises(ConfigError, match=rf"data\.context={limit + 1}: '{name}' \(debug flavor\) takes at most "
                                          rf"{limit} positions \(model\.{field}\); raise it \(--set model\.{field}="):
        check_archs(cfg, [name], smoke=True)
    # raised through the arch's own field, it passes; for another arch of the sweep the
    # message names the space override that raises it
    check_archs(load_config(None, [f"data.context={limit + 1}", f"model.arch={name}", f"model.{field}={limit + 1}"]),
                [name], smoke=True)
    other = "lstm"
    cfg = load_config(None, [f"data.context={limit + 1}", f"model.arch={other}"])
    with pytest.raises(ConfigError, match=rf"sweep\.space_overrides\.{name}\.model\.{field}"):
        check_archs(cfg, [other, name], smoke=True)
