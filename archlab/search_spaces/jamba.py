"""Jamba / seed 000's "Hybrid Mamba-Attention": attn_every [4, 6, 8, 12], total layers
[12, 18, 24], attention type full | linformer | performer; Mamba-2's d_model and lr ranges.
attn_offset stays at the flavor's -1 (seed 000: the last layer of each group)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [12, 18, 24]},
    "model.attn_every": {"choices": [4, 6, 8, 12]},
    "model.attn_type": {"choices": ["full", "linformer", "performer"]},
    "model.n_experts": {"choices": [4, 8, 16]},
    "train.lr": {"choices": [5e-5, 1e-4, 5e-4]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.attn_type": {"choices": ["full", "linformer", "performer"]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
