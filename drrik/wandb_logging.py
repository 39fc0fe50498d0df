"""Weights & Biases logging that a long run can resume and that never carries a secret.

``WandbConfig`` (defined with the rest of the config in :mod:`drrik.training_config`, kept
importable here) is the part of a run's config that chooses where charts go; whether W&B is on
at all may also come from the environment (``WANDB_MODE``, see :mod:`drrik.settings`).
``WandbLogger`` is a no-op when W&B is disabled, so the trainer calls it unconditionally. A
resumed training run passes the W&B run id it saved, and its charts continue in the same run.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from drrik.config import WandbConfig
from drrik.errors import ConfigError
from drrik.settings import SECRETS, EnvironmentSettings, get_settings

# Keys every SAE's row of one step shares; they are logged once, unprefixed.
SHARED_KEYS = ("step", "tokens", "tokens_per_second", "elapsed_s")


def rows_to_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One logging step's metrics.jsonl rows (one per SAE) as one flat W&B dict.

    With several SAEs each one's keys are prefixed by its name (``k=16/loss``) so their curves
    sit side by side; the keys all rows share are logged once.
    """
    metrics: dict[str, Any] = {}
    for row in rows:
        prefix = f"{row['sae']}/" if len(rows) > 1 else ""
        for key, value in row.items():
            if key in SHARED_KEYS:
                metrics[key] = value
            elif key != "sae":
                metrics[prefix + key] = value
    return metrics


def _strings(tree: Any) -> list[str]:
    """Every string in a nested config, to look for secrets in it."""
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _strings(v)]
    if isinstance(tree, list | tuple):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


class WandbLogger:
    """One W&B run per training run; every method is a no-op when W&B is disabled.

    ``run_id`` resumes an earlier run (``resume="allow"``: an unknown id starts a new run with
    that id). Files go under ``run_dir/wandb``.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: str | Path,
        config: dict[str, Any],
        run_id: str | None = None,
        settings: EnvironmentSettings | None = None,
    ) -> None:
        settings = settings or get_settings()
        self.cfg = cfg
        self.mode = cfg.resolved_mode(settings)
        self._run: Any = None
        if self.mode == "disabled":
            return
        secrets = [s for s in (getattr(settings, name) for name in SECRETS) if s]
        if any(secret in text for text in _strings(config) for secret in secrets):
            raise ConfigError(
                "config", "<hidden>", "a config value contains a secret token; remove it"
            )
        settings.export_secrets()  # wandb reads WANDB_API_KEY from the environment only
        import wandb

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.resolved_project(settings),
            entity=cfg.wandb_entity or settings.wandb_entity,
            name=cfg.wandb_run_name,
            id=run_id,
            resume="allow",
            reinit="create_new",
            mode=self.mode,
            dir=str(run_dir),
            config=config,
        )

    @property
    def run(self) -> Any:
        """The ``wandb.Run``, or None when disabled or finished."""
        return self._run

    @property
    def run_id(self) -> str | None:
        """The id to save with checkpoints and pass back on resume; None when disabled."""
        return self._run.id if self._run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric values of ``metrics`` at ``step`` (tokens seen); others are dropped.

        NaN and Inf are kept: a diverging eval metric should show on the chart, not vanish.
        """
        if self._run is None:
            return
        self._run.log({k: v for k, v in metrics.items() if isinstance(v, numbers.Real)}, step=step)

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        """Log one step's metrics.jsonl rows at their ``tokens``, as :func:`rows_to_metrics`."""
        if rows:
            self.log(rows_to_metrics(rows), step=int(rows[0]["tokens"]))

    def log_histogram(self, name: str, values: torch.Tensor, step: int, num_bins: int = 64) -> None:
        """A histogram (e.g. log10 feature density) at ``step``; non-finite values are left out."""
        if self._run is None:
            return
        import wandb

        values = values.detach().float().flatten().cpu()
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return
        self._run.log({name: wandb.Histogram(values.numpy(), num_bins=num_bins)}, step=step)

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        """PNG files (name -> path) at ``step``; W&B copies them into the run."""
        if self._run is None:
            return
        import wandb

        self._run.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

    def log_artifact(self, directory: str | Path, name: str, type: str = "model") -> None:
        """Upload ``directory`` (a saved SAE) as an artifact, if ``wandb_log_artifact`` is on."""
        if self._run is None or not self.cfg.wandb_log_artifact:
            return
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", name), type=type)
        artifact.add_dir(str(directory))
        self._run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (a non-zero ``exit_code`` marks it failed); later calls do nothing."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
