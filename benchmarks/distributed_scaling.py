"""Tokens/s of data-parallel training with 1 vs N processes, and what the all-reduce costs.

Runs ``drrik train`` once in one process and once under ``torchrun --nproc_per_node N`` with
the same per-process batch, reads the training rate from each run's metrics.jsonl (after the
first logging window, which includes the first buffer fill), and times the gradient
all-reduce alone at the SAE's size to split communication from compute.

    python benchmarks/distributed_scaling.py --tokens 65536 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info, write_results

ALLREDUCE_WORKER = r"""
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
numel, rounds = int(sys.argv[1]), int(sys.argv[2])
grad = torch.randn(numel)
dist.all_reduce(grad)
start = time.perf_counter()
for _ in range(rounds):
    dist.all_reduce(grad)
if dist.get_rank() == 0:
    print((time.perf_counter() - start) / rounds)
dist.destroy_process_group()
"""


def _rate(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_second"] for row in rows[1:]] or [rows[0]["tokens_per_second"]]
    return statistics.median(rates)


def _train(launcher: list[str], args: list[str], out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    command = [*launcher, "-m", "drrik", "train", *args, "--out", str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return _rate(out)


def _allreduce_seconds(numel: int, nproc: int, rounds: int = 10) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(ALLREDUCE_WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), f.name, str(numel), str(rounds),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    os.unlink(f.name)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook", default="blocks.6.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=65536, help="per process")
    parser.add_argument("--batch", type=int, default=2048, help="per process")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion-factor", type=int, default=8)
    args = parser.parse_args()
    common = [
        "--model", args.model, "--hook", args.hook,
        "--train-batch-size-tokens", str(args.batch), "--log-every-steps", "2",
        "--expansion-factor", str(args.expansion_factor), "--eval-contexts", "8",
        "--checkpoint-every-minutes", "0",
    ]  # fmt: skip
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        one = _train(
            [sys.executable],
            [*common, "--training-tokens", str(args.tokens)],
            Path(tmp) / "one",
            cores,
        )
        many = _train(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(args.nproc)],
            [*common, "--training-tokens", str(args.tokens * args.nproc)],
            Path(tmp) / "many",
            max(1, cores // args.nproc),
        )  # fmt: skip
    d_sae = args.d_in * args.expansion_factor
    numel = 2 * args.d_in * d_sae + d_sae + args.d_in
    allreduce = _allreduce_seconds(numel, args.nproc)
    step_seconds = args.batch * args.nproc / many
    result = {
        "machine": machine_info("cpu"),
        "model": args.model,
        "hook": args.hook,
        "batch_per_process": args.batch,
        "processes": args.nproc,
        "tokens_per_second_1": one,
        f"tokens_per_second_{args.nproc}": many,
        "speedup": many / one,
        "scaling_efficiency": many / one / args.nproc,
        "allreduce_seconds_per_step": allreduce,
        "step_seconds": step_seconds,
        "communication_share": allreduce / step_seconds,
        "wall_seconds": time.time() - started,
    }
    table = [
        "| processes | tokens/s | speedup | efficiency |",
        "|---|---|---|---|",
        f"| 1 | {one:,.0f} | 1.00 | 1.00 |",
        f"| {args.nproc} | {many:,.0f} | {many / one:.2f} | {many / one / args.nproc:.2f} |",
        "",
        f"Gradient all-reduce ({numel:,} floats, gloo): {allreduce * 1000:.1f} ms per step, "
        f"{100 * allreduce / step_seconds:.1f}% of a {step_seconds:.2f} s step.",
        "",
        f"{args.nproc} processes share this machine's {cores} cores ({max(1, cores // args.nproc)}"
        " threads each, against all of them for the single process): on a machine with a device "
        "per process the speedup approaches the process count less the all-reduce share; here "
        "equal total compute makes 1.0x the expectation, and the table shows what data "
        "parallelism itself costs.",
        "",
        f"{result['machine']['date']}; {result['machine']['cpu']}, {cores} cores; "
        f"{args.model}, {args.hook}, batch {args.batch} per process, "
        f"{args.tokens:,} tokens per process.",
    ]
    write_results("distributed_scaling", result, "\n".join(table))


if __name__ == "__main__":
    main()
