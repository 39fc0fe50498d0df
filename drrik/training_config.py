"""The training loop's sections of a run's config: trainer, schedules, sweep, eval, checkpoints,
data parallelism and W&B.

Like :mod:`drrik.config`, which gathers them into ``RunConfig``, this module imports no
runtime module (nor torch): W&B's environment settings are read only when asked for.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from simple_parsing.helpers import Serializable

from drrik.errors import require
from drrik.options import check_choices, split_legacy
from drrik.settings import EnvironmentSettings, get_settings

SWEEPABLE = (
    "k",
    "target_l0",
    "l1_coefficient",
    "expansion_factor",
    "d_sae",
    "architecture",
    "skip_connection",
)


def slot_name(hook: str, setting: dict[str, str], several_hooks: bool) -> str:
    """A readable, filesystem-safe name for one dictionary of a run."""
    parts = [hook] if several_hooks or not setting else []
    parts += [f"{k}={v}" for k, v in setting.items()]
    return "__".join(parts)


def parse_sweep(sweep: list[str]) -> list[dict[str, str]]:
    """``["k=16,32", "l1_coefficient=1,2"]`` -> the grid of settings, one dict per SAE.

    The values stay as written (they name the SAEs); :meth:`RunConfig.sae_configs_for` types
    them by the SAE field's declared type.
    """
    grid: list[dict[str, str]] = [{}]
    for entry in sweep:
        name, eq, values = entry.partition("=")
        name = name.strip().replace("-", "_")
        require(
            bool(eq) and name in SWEEPABLE,
            "sweep",
            entry,
            f"write field=v1,v2 with a field from {SWEEPABLE}",
        )
        options = [v.strip() for v in values.split(",") if v.strip()]
        require(bool(options), "sweep", entry, f"give at least one value for {name}")
        grid = [{**g, name: v} for g in grid for v in options]
    return grid


LRScheduler = Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"]


@dataclass
class LRScheduleConfig(Serializable):
    """The learning-rate schedule (:mod:`drrik.schedules`): warm-up, main phase, decay."""

    lr_scheduler_name: LRScheduler = "constant"
    """Main phase between warm-up and decay."""
    lr_warm_up_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    lr_decay_steps: int = 0
    """Final steps of linear decay to lr_end_fraction x lr."""
    lr_end_fraction: float = 0.0
    """Learning rate at the end of cosine/decay phases, as a fraction of lr."""
    n_restart_cycles: int = 1
    """Cycles of cosineannealingwarmrestarts."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("lr_warm_up_steps", "lr_decay_steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "use a value >= 0")
        require(
            0.0 <= self.lr_end_fraction <= 1.0,
            "lr_end_fraction",
            self.lr_end_fraction,
            "use a fraction of the base learning rate in [0, 1]",
        )
        require(self.n_restart_cycles >= 1, "n_restart_cycles", self.n_restart_cycles, ">= 1")


@dataclass
class TrainerConfig(LRScheduleConfig):
    """The optimization loop: budget, optimizer, schedules, initialization, dead features."""

    training_tokens: int = 400_000
    """Training budget in activations (tokens) served to each SAE."""
    lr: float = 1e-3
    """Adam learning rate."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    max_grad_norm: float = 1.0
    """Clip each SAE's gradient norm to this; 0 turns clipping off."""
    l1_warm_up_steps: int = 0
    """Steps of linear warm-up of the sparsity coefficient (L1 or L0)."""
    b_dec_init_method: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Decoder-bias initialization."""
    normalize_activations: Literal["expected_average_only_in", "none"] = "expected_average_only_in"
    """expected_average_only_in scales inputs to norm sqrt(d_in) (folded at save) or none."""
    dead_feature_window: int = 100_000
    """A feature that has not fired for this many tokens counts as dead."""
    resample_every_tokens: int = 0
    """Resample dead features every this many tokens (0: never)."""
    seed: int = 42
    """Seed for SAE initialization, buffer shuffles and sampling."""
    autocast: bool | None = None
    """bf16 autocast for the SAE forward/backward; unset = on where bf16 is native (recent
    GPUs, CPUs with AVX512-BF16/AMX), where it is 2-3x faster at the same quality."""
    compile_sae: bool = False
    """torch.compile the SAE training step."""
    log_every_steps: int = 10
    """Read metrics to the host, log and check for NaN every this many steps."""
    sweep: list[str] = field(default_factory=list)
    """Several SAEs from one stream, one field=v1,v2 each: --sweep k=16,32 expansion_factor=4,8."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sweep, str):  # the Python API's and old config.yaml's one string
            self.sweep = [self.sweep]
        self.sweep = split_legacy(self.sweep, ";", "--sweep")
        for name in ("training_tokens", "log_every_steps"):
            require(getattr(self, name) > 0, name, getattr(self, name), "use a positive number")
        for name in (
            "max_grad_norm",
            "l1_warm_up_steps",
            "dead_feature_window",
            "resample_every_tokens",
        ):
            value = getattr(self, name)
            require(value >= 0, name, value, "use a value >= 0")
        require(self.lr > 0, "lr", self.lr, "use a positive learning rate")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(0 <= value < 1, name, value, "use a value in [0, 1)")
        parse_sweep(self.sweep)


@dataclass
class EvalConfig(Serializable):
    """Held-out evaluation: reconstruction, sparsity and downstream CE/KL metrics."""

    eval_every_tokens: int = 0
    """Evaluate every this many training tokens (0: only at the end)."""
    eval_contexts: int = 64
    """Held-out contexts per evaluation (the same ones every time)."""
    eval_batch_size_prompts: int = 16
    """Contexts per forward pass during evaluation."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens counts as dense."""
    eval_together: bool = False
    """At the end, also evaluate every dictionary spliced in during one forward pass (a
    transcoder per layer as a replacement model), reported as spliced_together (one per
    sweep setting)."""

    def __post_init__(self) -> None:
        require(self.eval_every_tokens >= 0, "eval_every_tokens", self.eval_every_tokens, ">= 0")
        for name in ("eval_contexts", "eval_batch_size_prompts"):
            require(getattr(self, name) > 0, name, getattr(self, name), "use a positive number")
        require(
            0 < self.dense_threshold <= 1,
            "dense_threshold",
            self.dense_threshold,
            "use a fraction in (0, 1]",
        )


@dataclass
class CheckpointConfig(Serializable):
    """When checkpoints are written and how many are kept."""

    checkpoint_every_tokens: int = 0
    """Write a checkpoint every this many training tokens (0: by time only)."""
    checkpoint_every_minutes: float = 15.0
    """Write a checkpoint every this many minutes (0: by tokens only)."""
    keep_checkpoints: int = 3
    """Keep this many most recent checkpoints."""

    def __post_init__(self) -> None:
        for name in ("checkpoint_every_tokens", "checkpoint_every_minutes"):
            value = getattr(self, name)
            require(value >= 0, name, value, "use a value >= 0 (0 turns it off)")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "use >= 1")


@dataclass
class DistributedConfig(Serializable):
    """Parallelism under torchrun: how the data and the features are split, and how long ranks
    may wait."""

    data_shards: int = 0
    """Disjoint data streams per step, a multiple of the process count (0: one per process)."""
    feature_parallel: int = 1
    """Split each dictionary's features over this many ranks (it must divide d_sae and the
    process count); the other factor of the process count splits the data."""
    distributed_timeout_minutes: float = 10.0
    """A collective that waits longer than this (dead or hung rank) stops the job."""

    def __post_init__(self) -> None:
        require(self.data_shards >= 0, "data_shards", self.data_shards, "use >= 0")
        require(
            self.feature_parallel >= 1,
            "feature_parallel",
            self.feature_parallel,
            "use 1 (every rank holds all features) or more",
        )
        require(
            self.distributed_timeout_minutes > 0,
            "distributed_timeout_minutes",
            self.distributed_timeout_minutes,
            "use a positive number of minutes",
        )


WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = typing.get_args(WandbMode)
DEFAULT_PROJECT = "drrik"


@dataclass
class WandbConfig(Serializable):
    """Where training curves, histograms and the final SAE go on Weights & Biases."""

    wandb_mode: Literal["", WandbMode] = ""
    """Empty takes WANDB_MODE from the environment/.env, else disabled."""
    wandb_project: str = DEFAULT_PROJECT
    """W&B project; WANDB_PROJECT from the environment/.env replaces the default drrik."""
    wandb_entity: str | None = None
    """W&B user or team; unset takes WANDB_ENTITY from the environment/.env, else your default."""
    wandb_run_name: str | None = None
    """Display name of the W&B run; unset lets W&B choose one."""
    wandb_log_artifact: bool = False
    """Upload the final SAE directory as a W&B model artifact."""

    def __post_init__(self) -> None:
        check_choices(self)
        require(bool(self.wandb_project.strip()), "wandb_project", self.wandb_project, "name one")

    def resolved_mode(self, settings: EnvironmentSettings | None = None) -> str:
        """The mode in force: this config's, else the environment's, else disabled."""
        if self.wandb_mode:
            return self.wandb_mode
        mode = (settings or get_settings()).wandb_mode or "disabled"
        require(
            mode in WANDB_MODES,
            "WANDB_MODE",
            mode,
            f"set it to one of {WANDB_MODES} or pass --wandb-mode",
        )
        return mode

    def resolved_project(self, settings: EnvironmentSettings | None = None) -> str:
        """This config's project unless it is the default and WANDB_PROJECT names another."""
        if self.wandb_project != DEFAULT_PROJECT:
            return self.wandb_project
        return (settings or get_settings()).wandb_project or DEFAULT_PROJECT
