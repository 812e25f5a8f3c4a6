"""Zoo III, weight sharing and conditional depth: gpt2's ffn_sharing / attn_sharing / tie_io,
universal, mod (Mixture-of-Depths) and bdh (Baby Dragon Hatchling).

The registry-driven invariants (causality, step == forward, loss falls, JSON round-trip,
exact parameter counts) run from tests/test_zoo_invariants.py; here are the properties
specific to each: sharing is by the same Parameter object (seen once by the optimiser,
gradients summed over the layers that use it), MoD's training-mode top-k is not causal
while its eval rule is, BDH's parameters do not depend on depth and its attention is the
strictly-past RoPE linear attention of the equations. All at debug size, on one thread.
"""

from __future__ import annotations

import dataclasses
import io as _io
import math

import pytest
import torch
import torch.nn.functional as F

from archlab.architectures import build_model, load_module
from archlab.architectures.aux import collect_aux_losses, collect_routing_stats
from archlab.architectures.io import count_params


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def cfg_of(name: str, flavor: str = "debug", **overrides):
    return dataclasses.replace(load_module(name).FLAVORS[flavor], **overrides)


def backbone(name: str, d_input: int = 32, **overrides):
    return load_module(name).build(cfg_of(name, **overrides), d_input)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------ gpt2 sharing options

# Fingerprint of gpt2's debug models built by the code before the sharing options existed
# (commit b168078), torch.manual_seed(0): state_dict keys, element count, and
# sum_i (i + 1) * sum(tensor_i) over the sorted keys. A checkpoint saved then loads now
# (same keys and shapes) and a seeded build gives the same weights (same creation order).
_GPT2_BLOCK_KEYS = [f"backbone.h.{i}.{k}" for i in range(2) for k in (
    "attn.c_attn.bias", "attn.c_attn.weight", "attn.c_proj.bias", "attn.c_proj.weight",
    "ln_1.bias", "ln_1.weight", "ln_2.bias", "ln_2.weight",
    "mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "mlp.c_proj.weight")]
_GPT2_BEFORE = {
    "vector": (_GPT2_BLOCK_KEYS + ["backbone.ln_f.bias", "backbone.ln_f.weight", "backbone.wpe.weight",
                                   "head.bias", "head.weight", "in_proj.bias", "in_proj.weight"],
               59832, 2450.647561381324),
    "token": (_GPT2_BLOCK_KEYS + ["backbone.ln_f.bias", "backbone.ln_f.weight", "backbone.wpe.weight",
                                  "embed.weight", "lm_head.weight", "norm.bias", "norm.weight"],
              74688, 3355.648558838848),
}


@pytest.mark.parametrize("task", ["vector", "token"])
def test_gpt2_default_flavor_unchanged_by_sharing_options(task):
    cfg = cfg_of("gpt2")
    assert not (cfg.ffn_sharing or cfg.attn_sharing or cfg.tie_io), "sharing options must default to off"
    torch.manual_seed(0)
    model = (build_model("gpt2", "vector", cfg, d_in=24) if task == "vector"
             else build_model("gpt2", "token", cfg, vocab_size=256))
    sd = model.state_dict()
    keys, numel, checksum = _GPT2_BEFORE[task]
    assert sorted(sd) == keys
    assert sum(v.numel() for v in sd.values()) == numel
    found = float(sum((v.double() * (i + 1)).sum() for i, (_, v) in enumerate(sorted(sd.items()))))
    assert found == pytest.approx(checksum, rel=1e-9), "seeded weights differ from the pre-sharing code"


def _module_size(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("share", [("ffn_sharing",), ("attn_sharing",), ("ffn_sharing", "attn_sharing")])
def test_gpt2_sharing_is_one_parameter_and_count_drops_exactly(share):
    L = 3
    plain = backbone("gpt2", n_layers=L)
    shared = backbone("gpt2", n_layers=L, **{s: True for s in share})
    drop = 0
    if "ffn_sharing" in share:
        drop += (L - 1) * _module_size(plain.h[0].mlp)
    if "attn_sharing" in share:
        drop += (L - 1) * _module_size(plain.h[0].attn)
    assert n_params(plain) - n_params(shared) == drop
    for i in range(1, L):
        for part, shared_on in (("mlp", "ffn_sharing" in share), ("attn", "attn_sharing" in share)):
            for (name, p0), (_, pi) in zip(getattr(shared.h[0], part).named_parameters(),
                                           getattr(shared.h[i], part).named_parameters()):
                # `is`, not only equal data_ptr: copying .data would share storage between
                # two Parameters (two optimiser states, two updates)
                assert (pi is p0) == shared_on, f"h.{i}.{part}.{name}"
                assert (pi.data_ptr() == p0.data_ptr()) == shared_on
        # norms stay per layer
        assert shared.h[i].ln_1.weight is not shared.h[0].ln_1.weight


def test_gpt2_shared_ffn_seen_once_by_optimiser_and_gets_summed_gradient():
    L = 3
    shared = backbone("gpt2", n_layers=L, ffn_sharing=True).double()
    # the same weights without sharing: every layer's MLP a separate copy of block 0's
    unshared = backbone("gpt2", n_layers=L).double()
    unshared.load_state_dict(shared.state_dict())
    for i in range(1, L):
        assert unshared.h[i].mlp is not unshared.h[0].mlp
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert torch.allclose(shared(x), unshared(x), atol=1e-12)
    shared(x).pow(2).sum().backward()
    unshared(x).pow(2).sum().backward()
    # the shared weight's gradient is the sum of its uses
    want = sum(unshared.h[i].mlp.c_fc.weight.grad for i in range(L))
    assert torch.allclose(shared.h[0].mlp.c_fc.weight.grad, want, atol=1e-10)

    opt = torch.optim.AdamW(shared.parameters(), lr=1e-2)
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(shared.parameters()))
    before = shared.h[0].mlp.c_fc.weight.detach().clone()
    opt.step()
    assert len(opt.state) == len(listed)  # one Adam state per shared tensor
    for i in range(L):
        assert shared.h[i].mlp.c_fc.weight is shared.h[0].mlp.c_fc.weight
    assert not torch.equal(before, shared.h[0].mlp.c_fc.weight)


def test_gpt2_sharing_survives_to_and_state_dict_roundtrip():
    model = backbone("gpt2", n_layers=3, ffn_sharing=True, attn_sharing=True).to(torch.float64)
    assert model.h[2].mlp.c_fc.weight is model.h[0].mlp.c_fc.weight
    assert model.h[2].mlp.c_fc.weight.dtype == torch.float64
    sd = model.state_dict()
    assert "h.2.mlp.c_fc.weight" in sd  # every layer's key is listed, on one tensor
    buf = _io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = backbone("gpt2", n_layers=3, ffn_sharing=True, attn_sharing=True).to(torch.float64)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.h[1].attn.c_attn.weight is fresh.h[0].attn.c_attn.weight
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_tie_io_shares_the_input_projection():
    untied = build_model("gpt2", "vector", cfg_of("gpt2"), d_in=24)
    tied = build_model("gpt2", "vector", cfg_of("gpt2", tie_io=True), d_in=24)
    assert tied.head.weight is tied.in_proj.weight
    d_model = cfg_of("gpt2").d_model
    assert count_params(untied) - count_params(tied) == d_model * 24  # the head's weight
    x = F.normalize(torch.randn(2, 5, 24), dim=-1)
    with torch.no_grad():
        manual = F.linear(tied.backbone(tied.in_proj(x)), tied.in_proj.weight.t(), tied.head.bias)
        assert torch.allclose(tied(x), F.normalize(manual, dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="tie_io"):
        build_model("gpt2", "vector", cfg_of("gpt2", tie_io=True), d_in=24, d_out=16)


def test_token_task_always_ties_embedding():
    model = build_model("gpt2", "token", cfg_of("gpt2"), vocab_size=256)
    assert model.lm_head.weight is model.embed.weight


# -------------------------------------------------------------------------- universal

def test_universal_param_count_independent_of_steps():
    counts = {n: n_params(backbone("universal", n_steps=n, step_embedding=False)) for n in (1, 3, 6)}
    assert len(set(counts.values())) == 1, counts
    d = cfg_of("universal").d_model
    assert n_params(backbone("universal", n_steps=6)) - counts[6] == 6 * d  # the step table


def test_universal_equals_fully_shared_gpt2():
    """A UT unrolled n times is a gpt2 stack whose blocks are all one module (norms, the
    only per-layer parameters left, set equal)."""
    n = 3
    ut = backbone("universal", n_steps=n, step_embedding=False).double().eval()
    g = backbone("gpt2", n_layers=n, ffn_sharing=True, attn_sharing=True).double().eval()
    g.wpe.load_state_dict(ut.wpe.state_dict())
    g.ln_f.load_state_dict(ut.ln_f.state_dict())
    for i in range(n):
        g.h[i].load_state_dict(ut.block.state_dict())
    with torch.no_grad():
        ut.block.ln_1.weight.uniform_(0.5, 1.5)  # make the norms non-trivial, then copy
        for i in range(n):
            g.h[i].ln_1.weight.copy_(ut.block.ln_1.weight)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert torch.allclose(ut(x), g(x), atol=1e-12)
    with_emb = backbone("universal", n_steps=n, step_embedding=True).double().eval()
    with torch.no_grad():
        with_emb.step_emb.weight.normal_()
    assert not torch.allclose(with_emb(x), ut(x))  # the step embedding is read


# -------------------------------------------------------------------------------- MoD

def test_mod_capacity_keeps_k_at_least_one_at_context_5():
    capacity_k = load_module("mod").capacity_k
    assert [capacity_k(c, 5) for c in (0.01, 0.125, 0.2, 0.25, 0.5, 1.0)] == [1, 1, 1, 2, 3, 5]
    assert capacity_k(0.125, 512) == 64


def _routed(model):
    return model.h[1]


def test_mod_processes_exactly_k_tokens_in_training_and_may_skip_the_last():
    model = backbone("mod", capacity=0.25).train()
    seen = []
    _routed(model).block.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    x = torch.randn(16, 5, 32)
    model(x)
    assert seen == [torch.Size([16, 2, 32])]  # k = ceil(0.25 * 5) = 2 of 5, per sequence
    # the predicting (last) position is an ordinary candidate: some rows skip it, and
    # there the routed layer leaves it unchanged
    blk = _routed(model)
    h = model.h[0](model.drop(model.in_proj(x) + model.wpe.weight[:5]))
    r = blk.route_logits(h)
    last_in = (r.topk(2, dim=1).indices == 4).any(dim=1)
    assert (~last_in).any() and last_in.any()
    out = blk(h)
    assert torch.equal(out[~last_in, 4], h[~last_in, 4])


def test_mod_training_topk_routing_is_not_causal():
    """Documents the known problem: in train mode, changing future tokens changes which past
    tokens are in the top k, and so changes past outputs. Eval mode (threshold) is causal."""
    model = backbone("mod", capacity=0.5).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 12, 32, generator=g, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(4, 6, 32, generator=g, dtype=torch.float64)
    blk = _routed(model)
    with torch.no_grad():
        model.train()
        member = []
        for inp in (x, x2):
            h = model.h[0](model.in_proj(inp) + model.wpe.weight[:12])
            member.append(blk.route_logits(h).topk(6, dim=1).indices.sort(dim=1).values)
        assert not torch.equal(member[0], member[1]), "future tokens did not change routing"
        leak = (model(x)[:, :6] - model(x2)[:, :6]).abs().max().item()
        assert leak > 1e-3, f"train-mode outputs before t=6 changed by only {leak:.3g}"
        model.eval()
        past = (model(x)[:, :6] - model(x2)[:, :6]).abs().max().item()
        assert past < 1e-12


def test_mod_masked_path_equals_gathered_path():
    blk = _routed(backbone("mod", capacity=0.5)).double()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    r = blk.route_logits(x)
    idx = r.topk(5, dim=1).indices.sort(dim=1).values
    routed = torch.zeros_like(r, dtype=torch.bool).scatter(1, idx, True)
    a, b = blk.forward_gathered(x, idx, r), blk.forward_masked(x, routed, r)
    assert torch.allclose(a, b, atol=1e-12)


def test_mod_full_capacity_with_open_gate_is_the_dense_block():
    blk = _routed(backbone("mod", capacity=1.0)).double()
    with torch.no_grad():
        blk.router.weight.zero_()
        blk.router.bias.fill_(40.0)  # sigmoid(40) == 1 in fp64
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    dense = blk.block(x)
    assert torch.allclose(blk.train()(x), dense, atol=1e-12)
    assert torch.allclose(blk.eval()(x), dense, atol=1e-12)


def test_mod_router_gets_task_gradient_and_bce_and_stats_reach_the_platform():
    model = build_model("mod", "vector", cfg_of("mod", capacity=0.5), d_in=24).train()
    x = torch.randn(4, 6, 24)
    y = model(x)
    aux = collect_aux_losses(model)
    assert set(aux) == {"mod_router_bce"} and aux["mod_router_bce"][1] == cfg_of("mod").router_bce_weight
    blk = model.backbone.h[1]
    h = model.backbone.h[0](model.backbone.in_proj(model.in_proj(x)) + model.backbone.wpe.weight[:6])
    r = blk.route_logits(h)
    member = torch.zeros_like(r).scatter(1, r.topk(3, dim=1).indices, 1.0)
    assert torch.allclose(aux["mod_router_bce"][0], F.binary_cross_entropy_with_logits(r, member))
    y.sum().backward(retain_graph=True)  # the task loss alone
    assert blk.router.weight.grad is not None and blk.router.weight.grad.abs().sum() > 0
    stats = collect_routing_stats(model)
    assert stats["mod_topk_frac"] == pytest.approx(0.5)
    assert stats["mod_threshold_frac"] == pytest.approx((r > 0).float().mean().item())
    agree = ((r > 0).float() == member).float().mean().item()
    assert stats["mod_router_agree"] == pytest.approx(agree)
    assert collect_routing_stats(model) == {}  # reset by the call
    model.eval()
    with torch.no_grad():
        model(x)
    assert collect_aux_losses(model) == {}  # no router loss at eval


# -------------------------------------------------------------------------------- BDH

def test_bdh_param_count_does_not_depend_on_depth():
    cfg = cfg_of("bdh")
    counts = [n_params(backbone("bdh", d_input=cfg.d_model, n_layers=n)) for n in (1, 2, 7)]
    assert counts == [3 * cfg.mult * cfg.d_model ** 2] * 3
    bb = backbone("bdh", d_input=12, n_layers=3)
    assert {n for n, _ in bb.named_parameters()} == {"in_proj.weight", "in_proj.bias", "encoder", "encoder_v", "decoder"}


def _bdh_reference(bb, x: torch.Tensor) -> torch.Tensor:
    """The equations with explicit loops over heads, queries and strictly-past keys, the
    RoPE score written as the real part of a complex product of relative phase."""
    ln = lambda t: F.layer_norm(t, t.shape[-1:])  # noqa: E731
    B, T, _ = x.shape
    nh, N = bb.n_heads, bb.n_neurons
    freqs = bb.freqs.double()[0::2]  # one frequency per pair
    x = ln(bb.in_proj(x))  # (B, T, D)
    for _ in range(bb.n_layers):
        xs = F.relu(torch.einsum("btd,hdn->bhtn", x, bb.encoder))
        z = torch.complex(xs[..., 0::2], xs[..., 1::2])  # (B, nh, T, N/2)
        a = torch.zeros(B, nh, T, x.shape[-1], dtype=x.dtype)
        for t in range(T):
            for tau in range(t):  # strictly past
                rot = torch.exp(1j * 2 * math.pi * (t - tau) * freqs)
                score = (z[:, :, t] * z[:, :, tau].conj() * rot).real.sum(-1)  # (B, nh)
                a[:, :, t] += score[..., None] * x[:, None, tau]
        ys = F.relu(ln(a) @ bb.encoder_v)
        h = (xs * ys).transpose(1, 2).reshape(B, T, nh * N)
        x = ln(x + ln(h @ bb.decoder))
    return x


def test_bdh_matches_loop_reference_and_reads_strictly_past():
    bb = backbone("bdh", d_input=12, n_layers=2, d_model=8, n_heads=2, mult=2).double().eval()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(bb(x), _bdh_reference(bb, x), atol=1e-10)
        # position 0 reads nothing (a = 0, so y = 0): each layer only re-normalises x
        x0 = bb.in_proj(x[:, :1])
        for _ in range(1 + bb.n_layers):
            x0 = F.layer_norm(x0, (8,))
        assert torch.allclose(bb(x[:, :1]), x0, atol=1e-12)


def test_bdh_activations_nonnegative_and_sparsity_reported():
    model = build_model("bdh", "vector", cfg_of("bdh"), d_in=24).eval()
    bb = model.backbone
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        model(x)
        x0 = F.layer_norm(bb.in_proj(model.in_proj(x)), (bb.d_model,)).unsqueeze(1)
        xs = F.relu(x0 @ bb.encoder)
    stats = collect_routing_stats(model)
    assert stats["bdh_x_active.layer0"] == pytest.approx((xs > 0).float().mean().item(), abs=1e-6)
    for name in ("bdh_x_active", "bdh_y_active", "bdh_xy_active"):
        assert 0.0 < stats[name] < 1.0, (name, stats[name])
    # the gated product is at most as dense as either factor
    assert stats["bdh_xy_active"] <= min(stats["bdh_x_active"], stats["bdh_y_active"]) + 1e-6
    assert collect_routing_stats(model) == {}


# ------------------------------------------------------------------------ search spaces

@pytest.mark.parametrize("name", ["universal", "mod", "bdh"])
@pytest.mark.parametrize("smoke", [True, False], ids=["smoke", "full"])
def test_search_space_choices_make_valid_configs(name, smoke):
    """The space's categorical values build (on the debug flavor for SMOKE, the seed-sized
    flavor otherwise): every combination of the fields that constrain each other (widths,
    heads, neurons per head), each other value on its own."""
    import itertools

    from archlab.architectures.registry import make_config
    from archlab.search_spaces import load_space

    space = {k[6:]: v["choices"] for k, v in load_space(name, smoke=smoke).items()
             if k.startswith("model.") and k != "model.head" and "choices" in v}  # head: a ModelConfig field
    flavor = "debug" if smoke else "seed"
    joint = [k for k in ("d_model", "n_heads", "mult") if k in space]
    combos = [dict(zip(joint, vals)) for vals in itertools.product(*(space[k] for k in joint))]
    combos += [{k: v} for k, vals in space.items() if k not in joint for v in vals]
    for over in combos:
        cfg = make_config(name, flavor, over)
        with torch.device("meta"):  # building is the check; no memory for wide choices
            build_model(name, "vector", cfg, d_in=24)


# ------------------------------------------------------- the seed Transformer's options

# The same fingerprint for the seed Transformer's debug models at commit b168078, with the
# sorted key list as a sha1 (30 / 28 keys).
_TRANSFORMER_BEFORE = {
    "vector": ("411ad65a255dfb7f6383e9045891ab2951594658", 19736, 1357.1927270684246),
    "token": ("e541728f6f02b972bb999bc93c33f7e79ff49a23", 33536, 2770.807893570735),
}


@pytest.mark.parametrize("task", ["vector", "token"])
def test_transformer_default_flavor_unchanged_by_sharing_options(task):
    import hashlib

    torch.manual_seed(0)
    cfg = cfg_of("transformer")
    model = (build_model("transformer", "vector", cfg, d_in=24) if task == "vector"
             else build_model("transformer", "token", cfg, vocab_size=256))
    sd = model.state_dict()
    digest, numel, checksum = _TRANSFORMER_BEFORE[task]
    assert hashlib.sha1(",".join(sorted(sd)).encode()).hexdigest() == digest
    assert sum(v.numel() for v in sd.values()) == numel
    found = float(sum((v.double() * (i + 1)).sum() for i, (_, v) in enumerate(sorted(sd.items()))))
    assert found == pytest.approx(checksum, rel=1e-9)


def test_transformer_sharing_one_parameter_and_count_drop():
    L = 3
    plain = backbone("transformer", n_layers=L)
    lay = plain.encoder.layers[0]
    ffn = n_params(lay.linear1) + n_params(lay.linear2)
    for share, drop in ((("ffn_sharing",), ffn), (("attn_sharing",), n_params(lay.self_attn)),
                        (("ffn_sharing", "attn_sharing"), ffn + n_params(lay.self_attn))):
        shared = backbone("transformer", n_layers=L, **{s: True for s in share})
        assert n_params(plain) - n_params(shared) == (L - 1) * drop, share
        layers = shared.encoder.layers
        for i in range(1, L):
            assert (layers[i].linear1.weight is layers[0].linear1.weight) == ("ffn_sharing" in share)
            assert (layers[i].self_attn.in_proj_weight is layers[0].self_attn.in_proj_weight) == (
                "attn_sharing" in share)
            assert layers[i].norm1.weight is not layers[0].norm1.weight


@pytest.mark.parametrize("name", ["gpt2", "transformer"])
def test_shared_stacks_keep_causality_and_step(name):
    model = backbone(name, n_layers=3, ffn_sharing=True, attn_sharing=True).double().eval()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(model(x2)[:, :5], y[:, :5], atol=1e-12)
        state, steps = model.init_state(2), []
        for t in range(8):
            y_t, state = model.step(x[:, t], state)
            steps.append(y_t)
    assert torch.allclose(torch.stack(steps, 1), y, atol=1e-10)
