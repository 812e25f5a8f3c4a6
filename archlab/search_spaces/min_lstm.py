"""minLSTM: no seed recipe exists; ranges around the paper's language-model setup
(expansion 2-4, a few layers) at the seed widths, lr on the usual AdamW range."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [2, 4, 6]},
    "model.expand": {"choices": [1, 2, 3]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
