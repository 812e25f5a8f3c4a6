"""BDH: the official configuration (6 layers, D 256, 4 heads, multiplier 128) is the top of
each range; the seed reports a 35M BDH. Smaller multipliers keep CPU trials feasible
(N = mult * D / n_heads neurons per head; activations are B x n_heads x T x N)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [128, 256]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.n_heads": {"choices": [2, 4, 8]},
    "model.mult": {"choices": [16, 32, 64, 128]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 3e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.mult": {"choices": [4, 8]},
    "model.n_layers": {"choices": [1, 2]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
