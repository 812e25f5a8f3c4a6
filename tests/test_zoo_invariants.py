"""Zoo-wide invariants, written once and run for every registered architecture x task.

A new architecture is covered by adding itself to the registry; nothing here names one.
Every test uses the `debug` flavor at tiny sizes (the whole suite must stay well under a
minute on a 2-core CPU), in fp64 where a tolerance matters, so a real violation (a future
position leaking into the past, a step path that drifts from the parallel forward) shows
up as a difference many orders of magnitude above rounding.

Module contract additions checked here (on top of registry.py's docstring):
- `PARAM_COUNTS: dict[str, int]` in every architecture module: for each flavor in
  `FLAVORS`, the exact parameter count of
  `build_model(name, "vector", FLAVORS[flavor], d_in=768)` (default d_out = d_in); for an
  architecture without the vector task, `build_model(name, "token", FLAVORS[flavor],
  vocab_size=256)`.
- A backbone that can run one position at a time exposes
  `init_state(batch, device=None) -> state` and
  `step(x_t [B, d_input], state) -> (y_t [B, d_model], state)`; stepping through a sequence
  must reproduce the parallel forward.

The invariants:
- config: every flavor round-trips through JSON unchanged (`asdict -> json -> Config(**d)`);
- param count: each flavor's model has exactly `PARAM_COUNTS[flavor]` parameters;
- causality: perturbing the input at t0 (and after) leaves every output at t < t0 unchanged,
  and does change the output at t0 (the model reads its input);
- step == forward, where the backbone has a step;
- vector task: outputs are unit-norm, of shape [B, T, d_out];
- vector task, head="residual": at initialisation the output equals the linear-average
  baseline of the last `context` inputs at every position, causality still holds, and the
  head adds no parameter (same state_dict keys as "plain"); architectures that build
  their own baseline + residual (AMN) refuse it with the reason;
- every vector architecture takes a 64-vector context (one training step) or declares
  its limit in MAX_LENGTH_FIELD, and that limit is the one its forward enforces;
- learning: a few dozen AdamW steps on a tiny learnable sequence cut the loss well down.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from archlab.architectures import build_model, list_specs, load_module
from archlab.architectures.io import count_params

SPECS = list_specs()
ARCHS = [s.name for s in SPECS]
CASES = [pytest.param(s.name, task, id=f"{s.name}-{task}") for s in SPECS for task in s.tasks]
STEP_ARCHS = [s.name for s in SPECS]
VECTOR_ARCHS = [s.name for s in SPECS if "vector" in s.tasks]

D_IN = 24  # vector task input dim for the tiny models (not a multiple of common widths)
VOCAB = 256


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models run faster on one thread, and the CPU is shared with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def _module(name: str):
    try:
        return load_module(name)
    except ImportError as e:
        raise AssertionError(
            f"architecture {name!r} is registered but archlab/architectures/{name}.py does not import: {e}"
        ) from e


def _build(name: str, task: str, flavor: str = "debug", *, d_in: int = D_IN):
    cfg = _module(name).FLAVORS[flavor]
    if task == "vector":
        return build_model(name, "vector", cfg, d_in=d_in)
    return build_model(name, "token", cfg, vocab_size=VOCAB)


def _inputs(task: str, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    if task == "vector":
        return torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    return torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("name", ARCHS)
def test_flavors_and_config_json_roundtrip(name):
    mod = _module(name)
    assert "debug" in mod.FLAVORS, f"{name}: FLAVORS must include 'debug', found {list(mod.FLAVORS)}"
    for flavor, cfg in mod.FLAVORS.items():
        assert isinstance(cfg, mod.Config), f"{name}.FLAVORS[{flavor!r}] is {type(cfg).__name__}, not Config"
        text = json.dumps(dataclasses.asdict(cfg))
        back = mod.Config(**json.loads(text))
        assert back == cfg, f"{name}.{flavor}: config changed through JSON: {cfg} -> {back}"


@pytest.mark.parametrize("name", ARCHS)
def test_param_counts_match_documented(name):
    mod = _module(name)
    spec = next(s for s in SPECS if s.name == name)
    counts = getattr(mod, "PARAM_COUNTS", None)
    assert isinstance(counts, dict), f"{name}: module must define PARAM_COUNTS (flavor -> exact count)"
    missing = set(mod.FLAVORS) - set(counts)
    assert not missing, f"{name}: PARAM_COUNTS lacks flavor(s) {sorted(missing)}"
    task = "vector" if "vector" in spec.tasks else "token"
    for flavor in mod.FLAVORS:
        try:
            # meta tensors: a seed flavor's tens of millions of parameters cost no memory
            with torch.device("meta"):
                model = _build(name, task, flavor, d_in=768)
        except Exception:  # an init that computes on real values (e.g. linalg) needs CPU
            model = _build(name, task, flavor, d_in=768)
        found = count_params(model)
        assert found == counts[flavor], (
            f"{name}.{flavor} ({task}, d_in=768 / vocab 256): PARAM_COUNTS says {counts[flavor]}, found {found}"
        )


def _check_causal(model, name: str, task: str) -> None:
    model = model.double().eval()
    B, T, t0 = 2, 12, 7
    g = torch.Generator().manual_seed(1)
    x = _inputs(task, B, T, g)
    x2 = x.clone()
    if task == "vector":
        x2[:, t0:] += torch.randn(B, T - t0, D_IN, generator=g, dtype=torch.float64)
    else:
        x2[:, t0:] = (x2[:, t0:] + 1 + torch.randint(0, VOCAB - 1, (B, T - t0), generator=g)) % VOCAB
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert y.shape[:2] == (B, T), f"{name}/{task}: output shape {list(y.shape)}, expected [B={B}, T={T}, ...]"
    past = (y[:, :t0] - y2[:, :t0]).abs().max().item()
    now = (y[:, t0] - y2[:, t0]).abs().max().item()
    # 1e-6, not 0: FFT convolutions (S4, Hyena) or kernels computing in fp32 spread
    # rounding error of ~1e-8 across positions; a real leak is orders of magnitude larger
    assert past <= 1e-6, f"{name}/{task}: changing inputs at t>={t0} changed outputs at t<{t0} by {past:.3g}"
    assert now > 1e-6, f"{name}/{task}: output at t={t0} ignores its own input (changed by {now:.3g})"


@pytest.mark.parametrize("name,task", CASES)
def test_causality(name, task):
    _check_causal(_build(name, task), name, task)


def _backbone_with_step(name: str):
    mod = _module(name)
    if not hasattr(mod, "build"):
        return None, None, None
    cfg = mod.FLAVORS["debug"]
    d_input = cfg.d_model if getattr(mod, "INPUT_PROJECTION", True) else 20
    backbone = mod.build(cfg, d_input)
    if not (hasattr(backbone, "step") and hasattr(backbone, "init_state")):
        return None, None, None
    return mod, backbone, d_input


@pytest.mark.parametrize("name", STEP_ARCHS)
def test_step_matches_parallel_forward(name):
    mod, backbone, d_input = _backbone_with_step(name)
    if backbone is None:
        pytest.skip(f"{name}: backbone has no step/init_state (no recurrent path)")
    backbone = backbone.double().eval()
    B, T = 2, 11
    x = torch.randn(B, T, d_input, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = backbone(x)
        state = backbone.init_state(B)
        steps = []
        for t in range(T):
            y_t, state = backbone.step(x[:, t], state)
            steps.append(y_t)
    stepped = torch.stack(steps, dim=1)  # (B, T, d_model)
    assert stepped.shape == full.shape, f"{name}: step outputs {list(stepped.shape)} vs forward {list(full.shape)}"
    # 1e-6 relative: some fast paths compute internally in fp32 even for fp64 inputs
    err = (stepped - full).abs().max().item()
    scale = full.abs().max().item()
    assert err <= 1e-6 * max(scale, 1.0), f"{name}: step path differs from the parallel forward by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", VECTOR_ARCHS)
def test_vector_output_unit_norm(name):
    model = _build(name, "vector").eval()
    x = torch.nn.functional.normalize(torch.randn(3, 9, D_IN), dim=-1)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 9, D_IN), f"{name}: vector output {list(y.shape)}, expected [3, 9, {D_IN}]"
    norms = y.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), (
        f"{name}: output norms range {norms.min().item():.6f}..{norms.max().item():.6f}, expected 1"
    )


def _learnable(task: str, B: int, T: int, g: torch.Generator):
    """A sequence whose next item is a fixed function of the current one: a cycle through
    P random states, each row starting at a random phase."""
    P = 5
    phase = torch.randint(0, P, (B, 1), generator=g)
    idx = (phase + torch.arange(T + 1)) % P  # (B, T + 1)
    if task == "vector":
        table = torch.nn.functional.normalize(torch.randn(P, D_IN, generator=g), dim=-1)
        seq = table[idx]  # (B, T + 1, D_IN)
    else:
        seq = torch.randperm(VOCAB, generator=g)[:P][idx]  # (B, T + 1) distinct tokens
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize("name,task", CASES)
def test_loss_decreases_on_learnable_sequence(name, task):
    from archlab.platform.losses import make_loss

    model = _build(name, task)
    g = torch.Generator().manual_seed(3)
    x, y = _learnable(task, 8, 16, g)
    if task == "vector":
        # cosine: MSE between unit vectors is ~1/D small; the direction is what is learned
        loss_fn = make_loss("cosine")
    else:
        def loss_fn(logits, target):
            return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            out = loss_fn(model(x), y).item()
        model.train()
        return out

    before = evaluate()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = evaluate()
    assert after < 0.5 * before, f"{name}/{task}: loss {before:.4f} -> {after:.4f} after 40 steps (expected < half)"


# ------------------------------------------------------------------ residual head


def _residual_or_refusal(name: str, context: int):
    """(model, None), or (None, the refusal) for architectures that refuse head='residual'."""
    from archlab.architectures.io import residual_refusal

    mod = _module(name)
    refusal = residual_refusal(mod)
    if refusal:
        with pytest.raises(ValueError, match="model.head='residual': " + name):
            build_model(name, "vector", mod.FLAVORS["debug"], d_in=D_IN, head="residual", context=context)
        return None, refusal
    return build_model(name, "vector", mod.FLAVORS["debug"], d_in=D_IN, head="residual", context=context), None


def _linear_average_at_every_position(x: torch.Tensor, context: int) -> torch.Tensor:
    """The baseline module's linear average, [B, T, D]: for t >= context - 1 the mean of
    the window archlab.platform.baselines.windows cuts (its context vectors), before that
    the mean of the prefix (a window can only be that long there); L2-normalised."""
    import numpy as np

    from archlab.platform.baselines import windows

    B, T, D = x.shape
    out = np.zeros((B, T, D), dtype=np.float64)
    for b in range(B):
        doc = x[b].double().numpy()
        for t in range(min(context - 1, T)):
            out[b, t] = doc[: t + 1].mean(axis=0)
        if T >= context:
            # windows of context + 1: doc gets one more (dummy) vector so the last
            # position's window exists; window i ends at t = i + context - 1
            ctx, _ = windows([np.concatenate([doc, doc[-1:]])], context)
            out[b, context - 1:] = ctx.mean(axis=1)
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    return torch.from_numpy(out)


@pytest.mark.parametrize("name", VECTOR_ARCHS)
@pytest.mark.parametrize("context", [5, 16])
def test_residual_head_starts_at_the_linear_average(name, context):
    model, refusal = _residual_or_refusal(name, context)
    if model is None:
        pytest.skip(f"{name} refuses head='residual': {refusal}")
    model.eval()
    B, T = 2, 12  # context 16 > T: the whole prefix at every position
    x = torch.nn.functional.normalize(torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(4)), dim=-1)
    with torch.no_grad():
        y = model(x)
    ref = _linear_average_at_every_position(x, context)
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-6, f"{name}: residual head at init differs from the linear average (context {context}) by {err:.3g}"


@pytest.mark.parametrize("name", VECTOR_ARCHS)
def test_residual_head_is_causal_and_adds_no_parameters(name):
    model, refusal = _residual_or_refusal(name, 5)
    if model is None:
        pytest.skip(f"{name} refuses head='residual': {refusal}")
    torch.manual_seed(0)
    plain = _build(name, "vector")
    assert list(model.state_dict()) == list(plain.state_dict()), f"{name}: residual head changed the state_dict keys"
    assert count_params(model) == count_params(plain)
    # trained a little, so the correction g(h) is non-zero and the backbone is in play
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.nn.functional.normalize(torch.randn(2, 9, D_IN), dim=-1)
    for _ in range(3):
        opt.zero_grad()
        (1 - (model(x[:, :-1]) * x[:, 1:]).sum(-1)).mean().backward()
        opt.step()
    _check_causal(model, name, "vector")


@pytest.mark.parametrize("name", VECTOR_ARCHS)
def test_plain_head_is_the_default_model(name):
    # head="plain" (with a context) builds the same model from the same seed, bit for bit
    cfg = _module(name).FLAVORS["debug"]
    torch.manual_seed(5)
    default = build_model(name, "vector", cfg, d_in=D_IN).eval()
    torch.manual_seed(5)
    plain = build_model(name, "vector", cfg, d_in=D_IN, head="plain", context=5).eval()
    for (k, a), (_, b) in zip(default.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), f"{name}: head='plain' changed {k}"
    x = torch.randn(2, 7, D_IN)
    with torch.no_grad():
        assert torch.equal(default(x), plain(x)), f"{name}: head='plain' changed the output"


# ------------------------------------------------------------------ longer context


@pytest.mark.parametrize("name", VECTOR_ARCHS)
def test_context_64_trains_or_is_a_declared_limit(name):
    """A 64-vector context (the issue's floor for data.context) runs one training step at
    debug size, with either head; an architecture with a fixed maximum length declares
    the field (MAX_LENGTH_FIELD), and its forward refuses one position more than it."""
    from archlab.architectures import make_config
    from archlab.architectures.io import residual_refusal
    from archlab.platform.losses import make_loss

    mod = _module(name)
    context = 64
    field = getattr(mod, "MAX_LENGTH_FIELD", None)
    if field:
        small = make_config(name, "debug", {field: 8})
        model = build_model(name, "vector", small, d_in=D_IN).eval()
        with torch.no_grad():
            model(torch.randn(1, 8, D_IN))
            with pytest.raises(ValueError, match=field):
                model(torch.randn(1, 9, D_IN))
        assert getattr(mod.FLAVORS["debug"], field) >= context, f"{name}: debug {field} below {context}"
    heads = ["plain"] + ([] if residual_refusal(mod) else ["residual"])
    loss_fn = make_loss("mse")
    for head in heads:
        torch.manual_seed(0)
        model = build_model(name, "vector", mod.FLAVORS["debug"], d_in=D_IN, head=head, context=context)
        x = torch.nn.functional.normalize(torch.randn(2, context + 1, D_IN), dim=-1)  # one window
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = loss_fn(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"{name}/{head}: non-finite loss at context {context}"
        with torch.no_grad():
            y = model(x[:, :-1])
        assert y.shape == (2, context, D_IN) and torch.isfinite(y).all(), f"{name}/{head}: bad output at context {context}"
