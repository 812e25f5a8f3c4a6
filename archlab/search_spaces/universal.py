"""Universal Transformer: gpt2's width and head ranges (the seeds' n_head [6, 8, 12, 16] on
widths that divide by all of them); n_steps takes gpt2's n_layer range [4, 6, 8, 10], so a
trial has the compute of the matching gpt2 depth with one block's parameters."""

SPACE = {
    "model.head": {"choices": ["plain", "residual"]},  # vector task only (load_space drops it for tokens)
    "model.d_model": {"choices": [384, 768]},
    "model.n_steps": {"choices": [4, 6, 8, 10]},
    "model.n_heads": {"choices": [6, 8, 12, 16]},
    "model.step_embedding": {"choices": [True, False]},
    "model.tie_io": {"choices": [False, True]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
}

SMOKE = {
    "model.d_model": {"choices": [48]},
    "model.n_steps": {"choices": [2, 3]},
    "model.step_embedding": {"choices": [True, False]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
