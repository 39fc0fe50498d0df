"""drrik: streaming sparse-autoencoder training on language-model activations.

The data path, module by module: :mod:`drrik.corpus` / :mod:`drrik.data` (text to token
contexts) -> :mod:`drrik.model` (hooked model) -> :mod:`drrik.store` with
:mod:`drrik.mixing_buffer` (shuffled activations) -> :mod:`drrik.sae` (the SAE family) ->
:mod:`drrik.trainer` (the loop) -> :mod:`drrik.checkpoint`, :mod:`drrik.evaluate` and
:mod:`drrik.run_dir` (what a run leaves behind).

Every public name is imported on first use (PEP 562), so ``import drrik`` loads no torch,
matplotlib or datasets: a tool that only reads ``drrik.__version__`` or one config class
pays for nothing else.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

try:
    __version__ = importlib.metadata.version("drrik")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

_LAZY = {
    "ConfigError": "drrik.errors",
    "DataConfig": "drrik.config",
    "EvalConfig": "drrik.config",
    "ModelConfig": "drrik.config",
    "RunConfig": "drrik.config",
    "StoreConfig": "drrik.config",
    "TrainerConfig": "drrik.config",
    "load_model": "drrik.model",
    "SAE": "drrik.sae",
    "SAEConfig": "drrik.sae",
    "build_sae": "drrik.sae",
    "load_sae": "drrik.sae",
    "ActivationBatch": "drrik.store",
    "ActivationsStore": "drrik.store",
    "Trainer": "drrik.trainer",
    "train": "drrik.pipeline",
    "export_run": "drrik.export",
    # The first drrik's names (see docs/migrating-from-drrik-0.1.md) and the analysis tools.
    "SparseAutoencoder": "drrik.compat",
    "FeatureVisualizer": "drrik.compat",
    "ActivationExtractor": "drrik.compat",
    "Config": "drrik.compat",
    "SAESteering": "drrik.steering",
    "EnvironmentSettings": "drrik.settings",
    "get_settings": "drrik.settings",
    "WandbConfig": "drrik.wandb_logging",
    "FeatureAnalyzer": "drrik.analysis",
    "AnalysisConfig": "drrik.analysis",
    "AnalysisResults": "drrik.analysis",
    "analyze": "drrik.analysis",
    "write_report": "drrik.report",
}
"""Public name -> the module that defines it."""


def __getattr__(name: str) -> object:
    """Import the module behind a public name on first access, and keep the value. A
    submodule (``drrik.sae`` after a bare ``import drrik``) loads the same way."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'drrik' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", *_LAZY]
