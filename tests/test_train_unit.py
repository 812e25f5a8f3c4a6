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
