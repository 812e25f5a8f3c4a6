"""Hymba (seed 002's hybrid): d_model / layers in the seeds' ranges, meta tokens and the
sliding window of the local layers (the paper: 128 meta tokens, SWA with global first /
middle / last layers; scaled to our short contexts)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.n_meta": {"choices": [0, 8, 16, 32]},
    "model.window": {"choices": [0, 32, 64, 128]},
    "model.d_state": {"choices": [16, 32, 64]},
    "train.lr": {"choices": [1e-4, 3e-4, 5e-4, 1e-3]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.n_meta": {"choices": [0, 2]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
