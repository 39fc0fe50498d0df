"""Sparse autoencoders: one interface (:class:`SAE`), one file per architecture.

Adding an architecture = a new module with an ``@register``-ed :class:`SAE` subclass, and its
import below. The config validates names (and ``k`` / ghost-grad support, decoder-norm
default) against the registry (:mod:`drrik.sae.registry`), so nothing else changes.
"""

from __future__ import annotations

import torch

from drrik.sae import (  # noqa: F401  (registration)
    batchtopk,
    clt,
    gated,
    jumprelu,
    matryoshka,
    relu,
    topk,
)
from drrik.sae.base import SAE, SparseTrainOutput, TrainOutput
from drrik.sae.batchtopk import BatchTopKSAE
from drrik.sae.clt import CrossLayerTranscoder
from drrik.sae.config import SAEConfig
from drrik.sae.dead_features import DeadFeatureTracker, resample_dead_features
from drrik.sae.gated import GatedSAE
from drrik.sae.jumprelu import JumpReLUSAE
from drrik.sae.matryoshka import MatryoshkaBatchTopKSAE
from drrik.sae.registry import ARCHITECTURES, register
from drrik.sae.relu import ReLUSAE
from drrik.sae.saving import load_sae, load_sparsity, save_sae
from drrik.sae.topk import TopKSAE

KNOWN_ARCHITECTURES: tuple[str, ...] = tuple(ARCHITECTURES)


def build_sae(cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
    """Build a freshly initialized SAE for ``cfg`` (seed torch first for reproducibility)."""
    return SAE.from_config(cfg, device=device)


__all__ = [
    "ARCHITECTURES",
    "KNOWN_ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "CrossLayerTranscoder",
    "DeadFeatureTracker",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "SAEConfig",
    "TopKSAE",
    "SparseTrainOutput",
    "TrainOutput",
    "build_sae",
    "load_sae",
    "load_sparsity",
    "register",
    "resample_dead_features",
    "save_sae",
]
