"""S4D: widths and depths around the S4 repository's defaults; state size N (real, N/2
complex modes) [32, 64, 128]; both initialisations (S4D-Lin, S4D-LegS)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.d_state": {"choices": [32, 64, 128]},
    "model.init": {"choices": ["lin", "legs"]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
