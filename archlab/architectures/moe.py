"""Sparse mixture-of-experts transformer (Shazeer 2017, Switch, ST-MoE, Mixtral) and the
`SparseMoE` FFN that any hybrid can use as its `ffn` ("moe" in architectures/mixers.py).

SparseMoE on tokens x [N, d] (any leading shape):
    logits = W_r x   (fp32, autocast off)     p = softmax(logits) over E (+ n_noop) slots
    (w, e) = top_k(p)  w renormalised to sum 1 over the k chosen (Mixtral; `renormalize`)
    y = sum_j w_j Expert_{e_j}(x),   Expert(x) = W_down(SiLU(x W_gate) * (x W_up))  (SwiGLU)
No-op experts (MoDE, integrated; `n_noop` > 0, see mode.py) are extra router slots whose
expert computes nothing: a token that picks one adds w * 0, i.e. passes that share of the
FFN through the residual unchanged.

Dropless by default: every (token, choice) is computed. `capacity_factor` > 0 caps each
expert at ceil(cf * N * k / E) assignments *in training*; priority is position-major
(position t, then batch row, then choice rank), so whether token t is dropped depends only
on positions <= t and the model stays causal. A dropped assignment adds 0. Eval is dropless,
so the step path equals the forward.

Auxiliary losses (archlab/architectures/aux.py), per layer, from the latest forward:
- "load_balance" (Switch eq. 4-6, archlab's top-k convention):
      L = E * sum_i f_i P_i,  f_i = (assignments to slot i) / (N k),  P_i = mean_x p_i(x)
  f counts all k choices divided by k, so sum_i f_i = 1 and L = 1 exactly whenever P is
  uniform (whatever f); a collapsed, confident router gives L -> E / k * (1 + ...) > 1, up
  to E for top-1. (Mixtral's formula without the 1/k equals k at uniform.) Slots include
  the no-op experts, so MoDE balances real and no-op slots alike.
- "router_z" (ST-MoE): mean_x (logsumexp_j logits_j(x))^2, = (log E)^2 at zero logits.
Weights are Config fields (lb_weight, z_weight). routing_stats(): fraction of assignments
per slot (`expert_frac.e<i>`, no-op slots as `noop_frac` in total), mean router entropy
(nats), and `dropped_frac` under a capacity.

Parameters: `active_params(model)` = total minus, per SparseMoE, the experts a token does
not visit: (E - k) * |expert| (with no-op experts, k real experts is the upper bound; the
measured mean is k * (1 - noop_frac)). `forward_flops(model, x)` counts the FLOPs a forward
really executes (torch's flop counter), so only visited experts count; per token that is
~ 2 * active_params plus attention's T-dependent part (docs/architectures_zoo3_hybrids.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts: [..., d] -> [..., d]."""

    def __init__(self, d: int, *, n_experts: int, top_k: int, d_hidden: int, n_noop: int = 0,
                 capacity_factor: float = 0.0, renormalize: bool = True,
                 lb_weight: float = 0.01, z_weight: float = 0.001):
        super().__init__()
        slots = n_experts + n_noop
        if n_experts < 1 or n_noop < 0:
            raise ValueError(f"model.n_experts must be >= 1 and model.n_noop >= 0, found {n_experts}, {n_noop}")
        if not 1 <= top_k <= slots:
            raise ValueError(f"model.top_k must be in 1..{slots} (experts + no-op experts), found {top_k}")
        if capacity_factor < 0:
            raise ValueError(f"model.capacity_factor must be >= 0 (0 = dropless), found {capacity_factor}")
        self.n_experts, self.n_noop, self.top_k, self.d_hidden = n_experts, n_noop, top_k, d_hidden
        self.capacity_factor, self.renormalize = capacity_factor, renormalize
        self.lb_weight, self.z_weight = lb_weight, z_weight
        self.router = nn.Linear(d, slots, bias=False)
        # stacked expert weights (E, d, 2h) / (E, h, d), nn.Linear's default init per expert
        bound_in, bound_out = 1 / math.sqrt(d), 1 / math.sqrt(d_hidden)
        self.w_in = nn.Parameter(torch.empty(n_experts, d, 2 * d_hidden).uniform_(-bound_in, bound_in))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_hidden, d).uniform_(-bound_out, bound_out))
        self._aux: dict = {}
        self._reset_stats()

    def __getstate__(self):
        # the latest forward's losses hold its autograd graph (deepcopy refuses non-leaf
        # tensors; pickling would drag the graph along) and the statistics are per epoch:
        # a copy or a logged model starts without either
        state = self.__dict__.copy()
        state.update(_aux={}, _counts=None, _entropy=0.0, _tokens=0, _dropped=0.0)
        return state

    @property
    def expert_params(self) -> int:
        """Parameters of one expert."""
        return self.w_in[0].numel() + self.w_out[0].numel()

    def _reset_stats(self) -> None:
        self._counts = None  # assignments per slot, summed over forwards
        self._entropy = 0.0
        self._tokens = 0
        self._dropped = 0.0

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x [n, d] -> [n, d]."""
        gate, up = (x @ self.w_in[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_out[e]

    def route(self, x: torch.Tensor):
        """x [N, d] -> (logits [N, S] fp32, probs [N, S], weights [N, k], slots [N, k])."""
        with torch.autocast(x.device.type, enabled=False):
            wd = torch.promote_types(x.dtype, torch.float32)
            logits = F.linear(x.to(wd), self.router.weight.to(wd))
            probs = logits.softmax(dim=-1)
            w, idx = probs.topk(self.top_k, dim=-1)
            if self.renormalize:
                w = w / w.sum(dim=-1, keepdim=True)
        return logits, probs, w, idx

    def _keep(self, idx: torch.Tensor, lead: tuple) -> torch.Tensor:
        """[N, k] bool: assignments within capacity; priority by (position, batch row, rank)."""
        N, k = idx.shape
        cap = math.ceil(self.capacity_factor * N * k / (self.n_experts + self.n_noop))
        # tokens are flattened (B, T) row-major; reorder to (T, B, k) so earlier positions win
        if len(lead) == 2:
            B, T = lead
            order = torch.arange(N, device=idx.device).view(B, T).t().reshape(-1)
        else:
            order = torch.arange(N, device=idx.device)
        ranked = idx[order].reshape(-1)  # (N k,) in priority order
        onehot = F.one_hot(ranked, self.n_experts + self.n_noop)
        within = (onehot.cumsum(0) * onehot).sum(-1) <= cap  # position of each in its slot's queue
        keep = torch.empty_like(within)
        keep.view(N, k)[order] = within.view(N, k)
        return keep.view(N, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d)
        N = xf.shape[0]
        logits, probs, w, idx = self.route(xf)
        S = self.n_experts + self.n_noop
        if self.capacity_factor > 0 and self.training:
            keep = self._keep(idx, tuple(lead))
            w = w * keep
        else:
            keep = None
        # one-hot assignment counts [S]; f sums to 1 over slots (k choices / k)
        counts = F.one_hot(idx, S).sum(dim=(0, 1)).to(probs.dtype)
        f = counts / (N * self.top_k)
        P = probs.mean(dim=0)
        self._aux = {"load_balance": (S * (f * P).sum(), self.lb_weight),
                     "router_z": (torch.logsumexp(logits, dim=-1).pow(2).mean(), self.z_weight)}
        with torch.no_grad():
            self._counts = counts.detach() if self._counts is None else self._counts + counts.detach()
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(-1).sum()
            self._entropy = self._entropy + ent.detach()
            self._tokens += N
            if keep is not None:
                self._dropped = self._dropped + (~keep).sum().detach()
        out = torch.zeros_like(xf)
        flat_e, flat_w = idx.reshape(-1), w.reshape(-1).to(xf.dtype)
        flat_tok = torch.arange(N, device=x.device).repeat_interleave(self.top_k)
        if keep is not None:  # dropped pairs go to a slot past the last: never computed
            flat_e = torch.where(keep.reshape(-1), flat_e, S)
        # group the (token, choice) pairs by slot: one sort and one host sync for all experts
        order = flat_e.argsort(stable=True)
        sizes = torch.bincount(flat_e, minlength=S + 1).tolist()
        start = 0
        for e in range(self.n_experts):  # no-op slots (>= n_experts) come last and compute nothing
            sel = order[start:start + sizes[e]]
            start += sizes[e]
            if sel.numel() == 0:
                continue
            tok = flat_tok[sel]
            out.index_add_(0, tok, (self.expert(e, xf[tok]) * flat_w[sel, None]).to(out.dtype))
        return out.view(x.shape)

    def aux_losses(self) -> dict:
        return dict(self._aux)

    def routing_stats(self) -> dict:
        if self._counts is None:
            return {}
        counts = self._counts.double().cpu()
        frac = counts / counts.sum()
        stats = {f"expert_frac.e{i}": float(frac[i]) for i in range(self.n_experts)}
        if self.n_noop:
            stats["noop_frac"] = float(frac[self.n_experts:].sum())
        stats["router_entropy"] = float(self._entropy) / max(self._tokens, 1)
        if self.capacity_factor > 0:
            stats["dropped_frac"] = float(self._dropped) / max(self._tokens * self.top_k, 1)
        self._reset_stats()
        return stats


def active_params(model: nn.Module) -> int:
    """Parameters one token uses: the total minus the (E - k) experts it does not visit in
    every SparseMoE layer (k real experts at most with no-op slots). Tied weights count once."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for m in model.modules():
        if isinstance(m, SparseMoE):
            idle += max(m.n_experts - m.top_k, 0) * m.expert_params
    return total - idle


def forward_flops(model: nn.Module, *inputs) -> int:
    """FLOPs one forward of `model(*inputs)` executes, counted by torch.utils.flop_counter
    (matmuls, attention, convolutions): the MoE layers compute only the (token, expert)
    pairs the router picked, so this counts only the experts tokens visit (no-op choices
    cost nothing but the router)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return int(counter.get_total_flops())


# ---- the `moe` architecture -----------------------------------------------------------------

@dataclass
class Config:
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    n_experts: int = 16  # seed 002: 16 experts, top-2
    top_k: int = 2
    d_expert: int = 1024  # hidden width of each SwiGLU expert
    moe_every: int = 1  # layer i has a MoE FFN if i % moe_every == moe_offset, else dense
    moe_offset: int = 0
    d_ffn: int = 0  # dense FFN hidden width (0 = 4 d_model)
    capacity_factor: float = 0.0  # 0 = dropless
    renormalize: bool = True
    lb_weight: float = 0.01
    z_weight: float = 0.001
    max_len: int = 1024  # learned absolute positions
    dropout: float = 0.0  # the attention's (gpt2 CausalSelfAttention) dropout


FLAVORS = {
    "debug": Config(d_model=32, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=32, max_len=1024),
    # seed 002's "Sparse MoE Transformer, 158M (20M active), 16 experts top-2"
    "seed": Config(d_model=512, n_layers=6, n_heads=8, n_experts=16, top_k=2, d_expert=1024, max_len=1024),
}

PARAM_COUNTS = {"debug": 116160, "seed": 158666496}


def periodic(n_layers: int, every: int, offset: int, field: str) -> list[bool]:
    """[i % every == offset % every for each layer]; every >= 1, -every <= offset < every
    (a negative offset counts from the end of each group: -1 = its last layer)."""
    if every < 1 or not -every <= offset < every:
        raise ValueError(f"model.{field}_every must be >= 1 and model.{field}_offset in "
                         f"-{field}_every..{field}_every-1, found every={every}, offset={offset}")
    return [i % every == offset % every for i in range(n_layers)]


def build(config: Config, d_input: int) -> nn.Module:
    from archlab.architectures.mixers import HybridStack

    moe = periodic(config.n_layers, config.moe_every, config.moe_offset, "moe")
    opts = dict(vars(config), bias=True)
    return HybridStack(d_input, config.d_model, ["attention"] * config.n_layers,
                       ["moe" if m else "dense" for m in moe], opts, max_len=config.max_len)
