"""Pieces of the train loop that need no Ray."""

import torch

from archlab.architectures import build_model, make_config
from archlab.platform.train import param_groups


def test_marked_parameters_are_not_weight_decayed():
    model = build_model("hawk", "vector", make_config("hawk", "debug"), d_in=12)
    marked = {id(p) for p in model.parameters() if getattr(p, "_no_weight_decay", False)}
    assert marked  # hawk marks its recurrence parameter (a_logit)
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert {id(p) for p in groups[1]["params"]} == marked
    assert not marked & {id(p) for p in groups[0]["params"]}
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    # AdamW really leaves the marked parameter alone when its gradient is zero
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in model.parameters():
        same = torch.equal(p.detach(), before[id(p)])
        assert same == (id(p) in marked or not p.detach().abs().sum())


def test_local_mode_checkpoints_keep_the_two_newest_and_resume_from_the_newest_that_loads(tmp_path):
    """train.num_workers 0 (local mode) has no Train controller: the loop writes its own
    checkpoints under the run's folder, named so that order is (evaluation, step), keeps
    the two newest, and a restarted trial takes the newest one that loads."""
    import json

    from archlab.platform.config import load_config
    from archlab.platform.sweep import latest_checkpoint
    from archlab.platform.train import MID_EPOCH, build_from_spec, model_spec, newest_local_checkpoint, persist_local
    from archlab.platform.trainer import Trainer

    cfg = load_config(None, ["model.arch=lstm", "train.num_workers=0"], smoke_test=True)
    spec = model_spec(cfg, {"dim": 8, "vocab_size": None})
    trainer = Trainer(build_from_spec(spec), cfg, total_steps=20)
    run = tmp_path / "train-trial_id=t1"
    written = []
    for step, ev, mid in ((5, 0, True), (10, 1, False), (15, 1, True), (20, 2, False)):
        trainer.step = step
        metrics = {"epoch": ev, "eval": ev, "step": step, **({MID_EPOCH: 1} if mid else {})}
        written.append(persist_local(trainer, spec, metrics, run))
    kept = sorted(p.name for p in run.glob("checkpoint_*"))
    assert kept == sorted(p.name for p in written[-2:])  # the two newest, nothing half-written
    assert not list(run.glob(".tmp-*"))
    # the sweep reads them as Ray Train's: the final model is the newest epoch-end one
    path, m = latest_checkpoint(run, epoch_end=True)
    assert path == str(written[-1]) and m["step"] == 20
    assert newest_local_checkpoint(run) == written[-1]
    (written[-1] / "state.pt").write_bytes(b"cut short by a kill")
    assert newest_local_checkpoint(run) == written[-2]  # the one before, which loads
    assert json.loads((written[-2] / "metrics.json").read_text())[MID_EPOCH] == 1


def test_local_mode_keeps_the_best_evaluated_and_the_latest_checkpoint(tmp_path):
    """With the sweep's metric (as the loop passes it), a run keeps what Ray Train's
    CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=metric) keeps: the latest
    checkpoint and the best evaluated one, at most 2; a mid-epoch checkpoint (metric NaN)
    is never the best; for a loss (mode min) the lowest value is."""
    import math

    from archlab.platform.config import load_config
    from archlab.platform.train import MID_EPOCH, build_from_spec, checkpoint_score, model_spec, persist_local
    from archlab.platform.trainer import Trainer

    cfg = load_config(None, ["model.arch=lstm", "train.num_workers=0"], smoke_test=True)
    spec = model_spec(cfg, {"dim": 8, "vocab_size": None})
    trainer = Trainer(build_from_spec(spec), cfg, total_steps=40)
    run = tmp_path / "run"
    score = ("val_cosine_seed", "max")
    history = []
    # eval 1 is the best (0.6); then a mid-epoch one, a worse eval 2, a mid-epoch one, eval 3 worse again
    for step, ev, value in ((8, 1, 0.6), (12, 1, None), (16, 2, 0.4), (20, 2, None), (24, 3, 0.5)):
        trainer.step = step
        m = {"epoch": ev, "eval": ev, "step": step, "val_cosine_seed": math.nan if value is None else value,
             **({MID_EPOCH: 1} if value is None else {})}
        history.append(persist_local(trainer, spec, m, run, score=score).name)
        kept = sorted(p.name for p in run.glob("checkpoint_*"))
        assert len(kept) <= 2 and history[-1] in kept
        assert history[0] in kept  # the best evaluated one stays whatever came after it
    assert sorted(p.name for p in run.glob("checkpoint_*")) == sorted([history[0], history[-1]])
    assert checkpoint_score({"val_loss": 1.5}, ("val_loss", "min")) > checkpoint_score({"val_loss": 2.0}, ("val_loss", "min"))
    assert checkpoint_score({MID_EPOCH: 1, "val_loss": 0.1}, ("val_loss", "min")) == -math.inf
    # a new best replaces the old one: only the new checkpoint is left
    trainer.step = 32
    newest = persist_local(trainer, spec, {"epoch": 4, "eval": 4, "step": 32, "val_cosine_seed": 0.7}, run, score=score)
    assert [p.name for p in run.glob("checkpoint_*")] == [newest.name]
