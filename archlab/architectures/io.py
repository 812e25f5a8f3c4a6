"""Task IO around a causal backbone: the vector task and the token task.

Model code is single-device (CONVENTIONS 8): no torch.distributed, Ray or MLflow here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


HEADS = ("plain", "residual")


def causal_context_mean(x: torch.Tensor, context: int) -> torch.Tensor:
    """The linear-average baseline at every position: mean of the last `context` vectors
    up to and including t (fewer at the start): x [B, T, D] -> [B, T, D].

    The same predictor as archlab.platform.baselines' linear_average (the plain mean of the
    context vectors; normalising is left to the caller), made causal per position. A
    windowed sum of a left-zero-padded copy, not a cumsum difference: no drift over long
    sequences, and each output sums exactly its own `context` inputs."""
    B, T, D = x.shape
    padded = F.pad(x, (0, 0, context - 1, 0))  # (B, context - 1 + T, D): zeros before t = 0
    sums = padded.unfold(1, context, 1).sum(dim=-1)  # (B, T, D, context) view -> (B, T, D)
    counts = torch.arange(1, T + 1, device=x.device).clamp(max=context).to(x.dtype)  # (T,)
    return sums / counts.unsqueeze(-1)


def residual_refusal(mod) -> str | None:
    """Why architecture module `mod` cannot take head='residual', or None if it can."""
    if hasattr(mod, "build_vector_model"):
        # AMN is already baseline + zero-initialised residual over its own window
        name = mod.__name__.rsplit(".", 1)[-1]
        return f"{name} builds its own baseline + residual output (see its window field); use model.head=plain"
    return None


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"head='residual' needs a head ending in nn.Linear, found {type(module).__name__}")
    return linears[-1]


class VectorModel(nn.Module):
    """Next-vector prediction: Linear(d_in -> d_model) -> backbone -> head -> L2 normalise.

    forward(x: [B, T, d_in]) -> [B, T, d_out], unit-norm rows; output t predicts x[t+1].

    head "plain": normalize(g(h_t)). head "residual": normalize(base_t + g(h_t)) with
    base_t = `causal_context_mean(x, context)` (the linear-average baseline over the last
    `context` inputs) and g's last Linear zero-initialised, so an untrained model predicts
    the baseline at every position and training learns a correction (AMN's form, for every
    backbone). Both heads have the same modules, parameters and state_dict keys.
    """

    task = "vector"
    # class-level defaults: models pickled before the residual head existed load as plain
    head_type = "plain"
    context = None

    def __init__(self, mod, config, *, d_in: int, d_out: int, head: str = "plain", context: int | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}, found {head!r}")
        self.d_in, self.d_out = d_in, d_out
        self.whole = None
        if head == "residual":
            refusal = residual_refusal(mod)
            if refusal:
                raise ValueError(f"model.head='residual': {refusal}")
            if d_out != d_in:
                raise ValueError(
                    f"model.head='residual' adds the input-space baseline: d_out must equal d_in={d_in}, found {d_out}"
                )
            if context is None or context < 1:
                raise ValueError(f"model.head='residual' needs context >= 1 (data.context), found {context!r}")
            self.head_type, self.context = head, int(context)
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
        if self.head_type == "residual":
            last = _last_linear(self.head)
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_in:
            raise ValueError(f"expected input [B, T, {self.d_in}], found {list(x.shape)}")
        if self.whole is not None:
            y = self.whole(x)
        else:
            y = self.head(self.backbone(self.in_proj(x)))
            if self.head_type == "residual":
                # summed in at least fp32: the baseline stays exact under bf16 autocast
                xb = x if x.dtype in (torch.float32, torch.float64) else x.float()
                base = causal_context_mean(xb, self.context)  # (B, T, d_in)
                y = base + y.to(base.dtype)
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
