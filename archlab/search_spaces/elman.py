"""Elman ladder: the rungs are categorical switches, so a sweep ablates them jointly;
widths stay moderate because the forward is a sequential loop over time."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [128, 256, 512]},
    "model.n_layers": {"choices": [1, 2, 4]},
    "model.gated": {"choices": [False, True]},
    "model.constraint": {"choices": ["free", "spectral_norm", "scaled_orthogonal"]},
    "model.log_space": {"choices": [False, True]},
    "model.compete": {"choices": [False, True]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.gated": {"choices": [False, True]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
