"""drrik's side of the interchange checks (run in drrik's environment): write the dictionaries
that SAELens and circuit-tracer must load, with drrik's own outputs to compare against.

Writes, under OUT:

- ``saes/<architecture>/``: one SAE per drrik architecture, random weights (every parameter
  moved off its initial value, so biases, thresholds and gated magnitudes all matter), saved
  by drrik; ``io/<architecture>.safetensors`` holds random inputs ``x`` and drrik's
  ``feature_acts = encode(x)`` and ``recon = decode(feature_acts)``.
- ``transcoders/<name>/``: the transcoders to export, in the layout drrik saves them:
  ``--transcoders`` (saved directories, e.g. a run's ``final/*``) or, by default, random
  JumpReLU skip transcoders on ``--layers`` of the model (MLP input to MLP output), with
  the model's MLP inputs in ``io/<name>.safetensors`` (``x``). For saved TopK transcoders
  (saved as JumpReLU, ``metadata.jumprelu_form``) it also holds the real targets ``y`` and
  drrik's outputs: ``topk_out`` (the TopK drrik reloads) and ``jumprelu_out`` (its JumpReLU
  form, what SAELens and circuit-tracer should compute).
- ``circuit-tracer/``: those transcoders exported by
  :func:`drrik.export_circuit_tracer.export_transcoder_set`.

    python benchmarks/interchange/write_dictionaries.py /tmp/interchange
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from drrik.export_circuit_tracer import export_transcoder_set
from drrik.model import embedded_gguf_path, gguf_to_hf_dir, load_model, run_hooks
from drrik.sae import (
    ARCHITECTURES,
    KNOWN_ARCHITECTURES,
    SAE,
    SAEConfig,
    build_sae,
    load_sae,
    save_sae,
)

D_SAE, K, TOKENS = 1024, 32, 512


def randomized(cfg: SAEConfig, seed: int) -> SAE:
    """A drrik SAE whose every parameter is random (a fresh one has zero biases)."""
    torch.manual_seed(seed)
    sae = build_sae(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        sae.b_enc.sub_(2.0)  # about one feature in six fires on inputs of std 2
        if hasattr(sae, "threshold_updates"):  # BatchTopK: a threshold as training sets one
            sae.threshold.fill_(0.1)
            sae.threshold_updates.fill_(1)
    return sae.eval()


def write_saes(out: Path, d_in: int, metadata: dict[str, object]) -> list[str]:
    names = []
    for seed, arch in enumerate(KNOWN_ARCHITECTURES):
        k = K if ARCHITECTURES[arch].needs_k else None
        sae = randomized(SAEConfig(architecture=arch, d_in=d_in, d_sae=D_SAE, k=k), seed)
        save_sae(sae, out / "saes" / arch, metadata=metadata)
        x = torch.randn(TOKENS, d_in) * 2
        with torch.no_grad():
            acts = sae.encode(x)
            io = {"x": x, "feature_acts": acts, "recon": sae.decode(acts)}
        (out / "io").mkdir(parents=True, exist_ok=True)
        save_file(io, str(out / "io" / f"{arch}.safetensors"))
        names.append(arch)
    return names


def hook_acts(model_dir: Path, hooks: list[str]) -> dict[str, Tensor]:
    """The model's activations at ``hooks`` on Python's bundled docs, [tokens, d_model]
    (text no run trains or evaluates on)."""
    from pydoc_data.topics import topics

    model = load_model(str(model_dir), device="cpu")
    text = " ".join(" ".join(t.split()) for t in list(topics.values())[:40])
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"][0, : 8 * 64].view(8, 64)
    acts = run_hooks(model, ids, hooks)
    return {hook: acts[hook].reshape(-1, acts[hook].shape[-1]).float() for hook in hooks}


def mlp_inputs(model_dir: Path, layers: list[int]) -> dict[int, Tensor]:
    """The model's MLP inputs at ``layers``, [tokens, d_model]."""
    acts = hook_acts(model_dir, [f"blocks.{layer}.mlp.hook_in" for layer in layers])
    return {layer: acts[f"blocks.{layer}.mlp.hook_in"] for layer in layers}


def saved_transcoder_io(path: Path, model_dir: Path) -> None:
    """For a saved transcoder: the model's real inputs and targets, and, for a TopK saved as
    JumpReLU, drrik's outputs of both forms, in ``io/<name>.safetensors``."""
    meta = json.loads((path / "cfg.json").read_text())["metadata"]
    acts = hook_acts(model_dir, [meta["hook_name"], meta["hook_name_out"]])
    x, y = acts[meta["hook_name"]], acts[meta["hook_name_out"]]
    io = {"x": x, "y": y}
    form = meta.get("jumprelu_form")
    if form is not None:
        sae = load_sae(path)  # the drrik block: the TopK
        with torch.no_grad():
            pre = sae.scaled_pre_acts(x)  # type: ignore[operator]
            skip = sae.skip(x)
            out = sae.decode(pre * (pre > form["threshold"]))
            io |= {"topk_out": sae(x), "jumprelu_out": out if skip is None else out + skip}
    save_file(io, str(path.parent.parent / "io" / f"{path.name}.safetensors"))


def random_transcoder(path: Path, layer: int, x: Tensor, model_dir: Path) -> None:
    """A random JumpReLU skip transcoder, MLP input to MLP output of ``layer``, in the layout
    drrik saves transcoders: a drrik JumpReLU SAE's files plus the transcoder's keys. Its
    encoder biases make each feature fire on about 5% of the model's MLP inputs ``x``."""
    d_model = x.shape[-1]
    sae = randomized(SAEConfig(architecture="jumprelu", d_in=d_model, d_sae=D_SAE), layer)
    meta = {"model_name": str(model_dir), "hook_name": f"blocks.{layer}.mlp.hook_in"}
    save_sae(sae, path, metadata={**meta, "context_size": 128, "prepend_bos": True})
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["drrik"]  # drrik has no transcoder class to reload yet: SAELens's keys only
    cfg["architecture"] = "jumprelu_skip_transcoder"
    cfg["d_out"] = d_model
    cfg["apply_b_dec_to_input"] = False  # a transcoder's b_dec belongs to its output
    cfg["metadata"]["hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(str(path / "sae_weights.safetensors"))
    tensors["b_enc"] = -(x @ tensors["W_enc"]).quantile(0.95, dim=0)
    tensors["threshold"] = torch.randn(D_SAE) * 0.05  # both signs: the export clamps θ < 0
    tensors["W_skip"] = torch.randn(d_model, d_model) / d_model
    save_file(tensors, str(path / "sae_weights.safetensors"))
    save_file({"x": x}, str(path.parent.parent / "io" / f"{path.name}.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model-dir", type=Path, help="HF model dir (default: embedded SmolLM2)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--transcoders", type=Path, nargs="+", help="saved transcoder dirs")
    args = parser.parse_args()
    model_dir = args.model_dir or gguf_to_hf_dir(embedded_gguf_path())
    d_model = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    shutil.rmtree(args.out, ignore_errors=True)
    sae_meta = {"model_name": str(model_dir), "hook_name": "blocks.6.hook_resid_post"}
    saes = write_saes(args.out, d_model, sae_meta)
    transcoders = args.out / "transcoders"
    if args.transcoders:
        for source in args.transcoders:
            shutil.copytree(source, transcoders / source.name)
            saved_transcoder_io(transcoders / source.name, model_dir)
    else:
        for layer, x in mlp_inputs(model_dir, args.layers).items():
            random_transcoder(transcoders / f"layer{layer}", layer, x, model_dir)
    dirs = sorted(transcoders.iterdir())
    export_transcoder_set(dirs, args.out / "circuit-tracer")
    summary = {
        "saes": saes,
        "transcoders": [d.name for d in dirs],
        "model_dir": str(model_dir),
        "circuit_tracer_set": str(args.out / "circuit-tracer"),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
