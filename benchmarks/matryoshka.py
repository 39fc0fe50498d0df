"""Matryoshka BatchTopK next to plain BatchTopK of the same width, at the same k, one run.

One ``drrik train`` run sweeping the architecture, so both dictionaries read the same
activations stream, at the defaults otherwise (the embedded SmolLM2-135M,
``blocks.12.hook_resid_post``, 8x expansion, the default token budget). Reported per
dictionary, from the closing held-out evaluation: L0, explained variance, CE recovered, dead
and dense features; and how many of the first prefix's features are dense (the features a
Matryoshka asks to carry the broad directions alone), from the saved densities.

    python benchmarks/matryoshka.py                  # writes results/matryoshka-cpu.{json,md}
    python benchmarks/matryoshka.py --k 64 --training-tokens 1000000 --stem matryoshka-k64
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line, write_results  # noqa: E402

import drrik  # noqa: E402
from drrik.config import RunConfig, TrainerConfig  # noqa: E402
from drrik.sae import SAEConfig, load_sae, load_sparsity  # noqa: E402

ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")


def run(k: int, tokens: int, out: Path) -> list[dict[str, Any]]:
    """Both architectures from one stream; one result row each."""
    cfg = RunConfig(
        sae=SAEConfig(architecture=ARCHITECTURES[0], k=k),
        trainer=TrainerConfig(
            training_tokens=tokens, sweep=[f"architecture={','.join(ARCHITECTURES)}"]
        ),
        out=str(out),
    )
    started = time.perf_counter()
    metrics = drrik.train(cfg, verbose=False)
    seconds = time.perf_counter() - started
    dense_log10 = math.log10(cfg.eval.dense_threshold)
    # The Matryoshka's first prefix, compared with the same number of a plain BatchTopK's
    # features: its densest ones, the fairest reading for the plain dictionary's unordered
    # features.
    results = []
    for architecture in ARCHITECTURES:
        name = f"architecture={architecture}"
        saved = out / "final" / name
        widths = load_sae(saved).cfg.resolved_matryoshka_widths()
        density = load_sparsity(saved)
        assert density is not None, "the run saved no feature densities"
        first = widths[0]
        head = (
            density[:first]
            if architecture == "matryoshka_batchtopk"
            else density.sort(descending=True).values[:first]
        )
        m = metrics[name]
        results.append(
            {
                "architecture": architecture,
                "k": k,
                "l0": m["l0"],
                "explained_variance": m["explained_variance"],
                "ce_loss_recovered": m["ce_loss_recovered"],
                "dead_features": m["dead_features"],
                "dense_features": m["dense_features"],
                "first_prefix_width": first,
                "dense_in_first_prefix": int((head > dense_log10).sum()),
                "widths": widths,
                "run_seconds": seconds,
            }
        )
    return results


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"## matryoshka: smollm2-135m, {s['hook']}, cpu",
        "",
        f"{s['training_tokens']:,} training tokens, one run sweeping the architecture at k "
        f"{s['k']}; held-out metrics from the closing evaluation. Matryoshka prefix widths "
        f"{', '.join(map(str, result['results'][1]['widths']))}. For plain BatchTopK, whose "
        "features have no order, 'first prefix' is its densest features of the same count. "
        f"Run time {s['run_seconds']:.0f} s.",
        "",
        "| architecture | L0 | EV | CE recovered | dead | dense | dense in first prefix |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['architecture']} | {r['l0']:.1f} | {r['explained_variance']:.3f} | "
            f"{r['ce_loss_recovered']:.3f} | {r['dead_features']} | {r['dense_features']} | "
            f"{r['dense_in_first_prefix']} of {r['first_prefix_width']} |"
        )
    lines += ["", machine_line(result["machine"])]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--training-tokens", type=int, default=TrainerConfig().training_tokens)
    p.add_argument("--stem", default="matryoshka-cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args.k, args.training_tokens, Path(tmp) / "run")
    result = {
        "settings": {
            "hook": RunConfig().model.hook[0],
            "training_tokens": args.training_tokens,
            "k": args.k,
            "run_seconds": results[0]["run_seconds"],
        },
        "results": results,
        "machine": machine_info("cpu"),
    }
    write_results(args.stem, result, markdown(result))


if __name__ == "__main__":
    main()
