"""The one table of dtype names a config may use (SAE parameters, model, activation buffer).

Configs hold names (they serialize to YAML and JSON); code that allocates tensors turns them
into torch dtypes here, so every field accepts the same names and says so in one way.
"""

from __future__ import annotations

import torch

from drrik.errors import require

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str, field: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name``; an unknown name is a ConfigError on ``field``."""
    require(name in DTYPES, field, name, f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]
