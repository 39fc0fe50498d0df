"""Configuration of the streaming pipeline: model, data and activations store.

Sparsify-style dataclasses: every field is typed, has a default and a one-line docstring
(simple-parsing turns it into ``--help``), and is validated at construction so that bad input
fails in one line before any model or dataset is loaded. Field names are unique across all
config classes because the CLI exposes them as flat flags (``--hook``, ``--context-size``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from simple_parsing.helpers import Serializable

from drrik.errors import require

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
    model_dtype: str = "float32"
    """Precision of the language model: float32, bfloat16 or float16."""

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
        require(self.model_dtype in DTYPES, "model_dtype", self.model_dtype, f"use one of {DTYPES}")

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
    data_seed: int | None = None
    """Shuffle seed for map-style datasets' document order; None keeps the file order."""

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
    """Activations per training batch."""
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
