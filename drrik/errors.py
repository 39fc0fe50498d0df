"""The one exception type users see for bad input.

Every check that can fail before heavy work raises :class:`ConfigError` with a one-line
message naming the field, the bad value and the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad user input: a config field, a path, a model or a dataset that cannot work."""

    def __init__(self, field: str, value: Any, fix: str) -> None:
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


def require(condition: bool, field: str, value: Any, fix: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, fix)
