"""Griffin: Hawk's ranges plus the local attention's heads and window (the paper: two
RG-LRU blocks per local-attention block, a window much shorter than the sequence)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [3, 6]},
    "model.n_heads": {"choices": [4, 8]},
    "model.window": {"choices": [16, 64, 128]},
    "model.rnn_expand": {"choices": [1.0, 1.5]},
    "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
