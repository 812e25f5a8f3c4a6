"""One lever at a time on a sweep's winner (issue 13 item 6): the config the confirm stage
ranked first for an architecture, retrained on the confirm seeds as it is and with one
lever changed (context 5 -> 32, residual -> plain head, the optimizer or the scheduler
swapped, or any config fields set: `model.attn_every=1+model.n_layers=4`), each variant on
the same seeds, so every difference is paired by seed.

    python benchmarks/research_ablation.py --config benchmarks/configs/research_vectors.yaml \
        --set data.path=<prepared vectors> --result <storage>/research-vectors-1/archlab_result.json \
        --arch transformer --variants base,ctx32,plain,optimizer

Prints val_cosine_seed (the seed protocol: the same windows at every context) per variant,
its mean with a 95% t interval over the seeds, and the paired difference to `base`. Each run
is an `archlab train` (run_train) in local mode, tracked in its own MLflow store under a
temporary folder (or --tracking-uri).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

VARIANTS = {
    "base": "the winner's config as the sweep ran it",
    "ctx32": "data.context 32 (training windows of 33 vectors; evaluation unchanged)",
    "plain": "model.head plain",
    "residual": "model.head residual",
    "optimizer": "train.optimizer swapped (adamw <-> schedule_free)",
    "scheduler": "train.scheduler swapped (cosine <-> plateau)",
}


def winner(result: dict, arch: str | None, metric: str) -> tuple[str, dict, list[int]]:
    """(arch, trial config, seeds) of the confirm stage's best config mean, for `arch`
    (None: the best architecture)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for t in result["confirm"]:
        if t.get("error") or not isinstance(t["metrics"].get(metric), (int, float)):
            continue
        groups.setdefault((t["config"]["arch"], t["config_hash"]), []).append(t)
    if arch is not None:
        groups = {k: v for k, v in groups.items() if k[0] == arch}
    if not groups:
        raise SystemExit(f"no confirm runs{f' of {arch}' if arch else ''} in the result")
    key = max(groups, key=lambda k: sum(t["metrics"][metric] for t in groups[k]) / len(groups[k]))
    g = groups[key]
    return key[0], g[0]["config"], sorted(int(t["confirm_seed"]) for t in g)


def variant_cfg(base_cfg, variant: str):
    cfg = base_cfg.model_copy(deep=True)
    if variant == "ctx32":
        cfg.data.context = 32
    elif variant in ("plain", "residual"):
        cfg.model.head = variant
    elif variant == "optimizer":
        cfg.train.optimizer = "adamw" if cfg.train.optimizer == "schedule_free" else "schedule_free"
    elif variant == "scheduler":
        cfg.train.scheduler = "plateau" if cfg.train.scheduler == "cosine" else "cosine"
    elif "=" in variant:  # any config field(s): "model.attn_every=1" or "a=1+b=2"
        from archlab.platform.config import ArchlabConfig, apply_overrides

        cfg = ArchlabConfig.model_validate(apply_overrides(cfg.to_dict(), variant.split("+")))
    elif variant != "base":
        raise SystemExit(f"--variants: unknown {variant!r}; expected one of {', '.join(VARIANTS)} "
                         "or config overrides key=value[+key=value]")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--result", type=Path, default=None, help="the sweep's archlab_result.json")
    ap.add_argument("--trial-config", type=Path, default=None,
                    help="instead of --result: a search trial's Tune params.json (its config), with --seeds")
    ap.add_argument("--seeds", default="1,2,3", help="with --trial-config")
    ap.add_argument("--base-scores", default=None,
                    help="the base variant's scores on --seeds (e.g. its confirm runs: same config, seeds and "
                         "local-mode path) instead of retraining it")
    ap.add_argument("--arch", default=None, help="default: the confirm stage's best architecture")
    ap.add_argument("--variants", default="base,ctx32,plain,optimizer")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = ap.parse_args()

    from archlab.platform.config import load_config
    from archlab.platform.stats import paired, t_interval
    from archlab.platform.sweep import run_train, trial_cfg

    base = load_config(args.config, [*args.sets, "train.num_workers=0", "tracking.register_models=false"])
    metric = base.metric()[0]
    if args.trial_config is not None:
        config = json.loads(args.trial_config.read_text())
        arch, seeds = config["arch"], [int(x) for x in args.seeds.split(",")]
    elif args.result is not None:
        arch, config, seeds = winner(json.loads(args.result.read_text()), args.arch, metric)
    else:
        ap.error("--result or --trial-config is required")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"# {arch}: {json.dumps(config, sort_keys=True)}; seeds {seeds}", flush=True)
    scores: dict[str, list[float]] = {}
    if args.base_scores:
        scores["base"] = [float(x) for x in args.base_scores.split(",")]
        if len(scores["base"]) != len(seeds):
            ap.error(f"--base-scores: expected {len(seeds)} values (one per seed), found {len(scores['base'])}")
        variants = ["base", *[v for v in variants if v != "base"]]
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/m.db"
        for v in variants:
            if v in scores:
                print(f"  {v:9s} given: {scores[v]}", flush=True)
                continue
            scores[v] = []
            for seed in seeds:
                cfg = variant_cfg(trial_cfg(base.to_dict(), config), v)
                cfg.train.seed = seed
                cfg.tracking.uri, cfg.sweep.storage_path = uri, f"{tmp}/runs"
                cfg.sweep.space_overrides = {}  # one run: no search space (run_train checks them against its arch)
                m = run_train(cfg)["metrics"]
                scores[v].append(float(m[metric]))
                print(f"  {v:9s} seed {seed}: {metric} {scores[v][-1]:.4f}", flush=True)
    lines = [f"| variant | {metric} mean [95% CI] | d vs base [95% CI] | p |", "|---|---|---|---|"]
    for v in variants:
        iv = t_interval(scores[v])
        row = f"| {v}: {VARIANTS.get(v, 'set ' + v.replace('+', ', '))} | {iv.mean:.4f} [{iv.lo:.4f}, {iv.hi:.4f}] |"
        if v != "base" and "base" in scores:
            c = paired(scores[v], scores["base"])
            row += f" {c.diff.mean:+.4f} [{c.diff.lo:+.4f}, {c.diff.hi:+.4f}] | {c.p:.3g} |"
        else:
            row += " | |"
        lines.append(row)
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"arch": arch, "config": config, "seeds": seeds,
                                                           "scores": scores}, indent=2))


if __name__ == "__main__":
    main()
