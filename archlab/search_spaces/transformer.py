"""Causal Transformer: the seeds' ranges around the 4 x 512, 8-head recipe."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [2, 4, 6]},
    "model.n_heads": {"choices": [4, 8]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
