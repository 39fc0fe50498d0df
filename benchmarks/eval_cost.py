"""Held-out evaluation cost before and after issue 14 (each pass once, baselines once per run).

The evaluation before is ``drrik/evaluate.py`` at ``BEFORE``, read with ``git show`` and timed
in the same process as the current one, on the same model, contexts and dictionaries:

- **sae**: one ReLU SAE, 8x, at ``blocks.12.hook_resid_post`` (``drrik train``'s default);
- **sweep4**: four TopK SAEs (k = 16, 32, 64, 128) on that hook (``--sweep k=...``);
- **transcoders4**: four ReLU MLP transcoders, layers 0-3 (``--hook 'blocks.{layer}.mlp.hook_in'
  --target-hook 'blocks.{layer}.hook_mlp_out' --layers 0 1 2 3``).

Per scenario and round: the evaluation before, the current one's first evaluation of a run
(which computes the baselines: a final-only run pays this) and a later periodic one (which
reuses them), each with its forward passes counted; the order alternates between rounds so a
shared machine's load falls on all alike. A bare forward pass over the contexts is timed too,
so that passes x its time says how much of an evaluation is the language model. Medians are
reported, and the largest difference between the two evaluations' metrics.

    python benchmarks/eval_cost.py                   # writes results/eval_cost-cpu.{json,md}
    python benchmarks/eval_cost.py --contexts 64 --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_results  # noqa: E402

from drrik.config import DataConfig  # noqa: E402
from drrik.data import ContextStream, SpecialTokens, load_source  # noqa: E402
from drrik.evaluate import Baselines, EvalTarget, evaluate, held_out_contexts  # noqa: E402
from drrik.model import load_model, resolve_dtype  # noqa: E402
from drrik.sae import SAE, SAEConfig, build_sae  # noqa: E402

BEFORE = "6bd674f"
"""The commit this work started from: its evaluation is the one measured as before."""
HOOK = "blocks.12.hook_resid_post"


def evaluation_before() -> ModuleType:
    """``drrik/evaluate.py`` as it was at ``BEFORE``, imported under another name."""
    root = Path(__file__).resolve().parent.parent
    show = ["git", "show", f"{BEFORE}:drrik/evaluate.py"]
    source = subprocess.run(show, cwd=root, capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "evaluate_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("evaluate_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dictionaries(d_model: int, expansion: int) -> dict[str, list[tuple[str, str, SAE]]]:
    """Each scenario's (input hook, target hook, untrained dictionary): evaluation costs the
    same whatever the weights, except a ReLU's density, which only the small SAE part sees."""
    torch.manual_seed(0)
    d_sae = d_model * expansion

    def sae(**fields: Any) -> SAE:
        return build_sae(SAEConfig(d_in=d_model, d_sae=d_sae, **fields)).eval()

    return {
        "sae": [(HOOK, HOOK, sae())],
        "sweep4": [(HOOK, HOOK, sae(architecture="topk", k=k)) for k in (16, 32, 64, 128)],
        "transcoders4": [
            (
                f"blocks.{n}.mlp.hook_in",
                f"blocks.{n}.hook_mlp_out",
                sae(d_out=d_model, apply_b_dec_to_input=False),
            )
            for n in range(4)
        ],
    }


def measure(
    model: Any,
    before: ModuleType,
    scenario: list[tuple[str, str, SAE]],
    contexts: list[torch.Tensor],
    exclude: torch.Tensor,
    old_first: bool,
) -> dict[str, Any]:
    """Seconds and forward passes of the evaluation before, and of the current one's first
    and later evaluation in a run; the metrics' largest relative difference."""
    passes: list[int] = []
    handle = model.blocks[0].register_forward_hook(lambda *args: passes.append(1))
    old_targets = [
        before.EvalTarget(f"d{i}", hook, sae, target_hook=out)
        for i, (hook, out, sae) in enumerate(scenario)
    ]
    targets = [
        EvalTarget(f"d{i}", hook, sae, target_hook=out)
        for i, (hook, out, sae) in enumerate(scenario)
    ]
    baselines = Baselines()
    runs = {
        "before": lambda: before.evaluate(model, old_targets, contexts, exclude)[0],
        "first": lambda: evaluate(model, targets, contexts, exclude, baselines=baselines)[0],
        "later": lambda: evaluate(model, targets, contexts, exclude, baselines=baselines)[0],
    }
    order = ["before", "first", "later"] if old_first else ["first", "later", "before"]
    out: dict[str, Any] = {}
    metrics = {}
    try:
        for name in order:
            passes.clear()
            start = time.perf_counter()
            metrics[name] = runs[name]()
            out[f"{name}_s"] = time.perf_counter() - start
            out[f"{name}_passes"] = len(passes)
    finally:
        handle.remove()
    out["max_rel_diff"] = max_rel_diff(metrics["before"], metrics["first"])
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


def max_rel_diff(old: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> float:
    """The largest difference between two evaluations' metrics, relative (absolute for values
    below 1: CE recovered near 0 magnifies the CE's float noise)."""
    return max(
        abs(new[name][key] - value) / max(abs(value), 1.0)
        for name in old
        for key, value in old[name].items()
    )


def forward_seconds(model: Any, contexts: list[torch.Tensor]) -> float:
    """One bare full-depth forward pass over every batch of ``contexts``."""
    start = time.perf_counter()
    with torch.no_grad():
        for tokens in contexts:
            model(tokens)
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict[str, Any]:
    dtype = resolve_dtype("auto", "cpu")
    model = load_model(args.model, dtype=dtype)
    data_cfg = DataConfig(context_size=args.context_size)
    stream = ContextStream(
        load_source(data_cfg), model.tokenizer, data_cfg, holdout="eval", cycle=False
    )
    contexts = held_out_contexts(stream, args.contexts, args.batch)
    exclude = torch.tensor(SpecialTokens.of(model.tokenizer).ids(), dtype=torch.long)
    before = evaluation_before()
    scenarios = dictionaries(model.cfg.d_model, args.expansion)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
    forward_seconds(model, contexts)  # warm-up
    forward: list[float] = []
    for r in range(args.rounds):
        forward.append(forward_seconds(model, contexts))
        for name, scenario in scenarios.items():
            result = measure(model, before, scenario, contexts, exclude, old_first=r % 2 == 0)
            rounds[name].append(result)
            print(f"round {r + 1}/{args.rounds} {name}: {result}", flush=True)
    median = {
        name: {
            key: statistics.median(row[key] for row in rows)
            if key.endswith("_s")
            else max(row[key] for row in rows)
            for key in rows[0]
        }
        for name, rows in rounds.items()
    }
    return {
        "model": args.model,
        "dtype": dtype,
        "contexts": sum(int(c.shape[0]) for c in contexts),
        "context_size": args.context_size,
        "batch": args.batch,
        "expansion": args.expansion,
        "rounds": args.rounds,
        "before": BEFORE,
        "forward_pass_s": statistics.median(forward),
        "median": median,
        "rounds_raw": rounds,
    }


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    forward = result["forward_pass_s"]
    lines = [
        f"## eval_cost: {result['model']} ({result['dtype']}), cpu",
        "",
        f"Medians of {result['rounds']} alternating rounds; {result['contexts']} held-out "
        f"contexts of {result['context_size']} tokens in batches of {result['batch']}; "
        f"untrained dictionaries, {result['expansion']}x. Before: `drrik/evaluate.py` at "
        f"{result['before']}. *first*: a run's first evaluation (computes the baselines; a "
        "run that evaluates only at the end pays this); *later*: every later one (periodic, "
        f"and the final one after them). One bare forward pass over the contexts: "
        f"{forward:.1f} s; *LM share* is passes x that / time. *max metric diff*: between "
        "before and first, relative (absolute below 1).",
        "",
        "| dictionaries | before s (passes) | first s (passes) | later s (passes) "
        "| before / first | before / later | LM share before | max metric diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["median"].items():
        lines.append(
            f"| {name} | {m['before_s']:.1f} ({m['before_passes']}) "
            f"| {m['first_s']:.1f} ({m['first_passes']}) "
            f"| {m['later_s']:.1f} ({m['later_passes']}) "
            f"| {m['before_s'] / m['first_s']:.2f}x | {m['before_s'] / m['later_s']:.2f}x "
            f"| {m['before_passes'] * forward / m['before_s']:.0%} | {m['max_rel_diff']:.1e} |"
        )
    lines += [
        "",
        f"{machine['date']}; {machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_average_1min']} at the end (shared machine: compare ratios within "
        f"this run); torch {machine['torch']}, transformers {machine['transformers']}, "
        f"transformer-lens {machine['transformer-lens']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    result = bench(args)
    machine = machine_info("cpu")
    result["machine"] = machine
    write_results("eval_cost-cpu", result, markdown(result, machine))


if __name__ == "__main__":
    main()
