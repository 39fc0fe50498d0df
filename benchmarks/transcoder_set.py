"""A transcoder for every layer, or one cross-layer transcoder over all of them, from one
forward pass: the loop against its floor, memory, and quality per layer.

One drrik run trains a TopK transcoder per layer of the embedded SmolLM2-135M (30 layers,
``blocks.N.mlp.hook_in`` -> ``blocks.N.hook_mlp_out``, 4x width, k 32) from one stream, with
drrik's defaults otherwise (model dtype ``auto``, fp32 dictionaries, buffer of 16 model batches);
with ``--dictionary clt``, one TopK CLT over those layers instead (k and width per layer, so the
total L0 matches the set's at the same flags).

- **floor**: the two things the loop must do per batch, each timed alone in this process on the
  run's own batches: the full-depth forward to all 60 hooks, and the 30 transcoders' training
  steps (``Learner.step``: forward, backward, clipping, Adam, the dead-feature update). Rounds
  alternate, before and after the loop, medians reported. The serial floor for the loop's work
  is ``forward tokens / forward rate + training tokens / step rate`` seconds.
- **loop**: ``drrik train``'s three steps (assemble, ``Trainer.train``, final eval and export)
  in a separate process, so that its peak RSS is its own; the loop is timed alone.
- **quality**: FVU per layer on held-out tokens (each layer's clean input; a CLT's layer from
  every earlier layer's clean input too), and CE recovered with every layer replaced at once.

    python benchmarks/transcoder_set.py                    # writes results/transcoder_set-cpu.*
    python benchmarks/transcoder_set.py --dictionary clt --expansion-factor 2
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
            dictionary=args.dictionary,
        ),
        trainer=TrainerConfig(training_tokens=args.tokens, autocast=args.autocast),
        eval=EvalConfig(eval_contexts=args.eval_contexts, eval_together=args.dictionary == "sae"),
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
        targets = [lr.eval_target() for lr in run.learners]
        metrics, densities = run.evaluator(targets)
        together = run.evaluator.together(targets) if len(targets) > 1 else metrics["clt"]
        eval_s = time.perf_counter() - t2
        fvu = per_layer_fvu(run)
        export_run(run, metrics, densities, logger)
        logger.finish()
        memory = parameter_mib(run)
        tokens = run.progress.tokens
        run.close()
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
        "held_out_total_l0": round(sum(m["l0"] for m in metrics.values()), 1),
        "all_replaced": {k: round(together[k], 4) for k in ALL_REPLACED},
    }


ALL_REPLACED = ("ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablated", "ce_loss_recovered")


@torch.no_grad()
def per_layer_fvu(run: Run) -> list[float]:
    """Held-out FVU of every layer's output, in layer order, each layer's reconstruction
    from clean inputs: for the set, its layer's transcoder; for a CLT, its slice."""
    from drrik.topk_jumprelu import collect

    assert run.evaluator is not None
    pairs = [(lr.spec.reads, lr.spec.writes) for lr in run.learners]
    width = sum(lr.sae.d_in + lr.sae.d_out for lr in run.learners)
    ev = run.evaluator
    held = collect(ev.model, ev.contexts, ev.exclude_ids, pairs, width)
    fvu = []
    for lr, pair in zip(run.learners, pairs, strict=True):
        target = lr.eval_target()
        lr.sae.eval()
        out = torch.cat([target.reconstruct(x)[1] for x in held[pair].x.split(1024)])
        layer_width = lr.sae.d_out // len(lr.spec.writes)
        parts = zip(held[pair].y.split(layer_width, -1), out.split(layer_width, -1), strict=True)
        for y, y_hat in parts:
            total = (y - y.mean(0)).pow(2).sum()
            fvu.append(round(float((y - y_hat).pow(2).sum() / total), 4))
    return fvu


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
    p.add_argument("--dictionary", choices=["sae", "clt"], default="sae", help="sae: one a layer")
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
        n_dicts, first = len(run.learners), run.learners[0]
        d_sae = first.sae.d_sae // len(first.spec.writes)  # a CLT: per layer
        covered = sum(len(lr.spec.writes) for lr in run.learners)
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
        "layers_covered": covered,
        "architecture": "topk",
        "dictionary": args.dictionary,
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
    stem += "" if args.stem or args.dictionary == "sae" else "-clt"
    write_results(stem, result, table(result))


def what(r: dict[str, Any]) -> str:
    """The dictionaries trained, in words."""
    if r["dictionary"] == "clt":
        return f"a TopK cross-layer transcoder over {r['layers_covered']} layers"
    return f"{r['dictionaries']} TopK transcoders"


def table(r: dict[str, Any]) -> str:
    """The result as markdown: throughput against the floor, then memory."""
    loop, rates = r["loop"], r["floor_tokens_per_s"]
    flags = " (--skip-connection)" if r["skip_connection"] else ""
    flags += " (--autocast)" if r["autocast"] else ""
    m = r["machine"]
    per_layer = " (a layer)" if r["dictionary"] == "clt" else ""
    lines = [
        f"## {what(r)}{flags} from one stream: {r['model']}, cpu",
        "",
        f"k {r['k']}{per_layer}, d_sae {r['d_sae']}{per_layer}, model {r['model_dtype']}, "
        f"{loop['training_tokens']:,} training tokens; floor medians of "
        f"{len(r['floor_rounds']['forward'])} rounds (before and after the loop).",
        "",
        "| measured | tokens/s |",
        "|---|---:|",
        f"| forward to the last hook, alone | {rates['forward']:,.0f} |",
        f"| {what(r)} steps, alone | {rates['steps']:,.0f} |",
        f"| the loop (drrik train, defaults) | {loop['loop_tokens_per_s']:,.0f} |",
        "",
        f"Serial floor for the loop's work ({loop['forward_tokens_in_loop']:,} forward tokens, "
        f"{loop['training_tokens']:,} training tokens): {r['serial_floor_s']} s; the loop took "
        f"{loop['loop_s']} s: **{r['share_of_floor']:.0%} of the floor**. Set-up "
        f"{loop['setup_s']} s, final evaluation {loop['final_eval_s']} s.",
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
        f"Held-out total L0 {loop['held_out_total_l0']}; FVU per layer (mean "
        f"{statistics.mean(loop['held_out_fvu']):.3f}): "
        + ", ".join(f"{v:.3f}" for v in loop["held_out_fvu"])
        + ".",
        "",
        "Every layer replaced at once: CE clean {ce_loss_clean}, with the dictionaries "
        "{ce_loss_with_sae}, zero-ablated {ce_loss_zero_ablated}; **CE recovered "
        "{ce_loss_recovered}**.".format(**loop["all_replaced"]),
        "",
        machine_line(m),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
