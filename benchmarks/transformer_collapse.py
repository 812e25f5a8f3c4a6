"""The seed-recipe Transformer's collapse to the global mean vector, before and after the fix.

One process, no Ray. Trains the transformer `seed` flavor (post-norm 4 x 512, 8 heads) with
the seed recipe (MSE, AdamW lr 5e-4 wd 0.01, batch 32, clip 1.0, context 5, a prediction at
every position) on the train split, and scores the seed protocol on the valid windows (5
context vectors -> the 6th) next to the mean-vector and linear-average baselines, with the
collapse check (mean cosine of the predictions to their own mean, flagged above 0.98 as on
the leaderboard):

- before: `scale_input=False`, the model as it was (and as saved configs rebuild it);
- after:  `scale_input=True` (the flavors' value): the projected input times sqrt(d_model)
  before the sinusoidal positions are added.

It also prints, at initialisation, the RMS entry of the projected input against that of the
position table: the imbalance the fix removes. `--ablations` adds the other levers the issue
named, each on the *before* model, as probes (a patched copy, not config options): no
positions at all, a 100-step linear warm-up, pre-norm layers, lr 1e-4, dropout 0; and the
fixed model with the baseline-residual head (`model.head=residual`).

    python benchmarks/transformer_collapse.py --steps 300 --ablations
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from zoo1_compare import TrainWindows, load_split

from archlab.architectures import build_model, make_config
from archlab.platform.baselines import evaluate_baselines, windows
from archlab.platform.leaderboard import COLLAPSE_THRESHOLD
from archlab.platform.losses import make_loss
from archlab.platform.metrics import prediction_self_cosine

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "wikitext2-minilm384-sample"

# name -> (scale_input, probe applied to the built model, lr, warm-up steps, model.head)
VARIANTS = {
    "before (scale_input=False)": (False, None, 5e-4, 0, "plain"),
    "after (scale_input=True)": (True, None, 5e-4, 0, "plain"),
}
ABLATIONS = {
    "before + no positions": (False, "no_positions", 5e-4, 0, "plain"),
    "before + warm-up 100": (False, None, 5e-4, 100, "plain"),
    "before + pre-norm": (False, "pre_norm", 5e-4, 0, "plain"),
    "before + lr 1e-4": (False, None, 1e-4, 0, "plain"),
    "before + dropout 0": (False, "no_dropout", 5e-4, 0, "plain"),
    "after + head=residual": (True, None, 5e-4, 0, "residual"),
}


def probe(model, kind: str | None) -> None:
    bb = model.backbone
    if kind == "no_positions":
        bb.pe.zero_()
    elif kind == "pre_norm":
        for layer in bb.encoder.layers:  # nn.TransformerEncoderLayer reads norm_first in forward
            layer.norm_first = True
    elif kind == "no_dropout":
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0


@torch.no_grad()
def seed_protocol(model, ctx: torch.Tensor, tgt: torch.Tensor) -> tuple[float, float]:
    """(mean cosine to the target, self-cosine) of the predictions after the full context."""
    was = model.training
    model.eval()
    pred = torch.cat([model(ctx[i: i + 512])[:, -1] for i in range(0, len(ctx), 512)])  # (N, D)
    model.train(was)
    return float(F.cosine_similarity(pred, tgt, dim=-1).mean()), prediction_self_cosine(pred)


@torch.no_grad()
def input_vs_positions(model, ctx: torch.Tensor) -> tuple[float, float]:
    """RMS entry of what the encoder gets from the input (projection x scale) and from the
    position table, at positions 0..context-1."""
    bb = model.backbone
    h = model.in_proj(ctx[:512]) * bb.input_scale  # (N, context, d_model)
    pe = bb.pe[: ctx.shape[1]]
    return float(h.pow(2).mean().sqrt()), float(pe.pow(2).mean().sqrt())


def train(name, spec, train_w, vctx, vtgt, args) -> dict:
    scale_input, kind, lr, warmup, head = spec
    torch.manual_seed(args.seed)
    cfg = make_config("transformer", args.flavor, {"scale_input": scale_input})
    model = build_model("transformer", "vector", cfg, d_in=train_w.shape[-1], head=head, context=args.context)
    probe(model, kind)
    in_rms, pe_rms = input_vs_positions(model, vctx)
    init_cos, init_self = seed_protocol(model, vctx, vtgt)
    loss_fn = make_loss("mse")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    g = torch.Generator().manual_seed(args.seed)
    n, step, t0 = train_w.shape[0], 0, time.perf_counter()
    model.train()
    while step < args.steps:
        order = torch.randperm(n, generator=g)
        for s in range(n // args.batch_size):
            x = train_w[order[s * args.batch_size: (s + 1) * args.batch_size]]  # (B, context + 1, D)
            loss = loss_fn(model(x[:, :-1]), x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= args.steps:
                break
    cos, self_cos = seed_protocol(model, vctx, vtgt)
    out = {"variant": name, "steps": step, "cosine": cos, "self_cos": self_cos, "init_cosine": init_cos,
           "init_self_cos": init_self, "input_rms": in_rms, "pos_rms": pe_rms, "train_s": time.perf_counter() - t0}
    print(f"  {name}: cosine {cos:.4f}, self-cos {self_cos:.4f} after {step} steps ({out['train_s']:.0f}s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SAMPLE, help="archlab dataset folder or train/valid.parquet folder")
    ap.add_argument("--flavor", default="seed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all selected)")
    ap.add_argument("--ablations", action="store_true", help="also the no-positions / warm-up / pre-norm / lr / dropout probes and head=residual")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_docs, valid_docs = load_split(args.data, "train"), load_split(args.data, "valid")
    train_w = TrainWindows(train_docs, args.context)
    ctx, tgt = windows(valid_docs, args.context)
    vctx, vtgt = torch.from_numpy(ctx), torch.from_numpy(tgt)
    base = evaluate_baselines(train_docs, valid_docs, context=args.context, seed=args.seed, retrieval=False)
    mean_b, lin_b = base["mean_vector"]["cosine"], base["linear_average"]["cosine"]
    print(f"{args.data.name}: {train_w.shape[0]} train windows, {len(vtgt)} valid windows; "
          f"baselines: mean_vector {mean_b:.4f}, linear_average {lin_b:.4f}", flush=True)

    variants = {**VARIANTS, **(ABLATIONS if args.ablations else {})}
    if args.only:
        keep = [v.strip() for v in args.only.split(",")]
        unknown = [v for v in keep if v not in {**VARIANTS, **ABLATIONS}]
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; variants: {', '.join({**VARIANTS, **ABLATIONS})}")
        variants = {k: v for k, v in {**VARIANTS, **ABLATIONS}.items() if k in keep}
    rows = [train(name, spec, train_w, vctx, vtgt, args) for name, spec in variants.items()]
    cols = ["variant", "steps", "val cosine", "vs mean_vector", "vs linear_average", "self-cos",
            "collapsed", "self-cos at init", "input RMS / position RMS at init", "train s"]
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join([
            r["variant"], str(r["steps"]), f"{r['cosine']:.4f}", f"{r['cosine'] - mean_b:+.4f}",
            f"{r['cosine'] - lin_b:+.4f}", f"{r['self_cos']:.4f}",
            "collapsed" if r["self_cos"] > COLLAPSE_THRESHOLD else "no", f"{r['init_self_cos']:.4f}",
            f"{r['input_rms']:.3f} / {r['pos_rms']:.3f}", f"{r['train_s']:.0f}",
        ]) + " |")


if __name__ == "__main__":
    main()
