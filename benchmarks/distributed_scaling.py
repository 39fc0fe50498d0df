"""Tokens/s of data-parallel training with 1 vs N processes, and what the all-reduce costs;
with ``--feature-parallel``, also N processes splitting the SAE's features.

Runs ``drrik train`` once in one process and once under ``torchrun --nproc_per_node N`` with
the same per-process batch, reads the training rate from each run's metrics.jsonl (after the
first logging window, which includes the first buffer fill), and times the gradient
all-reduce alone at the SAE's size to split communication from compute. The feature-parallel
run (``--feature-parallel N``) trains on the same global batch; the dictionary bytes each rank
holds (parameters, Adam moments) are read from each run's final checkpoint.

    python benchmarks/distributed_scaling.py --tokens 65536 --nproc 2
    python benchmarks/distributed_scaling.py --feature-parallel --expansion-factor 32 \
        --tokens 16384 --stem feature_parallel-cpu
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

import torch
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


def _dictionary_bytes(run: Path) -> int:
    """Bytes of one rank's dictionary tensors and Adam moments in the run's last checkpoint:
    its slice part where the features are split, else the whole state."""
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    parts = sorted(latest.glob("slot-000-features-000-*.pt"))
    state = torch.load(parts[0] if parts else latest / "state.pt", weights_only=True)
    slot = state if parts else state["slots"][0]
    tensors = [*slot["sae"].values()]
    tensors += [v for s in slot["optimizer"]["state"].values() for v in s.values()]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t) and t.dim())


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
    parser.add_argument(
        "--feature-parallel", action="store_true", help="add a run that splits the features"
    )
    parser.add_argument("--stem", default="distributed_scaling")
    args = parser.parse_args()
    common = [
        "--model", args.model, "--hook", args.hook,
        "--train-batch-size-tokens", str(args.batch), "--log-every-steps", "2",
        "--expansion-factor", str(args.expansion_factor), "--eval-contexts", "8",
        "--checkpoint-every-minutes", "0",
    ]  # fmt: skip
    cores = os.cpu_count() or 1
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(args.nproc)]  # fmt: skip
    split: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        one = _train(
            [sys.executable],
            [*common, "--training-tokens", str(args.tokens)],
            Path(tmp) / "one",
            cores,
        )
        many_args = [*common, "--training-tokens", str(args.tokens * args.nproc)]
        threads = max(1, cores // args.nproc)
        many = _train(torchrun, many_args, Path(tmp) / "many", threads)
        if args.feature_parallel:
            fp_args = [*many_args, "--feature-parallel", str(args.nproc)]
            split = {
                "tokens_per_second": _train(torchrun, fp_args, Path(tmp) / "split", threads),
                "dictionary_bytes_per_rank": _dictionary_bytes(Path(tmp) / "split"),
                "dictionary_bytes_data_parallel": _dictionary_bytes(Path(tmp) / "many"),
            }
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
        **({"feature_parallel": split} if split else {}),
    }
    table = [
        "| processes | tokens/s | speedup | efficiency |",
        "|---|---|---|---|",
        f"| 1 | {one:,.0f} | 1.00 | 1.00 |",
        f"| {args.nproc} | {many:,.0f} | {many / one:.2f} | {many / one / args.nproc:.2f} |",
        *(
            [
                f"| {args.nproc}, features split | {split['tokens_per_second']:,.0f} | "
                f"{split['tokens_per_second'] / one:.2f} | "
                f"{split['tokens_per_second'] / one / args.nproc:.2f} |",
                "",
                f"Dictionary and Adam moments per rank: "
                f"{split['dictionary_bytes_data_parallel'] / 2**20:,.1f} MiB with the data "
                f"split, {split['dictionary_bytes_per_rank'] / 2**20:,.1f} MiB with the features "
                f"split over {args.nproc} ranks.",
            ]
            if split
            else []
        ),
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
    write_results(args.stem, result, "\n".join(table))


if __name__ == "__main__":
    main()
