"""Configuration of the streaming pipeline: model, data and activations store.

Sparsify-style dataclasses: every field is typed, has a default and a one-line docstring
(simple-parsing turns it into ``--help``), and is validated at construction so that bad input
fails in one line before any model or dataset is loaded. Field names are unique across all
config classes because the CLI exposes them as flat flags (``--hook``, ``--context-size``).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from simple_parsing.helpers import Serializable

from drrik.errors import check_device, read_yaml, reading, require
from drrik.sae.config import SAEConfig
from drrik.sae.spec import DictionarySpec
from drrik.wandb_logging import WandbConfig

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOOK = "blocks.12.hook_resid_post"
DTYPES = ("float32", "bfloat16", "float16")
SEPARATORS = ("bos", "eos", "none")
_HOOK_PATTERN = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass
class ModelConfig(Serializable):
    """Which language model to hook, where and at what precision."""

    model: str = DEFAULT_MODEL
    """Hub name (gpt2, EleutherAI/pythia-70m), local HF directory, .gguf file, or smollm2-135m."""
    hook: str = DEFAULT_HOOK
    """TransformerLens hook name; several comma-separated hooks share one forward pass."""
    device: str = "cpu"
    """Device of the model and the SAE: cpu, cuda, cuda:1, mps."""
    model_dtype: str = "auto"
    """LM precision: float32, bfloat16, float16, or auto (bfloat16 where the hardware has it)."""
    model_n_devices: int = 1
    """Spread the model's layers over this many GPUs (for models too big for one)."""

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "model", self.model, "name a model, e.g. smollm2-135m")
        for name in self.hook_names:
            require(
                bool(_HOOK_PATTERN.match(name)),
                "hook",
                self.hook,
                "use TransformerLens hook names, e.g. blocks.6.hook_resid_post",
            )
        require(
            len(set(self.hook_names)) == len(self.hook_names),
            "hook",
            self.hook,
            "list each hook once",
        )
        require(
            self.model_dtype in ("auto", *DTYPES),
            "model_dtype",
            self.model_dtype,
            f"use auto or one of {DTYPES}",
        )
        require(self.model_n_devices >= 1, "model_n_devices", self.model_n_devices, "use >= 1")
        check_device(self.device)

    @property
    def hook_names(self) -> list[str]:
        """The hooks as a list, in the order given."""
        return [h.strip() for h in self.hook.split(",") if h.strip()]


@dataclass
class DataConfig(Serializable):
    """Where text comes from and how it becomes fixed-length token contexts."""

    dataset: str = "drrik-offline"
    """Hub name, local file or dir (txt, json, jsonl, parquet, saved dataset), or drrik-offline."""
    dataset_config: str | None = None
    """Hub dataset configuration name (e.g. wikitext-103-raw-v1), if it has several."""
    split: str = "train"
    """Split to train on."""
    eval_split: str | None = None
    """Split to evaluate on; when unset, every holdout_every-th document is held out instead."""
    holdout_every: int = 20
    """Hold out one document in this many for evaluation when there is no eval_split."""
    streaming: bool = True
    """Stream hub datasets instead of downloading them whole."""
    text_column: str | None = None
    """Column with raw text; when unset, tokens/input_ids (pretokenized) or text is used."""
    context_size: int = 128
    """Tokens per context fed to the model."""
    prepend_bos: bool = True
    """Open every context with the BOS token."""
    document_separator: str = "bos"
    """Token placed between concatenated documents: bos, eos or none."""
    exclude_special_tokens: bool = True
    """Drop activations at BOS, EOS and pad positions from training batches."""

    def __post_init__(self) -> None:
        require(self.context_size >= 2, "context_size", self.context_size, "use at least 2 tokens")
        require(self.holdout_every >= 2, "holdout_every", self.holdout_every, "use 2 or more")
        require(
            self.document_separator in SEPARATORS,
            "document_separator",
            self.document_separator,
            f"use one of {SEPARATORS}",
        )


@dataclass
class StoreConfig(Serializable):
    """The activations store: how many activations are mixed and served per step."""

    train_batch_size_tokens: int = 4096
    """Activations per training step served by each data shard (one shard per process by
    default, so the global batch is this x the number of processes)."""
    n_batches_in_buffer: int = 16
    """Buffer size in model batches (tokens = this x store_batch_size_prompts x context_size)."""
    store_batch_size_prompts: int = 16
    """Contexts per language-model forward pass."""
    mix_fraction: float = 0.5
    """Fraction of the shuffled buffer kept back and mixed with the next refill."""
    act_store_device: str = "sae"
    """Where the buffer lives: sae (training device), model, cpu, or an explicit device."""
    buffer_dtype: str = "model"
    """Buffer precision: model (the model's dtype) or float32/bfloat16/float16."""
    prefetch_batches: int = 4
    """Tokenized model batches prepared ahead by the background producer thread."""

    def __post_init__(self) -> None:
        for name in ("train_batch_size_tokens", "n_batches_in_buffer", "store_batch_size_prompts"):
            value = getattr(self, name)
            require(value > 0, name, value, "use a positive number")
        require(
            0.0 <= self.mix_fraction < 1.0,
            "mix_fraction",
            self.mix_fraction,
            "use a fraction in [0, 1)",
        )
        require(
            self.buffer_dtype == "model" or self.buffer_dtype in DTYPES,
            "buffer_dtype",
            self.buffer_dtype,
            f"use model or one of {DTYPES}",
        )
        require(self.prefetch_batches >= 1, "prefetch_batches", self.prefetch_batches, "use >= 1")
        if self.act_store_device not in ("sae", "model"):
            check_device(self.act_store_device, "act_store_device")

    def buffer_tokens(self, context_size: int) -> int:
        """Capacity of the mixing buffer in tokens."""
        return self.n_batches_in_buffer * self.store_batch_size_prompts * context_size

    def check_fits(self, context_size: int) -> None:
        """The buffer must serve at least one training batch per refill."""
        served = int(self.buffer_tokens(context_size) * (1 - self.mix_fraction))
        require(
            served >= self.train_batch_size_tokens,
            "n_batches_in_buffer",
            self.n_batches_in_buffer,
            f"the buffer serves {served} tokens per refill, fewer than one training batch "
            f"({self.train_batch_size_tokens}); raise it or store_batch_size_prompts",
        )


B_DEC_INITS = ("geometric_median", "mean", "zeros")
NORMALIZATIONS = ("expected_average_only_in", "none")
SWEEPABLE = ("k", "l1_coefficient", "expansion_factor", "d_sae", "architecture")


def slot_name(hook: str, setting: dict[str, str], several_hooks: bool) -> str:
    """A readable, filesystem-safe name for one dictionary of a run."""
    parts = [hook] if several_hooks or not setting else []
    parts += [f"{k}={v}" for k, v in setting.items()]
    return "__".join(parts)


def parse_sweep(spec: str) -> list[dict[str, str]]:
    """``"k=16,32;l1_coefficient=1,2"`` -> the grid of settings, one dict per SAE."""
    grid: list[dict[str, str]] = [{}]
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, eq, values = part.partition("=")
        name = name.strip().replace("-", "_")
        require(
            bool(eq) and name in SWEEPABLE,
            "sweep",
            spec,
            f"write field=v1,v2;field2=... with fields from {SWEEPABLE}",
        )
        options = [v.strip() for v in values.split(",") if v.strip()]
        require(bool(options), "sweep", spec, f"give at least one value for {name}")
        grid = [{**g, name: v} for g in grid for v in options]
    return grid


@dataclass
class TrainerConfig(Serializable):
    """The optimization loop: budget, optimizer, schedules, initialization, dead features."""

    training_tokens: int = 250_000
    """Training budget in activations (tokens) served to each SAE."""
    lr: float = 1e-3
    """Adam learning rate."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    max_grad_norm: float = 1.0
    """Clip each SAE's gradient norm to this; 0 turns clipping off."""
    lr_scheduler_name: str = "constant"
    """constant, cosineannealing or cosineannealingwarmrestarts (between warm-up and decay)."""
    lr_warm_up_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    lr_decay_steps: int = 0
    """Final steps of linear decay to lr_end_fraction x lr."""
    lr_end_fraction: float = 0.0
    """Learning rate at the end of cosine/decay phases, as a fraction of lr."""
    n_restart_cycles: int = 1
    """Cycles of cosineannealingwarmrestarts."""
    l1_warm_up_steps: int = 0
    """Steps of linear warm-up of the sparsity coefficient (L1 or L0)."""
    b_dec_init_method: str = "geometric_median"
    """Decoder-bias initialization: geometric_median, mean or zeros."""
    normalize_activations: str = "expected_average_only_in"
    """expected_average_only_in scales inputs to norm sqrt(d_in) (folded at save) or none."""
    dead_feature_window: int = 100_000
    """A feature that has not fired for this many tokens counts as dead."""
    resample_every_tokens: int = 0
    """Resample dead features every this many tokens (0: never)."""
    seed: int = 42
    """Seed for SAE initialization, buffer shuffles and sampling."""
    autocast: bool = False
    """bf16 autocast for the SAE forward/backward (GPU)."""
    compile_sae: bool = False
    """torch.compile the SAE training step."""
    log_every_steps: int = 10
    """Read metrics to the host, log and check for NaN every this many steps."""
    sweep: str = ""
    """Several SAEs from one stream: "k=16,32,64" or "l1_coefficient=1,3;expansion_factor=4,8"."""

    def __post_init__(self) -> None:
        for name in ("training_tokens", "log_every_steps"):
            require(getattr(self, name) > 0, name, getattr(self, name), "use a positive number")
        for name in (
            "lr",
            "max_grad_norm",
            "lr_warm_up_steps",
            "lr_decay_steps",
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
        require(
            self.b_dec_init_method in B_DEC_INITS,
            "b_dec_init_method",
            self.b_dec_init_method,
            f"use one of {B_DEC_INITS}",
        )
        require(
            self.normalize_activations in NORMALIZATIONS,
            "normalize_activations",
            self.normalize_activations,
            f"use one of {NORMALIZATIONS}",
        )
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
    """Data parallelism under torchrun: how the data is split and how long ranks may wait."""

    data_shards: int = 0
    """Disjoint data streams per step, a multiple of the process count (0: one per process)."""
    distributed_timeout_minutes: float = 10.0
    """A collective that waits longer than this (dead or hung rank) stops the job."""

    def __post_init__(self) -> None:
        require(self.data_shards >= 0, "data_shards", self.data_shards, "use >= 0")
        require(
            self.distributed_timeout_minutes > 0,
            "distributed_timeout_minutes",
            self.distributed_timeout_minutes,
            "use a positive number of minutes",
        )


@dataclass
class RunConfig(Serializable):
    """Everything one ``drrik train`` run needs; saved as ``config.yaml`` in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    out: str = ""
    """Run directory; empty picks runs/<model>-<architecture>-<date-time>."""

    def __post_init__(self) -> None:
        require(
            self.trainer.training_tokens >= self.store.train_batch_size_tokens,
            "training_tokens",
            self.trainer.training_tokens,
            f"the budget is smaller than one batch ({self.store.train_batch_size_tokens} tokens); "
            "raise training_tokens or lower train_batch_size_tokens",
        )
        self.store.check_fits(self.data.context_size)
        for setting in parse_sweep(self.trainer.sweep):
            self.sae_configs_for(setting)  # each swept SAE config must validate too
        # Training keeps no fp32 master weights and no loss scaler: fp16 gradients underflow
        # and Adam's eps (1e-8) rounds to 0 in fp16, so the first tiny second moment gives NaN.
        require(
            self.sae.dtype != "float16",
            "dtype",
            self.sae.dtype,
            "SAE parameters cannot train in float16; use float32 (add --autocast for bf16 "
            "compute) or bfloat16",
        )

    def dictionaries(self) -> list[DictionarySpec]:
        """Every dictionary this run trains: each hook times each sweep setting, in order."""
        hooks = self.model.hook_names
        return [
            DictionarySpec(
                slot_name(hook, setting, len(hooks) > 1),
                (hook,),
                (hook,),
                self.sae_configs_for(setting),
            )
            for hook in hooks
            for setting in parse_sweep(self.trainer.sweep)
        ]

    def sae_configs_for(self, setting: dict[str, str]) -> SAEConfig:
        """The SAE config with one sweep setting applied (and validated)."""
        values = self.sae.to_dict()
        for name, raw in setting.items():
            current = getattr(self.sae, name)
            number = "a number" if name == "l1_coefficient" else "a whole number"
            with reading("sweep", f"{name}={raw}", f"give {number}", problem="not " + number):
                values[name] = (
                    raw
                    if name == "architecture"
                    else (
                        float(raw)
                        if isinstance(current, float) or name == "l1_coefficient"
                        else int(raw)
                    )
                )
        if "d_sae" in setting:
            values["expansion_factor"] = None
        if "expansion_factor" in setting:
            values["d_sae"] = None
        return SAEConfig(**values)


def _field_value(name: str, value: Any, hint: Any, path: Path) -> Any:
    """``value`` from YAML as the field's type, or a ConfigError naming the field.

    YAML types do not always match the fields' (``1.5e6`` is a string, ``8.5`` a float for an
    int field); left to the dataclass converters they fail with a traceback or truncate.
    """
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        require(type(None) in options, name, value, f"give a value in {path} (null is not allowed)")
        return None
    kind = next(t for t in options if t is not type(None))
    number = isinstance(value, int | float) and not isinstance(value, bool)
    converted: Any = None
    if kind is bool:
        converted = value if isinstance(value, bool) else None
    elif kind is str:
        converted = str(value) if isinstance(value, str) or number else None
    elif kind in (int, float) and (number or isinstance(value, str)):
        with contextlib.suppress(ValueError):
            as_float = float(value)
            if kind is float:
                converted = as_float
            elif as_float.is_integer():
                converted = int(as_float)
    expected = {bool: "true or false", str: "a string", int: "a whole number", float: "a number"}
    require(converted is not None, name, value, f"expected {expected[kind]} in {path}")
    return converted


def _field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their types (its ClassVars left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def load_config_file(path: str | Path, device: str | None = None) -> RunConfig:
    """A RunConfig from YAML with the same nested sections as a run's config.yaml.

    ``device`` replaces the file's ``model.device`` before the config is checked, so a run
    saved on a GPU machine resumes elsewhere with ``--device cpu``.
    """
    path = Path(path)
    require(path.is_file(), "config", str(path), "no such file; check the path")
    tree = read_yaml(path, "fix the file or pass the values as flags") or {}
    require(isinstance(tree, dict), "config", str(path), "the YAML must be a mapping of sections")
    top = _field_types(RunConfig)
    for section, values in tree.items():
        require(section in top, "config", section, f"unknown section in {path}; use {sorted(top)}")
        if not is_dataclass(top[section]):
            tree[section] = _field_value(section, values, top[section], path)
            continue
        values = {} if values is None else values
        require(
            isinstance(values, dict), section, values, f"expected a mapping of fields in {path}"
        )
        hints = _field_types(top[section])
        for name, value in values.items():
            close = difflib.get_close_matches(str(name), hints, n=1)
            hint = f"did you mean {section}.{close[0]}?" if close else f"use {sorted(hints)}"
            require(name in hints, f"{section}.{name}", value, f"no such field in {path}; {hint}")
            values[name] = _field_value(f"{section}.{name}", value, hints[name], path)
        tree[section] = values
    if device is not None:
        tree.setdefault("model", {})["device"] = device
    with reading("config", str(path), "fix the file or pass the values as flags"):
        return RunConfig.from_dict(tree, drop_extra_fields=False)
