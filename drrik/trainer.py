"""The training loop: shuffled batches from the stores -> one step per dictionary -> metrics.

Read :meth:`Trainer.train` top to bottom: it is the whole algorithm. Each step pulls one
shuffled batch from every local data shard (all hooks from one forward pass) and lets every
:class:`~drrik.learner.Learner` take one optimizer step. Nothing reads a value back to the host
except at logging steps (every ``log_every_steps`` steps, and whenever an evaluation or a
checkpoint is due), when every learner's metric sums are fetched in one transfer, checked for
NaN/Inf and logged, and when the processes agree on a stop signal or the checkpoint clock.

One code path serves one process and many: in one process the collectives are identities.
Under torchrun each rank streams its own data shards; gradients, dead-feature masks and
metrics are reduced across ranks, so every rank holds the same dictionaries; rank 0 alone
evaluates and writes files.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from drrik.run import Run, save_checkpoint
from drrik.schedules import sparsity_warm_up
from drrik.signals import GracefulStop
from drrik.wandb_logging import WandbLogger


class TrainingStopped(RuntimeError):
    """A signal stopped the run after a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class Every:
    """A cadence: due once a counter reaches the next multiple of ``period`` (0: never)."""

    def __init__(self, period: float, now: float = 0.0) -> None:
        self.period = period
        self.next = self._after(now)

    def _after(self, now: float) -> float:
        return (now // self.period + 1) * self.period if self.period > 0 else math.inf

    def due(self, now: float) -> bool:
        """Whether ``now`` reached the next multiple; if so, the one after becomes next."""
        if now < self.next:
            return False
        self.next = self._after(now)
        return True


class Trainer:
    """Trains the dictionaries of an assembled :class:`~drrik.run.Run` to its token budget."""

    def __init__(
        self,
        run: Run,
        logger: WandbLogger,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.run, self.logger, self.clock = run, logger, clock
        self.stop = GracefulStop()

    def train(self) -> None:
        """The loop: one batch, one step per dictionary; log, evaluate, resample and
        checkpoint when due; on a stop signal, checkpoint and raise :class:`TrainingStopped`."""
        run, progress = self.run, self.run.progress
        cfg = run.cfg
        budget = cfg.trainer.training_tokens
        evals = Every(cfg.eval.eval_every_tokens, progress.tokens)
        resamples = Every(cfg.trainer.resample_every_tokens, progress.tokens)
        checkpoints = Every(cfg.checkpoint.checkpoint_every_tokens, progress.tokens)
        checkpoint_clock = Every(cfg.checkpoint.checkpoint_every_minutes * 60)
        started = self.window_start = self.clock()
        self.window_tokens = 0
        with self.stop, self._progress_bar() as bar:
            while progress.tokens < budget:
                acts = self._next_batch()
                warm_up = sparsity_warm_up(progress.step, cfg.trainer.l1_warm_up_steps)
                progress.step += 1
                for learner in run.learners:
                    learner.step(acts, warm_up, progress.step, run.batch_size, run.dist)
                progress.tokens += run.batch_size
                self.window_tokens += run.batch_size
                bar.update(run.batch_size)
                if resamples.due(progress.tokens):
                    for learner in run.learners:
                        learner.resample(acts, run.dist)
                eval_due = evals.due(progress.tokens)
                checkpoint_due = checkpoints.due(progress.tokens) or progress.tokens >= budget
                log_due = progress.step % cfg.trainer.log_every_steps == 0
                # One process stops at the step a signal comes; several agree on a signal (any
                # rank's) and the checkpoint clock (rank 0's) at logging steps, where they
                # synchronize anyway.
                stop_now = self.stop.received is not None and not run.dist.enabled
                if not (log_due or eval_due or checkpoint_due or stop_now):
                    continue
                stopping, clock_due = self._agree(
                    self.stop.received is not None,
                    checkpoint_clock.due(self.clock() - started),
                )
                self._log(warm_up, eval_due, bar)
                saved = None
                if checkpoint_due or clock_due or stopping:
                    saved = self.checkpoint()
                self.window_start, self.window_tokens = self.clock(), 0
                # A signal that arrives after the agreement (while logging, evaluating or
                # saving) stops the run at the next logging step, after its checkpoint.
                if stopping:
                    raise self._stopped(saved)

    def _progress_bar(self) -> tqdm:
        total = self.run.total_steps * self.run.batch_size
        return tqdm(
            total=total,
            initial=min(self.run.progress.tokens, total),
            unit="tok",
            unit_scale=True,
            disable=not self.run.verbose,
            dynamic_ncols=True,
            # The rate and ETA over the whole run: steps that refill the mixing buffer wait on
            # the model and the rest do not, so tqdm's moving average swung 5x and its ETA with it.
            smoothing=0,
        )

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's share of the global batch: its shards' batches, in shard order (with
        feature slices, its feature group's share, every rank's in rank order)."""
        batches = [store.next_batch().acts for store in self.run.stores]
        acts = batches[0]
        if len(batches) > 1:
            acts = {hook: torch.cat([b[hook] for b in batches]) for hook in batches[0]}
        features = self.run.dist.features
        if features is not None:  # a feature group trains on its ranks' rows together
            acts = {hook: features.gather_rows(rows) for hook, rows in acts.items()}
        return acts

    def _agree(self, stopping: bool, clock_due: bool) -> tuple[bool, bool]:
        """Whether any rank was signalled, and whether rank 0's clock says checkpoint."""
        run = self.run
        flags = torch.tensor(
            [float(stopping), float(clock_due and run.dist.is_main)],
            device=run.learners[0].sae.b_dec.device,
        )
        stop, clock = run.dist.max_(flags).tolist()
        return stop > 0, clock > 0

    def _log(self, warm_up: float, eval_due: bool, bar: tqdm) -> None:
        """Fetch every learner's sums in one transfer (reduced over ranks), check them, log
        them (with a held-out evaluation when due) to metrics.jsonl, wandb and the bar."""
        run, progress = self.run, self.run.progress
        seconds = max(self.clock() - self.window_start, 1e-9)
        progress.elapsed += seconds
        pending = [learner.pending() for learner in run.learners]
        sums = run.dist.average_(torch.cat([s for _, s, _ in pending])).tolist()
        flags = run.dist.max_(torch.cat([f for _, _, f in pending])).tolist()
        rows = []
        for learner, (names, _, _) in zip(run.learners, pending, strict=True):
            row = learner.row(names, sums[: len(names)], flags[:3], warm_up)
            sums, flags = sums[len(names) :], flags[3:]
            rows.append(
                {
                    "step": progress.step,
                    "tokens": progress.tokens,
                    "tokens_per_second": self.window_tokens / seconds,  # counts every rank
                    "elapsed_s": progress.elapsed,
                    **row,
                }
            )
        # Every rank gathers its feature slices; rank 0 evaluates the whole dictionaries.
        wholes = [learner.whole_sae() for learner in run.learners] if eval_due else []
        if not run.dist.is_main:
            if eval_due:
                run.dist.wait_for_main()  # rank 0 evaluates alone
            return
        if eval_due:
            self._add_eval(rows, wholes)
        run.run_dir.append_metrics(rows)
        self.logger.log_rows(rows)
        run.heartbeat("running")
        bar.set_postfix(_postfix(rows[0]))
        if eval_due:
            run.dist.wait_for_main()

    def _add_eval(self, rows: list[dict[str, Any]], wholes: list[Any]) -> None:
        """Held-out metrics of every dictionary (``wholes``: each one whole) into its row,
        densities to wandb (rank 0)."""
        run = self.run
        assert run.evaluator is not None, "rank 0 holds the evaluator"
        run.heartbeat("running")  # an evaluation can outlast the stale limit
        start = self.clock()
        targets = [
            learner.eval_target(sae) for learner, sae in zip(run.learners, wholes, strict=True)
        ]
        metrics, densities = run.evaluator(targets)
        seconds = self.clock() - start  # of every dictionary's evaluation, next to elapsed_s
        for row in rows:
            row.update({f"eval/{k}": v for k, v in metrics[row["sae"]].items()})
            row["eval/seconds"] = seconds
            prefix = f"{row['sae']}/" if len(rows) > 1 else ""
            density = torch.log10(densities[row["sae"]] + 1e-10)
            self.logger.log_histogram(
                f"{prefix}eval/log10_feature_density", density, run.progress.tokens
            )

    def checkpoint(self) -> Path | None:
        """Write a checkpoint now; its path on rank 0, None where it failed."""
        run_id = self.logger.run_id
        return save_checkpoint(self.run, {"wandb_run_id": run_id} if run_id else {})

    def _stopped(self, saved: Path | None) -> TrainingStopped:
        run, signum = self.run, self.stop.received or signal.SIGTERM
        if not run.dist.is_main:
            outcome = "rank 0 wrote the checkpoint"
        elif saved is not None:
            outcome = "checkpoint saved"
        else:
            outcome = "the checkpoint could NOT be written (see above), a resume starts earlier"
        return TrainingStopped(
            f"stopped by signal {signal.Signals(signum).name} at step {run.progress.step} "
            f"({run.progress.tokens:,} tokens); {outcome}. Resume with: "
            f"drrik train --resume {run.run_dir.path}",
            signum,
        )


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    return {
        "loss": f"{row['loss']:.4g}",
        "L0": f"{row['l0']:.1f}",
        "EV": f"{row['explained_variance']:.3f}",
        "tok/s": f"{row['tokens_per_second']:.0f}",
    }
