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

SAEType = TypeVar("SAEType", bound="type[SAE]")

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name (``SAEConfig.architecture``) -> SAE subclass. Filled by :func:`register`."""


def register(sae_cls: SAEType) -> SAEType:
    """Class decorator adding an architecture to :data:`ARCHITECTURES` under its name."""
    ARCHITECTURES[sae_cls.architecture] = sae_cls
    return sae_cls
