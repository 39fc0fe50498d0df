"""The registry of SAE architectures: name -> :class:`~drrik.sae.base.SAE` subclass.

A leaf module (it imports no drrik code at run time), so the config can validate names
against it, the base class and every architecture can register into it, and saving can look
classes up in it, without any of them importing each other in a circle. It is filled by the
architecture modules that :mod:`drrik.sae` imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from drrik.sae.base import SAE
    from drrik.sae.config import SAEConfig

SAEType = TypeVar("SAEType", bound="type[SAE]")

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name (``SAEConfig.architecture``) -> SAE subclass. Filled by :func:`register`."""


def register(sae_cls: SAEType) -> SAEType:
    """Class decorator adding an architecture to :data:`ARCHITECTURES` under its name."""
    ARCHITECTURES[sae_cls.architecture] = sae_cls
    return sae_cls


CLT_CLASSES: dict[str, type[SAE]] = {}
"""A cross-layer transcoder's sparsity (its ``architecture``) -> CLT class. Filled by
:func:`register_clt`: a CLT shares its architecture's name, so it needs a table of its own."""


def register_clt(clt_cls: SAEType) -> SAEType:
    """Class decorator adding a cross-layer transcoder to :data:`CLT_CLASSES`."""
    CLT_CLASSES[clt_cls.architecture] = clt_cls
    return clt_cls


def sae_class(cfg: SAEConfig) -> type[SAE]:
    """The class that builds ``cfg``: its CLT class for ``dictionary="clt"``, else its
    architecture's."""
    table = CLT_CLASSES if cfg.dictionary == "clt" else ARCHITECTURES
    return table[cfg.architecture]
