"""What ``drrik train`` with no arguments gives, against the standard a usable SAE must meet.

Runs the default as a user does (a fresh process, only ``--out`` given), timed from spawn to
exit, and reads the saved SAE's held-out metrics. Then the same run once per ``--variant``
(extra flags), so a default's cost or benefit is measured in one invocation on one machine. The
default variant flips bf16 autocast of the SAE step (on by default where bf16 is native, off
elsewhere): the fast path's equal-quality check, on equal tokens.

    python benchmarks/default_sae.py                   # default + the other autocast setting
    python benchmarks/default_sae.py --variant "--autocast false" --variant "--k 32"
    python benchmarks/default_sae.py --reuse earlier.jsonl   # runs printed before: read back
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line, write_results  # noqa: E402

STANDARD: dict[str, tuple[str, float]] = {
    "l0": ("<=", 64),
    "explained_variance": (">=", 0.80),
    "ce_loss_recovered": (">=", 0.93),
    "dead_fraction": ("<=", 0.05),
    "dense_fraction": ("<=", 0.01),
}
"""Held-out metric: (comparison, bound) that a default SAE must meet (issue 14)."""


def drrik_process(flags: list[str], out: Path) -> dict[str, Any]:
    """One ``drrik train --out out *flags`` process, timed from spawn to exit: its wall time, the
    load average at its start, its evaluation's cost (from its log), its loop's tokens/s and the
    saved SAE's cfg.json (held-out metrics under ``metadata.eval``)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "drrik", "train", "--out", str(out), *flags]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"drrik train {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    evaluation = re.search(r"held-out evaluation took ([0-9.]+) s", proc.stderr)
    assert evaluation is not None, "drrik train no longer reports its evaluation's cost"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "load_average_at_start": round(load, 2),
        "eval_s": float(evaluation.group(1)),
        "loop_tokens_per_s": rows[-1]["tokens"] / rows[-1]["elapsed_s"],
        "cfg": json.loads((out / "final" / "cfg.json").read_text()),
    }


def train(flags: list[str], out: Path) -> dict[str, Any]:
    """One ``drrik train`` with ``flags``; its timings and held-out metrics against STANDARD."""
    run = drrik_process(flags, out)
    cfg = run.pop("cfg")
    metrics = dict(cfg["metadata"]["eval"])
    metrics["dead_fraction"] = metrics["dead_features"] / cfg["d_sae"]
    metrics["dense_fraction"] = metrics["dense_features"] / cfg["d_sae"]
    return {
        "flags": flags,
        **run,
        "architecture": cfg["architecture"],
        "d_sae": cfg["d_sae"],
        "k": cfg.get("k"),
        "training_tokens": cfg["metadata"]["training_tokens"],
        "metrics": metrics,
        "meets": {name: meets(metrics[name], *rule) for name, rule in STANDARD.items()},
    }


def meets(value: float, comparison: str, bound: float) -> bool:
    return value <= bound if comparison == "<=" else value >= bound


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    header = "| metric | standard | " + " | ".join(run["label"] for run in runs) + " |"
    lines = [
        "## `drrik train` with no arguments (embedded SmolLM2-135M, CPU)",
        "",
        f"Default: {runs[0]['architecture']}, k {runs[0]['k']}, {runs[0]['d_sae']:,} features, "
        f"{runs[0]['training_tokens']:,} training tokens. Each column is one fresh process; "
        "held-out metrics from the saved SAE (a ✗ misses the standard).",
        "",
        header,
        "|---|---|" + "---:|" * len(runs),
    ]
    for name, (comparison, bound) in STANDARD.items():
        cells = [f"{run['metrics'][name]:.3g}{'' if run['meets'][name] else ' ✗'}" for run in runs]
        lines.append(f"| {name} | {comparison} {bound} | " + " | ".join(cells) + " |")
    for name in ("kl_div_with_sae", "dead_features", "dense_features"):
        cells = [f"{run['metrics'][name]:.3g}" for run in runs]
        lines.append(f"| {name} |  | " + " | ".join(cells) + " |")
    timing = {"wall_s": "{:.0f}", "eval_s": "{:.1f}", "loop_tokens_per_s": "{:,.0f}"}
    timing["load_average_at_start"] = "{:.2f}"
    for name, fmt in timing.items():
        cells = [fmt.format(run[name]) for run in runs]
        lines.append(f"| {name} |  | " + " | ".join(cells) + " |")
    lines += ["", machine_line(result["machine"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="extra flags for one more run, quoted (default: the other --autocast setting)",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="the JSON lines an earlier invocation printed: runs with the same flags are read "
        "back instead of trained again (a benchmark cut off after its first run loses nothing)",
    )
    p.add_argument("--stem", default="default_sae-cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    from drrik.model import native_bfloat16

    flipped = f"--autocast {str(not native_bfloat16('cpu')).lower()}"
    variants = args.variant if args.variant is not None else [flipped]
    earlier = []
    if args.reuse is not None:
        earlier = [json.loads(line) for line in args.reuse.read_text().splitlines()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, flags in enumerate(["", *variants]):
            reused = [run for run in earlier if run["flags"] == shlex.split(flags)]
            run = reused[0] if reused else train(shlex.split(flags), Path(tmp) / f"run{i}")
            run["label"] = f"`{flags}`" if flags else "defaults"
            print(json.dumps(run), flush=True)
            runs.append(run)
    result = {"runs": runs, "machine": machine_info("cpu")}
    write_results(args.stem, result, markdown(result), args.out)


if __name__ == "__main__":
    main()
