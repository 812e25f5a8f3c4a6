"""Mamba-2: the seeds' ranges (d_model [256, 512, 768, 1024], n_layers [6, 12, 18, 24],
d_state [16, 32, 64, 128], lr [1e-5, 5e-5, 1e-4, 5e-4])."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768, 1024]},
    "model.n_layers": {"choices": [6, 12, 18, 24]},
    "model.d_state": {"choices": [16, 32, 64, 128]},
    "train.lr": {"choices": [1e-5, 5e-5, 1e-4, 5e-4]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.d_state": {"choices": [8, 16]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
