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
from drrik.sae import SAE, SAEConfig, build_sae, load_sae  # noqa: E402
from drrik.store import ActivationBatch, ActivationsStore  # noqa: E402
from drrik.trainer import Trainer, train  # noqa: E402

__all__ = [
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
