"""GPT-2: the issue's ranges, n_layer [4, 6, 8, 10], n_head [6, 8, 12, 16]. Both widths divide
by every head count (384 / 16 = 24, 768 / 6 = 128), so every sampled pair is valid."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [384, 768]},
    "model.n_layers": {"choices": [4, 6, 8, 10]},
    "model.n_heads": {"choices": [6, 8, 12, 16]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    # 48 divides by 6, 8, 12 and 16 too, so the head choice stays free at debug size
    "model.d_model": {"choices": [48]},
    "model.n_heads": {"choices": [6, 8]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
