"""Whole process, as a user meets it: ``drrik train`` with its defaults against SAELens.

Each tool runs as a fresh process, timed from spawn to exit: interpreter start, imports, model
load, set-up, the training loop, saving, and for drrik its closing held-out evaluation (which
SAELens does not run; its own cost, from the run's metrics, is reported beside it). Both read
the same pretokenized contexts (``compare_saelens.prepare_data``), the same model, hook, width
and budget. drrik gets only those flags, so every other setting is its default (bf16 model and
bf16 autocast where native, geometric-median b_dec, ...). SAELens runs through
``compare_saelens``'s worker with its own defaults (fp32 model and SAE, b_dec at zero) and the
same lr, batch and buffer as drrik's defaults. The two alternate over ``--rounds`` rounds, so a
shared machine's load falls on both alike; medians are reported.

    python benchmarks/whole_process.py --saelens-python /work/venv-saelens/bin/python
    python benchmarks/whole_process.py --archs relu --tokens 200000 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_saelens import (  # noqa: E402
    RunSpec,
    base_spec,
    run_worker,
    runs_versions,
    saelens_python,
)
from default_sae import drrik_process  # noqa: E402
from machine import machine_info, machine_line, write_results  # noqa: E402

QUALITY = ("explained_variance", "l0", "ce_loss_recovered", "dead_features", "dense_features")
"""drrik's held-out metrics, from the saved SAE's cfg.json."""


def drrik(args: argparse.Namespace, arch: str, data_dir: Path, out: Path) -> dict:
    """``drrik train`` with the shared flags only; wall time of the whole process."""
    flags = ["--hook", args.hook, "--architecture", arch, "--training-tokens", str(args.tokens)]
    flags += ["--context-size", str(args.context_size), "--dataset", str(data_dir)]
    run = drrik_process(flags, out)
    final = run.pop("cfg")["metadata"]["eval"]
    return {**run, **{key: final[key] for key in QUALITY}}


def saelens_process(
    args: argparse.Namespace, arch: str, base: RunSpec, python: str, work: Path
) -> dict:
    """SAELens's runner in its own environment; wall time of the whole process."""
    spec = replace(base, tool="saelens", label=f"saelens-{arch}", arch=arch)
    spec = replace(spec, out_dir=str(work / spec.label))
    started = time.perf_counter()
    result = run_worker(spec, python, work)
    return {
        "wall_s": time.perf_counter() - started,
        "loop_tokens_per_s": result["tokens_per_s"],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["relu", "topk"])
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts cut")
    p.add_argument("--saelens-python", default=None)
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from drrik.config import StoreConfig, TrainerConfig
    from drrik.paths import cache_dir
    from drrik.sae import SAEConfig

    python = saelens_python(args.saelens_python)
    work = cache_dir() / "bench-whole-process"
    work.mkdir(parents=True, exist_ok=True)
    _, data_dir, base = base_spec(args, work, args.tokens)
    store, trainer, sae = StoreConfig(), TrainerConfig(), SAEConfig()
    base = replace(  # SAELens gets drrik's default batch, buffer, lr, width, k and L1
        base,
        tool="saelens",
        d_sae=8 * 576,
        k=sae.resolved_k(),
        l1_coefficient=sae.l1_coefficient,
        lr=trainer.lr,
        train_batch=store.train_batch_size_tokens,
        prompts=store.store_batch_size_prompts,
        buffer_batches=store.n_batches_in_buffer,
    )
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for arch in args.archs:
            order = ("drrik", "saelens") if r % 2 == 0 else ("saelens", "drrik")
            for tool in order:
                print(f"round {r + 1}: {tool} {arch}", flush=True)
                if tool == "drrik":
                    with tempfile.TemporaryDirectory() as tmp:
                        run = drrik(args, arch, data_dir, Path(tmp) / "run")
                else:
                    run = saelens_process(args, arch, base, python, work)
                runs.setdefault(f"{tool}-{arch}", []).append(run)
    medians = {
        label: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for label, rs in runs.items()
    }
    result = {
        "tokens": args.tokens,
        "hook": args.hook,
        "context_size": args.context_size,
        "rounds": args.rounds,
        "runs": runs,
        "medians": medians,
        "machine": machine_info("cpu"),
        "saelens_env": runs_versions(python),
    }
    write_results("whole_process-cpu", result, markdown(result, args.archs), args.out)


def markdown(result: dict[str, Any], archs: list[str]) -> str:
    m = result["medians"]
    lines = [
        "## Whole process: `drrik train` (defaults) against SAELens, same work (CPU)",
        "",
        f"SmolLM2-135M, `{result['hook']}`, {result['tokens']:,} training tokens, contexts of "
        f"{result['context_size']} tokens, the same pretokenized data, 8x width. Wall time of "
        "each process from spawn to exit (imports, model load, training, saving; drrik's "
        f"closing held-out evaluation included). Medians of {result['rounds']} alternating "
        "rounds.",
        "",
        "| arch | drrik wall s | of which eval s | SAELens wall s | SAELens / drrik | "
        "drrik loop tok/s | SAELens loop tok/s | drrik EV | drrik L0 | drrik CE rec. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch in archs:
        d, s = m[f"drrik-{arch}"], m[f"saelens-{arch}"]
        lines.append(
            f"| {arch} | {d['wall_s']:.1f} | {d['eval_s']:.1f} | {s['wall_s']:.1f} | "
            f"{s['wall_s'] / d['wall_s']:.2f}x | {d['loop_tokens_per_s']:,.0f} | "
            f"{s['loop_tokens_per_s']:,.0f} | {d['explained_variance']:.3f} | "
            f"{d['l0']:.1f} | {d['ce_loss_recovered']:.3f} |"
        )
    env = result["saelens_env"]
    lines += [
        "",
        f"{machine_line(result['machine'])} SAELens env: sae-lens {env['sae-lens']}, "
        f"transformer-lens {env['transformer-lens']}, torch {env['torch']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
