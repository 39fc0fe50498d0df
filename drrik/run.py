"""A run in memory: the pieces that train together, and their state in a checkpoint.

:func:`drrik.assemble.assemble` builds a :class:`Run`; the trainer trains it and export saves
its dictionaries. Its checkpoint state is the progress counters, every learner's dictionary,
optimizer, schedule and dead-feature tracker, every RNG, and each data shard's stream
position and mixing buffer. Each rank writes its own shards' part; rank 0 gathers their
names and checksums (never the buffers) and writes the rest around them (see
:mod:`drrik.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drrik.checkpoint import CheckpointManager
from drrik.config import RunConfig
from drrik.distributed import Distributed
from drrik.errors import ConfigError
from drrik.evaluate import Evaluator
from drrik.learner import Learner
from drrik.rng import rng_state, set_rng_state
from drrik.run_dir import RunDir
from drrik.run_lock import RunLock


@dataclass
class Progress:
    """How far the run got: optimizer steps, training tokens (all ranks), training seconds."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0


@dataclass
class Run:
    """A run ready to train: everything :func:`assemble` builds, held in one place."""

    cfg: RunConfig
    """The config as used: data shards and model dtype resolved; saved with the run."""
    dist: Distributed
    run_dir: RunDir
    stores: list[Any]
    """This rank's activations stores, one per data shard, in shard order."""
    shards: list[int]
    learners: list[Learner]
    checkpoints: CheckpointManager
    evaluator: Evaluator | None
    """The held-out evaluation (rank 0 only)."""
    model: Any = None
    lock: RunLock | None = None
    """Rank 0's hold on the run directory, released by :meth:`close`."""
    progress: Progress = field(default_factory=Progress)
    verbose: bool = True

    @property
    def batch_size(self) -> int:
        """Training tokens per step, over every rank and shard."""
        return self.cfg.store.train_batch_size_tokens * self.cfg.distributed.data_shards

    @property
    def total_steps(self) -> int:
        return math.ceil(self.cfg.trainer.training_tokens / self.batch_size)

    def heartbeat(self, state: str) -> None:
        """Tell ``drrik status`` this run lives (or how it ended); rank 0 writes it."""
        if self.dist.is_main:
            self.run_dir.write_heartbeat(state)

    def close(self) -> None:
        """Stop the stores' producer threads and leave the process group (every path)."""
        for store in self.stores:
            store.close()
        if self.lock is not None:
            self.lock.release()
        self.dist.close()


def store_part(shard: int) -> str:
    """The checkpoint file holding one data shard's stream position and mixing buffer."""
    return f"store-{shard:05d}.pt"


def slice_part(slot: int, index: int, count: int) -> str:
    """The checkpoint file holding one feature slice of one dictionary (its parameters,
    optimizer moments and dead-feature counters)."""
    return f"slot-{slot:03d}-features-{index:03d}-of-{count:03d}.pt"


def _slot_state(run: Run, slot: int, learner: Learner) -> dict[str, Any]:
    """A dictionary's state in ``state.pt``: all of it, or the names of its slices' parts."""
    features = run.dist.features
    if features is None:
        return learner.state_dict()
    count = features.count
    return {"name": learner.name, "slices": [slice_part(slot, j, count) for j in range(count)]}


def run_state(run: Run) -> dict[str, Any]:
    """Everything but the data shards and feature slices, which each rank writes apart."""
    return {
        "step": run.progress.step,
        "tokens": run.progress.tokens,
        "elapsed": run.progress.elapsed,
        "slots": [_slot_state(run, i, learner) for i, learner in enumerate(run.learners)],
        "store_parts": {
            shard: store_part(shard) for shard in range(run.cfg.distributed.data_shards)
        },
        "rng": rng_state(),
        "config": run.cfg.to_dict(),
    }


def save_checkpoint(run: Run, extra: dict[str, Any]) -> Path | None:
    """Write a checkpoint of ``run`` from every rank; its path on rank 0, or None where the
    write failed (the previous checkpoint is then intact) and on the other ranks.

    ``extra`` goes into the manifest (the wandb run id), readable without loading the state.
    """
    step = run.progress.step
    parts = [
        run.checkpoints.write_part(step, store_part(shard), store.state_dict())
        for shard, store in zip(run.shards, run.stores, strict=True)
    ]
    features = run.dist.features
    if features is not None and run.dist.rank < features.count:  # the first data group's
        parts += [
            run.checkpoints.write_part(
                step, slice_part(i, features.index, features.count), learner.state_dict()
            )
            for i, learner in enumerate(run.learners)
        ]
    gathered = run.dist.gather(parts)
    path = None
    if gathered is not None:
        every_part = [part for per_rank in gathered for part in per_rank]
        path = run.checkpoints.save(run_state(run), step, run.progress.tokens, extra, every_part)
    run.dist.wait_for_main()  # rank 0 wrote alone
    return path


def restore(run: Run) -> bool:
    """Load the newest good checkpoint into ``run``; False when there is none."""
    restored = run.checkpoints.load_latest()
    if restored is None:
        return False
    state, _ = restored
    n_shards = run.cfg.distributed.data_shards
    saved_shards = len(state["store_parts"])
    if saved_shards != n_shards:
        raise ConfigError(
            "data_shards",
            n_shards,
            f"the checkpoint holds {saved_shards} data shards; resume with "
            f"--data-shards {saved_shards} and a process count that divides it",
        )
    run.progress.step, run.progress.tokens = state["step"], state["tokens"]
    run.progress.elapsed = state["elapsed"]
    for learner, saved in zip(run.learners, state["slots"], strict=True):
        slices = saved.get("slices")
        parts = [saved] if slices is None else [run.checkpoints.load_part(n) for n in slices]
        learner.load_state_dict(learner.resliced(parts))
    for shard, store in zip(run.shards, run.stores, strict=True):
        store.load_state_dict(run.checkpoints.load_part(state["store_parts"][shard]))
    set_rng_state(state["rng"])
    return True
