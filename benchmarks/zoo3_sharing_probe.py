"""Zoo III sharing/routing probe: what BDH's activation sparsity and MoD's routing look like
after a short real training run (not a leaderboard; the platform's sweeps do that).

One process, no Ray, the platform's model code and aux interface:
- `bdh` on the byte task (wikitext2-bytes rows, random crops), AdamW lr 1e-3 wd 0.1 (the
  official recipe's optimiser): val bits per byte, and the fraction of non-zero xs, ys and
  xs * ys at init and after training (routing_stats()).
- `mod` on the vector task (wikitext2-minilm384, context 5, every window of 6 vectors),
  MSE + the router BCE through collect_aux_losses: val cosine of the seed protocol (last
  position) with the causal threshold rule, the routed fractions and the router's
  agreement with top-k.

    python benchmarks/zoo3_sharing_probe.py --data ../shared/data --steps 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from archlab.architectures import build_model, make_config
from archlab.architectures.aux import collect_aux_losses, collect_routing_stats, weighted_aux_total
from archlab.architectures.io import count_params


def byte_rows(path: Path) -> torch.Tensor:
    t = pq.read_table(path, columns=["bytes", "n_valid"])
    full = np.asarray(t.column("n_valid").to_numpy()) == 512
    rows = np.stack(t.column("bytes").to_numpy(zero_copy_only=False))[full]  # (R, 512)
    return torch.from_numpy(rows.astype(np.int64))


def probe_bdh(data: Path, args) -> dict:
    train, valid = byte_rows(data / "wikitext2-bytes/train.parquet"), byte_rows(data / "wikitext2-bytes/valid.parquet")
    cfg = make_config("bdh", args.bdh_flavor, json.loads(args.bdh_set))
    model = build_model("bdh", "token", cfg, vocab_size=256)
    g = torch.Generator().manual_seed(0)
    T, B = args.bdh_len, args.batch
    val = valid[torch.randperm(len(valid), generator=g)[:32], : T + 1]

    def evaluate() -> tuple[float, dict]:
        model.eval()
        collect_routing_stats(model)  # drop the training forwards' statistics
        with torch.no_grad():
            logits = model(val[:, :-1])
            nll = F.cross_entropy(logits.reshape(-1, 256), val[:, 1:].reshape(-1)).item()
        stats = collect_routing_stats(model)
        model.train()
        return nll / math.log(2), {k: v for k, v in stats.items() if "." not in k}

    bpb0, sparse0 = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    t0 = time.time()
    for _ in range(args.steps):
        rows = train[torch.randint(0, len(train), (B,), generator=g)]
        start = int(torch.randint(0, 512 - T, (1,), generator=g))
        x = rows[:, start : start + T + 1]
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    wall = time.time() - t0
    bpb, sparse = evaluate()
    return {"arch": "bdh", "flavor": args.bdh_flavor, "config": cfg.__dict__, "params": count_params(model),
            "steps": args.steps, "batch": B, "seq_len": T, "train_s": round(wall, 1),
            "val_bpb_init": round(bpb0, 4), "val_bpb": round(bpb, 4),
            "active_init": {k: round(v, 4) for k, v in sparse0.items()},
            "active_trained": {k: round(v, 4) for k, v in sparse.items()}}


def vector_docs(path: Path) -> list[np.ndarray]:
    col = pq.read_table(path, columns=["embeddings"]).column("embeddings").to_pylist()
    return [np.asarray(d, dtype=np.float32) for d in col if len(d) > 5]


def windows(docs: list[np.ndarray], n: int) -> torch.Tensor:
    out = [np.stack([d[i : i + n] for i in range(len(d) - n + 1)]) for d in docs]
    return torch.from_numpy(np.concatenate(out))  # (W, n, D)


def probe_mod(data: Path, args) -> dict:
    tr = windows(vector_docs(data / "wikitext2-minilm384/train.parquet")[: args.mod_docs], 6)
    va = windows(vector_docs(data / "wikitext2-minilm384/valid.parquet"), 6)
    cfg = make_config("mod", args.mod_flavor, json.loads(args.mod_set))
    model = build_model("mod", "vector", cfg, d_in=384)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    bce = []
    t0 = time.time()
    for _ in range(args.steps):
        x = tr[torch.randint(0, len(tr), (args.batch,), generator=g)]
        loss = F.mse_loss(model(x[:, :-1]), x[:, 1:])
        aux = collect_aux_losses(model)
        bce.append(aux["mod_router_bce"][0].item())
        extra = weighted_aux_total(aux)  # None when every weight is 0
        loss = loss if extra is None else loss + extra
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    wall = time.time() - t0
    train_stats = collect_routing_stats(model)
    model.eval()
    # per routed layer and position: the fraction of validation windows the rule routes
    per_pos: dict[int, list] = {}
    hooks = [blk.register_forward_hook(lambda m, inp, out, i=i: per_pos.setdefault(i, []).append(
        (m.route_logits(inp[0]) > 0).float().sum(0))) for i, blk in enumerate(model.backbone.h)
        if hasattr(blk, "router")]
    with torch.no_grad():
        pred = torch.cat([model(va[i : i + 512, :-1]) for i in range(0, len(va), 512)])
    for h in hooks:
        h.remove()
    eval_stats = collect_routing_stats(model)
    routed_by_pos = {f"layer{i}": [round(v, 3) for v in (torch.stack(c).sum(0) / len(va)).tolist()]
                     for i, c in per_pos.items()}
    cos = (pred[:, -1] * va[:, -1]).sum(-1).mean().item()
    return {"arch": "mod", "flavor": args.mod_flavor, "config": cfg.__dict__, "params": count_params(model),
            "steps": args.steps, "batch": args.batch, "train_s": round(wall, 1),
            "router_bce_first_last": [round(bce[0], 4), round(float(np.mean(bce[-20:])), 4)],
            "train": {k: round(v, 4) for k, v in train_stats.items() if "." not in k},
            "eval_threshold_frac": round(eval_stats["mod_threshold_frac"], 4),
            "eval_routed_by_position": routed_by_pos,
            "val_cosine_seed_protocol": round(cos, 4), "val_windows": len(va)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--only", choices=["bdh", "mod"], default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bdh-flavor", default="cpu")
    ap.add_argument("--bdh-set", default="{}", help="JSON overrides of the bdh config")
    ap.add_argument("--bdh-len", type=int, default=128)
    ap.add_argument("--mod-flavor", default="debug")
    ap.add_argument("--mod-set", default='{"d_model": 128, "n_layers": 4, "n_heads": 4, "capacity": 0.25}')
    ap.add_argument("--mod-docs", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, fn in (("bdh", probe_bdh), ("mod", probe_mod)):
        if args.only in (None, name):
            print(json.dumps(fn(args.data, args)), flush=True)


if __name__ == "__main__":
    main()
