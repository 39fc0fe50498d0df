"""Save and load SAEs in SAELens's directory layout, atomically and without pickle.

A saved SAE is a directory:

- ``cfg.json``: the keys SAELens 6.x's ``SAE.load_from_disk`` reads (``architecture``,
  ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
  ``normalize_activations``, ``reshape_activations``, ``metadata``, plus ``k`` for topk),
  and a ``drrik`` block with the full :class:`SAEConfig` so drrik reloads the exact class.
- ``sae_weights.safetensors``: the architecture's tensors under SAELens's names.
- A TopK transcoder is written for SAELens as a JumpReLU transcoder (SAELens has no TopK
  transcoder class): ``save_sae(..., threshold=θ)`` names the JumpReLU architecture in
  ``cfg.json`` and adds the ``threshold`` tensor, while the ``drrik`` block keeps the TopK
  config, so drrik reloads the TopK exactly (it reads only the TopK's tensors).
- ``sparsity.safetensors`` (optional): key ``sparsity``, log10 feature density.

``metadata.sae_lens_version`` is "6.0.0": it names the *layout* this directory follows, which
tells SAELens not to run its pre-6.0 config conversion. Input scaling must be folded in
(:meth:`SAE.fold_activation_scale`) before saving: ``normalize_activations`` is "none".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from drrik.errors import read_json, reading, require
from drrik.run_dir import atomic_write
from drrik.sae.config import SAEConfig
from drrik.sae.registry import sae_class

if TYPE_CHECKING:  # the SAE's methods call this module; it only calls theirs
    from drrik.sae.base import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SAELENS_LAYOUT_VERSION = "6.0.0"
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_TRANSCODERS = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}
"""SAELens's transcoder classes by (SAE architecture, skip connection)."""


def saelens_architecture(sae: SAE, metadata: dict[str, Any], jumprelu: bool = False) -> str:
    """SAELens's name for ``sae``'s class: a transcoder's when it writes another hook
    (``metadata`` names ``hook_name_out``) or has a skip connection; ``jumprelu`` names the
    JumpReLU form it is saved in with a threshold."""
    if sae.cfg.dictionary == "clt":  # no SAELens class loads it; the name only says what it is
        return f"clt_{'jumprelu' if jumprelu else sae.cfg.architecture}"
    transcoder = "hook_name_out" in metadata or sae.W_skip is not None
    key = ("jumprelu" if jumprelu else sae.saelens_architecture, sae.W_skip is not None)
    return _TRANSCODERS.get(key, sae.saelens_architecture) if transcoder else key[0]


def saelens_cfg(
    sae: SAE, metadata: dict[str, Any] | None = None, jumprelu: bool = False
) -> dict[str, Any]:
    """The ``cfg.json`` content for ``sae``; ``metadata`` adds hook_name, model_name, ...;
    ``jumprelu`` describes the JumpReLU form (without the TopK's ``k``)."""
    metadata = metadata or {}
    return {
        "architecture": saelens_architecture(sae, metadata, jumprelu),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_out": sae.d_out,
        "dtype": sae.cfg.dtype,
        "device": str(sae.b_dec.device),
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({} if jumprelu else sae.saelens_cfg_extras()),
        "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, **metadata},
        "drrik": {"config": sae.cfg.to_dict()},
    }


def _write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def save_sae(
    sae: SAE,
    directory: str | Path,
    sparsity: Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    threshold: Tensor | None = None,
) -> Path:
    """Write ``sae`` to ``directory`` so that a crash never leaves a half-written SAE there:
    with :func:`drrik.run_dir.atomic_write`, an existing SAE stays intact until the new one is
    complete and on disk. ``threshold`` (``[d_sae]``) saves it for SAELens as a JumpReLU."""
    target = Path(directory).resolve()
    tensors = sae.saelens_tensors()
    if threshold is not None:
        tensors["threshold"] = threshold.to(tensors["b_enc"]).expand(sae.d_sae)
    cfg_json = saelens_cfg(sae, metadata, jumprelu=threshold is not None)
    with atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
        _write_tensors(tmp / WEIGHTS_FILENAME, tensors)
        if sparsity is not None:
            _write_tensors(tmp / SPARSITY_FILENAME, {"sparsity": sparsity})
    return target


def _config_from_saelens(cfg_json: dict[str, Any]) -> SAEConfig:
    """A drrik config for a directory SAELens wrote (no ``drrik`` block)."""
    arch = cfg_json.get("architecture", "standard")
    transcoders = {name: key for key, name in _TRANSCODERS.items()}
    base, skip = transcoders.get(arch, (arch, False))
    require(
        base in _FROM_SAELENS,
        "architecture",
        arch,
        f"drrik loads SAELens architectures {', '.join([*_FROM_SAELENS, *transcoders])}",
    )
    return SAEConfig(
        architecture=_FROM_SAELENS[base],
        d_in=int(cfg_json["d_in"]),
        d_out=int(cfg_json.get("d_out") or 0),
        skip_connection=skip,
        d_sae=int(cfg_json["d_sae"]),
        k=cfg_json.get("k"),
        apply_b_dec_to_input=bool(cfg_json.get("apply_b_dec_to_input", True)),
        normalize_decoder=not cfg_json.get("rescale_acts_by_decoder_norm", False),
        dtype=str(cfg_json.get("dtype", "float32")).removeprefix("torch."),
    )


SAVED_SAE_FIX = "save the SAE again (drrik train) or copy an undamaged one"


def read_sae_cfg(directory: str | Path) -> dict[str, Any]:
    """A saved SAE's ``cfg.json``, checked to be an object with a ``metadata`` object."""
    path = Path(directory) / CFG_FILENAME
    cfg_json = read_json(path, SAVED_SAE_FIX)
    metadata = cfg_json.setdefault("metadata", {})
    require(
        isinstance(metadata, dict), "file", str(path), f"its metadata is no object; {SAVED_SAE_FIX}"
    )
    return cfg_json


def load_sae(directory: str | Path, device: torch.device | str | None = None) -> SAE:
    """Load a directory written by :func:`save_sae` (or a SAELens standard/topk/jumprelu/gated
    SAE) as the matching drrik class, in eval mode. Weights are read with safetensors only.

    A damaged or truncated file ends in a one-line :class:`ConfigError` naming it.
    """
    path = Path(directory)
    require((path / CFG_FILENAME).is_file(), "directory", str(path), "expected a saved SAE dir")
    cfg_json = read_sae_cfg(path)
    with reading("file", str(path / CFG_FILENAME), SAVED_SAE_FIX, "not a valid SAE config"):
        drrik_block = cfg_json.get("drrik")
        if drrik_block is not None:
            cfg = SAEConfig.from_dict(drrik_block["config"])
        else:
            cfg = _config_from_saelens(cfg_json)
    sae = sae_class(cfg)(cfg, device=device)
    weights = path / WEIGHTS_FILENAME
    require(weights.is_file(), "file", str(weights), f"missing; {SAVED_SAE_FIX}")
    with reading("file", str(weights), SAVED_SAE_FIX):
        tensors = load_file(str(weights), device=str(sae.b_dec.device))
    for name in sae.saelens_weight_names():  # copy_ would broadcast a wrong shape
        shape, own = tuple(tensors[name].shape) if name in tensors else None, getattr(sae, name)
        require(
            shape in (None, tuple(own.shape)),
            "file",
            str(weights),
            f"{name} has shape {shape} where {CFG_FILENAME} implies {tuple(own.shape)}; "
            + SAVED_SAE_FIX,
        )
    with reading("file", str(weights), SAVED_SAE_FIX, f"its tensors do not fit {CFG_FILENAME}"):
        sae.load_saelens_tensors(tensors)
    return sae.eval()


def load_sparsity(directory: str | Path) -> Tensor | None:
    """The saved log10 feature densities, or ``None`` when the directory has none."""
    path = Path(directory) / SPARSITY_FILENAME
    if not path.is_file():
        return None
    with reading("file", str(path), SAVED_SAE_FIX):
        return load_file(str(path))["sparsity"]
