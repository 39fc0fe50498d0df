"""Export saved transcoders as a circuit-tracer transcoder set (one transcoder per layer), or a
saved cross-layer transcoder in circuit-tracer's CLT layout (:func:`export_clt`).

drrik saves a transcoder in SAELens's layout (``cfg.json`` + ``sae_weights.safetensors``,
``W_enc`` ``[d_in, d_sae]``). circuit-tracer reads a directory with a ``config.yaml`` and one
``layer_{i}.safetensors`` for *every* layer of the model, ``W_enc`` transposed to
``[d_sae, d_model]`` and the JumpReLU threshold named ``activation_function.threshold``.
Layers without a trained transcoder get an all-zero one (it outputs nothing, so the model's
own MLP output is fully in the graph's error term there), and every layer gets every tensor
any layer has (a zero threshold where a layer was ReLU, a zero ``W_skip`` where it had none:
both exact), since circuit-tracer takes the skip setting from layer 0 for the whole set.
``drrik_export.json`` records which layers were trained, and from which directory.

circuit-tracer's JumpReLU is ``pre * (pre > θ)``; drrik's and SAELens's is
``relu(pre) * (pre > θ)``. They agree when θ ≥ 0. A negative θ is written as 0, which keeps
the export exact: for θ < 0 drrik's activation is ``relu(pre)``, which is ``pre * (pre > 0)``.
So the exported set computes the same function as the saved transcoders; only the float
rounding of the transposed matmul differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from drrik.errors import read_json, reading, require
from drrik.run_dir import FINAL_DIR, atomic_write, locate_saved_sae
from drrik.sae.clt import CrossLayerTranscoder
from drrik.sae.saving import (
    CFG_FILENAME,
    SAVED_SAE_FIX,
    WEIGHTS_FILENAME,
    load_sae,
    read_sae_cfg,
)

TRANSCODER_ARCHITECTURES = (
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
)
CT_CONFIG_FILE = "config.yaml"
BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")
LAYER_FILE = "layer_{}.safetensors"
CLT_ENCODER_FILE = "W_enc_{}.safetensors"
CLT_DECODER_FILE = "W_dec_{}.safetensors"
EXPORT_RECORD_FILE = "drrik_export.json"


@dataclass(frozen=True)
class SavedTranscoder:
    """One saved transcoder: its layer, hooks relative to that block, and tensors."""

    path: Path
    layer: int
    input_hook: str
    output_hook: str
    model_name: str
    tensors: dict[str, Tensor]

    @property
    def width(self) -> int:
        return self.tensors["W_enc"].shape[1]

    @property
    def d_model(self) -> int:
        return self.tensors["W_enc"].shape[0]


def _block_hook(name: object, field: str, path: Path) -> tuple[int, str]:
    """``blocks.3.mlp.hook_in`` as (3, ``mlp.hook_in``)."""
    match = BLOCK_HOOK.fullmatch(str(name))
    require(
        match is not None,
        field,
        name,
        f"circuit-tracer needs a hook inside a block (blocks.N.<hook>), in {path}",
    )
    assert match is not None  # for the type checker; require raised otherwise
    return int(match[1]), match[2]


def read_transcoder(path: Path) -> SavedTranscoder:
    """A saved transcoder directory, checked to be a transcoder with a per-block hook pair."""
    cfg = read_sae_cfg(path)
    arch = cfg.get("architecture")
    require(
        arch in TRANSCODER_ARCHITECTURES,
        "architecture",
        arch,
        f"{path} is no transcoder; circuit-tracer loads {', '.join(TRANSCODER_ARCHITECTURES)}",
    )
    for key, plain in (("apply_b_dec_to_input", False), ("normalize_activations", "none")):
        require(
            cfg.get(key, plain) == plain,
            key,
            cfg.get(key),
            f"circuit-tracer's transcoders read raw activations: save with {key}={plain!r}, "
            f"in {path}",
        )
    meta = cfg["metadata"]
    layer, input_hook = _block_hook(meta.get("hook_name"), "hook_name", path)
    out_layer, output_hook = _block_hook(meta.get("hook_name_out"), "hook_name_out", path)
    require(
        out_layer == layer,
        "hook_name_out",
        meta.get("hook_name_out"),
        f"a per-layer transcoder writes in the block it reads (layer {layer}), in {path}",
    )
    weights = path / WEIGHTS_FILENAME
    with reading("file", str(weights), SAVED_SAE_FIX):
        tensors = load_file(str(weights))
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors)
    require(not missing, "file", str(weights), f"missing {sorted(missing)}; {SAVED_SAE_FIX}")
    d_model, d_out = tensors["W_enc"].shape[0], tensors["W_dec"].shape[1]
    require(
        d_out == d_model,
        "d_out",
        d_out,
        f"circuit-tracer's transcoders read and write d_model; d_in is {d_model} in {path}",
    )
    return SavedTranscoder(
        path, layer, input_hook, output_hook, str(meta.get("model_name", "")), tensors
    )


def saved_transcoder_dirs(run_dir: Path) -> list[Path]:
    """The transcoders a run saved (``final/`` or ``final/<name>/``; SAEs trained beside them
    are left out), or ``run_dir`` itself when it is one saved directory."""
    final = run_dir if run_dir.name == FINAL_DIR else run_dir / FINAL_DIR
    names = sorted(p.name for p in final.glob("*") if (p / CFG_FILENAME).is_file())
    if not names:  # one dictionary: read_transcoder says what is wrong if it is no transcoder
        return [locate_saved_sae(run_dir).sae_dir]
    found = [
        final / name
        for name in names
        if read_sae_cfg(final / name).get("architecture") in TRANSCODER_ARCHITECTURES
        or is_clt_dir(final / name)
    ]
    require(bool(found), "DIR", str(run_dir), f"it saved no transcoder (only {', '.join(names)})")
    return found


def _model_layers(model_name: str) -> int | None:
    """The layer count of a local Hugging Face model directory, else None."""
    config = Path(model_name) / "config.json"
    if not config.is_file():
        return None
    return read_json(config, "pass n_layers").get("num_hidden_layers")


def _resolve_layers(n_layers: int | None, model_name: str, top: int) -> int:
    """The model's layer count: ``n_layers``, else read from a local model directory; checked
    to cover ``top``, the last layer something reads."""
    n_layers = n_layers if n_layers is not None else _model_layers(model_name)
    require(
        n_layers is not None,
        "n_layers",
        n_layers,
        f"model {model_name!r} is no local directory; pass the model's layer count",
    )
    assert n_layers is not None  # for the type checker; require raised otherwise
    require(top < n_layers, "n_layers", n_layers, f"a transcoder reads layer {top}; use > {top}")
    return n_layers


def _check_set(transcoders: list[SavedTranscoder]) -> None:
    """One width, one hook pair, one model, one transcoder per layer: circuit-tracer's set."""
    first = transcoders[0]
    for tc in transcoders[1:]:
        where = f"{tc.path} and {first.path}"
        require(tc.width == first.width, "d_sae", tc.width, f"widths differ ({where})")
        require(tc.d_model == first.d_model, "d_in", tc.d_model, f"d_in differs ({where})")
        hooks, first_hooks = (tc.input_hook, tc.output_hook), (first.input_hook, first.output_hook)
        require(hooks == first_hooks, "hook_name", hooks, f"hook kinds differ ({where})")
        require(
            tc.model_name == first.model_name,
            "model_name",
            tc.model_name,
            f"models differ ({where})",
        )
    layers = [tc.layer for tc in transcoders]
    twice = sorted({layer for layer in layers if layers.count(layer) > 1})
    require(not twice, "layer", twice, "give one transcoder per layer")


def circuit_tracer_tensors(tc: SavedTranscoder) -> dict[str, Tensor]:
    """``tc``'s tensors under circuit-tracer's names and layout (negative thresholds at 0)."""
    t = tc.tensors
    out = {
        "W_enc": t["W_enc"].T.contiguous(),
        "b_enc": t["b_enc"],
        "W_dec": t["W_dec"],
        "b_dec": t["b_dec"],
    }
    if "threshold" in t:
        out["activation_function.threshold"] = t["threshold"].clamp_min(0)
    if "W_skip" in t:
        out["W_skip"] = t["W_skip"]
    return out


def zero_tensors(like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors of ``like``'s names, shapes and dtypes, all zero."""
    return {name: torch.zeros_like(tensor) for name, tensor in like.items()}


def export_transcoder_set(
    source: list[Path] | Path, out: Path, n_layers: int | None = None
) -> Path:
    """Write the transcoders in ``source`` (saved directories, or a run directory) to ``out``
    as a circuit-tracer transcoder set with one file per layer, ``n_layers`` in all (default:
    the layer count of the model when its ``model_name`` is a local Hugging Face directory).

    Returns ``out``, written atomically: a reader sees the old set or the whole new one.
    """
    dirs = [Path(p) for p in source] if isinstance(source, list) else saved_transcoder_dirs(source)
    require(bool(dirs), "source", source, "give at least one saved transcoder directory")
    clts = [d for d in dirs if is_clt_dir(d)]
    if clts:
        require(
            len(dirs) == 1,
            "source",
            [str(d) for d in dirs],
            f"{clts[0]} is a CLT, which circuit-tracer loads alone; export it by itself",
        )
        return export_clt(clts[0], out, n_layers)
    transcoders = [read_transcoder(d) for d in dirs]
    _check_set(transcoders)
    first = transcoders[0]
    n_layers = _resolve_layers(n_layers, first.model_name, max(tc.layer for tc in transcoders))
    by_layer = {tc.layer: circuit_tracer_tensors(tc) for tc in transcoders}
    # Every layer gets every tensor any layer has, zero where it had none: a zero threshold
    # is ReLU, a zero skip adds nothing, an all-zero layer outputs nothing.
    zeros = zero_tensors({k: v for tensors in by_layer.values() for k, v in tensors.items()})
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": first.input_hook,
        "feature_output_hook": first.output_hook,
        "model_name": first.model_name,
    }
    out = Path(out).resolve()
    with atomic_write(out) as tmp:
        tmp.mkdir()
        (tmp / CT_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        for layer in range(n_layers):
            tensors = {**zeros, **by_layer.get(layer, {})}
            save_file(tensors, str(tmp / LAYER_FILE.format(layer)))
        (tmp / EXPORT_RECORD_FILE).write_text(
            json.dumps({"layers": {tc.layer: str(tc.path) for tc in transcoders}}, indent=2)
        )
    return out


# ---- cross-layer transcoders ----------------------------------------------------------------


def is_clt_dir(path: Path) -> bool:
    """Whether a saved dictionary is a cross-layer transcoder."""
    return str(read_sae_cfg(path).get("architecture", "")).startswith("clt_")


def _clt_layers(path: Path, meta: dict[str, Any]) -> tuple[list[int], str, str]:
    """The model layers a saved CLT covers, in order, and its hooks relative to a block,
    from ``metadata.hook_names`` (inputs) and ``hook_names_out`` (outputs)."""
    ins, outs = meta.get("hook_names"), meta.get("hook_names_out")
    for name, hooks in (("hook_names", ins), ("hook_names_out", outs)):
        require(isinstance(hooks, list), name, hooks, f"a saved CLT lists its hooks, in {path}")
    assert isinstance(ins, list) and isinstance(outs, list)  # for the type checker
    require(len(ins) == len(outs), "hook_names_out", outs, f"one per input hook, in {path}")
    pairs = [
        (_block_hook(i, "hook_names", path), _block_hook(o, "hook_names_out", path))
        for i, o in zip(ins, outs, strict=True)
    ]
    layers = [i_layer for (i_layer, _), _ in pairs]
    for (i_layer, in_hook), (o_layer, out_hook) in pairs:
        require(
            o_layer == i_layer and (in_hook, out_hook) == (pairs[0][0][1], pairs[0][1][1]),
            "hook_names_out",
            outs,
            f"each CLT layer writes in the block it reads, with one hook pair, in {path}",
        )
    require(layers == sorted(set(layers)), "hook_names", ins, f"list layers in order, in {path}")
    return layers, pairs[0][0][1], pairs[0][1][1]


def export_clt(path: Path, out: Path, n_layers: int | None = None) -> Path:
    """Write the saved CLT in ``path`` to ``out`` in circuit-tracer's CLT layout, for a model
    of ``n_layers`` layers (default: read from ``model_name`` when it is a local directory).

    circuit-tracer's CLT covers layers 0..n_layers-1. Layers the CLT does not cover get
    all-zero encoders, biases and decoders (features that never fire, outputs of 0, as the
    transcoder-set export pads), so the exported CLT computes the saved one's outputs on the
    layers it covers. Activations are circuit-tracer's JumpReLU ``pre * (pre > θ)`` with the
    CLT's eval-mode thresholds (jumprelu: its own; batchtopk: its layer's threshold for each
    feature; relu: none). A TopK CLT has no threshold form: it is exported only when saved with
    one (``save_sae(..., threshold=θ)``, its JumpReLU approximation), and refused otherwise.
    Returns ``out``, written atomically.
    """
    cfg = read_sae_cfg(path)
    meta = cfg["metadata"]
    layers, input_hook, output_hook = _clt_layers(path, meta)
    model_name = str(meta.get("model_name", ""))
    n_layers = _resolve_layers(n_layers, model_name, layers[-1])
    clt = load_sae(path, device="cpu")
    assert isinstance(clt, CrossLayerTranscoder)  # is_clt_dir's cfg.json loads as one
    require(
        clt.n_layers == len(layers),
        "hook_names",
        meta["hook_names"],
        f"the CLT has {clt.n_layers} layers, in {path}",
    )
    if clt.cfg.architecture == "topk":
        with reading("file", str(path / WEIGHTS_FILENAME), SAVED_SAE_FIX):
            theta = load_file(str(path / WEIGHTS_FILENAME)).get("threshold")
        require(
            theta is not None,
            "architecture",
            "topk",
            "circuit-tracer runs ReLU or JumpReLU only; save the TopK CLT with a JumpReLU "
            f"threshold (save_sae(..., threshold=θ)) to export it, in {path}",
        )
    else:
        theta = clt.feature_thresholds()
    tensors = _clt_tensors(clt, layers, n_layers, theta)
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "model_name": model_name,
    }
    out = Path(out).resolve()
    with atomic_write(out) as tmp:
        tmp.mkdir()
        (tmp / CT_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        for layer, (enc, dec) in enumerate(tensors):
            save_file(enc, str(tmp / CLT_ENCODER_FILE.format(layer)))
            save_file(dec, str(tmp / CLT_DECODER_FILE.format(layer)))
        (tmp / EXPORT_RECORD_FILE).write_text(
            json.dumps({"clt": str(path), "layers": layers}, indent=2)
        )
    return out


@torch.no_grad()
def _clt_tensors(
    clt: CrossLayerTranscoder, layers: list[int], n_layers: int, theta: Tensor | None
) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Per model layer, circuit-tracer's encoder file and decoder file contents, zero where
    the CLT does not cover a layer (negative thresholds at 0: see the module docstring)."""
    n, d = clt.features_per_layer, clt.d_layer
    dtype = clt.b_dec.dtype
    b_enc, b_dec = clt.b_enc.view(-1, n), clt.b_dec.view(-1, d)
    thresholds = None if theta is None else theta.to(dtype).expand(clt.d_sae).view(-1, n)
    own = {layer: i for i, layer in enumerate(layers)}
    files = []
    for layer in range(n_layers):
        i = own.get(layer)
        enc = {
            f"W_enc_{layer}": torch.zeros(n, d, dtype=dtype),
            f"b_enc_{layer}": torch.zeros(n, dtype=dtype),
            f"b_dec_{layer}": torch.zeros(d, dtype=dtype),
        }
        if thresholds is not None:
            enc[f"threshold_{layer}"] = torch.zeros(n, dtype=dtype)
        W_dec = torch.zeros(n, n_layers - layer, d, dtype=dtype)
        if i is not None:
            enc[f"W_enc_{layer}"] = clt.W_enc[i].T.contiguous()
            enc[f"b_enc_{layer}"] = b_enc[i].clone()
            enc[f"b_dec_{layer}"] = b_dec[i].clone()
            if thresholds is not None:
                enc[f"threshold_{layer}"] = thresholds[i].clamp_min(0)
            blocks = clt.W_dec[i].view(n, -1, d)
            for j, target in enumerate(layers[i:]):
                W_dec[:, target - layer] = blocks[:, j]
        files.append((enc, {f"W_dec_{layer}": W_dec}))
    return files
