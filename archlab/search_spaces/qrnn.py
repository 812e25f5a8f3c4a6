"""QRNN: no seed recipe of its own, so the seed LSTM's ranges (d_hidden [256, 512, 1024],
n_layers [2, 4, 6], lr [1e-4, 1e-2]): the two recurrent families then compare like for like."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 1024]},
    "model.n_layers": {"choices": [2, 4, 6]},
    "model.window": {"choices": [1, 2]},
    "model.dropout": {"choices": [0.0, 0.1, 0.2]},
    "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
