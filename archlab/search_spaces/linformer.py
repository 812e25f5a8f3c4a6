"""Causal Linformer: low-rank k [64, 128, 256, 512] (the issue's range) around the seed
Transformer's widths; block_size is the exact-attention window inside each block."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512]},
    "model.n_layers": {"choices": [2, 4, 6]},
    "model.n_heads": {"choices": [4, 8]},
    "model.k": {"choices": [64, 128, 256, 512]},
    "model.block_size": {"choices": [32, 64, 128]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.k": {"choices": [4, 8]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
