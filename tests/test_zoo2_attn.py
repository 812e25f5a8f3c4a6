"""Zoo II, attention and quasi-recurrent group: linformer, performer, gpt2, qrnn, indrnn.

Mode equivalence (parallel forward vs recurrent step, on outputs and input gradients, at odd
sizes), each architecture against a reference written from its paper's equations, and the
architecture-specific properties (Linformer causality, FAVOR+ approximating softmax, GPT-2
init, IndRNN's |u| bound).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from archlab.architectures import build_model, load_module
from archlab.architectures.io import count_params
from archlab.kernels.scan.cpu_scan import find_compiler

torch.set_num_threads(1)

NAMES = ["linformer", "performer", "gpt2", "qrnn", "indrnn"]
FP32 = dict(rtol=3e-4, atol=1e-5)  # relative RMS tolerance, fp32


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_close(found: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 0.0, what: str = "") -> None:
    assert found.shape == ref.shape, f"{what}: shape {list(found.shape)} != reference {list(ref.shape)}"
    err = rel_rms(found, ref)
    abs_err = (found.float() - ref.float()).abs().max().item()
    assert err <= rtol or abs_err <= atol, f"{what}: relative RMS error {err:.3g} > {rtol} (max abs {abs_err:.3g})"


def debug_backbone(name: str, d_input: int = 32, **overrides):
    mod = load_module(name)
    cfg = dataclasses.replace(mod.FLAVORS["debug"], **overrides)
    torch.manual_seed(0)
    return mod.build(cfg, d_input).eval()


def run_steps(model, x: torch.Tensor) -> torch.Tensor:
    state = model.init_state(x.shape[0])
    ys = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1)


# variants: each architecture's debug flavor plus the config branches that change the math
VARIANTS = [
    ("linformer", {}),
    ("linformer", {"block_size": 5, "k": 3}),  # T=63 spans 13 blocks, the last one partial
    ("performer", {}),
    ("performer", {"chunk_size": 7}),
    ("gpt2", {}),
    ("qrnn", {}),
    ("qrnn", {"window": 1, "residual": False}),
    ("indrnn", {}),
    ("indrnn", {"activation": "tanh"}),
    ("indrnn", {"activation": "identity"}),  # the linear-scan path
]


def _vid(v):
    name, over = v
    return name + "".join(f"-{k}={val}" for k, val in over.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=[_vid(v) for v in VARIANTS])
@pytest.mark.parametrize("B,T,D", [(2, 63, 20), (1, 1, 32)], ids=["B2-T63-D20", "B1-T1-D32"])
def test_step_equals_forward_outputs_and_grads(variant, B, T, D):
    name, over = variant
    model = debug_backbone(name, d_input=D, **over)
    torch.manual_seed(1)
    x = torch.randn(B, T, D)
    w = torch.randn(B, T, model.d_model)  # a random readout so every output element matters
    xa = x.clone().requires_grad_(True)
    ya = model(xa)
    (ya * w).sum().backward()
    xb = x.clone().requires_grad_(True)
    yb = run_steps(model, xb)
    (yb * w).sum().backward()
    assert_close(yb, ya, **FP32, what=f"{name} step vs forward output")
    assert_close(xb.grad, xa.grad, **FP32, what=f"{name} step vs forward input grad")
    # parameter gradients too: the two paths must train the same model
    model.zero_grad(set_to_none=True)
    (model(x) * w).sum().backward()
    # a parameter one path never touches (linformer's E at T=1) has grad None: count it as 0
    def grads():
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for n, p in model.named_parameters()}

    g_fwd = grads()
    model.zero_grad(set_to_none=True)
    (run_steps(model, x) * w).sum().backward()
    for n, g in grads().items():
        assert_close(g, g_fwd[n], rtol=1e-3, atol=1e-6, what=f"{name} grad of {n}")


@pytest.mark.parametrize("name", NAMES)
def test_causal_perturbing_future_leaves_past_unchanged(name):
    model = debug_backbone(name, block_size=4) if name == "linformer" else debug_backbone(name)
    torch.manual_seed(2)
    x = torch.randn(2, 23, 32)
    y = model(x)
    for t in (0, 3, 4, 10, 21):  # block edges (linformer block_size 4) and interiors
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        y2 = model(x2)
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), f"{name}: output <= {t} changed when inputs > {t} changed"
        assert (y2[:, t + 1] - y[:, t + 1]).abs().max() > 1e-4, f"{name}: output {t + 1} ignores its own input"


# ---------------------------------------------------------------------------- linformer

def linformer_attention_naive(attn, x):
    """Per-query loop from the definition: softmax over [k compressed rows of the blocks before
    the query's block (E[:, :s] K[:s] / sqrt(s)), the query's own block up to itself]."""
    B, T, C = x.shape
    H, dh, L = attn.n_heads, attn.d_head, attn.L
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
    out = torch.zeros_like(q)
    for t in range(T):
        start = (t // L) * L
        keys, vals = k[:, :, start : t + 1], v[:, :, start : t + 1]
        if start > 0:
            ck = torch.einsum("rs,bhsd->bhrd", attn.E[:, :start], k[:, :, :start]) / math.sqrt(start)
            cv = torch.einsum("rs,bhsd->bhrd", attn.F[:, :start], v[:, :, :start]) / math.sqrt(start)
            keys, vals = torch.cat([ck, keys], dim=2), torch.cat([cv, vals], dim=2)
        p = (q[:, :, t : t + 1] @ keys.transpose(-1, -2) / math.sqrt(dh)).softmax(-1)
        out[:, :, t] = (p @ vals)[:, :, 0]
    return attn.out(out.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("T,L,r", [(63, 8, 5), (17, 4, 3), (6, 64, 8)], ids=["T63-L8-k5", "T17-L4-k3", "T6-L64-k8"])
def test_linformer_attention_matches_naive_definition(T, L, r):
    model = debug_backbone("linformer", block_size=L, k=r)
    attn = model.blocks[0].attn
    torch.manual_seed(3)
    x = torch.randn(2, T, 32, requires_grad=True)
    ya = attn(x)
    ga, = torch.autograd.grad(ya.pow(2).sum(), x)
    yb = linformer_attention_naive(attn, x)
    gb, = torch.autograd.grad(yb.pow(2).sum(), x)
    assert_close(ya, yb, **FP32, what="linformer attention vs naive")
    assert_close(ga, gb, **FP32, what="linformer attention grad vs naive")


def test_linformer_within_one_block_is_exact_causal_attention():
    # T <= block_size: no compressed past exists, so it must be plain causal softmax attention
    model = debug_backbone("linformer", block_size=16)
    attn = model.blocks[1].attn
    torch.manual_seed(4)
    x = torch.randn(3, 16, 32)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(3, 16, 4, 8).transpose(1, 2) for t in (q, k, v))
    ref = attn.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(3, 16, 32))
    assert_close(attn(x), ref, **FP32, what="linformer single block vs sdpa")


def test_linformer_compressed_past_is_used():
    # with block_size 4, the output at t=9 must depend on t=1 only through the compressed rows
    model = debug_backbone("linformer", block_size=4)
    torch.manual_seed(5)
    x = torch.randn(1, 10, 32)
    x2 = x.clone()
    x2[:, 1] += torch.randn(32)
    assert (model(x2)[:, 9] - model(x)[:, 9]).abs().max() > 1e-4


def test_linformer_rejects_too_long():
    model = debug_backbone("linformer", max_len=16)
    with pytest.raises(ValueError, match="max_len=16"):
        model(torch.randn(1, 17, 32))


# ---------------------------------------------------------------------------- performer

def test_orthogonal_features_are_orthogonal_per_block_and_reproducible():
    perf = load_module("performer")
    w = perf.orthogonal_gaussian_features(40, 16, seed=7).double()
    for blk in (w[:16], w[16:32], w[32:]):
        gram = blk @ blk.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-4 * gram.diagonal().max(), "rows in one block must be orthogonal"
    assert torch.equal(perf.orthogonal_gaussian_features(40, 16, seed=7), w.float())
    assert not torch.equal(perf.orthogonal_gaussian_features(40, 16, seed=8), w.float())


def test_favor_kernel_estimate_is_unbiased():
    # E[phi(q) . phi(k)] = exp(q . k / sqrt(d)): averaged over many features the estimate's
    # mean ratio to the exact kernel is 1 (a non-Haar orthogonal draw would bias it)
    perf = load_module("performer")
    torch.manual_seed(6)
    d = 16
    q, k = torch.randn(1, 1, 48, d) * 0.5, torch.randn(1, 1, 48, d) * 0.5
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d))
    proj = perf.orthogonal_gaussian_features(16384, d, seed=0)
    est = perf.favor_features(q, proj, False) @ perf.favor_features(k, proj, False).transpose(-1, -2)
    # relative error of a 16384-feature estimate: ~1/sqrt(m) times the per-feature spread
    assert rel_rms(est, exact) < 0.05, rel_rms(est, exact)


def test_favor_approximates_exact_causal_softmax_attention():
    perf = load_module("performer")
    torch.manual_seed(7)
    d, T = 16, 32
    q, k = torch.randn(2, 2, T, d) * 0.5, torch.randn(2, 2, T, d) * 0.5
    v = torch.randn(2, 2, T, 8)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def mean_err(m):
        return sum(rel_rms(perf.favor_causal(q, k, v, perf.orthogonal_gaussian_features(m, d, s)), exact)
                   for s in range(4)) / 4

    few, many = mean_err(16), mean_err(4096)
    assert many < 0.06, f"4096 features: relative RMS error {many:.3f} vs exact softmax attention"
    assert many < few / 4, f"error must fall with features: 16 -> {few:.3f}, 4096 -> {many:.3f}"


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_favor_prefix_sum_equals_recurrent_steps(chunk):
    perf = load_module("performer")
    from archlab.kernels.retention import retention_step

    torch.manual_seed(8)
    q, k, v = torch.randn(2, 3, 63, 12), torch.randn(2, 3, 63, 12), torch.randn(2, 3, 63, 5)
    proj = perf.orthogonal_gaussian_features(20, 12, seed=1)
    fwd = perf.favor_causal(q, k, v, proj, chunk_size=chunk)
    # the step path written out: running S = sum phi(k)^T v, z = sum phi(k)
    fq, fk = perf.favor_features(q, proj, True), perf.favor_features(k, proj, False)
    S = torch.zeros(2, 3, 20, 5)
    z = torch.zeros(2, 3, 20)
    outs = []
    for t in range(63):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + fk[:, :, t]
        outs.append(torch.einsum("bhm,bhmv->bhv", fq[:, :, t], S) / (fq[:, :, t] * z).sum(-1, keepdim=True))
    assert_close(fwd, torch.stack(outs, dim=2), rtol=1e-5, what=f"favor chunk={chunk} vs loop")
    # and the kernel's own step function gives the same state path
    state = None
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    for t in range(63):
        _, state = retention_step(fq[:, :, t], fk[:, :, t], v1[:, :, t], torch.ones(3), state)
    assert_close(state[..., :-1], S, rtol=1e-5, what="retention_step state vs S")


def test_performer_features_are_persistent_buffers_and_redraw_is_seeded():
    model = debug_backbone("performer")
    sd = model.state_dict()
    assert "blocks.0.attn.proj" in sd and "blocks.0.attn.seed" in sd
    assert int(sd["blocks.1.attn.seed"]) == 1  # feature_seed 0 + layer index
    x = torch.randn(1, 9, 32)
    y0 = model(x)
    model.redraw_features(100)
    assert int(model.blocks[0].attn.seed) == 100
    assert not torch.allclose(model(x), y0)
    model.redraw_features(0)
    assert torch.equal(model(x), y0)
    # a fresh model loading the checkpoint reproduces the outputs exactly
    other = debug_backbone("performer", feature_seed=55).eval()
    other.load_state_dict(sd)
    assert torch.equal(other(x), y0)


def test_performer_kernel_paths_agree():
    a = debug_backbone("performer", kernel="torch")
    b = debug_backbone("performer", kernel="reference")
    x = torch.randn(2, 21, 32)
    assert_close(a(x), b(x), **FP32, what="performer torch vs reference retention")


# ---------------------------------------------------------------------------- gpt2

def test_gpt2_block_matches_manual_attention():
    model = debug_backbone("gpt2")
    blk = model.h[0]
    torch.manual_seed(9)
    x = torch.randn(2, 13, 32)
    h = blk.ln_1(x)
    q, k, v = blk.attn.c_attn(h).split(32, dim=-1)
    q, k, v = (t.view(2, 13, 4, 8).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    att = q @ k.transpose(-1, -2) / math.sqrt(8)
    att = att.masked_fill(torch.ones(13, 13, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    a = blk.attn.c_proj((att @ v).transpose(1, 2).reshape(2, 13, 32))
    x1 = x + a
    m = blk.mlp.c_proj(0.5 * blk.mlp.c_fc(blk.ln_2(x1)) * (1 + torch.tanh(
        math.sqrt(2 / math.pi) * (blk.mlp.c_fc(blk.ln_2(x1)) + 0.044715 * blk.mlp.c_fc(blk.ln_2(x1)) ** 3))))
    assert_close(blk(x), x1 + m, **FP32, what="gpt2 block vs manual")


def test_gpt2_init_scales_residual_projections():
    mod = load_module("gpt2")
    cfg = dataclasses.replace(mod.FLAVORS["debug"], d_model=128, n_layers=8, n_heads=8)
    torch.manual_seed(0)
    model = mod.build(cfg, 128)
    resid = torch.cat([model.h[i].attn.c_proj.weight.flatten() for i in range(8)]
                      + [model.h[i].mlp.c_proj.weight.flatten() for i in range(8)])
    other = torch.cat([model.h[i].attn.c_attn.weight.flatten() for i in range(8)])
    assert abs(resid.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(other.std().item() - 0.02) < 0.0005
    assert abs(model.wpe.weight.std().item() - 0.02) < 0.001
    assert model.h[0].attn.c_attn.bias.abs().max() == 0


def test_gpt2_divisibility_error_names_both_fields():
    mod = load_module("gpt2")
    with pytest.raises(ValueError, match=r"model\.d_model=50.*model\.n_heads=6"):
        mod.build(dataclasses.replace(mod.FLAVORS["debug"], d_model=50, n_heads=6), 50)


def test_gpt2_positions_are_learned_and_bound_length():
    model = debug_backbone("gpt2", max_len=8)
    assert model.wpe.weight.requires_grad and model.wpe.weight.shape == (8, 32)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.randn(1, 9, 32))


# ---------------------------------------------------------------------------- qrnn

def test_qrnn_layer_matches_paper_fo_pooling():
    model = debug_backbone("qrnn", residual=False)
    layer = model.layers[0]
    torch.manual_seed(10)
    x = torch.randn(2, 19, 32)
    W, b = layer.proj.weight, layer.proj.bias  # (3 d, 2 d_in): [W_prev | W_cur]
    c = torch.zeros(2, 32)
    outs = []
    for t in range(19):
        prev = x[:, t - 1] if t > 0 else torch.zeros(2, 32)
        pre = prev @ W[:, :32].T + x[:, t] @ W[:, 32:].T + b
        z, f, o = torch.tanh(pre[:, :32]), torch.sigmoid(pre[:, 32:64]), torch.sigmoid(pre[:, 64:])
        c = f * c + (1 - f) * z
        outs.append(o * c)
    assert_close(layer(x), torch.stack(outs, 1), **FP32, what="qrnn layer vs fo-pooling loop")


def test_qrnn_scan_kernels_agree():
    x = torch.randn(2, 40, 32)
    ref = debug_backbone("qrnn", kernel="reference")(x)
    assert_close(debug_backbone("qrnn", kernel="torch")(x), ref, **FP32, what="qrnn torch vs reference scan")


# ---------------------------------------------------------------------------- indrnn

@pytest.mark.parametrize("act", ["relu", "identity"])
def test_indrnn_layer_matches_definition(act):
    model = debug_backbone("indrnn", activation=act)
    layer = model.layers[0]
    torch.manual_seed(11)
    x = torch.randn(2, 31, 32)
    u = layer.u_max * torch.tanh(layer.u_raw)
    h = torch.zeros(2, 32)
    outs = []
    for t in range(31):
        pre = x[:, t] @ layer.inp.weight.T + layer.inp.bias + u * h
        h = torch.relu(pre) if act == "relu" else pre
        outs.append(h)
    assert_close(layer(x), torch.stack(outs, 1), **FP32, what=f"indrnn {act} vs definition")


def test_indrnn_recurrent_weight_stays_bounded():
    model = debug_backbone("indrnn", u_max=0.9)
    layer = model.layers[0]
    with torch.no_grad():
        layer.u_raw.mul_(1e3)  # what a huge optimiser step could do
    assert layer.u.abs().max() <= 0.9
    # the bound keeps a long relu recurrence finite
    y = model(torch.randn(1, 200, 32))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="model.activation"):
        debug_backbone("indrnn", activation="gelu")


# ---------------------------------------------------------------------------- both tasks

@pytest.mark.parametrize("name", NAMES)
def test_both_task_heads_build_and_train_one_step(name):
    mod = load_module(name)
    cfg = mod.FLAVORS["debug"]
    torch.manual_seed(0)
    vec = build_model(name, "vector", cfg, d_in=24)
    x = torch.randn(2, 7, 24)
    y = vec(x)
    assert y.shape == (2, 7, 24) and torch.allclose(y.norm(dim=-1), torch.ones(2, 7), atol=1e-5)
    tok = build_model(name, "token", cfg, vocab_size=256)
    ids = torch.randint(0, 256, (2, 11))
    loss = F.cross_entropy(tok(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - math.log(256)) < 1.0
    assert all(p.grad is not None for p in tok.parameters() if p.requires_grad)
    assert count_params(build_model(name, "vector", cfg, d_in=768)) == mod.PARAM_COUNTS["debug"]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_tracks_fp32(name):
    # tiny: bf16 matmuls are emulated on this CPU (~500x slower than fp32)
    model = debug_backbone(name)
    x = torch.randn(1, 9, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert torch.isfinite(y.float()).all()
    assert_close(y, ref, rtol=5e-2, what=f"{name} bf16 autocast vs fp32")


@pytest.mark.parametrize("name,over,expected", [
    ("gpt2", {}, "sdpa"),
    ("linformer", {}, "torch"),
    ("performer", {"kernel": "reference"}, "retention:reference"),
    ("performer", {"kernel": "torch"}, "retention:torch"),
    ("qrnn", {"kernel": "reference"}, "scan:reference"),
    ("indrnn", {}, "sequential"),
    ("indrnn", {"activation": "identity", "kernel": "torch"}, "scan:torch"),
] + ([("indrnn", {"activation": "identity", "kernel": "cpu"}, "scan:cpu"),
       ("qrnn", {"kernel": "cpu"}, "scan:cpu")] if find_compiler() else []))
def test_kernel_path_reports_what_ran(name, over, expected):
    model = debug_backbone(name, **over)
    model(torch.randn(1, 4, 32))
    assert model.kernel_path == expected


def test_linformer_step_memory_is_bounded():
    model = debug_backbone("linformer", block_size=4, k=3)
    state = model.init_state(1)
    for _ in range(30):
        _, state = model.step(torch.randn(1, 32), state)
    for st in state["layers"]:
        assert st["ck"].shape == (1, 4, 3, 8)  # (B, H, k, dh): fixed, whatever T
        assert st["lk"] is None or st["lk"].shape[2] < 4  # at most the current block


@pytest.mark.parametrize("name", NAMES)
def test_smoke_space_choices_all_build(name):
    # every combination of the smoke space's categorical choices builds and runs on the debug flavor
    import itertools

    from archlab.architectures import make_config
    from archlab.search_spaces import load_space

    space = load_space(name, smoke=True)
    cats = {k[len("model."):]: v["choices"] for k, v in space.items() if k.startswith("model.") and "choices" in v}
    for combo in itertools.product(*cats.values()):
        cfg = make_config(name, "debug", dict(zip(cats, combo)))
        y = build_model(name, "vector", cfg, d_in=24)(torch.randn(1, 6, 24))
        assert y.shape == (1, 6, 24) and torch.isfinite(y).all(), f"{name} {dict(zip(cats, combo))}"
    full = load_space(name)
    # no full-space sample may be an invalid head split (d_model % n_heads != 0)
    if "model.n_heads" in full:
        for d, h in itertools.product(full["model.d_model"]["choices"], full["model.n_heads"]["choices"]):
            assert d % h == 0, f"{name} SPACE: d_model {d} is not divisible by n_heads {h}"
