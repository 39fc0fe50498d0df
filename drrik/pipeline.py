"""``drrik train`` as three steps a reader can see: assemble, train, export.

:func:`train` is the whole command. Around the three steps it keeps the run's outside world
informed: the config used is saved, the heartbeat says whether the run lives and how it
ended, and the wandb run is resumed, finished and given the exit code.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from drrik.assemble import assemble
from drrik.config import RunConfig
from drrik.evaluate import format_metrics, spliced_groups
from drrik.export import Metrics, export_run, save_together
from drrik.logs import get_logger
from drrik.run import Run
from drrik.trainer import Trainer, TrainingStopped
from drrik.wandb_logging import WandbLogger

log = get_logger(__name__)


def open_logger(run: Run) -> WandbLogger:
    """The run's wandb logger (disabled on ranks other than 0), resuming its wandb run."""
    cfg = run.cfg
    wandb_cfg = cfg.wandb if run.dist.is_main else replace(cfg.wandb, wandb_mode="disabled")
    run_id = run.checkpoints.latest_manifest().get("wandb_run_id")
    return WandbLogger(wandb_cfg, run.run_dir.path, cfg.to_dict(), run_id)


def final_rows(metrics: Metrics, tokens: int) -> list[dict[str, Any]]:
    """The final held-out metrics as rows for wandb, ``eval/<metric>`` per dictionary (and
    ``spliced_together``), as periodic evaluations log theirs, so runs compare on wandb."""
    return [
        {"sae": name, "tokens": tokens, **{f"eval/{k}": v for k, v in values.items()}}
        for name, values in metrics.items()
    ]


def train(
    cfg: RunConfig, *, model: Any = None, dataset: Any = None, verbose: bool = True
) -> Metrics:
    """Train the dictionaries ``cfg`` describes, evaluate them on held-out text and save
    them; returns the final metrics per dictionary (on rank 0; empty on other ranks).

    ``model`` (a loaded model or a name) and ``dataset`` replace the ones the config names.
    """
    return train_run(assemble(cfg, model=model, dataset=dataset, verbose=verbose))


def train_run(run: Run) -> Metrics:
    """Train an assembled run to its budget, evaluate and export it, and close it."""
    start = time.perf_counter()
    try:
        logger = open_logger(run)
        run.heartbeat("running")
        try:
            Trainer(run, logger).train()
            for learner in run.learners:  # feature slices come together on rank 0
                learner.gather_whole()
            metrics: Metrics = {}
            if run.evaluator is not None:
                targets = [learner.eval_target() for learner in run.learners]
                metrics, densities = run.evaluator(targets)
                export_run(run, metrics, densities, logger)
                if run.verbose:
                    log.info(format_metrics(metrics))
                if run.cfg.eval.eval_together:
                    settings = [learner.spec.setting for learner in run.learners]
                    together = {
                        name: run.evaluator.together(group)
                        for name, group in spliced_groups(targets, settings).items()
                    }
                    for name, values in together.items():
                        save_together(run, name, values)
                    if run.verbose:
                        log.info(format_metrics(together))
                    metrics |= together
                logger.log_rows(final_rows(metrics, run.progress.tokens))
                if run.verbose:
                    # Evaluation is full-depth passes over the vocabulary: say what it cost.
                    log.info(
                        f"held-out evaluation took {run.evaluator.seconds:.1f} s of the "
                        f"{time.perf_counter() - start:.1f} s spent training and evaluating"
                    )
                    log.info(f"saved to {run.run_dir.final_path.resolve()}")
        except TrainingStopped as exc:
            run.heartbeat("stopped")
            logger.finish(exc.exit_code)
            raise
        except BaseException:
            run.heartbeat("failed")
            logger.finish(1)
            raise
        run.heartbeat("finished")
        logger.finish()
        run.dist.wait_for_main()  # rank 0's evaluation and export, beyond NCCL's timeout
        return metrics
    finally:
        run.close()
