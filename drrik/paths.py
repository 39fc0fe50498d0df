"""Where drrik keeps files it can rebuild (the offline corpus, converted models).

One function so every cache lands under one directory the user can find, move or delete.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return drrik's cache directory; it is not created here.

    ``$DRRIK_CACHE`` wins so tests and clusters can redirect everything at once; otherwise the
    XDG base-directory rule applies (``$XDG_CACHE_HOME/drrik``, a relative value being ignored
    as the spec requires) with ``~/.cache/drrik`` as the fallback.
    """
    override = os.environ.get("DRRIK_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "drrik"
    return Path.home() / ".cache" / "drrik"
