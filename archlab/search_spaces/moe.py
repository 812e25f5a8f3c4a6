"""Sparse MoE: seed 002's 16 experts top-2 inside the seeds' transformer ranges (d_model
[256, 512, 768], n_layers [4, 6, 8]); experts and top-k around it; the balance weight
around Switch's 0.01."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [4, 6, 8]},
    "model.n_experts": {"choices": [4, 8, 16]},
    "model.top_k": {"choices": [1, 2]},
    "model.lb_weight": {"choices": [0.001, 0.01, 0.1]},
    "train.lr": {"choices": [1e-4, 3e-4, 5e-4, 1e-3]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.top_k": {"choices": [1, 2]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
