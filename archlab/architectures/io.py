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
        if getattr(config, "tie_io", False):
            self.head = TiedHead(self.in_proj, d_model, d_out, name=mod.__name__.rsplit(".", 1)[-1])
        elif hasattr(mod, "build_head"):
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


class TiedHead(nn.Module):
    """The vector task's tied head (config field `tie_io`): y = h @ W_in + b, with W_in the
    input projection's weight [d_model, d_in], the same Parameter object (as the token
    task ties its LM head to the embedding: a one-hot input is a vector input)."""

    def __init__(self, in_proj: nn.Module, d_model: int, d_out: int, *, name: str):
        super().__init__()
        if not isinstance(in_proj, nn.Linear) or tuple(in_proj.weight.shape) != (d_model, d_out):
            shape = list(in_proj.weight.shape) if isinstance(in_proj, nn.Linear) else type(in_proj).__name__
            raise ValueError(
                f"{name}: model.tie_io needs an input projection Linear(d_out={d_out} -> d_model={d_model}), "
                f"found {shape}; set model.tie_io=false or make d_out equal d_in"
            )
        self.weight = in_proj.weight  # (d_model, d_in): shared, not copied
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, d_model] -> [B, T, d_out]
        return torch.nn.functional.linear(h, self.weight.t(), self.bias)


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
