"""The training loop's scheduling, with a stand-in store and no model: which steps log,
evaluate, resample and checkpoint, on tokens, on the clock and on a signal."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from drrik.checkpoint import CheckpointManager
from drrik.config import (
    CheckpointConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.distributed import Distributed
from drrik.learner import Learner
from drrik.run import Run
from drrik.run_dir import RunDir
from drrik.sae import SAEConfig
from drrik.store import ActivationBatch
from drrik.trainer import Every, Trainer, TrainingStopped
from drrik.wandb_logging import WandbConfig, WandbLogger

BATCH, D_IN, HOOK = 32, 8, "blocks.0.hook_resid_post"


class StandInStore:
    """Serves random activations; counts the batches served; ``on_batch`` runs before each."""

    def __init__(self, on_batch: Any = None) -> None:
        self.served = 0
        self.generator = torch.Generator().manual_seed(0)
        self.on_batch = on_batch

    def next_batch(self) -> ActivationBatch:
        if self.on_batch is not None:
            self.on_batch(self.served + 1)
        self.served += 1
        acts = torch.randn(BATCH, D_IN, generator=self.generator)
        return ActivationBatch({HOOK: acts}, torch.zeros(BATCH, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        return {"served": self.served}

    def close(self) -> None:
        pass


class StandInEvaluator:
    """Records the step of every evaluation and returns fixed metrics."""

    def __init__(self, run: list[Run]) -> None:
        self.run, self.steps = run, []

    def __call__(self, targets: list[Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        self.steps.append(self.run[0].progress.step)
        d_sae = targets[0].sae.d_sae
        return {t.name: {"l0": 1.0} for t in targets}, {t.name: torch.zeros(d_sae) for t in targets}


def make_run(tmp_path: Path, store: StandInStore, **sections: dict[str, Any]) -> Run:
    cfg = RunConfig(
        model=ModelConfig(hook=[HOOK]),
        store=StoreConfig(train_batch_size_tokens=BATCH, n_batches_in_buffer=8),
        sae=SAEConfig(architecture="relu", d_sae=16),
        trainer=TrainerConfig(
            **{"training_tokens": BATCH * 12, "log_every_steps": 4, **sections.get("trainer", {})}
        ),
        eval=EvalConfig(**sections.get("eval", {})),
        checkpoint=CheckpointConfig(
            **{"checkpoint_every_minutes": 0, **sections.get("checkpoint", {})}
        ),
        out=str(tmp_path),
    )
    cfg.distributed.data_shards = 1
    holder: list[Run] = []
    run = Run(
        cfg,
        Distributed(),
        RunDir(tmp_path),
        [store],
        [0],
        [],
        CheckpointManager(tmp_path, keep=100),
        StandInEvaluator(holder),  # type: ignore[arg-type]
        verbose=False,
    )
    holder.append(run)
    (spec,) = cfg.dictionaries()
    spec = replace(spec, sae=replace(spec.sae, d_in=D_IN))
    run.learners.append(Learner.build(spec, cfg.trainer, run.total_steps, torch.device("cpu")))
    return run


def logger(tmp_path: Path) -> WandbLogger:
    return WandbLogger(WandbConfig(wandb_mode="disabled"), tmp_path, {})


def checkpoint_steps(run: Run) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in run.run_dir.checkpoints())


def test_every_is_due_at_each_multiple_once_and_never_for_zero() -> None:
    every = Every(10, now=15)
    assert [now for now in range(15, 50, 4) if every.due(now)] == [23, 31, 43]
    assert not any(Every(0).due(now) for now in range(100))


def test_logs_evals_resamples_and_checkpoints_fall_on_their_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resampled: list[int] = []
    run = make_run(
        tmp_path,
        StandInStore(),
        trainer={"resample_every_tokens": BATCH * 3},
        eval={"eval_every_tokens": BATCH * 5},
        checkpoint={"checkpoint_every_tokens": BATCH * 6},
    )
    monkeypatch.setattr(
        Learner, "resample", lambda self, acts, dist: resampled.append(run.progress.step)
    )
    Trainer(run, logger(tmp_path)).train()

    rows = run.run_dir.read_metrics()
    assert [r["step"] for r in rows] == [4, 5, 6, 8, 10, 12]  # every 4, and each eval/save
    assert [r["step"] for r in rows if "eval/l0" in r] == [5, 10]
    assert run.evaluator.steps == [5, 10]  # type: ignore[union-attr]
    assert resampled == [3, 6, 9, 12]
    assert checkpoint_steps(run) == [6, 12]  # every 6 steps, and at the end of the budget
    assert run.stores[0].served == 12 and run.progress.tokens == BATCH * 12


def test_the_checkpoint_clock_is_read_at_logging_steps(tmp_path: Path) -> None:
    ticks = iter(range(0, 10_000, 20))  # each reading of the clock is 20 s later
    run = make_run(tmp_path, StandInStore(), checkpoint={"checkpoint_every_minutes": 1})
    Trainer(run, logger(tmp_path), clock=lambda: float(next(ticks))).train()
    saved = checkpoint_steps(run)
    assert saved[-1] == 12 and len(saved) >= 2
    assert all(step % 4 == 0 for step in saved), "a clock checkpoint waits for a logging step"


def test_a_signal_stops_at_that_step_with_a_checkpoint(tmp_path: Path) -> None:
    trainer: list[Trainer] = []

    def signal_before(batch: int) -> None:
        if batch == 7:
            trainer[0].stop.received = signal.SIGTERM

    run = make_run(tmp_path, StandInStore(signal_before))
    trainer.append(Trainer(run, logger(tmp_path)))
    with pytest.raises(TrainingStopped, match="at step 7 .*checkpoint saved") as stopped:
        trainer[0].train()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint_steps(run) == [7]


def test_a_failed_checkpoint_on_a_signal_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer: list[Trainer] = []

    def signal_before(batch: int) -> None:
        if batch == 3:
            trainer[0].stop.received = signal.SIGINT

    run = make_run(tmp_path, StandInStore(signal_before))
    monkeypatch.setattr(CheckpointManager, "save", lambda *args: None)
    trainer.append(Trainer(run, logger(tmp_path)))
    with pytest.raises(TrainingStopped, match="could NOT be written") as stopped:
        trainer[0].train()
    assert "checkpoint saved" not in str(stopped.value)
