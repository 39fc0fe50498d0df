"""Does the activations store keep up with the model? Store tokens/s against the bare forward.

The store's job is to feed an SAE at the speed of the language model's forward pass to the
hooked layer; everything it adds (tokenizing, cutting contexts, the mixing buffer's copies and
shuffles, serving batches) should cost little. This script measures, at the same model batch:

  (a) the bare forward pass to the hooked layer: ``run_hooks`` on batches tokenized beforehand;
  (b) the store serving training batches (``next_batch``), tokens served per second;
  (c) the ratio b / a (the target is 0.9 or more).

Both run on one shared, noisy machine, so the measurements alternate within one run (A, B, then
B, A, ...) and the report gives medians. The first fill of the buffer (a warm-up with no mixing
yet) is timed and reported apart. ``exclude_special_tokens`` is off so that every forwarded
token is served and the counts compare like with like.

    python benchmarks/store_throughput.py            # SmolLM2, blocks.6.hook_resid_post, CPU
    python benchmarks/store_throughput.py --hook blocks.12.hook_resid_post --rounds 9
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import RESULTS, machine_info, write_results

import drrik.store
from drrik.config import DataConfig, StoreConfig
from drrik.data import ContextStream, load_source
from drrik.model import load_model, run_hooks
from drrik.store import ActivationsStore


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--dataset", default="drrik-offline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--prompts", type=int, default=16, help="store_batch_size_prompts")
    p.add_argument("--train-batch", type=int, default=4096, help="train_batch_size_tokens")
    p.add_argument("--n-batches-in-buffer", type=int, default=8)
    p.add_argument("--mix-fraction", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=7, help="alternating A/B measurements")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def timed(fn: Callable[[], None], device: str) -> float:
    """Wall seconds of ``fn``, with queued device work included."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the alternating rounds and return the result with the machine description."""
    hooks = [h.strip() for h in args.hook.split(",")]
    data_cfg = DataConfig(
        dataset=args.dataset, context_size=args.context_size, exclude_special_tokens=False
    )
    store_cfg = StoreConfig(
        train_batch_size_tokens=args.train_batch,
        n_batches_in_buffer=args.n_batches_in_buffer,
        store_batch_size_prompts=args.prompts,
        mix_fraction=args.mix_fraction,
    )
    model = load_model(args.model, device=args.device)
    dataset = load_source(data_cfg)

    # Per round, each side handles the tokens of one refill: (1 - mix) of the buffer.
    batch_tokens = args.prompts * args.context_size
    refill_tokens = int(store_cfg.buffer_tokens(args.context_size) * (1 - args.mix_fraction))
    served_per_round = refill_tokens // args.train_batch
    forwards_per_round = served_per_round * args.train_batch // batch_tokens
    assert forwards_per_round >= 1, "the buffer is too small for a measurable round"

    # (a) inputs: tokenized beforehand; the first contexts the store will read too.
    stream = ContextStream(dataset, model.tokenizer, data_cfg)
    pretokenized = [
        t.to(args.device)
        for t in itertools.islice(stream.batches(args.prompts), forwards_per_round)
    ]
    run_hooks(model, pretokenized[0], hooks)  # warm-up: allocator, kernels

    def forward_round() -> None:
        for tokens in pretokenized:
            run_hooks(model, tokens, hooks)

    # Time the forward passes inside the store too: the rest of a store round is the store's own
    # cost, a share that the machine's load cannot skew the way it skews separate rounds.
    in_store_forward = [0.0]

    def timed_run_hooks(*a: Any, **k: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        in_store_forward[0] += timed(lambda: out.update(run_hooks(*a, **k)), args.device)
        return out

    drrik.store.run_hooks = timed_run_hooks  # type: ignore[assignment]
    store = ActivationsStore(model, hooks, data_cfg, store_cfg, dataset=dataset)
    first_fill_s = timed(store.next_batch, args.device)
    first_fill_tokens = store.tokens_seen
    while store.buffer.batches_ready():  # serve the rest of the first fill
        store.next_batch()

    def store_round() -> None:
        for _ in range(served_per_round):
            store.next_batch()

    forward_tps: list[float] = []
    store_tps: list[float] = []
    overhead: list[float] = []
    for r in range(args.rounds):
        order = [("a", forward_round), ("b", store_round)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            in_store_forward[0] = 0.0
            seconds = timed(fn, args.device)
            if name == "a":
                forward_tps.append(forwards_per_round * batch_tokens / seconds)
            else:
                store_tps.append(served_per_round * args.train_batch / seconds)
                overhead.append(1 - in_store_forward[0] / seconds)
        print(
            f"round {r + 1}/{args.rounds}: forward {forward_tps[-1]:,.0f} tok/s, "
            f"store {store_tps[-1]:,.0f} tok/s ({overhead[-1]:.1%} outside the forward)",
            flush=True,
        )
    store.close()
    drrik.store.run_hooks = run_hooks  # type: ignore[assignment]

    a, b = statistics.median(forward_tps), statistics.median(store_tps)
    result = {
        "benchmark": "store_throughput",
        "model": args.model,
        "hooks": hooks,
        "dataset": args.dataset,
        "context_size": args.context_size,
        "store_batch_size_prompts": args.prompts,
        "train_batch_size_tokens": args.train_batch,
        "n_batches_in_buffer": args.n_batches_in_buffer,
        "mix_fraction": args.mix_fraction,
        "rounds": args.rounds,
        "tokens_per_round": forwards_per_round * batch_tokens,
        "forward_tokens_per_s": round(a, 1),
        "store_tokens_per_s": round(b, 1),
        "ratio_store_over_forward": round(b / a, 3),
        "ratio_per_round_median": round(
            statistics.median(s / f for s, f in zip(store_tps, forward_tps, strict=True)), 3
        ),
        "store_time_outside_forward_share_median": round(statistics.median(overhead), 4),
        "first_fill_forward_tokens_per_s": round(first_fill_tokens / first_fill_s, 1),
        "forward_tokens_per_s_rounds": [round(x, 1) for x in forward_tps],
        "store_tokens_per_s_rounds": [round(x, 1) for x in store_tps],
        "store_time_outside_forward_share_rounds": [round(x, 4) for x in overhead],
        "machine": machine_info(args.device),
    }
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = [
        ("(a) bare forward to the hooked layer", f"{result['forward_tokens_per_s']:,.0f}"),
        ("(b) store serving training batches", f"{result['store_tokens_per_s']:,.0f}"),
        ("(c) ratio b / a (target >= 0.9)", f"{result['ratio_store_over_forward']:.3f}"),
        (
            "store time outside the forward pass (median share)",
            f"{result['store_time_outside_forward_share_median']:.1%}",
        ),
        (
            "first fill (warm-up, forward tokens)",
            f"{result['first_fill_forward_tokens_per_s']:,.0f}",
        ),
    ]
    lines = [
        f"## store_throughput: {result['model']}, {', '.join(result['hooks'])}, {m['device']}",
        "",
        f"{result['store_batch_size_prompts']} x {result['context_size']} tokens per forward, "
        f"training batch {result['train_batch_size_tokens']}, buffer "
        f"{result['n_batches_in_buffer']} model batches, mix {result['mix_fraction']}; "
        f"medians of {result['rounds']} alternating rounds of {result['tokens_per_round']:,} "
        f"tokens (per-round ratio median {result['ratio_per_round_median']:.3f}).",
        "",
        "| measurement | tokens/s or share |",
        "|---|---:|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
        f"load average {m['load_average_1min']} at the end), "
        f"{m['platform']}, Python {m['python']}; torch {m['torch']}, transformers "
        f"{m['transformers']}, transformer-lens {m['transformer-lens']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    result = measure(args)
    md = markdown(result)
    write_results(f"store_throughput-{torch.device(args.device).type}", result, md, args.out)


if __name__ == "__main__":
    main()
