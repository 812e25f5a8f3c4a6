"""Zamba: Mamba-2's d_model / d_state / lr ranges (seeds 000, 004), the shared block's
period around Zamba's 6 and the LoRA rank (0 = no adapters). shared_offset stays at the
flavor's -1 (each group's last layer)."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [256, 512, 768]},
    "model.n_layers": {"choices": [12, 18, 24]},
    "model.shared_every": {"choices": [4, 6, 8]},
    "model.adapter_rank": {"choices": [0, 16, 64]},
    "model.d_state": {"choices": [16, 32, 64]},
    "train.lr": {"choices": [5e-5, 1e-4, 5e-4]},
}

SMOKE = {
    "model.d_model": {"choices": [16, 32]},
    "model.adapter_rank": {"choices": [0, 4]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
