"""EleutherAI sparsify and drrik side by side: TopK SAEs on the same layer, contexts and budget.

Both tools train a TopK SAE with the same k and width (d_sae 4,608, 8x 576) on SmolLM2-135M's
residual stream after block 6 (sparsify's ``layers.6``, TransformerLens's
``blocks.6.hook_resid_post``), on the same contexts (compare_saelens.prepare_data: cut once by
drrik from its offline corpus, saved as a tokenized dataset, with a held-out split), the same
excluded special tokens, about the same token budget and the same seed. Everything else is each
tool's default (see benchmarks/README.md for the list). sparsify runs in its own virtual
environment (``--sparsify-python``, ``$DRRIK_SPARSIFY_PYTHON``, else ``.venv-sparsify``) through
sparsify_driver.py; drrik runs through compare_saelens's worker. Each training is its own
process, so peak memory is per run; the pairs run back to back, in alternating order when
repeated.

sparsify's saved SAE is converted to drrik's layout (a topk SAE with unit decoder rows: the
same pre-activations, TopK after ReLU and decoder) and checked against sparsify's own output on
held-out activations; then drrik's evaluator scores every SAE on the same held-out contexts with
the fp32 model: explained variance, L0, dead features, CE loss recovered.

    python benchmarks/compare_sparsify.py --tokens 250000 --ks 32,64
    python benchmarks/compare_sparsify.py --tokens 20000 --ks 32        # a quick look

Results: ``results/compare_sparsify-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from compare_saelens import (  # noqa: E402
    RunSpec,
    add_shared_args,
    evaluate_saes,
    peer_python,
    prepare_data,
    resolve_drrik_dtypes,
    run_worker,
    runs_versions,
)
from sparsify_driver import CHECK_FILE, SparsifySpec  # noqa: E402

SPARSIFY_DISTS = (
    "eai-sparsify",
    "torch",
    "transformers",
    "datasets",
    "safetensors",
    "schedulefree",
)


def to_drrik(sae_dir: Path, hook: str) -> Path:
    """sparsify's saved SAE as a drrik topk SAE (unit-row decoder, so its pre-activations rank
    as they are, as sparsify ranks them), written next to it; inputs are not normalized."""
    from safetensors.torch import load_file

    from drrik.sae import SAEConfig, build_sae

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    if cfg.get("activation") != "topk" or cfg.get("transcode") or cfg.get("skip_connection"):
        raise ValueError(f"{sae_dir}: not a plain TopK SAE ({cfg})")
    t = load_file(str(sae_dir / "sae.safetensors"))
    sae = build_sae(
        SAEConfig(
            architecture="topk",
            d_in=int(cfg["d_in"]),
            d_sae=t["W_dec"].shape[0],
            k=int(cfg["k"]),
            normalize_decoder=True,
        )
    )
    sae.load_saelens_tensors(
        {
            "W_enc": t["encoder.weight"].T,
            "b_enc": t["encoder.bias"],
            "W_dec": t["W_dec"],
            "b_dec": t["b_dec"],
        }
    )
    return sae.save(sae_dir.parent / (sae_dir.name + ".drrik"), metadata={"hook_name": hook})


def check_conversion(model: Any, drrik_dir: Path, check_file: Path, hook: str) -> dict[str, float]:
    """Relative errors: drrik's hook against the HF layer output sparsify trained on, and the
    converted SAE's reconstruction against sparsify's own, on the same held-out activations."""
    import torch
    from safetensors.torch import load_file

    from drrik.model import run_hooks
    from drrik.sae import load_sae

    check = load_file(str(check_file))
    x, out = check["x"], check["sae_out"]
    with torch.no_grad():
        ours = run_hooks(model, check["tokens"], [hook])[hook].flatten(0, 1).float()
        recon = load_sae(drrik_dir)(x)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return {"hook_rel_err": rel(ours, x), "sae_out_rel_err": rel(recon, out)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_args(p)  # sparsify's batch: --train-batch / --context-size whole contexts
    p.add_argument("--ks", default="32,64", help="TopK k values, comma-separated")
    p.add_argument("--drrik-lr", type=float, default=1e-3, help="drrik's default")
    p.add_argument(
        "--sparsify-bf16",
        action="store_true",
        help="also run sparsify with its model in bfloat16 (what its CLI picks on a bf16 GPU)",
    )
    p.add_argument("--sparsify-python", default=None)
    p.add_argument(
        "--reuse-runs",
        action="store_true",
        help="skip training: convert, check and evaluate the last runs saved in the work dir",
    )
    return p.parse_args(argv)


def build_specs(
    args: argparse.Namespace, model_dir: str, data_dir: Path, exclude: list[int]
) -> tuple[list[RunSpec], list[RunSpec]]:
    """The (sparsify, drrik) pair of each k, and the extras that run once."""
    shared = {
        "arch": "topk",
        "model_dir": model_dir,
        "data_dir": str(data_dir),
        "out_dir": "",
        "hook": args.hook,
        "context_size": args.context_size,
        "d_sae": args.d_sae,
        "seed": args.seed,
        "tokens": args.tokens,
        "train_batch": args.train_batch,
    }
    pairs: list[RunSpec] = []
    extras: list[RunSpec] = []
    for k in [int(v) for v in args.ks.split(",") if v.strip()]:
        sparsify = SparsifySpec(
            tool="sparsify", label=f"sparsify-k{k}", k=k, exclude_tokens=exclude, **shared
        )
        drrik = RunSpec(
            tool="drrik",
            label=f"drrik-k{k}",
            k=k,
            lr=args.drrik_lr,
            model_dtype=args.drrik_model_dtype,
            autocast=args.drrik_autocast,
            b_dec_init="geometric_median",  # drrik's defaults from here on
            normalize_decoder=None,
            dead_window_steps=0,
            **shared,
        )
        pairs += [sparsify, drrik]
        if args.sparsify_bf16:
            extras.append(replace(sparsify, label=f"sparsify-bf16-k{k}", model_dtype="bfloat16"))
    return pairs, extras


def train_all(
    args: argparse.Namespace, pairs: list[RunSpec], extras: list[RunSpec], python: str, work: Path
) -> dict[str, dict[str, Any]]:
    """Every run, back to back; repeats of the pairs alternate their order."""
    runs: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats):
        order = pairs + extras if rep == 0 else pairs[::-1] if rep % 2 else pairs
        for spec in order:
            label = spec.label if rep == 0 else f"{spec.label}.{rep}"
            run_spec = replace(spec, label=label, out_dir=str(work / "runs" / label))
            shutil.rmtree(run_spec.out_dir, ignore_errors=True)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            if spec.tool == "sparsify":
                result = run_worker(run_spec, python, work, HERE / "sparsify_driver.py")
            else:
                result = run_worker(run_spec, sys.executable, work)
            result["process_wall_s"] = time.perf_counter() - started
            result["load_average_1min_at_start"] = round(load, 2)
            if rep == 0:
                runs[spec.label] = {"spec": asdict(spec), **result, "repeats": []}
            runs[spec.label]["repeats"].append(
                (round(result["tokens_per_s"], 1), result["loop_cores_used"], round(load, 2))
            )
    for run in runs.values():
        # Other work only ever slows a run down: the fastest repeat is the tool's speed. The
        # first repeat's SAE is the one evaluated.
        run["tokens_per_s"], run["loop_cores_used"], _ = max(run["repeats"])
    return runs


def main() -> None:
    args = parse_args()
    from drrik.data import SpecialTokens
    from drrik.model import load_model, resolve_model_source
    from drrik.paths import cache_dir

    python = peer_python(
        args.sparsify_python, "sparsify", "DRRIK_SPARSIFY_PYTHON", ".venv-sparsify"
    )
    resolve_drrik_dtypes(args)
    work = args.work_dir or cache_dir() / "bench-sparsify"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_source("smollm2-135m")
    # Enough contexts for drrik's budget, mixing buffer and norm estimate, and BOS rows.
    n_train = int((args.tokens + 3 * 32768) / (args.context_size - 1) * 1.05) + 64
    data_dir = prepare_data(model_dir, args.context_size, n_train, args.eval_contexts, work)
    model = load_model(model_dir, dtype="float32")
    exclude = SpecialTokens.of(model.tokenizer).ids()
    saved = work / "last_runs.json"
    if args.reuse_runs:
        runs, load_before, load_after = json.loads(saved.read_text())
    else:
        pairs, extras = build_specs(args, model_dir, data_dir, exclude)
        load_before = os.getloadavg()
        runs = train_all(args, pairs, extras, python, work)
        load_after = os.getloadavg()
        saved.write_text(json.dumps([runs, load_before, load_after]))

    checks, dirs = {}, {}
    for label, run in runs.items():
        (path,) = map(Path, run["sae_dirs"].values())
        if run["spec"]["tool"] == "sparsify":
            converted = to_drrik(path, args.hook)
            checks[label] = check_conversion(model, converted, path / CHECK_FILE, args.hook)
            print(f"[{label}] conversion check: {checks[label]}", flush=True)
            path = converted
        dirs[label] = (args.hook, str(path))
    print("evaluating every SAE on the same held-out contexts ...", flush=True)
    metrics = evaluate_saes(model, data_dir, dirs)

    from machine import machine_info, machine_line, write_results

    result = {
        "benchmark": "compare_sparsify",
        "model": "smollm2-135m (embedded SmolLM2-135M-Instruct, dequantized)",
        "model_dir": model_dir,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "conversion_checks": checks,
        "summary": summary(runs),
        "eval": metrics,
        "runs": {
            label: {k: v for k, v in r.items() if k != "rss_timeline"} for label, r in runs.items()
        },
        "machine": machine_info("cpu"),
        "sparsify_env": runs_versions(python, SPARSIFY_DISTS),
    }
    write_results(
        "compare_sparsify-cpu", result, markdown(result, machine_line(result["machine"])), args.out
    )


def summary(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run: training tokens/s, end-to-end seconds, and drrik's ratio to sparsify at its k."""
    out: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        spec = run["spec"]
        row = {
            "tool": spec["tool"]
            + ("" if spec["model_dtype"] == "float32" or spec["tool"] == "drrik" else " (bf16 LM)"),
            "k": spec["k"],
            "training_tokens": run["training_tokens"],
            "tokens_per_s": round(run["tokens_per_s"], 1),
            "end_to_end_s": round(run["model_load_s"] + run["total_s_excl_model_load"], 1),
        }
        ref = runs.get(f"sparsify-k{spec['k']}")
        if ref is not None and spec["tool"] == "drrik":
            row["speedup_vs_sparsify"] = round(run["tokens_per_s"] / ref["tokens_per_s"], 2)
            row["end_to_end_ratio"] = round(
                (ref["model_load_s"] + ref["total_s_excl_model_load"]) / row["end_to_end_s"], 2
            )
        out[label] = row
    return out


def markdown(result: dict[str, Any], machine: str) -> str:
    s, env = result["settings"], result["sparsify_env"]
    head = (
        "| run | k | trained tokens | train tok/s | cores | drrik / sparsify | end-to-end s "
        "| load avg | EV | L0 | dead | CE rec. | peak RSS MiB loop / all |"
    )
    lines = [
        "## EleutherAI sparsify vs drrik: TopK, same layer, contexts, k, width, budget (CPU)",
        "",
        f"SmolLM2-135M, `{s['hook']}` (sparsify: `layers.6`), contexts of {s['context_size']} "
        f"tokens (BOS first, special tokens not trained on), d_sae {s['d_sae']}, batches of "
        f"{s['train_batch']} tokens (sparsify: {s['train_batch'] // s['context_size']} whole "
        f"contexts), about {s['tokens']:,} training tokens, seed {s['seed']}. Otherwise each "
        f"tool's defaults: drrik Adam lr {s['drrik_lr']}, LM in {s['drrik_model_dtype']}, SAE "
        f"step {'under bf16 autocast' if s['drrik_autocast'] else 'fp32'}; sparsify "
        "signum + schedule-free, its width-scaled lr, fp32 LM (full forward) and SAE.",
        "",
        "Train tok/s: activations trained on per second of the training loop (set-up, model "
        "load and final save excluded). End-to-end: the worker from model load to saved SAE "
        "(drrik's includes its own small final eval). Eval: drrik's evaluator, fp32 model, "
        f"{s['eval_contexts']} held-out contexts, the same for every SAE.",
        "",
        head,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in result["runs"].items():
        row, e = result["summary"][label], result["eval"][label]
        ratio = f"{row['speedup_vs_sparsify']:.2f}x" if "speedup_vs_sparsify" in row else ""
        cells = [
            label,
            str(row["k"]),
            f"{row['training_tokens']:,}",
            f"{row['tokens_per_s']:,.0f}",
            f"{run['loop_cores_used']:.2f}",
            ratio,
            f"{row['end_to_end_s']:.0f}",
            f"{run['load_average_1min_at_start']:.1f}",
            f"{e['explained_variance']:.3f}",
            f"{e['l0']:.1f}",
            str(e["dead_features"]),
            f"{e['ce_loss_recovered']:.3f}",
            f"{run['peak_rss_in_loop_mib']:,.0f} / {run['peak_rss_mib']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    checks = result["conversion_checks"]
    if checks:
        worst_hook = max(c["hook_rel_err"] for c in checks.values())
        worst_out = max(c["sae_out_rel_err"] for c in checks.values())
        lines += [
            "",
            f"Conversion check: drrik's `{s['hook']}` equals the HF `layers.6` output sparsify "
            f"trained on to {worst_hook:.1e} relative; the converted SAE reproduces sparsify's own "
            f"reconstruction to {worst_out:.1e} relative.",
        ]
    lines += [
        "",
        f"Load average (1, 5, 15 min) before the runs {result['load_average_before']}, after "
        f"{result['load_average_after']}.",
        "",
        machine,
        "sparsify env: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
