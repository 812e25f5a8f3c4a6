"""Zoo II recurrent group: min_gru, min_lstm, hawk, griffin, elman.

- mode equivalence: the parallel forward (linear scan / masked attention / batched loop)
  and the recurrent `step` agree on outputs AND input gradients at odd sizes (B2-T63, an
  input width that is not d_model, so the input projection is exercised);
- each layer against an independent reference written here from the paper's equations
  (minGRU, minLSTM, RG-LRU, causal conv, local MQA with rotary positions, Elman cell);
- architecture properties: the local window bounds what attention sees, the spectral
  constraint holds R's spectral radius <= 0.99, the orthogonal variant's singular values
  equal its scale, the log-space state computes the same function as the linear one,
  the RG-LRU keeps its recurrence in fp32 under bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from archlab.architectures import elman, griffin, hawk, min_gru, min_lstm
from archlab.kernels.scan.cpu_scan import find_compiler

# what `auto` resolves the scan to on CPU: the fused C scan where a C compiler exists
AUTO_SCAN = "cpu" if find_compiler() else "torch"

B, T, D_IN = 2, 63, 20


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the CPU is shared
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, rtol: float) -> None:
    """Relative RMS error ||got - ref|| / ||ref|| <= rtol, with the figure in the message."""
    assert ref.shape == got.shape, f"{name}: shape {list(got.shape)} != reference {list(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - ref.double()).pow(2).mean().sqrt()
    scale = ref.double().pow(2).mean().sqrt().clamp_min(1e-12)
    assert err / scale <= rtol, f"{name}: relative RMS error {err / scale:.3g} > {rtol:.1g}"


CASES = [
    pytest.param(min_gru, "debug", {}, id="min_gru-debug"),
    pytest.param(min_lstm, "debug", {}, id="min_lstm-debug"),
    pytest.param(hawk, "debug", {}, id="hawk-debug"),
    pytest.param(hawk, "debug", {"rnn_expand": 1.5, "conv_width": 3}, id="hawk-expand1.5-conv3"),
    pytest.param(griffin, "debug", {}, id="griffin-debug-window8"),
    pytest.param(griffin, "debug", {"pattern": ["local_attn", "rglru"], "window": 80}, id="griffin-attn-first-window80"),
] + [pytest.param(elman, f, {}, id=f"elman-{f}") for f in elman.FLAVORS if f != "seed"]


def _run_both(mod, flavor, overrides, kernel=None):
    cfg = dataclasses.replace(mod.FLAVORS[flavor], **overrides)
    if kernel is not None:
        cfg = dataclasses.replace(cfg, kernel=kernel)
    torch.manual_seed(1)
    model = mod.build(cfg, D_IN)  # train mode: none of these has dropout, so modes agree
    x = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(2))
    w = torch.randn(B, T, model.d_model, generator=torch.Generator().manual_seed(3))
    xp = x.clone().requires_grad_(True)
    y_par = model(xp)
    (y_par * w).sum().backward()
    xs = x.clone().requires_grad_(True)
    state, outs = model.init_state(B), []
    for t in range(T):
        y_t, state = model.step(xs[:, t], state)
        outs.append(y_t)
    y_step = torch.stack(outs, dim=1)  # (B, T, d_model)
    (y_step * w).sum().backward()
    return y_par, y_step, xp.grad, xs.grad


@pytest.mark.parametrize("mod,flavor,overrides", CASES)
def test_step_equals_parallel_outputs_and_grads(mod, flavor, overrides):
    y_par, y_step, g_par, g_step = _run_both(mod, flavor, overrides)
    assert_close("output", y_par.detach(), y_step.detach(), 1e-5)
    assert_close("input gradient", g_par, g_step, 1e-5)


@pytest.mark.parametrize("mod", [min_gru, min_lstm, hawk], ids=["min_gru", "min_lstm", "hawk"])
@pytest.mark.parametrize("kernel", ["reference", "torch"] + (["cpu"] if AUTO_SCAN == "cpu" else []))
def test_scan_paths_agree_in_the_model(mod, kernel):
    """The model run through each CPU scan path matches its own step loop."""
    y_par, y_step, g_par, g_step = _run_both(mod, "debug", {}, kernel=kernel)
    assert_close(f"output ({kernel})", y_step.detach(), y_par.detach(), 1e-5)
    assert_close(f"input gradient ({kernel})", g_step, g_par, 1e-5)


# --- each layer against the paper's equations -------------------------------------------

def _loop(a_fn, x):
    """h_t = a_t * h_{t-1} + b_t from per-step (a_t, b_t) = a_fn(x_t): the plain recurrence."""
    h, out = None, []
    for t in range(x.shape[1]):
        a, b = a_fn(x[:, t])
        h = b if h is None else a * h + b
        out.append(h)
    return torch.stack(out, dim=1)


def test_min_gru_layer_matches_paper():
    layer = min_gru.MinGRU(12, 18, "auto").double()
    x = torch.randn(B, T, 12, dtype=torch.float64)
    Wz, Wh = layer.in_proj.weight.split(18)
    bz, bh = layer.in_proj.bias.split(18)

    def cell(x_t):  # z = sigmoid(W_z x), h~ = W_h x, h = (1 - z) h + z h~
        z = torch.sigmoid(x_t @ Wz.T + bz)
        return 1 - z, z * (x_t @ Wh.T + bh)

    h, h_last = layer(x)
    assert_close("minGRU h", _loop(cell, x), h, 1e-6)  # the scan runs in fp32
    assert_close("minGRU h_T", h[:, -1], h_last, 1e-12)


def test_min_lstm_layer_matches_paper():
    layer = min_lstm.MinLSTM(12, 18, "auto").double()
    x = torch.randn(B, T, 12, dtype=torch.float64)
    Wf, Wi, Wh = layer.in_proj.weight.split(18)
    bf, bi, bh = layer.in_proj.bias.split(18)

    def cell(x_t):  # f' = f / (f + i), i' = i / (f + i), h = f' h + i' h~
        f, i = torch.sigmoid(x_t @ Wf.T + bf), torch.sigmoid(x_t @ Wi.T + bi)
        return f / (f + i), i / (f + i) * (x_t @ Wh.T + bh)

    h, _ = layer(x)
    assert_close("minLSTM h", _loop(cell, x), h, 1e-6)


def test_rglru_matches_paper():
    width, heads, c = 12, 3, 8.0
    lru = hawk.RGLRU(width, heads, c, "auto").double()
    x = torch.randn(B, T, width, dtype=torch.float64)

    def block_diag(lin, x_t):  # per-head k x k matrices, written as one dense block matrix
        W = torch.block_diag(*lin.weight)  # (H*k, H*k), W[i, j]: input i -> output j
        return x_t @ W + lin.bias.flatten()

    def cell(x_t):
        r = torch.sigmoid(block_diag(lru.gate_a, x_t))
        i = torch.sigmoid(block_diag(lru.gate_x, x_t))
        a_t = torch.sigmoid(lru.a_logit) ** (c * r)  # a^(c r_t)
        return a_t, torch.sqrt(1 - a_t**2) * (i * x_t)

    h, _ = lru(x)
    assert_close("RG-LRU h", _loop(cell, x), h, 1e-6)


def test_rglru_init_and_fp32_under_bf16_autocast():
    lru = hawk.RGLRU(64, 4, 8.0, "auto")
    a_c = torch.sigmoid(lru.a_logit.detach()) ** 8.0
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6, "a^c must start in [0.9, 0.999]"
    x = torch.randn(1, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = lru.coefficients(x.bfloat16())
    assert a.dtype == torch.float32 and b.dtype == torch.float32, f"coefficients in {a.dtype}, {b.dtype}"
    a32, _ = lru.coefficients(x.bfloat16().float())
    assert_close("a_t under autocast", a32, a, 1e-6)


def test_causal_conv_matches_sum():
    conv = hawk.CausalConv1d(5, 4).double()
    x = torch.randn(B, T, 5, dtype=torch.float64)
    w, bias = conv.conv.weight[:, 0], conv.conv.bias  # (D, k)
    xpad = F.pad(x, (0, 0, 3, 0))  # three zeros before t = 0
    ref = torch.stack([sum(w[:, j] * xpad[:, t + j] for j in range(4)) + bias for t in range(T)], dim=1)
    assert_close("causal conv", ref, conv(x), 1e-12)


def _rope_complex(x, pos, base):
    """Rotary positions as complex multiplication of the pairs (x_j, x_{j + k/2})."""
    k = x.shape[-1]
    z = torch.complex(x[..., : k // 2], x[..., k // 2:])
    theta = pos[:, None].double() * base ** (-torch.arange(0, k, 2).double() / k)
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag], dim=-1)


def test_local_mqa_matches_naive_attention_and_is_local():
    d, H, W = 16, 4, 5
    att = griffin.LocalMQA(d, H, W, 10000.0).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    k_dim = d // H
    pos = torch.arange(T)
    q = _rope_complex((x @ att.q.weight.T).unflatten(-1, (H, k_dim)).transpose(1, 2), pos, 1e4)
    kv = x @ att.kv.weight.T
    k, v = _rope_complex(kv[..., :k_dim], pos, 1e4), kv[..., k_dim:]
    out = torch.zeros(B, H, T, k_dim, dtype=torch.float64)
    for t in range(T):
        lo = max(0, t - W + 1)  # the window includes t itself
        s = torch.einsum("bhk,bsk->bhs", q[:, :, t], k[:, lo: t + 1]) / math.sqrt(k_dim)
        out[:, :, t] = torch.einsum("bhs,bsk->bhk", s.softmax(-1), v[:, lo: t + 1])
    ref = out.transpose(1, 2).flatten(-2) @ att.out.weight.T
    y = att(x)
    assert_close("local MQA", ref, y, 1e-10)
    # locality: changing x at t0 leaves outputs before t0 and from t0 + W on unchanged
    t0 = 20
    x2 = x.clone()
    x2[:, t0] += 1.0
    diff = (att(x2) - y).abs().amax(dim=(0, 2))
    assert diff[:t0].max() == 0 and diff[t0 + W:].max() == 0, "attention reached outside its window"
    assert diff[t0: t0 + W].min() > 1e-6, "positions inside the window must see x[t0]"


@pytest.mark.parametrize("window,T", [(1, 9), (3, 7), (7, 50), (16, 63)], ids=lambda v: str(v))
def test_blocked_local_attention_equals_full_band_mask(window, T):
    """The O(T * window) blocked path (used when T > 2 * window) == one T x T band mask."""
    att = griffin.LocalMQA(16, 4, window, 1e4).double()
    x = torch.randn(B, T, 16, dtype=torch.float64)
    pos = torch.arange(T)
    q, k, v = att._qkv(x, pos)
    delta = pos[:, None] - pos[None, :]
    band = (delta >= 0) & (delta < window)
    ref = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), attn_mask=band)
    assert_close("blocked local attention", ref, att._blocked(q, k, v), 1e-12)


# --- elman ladder -------------------------------------------------------------------------

def test_plain_elman_matches_textbook_cell():
    layer = elman.ElmanLayer(12, 12, elman.FLAVORS["debug"]).double()
    x = torch.randn(B, T, 12, dtype=torch.float64)
    h, out = torch.zeros(B, 12, dtype=torch.float64), []
    for t in range(T):  # h = tanh(W x + R h + b)
        h = torch.tanh(x[:, t] @ layer.in_proj.weight.T + layer.in_proj.bias + h @ layer.R.T)
        out.append(h)
    assert_close("Elman h", torch.stack(out, 1), layer(x), 1e-12)


def test_gated_elman_matches_interpolation():
    layer = elman.ElmanLayer(12, 12, elman.FLAVORS["gated"]).double()
    x = torch.randn(B, T, 12, dtype=torch.float64)
    Wc, Wd = layer.in_proj.weight.split(12)
    bc, bd = layer.in_proj.bias.split(12)
    h, out = torch.zeros(B, 12, dtype=torch.float64), []
    for t in range(T):  # h = (1 - d) h + d tanh(W x + R h + b), d = sigmoid(W_d x + b_d)
        d = torch.sigmoid(x[:, t] @ Wd.T + bd)
        h = (1 - d) * h + d * torch.tanh(x[:, t] @ Wc.T + bc + h @ layer.R.T)
        out.append(h)
    assert_close("gated Elman h", torch.stack(out, 1), layer(x), 1e-12)


def test_spectral_norm_bounds_spectral_radius():
    cfg = elman.FLAVORS["spectral"]
    layer = elman.ElmanLayer(24, 24, cfg)
    with torch.no_grad():
        layer.R.mul_(10.0)  # far outside the ball, so the constraint must act
    layer.power_iteration(500)
    R = layer.recurrence_matrix().detach().double()
    sigma = torch.linalg.matrix_norm(R, ord=2).item()
    rho = torch.linalg.eigvals(R).abs().max().item()
    assert sigma == pytest.approx(cfg.radius, abs=1e-4), f"||R||_2 = {sigma}, expected {cfg.radius}"
    assert rho <= cfg.radius + 1e-4, f"spectral radius {rho} > {cfg.radius}"
    # inside the ball the constraint leaves R alone
    with torch.no_grad():
        layer.R.mul_(0.5 / torch.linalg.matrix_norm(layer.R, ord=2))
    layer.power_iteration(500)
    assert_close("R inside the ball", layer.R.detach(), layer.recurrence_matrix().detach(), 1e-6)


def test_spectral_norm_tracks_training():
    """One power iteration per training forward keeps the estimate converged as R moves."""
    layer = elman.ElmanLayer(16, 16, elman.FLAVORS["spectral"])
    with torch.no_grad():
        layer.R.mul_(5.0)
    x = torch.randn(1, 3, 16)
    for _ in range(100):
        layer(x)
    sigma = torch.linalg.matrix_norm(layer.recurrence_matrix().detach(), ord=2).item()
    assert sigma <= layer.config.radius + 1e-3, f"||R||_2 = {sigma} after 100 training forwards"
    layer.eval()
    u = layer.u.clone()
    layer(x)
    assert torch.equal(u, layer.u), "eval forwards must not move the power-iteration vector"


def test_scaled_orthogonal_singular_values_equal_scale():
    cfg = elman.FLAVORS["orthogonal"]
    layer = elman.ElmanLayer(24, 24, cfg)
    s = torch.linalg.svdvals(layer.recurrence_matrix().detach().double())
    assert_close("singular values", torch.full_like(s, cfg.radius), s, 1e-5)


def test_log_space_state_computes_the_same_function():
    torch.manual_seed(4)
    lin = elman.build(elman.FLAVORS["spectral"], D_IN).double()
    log = elman.build(elman.FLAVORS["logspace"], D_IN).double()
    log.load_state_dict(lin.state_dict())  # same parameters, only the state's form differs
    x = torch.randn(B, T, D_IN, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, lin.d_model, dtype=torch.float64)  # (not y^2: RMSNorm fixes its sum)
    y_lin = lin.eval()(x)
    g_lin, = torch.autograd.grad((y_lin * w).sum(), x)
    y_log = log.eval()(x)
    g_log, = torch.autograd.grad((y_log * w).sum(), x)
    assert_close("log-space output", y_lin, y_log, 1e-10)
    assert_close("log-space input gradient", g_lin, g_log, 1e-10)


def test_compete_output_is_grouped_softmax_times_silu():
    cfg = dataclasses.replace(elman.FLAVORS["compete"], log_space=False)
    layer = elman.ElmanLayer(12, 12, cfg).double()
    x = torch.randn(B, 7, 12, dtype=torch.float64)
    y = layer(x)
    plain = elman.ElmanLayer(12, 12, dataclasses.replace(cfg, compete=False)).double()
    with torch.no_grad():  # the same cell without the output gate's rows
        plain.in_proj.weight.copy_(layer.in_proj.weight[:24])
        plain.in_proj.bias.copy_(layer.in_proj.bias[:24])
        plain.R.copy_(layer.R)
        plain.u.copy_(layer.u)
    h = plain.eval()(x)
    z = x @ layer.in_proj.weight[24:].T + layer.in_proj.bias[24:]
    groups = cfg.compete_groups
    ref = torch.softmax(h.unflatten(-1, (groups, -1)), -1).flatten(-2) * F.silu(z)
    assert_close("compete output", ref, layer.eval()(x), 1e-12)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.constraint"):
        elman.build(dataclasses.replace(elman.FLAVORS["debug"], constraint="unitary"), 8)
    with pytest.raises(ValueError, match="model.compete_groups"):
        elman.build(dataclasses.replace(elman.FLAVORS["compete"], compete_groups=5), 8)
    with pytest.raises(ValueError, match="model.pattern"):
        griffin.build(dataclasses.replace(griffin.FLAVORS["debug"], pattern=["mamba"]), 8)
    with pytest.raises(ValueError, match="model.rnn_heads"):
        hawk.build(dataclasses.replace(hawk.FLAVORS["debug"], rnn_heads=5), 8)


BF16_CASES = [pytest.param(m, f, id=f"{m.__name__.rsplit('.', 1)[-1]}-{f}")
              for m in (min_gru, min_lstm, hawk, griffin) for f in ("debug",)]
BF16_CASES += [pytest.param(elman, f, id=f"elman-{f}") for f in ("orthogonal", "compete")]


@pytest.mark.parametrize("mod,flavor", BF16_CASES)
def test_bf16_autocast_tiny(mod, flavor):
    """bf16 autocast (tiny: bf16 matmuls are ~500x slower on this CPU) stays within bf16
    rounding of fp32 and every parameter gets a finite gradient."""
    from archlab.architectures import build_model

    name = mod.__name__.rsplit(".", 1)[-1]
    model = build_model(name, "token", mod.FLAVORS[flavor], vocab_size=256)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert_close("bf16 logits", ref, logits.float(), 3e-2)
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without a finite gradient under bf16: {bad}"


@pytest.mark.parametrize("mod,expected", [
    (min_gru, f"scan:{AUTO_SCAN}"), (min_lstm, f"scan:{AUTO_SCAN}"), (hawk, f"scan:{AUTO_SCAN}"),
    (griffin, f"scan:{AUTO_SCAN}+local_attn:sdpa"), (elman, "loop"),
], ids=["min_gru", "min_lstm", "hawk", "griffin", "elman"])
def test_kernel_path_named(mod, expected):
    """On CPU, `auto` resolves the scan to the fused C path (the chunked torch path where no
    C compiler exists), and the backbone says so."""
    bb = mod.build(mod.FLAVORS["debug"], 8)
    bb(torch.randn(1, 5, 8))
    assert bb.kernel_path == expected, f"kernel_path {bb.kernel_path!r}, expected {expected!r}"
