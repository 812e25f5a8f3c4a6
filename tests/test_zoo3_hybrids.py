"""Zoo III hybrids: the mixer registry, the sparse MoE and the moe / jamba / zamba / hymba /
mode architectures. The registry-driven invariants (causality, step == forward, loss falls,
JSON round-trip, exact counts) are in tests/test_zoo_invariants.py; these are the
properties specific to each piece. Everything at debug size or smaller, fp64 where a
tolerance matters."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from archlab.architectures import build_model, load_module
from archlab.architectures.aux import collect_aux_losses, collect_routing_stats
from archlab.architectures.io import count_params
from archlab.architectures.mixers import (
    MIXERS,
    HybridStack,
    build_ffn,
    build_mixer,
    mixer_class,
)
from archlab.architectures.moe import SparseMoE, active_params, forward_flops

FIXTURE = Path(__file__).parent / "fixtures" / "pre_registry_states.pt"

# options every registered mixer accepts at d_model 16 (each takes the ones it has fields for)
OPTS = dict(n_heads=2, window=4, d_state=8, headdim=8, chunk_size=8, head_size=8, k=4, block_size=4,
            max_len=32, nb_features=8, rnn_heads=2, filter_order=8, emb_dim=5, mix_lora=4, decay_lora=4,
            n_layers=len(MIXERS), dropout=0.0, d_ff=32)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


# ---- mixer registry ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MIXERS))
def test_registry_mixer_is_the_architectures_own_class(kind):
    """The registry builds the class the architecture itself uses, with the same parameter
    names and shapes as inside that architecture's model."""
    spec = MIXERS[kind]
    cls = mixer_class(kind)
    mixer = build_mixer(kind, 16, OPTS)
    inner = [m for m in mixer.modules() if type(m) is cls]
    assert inner, f"{kind}: registry mixer {type(mixer).__name__} contains no {cls.__name__}"
    mod = load_module(spec.arch)
    arch_cfg = dataclasses.replace(mod.FLAVORS["debug"], d_model=16,
                                   **{k: v for k, v in OPTS.items()
                                      if k in {f.name for f in dataclasses.fields(mod.Config)} and k != "n_layers"})
    backbone = mod.build(arch_cfg, 16)
    in_arch = [m for m in backbone.modules() if type(m) is cls]
    assert in_arch, f"{kind}: {spec.arch}'s own backbone has no {cls.__name__}: the registry names the wrong class"
    shapes = {k: tuple(v.shape) for k, v in inner[0].state_dict().items()}
    arch_shapes = {k: tuple(v.shape) for k, v in in_arch[0].state_dict().items()}
    assert shapes == arch_shapes, f"{kind}: registry {cls.__name__} keys/shapes differ from {spec.arch}'s"


def test_models_saved_before_the_registry_still_load_and_agree():
    """State dicts saved by main's code before mixers.py existed load with strict=True, with
    the same parameter count, and give the same outputs."""
    saved = torch.load(FIXTURE, weights_only=False)
    assert len(saved) >= 10
    for name, entry in saved.items():
        mod = load_module(name)
        cfg = mod.Config(**entry["config"])
        model = build_model(name, "vector", cfg, d_in=entry["x"].shape[-1]).eval()
        model.load_state_dict(entry["state_dict"], strict=True)
        assert count_params(model) == entry["n_params"], f"{name}: parameter count changed"
        with torch.no_grad():
            y = model(entry["x"])
        err = (y - entry["y"]).abs().max().item()
        assert err < 1e-5, f"{name}: output after reload differs by {err:.3g}"


def _every_mixer_stack(kinds, ffn="dense"):
    return HybridStack(16, 16, kinds, [ffn] * len(kinds), OPTS).double().eval()


def test_a_pattern_of_every_mixer_is_causal_and_steps():
    stepping = [k for k, s in MIXERS.items() if s.step]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 16, dtype=torch.float64, generator=g)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    for kinds in (list(MIXERS), stepping):
        stack = _every_mixer_stack(kinds)
        with torch.no_grad():
            y, y2 = stack(x), stack(x2)
        assert (y[:, :6] - y2[:, :6]).abs().max() < 1e-6, f"pattern {kinds} leaks the future"
        assert (y[:, 6] - y2[:, 6]).abs().max() > 1e-6
    stack = _every_mixer_stack(stepping, ffn="moe")
    with torch.no_grad():
        full = stack(x)
        st = stack.init_state(2)
        outs = []
        for t in range(x.shape[1]):
            o, st = stack.step(x[:, t], st)
            outs.append(o)
    # 1e-6 as the zoo invariant: performer's features are computed in fp32 even for fp64 inputs
    assert (torch.stack(outs, 1) - full).abs().max() < 1e-6
    with pytest.raises(NotImplementedError, match="hyena"):
        _every_mixer_stack(["mamba2", "hyena"]).init_state(1)


def test_unknown_mixer_and_ffn_name_themselves():
    with pytest.raises(ValueError, match="unknown mixer 'mamba3'.*mamba2"):
        build_mixer("mamba3", 16, OPTS)
    with pytest.raises(ValueError, match="unknown ffn 'sparse'"):
        build_ffn("sparse", 16, {})


# ---- sparse MoE --------------------------------------------------------------------------

def _moe(**kw):
    args = dict(n_experts=4, top_k=2, d_hidden=8, lb_weight=0.01, z_weight=0.001)
    args.update(kw)
    return SparseMoE(8, **args).double()


def test_load_balance_is_one_at_uniform_router_and_rises_when_collapsed():
    moe = _moe()
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()  # p = 1/E for every token, whatever the top-k ties pick
    moe(x)
    lb = moe.aux_losses()["load_balance"][0].item()
    assert lb == pytest.approx(1.0, abs=1e-12)
    x_pos = x.abs() + 0.1
    with torch.no_grad():  # every token strongly prefers expert 0, then expert 1
        moe.router.weight[0].fill_(5.0)
        moe.router.weight[1].fill_(2.0)
    moe(x_pos)
    collapsed = moe.aux_losses()["load_balance"][0].item()
    # f = (1/2, 1/2, 0, 0), P ~ (1, 0, 0, 0): L -> E/2 = 2
    assert collapsed > 1.9, f"collapsed routing gives load balance {collapsed}"


def test_z_loss_at_zero_logits_is_log_E_squared():
    moe = _moe(n_experts=6, n_noop=2)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(5, 8, dtype=torch.float64))
    z = moe.aux_losses()["router_z"][0].item()
    assert z == pytest.approx(math.log(8) ** 2, rel=1e-12)


def _reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: softmax, top-k, renormalise, weighted sum of the chosen experts."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(moe.router.weight @ x[n], dim=-1)
        w, e = p.topk(moe.top_k)
        if moe.renormalize:
            w = w / w.sum()
        for wj, ej in zip(w, e):
            if ej < moe.n_experts:
                out[n] += wj * moe.expert(int(ej), x[n:n + 1])[0]
    return out


@pytest.mark.parametrize("renormalize,n_noop", [(True, 0), (False, 0), (True, 2)])
def test_dropless_top_k_equals_per_token_loop(renormalize, n_noop):
    moe = _moe(renormalize=renormalize, n_noop=n_noop)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    y = moe(x)
    ref = _reference(moe, x.reshape(-1, 8)).view_as(x)
    assert (y - ref).abs().max() < 1e-12


def test_top_k_equal_to_E_is_the_dense_mixture():
    moe = _moe(top_k=4)
    x = torch.randn(10, 8, dtype=torch.float64)
    p = torch.softmax(x @ moe.router.weight.T, dim=-1)
    dense = sum(p[:, e:e + 1] * moe.expert(e, x) for e in range(4))
    assert (moe(x) - dense).abs().max() < 1e-12


def test_router_learns_through_the_combine_weights():
    moe = _moe()
    moe(torch.randn(6, 8, dtype=torch.float64)).pow(2).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_capacity_drops_pass_through_and_stay_causal():
    moe = _moe(n_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # everyone prefers expert 0 (x[..., 0] > 0)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1
    moe.train()
    y = moe(x)
    # cap = ceil(0.5 * 12 * 1 / 2) = 3: the first 3 in (position, row) order are computed
    done = (y.abs().sum(-1) > 0)
    assert done.sum() == 3 and done[:, :1].all() and done[0, 1] and not done[:, 2:].any()
    stats = moe.routing_stats()
    assert stats["dropped_frac"] == pytest.approx(9 / 12)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 8, dtype=torch.float64)
    assert (moe(x2)[:, :4] - y[:, :4]).abs().max() == 0  # later positions cannot take a slot
    # dropped pairs are not computed: 3 expert calls' worth of FLOPs plus the router
    assert forward_flops(moe.train(), x) == 2 * 12 * 8 * 2 + 2 * 3 * moe.expert_params
    moe.eval()  # eval is dropless
    assert (moe(x).abs().sum(-1) > 0).all()


def test_routing_stats_and_aux_through_the_platform_interface():
    model = build_model("jamba", "token", load_module("jamba").FLAVORS["debug"], vocab_size=256)
    model(torch.randint(0, 256, (2, 9)))
    aux = collect_aux_losses(model)
    assert set(aux) == {"load_balance", "router_z"} and aux["load_balance"][1] == 0.01
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == 2  # layers 1 and 3 of 4 (moe_every 2, offset 1)
    lb = sum(m.aux_losses()["load_balance"][0] for m in moes)
    assert torch.allclose(aux["load_balance"][0], lb)
    stats = collect_routing_stats(model)
    fr = [stats[f"expert_frac.e{i}"] for i in range(4)]
    assert sum(fr) == pytest.approx(1.0) and 0 < stats["router_entropy"] <= math.log(4) + 1e-9
    assert collect_routing_stats(model) == {}  # reset by the call


def test_a_trained_moe_copies_and_pickles_without_its_last_graph():
    import copy
    import pickle

    model = build_model("moe", "vector", load_module("moe").FLAVORS["debug"], d_in=24)
    x = torch.randn(2, 5, 24)
    model(x).sum().backward()
    twin = copy.deepcopy(model)  # refuses the non-leaf aux tensors unless they are dropped
    back = pickle.loads(pickle.dumps(model))
    for m in (twin, back):
        assert collect_aux_losses(m) == {} and collect_routing_stats(m) == {}
        assert torch.equal(m.eval()(x), model.eval()(x))
    assert collect_aux_losses(model)  # the original keeps its latest losses


def test_active_params_counts_only_visited_experts():
    model = build_model("moe", "vector", load_module("moe").FLAVORS["debug"], d_in=24)
    total = count_params(model)
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("w_in", "w_out")))
    # debug: 4 experts, top-2, every layer: half of the expert parameters are idle per token
    assert active_params(model) == total - expert // 2


@pytest.mark.parametrize("top_k,n_noop", [(1, 0), (2, 0), (2, 2)])
def test_forward_flops_count_only_visited_experts(top_k, n_noop):
    moe = _moe(top_k=top_k, n_noop=n_noop)
    x = torch.randn(20, 8, dtype=torch.float64)
    flops = forward_flops(moe, x)
    with torch.no_grad():
        _, _, _, idx = moe.route(x)
    visits = int((idx < moe.n_experts).sum())  # no-op choices compute nothing
    router = 2 * 20 * 8 * (4 + n_noop)
    assert flops == router + 2 * visits * moe.expert_params
    if n_noop == 0:
        assert visits == 20 * top_k


# ---- jamba ---------------------------------------------------------------------------------

def test_jamba_layer_plan_follows_period_and_offset():
    jamba = load_module("jamba")
    cfg = jamba.Config(n_layers=12, attn_every=6, attn_offset=-1, moe_every=2, moe_offset=1)
    mixers, ffns = jamba.layer_plan(cfg)
    assert [i for i, m in enumerate(mixers) if m == "attention"] == [5, 11]  # seed 000's 5:1
    assert [i for i, f in enumerate(ffns) if f == "moe"] == [1, 3, 5, 7, 9, 11]
    mixers, _ = jamba.layer_plan(dataclasses.replace(cfg, n_layers=16, attn_every=8, attn_offset=4,
                                                     attn_type="performer"))
    assert [i for i, m in enumerate(mixers) if m != "mamba2"] == [4, 12] and mixers[4] == "performer"
    with pytest.raises(ValueError, match="attn_offset"):
        jamba.layer_plan(dataclasses.replace(cfg, attn_offset=6))
    with pytest.raises(ValueError, match="attn_type"):
        jamba.layer_plan(dataclasses.replace(cfg, attn_type="flash"))


@pytest.mark.parametrize("attn_type", ["linformer", "performer"])
def test_jamba_attention_types_are_causal_and_step(attn_type):
    jamba = load_module("jamba")
    cfg = dataclasses.replace(jamba.FLAVORS["debug"], attn_type=attn_type)
    bb = jamba.build(cfg, 32).double().eval()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        full = bb(x)
        x2 = x.clone()
        x2[:, 7:] += 1
        assert (bb(x2)[:, :7] - full[:, :7]).abs().max() < 1e-6
        st, outs = bb.init_state(2), []
        for t in range(11):
            o, st = bb.step(x[:, t], st)
            outs.append(o)
    assert (torch.stack(outs, 1) - full).abs().max() < 1e-6
    assert attn_type in bb.layer_kinds


# ---- zamba ---------------------------------------------------------------------------------

def _zamba(**kw):
    zamba = load_module("zamba")
    return zamba.build(dataclasses.replace(zamba.FLAVORS["debug"], **kw), 32).double()


def test_zamba_shared_block_is_one_object_seen_once_and_adapters_differ():
    bb = _zamba()
    assert len(bb.sites) == 2  # layers 1 and 3
    params = list(bb.parameters())
    assert len({id(p) for p in params}) == len(params)
    shared_ids = {id(p) for p in bb.shared.parameters()}
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-2)
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert all(in_opt.count(i) == 1 for i in shared_ids)
    before = {n: p.detach().clone() for n, p in bb.shared.named_parameters()}
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    bb(x).pow(2).mean().backward()
    opt.step()
    assert any((p - before[n]).abs().max() > 0 for n, p in bb.shared.named_parameters())
    a0, a1 = bb.sites[0], bb.sites[1]
    assert (a0.q.up.weight - a1.q.up.weight).abs().max() > 0  # adapters trained apart
    assert (a0.proj.weight - a1.proj.weight).abs().max() > 0
    # through the forward's own path (site_input): with the per-site parts made equal,
    # the two sites compute the same thing, so they share every other weight
    h, x0 = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (bb.site_input(h, x0, 0) - bb.site_input(h, x0, 1)).abs().max() > 1e-9
        a1.load_state_dict(a0.state_dict())
        s0, s1 = bb.site_input(h, x0, 0), bb.site_input(h, x0, 1)
    assert (s0 - s1).abs().max() == 0
    # the same tensors survive a state_dict round trip
    bb.load_state_dict(bb.state_dict(), strict=True)
    assert {id(p) for p in bb.shared.parameters()} == shared_ids


def test_zamba_zero_out_proj_makes_the_hybrid_layer_the_identity():
    bb = _zamba().eval()
    i = 1  # a hybrid layer (site 0)
    assert bb.site_of[i] == 0
    x0 = torch.randn(2, 7, 32, dtype=torch.float64)
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (bb.layer(i, h, x0) - h).abs().max() > 1e-6
        bb.mixers[i].out_proj.weight.zero_()
        assert (bb.layer(i, h, x0) - h).abs().max() == 0


def test_zamba_reads_the_input_embeddings_and_rank_zero_has_no_adapters():
    bb = _zamba().eval()
    x0 = torch.randn(2, 7, 32, dtype=torch.float64)
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (bb.layer(1, h, x0) - bb.layer(1, h, x0 + 1)).abs().max() > 1e-6
    plain = _zamba(adapter_rank=0)
    assert not any("site" in n and ".up." in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="never used"):
        _zamba(n_layers=1)


# ---- hymba ---------------------------------------------------------------------------------

def test_hymba_one_branch_beta_zero_gives_the_other_times_half():
    hymba = load_module("hymba")
    bb = hymba.build(hymba.FLAVORS["debug"], 32).double().eval()
    mixer = bb.layers[1].mixer
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        mixer.norm_attn.weight.normal_()
        mixer.norm_ssm.weight.normal_()
        a, s = mixer.attn(x), mixer.ssm(x)
        mixer.norm_attn.weight.zero_()
        assert (mixer(x) - mixer.norm_ssm(s) / 2).abs().max() < 1e-12
        mixer.norm_attn.weight.fill_(1.5)
        mixer.norm_ssm.weight.zero_()
        assert (mixer(x) - mixer.norm_attn(a) / 2).abs().max() < 1e-12
    assert mixer.routing_stats()["attn_share"] == pytest.approx(1.0)
    stats = collect_routing_stats(bb)
    assert stats["attn_share.l0"] == pytest.approx(0.5)  # untouched layer: betas at init


def test_hymba_window_and_meta_mask_table():
    from archlab.architectures.hymba import attention_mask

    # W = 3 keys including self, M = 2 meta tokens always visible; 1 = visible
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(attention_mask(8, 3, 2), expected)
    assert torch.equal(attention_mask(5, 0, 2), torch.ones(5, 5, dtype=torch.bool).tril())


def test_hymba_meta_tokens_are_stripped_and_change_the_output():
    hymba = load_module("hymba")
    cfg = hymba.FLAVORS["debug"]
    bb = hymba.build(cfg, 32).eval()
    assert bb.windows == [0, 4, 0] and bb.meta.shape == (2, 32)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        y = bb(x)
        bb.meta.add_(1.0)
        y2 = bb(x)
    assert y.shape == (2, 9, 32) and (y - y2).abs().max() > 1e-4


# ---- mode ----------------------------------------------------------------------------------

def test_mode_noop_experts_skip_the_ffn():
    moe = _moe(n_noop=2)
    x = torch.randn(12, 8, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[4:, 0] = 10.0  # no-op slots 4, 5 win wherever x[:, 0] > 0
    y = moe(x)
    skip = x[:, 0] > 0.5
    assert skip.any() and (~skip).any()
    assert (y[skip].abs().max() < 1e-6)  # both choices no-op (weight on real experts ~e^-5 or less)
    assert (y[x[:, 0] < -0.5].abs().sum(-1) > 1e-3).all()
    stats = moe.routing_stats()
    assert 0 < stats["noop_frac"] < 1 and "expert_frac.e4" not in stats


def test_mode_architecture_routes_to_noops_and_counts_active_params():
    mode = load_module("mode")
    model = build_model("mode", "token", mode.FLAVORS["debug"], vocab_size=256)
    model(torch.randint(0, 256, (2, 8)))
    stats = collect_routing_stats(model)
    assert 0 < stats["noop_frac"] < 1
    with pytest.raises(ValueError, match="n_noop"):
        mode.build(dataclasses.replace(mode.FLAVORS["debug"], n_noop=0), 32)
