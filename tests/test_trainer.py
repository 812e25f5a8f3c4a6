"""The Ray-free Trainer over in-memory tensors: steps, epochs, evaluation, schedules,
schedule-free eval weights, auxiliary losses, and exact mid-epoch resume through a
checkpoint that loads with weights_only=True."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from archlab.architectures import build_model, make_config
from archlab.platform.config import load_config
from archlab.platform.trainer import LRSchedule, Trainer, planned_steps

D = 8


def cfg_for(*overrides: str, arch: str = "lstm"):
    return load_config(None, [f"model.arch={arch}", "train.batch_size=8", "train.lr=3e-3", *overrides])


def vector_batches(n: int = 12, b: int = 8, length: int = 6, seed: int = 0) -> list[dict]:
    """Learnable sequences: each vector is a fixed rotation of the previous one (unit norm)."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(123)))[0]
    out = []
    for _ in range(n):
        x = [nn.functional.normalize(torch.randn(b, D, generator=g), dim=-1)]
        for _ in range(length - 1):
            x.append(x[-1] @ rot)
        out.append({"x": torch.stack(x, 1)})  # (b, length, D)
    return out


def make_trainer(cfg, arch_overrides=None, **kw) -> Trainer:
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, cfg.train.task, make_config(cfg.model.arch, "debug", arch_overrides), d_in=D)
    return Trainer(model, cfg, **kw)


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.module.parameters()]


def test_epoch_trains_and_reports_the_platform_metric_names():
    t = make_trainer(cfg_for("train.scheduler=none"))
    data = vector_batches()
    first = t.train_epoch(data, data[:3])
    for _ in range(4):
        last = t.train_epoch(data, data[:3])
    assert last["train_loss"] < first["train_loss"]
    assert last["val_loss"] < first["val_loss"]
    assert {"epoch", "step", "train_loss", "samples_per_s", "data_wait_frac", "lr", "train_time_s", "val_loss",
            "val_cosine", "val_cosine_seed", "val_mse_seed", "val_windows", "val_frac_cos_gt_0.5_seed",
            "val_frac_cos_gt_0.7_seed", "val_frac_cos_gt_0.85_seed"} == set(last)
    assert last["epoch"] == 5 and last["step"] == 5 * len(data) and last["val_windows"] == 24
    assert not any(k.startswith(("aux_", "route_")) for k in last)  # no aux losses: no extra metrics


def test_token_task_evaluation():
    cfg = load_config(None, ["model.arch=lstm", "train.task=token", "train.scheduler=none"])
    torch.manual_seed(0)
    model = build_model("lstm", "token", make_config("lstm", "debug"), vocab_size=16)
    t = Trainer(model, cfg, tokens_per_byte=0.5)
    x = torch.randint(0, 16, (4, 9))
    m = t.evaluate([{"x": x}])
    assert set(m) == {"val_loss", "val_ppl", "val_bpb", "val_tokens"} and m["val_tokens"] == 32
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2) * 0.5)
    assert abs(m["val_loss"] - math.log(16)) < 0.5  # an untrained model is near uniform


def test_non_finite_loss_raises_with_the_step_where_it_appeared():
    data = vector_batches(6)
    data[3] = {"x": data[3]["x"].clone()}
    data[3]["x"][0, 0, 0] = float("nan")
    t = make_trainer(cfg_for("train.scheduler=none"))  # checked only at the epoch's end here
    with pytest.raises(FloatingPointError, match=r"at step 3 .*arch=lstm"):
        t.train_epoch(data)
    t = make_trainer(cfg_for("train.scheduler=none"), check_every=1)
    with pytest.raises(FloatingPointError, match="at step 3"):
        t.train_epoch(data)
    assert t.step == 4  # raised right after the bad step, not at the epoch's end


def test_grad_accumulation_matches_one_big_batch():
    data = vector_batches(4, b=8)
    big = [{"x": torch.cat([data[i]["x"], data[i + 1]["x"]])} for i in (0, 2)]
    a = make_trainer(cfg_for("train.scheduler=none", "train.grad_accum=2", "train.grad_clip=0"))
    b = make_trainer(cfg_for("train.scheduler=none", "train.grad_clip=0"))
    a.train_epoch(data)
    b.train_epoch(big)
    assert a.step == b.step == 2
    for p, q in zip(params(a), params(b)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_warmup_and_cosine_lr_at_given_steps():
    s = LRSchedule("cosine", [1.0], warmup=10, total=110)
    assert s.factor_at(0) == pytest.approx(0.1)
    assert s.factor_at(4) == pytest.approx(0.5)
    assert s.factor_at(9) == pytest.approx(1.0)
    assert s.factor_at(10) == pytest.approx(1.0)
    assert s.factor_at(60) == pytest.approx(0.5)
    assert s.factor_at(85) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert s.factor_at(110) == pytest.approx(0.0, abs=1e-12) and s.factor_at(500) == pytest.approx(0.0, abs=1e-12)
    c = LRSchedule("constant", [1.0], warmup=4, total=0)
    assert [c.factor_at(i) for i in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="train.scheduler=cosine"):
        LRSchedule("cosine", [1.0], warmup=0, total=0)


def test_the_trainer_applies_the_schedule_each_step():
    # warmup_frac of the planned total: 2 epochs x 6 steps = 12, 0.25 -> 3 warm-up steps
    cfg = cfg_for("train.scheduler=cosine", "train.warmup_frac=0.25", "train.epochs=2", "train.max_steps_per_epoch=6")
    total = planned_steps(cfg, {})
    assert total == 12
    t = make_trainer(cfg, total_steps=total)
    seen = []
    t.train_epoch(vector_batches(8), on_step=lambda tr: seen.append(tr.optimizer.param_groups[0]["lr"]))
    t.train_epoch(vector_batches(8), on_step=lambda tr: seen.append(tr.optimizer.param_groups[0]["lr"]))
    want = [3e-3 * LRSchedule("cosine", [1.0], warmup=3, total=12).factor_at(k) for k in range(12)]
    assert seen == pytest.approx(want)
    assert seen[0] == pytest.approx(1e-3) and seen[3] == pytest.approx(3e-3)
    # the constant schedule keeps the warm-up; none starts at the base lr (as before)
    t = make_trainer(cfg_for("train.scheduler=none", "train.warmup_steps=5"))
    t.train_epoch(vector_batches(2))
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3)


def test_planned_steps_from_windows_workers_and_caps():
    cfg = cfg_for("train.epochs=3", "train.num_workers=2", "train.grad_accum=2")
    assert planned_steps(cfg, {"train_windows": 1000}) == 3 * (1000 // 2 // 8 // 2)
    cfg = cfg_for("train.epochs=3", "train.max_steps_per_epoch=5")
    assert planned_steps(cfg, {"train_windows": 1000}) == 15 and planned_steps(cfg, {}) == 15
    assert planned_steps(cfg_for(), {}) == 0


def test_plateau_matches_torch_reduce_lr_on_plateau():
    losses = [1.0, 0.9, 0.9, 0.95, 0.91, 0.9, 0.89995, 0.8, 0.85, 0.85, 0.85, 0.85, 0.9]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2)
    s = LRSchedule("plateau", [1.0], factor=0.5, patience=2)
    for v in losses:
        ref.step(v)
        s.on_epoch_end(v)
        assert s.factor_at(100) == pytest.approx(opt.param_groups[0]["lr"])
    assert s.scale < 1.0  # the sequence did reduce it


def test_schedule_free_evaluates_and_checkpoints_the_eval_mode_weights():
    cfg = cfg_for("train.optimizer=schedule_free", "train.scheduler=constant", "train.warmup_steps=2")
    t = make_trainer(cfg)
    data = vector_batches()
    t.train_epoch(data)
    y = copy.deepcopy(t.module)  # train-mode weights (where gradients are taken)
    t.optimizer.eval()
    x = copy.deepcopy(t.module)  # eval-mode weights (the averaged iterate)
    t.optimizer.train()

    def loss_of(m):
        with torch.no_grad():
            m.eval()
            return float(sum(t.loss_fn(m(b["x"][:, :-1]), b["x"][:, 1:]) * b["x"].shape[0] for b in data[:3]) / 24)

    got = t.evaluate(data[:3])["val_loss"]
    assert abs(loss_of(x) - loss_of(y)) > 1e-4  # the two weight sets really differ here
    assert got == pytest.approx(loss_of(x), rel=1e-5)
    # evaluation and the checkpoint leave training at y, and the checkpoint holds x
    for p, q in zip(t.module.parameters(), y.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    state = t.state_dict()
    for k, v in x.state_dict().items():
        torch.testing.assert_close(state["model"][k], v, rtol=1e-5, atol=1e-6)
    assert t.optimizer.param_groups[0]["train_mode"]


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # tensors and plain containers only


@pytest.mark.parametrize("opt", ["adamw", "schedule_free"])
def test_mid_epoch_checkpoint_resumes_exactly(opt):
    # dropout > 0: the RNG state is part of what must be restored
    cfg = cfg_for(f"train.optimizer={opt}", "train.scheduler=cosine" if opt == "adamw" else "train.scheduler=constant",
                  "train.warmup_steps=3", "train.epochs=2", "train.max_steps_per_epoch=10", arch="amn")
    over = {"dropout": 0.2}
    data = vector_batches(10)
    total = planned_steps(cfg, {})

    ref = make_trainer(cfg, over, total_steps=total)
    snap = {}
    # take (and discard) a state dict at the same step in the reference run: for
    # schedule-free it swaps to x and back, which rounds the weights in the last bit
    ref.train_epoch(data, on_step=lambda tr: tr.step == 4 and snap.setdefault("ref", tr.state_dict()))
    ref_metrics = ref.train_epoch(data, data[:2])

    killed = make_trainer(cfg, over, total_steps=total)

    class Killed(Exception):
        pass

    def kill_at_4(tr):
        if tr.step == 4:
            snap["state"] = _save_load(tr.state_dict())
            raise Killed

    with pytest.raises(Killed):
        killed.train_epoch(data, on_step=kill_at_4)
    torch.manual_seed(999)  # a fresh process would have a different RNG state
    resumed = make_trainer(cfg, over, total_steps=total)
    resumed.load_state_dict(snap["state"])
    assert (resumed.epoch, resumed.batches_in_epoch, resumed.step) == (0, 4, 4)
    resumed.train_epoch(data)  # skips the 4 batches already trained on
    res_metrics = resumed.train_epoch(data, data[:2])
    assert resumed.step == ref.step == 20
    for p, q in zip(params(resumed), params(ref)):
        assert torch.equal(p, q)
    for k in ("train_loss", "val_loss", "val_cosine_seed", "lr", "step", "epoch"):
        assert res_metrics[k] == pytest.approx(ref_metrics[k], rel=1e-6), k


class AuxLinear(nn.Module):
    """A layer with an auxiliary loss (mean square of its output) and a routing statistic."""

    def __init__(self, weight: float):
        super().__init__()
        self.lin, self.weight, self._last, self._calls = nn.Linear(D, D), weight, None, 0

    def forward(self, h):
        out = self.lin(h)
        self._last = (out ** 2).mean()
        self._calls += 1
        return out

    def aux_losses(self):
        return {"energy": (self._last, self.weight)}

    def routing_stats(self):
        out, self._calls = {"calls": float(self._calls)}, 0
        return out


class AuxModel(nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.a, self.b = AuxLinear(weight), AuxLinear(weight)

    def forward(self, x):
        return nn.functional.normalize(self.b(self.a(x)), dim=-1)


def test_aux_losses_are_weighted_into_the_loss_and_logged_unweighted():
    cfg = cfg_for("train.scheduler=none", "train.grad_clip=0")
    data = vector_batches(3)
    torch.manual_seed(0)
    t = Trainer(AuxModel(0.5), cfg)
    m = t.train_epoch(data)
    # the same first step by hand: task loss + 0.5 x (energy_a + energy_b)
    torch.manual_seed(0)
    ref = AuxModel(0.5)
    x = data[0]["x"]
    task = t.loss_fn(ref(x[:, :-1]), x[:, 1:])
    (task + 0.5 * (ref.a._last + ref.b._last)).backward()
    torch.manual_seed(0)
    one = Trainer(AuxModel(0.5), cfg)
    one._train_mode()
    one.train_step(data[0])
    # after one AdamW step the moved parameters follow the sign of the reference gradient
    moved = one.module.a.lin.weight.detach() - AuxModel_init(0.5).a.lin.weight.detach()
    assert torch.equal(torch.sign(moved), -torch.sign(ref.a.lin.weight.grad))
    # logged: the epoch mean of the summed (unweighted) energies, and the routing stat
    assert set(k for k in m if k.startswith(("aux_", "route_"))) == {"aux_energy", "route_calls", "route_calls.l0",
                                                                       "route_calls.l1"}
    assert m["route_calls"] == 3.0  # one forward per batch, per layer
    assert m["aux_energy"] > 0
    # weight 0: the task loss alone drives training, the loss is still logged
    torch.manual_seed(0)
    z = Trainer(AuxModel(0.0), cfg)
    assert "aux_energy" in z.train_epoch(data)


def AuxModel_init(weight: float) -> AuxModel:
    torch.manual_seed(0)
    return AuxModel(weight)


def test_new_train_fields_are_searchable():
    from archlab.platform.sweep import trial_cfg
    from archlab.search_spaces import load_space

    space = load_space("lstm", smoke=True, overrides={
        "train.scheduler": {"choices": ["plateau", "cosine", "constant"]},
        "train.optimizer": {"choices": ["adamw", "schedule_free"]},
        "train.warmup_frac": {"low": 0.0, "high": 0.2},
        "train.checkpoint_every_steps": {"choices": [0, 50]},
    })
    assert "train.optimizer" in space
    cfg = trial_cfg(load_config(None, []).to_dict(), {
        "arch": "lstm", "lstm.train.scheduler": "cosine", "lstm.train.optimizer": "schedule_free",
        "lstm.train.warmup_frac": 0.1, "lstm.train.checkpoint_every_steps": 50,
    })
    assert (cfg.train.scheduler, cfg.train.optimizer, cfg.train.warmup_frac) == ("cosine", "schedule_free", 0.1)
    from archlab.platform.config import ConfigError

    with pytest.raises(ConfigError, match="train.scheduler"):
        load_config(None, ["train.scheduler=linear"])


def test_a_schedule_longer_than_the_run_is_refused_on_the_driver():
    from archlab.platform.config import ConfigError
    from archlab.platform.trainer import check_schedule

    check_schedule(cfg_for("train.scheduler=cosine", "train.warmup_steps=10"), {"train_windows": 1000})
    with pytest.raises(ConfigError, match=r"train.scheduler=cosine.*planned steps \(2 = .*warm-up \(10\)"):
        check_schedule(cfg_for("train.scheduler=cosine", "train.warmup_steps=10", "train.epochs=1",
                               "train.num_workers=1"), {"train_windows": 16})
    with pytest.raises(ConfigError, match="planned steps"):
        check_schedule(cfg_for("train.scheduler=constant", "train.warmup_frac=0.1"), {})
    check_schedule(cfg_for("train.scheduler=constant", "train.warmup_steps=5"), {})  # needs no length


def test_a_checkpoint_written_before_the_trainer_still_resumes_at_its_epoch_end():
    cfg = cfg_for()
    torch.manual_seed(0)
    model = build_model("lstm", "vector", make_config("lstm", "debug"), d_in=D)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for v in (1.0, 1.0):  # one reduction: lr 3e-3 -> 1.5e-3
        sched.step(v)
    old = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "epoch": 2, "step": 36, "train_time_s": 3.0}  # the pre-Trainer worker's keys
    t = make_trainer(cfg)
    t.load_state_dict(_save_load(old))
    assert (t.epoch, t.batches_in_epoch, t.step, t.train_time_s) == (3, 0, 36, 3.0)
    assert t.schedule.factor_at(100) == pytest.approx(0.5) and t.schedule.best == 1.0
    for p, q in zip(t.module.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow  # torch.compile's first compilation takes ~30 s on 2 cores
def test_compile_trains_the_same_parameters_as_eager_and_keeps_state_dict_keys():
    """train.compile: the training forward goes through torch.compile's wrapper of the same
    module, so the optimizer's Parameters are the module's, the state dict keeps its keys
    (no `_orig_mod.` prefix: checkpoints and registered models load either way), and a few
    steps land where eager steps do (to float tolerance)."""
    eager = make_trainer(cfg_for("train.grad_clip=0", arch="amn"))
    compiled = make_trainer(cfg_for("train.grad_clip=0", "train.compile=true", arch="amn"))
    assert compiled.train_model is not compiled.model
    assert set(compiled.state_dict()["model"]) == set(eager.state_dict()["model"])
    assert {id(p) for p in compiled.train_model.parameters()} == {id(p) for p in compiled.model.parameters()}
    for b in vector_batches(n=4):
        eager.train_step(b)
        compiled.train_step(b)
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.step == eager.step == 4
