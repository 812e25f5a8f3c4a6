"""Config: YAML + --set overrides, and errors that name the file, field, expected and found."""

import json

import pytest

from archlab.architectures.registry import UnknownArchitectureError
from archlab.platform.config import ConfigError, load_config
from archlab.platform.sweep import check_archs, trial_cfg


def test_defaults_smoke_yaml_and_set_layer_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.002\n  epochs: 7\nmodel:\n  arch: transformer\n")
    cfg = load_config(p, ["train.epochs=3", "model.d_model=48", "sweep.archs=[lstm, transformer]"], smoke_test=True)
    assert cfg.train.lr == 0.002  # file over defaults
    assert cfg.train.epochs == 3  # --set over file and smoke
    assert cfg.train.max_steps_per_epoch == 12  # smoke setting kept where nothing overrides it
    assert cfg.model.arch == "transformer" and cfg.model.arch_overrides() == {"d_model": 48}
    assert cfg.sweep.archs == ["lstm", "transformer"]
    assert cfg.smoke_test
    # --smoke-test over the file: a full-run config still gives a smoke-sized run
    p.write_text("train:\n  epochs: 7\n  max_steps_per_epoch: 500\nsweep:\n  num_samples: 6\nmodel:\n  flavor: seed\n")
    smoke = load_config(p, [], smoke_test=True)
    assert (smoke.train.epochs, smoke.train.max_steps_per_epoch, smoke.sweep.num_samples, smoke.model.flavor) == (2, 12, 4, "debug")
    full = load_config(p, [])
    assert (full.train.epochs, full.train.max_steps_per_epoch, full.sweep.num_samples, full.model.flavor) == (7, 500, 6, "seed")
    # configs are data: they round-trip through JSON unchanged
    again = type(cfg).model_validate(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_errors_name_field_and_found_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs.*found 'zero'"):
        load_config(None, ["train.epochs=zero"])
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        load_config(None, ["train.bogus=1"])
    with pytest.raises(ConfigError, match=r"train\.lr.*found -1"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping.*found list"):
        load_config(lst)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_architecture_lists_known_ones():
    cfg = load_config(None, ["sweep.archs=[lstm, lsmt]"], smoke_test=True)
    with pytest.raises(UnknownArchitectureError, match=r"unknown architecture 'lsmt'; known architectures: .*lstm.*transformer"):
        check_archs(cfg, cfg.sweep.archs, smoke=True)


def test_bad_arch_field_and_space_override_are_refused_before_training():
    cfg = load_config(None, ["model.arch=lstm", "model.d_modle=64"], smoke_test=True)
    with pytest.raises(ValueError, match=r"model\.d_modle: 'lstm' has no such config field; fields: d_model"):
        check_archs(cfg, ["lstm"], smoke=True)
    cfg = load_config(None, ["sweep.archs=[lstm]", "sweep.space_overrides={gru: {model.d_model: {choices: [8]}}}"])
    with pytest.raises(ConfigError, match=r"sweep\.space_overrides\.gru: not one of sweep\.archs \(lstm\)"):
        check_archs(cfg, cfg.sweep.archs, smoke=False)


def test_trial_config_applies_only_its_own_arch_parameters():
    base = load_config(None, ["model.arch=lstm", "model.d_model=99"], smoke_test=True).to_dict()
    cfg = trial_cfg(base, {"arch": "transformer", "transformer.model.d_model": 32,
                           "transformer.train.lr": 0.003, "lstm.model.d_model": 16})
    assert cfg.model.arch == "transformer"
    assert cfg.model.arch_overrides() == {"d_model": 32}  # lstm's base override does not leak
    assert cfg.train.lr == 0.003
    cfg = trial_cfg(base, {"arch": "lstm", "lstm.model.n_layers": 1})
    assert cfg.model.arch_overrides() == {"d_model": 99, "n_layers": 1}


def test_ray_idle_workers_sets_the_raylet_pool_limit_and_no_prestart():
    from archlab.platform.runtime import system_config

    assert system_config(8, None) == {"worker_maximum_startup_concurrency": 8}
    sc = system_config(8, 2)
    assert sc["num_workers_soft_limit"] == 2 and sc["prestart_worker_first_driver"] is False
    assert load_config(None, ["ray.idle_workers=2"]).ray.idle_workers == 2
    with pytest.raises(ConfigError, match="idle_workers"):
        load_config(None, ["ray.idle_workers=-1"])
