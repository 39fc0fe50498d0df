"""Configuration of a training run: model, data, activations store and SAE, gathered with the
training loop's sections (:mod:`drrik.training_config`) into ``RunConfig``.

Sparsify-style dataclasses: every field is typed, has a default and a one-line docstring
(simple-parsing turns it into ``--help``), and is validated at construction so that bad input
fails in one line before any model or dataset is loaded. Choices are ``Literal`` types, so
``--help`` lists them. Field names are unique across all config classes because the CLI
exposes them as flat flags (``--hook``, ``--context-size``). This module imports no runtime
module (only config modules and the errors), so a config loads without the training code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from simple_parsing.helpers import Serializable

from drrik.errors import check_device, reading, require
from drrik.options import (
    check_choices,
    field_types,
    field_value,
    read_options_tree,
    split_legacy,
)
from drrik.sae.config import SAEConfig
from drrik.sae.registry import ARCHITECTURES
from drrik.sae.spec import DictionarySpec
from drrik.training_config import (
    CheckpointConfig,
    DistributedConfig,
    EvalConfig,
    TrainerConfig,
    WandbConfig,
    parse_sweep,
    slot_name,
)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HOOK = "blocks.12.hook_resid_post"
Dtype = Literal["float32", "bfloat16", "float16"]
_HOOK_PATTERN = re.compile(r"^[A-Za-z_][\w.]*$")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
LAYER = "{layer}"
"""The placeholder a hook template holds, filled with each of --layers."""


def hook_layer(hook: str) -> int | None:
    """The block index of a ``blocks.N.*`` hook, or None for hooks outside the blocks."""
    match = _BLOCK_HOOK.match(hook)
    return int(match.group(1)) if match else None


RESIDUAL_WIDTH_HOOKS = (
    "hook_embed",
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_in",
    "mlp.hook_out",
    "ln1.hook_normalized",
    "ln2.hook_normalized",
)
"""Hook names (their last parts) whose width is the residual stream's, d_model."""


def width_class(hook: str) -> str:
    """A name shared by hooks of one width: ``d_model`` for the residual-width hooks, else the
    hook's name within its block (``mlp.hook_post`` is d_mlp wide at every layer)."""
    local = _BLOCK_HOOK.sub("", hook)
    return "d_model" if local in RESIDUAL_WIDTH_HOOKS else local


def check_joint_hooks(
    kind: str, reads: tuple[str, ...], writes: tuple[str, ...], model: ModelConfig
) -> None:
    """Before the model loads: a crosscoder reads two or more hooks of one width and
    reconstructs them; a CLT maps each of --layers, increasing, from its --hook to its
    --target-hook."""
    if kind == "crosscoder":
        require(len(reads) >= 2, "hook", list(reads), "a crosscoder reads two or more hooks")
        require(
            reads == writes,
            "target_hook",
            model.target_hook,
            "a crosscoder reconstructs the hooks it reads; drop --target-hook",
        )
        classes = {width_class(h) for h in reads}
        require(
            len(classes) == 1,
            "hook",
            list(reads),
            "a crosscoder's hooks must share one width and drrik states no projection between "
            "widths; read one kind of hook (e.g. blocks.{layer}.hook_resid_post) at several layers",
        )
        return
    layers = [hook_layer(h) for h in reads]
    require(
        bool(model.layers) and len(model.hook) == 1 and len(model.target_hook) == 1,
        "target_hook",
        model.target_hook,
        "a CLT needs one --hook and one --target-hook template with --layers, e.g. --hook "
        "blocks.{layer}.mlp.hook_in --target-hook blocks.{layer}.hook_mlp_out --layers all",
    )
    require(
        all(n is not None and hook_layer(w) == n for n, w in zip(layers, writes, strict=True)),
        "target_hook",
        model.target_hook,
        "a CLT's --hook and --target-hook are blocks.{layer} hooks of the same layer",
    )
    require(
        all(a < b for a, b in zip(layers, layers[1:], strict=False)),
        "layers",
        model.layers,
        "a CLT's layers must be increasing (e.g. --layers 0 1 2, or all)",
    )


FEATURE_PARALLEL_REFUSED = {"gated", "matryoshka_batchtopk"}
"""Architectures whose features cannot be split over ranks yet: gated's two encoders and the
Matryoshka prefixes' per-prefix losses would need collectives of their own."""


def check_feature_slices(sae: SAEConfig, degree: int) -> None:
    """What splitting one dictionary's features over ``degree`` ranks (``--feature-parallel``)
    needs; the widths are checked once known (``d_sae`` set, or the hook width)."""
    if degree == 1:
        return
    refused = (
        "a CLT"
        if sae.dictionary == "clt"
        else "ghost grads"
        if sae.use_ghost_grads
        else sae.architecture
        if sae.architecture in FEATURE_PARALLEL_REFUSED
        else ""
    )
    require(
        not refused,
        "feature_parallel",
        degree,
        f"{refused} trains with all its features on each rank; use relu, topk, batchtopk or "
        "jumprelu (SAEs, transcoders, crosscoders) to split features, or --feature-parallel 1",
    )
    if sae.d_sae is None and sae.d_in <= 0:
        return
    d_sae = sae.resolved_d_sae()
    require(
        d_sae % degree == 0,
        "feature_parallel",
        degree,
        f"must divide the dictionary's width d_sae={d_sae} so every rank holds as many "
        "features; pick a divisor of d_sae (or a d_sae it divides)",
    )
    per_rank = d_sae // degree
    if ARCHITECTURES[sae.architecture].needs_k:
        k = sae.resolved_k()
        require(
            k <= per_rank,
            "feature_parallel",
            degree,
            f"each rank ranks its own top k={k} candidates, so k must be at most d_sae / "
            f"feature_parallel = {per_rank}; lower --feature-parallel or k",
        )
        if sae.d_in > 0:
            aux_k = sae.resolved_aux_k()
            require(
                aux_k <= per_rank,
                "aux_k",
                aux_k,
                f"must be at most d_sae / feature_parallel = {per_rank} (each rank ranks its own "
                "AuxK candidates); set --aux-k lower",
            )


@dataclass
class ModelConfig(Serializable):
    """Which language model to hook, where and at what precision."""

    model: str = DEFAULT_MODEL
    """Hub name (gpt2, EleutherAI/pythia-70m), local HF directory, .gguf file, or smollm2-135m."""
    hook: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    """TransformerLens hook names; several hooks share one forward pass (--hook a b). With
    --layers, templates holding {layer}, e.g. blocks.{layer}.mlp.hook_in."""
    target_hook: list[str] = field(default_factory=list)
    """Hooks reconstructed, one per --hook in order (transcoders); empty = each --hook
    (SAEs). For an MLP transcoder: --hook blocks.N.mlp.hook_in --target-hook
    blocks.N.hook_mlp_out."""
    layers: list[str] = field(default_factory=list)
    """Fill every {layer} template with each of these layers (numbers, or all)."""
    device: str = "cpu"
    """Device of the model and the SAE: cpu, cuda, cuda:1, mps."""
    model_dtype: Literal["auto", Dtype] = "auto"
    """LM precision; auto is bfloat16 where the hardware has it."""
    model_n_devices: int = 1
    """Spread the model's layers over this many GPUs (for models too big for one)."""

    def __post_init__(self) -> None:
        if isinstance(self.hook, str):  # the Python API's and old config.yaml's one string
            self.hook = [self.hook]
        self.hook = split_legacy(self.hook, ",", "--hook")
        check_choices(self)
        require(bool(self.model.strip()), "model", self.model, "name a model, e.g. smollm2-135m")
        require(bool(self.hook), "hook", self.hook, "name at least one hook")
        for flag, names in (("hook", self.hook), ("target_hook", self.target_hook)):
            for name in names:
                require(
                    bool(_HOOK_PATTERN.match(name.replace(LAYER, "0"))),
                    flag,
                    name,
                    "use TransformerLens hook names, e.g. blocks.6.hook_resid_post",
                )
                require(
                    LAYER not in name or bool(self.layers),
                    flag,
                    name,
                    "a {layer} template needs --layers (numbers, or all)",
                )
        require(len(set(self.hook)) == len(self.hook), "hook", self.hook, "list each hook once")
        require(
            len(self.target_hook) in (0, len(self.hook)),
            "target_hook",
            self.target_hook,
            f"give one target per --hook ({len(self.hook)}), in the same order",
        )
        require(
            self.layers == ["all"] or all(n.isdigit() for n in self.layers),
            "layers",
            self.layers,
            "use layer numbers (--layers 0 1 2) or --layers all",
        )
        for name in self.hook if self.layers else []:
            require(LAYER in name, "hook", name, "with --layers, every --hook holds {layer}")
        require(self.model_n_devices >= 1, "model_n_devices", self.model_n_devices, "use >= 1")
        check_device(self.device)

    @property
    def hook_names(self) -> list[str]:
        """The hooks, in the order given."""
        return list(self.hook)

    def hook_pairs(self, n_layers: int) -> list[tuple[str, str]]:
        """(input hook, target hook) of every dictionary, templates filled with each layer
        (``n_layers`` is the model's, for --layers all)."""
        pairs = list(zip(self.hook, self.target_hook or self.hook, strict=True))
        if self.layers:
            layers = range(n_layers) if self.layers == ["all"] else map(int, self.layers)
            pairs = [
                (h.replace(LAYER, str(n)), t.replace(LAYER, str(n)))
                for n in layers
                for h, t in pairs
            ]
        for reads, writes in pairs:
            start, end = hook_layer(reads), hook_layer(writes)
            require(
                start is None or end is None or end >= start,
                "target_hook",
                writes,
                f"it comes before its input {reads}; a dictionary reconstructs a later hook",
            )
        return pairs


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
    document_separator: Literal["bos", "eos", "none"] = "bos"
    """Token placed between concatenated documents."""
    exclude_special_tokens: bool = True
    """Drop activations at BOS, EOS and pad positions from training batches."""

    def __post_init__(self) -> None:
        check_choices(self)
        require(self.context_size >= 2, "context_size", self.context_size, "use at least 2 tokens")
        require(self.holdout_every >= 2, "holdout_every", self.holdout_every, "use 2 or more")


@dataclass
class StoreConfig(Serializable):
    """The activations store: how many activations are mixed and served per step."""

    train_batch_size_tokens: int = 1024
    """Activations per training step served by each data shard (one shard per process by
    default, so the global batch is this x the number of processes). Small, because a short
    run needs steps more than large batches (benchmarks/results/default_sae-*); long GPU runs
    usually take 4096."""
    n_batches_in_buffer: int = 16
    """Buffer size in model batches (tokens = this x store_batch_size_prompts x context_size)."""
    store_batch_size_prompts: int = 16
    """Contexts per language-model forward pass."""
    mix_fraction: float = 0.5
    """Fraction of the shuffled buffer kept back and mixed with the next refill."""
    act_store_device: str = "sae"
    """Where the buffer lives: sae (training device), model, cpu, or an explicit device."""
    buffer_dtype: Literal["model", Dtype] = "model"
    """Buffer precision: model (the model's dtype) or a dtype of its own."""
    prefetch_batches: int = 4
    """Tokenized model batches prepared ahead by the background producer thread."""

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("train_batch_size_tokens", "n_batches_in_buffer", "store_batch_size_prompts"):
            value = getattr(self, name)
            require(value > 0, name, value, "use a positive number")
        require(
            0.0 <= self.mix_fraction < 1.0,
            "mix_fraction",
            self.mix_fraction,
            "use a fraction in [0, 1)",
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
        for spec in self.dictionaries():  # each swept config and each hook pair must validate
            check_feature_slices(spec.sae, self.distributed.feature_parallel)
        require(
            self.sae.dictionary != "clt" or self.trainer.resample_every_tokens == 0,
            "resample_every_tokens",
            self.trainer.resample_every_tokens,
            "a CLT's dead features are revived by AuxK (topk/batchtopk), not resampled; use 0",
        )
        # Training keeps no fp32 master weights and no loss scaler: fp16 gradients underflow
        # and Adam's eps (1e-8) rounds to 0 in fp16, so the first tiny second moment gives NaN.
        require(
            self.sae.dtype != "float16",
            "dtype",
            self.sae.dtype,
            "SAE parameters cannot train in float16; use float32 (with --autocast true for bf16 "
            "compute) or bfloat16",
        )

    def dictionaries(self, n_layers: int = 1) -> list[DictionarySpec]:
        """Every dictionary this run trains, in order, each hook group times each sweep
        setting; ``n_layers`` (the model's) fills --layers all.

        A hook group is one (input, target) pair for ``dictionary=sae`` (an SAE or a
        transcoder), every hook at once for a crosscoder, and every layer's pair for a CLT.
        A transcoder never subtracts ``b_dec`` from its input: ``b_dec`` is the bias of
        another hook's output (SAELens refuses ``apply_b_dec_to_input`` for transcoders).
        """
        pairs = self.model.hook_pairs(n_layers)
        kind = self.sae.dictionary
        if kind == "sae":
            groups = [((reads,), (writes,)) for reads, writes in pairs]
        else:
            reads, writes = (tuple(hooks) for hooks in zip(*pairs, strict=True))
            check_joint_hooks(kind, reads, writes, self.model)
            groups = [(reads, writes)]
        return [
            DictionarySpec(
                slot_name(kind if kind != "sae" else reads[0], setting, len(groups) > 1),
                reads,
                writes,
                self.dictionary_config(setting, transcoder=reads != writes),
                slot_name("", setting, several_hooks=False) if setting else "",
            )
            for reads, writes in groups
            for setting in parse_sweep(self.trainer.sweep)
        ]

    def dictionary_config(self, setting: dict[str, str], transcoder: bool) -> SAEConfig:
        """One dictionary's config: the sweep setting applied, a transcoder's input kept."""
        sae = self.sae_configs_for(setting)
        require(
            transcoder or not sae.skip_connection,
            "skip_connection",
            True,
            "a skip connection is for transcoders; name their outputs with --target-hook",
        )
        if not transcoder:
            # A free-row TopK ranks features by activation x decoder norm; folding a
            # crosscoder's per-hook scales into its decoder would change those norms.
            require(
                sae.dictionary != "crosscoder"
                or not ARCHITECTURES[sae.architecture].needs_k
                or sae.normalize_decoder is not False,
                "normalize_decoder",
                False,
                f"a {sae.architecture} crosscoder keeps unit decoder rows; drop the flag",
            )
            return sae
        # A TopK transcoder's decoder rows start small and stay free unless the config says
        # otherwise: unit rows with the tied start first write a projection of the input as
        # large as the target, and at the same tokens end with more error (held-out FVU at
        # layers 6 and 20 of SmolLM2: 0.65 -> 0.57 and 0.63 -> 0.54; benchmarks/README.md).
        free = sae.normalize_decoder is None and ARCHITECTURES[sae.architecture].needs_k
        return replace(
            sae,
            apply_b_dec_to_input=False,
            normalize_decoder=False if free else sae.normalize_decoder,
        )

    def sae_configs_for(self, setting: dict[str, str]) -> SAEConfig:
        """The SAE config with one sweep setting applied, each value typed like its field."""
        values = self.sae.to_dict()
        hints = field_types(SAEConfig)
        for name, raw in setting.items():
            values[name] = field_value(name, raw, hints[name], f"--sweep {name}={raw}")
        if "d_sae" in setting:
            values["expansion_factor"] = None
        if "expansion_factor" in setting:
            values["d_sae"] = None
        return SAEConfig(**values)


def load_config_file(path: str | Path, device: str | None = None) -> RunConfig:
    """A RunConfig from YAML with the same nested sections as a run's config.yaml.

    ``device`` replaces the file's ``model.device`` before the config is checked, so a run
    saved on a GPU machine resumes elsewhere with ``--device cpu``.
    """
    tree = read_options_tree(path, RunConfig)
    if device is not None:
        tree.setdefault("model", {})["device"] = device
    with reading("config", str(path), "fix the file or pass the values as flags"):
        return RunConfig.from_dict(tree, drop_extra_fields=False)
