"""Settings: a YAML file validated by pydantic, with `--set key=value` overrides.

    archlab sweep --config my.yaml --set train.lr=1e-3 --set model.d_model=64

Every field has a default, so an empty file (or none) is a valid config that trains on the
shipped sample. `model.<anything else>` is an architecture field and lands in
`model.params` (validated against that architecture's Config when the model is built);
`model.head` (plain | residual) is a model setting of every architecture, not a params field.
The resolved config round-trips through JSON: it goes into Tune, Optuna and MLflow as data.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "wikitext2-minilm384-sample"


class ConfigError(ValueError):
    """A malformed config: names the file and field, expected and found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    # A dataset folder with manifest.json (see archlab/platform/shards.py); None = the sample.
    path: str = str(REPO_SAMPLE)
    train_split: str = "train"
    valid_split: str = "valid"
    # vector task: windows of context + 1 vectors; the model predicts at every position
    context: int = Field(5, ge=1)
    # token task: windows of seq_len + 1 tokens, documents packed with `separator`
    seq_len: int = Field(128, ge=2)
    separator: int | None = None  # None: the dataset's own (manifest) or 0
    stride: int = Field(1, ge=1)  # step between training windows inside a document
    shuffle_buffer: int = Field(2000, ge=0)  # bounded local shuffle, in windows
    on_bad_rows: Literal["error", "skip"] = "error"
    # expectations checked against the data before any worker starts (None = take the data's)
    dim: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=2)
    max_valid_windows: int = Field(0, ge=0)  # 0 = all
    # Train windows up to this size (MiB, estimated from the manifest) are read and cut once
    # per job and kept in Ray's object store; every trial and epoch iterates the cached
    # blocks. Larger train splits stream from the files each epoch. 0 = always stream.
    cache_train_mb: int = Field(1024, ge=0)

    @field_validator("path", mode="before")
    @classmethod
    def _default_path(cls, v: Any) -> Any:
        return str(REPO_SAMPLE) if v is None else str(Path(v).expanduser())


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are architecture fields -> params
    arch: str = "lstm"
    flavor: str = "debug"
    # vector task: "residual" predicts normalize(linear-average baseline of the last
    # data.context inputs + a zero-initialised head's correction); see architectures/io.py
    head: Literal["plain", "residual"] = "plain"
    params: dict[str, Any] = Field(default_factory=dict)

    def arch_overrides(self) -> dict[str, Any]:
        return {**self.params, **(self.model_extra or {})}


BUDGET_KINDS = ("epochs", "samples", "flops", "seconds")


class BudgetConfig(_Strict):
    """What one training run may spend (docs/compute.md). epochs: passes over the data
    (value = train.epochs, evaluations at epoch ends: today's behaviour); samples: training
    windows over all workers; flops: counted training FLOPs (flops_per_sample x samples);
    seconds: training wall time (train_time_s). Samples and flops runs stop at the first
    optimizer step whose cumulative count reaches the value, looping over the data as often
    as that takes."""

    kind: str = "epochs"
    value: float | None = None  # epochs: None = train.epochs; the other kinds need a value

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in BUDGET_KINDS:
            raise ValueError(f"train.budget.kind: expected one of {', '.join(BUDGET_KINDS)}, found {v!r}")
        return v


class TrainConfig(_Strict):
    task: Literal["vector", "token"] = "vector"
    epochs: int = Field(4, ge=1)
    # None: {kind: epochs, value: train.epochs}; see BudgetConfig and budget_kind/budget_value
    budget: BudgetConfig | None = None
    # evaluations per run on the budget grid value * i / evals, i = 1..evals (kinds other
    # than epochs; None = 8). kind=epochs evaluates at every epoch end, as before.
    evals: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    grad_accum: int = Field(1, ge=1)
    loss: str = "mse"
    # LR schedule (archlab/platform/trainer.py, LRSchedule): plateau = ReduceLROnPlateau on
    # val_loss per epoch; cosine = decay to 0 at the run's planned last step; constant = the
    # base lr after the warm-up; none = the base lr from step 0 (no warm-up)
    scheduler: Literal["plateau", "cosine", "constant", "none"] = "plateau"
    plateau_patience: int = Field(3, ge=0)
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    # linear warm-up over the first optimizer steps: a count, or a fraction of the planned
    # total (epochs x steps per epoch, see trainer.planned_steps); at most one of the two
    warmup_steps: int = Field(0, ge=0)
    warmup_frac: float = Field(0.0, ge=0, lt=1)
    # adamw | schedule_free (AdamWScheduleFree, Defazio et al. 2024: no schedule beyond its
    # warm-up, so `scheduler` other than constant/none is ignored with a warning)
    optimizer: Literal["adamw", "schedule_free"] = "adamw"
    # a checkpoint every N optimizer steps inside an epoch too (0 = at epoch ends only)
    checkpoint_every_steps: int = Field(0, ge=0)
    # Ray Train workers per run (DDP). 0: local mode, the run trains in the Tune trial's (or
    # `archlab train`'s) own process, without Ray Train: no worker, controller or dataset
    # actors, no DDP, checkpoints written by archlab (train.py). For small models on small
    # machines, where a Train run's process start-up (~50 s of CPU on 2 cores) dwarfs the
    # training. (`archlab train` then prints no progress lines: they come from Train.)
    num_workers: int = Field(2, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch.compile the model for the training forward/backward (opt-in; evaluation stays
    # eager, so eval-mode shapes never recompile). BENCHMARKS.md "Precision and compile"
    compile: bool = False
    max_steps_per_epoch: int = Field(0, ge=0)  # 0 = the whole shard
    max_failures: int = Field(1, ge=0)
    seed: int = 0
    # fault injection for restart tests: raise once at this epoch unless resumed (-1 = off)
    fail_once_at_epoch: int = -1
    fail_once_at_step: int = -1  # the same, after this optimizer step (mid-epoch checkpoint tests)
    # fault injection for reliability tests: a NaN loss at this optimizer step on every
    # rank and every try, as a diverged run gives (-1 = off)
    inject_nan_at_step: int = -1

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainConfig":
        if self.warmup_steps and self.warmup_frac:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} and train.warmup_frac={self.warmup_frac}: set one of them, not both"
            )
        self._check_budget()
        return self

    def _check_budget(self) -> None:
        b = self.budget or BudgetConfig()
        if b.kind == "epochs":
            if b.value is not None and b.value != self.epochs:
                raise ValueError(
                    f"train.budget.value: with kind=epochs it is train.epochs; expected {self.epochs} (or no value), "
                    f"found {b.value:g} (set train.epochs instead)"
                )
            if self.evals is not None and self.evals != self.epochs:
                raise ValueError(
                    f"train.evals: with train.budget.kind=epochs the evaluations are the epoch ends; expected "
                    f"{self.epochs} (or none), found {self.evals}"
                )
            return
        if b.value is None or not (b.value > 0) or b.value == float("inf"):
            raise ValueError(f"train.budget.value: expected a finite number > 0 for kind={b.kind}, found {b.value!r}")
        if b.kind == "seconds" and (self.scheduler == "cosine" or self.warmup_frac):
            found = f"scheduler={self.scheduler}" if self.scheduler == "cosine" else f"warmup_frac={self.warmup_frac}"
            raise ValueError(
                "train.budget.kind=seconds: the run's step count is not known in advance, so the LR schedule cannot "
                f"end on it; expected train.scheduler plateau|constant|none and train.warmup_steps, found train.{found}"
            )

    @property
    def ranks(self) -> int:
        """Training processes of one run: num_workers, or 1 in local mode (num_workers 0)."""
        return max(1, self.num_workers)

    @property
    def budget_kind(self) -> str:
        return self.budget.kind if self.budget is not None else "epochs"

    @property
    def budget_value(self) -> float:
        """The budget in its unit (epochs: train.epochs)."""
        if self.budget is None or self.budget.value is None:
            return float(self.epochs)
        return float(self.budget.value)

    @property
    def n_evals(self) -> int:
        """Evaluations per run: epochs for kind=epochs, else train.evals (default 8)."""
        return self.epochs if self.budget_kind == "epochs" else (self.evals or 8)


class ConfirmConfig(_Strict):
    """The confirm stage (docs/compare.md): after the search, the best `top_k` configs of
    each architecture are retrained once per seed in `seeds`, the same list for every
    architecture, so runs pair by seed (train.seed: init + data order). `top_k: 0`: no
    confirm stage. `seeds: null`: train.seed + 1 .. train.seed + 3 (2 under smoke_test),
    seeds the search (train.seed) did not select on (sweep.confirm_seeds)."""

    top_k: int = Field(1, ge=0)
    seeds: list[int] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("at least one seed is needed (null: the default seeds; top_k: 0 turns the stage off)")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("seeds must be distinct (one confirm run per seed)")
        return v


class SweepConfig(_Strict):
    name: str = "archlab"
    archs: list[str] = Field(default_factory=lambda: ["lstm", "transformer"])
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(0, ge=0)  # 0 = derived from the cluster's CPUs/GPUs
    grace_period: int = Field(1, ge=1)  # ASHA, in epochs
    reduction_factor: int = Field(2, ge=2)
    storage_path: str | None = None  # None: ./archlab_runs (local); cluster: shared storage
    # a local storage_path on a cluster of several nodes must be declared shared (NFS at the
    # same path on every node); archlab then checks every node sees it (runtime.py)
    storage_shared: bool = False
    seed: int = 0
    # per-arch replacements of search-space entries, e.g. {lstm: {model.d_model: {choices: [128]}}}
    space_overrides: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    # the architecture every other one is tested against (leaderboard verdicts); None: archs[0]
    reference_arch: str | None = None
    # who decides how many search trials each architecture gets. equal: the same number for
    # every one (num_samples split round-robin, the first num_samples % len(archs) archs get
    # one more); TPE still samples each architecture's own space. tpe: every architecture
    # gets one trial, then TPE also chooses the architecture (a weak start can starve one).
    allocation: Literal["equal", "tpe"] = "equal"
    # how a trial's config is drawn inside its architecture's space: tpe (Optuna's TPE) or
    # random (Optuna's RandomSampler over the same space and allocation): the baseline a
    # search is measured against (benchmarks/search_efficiency.py)
    sampler: Literal["tpe", "random"] = "tpe"
    # TPE's first trials are uniform draws (Optuna's n_startup_trials, its default 10), the
    # same ones RandomSampler makes with the same seed: a sweep of <= this many trials is a
    # random search whatever `sampler` says
    tpe_startup_trials: int = Field(10, ge=1)
    # asha: weak trials stop at ASHA's rungs; none: every trial runs its whole budget
    early_stopping: Literal["asha", "none"] = "asha"
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig)
    # checkpoint housekeeping (docs/operations.md): every trial keeps at most its best and
    # its latest checkpoint; once the search's final models are logged to MLflow, trials
    # ASHA stopped early lose theirs unless they are among the `keep_checkpoints` best of
    # their architecture. None: keep every trial's checkpoints.
    keep_checkpoints: int | None = Field(3, ge=1)

    @field_validator("archs")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one architecture is needed")
        return v

    @model_validator(mode="after")
    def _reference_is_swept(self):
        if self.reference_arch is not None and self.reference_arch not in self.archs:
            raise ValueError(f"reference_arch {self.reference_arch!r} is not one of archs ({', '.join(self.archs)})")
        return self

    def reference(self) -> str:
        return self.reference_arch or self.archs[0]


class TrackingConfig(_Strict):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db
    experiment: str | None = None  # None: the sweep name
    register_models: bool = True
    registry_prefix: str = "archlab"


class RayConfig(_Strict):
    address: str | None = None  # None: $RAY_ADDRESS, else a local Ray
    num_cpus: int | None = None  # local Ray only; None: logical CPUs (see runtime.py)
    # local Ray only: how many idle worker processes the raylet keeps pooled, and no
    # prestarted pool. None: Ray's default (a pool of num_cpus, prestarted for the first
    # driver). Each pooled idle worker costs ~0.01 of a core (BENCHMARKS.md "Platform overhead").
    idle_workers: int | None = Field(None, ge=0)


class ArchlabConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    smoke_test: bool = False

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def metric(self) -> tuple[str, str]:
        """The sweep's objective: the seed protocol's cosine for vectors, loss for tokens."""
        return ("val_cosine_seed", "max") if self.train.task == "vector" else ("val_loss", "min")


def _parse_value(raw: str) -> Any:
    # YAML scalars: 1e-3 -> float, true -> bool, [a, b] -> list; anything else stays a string
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


SMOKE = {
    "model": {"flavor": "debug"},
    # local mode (docs/training.md): each trial trains in its Tune trial actor, reused from
    # trial to trial. A Ray Train run costs ~50 s of CPU in process start-up on 2 cores
    # whatever the model, which was most of the smoke demo (10 runs, ~7 min); the smoke
    # check is of the pipeline, not of DDP. `--set train.num_workers=1` (or 2) gives the
    # Ray Train path, as the full demo and the DDP, job and fault-injection tests run it.
    "train": {"epochs": 2, "max_steps_per_epoch": 12, "batch_size": 16, "num_workers": 0},
    "data": {"max_valid_windows": 256, "shuffle_buffer": 256},
    "sweep": {"num_samples": 4},
}


def _merge(base: dict, extra: dict) -> dict:
    # deep copies: overrides are applied in place afterwards and must never reach SMOKE
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    smoke_test: bool = False,
) -> ArchlabConfig:
    """Defaults <- YAML file <- smoke settings (if --smoke-test) <- --set overrides.

    --smoke-test is a command-line choice like --set, so it wins over the file: a config
    written for a full run (epochs, samples, budget) still gives a smoke-sized run with
    --smoke-test, which is what the flag promises. --set still wins over both."""
    import yaml

    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, found {type(loaded).__name__}")
        data = _merge(data, loaded)
    if smoke_test:
        data = _merge(data, SMOKE)
    data = apply_overrides(data, list(overrides or []))
    if smoke_test:
        data["smoke_test"] = True
    try:
        return ArchlabConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            found = err.get("input")
            lines.append(f"{field}: {err['msg']} (found {found!r})")
        # one line: the CLI prints a user error as a single line
        raise ConfigError(f"{source}: invalid config: " + "; ".join(lines)) from None
