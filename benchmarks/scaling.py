"""Scaling without downloads: forward and SAE-step throughput at real model shapes, and memory.

Throughput does not depend on the weights, so each family is a randomly initialized model built
from its published shape (written out below; nothing is fetched), saved to a temporary directory
with the embedded SmolLM2 tokenizer and loaded through ``drrik.model.load_model`` as a local
directory is. On a CPU the larger models are timed over their first ``--layers`` blocks: the
forward to the first and the last of them (``run_hooks``, which stops after the hooked block as
the store does), whose difference gives the cost of one block, from which the forward to the
full model's middle layer is computed. A family small enough is timed to its middle layer
directly. Each model is built one block deeper than its last timed hook: at a model's final
block the bridge's forward does not stop, and would add the unembedding.

The SAE step is drrik's TopK (default CPU sparse path, k 32, fp32, Adam) timed as ``floor.py``
times it, at each width that fits in memory, at batch 1024 and a smaller batch: the two batches
separate the per-token cost (the encoder matmul) from the per-parameter cost (Adam, gradient
clipping, decoder renormalization), which a single batch size cannot. A two-term model is
fitted to the steps, and a one-constant FLOP model to the forwards; both are printed with their
predictions against every measured point. Memory is measured (peak RSS) for what ran and
computed for every (model, width, devices) combination.

    python benchmarks/scaling.py                  # writes results/scaling-cpu.{json,md}
    python benchmarks/scaling.py --layers 2 --widths 16384 --rounds 2 --stem scaling-smoke
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from floor import alternate, forward_fn, sae_step_fn, serial_floor  # noqa: E402
from machine import machine_info, machine_line, write_results  # noqa: E402

from drrik.model import embedded_gguf_path, gguf_to_hf_dir, load_model  # noqa: E402
from drrik.sae import SAEConfig, build_sae  # noqa: E402

CONTEXT = 128  # drrik's default context_size
BUFFER_TOKENS = 16 * 16 * CONTEXT  # drrik's default mixing buffer: 16 batches of 16 contexts
TRAIN_BATCH = 1024  # drrik's default train_batch_size_tokens
GIB = 2**30


@dataclass(frozen=True)
class Family:
    """A transformer's shape: all that throughput and memory depend on."""

    config: str  # "llama" or "gemma2": which transformers config class builds it
    d_model: int
    d_mlp: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def layer_params(self) -> int:
        """Weights of one block: attention projections, gated MLP, and its norms."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        norms = (4 if self.config == "gemma2" else 2) * self.d_model
        return attn + 3 * self.d_model * self.d_mlp + norms

    def params(self) -> int:
        """Weights of the whole model, embeddings (and an untied unembedding) included."""
        embed = self.vocab * self.d_model * (1 if self.tied else 2)
        return embed + self.n_layers * self.layer_params() + self.d_model

    def layer_flops(self) -> float:
        """Forward FLOPs per token of one block: 2 per weight plus attention's two products
        over the full context (the implementation computes the masked square)."""
        return 2 * self.layer_params() + 4 * CONTEXT * self.n_heads * self.head_dim

    def middle_layer(self) -> int:
        """The block whose ``hook_resid_post`` an SAE is trained on here."""
        return self.n_layers // 2

    def hf_config(self, n_layers: int, vocab: int) -> Any:
        """A transformers config of this shape, cut to ``n_layers`` blocks and ``vocab`` rows."""
        from transformers import Gemma2Config, LlamaConfig

        cls = Gemma2Config if self.config == "gemma2" else LlamaConfig
        return cls(
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            vocab_size=vocab,
            tie_word_embeddings=self.tied,
        )


FAMILIES = {
    # meta-llama/Llama-3.2-1B config.json
    "Llama-3.2-1B": Family("llama", 2048, 8192, 16, 32, 8, 64, 128256, True),
    # google/gemma-2-2b config.json
    "Gemma-2-2B": Family("gemma2", 2304, 9216, 26, 8, 4, 256, 256000, True),
    # meta-llama/Meta-Llama-3-8B config.json
    "Llama-3-8B": Family("llama", 4096, 14336, 32, 32, 8, 128, 128256, False),
    # HuggingFaceTB/SmolLM2-135M config.json: drrik's embedded model, small enough to measure
    # at its middle layer directly, a check on the extrapolation of the others
    "SmolLM2-135M": Family("llama", 576, 1536, 30, 9, 3, 64, 49152, True),
}


def rss_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Reset the peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes("VmRSS")


def available_bytes() -> int:
    """Memory the kernel could hand out now (others' processes on a shared machine count)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(v) for name, v in runs.items()}


def measure_forward(name: str, fam: Family, layers: int, prompts: int, rounds: int) -> dict:
    """Tokens/s to the first and the last timed block (and the peak RSS of load and forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_to_hf_dir(embedded_gguf_path()))
    vocab = min(fam.vocab, len(tokenizer))
    # Timed up to the middle layer where that is small, else over the first ``layers`` blocks.
    # One block more is built: at the model's last block the bridge does not stop, and the
    # forward would include the final norm and the unembedding.
    small = (fam.middle_layer() + 1) * fam.layer_params() < 0.2e9
    timed = fam.middle_layer() + 1 if small else min(layers, fam.n_layers - 1)
    built = timed + 1
    base = reset_peak()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="drrik-scaling-") as tmp:
        random_lm = AutoModelForCausalLM.from_config(fam.hf_config(built, vocab))
        random_lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del random_lm
        gc.collect()
        model = load_model(tmp, dtype="float32")
    hooks = {f"blocks.{i}.hook_resid_post": i for i in (0, timed - 1)}
    tokens = torch.randint(0, vocab, (prompts, CONTEXT), generator=torch.Generator().manual_seed(0))
    fns = {hook: forward_fn(model, [hook], [tokens]) for hook in hooks}
    runs = alternate(fns, {hook: tokens.numel() for hook in hooks}, rounds)
    peak = rss_bytes("VmHWM") - base
    del model, fns
    gc.collect()
    return {
        **forward_result(name, built, vocab, tokens.numel(), hooks, runs),
        "peak_rss_gib": peak / GIB,
    }


def forward_result(
    name: str,
    built: int,
    vocab: int,
    tokens_per_batch: int,
    hooks: dict[str, int],
    runs: dict[str, list[float]],
) -> dict[str, Any]:
    """A family's forward timings: tokens/s to each hook (``hooks``: hook -> block index)."""
    return {
        "family": name,
        "layers_built": built,
        "vocab_built": vocab,
        "tokens_per_batch": tokens_per_batch,
        "points": [
            {"hook": hook, "blocks_run": i + 1, "tokens_per_s": statistics.median(runs[hook])}
            for hook, i in hooks.items()
        ],
        "tokens_per_s_rounds": runs,
    }


def sae_params(d_model: int, d_sae: int) -> int:
    """W_enc, W_dec, b_enc, b_dec."""
    return 2 * d_model * d_sae + d_sae + d_model


def step_bytes_estimate(d_model: int, d_sae: int, batch: int) -> int:
    """What a step needs: 16 bytes a parameter (weights, gradients, two Adam moments), the
    ``batch x d_sae`` pre-activations, and a second copy of a weight for transient products."""
    p = sae_params(d_model, d_sae)
    return 16 * p + 4 * batch * d_sae + 4 * d_model * d_sae


def measure_step(d_model: int, d_sae: int, k: int, batches: list[int], rounds: int) -> dict:
    """Tokens/s of drrik's TopK training step per batch size (largest first), and peak RSS."""
    base = reset_peak()
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=d_model, d_sae=d_sae, k=k)).train()
    x = torch.randn(max(batches), d_model)
    x = x * (d_model**0.5 / x.norm(dim=1).mean())  # training scales inputs to norm sqrt(d)
    out: dict[str, Any] = {"d_model": d_model, "d_sae": d_sae, "k": k, "points": []}
    for batch in sorted(batches, reverse=True):
        name = f"step d {d_model} w {d_sae} batch {batch}"
        fn = sae_step_fn(sae, x[:batch], autocast=False, dead_window=10**12)
        runs = alternate({name: fn}, {name: batch}, rounds)
        out["points"].append(
            {"batch": batch, "tokens_per_s": statistics.median(runs[name]), "rounds": runs[name]}
        )
        if batch == max(batches):  # the training batch: Adam state and its work included
            out["peak_rss_gib"] = (rss_bytes("VmHWM") - base) / GIB
        del fn
        gc.collect()
    del sae
    gc.collect()
    return out


def least_squares(rows: list[list[float]], y: list[float]) -> list[float]:
    """Coefficients c minimizing the relative error of ``rows @ c`` against ``y``."""
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    weights = 1.0 / b  # each point counts by its relative error
    sol = torch.linalg.lstsq(a * weights[:, None], b * weights).solution
    return sol.tolist()


def dot(coefficients: list[float] | tuple[float, ...], terms: list[float]) -> float:
    """A linear model's prediction."""
    return sum(c * t for c, t in zip(coefficients, terms, strict=True))


def step_terms(d_model: int, d_sae: int, batch: int) -> list[float]:
    """The step model's terms: per token x weight (the dense encoder matmul; the sparse path's
    decode and backward cost ~k x d_model a token, under 1% of it at k 32) and per weight
    (Adam and the other passes over the parameters, whatever the batch)."""
    return [batch * d_model * d_sae, 2 * d_model * d_sae]


def forward_terms(fam: Family, blocks: int) -> list[float]:
    """The forward model's terms, per token: a fixed cost, and the FLOPs through ``blocks``."""
    return [1.0, blocks * fam.layer_flops()]


def fit(forwards: list[dict], steps: list[dict]) -> dict[str, Any]:
    """Fit both models (seconds per batch or token) and pair each measurement with its
    prediction."""
    f_rows, f_y, f_keys = [], [], []
    for f in forwards:
        fam = FAMILIES[f["family"]]
        for p in f["points"]:
            f_rows.append(forward_terms(fam, p["blocks_run"]))
            f_y.append(1.0 / p["tokens_per_s"])
            f_keys.append(f"forward {f['family']} to {p['hook']} ({p['blocks_run']} blocks)")
    s_rows, s_y, s_keys = [], [], []
    for s in steps:
        for p in s["points"]:
            s_rows.append(step_terms(s["d_model"], s["d_sae"], p["batch"]))
            s_y.append(p["batch"] / p["tokens_per_s"])
            s_keys.append(f"step d_model {s['d_model']}, d_sae {s['d_sae']}, batch {p['batch']}")
    fc = least_squares(f_rows, f_y)
    sc = least_squares(s_rows, s_y)
    checks = []
    for keys, rows, y, c in ((f_keys, f_rows, f_y, fc), (s_keys, s_rows, s_y, sc)):
        for key, row, t in zip(keys, rows, y, strict=True):
            predicted = dot(c, row)
            checks.append({"point": key, "measured_s": t, "predicted_s": predicted})
    return {
        "forward_fixed_s_per_token": fc[0],
        "forward_flops_per_s": 1.0 / fc[1],
        "step_flops_per_s": 2.0 / sc[0],  # the encoder's 2 FLOPs per multiply-add
        "step_s_per_param": sc[1],
        "checks": checks,
    }


def predict_forward_s(constants: dict, fam: Family, blocks: int) -> float:
    """Seconds per token of the forward through ``blocks`` blocks."""
    fixed, flops = constants["forward_fixed_s_per_token"], constants["forward_flops_per_s"]
    return dot((fixed, 1.0 / flops), forward_terms(fam, blocks))


def predict_step_s(constants: dict, d_model: int, d_sae: int, batch: int) -> float:
    """Seconds per step of ``batch`` tokens."""
    c = (2.0 / constants["step_flops_per_s"], constants["step_s_per_param"])
    return dot(c, step_terms(d_model, d_sae, batch))


def memory_rows(widths: list[int], devices: list[int]) -> list[dict]:
    """Per-device GiB for each (model, width, devices, layout), computed.

    Data parallel: every device holds the whole SAE, its gradients and Adam state, and
    ``TRAIN_BATCH / n`` tokens of pre-activations. Feature parallel: each device holds
    ``d_sae / n`` latents (their encoder columns and decoder rows, gradients, Adam state) and the
    pre-activations of the whole batch for its latents. Each device keeps its own buffer
    (fp32, drrik's default size) and a bf16 copy of the language model.
    """
    rows = []
    for name, fam in FAMILIES.items():
        for width in widths:
            for n in devices:
                for layout in ("data", "feature") if n > 1 else ("single",):
                    latents = width // n if layout == "feature" else width
                    batch = TRAIN_BATCH // n if layout == "data" else TRAIN_BATCH
                    p = sae_params(fam.d_model, latents)
                    sae = {
                        "params": 4 * p,
                        "grads": 4 * p,
                        "adam": 8 * p,
                        "pre_acts": 4 * batch * latents,
                        "buffer": 4 * BUFFER_TOKENS * fam.d_model,
                    }
                    rows.append(
                        {
                            "family": name,
                            "d_sae": width,
                            "devices": n,
                            "layout": layout,
                            **{key: v / GIB for key, v in sae.items()},
                            "sae_side": sum(sae.values()) / GIB,
                            "lm_bf16": 2 * fam.params() / GIB,
                        }
                    )
    return rows


def width_label(width: int) -> str:
    """16k, 65k, 262k, 1M: the names these widths go by."""
    return f"{width // 1000}k" if width < 2**20 else f"{width // 2**20}M"


def markdown(result: dict[str, Any]) -> str:
    """The tables of the README section."""
    c = result["model"]
    lines = [
        "## scaling: forward and SAE-step throughput at real model shapes, cpu",
        "",
        f"Random weights; forward batches of {result['prompts']} x {CONTEXT} tokens, fp32; "
        f"TopK SAE k {result['k']}, fp32, Adam; medians of {result['rounds']} rounds.",
        "",
        "| measured forward | blocks built | to hook | tokens/s | peak RSS GiB |",
        "|---|---:|---|---:|---:|",
    ]
    for f in result["forwards"]:
        for p in f["points"]:
            lines.append(
                f"| {f['family']} | {f['layers_built']} | {p['hook']} | "
                f"{p['tokens_per_s']:,.1f} | {f['peak_rss_gib']:.1f} |"
            )
    lines += [
        "",
        "| measured SAE step | d_model | d_sae | batch | tokens/s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["steps"]:
        for p in s["points"]:
            peak = f"{s['peak_rss_gib']:.1f}" if p is s["points"][0] else ""
            lines.append(
                f"| TopK | {s['d_model']} | {width_label(s['d_sae'])} | {p['batch']} | "
                f"{p['tokens_per_s']:,.0f} | {peak} |"
            )
    lines += [
        "",
        f"Fitted: forward {c['forward_flops_per_s'] / 1e9:.1f} GFLOP/s achieved plus "
        f"{c['forward_fixed_s_per_token'] * 1e3:.3f} ms a token; step encoder "
        f"{c['step_flops_per_s'] / 1e9:.1f} GFLOP/s plus {c['step_s_per_param'] * 1e9:.2f} ns "
        "a parameter a step.",
        "",
        "| point | measured s | predicted s | predicted / measured |",
        "|---|---:|---:|---:|",
    ]
    for ch in c["checks"]:
        ratio = ch["predicted_s"] / ch["measured_s"]
        lines.append(
            f"| {ch['point']} | {ch['measured_s']:.4g} | {ch['predicted_s']:.4g} | {ratio:.2f} |"
        )
    lines += [
        "",
        "Full depth (the middle layer's hook), the largest batch: forward from the measured "
        "per-block cost (SmolLM2: measured there), step measured where it ran, else predicted "
        "(*).",
        "",
        "| model | hook | forward tok/s | d_sae | step tok/s | serial floor tok/s "
        "| step's share of the time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["full_depth"]:
        star = "" if row["step_measured"] else "*"
        lines.append(
            f"| {row['family']} | {row['hook']} | {row['forward_tokens_per_s']:,.0f} | "
            f"{width_label(row['d_sae'])} | {row['step_tokens_per_s']:,.0f}{star} | "
            f"{row['serial_floor_tokens_per_s']:,.0f} | {row['step_share']:.0%} |"
        )
    lines += [
        "",
        "Memory per device, computed (GiB): SAE parameters, gradients, Adam (16 bytes a "
        f"parameter), pre-activations ({TRAIN_BATCH} tokens x latents, fp32, split by devices "
        f"under data parallelism), the default buffer ({BUFFER_TOKENS:,} tokens x d_model "
        "fp32); the language model (all of it, bf16) apart.",
        "",
        "| model | d_sae | devices | layout | params | grads | Adam | pre-acts | buffer "
        "| SAE side | LM bf16 |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["memory"]:
        lines.append(
            f"| {r['family']} | {width_label(r['d_sae'])} | {r['devices']} | {r['layout']} | "
            + " | ".join(
                f"{r[key]:.2f}"
                for key in ("params", "grads", "adam", "pre_acts", "buffer", "sae_side", "lm_bf16")
            )
            + " |"
        )
    lines += ["", machine_line(result["machine"])]
    return "\n".join(lines)


def full_depth(
    forwards: list[dict], steps: list[dict], widths: list[int], batch: int, c: dict
) -> list[dict]:
    """Forward to each family's middle layer, step at each width (``batch`` tokens), and
    their serial floor (one forward token per training token)."""
    measured = {(s["d_model"], s["d_sae"]): s for s in steps}
    rows = []
    for f in forwards:
        fam = FAMILIES[f["family"]]
        first, last = (1.0 / p["tokens_per_s"] for p in f["points"])
        n_first, n_last = (p["blocks_run"] for p in f["points"])
        per_block = (last - first) / (n_last - n_first)
        blocks = fam.middle_layer() + 1
        fwd_s = last + (blocks - n_last) * per_block  # zero extrapolation when built there
        for width in widths:
            s = measured.get((fam.d_model, width))
            if s is not None:
                step_tok_s = next(p for p in s["points"] if p["batch"] == batch)["tokens_per_s"]
            else:
                step_tok_s = batch / predict_step_s(c, fam.d_model, width, batch)
            floor = serial_floor(1.0 / fwd_s, step_tok_s)
            rows.append(
                {
                    "family": f["family"],
                    "hook": f"blocks.{fam.middle_layer()}.hook_resid_post",
                    "forward_tokens_per_s": 1.0 / fwd_s,
                    "forward_extrapolated_blocks": blocks - n_last,
                    "d_sae": width,
                    "step_tokens_per_s": step_tok_s,
                    "step_measured": s is not None,
                    "serial_floor_tokens_per_s": floor,
                    "step_share": floor / step_tok_s,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--layers", type=int, default=3, help="blocks built for the larger models")
    p.add_argument("--prompts", type=int, default=4, help="contexts per forward batch")
    p.add_argument("--widths", default="16384,65536,262144")
    p.add_argument("--memory-widths", default="16384,65536,262144,1048576")
    p.add_argument("--batches", default=f"256,{TRAIN_BATCH}")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="run a step only if its estimate fits in this share of the available memory",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--stem", default="scaling-cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.families.split(",")
    widths = [int(w) for w in args.widths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    forwards = [
        measure_forward(n, FAMILIES[n], args.layers, args.prompts, args.rounds) for n in names
    ]
    steps, skipped = [], []
    for d_model in sorted({FAMILIES[n].d_model for n in names}):
        for width in widths:
            need = step_bytes_estimate(d_model, width, max(batches))
            if need > args.memory_fraction * available_bytes():
                skipped.append({"d_model": d_model, "d_sae": width, "estimate_gib": need / GIB})
                print(f"skip d_model {d_model} d_sae {width}: ~{need / GIB:.1f} GiB", flush=True)
                continue
            steps.append(measure_step(d_model, width, args.k, batches, args.rounds))
    constants = fit(forwards, steps)
    result = {
        "families": {n: asdict(FAMILIES[n]) for n in names},
        "prompts": args.prompts,
        "k": args.k,
        "rounds": args.rounds,
        "forwards": forwards,
        "steps": steps,
        "steps_not_run": skipped,
        "model": constants,
        "full_depth": full_depth(forwards, steps, widths, max(batches), constants),
        "memory": memory_rows([int(w) for w in args.memory_widths.split(",")], [1, 8]),
        "machine": machine_info("cpu"),
    }
    write_results(args.stem, result, markdown(result))


if __name__ == "__main__":
    main()
