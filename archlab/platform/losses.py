"""Losses for the vector task (next-vector prediction).

Every loss takes `pred` and `target` of shape [N, D] (leading dims are flattened, so
[B, T, D] works too) and returns a scalar tensor. `pred` is already unit-norm (the
VectorModel normalises); `target` is normalised here where the loss assumes unit norm.

- "mse" (default, as the seeds): mean over all elements of (pred - target)^2.
- "cosine": mean of 1 - cos(pred, target).
- "infonce": in-batch negatives. Row i of pred must pick target i among all N targets;
  cross-entropy over cos(pred_i, target_j) / temperature. The seed recorded that InfoNCE
  alone failed to train a useful predictor, so it is an option, never the default.
- "hybrid": a weighted sum of the three, `weights={"mse": 1.0, "infonce": 0.1}` by default
  (MSE carries the regression, a small contrastive term keeps predictions distinct).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("mse", "cosine", "infonce", "hybrid")
DEFAULT_LOSS = "mse"
DEFAULT_TEMPERATURE = 0.07
DEFAULT_HYBRID_WEIGHTS = {"mse": 1.0, "infonce": 0.1}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flat(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"loss: pred and target shapes differ: pred {list(pred.shape)}, target {list(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"loss: expected pred [N, D], found {list(pred.shape)}")
    d = pred.shape[-1]
    # (N, D): every position is one prediction
    return pred.reshape(-1, d).float(), target.reshape(-1, d).float()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _flat(pred, target)
    return F.mse_loss(p, t)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p, t = _flat(pred, target)
    return (1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)).mean()


def infonce_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    p, t = _flat(pred, target)
    p = F.normalize(p, dim=-1, eps=1e-8)
    t = F.normalize(t, dim=-1, eps=1e-8)
    logits = p @ t.T / temperature  # (N, N): row i scores pred i against every target
    labels = torch.arange(p.shape[0], device=p.device)
    return F.cross_entropy(logits, labels)


def make_loss(name: str = DEFAULT_LOSS, **kw) -> LossFn:
    """The loss called `name`; keyword options: `temperature` (infonce, hybrid),
    `weights` (hybrid: a dict over "mse", "cosine", "infonce")."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    allowed = {"mse": set(), "cosine": set(), "infonce": {"temperature"}, "hybrid": {"temperature", "weights"}}[name]
    extra = set(kw) - allowed
    if extra:
        raise ValueError(
            f"loss {name!r} takes option(s) {sorted(allowed) or 'none'}, found unexpected {sorted(extra)}"
        )
    temperature = float(kw.get("temperature", DEFAULT_TEMPERATURE))
    if temperature <= 0:
        raise ValueError(f"loss {name!r}: temperature must be > 0, found {temperature}")
    if name == "mse":
        return mse_loss
    if name == "cosine":
        return cosine_loss
    if name == "infonce":
        return lambda pred, target: infonce_loss(pred, target, temperature)

    weights = dict(kw.get("weights") or DEFAULT_HYBRID_WEIGHTS)
    parts = {"mse": mse_loss, "cosine": cosine_loss, "infonce": lambda p, t: infonce_loss(p, t, temperature)}
    bad = set(weights) - set(parts)
    if bad:
        raise ValueError(f"hybrid loss: weights keys must be among {sorted(parts)}, found {sorted(bad)}")
    if not any(float(w) != 0.0 for w in weights.values()):
        raise ValueError(f"hybrid loss: at least one weight must be non-zero, found {weights}")
    terms = [(parts[k], float(w)) for k, w in weights.items() if float(w) != 0.0]

    def hybrid(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(w * fn(pred, target) for fn, w in terms)

    return hybrid
