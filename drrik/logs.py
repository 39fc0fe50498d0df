"""drrik's log: one named logger per module under the ``drrik`` root, shown on stderr.

Library code logs instead of printing, so an application can route, silence or format it
(``logging.getLogger("drrik").setLevel(logging.WARNING)``). Like transformers, drrik gives its
root logger a stderr handler of its own at INFO, unless ``DRRIK_VERBOSITY`` says otherwise, so
a script or notebook that configures nothing still sees progress lines.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "drrik"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at each record, so redirections made after
    import (pytest's capture, contextlib.redirect_stderr) see drrik's lines."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        """The stream is always the current stderr; StreamHandler's assignment is ignored."""


def _configure_root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        level = os.environ.get("DRRIK_VERBOSITY", "INFO").upper()
        root.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``), under drrik's configured root."""
    _configure_root()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
