"""Task IO around a causal backbone: the vector task and the token task.

Model code is single-device (CONVENTIONS 8): no torch.distributed, Ray or MLflow here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VectorModel(nn.Module):
    """Next-vector prediction: Linear(d_in -> d_model) -> backbone -> head -> L2 normalise.

    forward(x: [B, T, d_in]) -> [B, T, d_out], unit-norm rows; output t predicts x[t+1].
    """

    task = "vector"

    def __init__(self, mod, config, *, d_in: int, d_out: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.whole = None
        if hasattr(mod, "build_vector_model"):
            # Architectures that are not backbone + head (AMN) build the whole model.
            self.whole = mod.build_vector_model(config, d_in, d_out)
            return
        if getattr(mod, "INPUT_PROJECTION", True):
            self.in_proj = nn.Linear(d_in, config.d_model)
            self.backbone = mod.build(config, config.d_model)
        else:
            self.in_proj = nn.Identity()
            self.backbone = mod.build(config, d_in)
        d_model = self.backbone.d_model
        if hasattr(mod, "build_head"):
            self.head = mod.build_head(config, d_model, d_out)
        else:
            self.head = nn.Linear(d_model, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise ValueError(f"expected input [B, T, {self.d_in}], found {list(x.shape)}")
        if self.whole is not None:
            y = self.whole(x)
        else:
            y = self.head(self.backbone(self.in_proj(x)))
        # eps keeps a zero prediction finite; float() so bf16 autocast still yields unit norm
        return F.normalize(y.float(), dim=-1, eps=1e-8)


class TokenModel(nn.Module):
    """Language modelling: embedding -> backbone -> LM head (tied to the embedding).

    forward(tokens: [B, T] int) -> logits [B, T, vocab_size].
    """

    task = "token"

    def __init__(self, mod, config, *, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        d_model = config.d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.backbone = mod.build(config, d_model)
        if self.backbone.d_model != d_model:
            # untied: the backbone's width differs from the embedding's
            self.proj = nn.Linear(self.backbone.d_model, d_model)
        else:
            self.proj = nn.Identity()
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens [B, T], found {list(tokens.shape)}")
        h = self.backbone(self.embed(tokens.long()))
        return self.lm_head(self.norm(self.proj(h)))


def count_params(model: nn.Module) -> int:
    # tied weights are one parameter object, so parameters() counts them once
    return sum(p.numel() for p in model.parameters())
