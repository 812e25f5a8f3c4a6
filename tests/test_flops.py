"""Compute accounting: FLOPs counted on the real model (hand counts where they are known),
the RNN and scan formulas the counter lacks, and the matmul peak probe."""

import dataclasses
import math

import pytest
import torch

from archlab.platform import flops


def _build(arch: str, d_in: int = 16):
    from archlab.architectures import make_config
    from archlab.platform.train import build_from_spec

    cfg = make_config(arch, "debug")
    return build_from_spec({"arch": arch, "task": "vector", "config": dataclasses.asdict(cfg), "d_in": d_in}), cfg


class TwoLinear(torch.nn.Module):
    def __init__(self, d_in=8, hidden=12, d_out=8):
        super().__init__()
        self.a = torch.nn.Linear(d_in, hidden, bias=False)
        self.b = torch.nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_linear_model_matches_the_hand_count():
    b, t, d, h = 4, 6, 8, 12
    x = torch.randn(b, t + 1, d)  # the model sees t positions, predicting the next
    c = flops.count_training_flops(TwoLinear(d, h, d), x, "vector")
    tokens = b * t
    fwd = 2 * tokens * d * h + 2 * tokens * h * d
    # backward: weight and input gradients of every layer (2x forward), except the first
    # layer's input gradient: nothing needs d loss / d data
    bwd = 2 * fwd - 2 * tokens * d * h
    assert c["forward"] == fwd and c["backward"] == bwd and c["total"] == fwd + bwd
    assert flops.flops_per_sample(TwoLinear(d, h, d), x, "vector") == (fwd + bwd) / b


def test_single_layer_with_input_gradient_is_three_times_forward():
    lin = torch.nn.Linear(8, 8, bias=False)

    class Feed(torch.nn.Module):  # input needs a gradient: the full 2*B*in*out x 3
        def __init__(self):
            super().__init__()
            self.lin = lin
            self.pre = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return self.lin(x * self.pre)

    x = torch.randn(2, 5, 8)
    c = flops.count_training_flops(Feed(), x, "vector")
    assert c["forward"] == 2 * 2 * 4 * 8 * 8
    assert c["total"] == 3 * c["forward"]


def test_lstm_counts_its_recurrence_from_the_weights():
    model, cfg = _build("lstm")
    h = cfg.d_model
    x = torch.randn(4, 6, 16)
    c = flops.count_training_flops(model, x, "vector")
    tokens = 4 * 5
    lstm = 2 * tokens * (4 * h * 16 + 4 * h * h + (cfg.n_layers - 1) * (4 * h * h + 4 * h * h))
    head = 2 * tokens * h * 16
    assert c["forward"] == lstm + head
    assert c["backward"] > c["forward"]
    longer = flops.count_training_flops(model, torch.randn(4, 12, 16), "vector")
    assert longer["total"] > c["total"]  # shape-dependent


def test_transformer_counts_grow_with_sequence_length():
    model, _ = _build("transformer")
    short = flops.flops_per_sample(model, torch.randn(2, 6, 16), "vector")
    long = flops.flops_per_sample(model, torch.randn(2, 24, 16), "vector")
    assert 0 < short < long
    # attention is quadratic in T: more than linear growth per sample
    assert long / short > 23 / 5


def test_scan_models_add_the_analytic_scan_count():
    model, _ = _build("min_gru")
    c = flops.count_training_flops(model, torch.randn(2, 6, 16), "vector")
    assert c["analytic"] > 0 and c["counted"] > 0
    assert c["total"] == c["counted"] + c["analytic"]


def test_measuring_leaves_the_model_and_rng_as_found():
    model, _ = _build("lstm")
    x = torch.randn(2, 6, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    flops.count_training_flops(model, x, "vector")
    after_rng = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_rng, torch.rand(3))
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_token_task_and_bad_input():
    from archlab.architectures import make_config
    from archlab.platform.train import build_from_spec

    cfg = make_config("transformer", "debug")
    model = build_from_spec({"arch": "transformer", "task": "token", "config": dataclasses.asdict(cfg),
                             "vocab_size": 50})
    x = torch.randint(0, 50, (2, 9))
    assert flops.flops_per_sample(model, x, "token") > 0
    with pytest.raises(ValueError, match="task"):
        flops.flops_per_sample(model, x, "audio")
    with pytest.raises(ValueError, match="example_batch"):
        flops.flops_per_sample(model, torch.zeros(0, 9, dtype=torch.long), "token")


def test_matmul_peak_probe_is_positive_and_finite():
    peak = flops.matmul_peak_flops("cpu", torch.float32, seconds=0.1, n=256)
    assert math.isfinite(peak) and peak > 1e6
    assert flops.mfu(peak * 0.5, 1.0, peak) == pytest.approx(0.5)
    assert math.isnan(flops.mfu(1.0, 0.0, peak))


def test_cudnn_rnn_formula_matches_the_cpu_one_on_the_same_lstm():
    """No GPU here: the CUDA formulas are checked on the shapes cuDNN's op receives (the
    weight list of every layer), against the oneDNN per-layer count measured above."""
    b, t, d_in, h, layers = 4, 5, 16, 32, 2
    lstm = torch.nn.LSTM(d_in, h, num_layers=layers)
    weights = [list(p.shape) for p in lstm.parameters()]  # w_ih, w_hh, b_ih, b_hh per layer
    fwd = flops._cudnn_rnn_flop([t, b, d_in], weights)
    per_layer = sum(flops._mkldnn_rnn_flop([t, b, w_ih[1]], w_ih, w_hh)
                    for w_ih, w_hh in zip(weights[0::4], weights[1::4]))
    assert fwd == per_layer == 2 * t * b * (4 * h * d_in + 4 * h * h + (layers - 1) * 8 * h * h)
    mask = [True, True, True, True]
    assert flops._cudnn_rnn_backward_flop([t, b, d_in], weights, *([None] * 19), mask) == 2 * fwd
    mask = [True, True, True, False]  # no weight gradients wanted
    assert flops._cudnn_rnn_backward_flop([t, b, d_in], weights, *([None] * 19), mask) == fwd
