"""drrik: streaming sparse-autoencoder training on language-model activations.

The data path, module by module: :mod:`drrik.corpus` / :mod:`drrik.data` (text to token
contexts) -> :mod:`drrik.model` (hooked model) -> :mod:`drrik.store` with
:mod:`drrik.mixing_buffer` (shuffled activations) -> :mod:`drrik.sae` (the SAE family) ->
:mod:`drrik.trainer` (the loop) -> :mod:`drrik.checkpoint`, :mod:`drrik.evaluate` and
:mod:`drrik.run_dir` (what a run leaves behind).
"""

__version__ = "0.2.0"

from drrik.config import (  # noqa: E402  (the version must exist before submodules import it)
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    StoreConfig,
    TrainerConfig,
)
from drrik.errors import ConfigError  # noqa: E402
from drrik.model import load_model  # noqa: E402
from drrik.pipeline import train  # noqa: E402
from drrik.sae import SAE, SAEConfig, build_sae, load_sae  # noqa: E402
from drrik.store import ActivationBatch, ActivationsStore  # noqa: E402
from drrik.trainer import Trainer  # noqa: E402

_LAZY = {
    # The first drrik's names (see docs/migrating-from-drrik-0.1.md) and the analysis tools:
    # imported on first use, so ``import drrik`` does not load matplotlib.
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


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'drrik' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "SAE",
    "ActivationBatch",
    "ActivationsStore",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "RunConfig",
    "SAEConfig",
    "StoreConfig",
    "Trainer",
    "TrainerConfig",
    "__version__",
    "build_sae",
    "load_model",
    "load_sae",
    "train",
]
