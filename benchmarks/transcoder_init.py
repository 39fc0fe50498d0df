"""How a TopK transcoder's start shapes its error: decoder rows held at unit norm or left free.

The model's MLP input and output at one layer are cached once (SmolLM2-135M, offline data,
scaled to norm sqrt(d) as training scales them); then each variant trains from the same seed
on the same batches (60 steps of 4,096 tokens, Adam 1e-3, no dead-feature terms) and its FVU
on 8,192 later tokens is read along the way. Variants:

- ``unit``: unit decoder rows, the encoder started as the decoder's transpose;
- ``free``: free rows started at norm 0.1, TopK ranking by each feature's contribution;
- ``unit+skip``, ``free+skip``: the same with a trained skip connection;
- ``+center``: the input minus its mean (a fixed input center, which folds into ``b_enc``);
- ``+b_enc``: ``b_enc`` started at ``-mean @ W_enc``, so only the start is centered;
- ``sae``: an SAE on the MLP output itself (unit rows), for scale.

Besides FVU it counts the features that never fire on the held-out tokens.

    python benchmarks/transcoder_init.py --layer 6          # results/transcoder_init-cpu-6.*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, write_results  # noqa: E402

from drrik.config import DataConfig  # noqa: E402
from drrik.data import ContextStream, load_source  # noqa: E402
from drrik.model import load_model, resolve_dtype, run_hooks  # noqa: E402
from drrik.sae import SAE, SAEConfig, build_sae  # noqa: E402

BATCH = 4096
VARIANTS = {  # name: (free rows, skip connection, SAE on the output, input center)
    "unit": (False, False, False, ""),
    "free": (True, False, False, ""),
    "free+center": (True, False, False, "fixed"),
    "free+b_enc": (True, False, False, "b_enc"),
    "unit+skip": (False, True, False, ""),
    "free+skip": (True, True, False, ""),
    "free+skip+center": (True, True, False, "fixed"),
    "free+skip+b_enc": (True, True, False, "b_enc"),
    "sae": (False, False, True, ""),
}
CHECKPOINTS = (5, 15, 30, 60)


def cached(layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input and output activations of ``n`` tokens (BOS dropped), each scaled to norm
    sqrt(d) on average."""
    hooks = [f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"]
    model = load_model("smollm2-135m", dtype=resolve_dtype("auto", "cpu"))
    cfg = DataConfig(context_size=128)
    stream = ContextStream(load_source(cfg), model.tokenizer, cfg)
    parts: list[list[torch.Tensor]] = [[], []]
    got = 0
    for tokens in stream.batches(16):
        acts = run_hooks(model, tokens, hooks)
        for part, hook in zip(parts, hooks, strict=True):
            part.append(acts[hook][:, 1:].reshape(-1, acts[hook].shape[-1]).float())
        got += parts[0][-1].shape[0]
        if got >= n:
            break
    x, y = (torch.cat(p)[:n] for p in parts)
    return tuple(t * (t.shape[1] ** 0.5 / t.norm(dim=1).mean()) for t in (x, y))  # type: ignore[return-value]


@torch.no_grad()
def fvu_and_dead(sae: SAE, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Held-out FVU, and the features that fire on none of ``x``."""
    out = sae(x)
    dead = int((sae.encode(x) > 0).sum(0).eq(0).sum())
    return float((y - out).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), dead


def train(
    variant: str, x: torch.Tensor, y: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], k: int
) -> list[tuple[int, float, int]]:
    """(step, FVU on ``test``, dead features) after each of CHECKPOINTS steps of a variant."""
    free, skip, on_output, center = VARIANTS[variant]
    torch.manual_seed(0)
    cfg = SAEConfig(
        architecture="topk",
        k=k,
        d_in=x.shape[1],
        d_out=y.shape[1],
        d_sae=8 * x.shape[1],
        skip_connection=skip,
        apply_b_dec_to_input=on_output,
        normalize_decoder=False if free else None,
    )
    sae = build_sae(cfg).train()
    inputs, test_in = (y, test[1]) if on_output else (x, test[0])
    mean = inputs.mean(0)
    if center == "fixed":
        inputs, test_in = inputs - mean, test_in - mean
    elif center == "b_enc":
        with torch.no_grad():
            sae.b_enc.copy_(-(mean @ sae.W_enc))
    with torch.no_grad():
        sae.b_dec.copy_(y.median(0).values)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    curve = []
    for step in range(1, CHECKPOINTS[-1] + 1):
        rows = slice((step - 1) * BATCH, step * BATCH)
        out = sae.fit_forward(inputs[rows], 0.0, None, None if on_output else y[rows])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder_rows()
        if step in CHECKPOINTS:
            error, dead = fvu_and_dead(sae, test_in, test[1])
            curve.append((step, round(error, 4), dead))
            print(f"{variant} step {step}: FVU {error:.4f}, {dead} dead", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    n_train, n_test = CHECKPOINTS[-1] * BATCH, 8192
    x, y = cached(args.layer, n_train + n_test)
    test = (x[n_train:], y[n_train:])
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    x, y = x[:n_train][order], y[:n_train][order]
    curves = {v: train(v, x, y, test, args.k) for v in args.variants}
    result = {"machine": machine_info("cpu"), "layer": args.layer, "k": args.k, "fvu": curves}
    write_results(f"transcoder_init-cpu-{args.layer}", result, table(result))


def table(r: dict[str, Any]) -> str:
    lines = [
        f"## TopK transcoder start, SmolLM2-135M layer {r['layer']}, k {r['k']}, 8x width",
        "",
        "Held-out FVU against the MLP output after N steps of 4,096 tokens (features that fire"
        " on none of the 8,192 held-out tokens).",
        "",
        "| variant | " + " | ".join(f"step {s}" for s in CHECKPOINTS) + " |",
        "|---|" + "---:|" * len(CHECKPOINTS),
    ]
    for variant, curve in r["fvu"].items():
        cells = " | ".join(f"{v:.3f} ({dead})" for _, v, dead in curve)
        lines.append(f"| {variant} | {cells} |")
    m = r["machine"]
    lines += ["", f"{m['date']}; {m['cpu']}, {m['cores']} cores, torch {m['torch']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
