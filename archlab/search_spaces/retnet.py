"""RetNet: heads [4, 8, 16] (the issue's range), widths divisible by 16 heads with even
head dims (rotary)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.n_heads": {"choices": [4, 8, 16]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.n_heads": {"choices": [2, 4]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
