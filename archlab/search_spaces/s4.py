"""S4 (DPLR kernel): as S4D, but the state size stays small ([16, 32, 64]): the kernel
computes Abar^L densely (M^3 per channel, M = N/2)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.d_state": {"choices": [16, 32, 64]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
