"""A transcoder for every layer, from one forward pass: the loop against its floor, and memory.

One drrik run trains a TopK transcoder per layer of the embedded SmolLM2-135M (30 layers,
``blocks.N.mlp.hook_in`` -> ``blocks.N.hook_mlp_out``, 4x width, k 32) from one stream, with
drrik's defaults otherwise (model dtype ``auto``, fp32 dictionaries, buffer of 16 model batches).

- **floor**: the two things the loop must do per batch, each timed alone in this process on the
  run's own batches: the full-depth forward to all 60 hooks, and the 30 transcoders' training
  steps (``Learner.step``: forward, backward, clipping, Adam, the dead-feature update). Rounds
  alternate, before and after the loop, medians reported. The serial floor for the loop's work
  is ``forward tokens / forward rate + training tokens / step rate`` seconds.
- **loop**: ``drrik train``'s three steps (assemble, ``Trainer.train``, final eval and export)
  in a separate process, so that its peak RSS is its own; the loop is timed alone.

    python benchmarks/transcoder_set.py                    # writes results/transcoder_set-cpu.*
    python benchmarks/transcoder_set.py --tokens 20000 --layers 0 1 2 --rounds 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from floor import alternate, forward_fn  # noqa: E402
from machine import machine_info, machine_line, write_results  # noqa: E402

from drrik.assemble import assemble  # noqa: E402
from drrik.config import (  # noqa: E402
    CheckpointConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainerConfig,
)
from drrik.data import ContextStream, load_source  # noqa: E402
from drrik.model import resolve_dtype  # noqa: E402
from drrik.run import Run  # noqa: E402
from drrik.sae import SAEConfig  # noqa: E402

MIB = 2**20
IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"


def run_config(args: argparse.Namespace, out: str) -> RunConfig:
    """The run: every layer's TopK transcoder, drrik's defaults otherwise."""
    cfg = RunConfig(
        model=ModelConfig(model=args.model, hook=[IN], target_hook=[OUT], layers=args.layers),
        sae=SAEConfig(
            architecture="topk",
            k=args.k,
            expansion_factor=args.expansion_factor,
            skip_connection=args.skip,
        ),
        trainer=TrainerConfig(training_tokens=args.tokens, autocast=args.autocast),
        eval=EvalConfig(eval_contexts=args.eval_contexts),
        checkpoint=CheckpointConfig(checkpoint_every_tokens=0, checkpoint_every_minutes=0),
        out=out,
    )
    cfg.wandb.wandb_mode = "disabled"
    return cfg


def parameter_mib(run: Run) -> dict[str, float]:
    """Dictionaries' parameters, their Adam state, and the buffer's activations, in MiB."""
    params = sum(p.numel() * p.element_size() for lr in run.learners for p in lr.sae.parameters())
    buffer = sum(store.buffer.nbytes for store in run.stores)
    return {
        "dictionary_parameters_mib": round(params / MIB, 1),
        "adam_state_mib": round(2 * params / MIB, 1),
        "gradients_mib": round(params / MIB, 1),
        "buffer_mib": round(buffer / MIB, 1),
    }


def loop_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Assemble, train and export as ``drrik train`` does; time the loop alone."""
    from drrik.export import export_run
    from drrik.pipeline import open_logger
    from drrik.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = assemble(run_config(args, f"{tmp}/run"), verbose=False)
        setup_s = time.perf_counter() - t0
        seen = sum(store.tokens_seen for store in run.stores)
        logger = open_logger(run)
        t1 = time.perf_counter()
        Trainer(run, logger).train()
        loop_s = time.perf_counter() - t1
        forward_tokens = sum(store.tokens_seen for store in run.stores) - seen
        peak_loop = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t2 = time.perf_counter()
        assert run.evaluator is not None
        metrics, densities = run.evaluator([lr.eval_target() for lr in run.learners])
        eval_s = time.perf_counter() - t2
        export_run(run, metrics, densities, logger)
        logger.finish()
        memory = parameter_mib(run)
        tokens = run.progress.tokens
        run.close()
    fvu = {name: round(1 - m["explained_variance"], 4) for name, m in metrics.items()}
    return {
        "setup_s": round(setup_s, 1),
        "loop_s": round(loop_s, 1),
        "final_eval_s": round(eval_s, 1),
        "training_tokens": tokens,
        "forward_tokens_in_loop": forward_tokens,
        "loop_tokens_per_s": round(tokens / loop_s, 1),
        "peak_rss_through_loop_mib": round(peak_loop, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **memory,
        "held_out_fvu": fvu,
        "held_out_l0_mean": round(statistics.mean(m["l0"] for m in metrics.values()), 2),
    }


def floor_fns(args: argparse.Namespace, tmp: str) -> tuple[dict[str, Any], dict[str, int], Run]:
    """The full-depth forward and the 30 transcoder steps, each on its own, on real batches."""
    cfg = run_config(args, f"{tmp}/floor")
    cfg.trainer.training_tokens = cfg.store.train_batch_size_tokens
    run = assemble(cfg, verbose=False)
    acts = run.stores[0].next_batch().acts
    hooks = list(acts)
    stream = ContextStream(load_source(cfg.data), run.model.tokenizer, cfg.data)
    prompts = cfg.store.store_batch_size_prompts
    batches = list(itertools.islice(stream.batches(prompts), 2))
    batch = run.batch_size

    def steps() -> None:
        for learner in run.learners:
            learner.step(acts, 1.0, 1, batch, run.dist)

    fns = {"forward": forward_fn(run.model, hooks, batches), "steps": steps}
    tokens = {"forward": sum(b.numel() for b in batches), "steps": batch}
    return fns, tokens, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", nargs="+", default=["all"])
    p.add_argument("--tokens", type=int, default=98_304, help="training tokens of the loop")
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=4)
    p.add_argument("--skip", action="store_true", help="skip transcoders")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast for the steps")
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="floor rounds before and after")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stem", default="", help="results file name (default by the flags)")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(loop_worker(args)), flush=True)
        return

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fns, tokens, run = floor_fns(args, tmp)
        before = alternate(fns, tokens, args.rounds)
        cmd = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"the loop worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        loop = json.loads(lines[0].removeprefix("RESULT "))
        after = alternate(fns, tokens, args.rounds)
        n_dicts, d_sae = len(run.learners), run.learners[0].sae.d_sae
        run.close()
    rates = {name: statistics.median(before[name] + after[name]) for name in fns}
    floor_s = (
        loop["forward_tokens_in_loop"] / rates["forward"] + loop["training_tokens"] / rates["steps"]
    )
    result = {
        "machine": machine_info("cpu"),
        "model": args.model,
        "model_dtype": resolve_dtype("auto", "cpu"),
        "dictionaries": n_dicts,
        "architecture": "topk",
        "k": args.k,
        "d_sae": d_sae,
        "skip_connection": args.skip,
        "autocast": args.autocast,
        "floor_tokens_per_s": {name: round(v, 1) for name, v in rates.items()},
        "floor_rounds": {n: [round(t, 1) for t in before[n] + after[n]] for n in fns},
        "serial_floor_s": round(floor_s, 1),
        "share_of_floor": round(floor_s / loop["loop_s"], 3),
        "loop": loop,
    }
    stem = args.stem or "transcoder_set-cpu" + ("-skip" if args.skip else "")
    write_results(stem, result, table(result))


def table(r: dict[str, Any]) -> str:
    """The result as markdown: throughput against the floor, then memory."""
    loop, rates = r["loop"], r["floor_tokens_per_s"]
    flags = " (--skip-connection)" if r["skip_connection"] else ""
    flags += " (--autocast)" if r["autocast"] else ""
    m = r["machine"]
    lines = [
        f"## {r['dictionaries']} TopK transcoders{flags} from one stream: {r['model']}, cpu",
        "",
        f"k {r['k']}, d_sae {r['d_sae']}, model {r['model_dtype']}, "
        f"{loop['training_tokens']:,} training tokens; floor medians of "
        f"{len(r['floor_rounds']['forward'])} rounds (before and after the loop).",
        "",
        "| measured | tokens/s |",
        "|---|---:|",
        f"| forward to the last hook, alone | {rates['forward']:,.0f} |",
        f"| {r['dictionaries']} transcoder steps, alone | {rates['steps']:,.0f} |",
        f"| the loop (drrik train, defaults) | {loop['loop_tokens_per_s']:,.0f} |",
        "",
        f"Serial floor for the loop's work ({loop['forward_tokens_in_loop']:,} forward tokens, "
        f"{loop['training_tokens']:,} training tokens): {r['serial_floor_s']} s; the loop took "
        f"{loop['loop_s']} s: **{r['share_of_floor']:.0%} of the floor**. Set-up "
        f"{loop['setup_s']} s, final evaluation of all {r['dictionaries']} "
        f"{loop['final_eval_s']} s.",
        "",
        "| memory | MiB |",
        "|---|---:|",
        f"| peak RSS through the loop | {loop['peak_rss_through_loop_mib']:,.0f} |",
        f"| peak RSS, whole process | {loop['peak_rss_mib']:,.0f} |",
        f"| dictionaries' parameters | {loop['dictionary_parameters_mib']:,.0f} |",
        f"| their gradients | {loop['gradients_mib']:,.0f} |",
        f"| Adam state | {loop['adam_state_mib']:,.0f} |",
        f"| activations buffer (all hooks) | {loop['buffer_mib']:,.0f} |",
        "",
        f"Held-out mean L0 {loop['held_out_l0_mean']}; FVU per layer: "
        + ", ".join(f"{v:.3f}" for v in loop["held_out_fvu"].values())
        + ".",
        "",
        machine_line(m),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
