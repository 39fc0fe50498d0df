"""Generation speed and correctness: drrik's steering generation before and after issue 11.

Before, drrik generated with ``TransformerBridge.generate`` and its KV cache; with
transformer-lens 4.3 and transformers 5.24 that path returns garbage. It now drives Hugging
Face's own ``generate`` on the unwrapped model (``backend="hf"``), with a recomputing loop
through the hooked model as the fallback for hooks that have no HF module
(``backend="forward"``). This script times, on the same prompts and in one run (rounds
alternate, medians reported):

  - ``bridge_cached``: ``TransformerBridge.generate`` with its KV cache (the old path);
  - ``bridge_uncached``: the same with ``use_past_kv_cache=False``;
  - ``drrik_hf`` and ``drrik_forward``: ``drrik.generation.generate_tokens``'s two backends,
    unsteered and with a steering edit at the hook;
  - ``hf_reference``: transformers' own model and ``generate`` (eager attention, as the bridge).

Each row says whether its greedy tokens equal the reference's.

    python benchmarks/generation.py                     # float32 and bfloat16, CPU
    python benchmarks/generation.py --dtypes float32 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from machine import RESULTS, machine_info, write_results

from drrik.generation import generate_tokens
from drrik.model import embedded_gguf_path, gguf_to_hf_dir, load_model
from drrik.sae import SAEConfig, build_sae
from drrik.steering import SAESteering

PROMPTS = [
    "My favourite thing to do on a sunny Sunday is",
    "def add(a, b):\n    return",
    "The capital of France is a city that",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per row")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def candidates(
    model: Any, reference: Any, steering: SAESteering, hook: str, new: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each way to make ``new`` greedy tokens per prompt, returning only the new tokens."""
    tokens, mask = steering._encode(PROMPTS)
    ids = dict(eos_token_id=steering.special.eos, pad_token_id=steering._pad)
    edit = steering._edit(torch.tensor([0]), torch.full((len(PROMPTS), 1), 4.0), "add")

    def bridge(cache: bool) -> torch.Tensor:
        out = model.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            use_past_kv_cache=cache,
            verbose=False,
            return_type="tokens",
        )
        return out[:, tokens.shape[1] :]

    def drrik(backend: str, steered: bool) -> torch.Tensor:
        extra = dict(hook=hook, edit=edit) if steered else {}
        return generate_tokens(model, tokens, mask, new, backend=backend, **ids, **extra)

    def hf() -> torch.Tensor:
        out = reference.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=new, do_sample=False, **ids
        )
        return out[:, tokens.shape[1] :]

    return {
        "hf_reference": hf,
        "bridge_cached": lambda: bridge(True),
        "bridge_uncached": lambda: bridge(False),
        "drrik_hf": lambda: drrik("hf", False),
        "drrik_hf_steered": lambda: drrik("hf", True),
        "drrik_forward": lambda: drrik("forward", False),
        "drrik_forward_steered": lambda: drrik("forward", True),
    }


def run_dtype(dtype: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2-135m", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_to_hf_dir(embedded_gguf_path()),
        dtype=getattr(torch, dtype),
        attn_implementation="eager",
    ).eval()
    sae = build_sae(SAEConfig(architecture="relu", d_in=model.cfg.d_model, d_sae=64))
    steering = SAESteering(model, sae, args.hook)
    fns = candidates(model, reference, steering, args.hook, args.new_tokens)
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            with torch.no_grad():
                seconds, outputs[name] = timed(fns[name])
            times[name].append(seconds)
    expected = outputs["hf_reference"]
    rows = []
    for name, secs in times.items():
        got = outputs[name]
        median = statistics.median(secs)
        same = got.shape == expected.shape and bool(torch.equal(got, expected))
        rows.append(
            {
                "dtype": dtype,
                "path": name,
                "seconds_median": round(median, 3),
                "new_tokens_per_s": round(got.numel() / median, 1),
                "equals_hf_greedy": same if "steered" not in name else None,
                "first_prompt_text": steering.tokenizer.decode(got[0], skip_special_tokens=True),
            }
        )
    return rows


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    rows = [row for dtype in args.dtypes.split(",") for row in run_dtype(dtype, args)]
    result = {
        "machine": machine_info("cpu"),
        "prompts": PROMPTS,
        "new_tokens": args.new_tokens,
        "hook": args.hook,
        "rounds": args.rounds,
        "rows": rows,
    }
    lines = [
        f"Generation, {len(PROMPTS)} prompts x {args.new_tokens} new tokens, greedy, "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"transformers {result['machine']['transformers']}, "
        f"transformer-lens {result['machine']['transformer-lens']}, "
        f"median of {args.rounds}",
        "",
        "| dtype | path | s | new tokens/s | equals HF greedy | first prompt's continuation |",
        "|---|---|---:|---:|---|---|",
    ]
    for r in rows:
        same = {True: "yes", False: "**no**", None: "(steered)"}[r["equals_hf_greedy"]]
        text = r["first_prompt_text"].replace("\n", "\\n").replace("|", "\\|")
        lines.append(
            f"| {r['dtype']} | {r['path']} | {r['seconds_median']} | {r['new_tokens_per_s']} "
            f"| {same} | `{text}` |"
        )
    write_results("generation-cpu", result, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
