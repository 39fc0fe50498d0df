"""drrik and SAELens on the quality/sparsity frontier: explained variance and CE loss recovered
against held-out L0, for ReLU (L1) and TopK SAEs, in one command.

Everything compare_saelens.py matches is matched here too, through its own code (``RunSpec``,
``run_worker``, ``prepare_data``, ``evaluate_saes``): the embedded SmolLM2-135M, hook, contexts
(pretokenized once), SAE width, batch, buffer, budget, lr, seed, input normalization, b_dec
start. Per architecture it trains

- SAELens: one run per setting (its runner trains one SAE): ``--l1-values`` for relu (its
  "standard" SAE, decoder-norm-weighted L1), ``--ks`` for topk;
- drrik: one run per family, every setting from one stream (``--sweep``): relu at the same
  L1 values, relu at ``--target-l0s`` (the L0 controller, started from ``--target-start-l1``),
  topk at the same ks; LM dtype and SAE-step autocast as ``drrik train`` picks them (bf16 where
  native, float32 elsewhere) unless ``--drrik-model-dtype`` / ``--drrik-autocast`` say.

Every SAE is then evaluated by drrik's evaluator on the same held-out contexts (fp32 model), and
both metrics are drawn against the held-out L0, one panel each (``results/frontier-cpu.png``).
drrik's curve is read at each SAELens point (interpolated in log L0 between drrik's points of
the same architecture) to say where it lies above or below.

    python benchmarks/frontier.py --saelens-python /work/venv-saelens/bin/python
    python benchmarks/frontier.py --probe-l1 15,30,60,120,240   # drrik only: L0 of each L1

``--probe-l1`` trains one drrik relu sweep over those L1 values (no SAELens, no plot) and
writes ``results/frontier-probe-cpu.{json,md}``: how the L1 values were chosen. drrik and
SAELens share the L1 loss, so drrik's held-out L0 at an L1 value predicts SAELens's.

Results: ``results/frontier-cpu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_saelens import (  # noqa: E402
    RunSpec,
    add_drrik_dtype_args,
    base_spec,
    evaluate_saes,
    resolve_drrik_dtypes,
    run_worker,
    runs_versions,
    saelens_python,
)
from machine import machine_info, machine_line, write_results  # noqa: E402

METRICS = (("explained_variance", "explained variance"), ("ce_loss_recovered", "CE loss recovered"))


def values(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=250_000, help="training tokens per run")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--archs", default="relu,topk", help="the architectures to train")
    p.add_argument("--ks", default="16,32,64", help="topk settings, both tools")
    p.add_argument("--l1-values", default="30,60,120", help="relu L1 coefficients, both tools")
    p.add_argument("--target-l0s", default="16,32,64", help="drrik relu --target-l0 settings")
    p.add_argument("--target-start-l1", type=float, default=60.0, help="the controller's start")
    p.add_argument("--eval-contexts", type=int, default=64)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N contexts")
    add_drrik_dtype_args(p)
    p.add_argument("--probe-l1", default="", help="only probe: drrik relu L0 at these L1 values")
    p.add_argument("--skip-saelens", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once, each its own process")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    p.add_argument("--reuse", action="store_true", help="read back finished runs of equal specs")
    p.add_argument("--drrik-l1-values", default="", help="drrik relu L1 values (--l1-values)")
    p.add_argument("--saelens-ks", default="", help="SAELens topk settings (--ks)")
    p.add_argument("--saelens-python", default=None)
    p.add_argument("--work-dir", type=Path, default=None, help="data, runs and logs")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def plan(args: argparse.Namespace, base: RunSpec) -> list[tuple[str, RunSpec]]:
    """(family, spec) of every training run: a family is one curve of the plot."""
    drrik = {"model_dtype": args.drrik_model_dtype, "autocast": args.drrik_autocast}
    if args.probe_l1:
        spec = replace(base, label="drrik-relu-l1", sweep=f"l1_coefficient={args.probe_l1}")
        return [("drrik relu (L1)", replace(spec, **drrik))]
    runs: list[tuple[str, RunSpec]] = []
    if not args.skip_saelens:
        for l1 in values(args.l1_values):
            label = f"saelens-relu-l1_coefficient={l1}"
            runs.append(
                (
                    "SAELens relu (L1)",
                    replace(base, tool="saelens", label=label, l1_coefficient=float(l1)),
                )
            )
        for k in values(args.saelens_ks or args.ks):
            label = f"saelens-topk-k={k}"
            runs.append(
                ("SAELens topk", replace(base, tool="saelens", label=label, arch="topk", k=int(k)))
            )
    runs.append(
        (
            "drrik relu (L1)",
            replace(
                base,
                label="drrik-relu-l1",
                sweep=f"l1_coefficient={args.drrik_l1_values or args.l1_values}",
                **drrik,
            ),
        )
    )
    runs.append(
        (
            "drrik relu (target L0)",
            replace(
                base,
                label="drrik-relu-target",
                sweep=f"target_l0={args.target_l0s}",
                l1_coefficient=args.target_start_l1,
                **drrik,
            ),
        )
    )
    runs.append(
        (
            "drrik topk",
            replace(base, label="drrik-topk", arch="topk", sweep=f"k={args.ks}", **drrik),
        )
    )
    return [(family, spec) for family, spec in runs if spec.arch in values(args.archs)]


def train_or_reuse(spec: RunSpec, python: str, work: Path, reuse: bool) -> dict[str, Any]:
    """One training through compare_saelens.run_worker, with the load average around it. With
    ``reuse``, a finished run of the same spec (its spec and result JSON in ``work``, the thread
    count and output directory aside) is read back instead of trained again."""
    spec_path, result_path = work / f"{spec.label}.spec.json", work / f"{spec.label}.result.json"
    load_path = work / f"{spec.label}.load.json"
    if reuse and result_path.exists() and spec_path.exists():
        done = json.loads(spec_path.read_text())
        if {**done, "threads": 0, "out_dir": ""} == {**asdict(spec), "threads": 0, "out_dir": ""}:
            print(f"[{spec.label}] reusing the finished run in {work}", flush=True)
            result = json.loads(result_path.read_text())
            result["tokens_per_s"] = result["training_tokens"] / result["train_loop_s"]
            load = json.loads(load_path.read_text()) if load_path.exists() else "not recorded"
            return {"spec": done, "reused": True, "load": load, **result}
    shutil.rmtree(spec.out_dir, ignore_errors=True)
    before = os.getloadavg()[0]
    result = run_worker(spec, python, work)
    load = f"{before:.1f}-{os.getloadavg()[0]:.1f}"
    load_path.write_text(json.dumps(load))
    return {"spec": asdict(spec), "reused": False, "load": load, **result}


def evaluate_cached(
    dirs: dict[str, tuple[str, str]], data_dir: Path, limit: int | None, work: Path, model_dir: str
) -> dict[str, dict[str, Any]]:
    """compare_saelens.evaluate_saes on the SAEs not yet in ``work/eval-cache.json`` (keyed by
    SAE directory and contexts), so that finished runs can be evaluated while others train. The
    contexts are the same for every call, so the baselines (clean and zero-ablated CE) are too."""
    from drrik.model import load_model

    cache_path = work / "eval-cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = {name: f"{path}|{data_dir}|{limit}" for name, (_, path) in dirs.items()}
    todo = {name: d for name, d in dirs.items() if key[name] not in cache}
    if todo:
        model = load_model(model_dir, dtype="float32")
        for name, e in evaluate_saes(model, data_dir, todo, limit=limit).items():
            cache[key[name]] = e
        cache = {**json.loads(cache_path.read_text()), **cache} if cache_path.exists() else cache
        cache_path.write_text(json.dumps(cache, default=float))
    return {name: cache[key[name]] for name in dirs}


def setting_of(spec: dict[str, Any], sae_name: str) -> str:
    """The setting one SAE was trained at: its sweep name, or the run's own k / L1."""
    if spec["sweep"]:
        return sae_name
    return (
        f"k={spec['k']}" if spec["arch"] == "topk" else f"l1_coefficient={spec['l1_coefficient']:g}"
    )


def interpolate(points: list[tuple[float, float]], l0: float) -> float | None:
    """A curve's value at l0, linear in log L0 between its two neighbours; None outside it."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= l0 <= x1:
            if x1 == x0:
                return (y0 + y1) / 2
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    exact = [y for x, y in points if abs(x - l0) <= 1e-6 * max(l0, 1)]
    return exact[0] if exact else None


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each SAELens SAE's L0: drrik's curves of the same architecture, read there."""
    out = []
    for ref in (r for r in rows if r["tool"] == "SAELens"):
        for family in sorted({r["family"] for r in rows if r["tool"] == "drrik"}):
            curve = [r for r in rows if r["family"] == family and r["arch"] == ref["arch"]]
            if not curve:
                continue
            entry = {"saelens": ref["name"], "l0": ref["l0"], "drrik_family": family}
            for key, _ in METRICS:
                value = interpolate([(r["l0"], r[key]) for r in curve], ref["l0"])
                entry[key] = None if value is None else round(value - ref[key], 4)
            out.append(entry)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    lo, hi = min(r["l0"] for r in rows), max(r["l0"] for r in rows)
    styles = {"SAELens": ("tab:orange", "--"), "drrik": ("tab:blue", "-")}
    markers = {"relu (L1)": "o", "relu (target L0)": "s", "topk": "^"}
    for ax, (key, label) in zip(axes, METRICS, strict=True):
        for family in dict.fromkeys(r["family"] for r in rows):
            curve = sorted((r["l0"], r[key]) for r in rows if r["family"] == family)
            tool, kind = family.split(" ", 1)
            color, line = styles[tool]
            ax.plot(
                [x for x, _ in curve],
                [y for _, y in curve],
                linestyle=line,
                marker=markers[kind],
                color=color if kind != "relu (target L0)" else "tab:green",
                alpha=0.6 if kind.startswith("relu") else 1.0,
                label=family,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([t for t in (8, 16, 32, 64, 128, 256, 512) if lo / 1.5 <= t <= hi * 1.5])
        ax.set_xlabel("held-out L0 (active features per token)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(value: float | None, signed: bool = True) -> str:
    return "outside drrik's L0 range" if value is None else f"{value:+.3f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    probe = bool(s["probe_l1"])
    lines = [
        f"## {'L1 probe' if probe else 'Frontier'}: drrik and SAELens, quality against held-out "
        "L0 (CPU)",
        "",
        f"SmolLM2-135M, `{s['hook']}`, contexts of 128 tokens (BOS first, special tokens not "
        f"trained on), d_sae {s['d_sae']}, batch {s['train_batch']} tokens, {s['tokens']:,} "
        f"training tokens ({s['tokens'] // s['train_batch']} steps) per SAE, lr {s['lr']}, seed "
        f"{s['seed']}, b_dec started at zero, inputs scaled to norm sqrt(d_in), free decoder "
        "rows; the same pretokenized contexts for every run (compare_saelens.py's). drrik: LM in "
        f"{s['drrik_model_dtype']}, SAE step "
        f"{'under bf16 autocast' if s['drrik_autocast'] else 'in float32'}, every setting of a "
        "family from one stream (`--sweep`); SAELens 6.54: its defaults (fp32 LM and SAE), one "
        "run per setting. Held-out: drrik's evaluator, fp32 model, "
        f"{s['eval_limit'] or s['eval_contexts']} contexts of 128 tokens, the same for every SAE.",
        "",
        "Train tok/s: activations trained on per second of one run's training loop; a drrik "
        "sweep trains all its SAEs from each token, so its rate is shared by its 3 SAEs. Load: "
        "the machine's 1-minute load average at the run's start and end (2 cores, shared); "
        "threads: the run's torch threads (runs trained side by side had one each).",
        "",
        "| tool | arch | setting | L0 | EV | CE rec | dead | dense | train tok/s | threads "
        "| load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tool']} | {r['arch']} | {r['setting']} | {r['l0']:.1f} | "
            f"{r['explained_variance']:.3f} | {r['ce_loss_recovered']:.3f} | "
            f"{r['dead_features']} | {r['dense_features']} | {r['tokens_per_s']:,.0f}"
            + (f" (x{r['n_saes']})" if r["n_saes"] > 1 else "")
            + f" | {r['threads']} | {r['load']} |"
        )
    if result["comparison"]:
        lines += [
            "",
            "drrik's curves read at each SAELens SAE's L0 (interpolated in log L0 between "
            "drrik's neighbouring points of the same architecture), minus SAELens's value: "
            "positive means drrik lies above.",
            "",
            "| SAELens SAE | L0 | drrik curve | EV drrik - SAELens | CE rec drrik - SAELens |",
            "|---|---:|---|---:|---:|",
        ]
        for c in result["comparison"]:
            lines.append(
                f"| {c['saelens']} | {c['l0']:.1f} | {c['drrik_family']} | "
                f"{fmt(c['explained_variance'])} | {fmt(c['ce_loss_recovered'])} |"
            )
    m = result["machine"]
    sl = m.get("saelens_env") or {}
    lines += ["", machine_line(m)]
    if sl:
        lines[-1] += " SAELens env: " + ", ".join(f"{k} {v}" for k, v in sl.items()) + "."
    if result.get("notes"):
        lines += ["", result["notes"].strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    from drrik.paths import cache_dir

    resolve_drrik_dtypes(args)
    work = args.work_dir or cache_dir() / "bench-frontier"
    work.mkdir(parents=True, exist_ok=True)
    sae_python = None if args.skip_saelens or args.probe_l1 else saelens_python(args.saelens_python)
    model_dir, data_dir, base = base_spec(args, work, args.tokens)
    runs: dict[str, dict[str, Any]] = {}

    def train(family: str, spec: RunSpec) -> None:
        spec = replace(spec, out_dir=str(work / "runs" / spec.label), threads=args.threads)
        python = sae_python if spec.tool == "saelens" else sys.executable
        runs[spec.label] = {"family": family, **train_or_reuse(spec, python, work, args.reuse)}

    with ThreadPoolExecutor(args.jobs) as pool:  # each run is a process of its own
        for future in [pool.submit(train, family, spec) for family, spec in plan(args, base)]:
            future.result()
    runs = {spec.label: runs[spec.label] for _, spec in plan(args, base)}  # the plan's order

    print("evaluating every SAE on the same held-out contexts ...", flush=True)
    dirs = {
        f"{label}/{name}": (args.hook, path)
        for label, run in runs.items()
        for name, path in run["sae_dirs"].items()
    }
    metrics = evaluate_cached(dirs, data_dir, args.eval_limit, work, model_dir)
    rows = []
    for name, e in metrics.items():
        label, sae_name = name.split("/", 1)
        run = runs[label]
        rows.append(
            {
                "name": name,
                "family": run["family"],
                "tool": "SAELens" if run["spec"]["tool"] == "saelens" else "drrik",
                "arch": run["spec"]["arch"],
                "setting": setting_of(run["spec"], sae_name),
                "tokens_per_s": round(run["tokens_per_s"], 1),
                "n_saes": len(run["sae_dirs"]),
                "loop_cores_used": run["loop_cores_used"],
                "threads": run["torch_threads"],
                "load": run["load"],
                **{k: e[k] for k in ("l0", "explained_variance", "ce_loss_recovered")},
                "dead_features": e["dead_features"],
                "dense_features": e["dense_features"],
            }
        )
    machine = machine_info("cpu")
    machine["saelens_env"] = runs_versions(sae_python) if sae_python else None
    stem = "frontier-probe-cpu" if args.probe_l1 else "frontier-cpu"
    notes = args.out / f"{stem}.notes.md"
    result = {
        "benchmark": "frontier",
        "model": "smollm2-135m (embedded SmolLM2-135M-Instruct, dequantized)",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "comparison": compare(rows),
        "runs": {
            label: {k: v for k, v in run.items() if k != "rss_timeline"}
            for label, run in runs.items()
        },
        "machine": machine,
        # Hand-written reading of the result, kept beside it so that a rerun keeps it.
        "notes": notes.read_text() if notes.exists() else "",
    }
    write_results(stem, result, markdown(result), args.out)
    if not args.probe_l1:
        plot(rows, args.out / f"{stem}.png", machine_line(machine))
        print(f"plot: {args.out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
