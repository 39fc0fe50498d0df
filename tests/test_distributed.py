"""Data-parallel training under torchrun (gloo, CPU): equality, resume, rank-0 outputs, failure.

The equality claim: two processes with one data shard each compute the same SAE as one
process holding both shards, because the global batch (shard 0's rows, then shard 1's) and
the data order are the same. They differ only in floating-point summation order: one process
differentiates the mean over the concatenated batch; two processes average the two halves'
gradients with an all-reduce. Over a few dozen Adam steps that leaves differences around
1e-7 on weights of size ~1e-2, so the tolerance is an absolute 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drrik.checkpoint import CheckpointManager
from drrik.run_dir import RunDir

TOLERANCE = 1e-5
WAIT_S = 300


def _args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model", str(model_dir),
        "--dataset", str(data),
        "--hook", "blocks.1.hook_resid_post",
        "--architecture", "relu",
        "--training-tokens", "7680",
        "--train-batch-size-tokens", "128",
        "--n-batches-in-buffer", "4",
        "--store-batch-size-prompts", "4",
        "--context-size", "64",
        "--eval-contexts", "4",
        "--log-every-steps", "3",
        "--checkpoint-every-tokens", "1536",
        # fp32 steps: bf16 autocast (the default where native) rounds a 2-shard batch's
        # gradient differently from each shard's half, beyond the 1e-5 compared here.
        "--autocast", "false",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _torchrun(args: list[str], **kwargs: object) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "drrik", *args,
    ]  # fmt: skip
    return subprocess.Popen(command, env=_env(), text=True, **kwargs)  # type: ignore[call-overload]


def _single(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "drrik", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=WAIT_S)


def _weights(run: Path, name: str = "") -> dict[str, torch.Tensor]:
    """The saved weights of ``run``'s dictionary (``name``: one of several)."""
    return load_file(str(run / "final" / name / "sae_weights.safetensors"))


def _assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], relative: float = 0.0
) -> None:
    """Equal within TOLERANCE, or within ``relative`` times each tensor's largest entry."""
    assert a.keys() == b.keys()
    for key in a:
        atol = max(TOLERANCE, relative * float(a[key].abs().max()))
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One process with two shards, and torchrun with two processes, on the same config."""
    root = tmp_path_factory.mktemp("dist")
    single = _single(_args(tiny_model_dir, corpus_dir, root / "one", "--data-shards", "2"))
    assert single.returncode == 0, single.stderr[-2000:]
    pair = _torchrun(_args(tiny_model_dir, corpus_dir, root / "two"), stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)  # fmt: skip
    output, _ = pair.communicate(timeout=WAIT_S)
    assert pair.returncode == 0, output[-3000:]
    return root / "one", root / "two"


def test_two_processes_train_the_same_sae_as_one(runs: tuple[Path, Path]) -> None:
    one, two = runs
    _assert_close(_weights(one), _weights(two))
    assert not torch.equal(_weights(two)["W_dec"], torch.zeros_like(_weights(two)["W_dec"]))


TRANSCODERS = (
    "--hook", "blocks.{layer}.mlp.hook_in",
    "--target-hook", "blocks.{layer}.hook_mlp_out",
    "--layers", "0", "1",
)  # fmt: skip
SHORT = ("--training-tokens", "2560")  # 10 steps of the global batch: enough to compare
JOINT_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "skip-transcoders": (
        (*TRANSCODERS, "--skip-connection", "true"),
        ("blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"),
        "W_skip",
    ),
    "crosscoder": (
        (
            "--dictionary",
            "crosscoder",
            "--hook",
            "blocks.{layer}.hook_resid_post",
            "--layers",
            "0",
            "2",
        ),
        ("",),
        "W_dec",
    ),
    "clt": ((*TRANSCODERS[:4], "--layers", "0", "1", "2", "--dictionary", "clt"), ("",), "W_dec_2"),
}
"""case -> (flags, the saved dictionaries' names, a tensor each must have)."""


@pytest.mark.parametrize("case", list(JOINT_CASES))
def test_two_processes_train_the_same_multi_hook_dictionaries_as_one(
    case: str, tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Each input and target scale (per hook for a crosscoder), b_dec (from the target) and
    W_skip agree across ranks."""
    flags, names, tensor = JOINT_CASES[case]
    one, two = tmp_path / "one", tmp_path / "two"
    pair = _torchrun(_args(tiny_model_dir, corpus_dir, two, *flags, *SHORT),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    single = _single(_args(tiny_model_dir, corpus_dir, one, *flags, *SHORT, "--data-shards", "2"))
    output, _ = pair.communicate(timeout=WAIT_S)
    assert single.returncode == 0, single.stderr[-2000:]
    assert pair.returncode == 0, output[-3000:]
    for name in names:
        assert tensor in _weights(two, name)
        # A crosscoder's or CLT's fold multiplies each hook's encoder rows by its scale (~1000
        # at layer 0 of the tiny random model, whose embeddings are tiny), and with them the
        # ranks' rounding: measured 5e-5 of the largest entry.
        relative = 2e-4 if case in ("crosscoder", "clt") else 0.0
        _assert_close(_weights(one, name), _weights(two, name), relative)


def test_only_rank_zero_writes(runs: tuple[Path, Path]) -> None:
    """One metrics row per logging step, and the heartbeat of a single process."""
    _, two = runs
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), "a step was logged twice"
    one_rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [row["step"] for row in one_rows]
    assert rows[-1]["tokens"] == 7680  # the global batch: 2 shards x 128 tokens per step
    assert json.loads((two / "heartbeat.json").read_text())["state"] == "finished"


def test_resume_with_another_world_size_is_exact(
    runs: tuple[Path, Path], tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """A torchrun job stopped by SIGTERM resumes in one process holding both shards.

    The saved config records the two shards, so a plain ``--resume`` needs no extra flag.
    """
    _, two = runs
    out = tmp_path / "stopped"
    job = _torchrun(_args(tiny_model_dir, corpus_dir, out), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)  # fmt: skip
    manager = CheckpointManager(out, keep=3)
    wait_for_checkpoint(job, out)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=WAIT_S)
    assert manager.load_latest() is not None
    resumed = _single(["train", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_close(_weights(out), _weights(two))


def wait_for_checkpoint(job: subprocess.Popen, out: Path) -> None:
    """Until ``job`` has written its first checkpoint into ``out``."""
    deadline = time.time() + WAIT_S
    while not RunDir(out).checkpoints() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert RunDir(out).checkpoints(), "no checkpoint appeared"


def kill_one_rank(args: list[str], out: Path) -> dict:
    """Start a long two-process job, SIGKILL one rank after its first checkpoint, and check
    that the job stops in bounded time; return the manifest of its newest intact checkpoint."""
    job = _torchrun(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_checkpoint(job, out)
    workers = subprocess.run(
        ["pgrep", "-P", str(job.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    started = time.time()
    job.communicate(timeout=WAIT_S)
    assert job.returncode != 0
    assert time.time() - started < 120, "the job did not stop in bounded time"
    state = CheckpointManager(out, keep=3).load_latest()
    assert state is not None and state[1]["step"] > 0
    return state[1]


def test_a_dead_rank_stops_the_job_with_the_checkpoint_intact(
    tiny_model_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    kill_one_rank(_args(tiny_model_dir, corpus_dir, out, "--training-tokens", "200000"), out)
