"""Hyena: orders [2, 3, 4] (the issue's range), widths and depths of a small LM."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.order": {"choices": [2, 3, 4]},
    "model.filter_order": {"choices": [32, 64]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.order": {"choices": [2, 3]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
