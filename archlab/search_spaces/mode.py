"""MoDE (seed 004: Zamba-style Mamba-2 + Mixture-of-Depths-and-Experts): Mamba-2's ranges,
seed 002's expert counts, and how many no-op experts the router may pick."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [6, 12, 18]},
    "model.n_experts": {"choices": [4, 8, 16]},
    "model.n_noop": {"choices": [1, 2, 4, 8]},
    "model.top_k": {"choices": [1, 2]},
    "train.lr": {"choices": [5e-5, 1e-4, 5e-4]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.n_noop": {"choices": [1, 2]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
