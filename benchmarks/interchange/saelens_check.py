"""SAELens's side (run in an environment with sae-lens, not drrik): load every directory
that write_dictionaries.py wrote with ``sae_lens.SAE.load_from_disk`` and compare.

- SAEs (``OUT/saes/*``): SAELens's ``encode`` and ``decode`` on drrik's inputs against
  drrik's outputs (``OUT/io/<name>.safetensors``).
- Transcoders (``OUT/transcoders/*``): loaded and run on ``x`` from
  ``OUT/io/<name>.safetensors`` (the model's MLP inputs) or, if none, random inputs; their
  outputs (``forward``, skip term included) go to ``OUT/io/saelens-<name>.safetensors`` for
  the circuit-tracer check, and are compared with drrik's where drrik wrote any: for a TopK
  transcoder saved as JumpReLU, with drrik's JumpReLU form (``jumprelu_out``), and its FVU
  against the real target ``y`` with that of drrik's TopK (``topk_out``).

Prints one JSON object: per directory, the class SAELens built and the largest differences.

    /work/venv-saelens/bin/python benchmarks/interchange/saelens_check.py /tmp/interchange
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import load_file, save_file

TOKENS, SEED = 512, 0


def max_diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Largest absolute difference, and relative to the largest magnitude."""
    diff = (a - b).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(b.abs().max().item(), 1e-30)}


def check(directory: Path, io_dir: Path) -> dict[str, object]:
    sae = sae_lens.SAE.load_from_disk(str(directory), device="cpu")
    sae.eval()
    reference = io_dir / f"{directory.name}.safetensors"
    result: dict[str, object] = {"saelens_class": type(sae).__name__}
    io = load_file(str(reference)) if reference.is_file() else {}
    if "x" in io:
        x = io["x"]
    else:
        x = torch.randn(TOKENS, sae.cfg.d_in, generator=torch.Generator().manual_seed(SEED)) * 2
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
        out = sae(x)
    result["l0"] = (acts > 0).float().sum(-1).mean().item()
    if "recon" in io:
        result["feature_acts"] = max_diff(acts, io["feature_acts"])
        result["active_mismatches"] = int(((acts > 0) != (io["feature_acts"] > 0)).sum())
        result["recon"] = max_diff(recon, io["recon"])
    else:
        save_file({"x": x, "out": out}, str(io_dir / f"saelens-{directory.name}.safetensors"))
        result["note"] = "SAELens's outputs saved for circuit-tracer"
    if "jumprelu_out" in io:
        result["out_vs_drrik_jumprelu"] = max_diff(out, io["jumprelu_out"])
    if "y" in io:
        result["fvu"] = fvu(out, io["y"])
    if "topk_out" in io:
        result["fvu_drrik_topk"] = fvu(io["topk_out"], io["y"])
    return result


def fvu(out: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of the target's variance that ``out`` leaves unexplained."""
    return ((out - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    io_dir = args.out / "io"
    results: dict[str, object] = {
        "python": sys.version.split()[0],
        "sae_lens": sae_lens.__version__,
        "torch": torch.__version__,
    }
    for kind in ("saes", "transcoders"):
        results[kind] = {}
        for directory in sorted((args.out / kind).iterdir()):
            try:
                results[kind][directory.name] = check(directory, io_dir)
            except Exception as exc:  # record every directory's outcome, failures included
                results[kind][directory.name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
