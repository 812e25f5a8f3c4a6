"""RWKV-6: widths that head size 64 divides, depths of a small LM (the channel-mix width
follows d_model: 3.5x)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8, 12]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
