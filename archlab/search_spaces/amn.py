"""AMN: ranges around the seed's 256-wide encoders and 512-wide residual MLP. The window
choices include the seed protocol's 5-vector context (0 = the whole prefix)."""

SPACE = {
    "model.d_attn": {"choices": [128, 256, 512]},
    "model.d_hidden": {"choices": [256, 512, 1024]},
    "model.dropout": {"choices": [0.0, 0.1]},
    "model.window": {"choices": [0, 5]},
    "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
}

SMOKE = {
    "model.d_attn": {"choices": [8, 16]},
    "train.lr": {"low": 5e-4, "high": 5e-3, "log": True},
}
