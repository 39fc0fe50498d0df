"""--target-l0 on the real model: does every architecture end near the L0 it was asked for?

One ``drrik train`` run sweeping architecture x ``target_l0``, so that every dictionary reads
the same activations stream, at the defaults otherwise (the embedded SmolLM2-135M,
``blocks.12.hook_resid_post``, the offline corpus, 8x expansion). Reported per dictionary: the
final held-out L0 (the run's closing evaluation), its ratio to the target, and for relu, gated
and jumprelu the sparsity coefficient the controller ended at. The issue's standard is a
held-out L0 within 10% of the target.

    python benchmarks/target_l0.py                       # writes results/target_l0-cpu.{json,md}
    python benchmarks/target_l0.py --architectures relu topk --training-tokens 1000000
    python benchmarks/target_l0.py --architectures relu --train-batch-size-tokens 1024 \
        --stem target_l0-cpu-relu-batch1024       # 4x the steps on the same tokens
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line, write_results  # noqa: E402

import drrik  # noqa: E402
from drrik.config import RunConfig, StoreConfig, TrainerConfig  # noqa: E402
from drrik.run_dir import RunDir  # noqa: E402
from drrik.sae import KNOWN_ARCHITECTURES, SAEConfig  # noqa: E402

TOLERANCE = 0.10
"""The issue's standard: final held-out L0 within 10% of the target."""


def run_grid(
    architectures: list[str], targets: list[int], tokens: int, batch: int, out: Path
) -> list[dict[str, Any]]:
    """Train every architecture at every target from one stream (a sweep grid, so the model's
    forward pass is shared); one result row per dictionary."""
    cfg = RunConfig(
        store=StoreConfig(train_batch_size_tokens=batch),
        sae=SAEConfig(architecture=architectures[0], target_l0=targets[0]),
        trainer=TrainerConfig(
            training_tokens=tokens,
            sweep=[
                f"architecture={','.join(architectures)}",
                f"target_l0={','.join(map(str, targets))}",
            ],
        ),
        out=str(out),
    )
    started = time.perf_counter()
    metrics = drrik.train(cfg, verbose=False)
    seconds = time.perf_counter() - started
    rows = RunDir(out).read_metrics()
    results = []
    for architecture in architectures:
        for target in targets:
            name = f"architecture={architecture}__target_l0={target}"
            last = [r for r in rows if r["sae"] == name][-1]
            held_out = metrics[name]["l0"]
            results.append(
                {
                    "architecture": architecture,
                    "target_l0": target,
                    "held_out_l0": held_out,
                    "ratio": held_out / target,
                    "within_tolerance": abs(held_out / target - 1) <= TOLERANCE,
                    "last_train_l0": last["l0"],
                    "sparsity_coefficient": last["sparsity_coefficient"],
                    "explained_variance": metrics[name]["explained_variance"],
                    "steps": last["step"],
                    "run_seconds": seconds,
                }
            )
    return results


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"## target_l0: smollm2-135m, {s['hook']}, cpu",
        "",
        f"{s['training_tokens']:,} training tokens ({s['steps']} steps of "
        f"{s['train_batch_size_tokens']:,}), one run "
        "sweeping architecture x target_l0; held-out L0 from the closing evaluation. "
        f"Run time {s['run_seconds']:.0f} s.",
        "",
        "| architecture | target | held-out L0 | ratio | last batch L0 | coefficient | EV |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        coefficient = (
            f"{r['sparsity_coefficient']:.3g}"
            if r["architecture"] in ("relu", "gated", "jumprelu")
            else "-"
        )
        lines.append(
            f"| {r['architecture']} | {r['target_l0']} | {r['held_out_l0']:.1f} | "
            f"{r['ratio']:.2f} | {r['last_train_l0']:.1f} | {coefficient} | "
            f"{r['explained_variance']:.3f} |"
        )
    lines += [
        "",
        machine_line(m),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--architectures", nargs="+", default=list(KNOWN_ARCHITECTURES), choices=KNOWN_ARCHITECTURES
    )
    p.add_argument("--targets", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--training-tokens", type=int, default=300_000)
    p.add_argument("--train-batch-size-tokens", type=int, default=4096)
    p.add_argument("--stem", default="target_l0-cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = run_grid(
            args.architectures,
            args.targets,
            args.training_tokens,
            args.train_batch_size_tokens,
            Path(tmp) / "run",
        )
    defaults = RunConfig()
    result = {
        "settings": {
            "hook": defaults.model.hook[0],
            "training_tokens": args.training_tokens,
            "train_batch_size_tokens": args.train_batch_size_tokens,
            "steps": results[0]["steps"],
            "run_seconds": results[0]["run_seconds"],
            "targets": args.targets,
            "tolerance": TOLERANCE,
        },
        "results": results,
        "machine": machine_info("cpu"),
    }
    write_results(args.stem, result, markdown(result))


if __name__ == "__main__":
    main()
