"""Mixture-of-Depths: gpt2's ranges (n_layer [4, 6, 8, 10], n_head [6, 8, 12, 16]) plus the
router. capacity: the paper's 12.5% and two larger fractions; at the vector task's T = 5
they give k = 1, 2 and 3 of 5 (k = max(1, ceil(C T)), see architectures/mod.py)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [384, 768]},
    "model.n_layers": {"choices": [4, 6, 8, 10]},
    "model.n_heads": {"choices": [6, 8, 12, 16]},
    "model.capacity": {"choices": [0.125, 0.25, 0.5]},
    "model.router_bce_weight": {"low": 0.01, "high": 1.0, "log": True},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [48]},
    "model.capacity": {"choices": [0.25, 0.5]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
