"""The floor: the bare forward pass to the hooked layer and the bare SAE training step, alone.

A streaming trainer on one device can go no faster than doing these two things back to back:
its serial floor is ``1 / (1 / forward + 1 / step)`` in tokens per second. This script times
each of them on its own, at the settings ``compare_saelens.py`` trains with, so that a run's
tokens/s can be read as a share of that floor.

- **forward**: ``drrik.model.run_hooks`` on contexts tokenized beforehand (the path the store
  uses, stopping after the hooked layer), per language-model dtype.
- **SAE step**: forward, backward, gradient clipping, the decoder-row projection, Adam, decoder
  renormalization and the dead-feature update, on a batch of real activations scaled as training
  scales them; fp32 and under bf16 autocast, per architecture.

Measurements alternate within rounds (A B C, then C B A) so that a shared machine's load falls
on all of them alike; medians are reported.

    python benchmarks/floor.py                        # writes results/floor-cpu.{json,md}
    python benchmarks/floor.py --rounds 9 --hook blocks.12.hook_resid_post
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_results  # noqa: E402

from drrik.config import DataConfig  # noqa: E402
from drrik.data import ContextStream, load_source  # noqa: E402
from drrik.model import load_model, run_hooks  # noqa: E402
from drrik.sae import SAE, SAEConfig, build_sae  # noqa: E402

Timed = Callable[[], None]


def forward_fn(model: Any, hooks: list[str], batches: list[torch.Tensor]) -> Timed:
    """One pass of ``run_hooks`` over ``batches``."""

    def run() -> None:
        for tokens in batches:
            run_hooks(model, tokens, hooks)

    return run


def sae_step_fn(
    sae: SAE,
    x: torch.Tensor,
    autocast: bool,
    dead_window: int,
    repeats: int = 1,
    compile_sae: bool = False,
) -> Timed:
    """``repeats`` bare training steps of ``sae`` on ``x``: what a trainer must do per batch."""
    forward = torch.compile(sae.training_forward) if compile_sae else sae.training_forward
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long)
    params = list(sae.parameters())

    def step() -> None:
        for _ in range(repeats):
            cast = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if autocast
                else contextlib.nullcontext()
            )
            with cast:
                out = forward(x, sae.cfg.l1_coefficient, since_fired >= dead_window)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            sae.remove_parallel_decoder_grad()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.normalize_decoder_rows()
            with torch.no_grad():
                since_fired.add_(x.shape[0]).masked_fill_(out.fired(), 0)

    return step


def alternate(fns: dict[str, Timed], tokens: dict[str, int], rounds: int) -> dict[str, list]:
    """Tokens/s of every ``fns`` entry per round, the order reversed every other round."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, Adam state
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            out[name].append(tokens[name] / (time.perf_counter() - start))
        line = ", ".join(f"{n} {v[-1]:,.0f}" for n, v in out.items())
        print(f"floor round {r + 1}/{rounds}: {line} tok/s", flush=True)
    return out


def serial_floor(forward: float, step: float) -> float:
    """Tokens/s of a forward pass and an SAE step done one after the other."""
    return 1.0 / (1.0 / forward + 1.0 / step)


def measure_floor(
    *,
    model_dir: str,
    hook: str,
    context_size: int = 128,
    prompts: int = 16,
    batch_tokens: int = 4096,
    d_sae: int = 4608,
    archs: tuple[str, ...] = ("relu", "topk"),
    k: int = 32,
    l1_coefficient: float = 5.0,
    model_dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    rounds: int = 5,
    models: dict[str, Any] | None = None,
    compile_archs: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Median tokens/s of the forward (per dtype, fast path and bridge) and the SAE step."""
    models = dict(models or {})
    for dtype in model_dtypes:
        if dtype not in models:
            models[dtype] = load_model(model_dir, dtype=dtype)
    hooks = [hook]
    first = models[model_dtypes[0]]
    data_cfg = DataConfig(context_size=context_size)
    stream = ContextStream(load_source(data_cfg), first.tokenizer, data_cfg)
    n_batches = max(1, 2 * batch_tokens // (prompts * context_size))
    batches = list(itertools.islice(stream.batches(prompts), n_batches))
    fwd_tokens = n_batches * prompts * context_size

    # Real activations for the SAE step, scaled to norm sqrt(d_in) as training scales them.
    acts = torch.cat(
        [run_hooks(first, b, hooks)[hook].reshape(-1, first.cfg.d_model) for b in batches]
    )
    x = acts[:batch_tokens].float()
    x = x * (x.shape[1] ** 0.5 / x.norm(dim=1).mean())

    fns: dict[str, Timed] = {}
    tokens: dict[str, int] = {}
    for dtype in model_dtypes:
        fns[f"forward {dtype}"] = forward_fn(models[dtype], hooks, batches)
        tokens[f"forward {dtype}"] = fwd_tokens
    for arch in archs:
        torch.manual_seed(0)
        for autocast in (False, True):
            cfg = SAEConfig(
                architecture=arch,
                d_in=x.shape[1],
                d_sae=d_sae,
                k=k if arch in ("topk", "batchtopk") else None,
                l1_coefficient=l1_coefficient,
                normalize_decoder=False,  # as compare_saelens.py trains (SAELens keeps rows free)
            )
            name = f"step {arch} " + ("bf16 autocast" if autocast else "fp32")
            sae = build_sae(cfg).train()
            fns[name] = sae_step_fn(
                sae, x, autocast, dead_window=10**12, repeats=2, compile_sae=arch in compile_archs
            )
            tokens[name] = 2 * x.shape[0]
    runs = alternate(fns, tokens, rounds)
    medians = {name: round(statistics.median(v), 1) for name, v in runs.items()}
    return {
        "hook": hook,
        "context_size": context_size,
        "store_batch_size_prompts": prompts,
        "train_batch_size_tokens": batch_tokens,
        "d_sae": d_sae,
        "k": k,
        "rounds": rounds,
        "compile_archs": list(compile_archs),
        "tokens_per_s": medians,
        "tokens_per_s_rounds": {n: [round(t, 1) for t in v] for n, v in runs.items()},
    }


def floors_table(floor: dict[str, Any]) -> list[str]:
    """Markdown rows: each measurement, then the serial floors it implies."""
    tps = floor["tokens_per_s"]
    lines = ["| measured alone | tokens/s |", "|---|---:|"]
    lines += [f"| {name} | {value:,.0f} |" for name, value in tps.items()]
    lines += ["", "| serial floor 1/(1/forward + 1/step) | tokens/s |", "|---|---:|"]
    for fwd in (n for n in tps if n.startswith("forward")):
        for step in (n for n in tps if n.startswith("step")):
            value = serial_floor(tps[fwd], tps[step])
            lines.append(f"| {fwd} + {step} | {value:,.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--compile", default="", help="architectures whose SAE forward is compiled: relu,topk"
    )
    args = p.parse_args()
    from drrik.model import resolve_model_source

    floor = measure_floor(
        model_dir=resolve_model_source(args.model),
        hook=args.hook,
        rounds=args.rounds,
        d_sae=args.d_sae,
        k=args.k,
        compile_archs=tuple(a for a in args.compile.split(",") if a),
    )
    floor["machine"] = machine_info("cpu")
    m = floor["machine"]
    md = "\n".join(
        [
            f"## floor: {args.model}, {args.hook}, cpu",
            "",
            f"Medians of {args.rounds} alternating rounds; forward batches of "
            f"{floor['store_batch_size_prompts']} x {floor['context_size']} tokens, SAE batch "
            f"{floor['train_batch_size_tokens']}, d_sae {floor['d_sae']}, k {floor['k']}.",
            "",
            *floors_table(floor),
            "",
            f"{m['date']}; {m['cpu']}, {m['cores']} cores, load average {m['load_average_1min']}"
            f"; torch {m['torch']}, transformers {m['transformers']}, transformer-lens "
            f"{m['transformer-lens']}.",
        ]
    )
    write_results("floor-cpu", floor, md)


if __name__ == "__main__":
    main()
