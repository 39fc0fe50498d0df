"""Transcoder quality next to an SAE, and skip against plain, on the same tokens at matched L0.

For each layer, three TopK dictionaries (same k, so the same L0; same width) learn to
reconstruct the MLP's output ``blocks.N.hook_mlp_out``:

- an **SAE** that reads that output itself;
- a **transcoder** that reads the MLP's input ``blocks.N.mlp.hook_in``;
- a **skip transcoder**: the transcoder plus a trained linear skip (``--skip-connection``).

They are trained with ``drrik train`` as a user runs it: the SAE and the transcoder of every
layer in one run (one stream, so the very same batches), the skip transcoders in a second run
with the same seed and data (the same batches again: the stream and the buffer's shuffle depend
on the seed only). Each is then evaluated on the same held-out contexts, spliced in at the MLP
output: FVU against the output, L0, CE loss recovered (against zero-ablating the MLP output),
KL, dead and dense features.

    python benchmarks/transcoder_quality.py                      # results/transcoder_quality-cpu.*
    python benchmarks/transcoder_quality.py --layers 3 --tokens 50000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line, write_results  # noqa: E402

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
KINDS = ("SAE on the MLP output", "transcoder", "skip transcoder")
COLUMNS = ("fvu", "l0", "ce_loss_recovered", "kl_div_with_sae", "dead_features", "dense_features")


def train(args: argparse.Namespace, out: Path, hooks: list[str], targets: list[str], *flags: str):
    """One ``drrik train`` run; returns each saved dictionary's held-out metrics by input hook."""
    cmd = [
        *("drrik", "train", "--out", str(out), "--hook", *hooks, "--target-hook", *targets),
        *("--layers", *map(str, args.layers), "--architecture", "topk", "-k", str(args.k)),
        *("--expansion-factor", str(args.expansion_factor)),
        *("--training-tokens", str(args.tokens), "--eval-contexts", str(args.eval_contexts)),
        *("--wandb-mode", "disabled", *args.flags.split(), *flags),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    found = {}
    for cfg_json in (out / "final").glob("*/cfg.json"):
        meta = json.loads(cfg_json.read_text())["metadata"]
        found[meta["hook_name"]] = meta["eval"] | {"wall_s": round(wall, 1)}
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[6, 20])
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--eval-contexts", type=int, default=128)
    p.add_argument("--flags", default="", help="more drrik train flags for every run")
    p.add_argument("--stem", default="transcoder_quality-cpu", help="results file name")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        both = train(args, Path(tmp) / "sae-and-transcoder", [OUT, IN], [OUT, OUT])
        skip = train(args, Path(tmp) / "skip", [IN], [OUT], "--skip-connection")
    layers: dict[str, dict[str, dict[str, float]]] = {}
    for layer in args.layers:
        out, inp = OUT.format(layer=layer), IN.format(layer=layer)
        layers[str(layer)] = {
            KINDS[0]: both[out],
            KINDS[1]: both[inp],
            KINDS[2]: skip[inp],
        }
    result = {
        "machine": machine_info("cpu"),
        "model": "smollm2-135m",
        "architecture": "topk",
        "k": args.k,
        "expansion_factor": args.expansion_factor,
        "training_tokens": args.tokens,
        "flags": args.flags,
        "eval_contexts": args.eval_contexts,
        "layers": layers,
    }
    write_results(args.stem, result, table(result))


def table(r: dict[str, Any]) -> str:
    """One row per layer and dictionary kind."""
    m = r["machine"]
    lines = [
        f"## Transcoder quality: {r['model']}, TopK k {r['k']}, "
        f"{r['expansion_factor']}x width, {r['training_tokens']:,} tokens each, cpu"
        + (f", `{r['flags']}`" if r.get("flags") else ""),
        "",
        "All reconstruct `blocks.N.hook_mlp_out` and are spliced in there; held-out "
        f"{r['eval_contexts']} contexts. FVU is against the MLP output.",
        "",
        "| layer | dictionary | " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for layer, kinds in r["layers"].items():
        for kind, metrics in kinds.items():
            cells = [
                f"{metrics[c]:.4f}" if isinstance(metrics[c], float) else str(metrics[c])
                for c in COLUMNS
            ]
            lines.append(f"| {layer} | {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        machine_line(m),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
