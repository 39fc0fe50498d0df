"""The first drrik's public names, mapped onto the streaming design.

``from drrik import SparseAutoencoder, FeatureVisualizer, SAESteering, ActivationExtractor,
Config, EnvironmentSettings, WandbConfig, get_settings`` keeps working. What each name is now,
and what changed, is in docs/migrating-from-drrik-0.1.md:

- ``SparseAutoencoder`` is :class:`drrik.sae.SAE` (build one with ``build_sae(SAEConfig(...))``,
  load one with ``SparseAutoencoder.load(dir)``); training is ``drrik train`` / ``train(cfg)``.
- ``Config`` is :class:`drrik.config.RunConfig`.
- ``FeatureVisualizer`` draws the plots of a run from its saved analysis, not from an in-memory
  activation matrix.
- ``ActivationExtractor`` pulls a bounded number of activations through the streaming store
  and saves them as safetensors (never pickle).
- ``EnvironmentSettings``/``get_settings`` (:mod:`drrik.settings`), ``WandbConfig``
  (:mod:`drrik.wandb_logging`) and ``SAESteering`` (:mod:`drrik.steering`) are re-exported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from drrik import plots
from drrik.analysis import AnalysisResults, analyze
from drrik.config import (
    DEFAULT_HOOK,
    DEFAULT_MODEL,
    DataConfig,
    RunConfig,
    StoreConfig,
    WandbConfig,
)
from drrik.errors import require
from drrik.model import load_model
from drrik.report import REPORT_DIR, write_report
from drrik.run_dir import RunDir
from drrik.sae import SAE
from drrik.saved import SavedSAE
from drrik.settings import EnvironmentSettings, get_settings
from drrik.steering import SAESteering
from drrik.store import ActivationsStore

SparseAutoencoder = SAE
Config = RunConfig
ACTIVATIONS_FILE = "activations.safetensors"


class FeatureVisualizer:
    """Plots of one run (or saved SAE) and its features, written as PNGs.

    Reads the run's saved analysis (``drrik analyze``), running one with default settings when
    there is none. Every method writes a PNG (under ``output_dir``, default the run's
    ``report/plots``) and returns its path; with ``wandb_run`` each plot is also logged there.
    """

    def __init__(
        self,
        run_dir: str | Path,
        output_dir: str | Path | None = None,
        *,
        sae_name: str | None = None,
        wandb_run: Any = None,
    ) -> None:
        self.saved = SavedSAE.locate(run_dir, sae_name)
        self.output_dir = (
            Path(output_dir) if output_dir else self.saved.output_dir(REPORT_DIR) / "plots"
        )
        self.wandb_run = wandb_run
        self._results: AnalysisResults | None = None

    @property
    def results(self) -> AnalysisResults:
        if self._results is None:
            self._results = (
                self.saved.load_analysis()
                if self.saved.has_analysis()
                else analyze(self.saved.output_root, sae_name=self.saved.name)
            )
        return self._results

    def _done(self, name: str, path: Path) -> Path:
        if self.wandb_run is not None:
            plots.log_to_wandb(self.wandb_run, {name: path})
        return path

    def _path(self, save_path: str | Path | None, default: str) -> Path:
        return Path(save_path) if save_path else self.output_dir / default

    def plot_feature_density(self, save_path: str | Path | None = None) -> Path:
        path = self._path(save_path, "feature_density.png")
        return self._done("feature_density", plots.plot_feature_density(self.results.density, path))

    def plot_activation_histogram(
        self, feature_idx: int, save_path: str | Path | None = None
    ) -> Path:
        path = self._path(save_path, f"feature_{feature_idx}_histogram.png")
        counts, edges = self.results.histogram(feature_idx)
        drawn = plots.plot_activation_histogram(counts, edges, path, f"Feature {feature_idx}")
        return self._done(f"feature_{feature_idx}_histogram", drawn)

    def plot_training_curves(self, save_path: str | Path | None = None) -> Path:
        require(self.saved.run_dir is not None, "run_dir", "", "a bare SAE has no training log")
        rows = RunDir(self.saved.run_dir).read_metrics()  # type: ignore[arg-type]
        path = self._path(save_path, "training_curves.png")
        return self._done("training_curves", plots.plot_training_curves(rows, path))

    def plot_top_features(
        self, n_features: int = 10, by: str = "density", save_path: str | Path | None = None
    ) -> Path:
        values = {
            "density": self.results.density,
            "max": self.results.max_activation,
            "mean": self.results.mean_activation,
        }
        require(by in values, "by", by, f"use one of {tuple(values)}")
        path = self._path(save_path, f"top_features_by_{by}.png")
        drawn = plots.plot_top_features(values[by], path, by=by, n_features=n_features)
        return self._done(f"top_features_by_{by}", drawn)

    def create_feature_dashboard(self, feature_idx: int) -> Path:
        """The HTML report with this feature's page; returns the ``index.html`` path."""
        return write_report(
            self.saved.output_root, features=[feature_idx], sae_name=self.saved.name
        )

    def save_all(self, n_features: int = 10) -> Path:
        """The full HTML report (all plots, ``n_features`` feature pages); returns its path."""
        return write_report(
            self.saved.output_root,
            n_features=n_features,
            sae_name=self.saved.name,
            wandb_run=self.wandb_run,
        )


class ActivationExtractor:
    """A bounded number of activations at one hook, for small in-memory experiments.

    Built on the streaming :class:`~drrik.store.ActivationsStore`: activations are shuffled
    across contexts, BOS/EOS/pad positions are dropped, and exactly ``num_tokens`` rows come
    back (with their token ids). For SAE training use ``drrik train``, which streams instead.
    """

    def __init__(
        self,
        model_name: str | Any = DEFAULT_MODEL,
        dataset_name: str = "drrik-offline",
        dataset_config: str | None = None,
        split: str = "train",
        num_tokens: int = 16_384,
        text_column: str | None = None,
        max_length: int = 128,
        hook: str = DEFAULT_HOOK,
        batch_size: int = 16,
        output_dir: str | Path | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        require(num_tokens > 0, "num_tokens", num_tokens, "use a positive number")
        self.model_name, self.hook, self.device, self.seed = model_name, hook, device, seed
        self.num_tokens, self.batch_size = num_tokens, batch_size
        self.data_cfg = DataConfig(
            dataset=dataset_name,
            dataset_config=dataset_config,
            split=split,
            text_column=text_column,
            context_size=max_length,
        )
        self.output_dir = Path(output_dir) if output_dir else None

    def extract(self, num_tokens: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """``([num_tokens, d_in] activations, metadata)``; ``metadata["tokens"]`` holds the ids."""
        n = num_tokens or self.num_tokens
        per_refill = self.batch_size * self.data_cfg.context_size
        batch = min(n, 4096)
        store_cfg = StoreConfig(
            train_batch_size_tokens=batch,
            n_batches_in_buffer=max(1, math.ceil(2 * batch / per_refill)),
            store_batch_size_prompts=self.batch_size,
        )
        model = load_model(self.model_name, device=self.device)
        store = ActivationsStore(
            model, [self.hook], self.data_cfg, store_cfg, seed=self.seed, verbose=False
        )
        acts, tokens, have = [], [], 0
        try:
            while have < n:
                got = store.next_batch()
                acts.append(got.acts[self.hook][: n - have].cpu())
                tokens.append(got.tokens[: n - have].cpu())
                have += acts[-1].shape[0]
        finally:
            store.close()
        name = self.model_name if isinstance(self.model_name, str) else type(model).__name__
        metadata = {
            "model_name": name,
            "hook_name": self.hook,
            "dataset_path": self.data_cfg.dataset,
            "context_size": self.data_cfg.context_size,
            "num_tokens": n,
            "tokens": torch.cat(tokens),
        }
        return torch.cat(acts), metadata

    def save_activations(
        self, activations: Tensor, metadata: dict[str, Any], output_dir: str | Path | None = None
    ) -> Path:
        """Write ``activations.safetensors`` (tensors; other metadata as JSON in its header)."""
        target = Path(output_dir) if output_dir else self.output_dir
        require(target is not None, "output_dir", None, "say where to save the activations")
        target.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        tensors = {"activations": activations.contiguous()}
        if isinstance(metadata.get("tokens"), Tensor):
            tensors["tokens"] = metadata["tokens"].contiguous()
        info = {k: v for k, v in metadata.items() if not isinstance(v, Tensor)}
        path = target / ACTIVATIONS_FILE  # type: ignore[operator]
        save_file(tensors, str(path), metadata={"drrik": json.dumps(info)})
        return path

    @staticmethod
    def load_activations(path: str | Path) -> tuple[Tensor, dict[str, Any]]:
        """Inverse of :meth:`save_activations` (a file, or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / ACTIVATIONS_FILE
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads((f.metadata() or {}).get("drrik", "{}"))
            if "tokens" in f.keys():
                metadata["tokens"] = f.get_tensor("tokens")
            return f.get_tensor("activations"), metadata


__all__ = [
    "ActivationExtractor",
    "Config",
    "EnvironmentSettings",
    "FeatureVisualizer",
    "SAESteering",
    "SparseAutoencoder",
    "WandbConfig",
    "get_settings",
]
