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


@pytest.mark.parametrize("name,task", CASES)
def test_causality(name, task):
    model = _build(name, task).double().eval()
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
