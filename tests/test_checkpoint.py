"""Checkpoints and resuming (issue 4): kills, signals, damaged checkpoints, full disks.

The claim under test is strong: a run interrupted anywhere and resumed ends with the *same
bits* as a run that was never interrupted, and its metrics.jsonl has the same steps. Kills are
real (``kill -9`` / SIGTERM of a ``drrik train`` subprocess). To kill at a chosen point rather
than wherever a poll happens to land, most subprocesses run the real CLI with one pause point
patched in (:data:`PAUSER`): it writes a marker file and waits there to be killed or released.
One case kills a plain ``python -m drrik train`` wherever it is.

Cost control: interpreter start-up dominates, so every subprocess of the module is started
at once (they pause and wait), and resumes run in-process through ``drrik.cli.main``; the
uninterrupted reference run is shared by all cases.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import drrik
import drrik.checkpoint
from drrik.checkpoint import CheckpointManager
from drrik.cli import main
from drrik.errors import ConfigError
from drrik.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64
STEPS = 24
CHECKPOINT_STEPS = 4
LOG_STEPS = 2
WAIT_S = 240
"""Upper bound for a subprocess to reach its pause point on a loaded, shared machine."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

PAUSER = r"""
import os, sys, time
from pathlib import Path

import torch

import drrik.run_dir
import drrik.trainer
from drrik.cli import main

where, _, value = os.environ["DRRIK_TEST_PAUSE"].partition(":")
marker = Path(os.environ["DRRIK_TEST_MARKER"])


def pause():
    marker.write_text("paused")
    deadline = time.monotonic() + 900
    while not marker.with_suffix(".release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


if where == "metrics":  # just after the row of step N is on disk (before its checkpoint)
    append = drrik.run_dir.RunDir.append_metrics

    def append_metrics(self, rows):
        append(self, rows)
        if rows[0]["step"] == int(value):
            pause()

    drrik.run_dir.RunDir.append_metrics = append_metrics
elif where == "checkpoint":  # the first file of step N's checkpoint written, no manifest yet
    save = torch.save

    def paused_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if f"step-{int(value):010d}" in str(f):
            pause()

    torch.save = paused_save
elif where == "finish":  # after the last checkpoint, before the final SAE is saved
    export_run = drrik.pipeline.export_run

    def paused_export(*args):
        pause()
        return export_run(*args)

    drrik.pipeline.export_run = paused_export
sys.exit(main(sys.argv[1:]))
"""


def train_args(model_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    """``drrik train`` flags of a 24-step run with checkpoints every 4 steps, rows every 2."""
    return [
        "train",
        *("--model", str(model_dir), "--dataset", str(dataset)),
        *("--hook", "blocks.1.hook_resid_post", "--context-size", "16"),
        *("--architecture", "topk", "--k", "8", "--expansion-factor", "2"),
        *("--train-batch-size-tokens", str(BATCH), "--training-tokens", str(BATCH * STEPS)),
        *("--n-batches-in-buffer", "4", "--store-batch-size-prompts", "8"),
        *("--log-every-steps", str(LOG_STEPS), "--keep-checkpoints", "3"),
        *("--checkpoint-every-tokens", str(BATCH * CHECKPOINT_STEPS)),
        *("--checkpoint-every-minutes", "0"),
        *("--eval-contexts", "8", "--eval-batch-size-prompts", "8"),
        *("--out", str(out)),
        *extra,
    ]


def final_tensors(run: Path, name: str = "") -> dict[str, torch.Tensor]:
    """The saved SAE's weights and feature sparsity (``name``: one of a run's several)."""
    final = run / "final" / name
    tensors = load_file(str(final / "sae_weights.safetensors"))
    tensors["sparsity"] = load_file(str(final / "sparsity.safetensors"))["sparsity"]
    return tensors


def assert_same_final(run: Path, reference: Path, name: str = "") -> None:
    got, want = final_tensors(run, name), final_tensors(reference, name)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs from the uninterrupted run"


def metric_rows(run: Path) -> list[tuple[str, int, int, float]]:
    """(sae, step, tokens, loss) of every metrics.jsonl row, in file order."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["sae"], r["step"], r["tokens"], r["loss"]) for r in map(json.loads, lines)]


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the checkpoint directories, oldest first."""
    return sorted(int(p.name.split("-")[1]) for p in RunDir(run).checkpoints())


def run_cli(
    argv: list[str], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> tuple[int, str]:
    """``drrik ...`` in-process: (exit status, stderr and drrik's log)."""
    capfd.readouterr()
    caplog.clear()
    code = main(argv)
    return code, capfd.readouterr().err + caplog.text


@pytest.fixture(scope="module")
def reference(
    tiny_model_dir: Path, dataset_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The uninterrupted run every interrupted one must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(tiny_model_dir, dataset_file, out)) == 0
    return out


# -- interrupted subprocesses ----------------------------------------------------------------


@dataclass
class Launched:
    """One ``drrik train`` subprocess and where it writes."""

    proc: subprocess.Popen[bytes]
    args: list[str]
    out: Path
    marker: Path
    log_dir: Path
    killed_at_rows: int | None = None

    def stdout(self) -> str:
        return (self.log_dir / "stdout").read_text()

    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text()

    def wait_paused(self) -> None:
        """Block until the pause point is reached (failing if the run ended instead)."""
        deadline = time.monotonic() + WAIT_S
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"run ended ({self.proc.returncode}) before pausing:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no pause within {WAIT_S} s")
            time.sleep(0.05)

    def release(self) -> None:
        self.marker.with_suffix(".release").write_text("go")


KILL_CASES: dict[str, tuple[str | None, str]] = {
    # name: (pause point, how the run is continued)
    "before-first-checkpoint": ("metrics:2", "rerun"),
    "between-checkpoints": ("metrics:6", "resume"),
    "inside-checkpoint-write": ("checkpoint:8", "rerun"),
    "before-final-save": ("finish", "resume"),
    "anywhere-unpaused": (None, "resume"),
}
SIGNAL_CASES = {"sigterm": "metrics:10", "second-signal": "metrics:14"}
TRANSCODER_CASE = "skip-transcoders-between-checkpoints"
TRANSCODERS = (
    *("--hook", "blocks.{layer}.mlp.hook_in", "--target-hook", "blocks.{layer}.hook_mlp_out"),
    *("--layers", "0", "1", "--skip-connection", "true"),
)
"""Flags that turn the run into a skip transcoder per layer (the last --hook wins)."""
MATRYOSHKA_CASE = "matryoshka-between-checkpoints"
MATRYOSHKA = ("--architecture", "matryoshka_batchtopk", "--matryoshka-widths", "8", "32", "128")
"""Flags that turn the run into a Matryoshka BatchTopK (the last --architecture wins)."""
CROSSCODER = ("--dictionary", "crosscoder", "--hook", "blocks.{layer}.hook_resid_post")
"""Flags that turn the run into a crosscoder over the residual stream of two layers."""
EXTRA_CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    TRANSCODER_CASE: (TRANSCODERS, ("blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"), "W_skip"),
    MATRYOSHKA_CASE: (MATRYOSHKA, ("",), "threshold"),
    "crosscoder-between-checkpoints": ((*CROSSCODER, "--layers", "0", "1"), ("",), "W_dec"),
    "clt-between-checkpoints": (
        (*TRANSCODERS[:4], "--layers", "0", "1", "2", "--dictionary", "clt"),
        ("",),
        "W_dec_2",
    ),
}
"""Runs killed between checkpoints like the plain one, each compared with its own reference:
case -> (extra flags, its saved dictionaries' names, a tensor each must have)."""
UNPAUSED_KILL_ROWS = 3


def _kill_when_ready(run: Launched, paused: bool) -> None:
    """Killer thread: kill -9 at the pause point, or (unpaused) once a few rows are logged."""
    deadline = time.monotonic() + WAIT_S
    metrics = run.out / "metrics.jsonl"
    while run.proc.poll() is None and time.monotonic() < deadline:
        if run.marker.exists():
            break
        if not paused and metrics.is_file():
            rows = metrics.read_text().count("\n")
            if rows >= UNPAUSED_KILL_ROWS:
                run.killed_at_rows = rows
                break
        time.sleep(0.01)
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()


@pytest.fixture(scope="module")
def launched(
    tiny_model_dir: Path, dataset_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Launched]]:
    """Every subprocess of the module, started together; kill -9 cases are killed by threads."""
    runs: dict[str, Launched] = {}
    threads = []
    pauses = {
        **{name: pause for name, (pause, _) in KILL_CASES.items()},
        **dict.fromkeys(EXTRA_CASES, "metrics:6"),
        **SIGNAL_CASES,
    }
    for name, pause in pauses.items():
        root = tmp_path_factory.mktemp(name)
        marker = root / "marker"
        extra = EXTRA_CASES[name][0] if name in EXTRA_CASES else ()
        args = train_args(tiny_model_dir, dataset_file, root / "run", *extra)
        if pause is None:
            cmd = [sys.executable, "-m", "drrik", *args]
        else:
            cmd = [sys.executable, "-c", PAUSER, *args]
        env = {
            **os.environ,
            **ONE_THREAD,
            "DRRIK_TEST_PAUSE": pause or "",
            "DRRIK_TEST_MARKER": str(marker),
        }
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        runs[name] = Launched(proc, args, root / "run", marker, root)
        if name in KILL_CASES or name in EXTRA_CASES:
            killer = threading.Thread(target=_kill_when_ready, args=(runs[name], bool(pause)))
            threads.append(killer)
            killer.start()
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_kill_9_then_resume_gives_identical_weights_and_metrics(
    case: str,
    launched: dict[str, Launched],
    reference: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    how = KILL_CASES[case][1]
    run = launched[case]
    run.proc.wait(timeout=WAIT_S)
    assert run.proc.returncode == -signal.SIGKILL, run.stderr()
    out = run.out
    rows = metric_rows(out)
    # The kill landed where the case says it did.
    if case == "before-first-checkpoint":
        assert checkpoint_steps(out) == [] and [r[1] for r in rows] == [2]
    elif case == "between-checkpoints":
        assert checkpoint_steps(out) == [4] and rows[-1][1] == 6
        # A kill can also tear the last line of metrics.jsonl; resuming must survive it.
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 7, "tok')
    elif case == "inside-checkpoint-write":
        assert checkpoint_steps(out) == [4] and rows[-1][1] == 8
        # Killed after the first file of step 8's checkpoint (a data shard's part) was written,
        # before its rename out of the staging directory.
        assert list((out / "checkpoints" / ".parts-step-0000000008").rglob("store-*.pt"))
    elif case == "before-final-save":
        assert checkpoint_steps(out)[-1] == STEPS and not (out / "final").exists()
    else:
        assert run.killed_at_rows is not None, "the run was not killed mid-way"
        assert not (out / "final").exists()

    if how == "resume":
        code, err = run_cli(["train", "--resume", str(out)], capfd, caplog)
    else:
        code, err = run_cli(run.args, capfd, caplog)  # the same command again
    assert code == 0, err
    assert_same_final(out, reference)
    assert metric_rows(out) == metric_rows(reference)
    assert not list((out / "checkpoints").glob(".*")), "a temporary checkpoint was left"


@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_kill_9_of_other_dictionaries_resumes_to_identical_weights(
    case: str,
    launched: dict[str, Launched],
    tiny_model_dir: Path,
    dataset_file: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What else a checkpoint holds resumes exactly: a skip transcoder set's two scales,
    W_skip and target-initialized b_dec per layer; a Matryoshka's learned threshold; a
    crosscoder's and a CLT's per-hook scales (and a TopK CLT's held-out JumpReLU form)."""
    flags, names, extra_tensor = EXTRA_CASES[case]
    run = launched[case]
    run.proc.wait(timeout=WAIT_S)
    assert run.proc.returncode == -signal.SIGKILL, run.stderr()
    assert checkpoint_steps(run.out) == [4] and metric_rows(run.out)[-1][1] == 6
    code, err = run_cli(["train", "--resume", str(run.out)], capfd, caplog)
    assert code == 0, err
    reference = tmp_path / "reference"
    assert main(train_args(tiny_model_dir, dataset_file, reference, *flags)) == 0
    for name in names:
        assert extra_tensor in final_tensors(reference, name)
        assert_same_final(run.out, reference, name)
    assert metric_rows(run.out) == metric_rows(reference)


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(
    launched: dict[str, Launched],
    reference: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = launched["sigterm"]
    run.wait_paused()  # paused right after logging step 10, between checkpoints 8 and 12
    run.proc.send_signal(signal.SIGTERM)
    run.release()
    assert run.proc.wait(timeout=WAIT_S) == 128 + signal.SIGTERM, run.stderr()
    err = run.stderr()
    assert f"drrik train --resume {run.out}" in err
    # The signal came after step 10's checkpoint decision: the run finishes step 11 and
    # checkpoints it, and the message names that step.
    assert "at step 11 " in err
    assert checkpoint_steps(run.out) == [4, 8, 11]
    code, err = run_cli(["train", "--resume", str(run.out)], capfd, caplog)
    assert code == 0, err
    assert_same_final(run.out, reference)
    steps = [r[1] for r in metric_rows(run.out)]
    assert steps == sorted(set(steps)), "duplicated or reordered steps"
    assert set(steps) == {r[1] for r in metric_rows(reference)} | {11}


def test_second_signal_exits_at_once_leaving_checkpoints_intact(
    launched: dict[str, Launched],
    reference: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = launched["second-signal"]
    run.wait_paused()  # paused after logging step 14; checkpoints 4, 8 and 12 exist
    run.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while "SIGTERM received" not in run.stderr():  # the first must be handled first
        assert time.monotonic() < deadline, "the first SIGTERM was not acknowledged"
        time.sleep(0.02)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "second SIGTERM, exiting now" in run.stderr()
    assert checkpoint_steps(run.out) == [4, 8, 12]
    loaded = CheckpointManager(run.out, 3).load_latest()
    assert loaded is not None and loaded[1]["step"] == 12
    code, err = run_cli(["train", "--resume", str(run.out)], capfd, caplog)
    assert code == 0, err
    assert "skipping" not in err
    assert_same_final(run.out, reference)


# -- damaged checkpoints ---------------------------------------------------------------------


def _truncate(path: Path) -> None:
    state = path / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    state = path / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))


def _drop_manifest(path: Path) -> None:
    (path / "manifest.json").unlink()


def _garble_manifest(path: Path) -> None:
    (path / "manifest.json").write_text('{"format": 1, "files": ')


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "bad-checksum": (_flip_byte, "checksum"),
    "missing-manifest": (_drop_manifest, "missing manifest"),
    "unreadable-manifest": (_garble_manifest, "unreadable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_reported_and_skipped(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2):
        assert manager.save({"w": torch.full((1000,), float(step)), "step": step}, step, step)
    corrupt, reason = DAMAGE[damage]
    corrupt(tmp_path / "checkpoints" / "step-0000000002")
    loaded = manager.load_latest()
    err = caplog.text
    assert loaded is not None
    state, manifest = loaded
    assert manifest["step"] == 1 and state["step"] == 1
    assert torch.equal(state["w"], torch.full((1000,), 1.0))
    assert "skipping checkpoint step-0000000002" in err and reason in err


def test_corrupt_latest_checkpoint_falls_back_and_still_matches(
    reference: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """End to end: a flipped byte in the newest checkpoint of a finished run; rerunning the
    last steps from the previous checkpoint gives the same final SAE."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    _flip_byte(run / "checkpoints" / f"step-{STEPS:010d}")
    code, err = run_cli(["train", "--resume", str(run)], capfd, caplog)
    assert code == 0, err
    assert f"skipping checkpoint step-{STEPS:010d}" in err and "checksum" in err
    assert_same_final(run, reference)
    assert metric_rows(run) == metric_rows(reference)


# -- full disk -------------------------------------------------------------------------------


def test_full_disk_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    assert manager.save({"step": 1}, 1, 10) is not None
    replace = os.replace

    def full_disk(src: Any, dst: Any) -> None:
        if Path(dst).name.startswith("step-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(drrik.checkpoint.os, "replace", full_disk)
    assert manager.save({"step": 2}, 2, 20) is None
    err = caplog.text
    assert "step 2 was not written (No space left on device)" in err
    assert "step-0000000001 is intact" in err
    monkeypatch.undo()
    latest = RunDir(tmp_path).latest_checkpoint()
    assert latest is not None and latest.path.name == "step-0000000001"
    assert not list((tmp_path / "checkpoints").glob(".*"))
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == {"step": 1}


def test_full_disk_during_training_continues_to_identical_weights(
    tiny_model_dir: Path,
    dataset_file: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    save = torch.save

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "step-0000000008" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(drrik.checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    code, err = run_cli(train_args(tiny_model_dir, dataset_file, out), capfd, caplog)
    assert code == 0, err
    assert "checkpoint at step 8 was not written (No space left on device)" in err
    assert "the previous checkpoint step-0000000004 is intact" in err
    assert_same_final(out, reference)
    assert checkpoint_steps(out) == [16, 20, 24]


# -- what a resume accepts and refuses -------------------------------------------------------


@pytest.fixture
def finished_copy(reference: Path, tmp_path: Path) -> Path:
    """A private copy of the finished reference run, to resume or damage."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def test_resume_with_changed_config_lists_differences(
    finished_copy: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    before = {p: p.read_bytes() for p in finished_copy.rglob("*") if p.is_file()}
    code, err = run_cli(["train", "--resume", str(finished_copy), "--lr", "0.01"], capfd, caplog)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "trainer.lr: 0.001 -> 0.01" in err
    assert {p: p.read_bytes() for p in finished_copy.rglob("*") if p.is_file()} == before


def test_resume_with_longer_budget_extends_the_run(
    finished_copy: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    longer = BATCH * (STEPS + 6)
    code, err = run_cli(
        ["train", "--resume", str(finished_copy), "--training-tokens", str(longer)], capfd, caplog
    )
    assert code == 0, err
    steps = [r[1] for r in metric_rows(finished_copy)]
    assert steps == list(range(LOG_STEPS, STEPS + 7, LOG_STEPS))
    meta = json.loads((finished_copy / "final" / "cfg.json").read_text())["metadata"]
    assert meta["training_tokens"] == longer
    assert checkpoint_steps(finished_copy)[-1] == STEPS + 6


def test_resume_of_missing_directory_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    code, err = run_cli(["train", "--resume", str(tmp_path / "nowhere")], capfd, caplog)
    assert code == 2
    assert err.startswith("drrik train: error: resume=") and "no drrik run there" in err
    assert len(err.strip().splitlines()) == 1


def test_checkpoint_from_newer_drrik_is_refused(
    finished_copy: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    manifest_path = finished_copy / "checkpoints" / f"step-{STEPS:010d}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["drrik_version"] = "99.0.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="written by drrik 99.0.0, newer than this drrik"):
        CheckpointManager(finished_copy, 3).load_latest()
    final_before = final_tensors(finished_copy)
    code, err = run_cli(["train", "--resume", str(finished_copy)], capfd, caplog)
    assert code == 2 and "upgrade drrik" in err
    for name, tensor in final_tensors(finished_copy).items():
        assert torch.equal(tensor, final_before[name])


def test_an_uninstalled_drrik_cannot_judge_versions_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path, keep=3)
    path = manager.save({"step": 1}, 1, 10)
    assert path is not None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["drrik_version"] == drrik.__version__  # read from the package metadata
    (path / "manifest.json").write_text(json.dumps(manifest | {"drrik_version": "99.0.0"}))
    monkeypatch.setattr(drrik.checkpoint, "DRRIK_VERSION", drrik.checkpoint.UNKNOWN_VERSION)
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == {"step": 1}
