"""The one exception type users see for bad input, and the helpers that produce it.

Every check that can fail before heavy work raises :class:`ConfigError` with a one-line
message naming the field, the bad value and the fix; the CLI prints it without a traceback.
Libraries report bad input in their own types (datasets, yaml, safetensors, json, torch's
device parsing), deep in a traceback that names neither the file nor the flag: the helpers
here turn those into a :class:`ConfigError` at the place that knows which file or field it is.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DESCRIBE_LIMIT = 200
"""Characters of a library's message kept in a one-line error."""


class ConfigError(ValueError):
    """Bad user input: a config field, a path, a model or a dataset that cannot work."""

    def __init__(self, field: str, value: Any, fix: str) -> None:
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"{field}={value!r}: {fix}")


def require(condition: bool, field: str, value: Any, fix: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, value, fix)


def describe(exc: BaseException, limit: int = DESCRIBE_LIMIT) -> str:
    """A library error as one short line, from its root cause.

    Libraries wrap the informative error in a generic one (datasets' "An error occurred while
    generating the dataset" wraps arrow's "JSON parse error ... in row 1"), so the innermost
    ``__cause__`` is the one worth showing.
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def reading(field: str, value: Any, fix: str, problem: str = "cannot read it") -> Iterator[None]:
    """Re-raise any error inside the block as ``ConfigError(field, value, problem (cause); fix)``.

    Keep the block to the one library call that reads ``value``: there, every failure means
    the input is bad, whatever type the library raises for it. A :class:`ConfigError` from
    inside (a bad value read from ``value``) keeps its field and says where it was read.
    """
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(exc.field, exc.value, f"{exc.fix} (in {value})") from exc
    except Exception as exc:  # one cause (unreadable input) arrives as many library types
        raise ConfigError(field, value, f"{problem} ({describe(exc)}); {fix}") from exc


def read_json(path: Path, fix: str, field: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; missing, damaged or non-object content is a ConfigError."""
    with reading(field, str(path), fix):
        value = json.loads(Path(path).read_text())
    require(isinstance(value, dict), field, str(path), f"it holds no JSON object; {fix}")
    return value


def read_yaml(path: Path, fix: str, field: str = "config") -> Any:
    """Parsed YAML from ``path``; a syntax error names its line and column."""
    try:
        text = Path(path).read_text()
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise ConfigError(field, str(path), f"invalid YAML at {where} ({problem}); {fix}") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(field, str(path), f"cannot read it ({describe(exc)}); {fix}") from exc


DEVICE_FIX = "use cpu, cuda, cuda:N or mps"


def check_device(device: str, field: str = "device") -> None:
    """Refuse a device this machine does not have, before any model or data is loaded.

    Without this, ``cuda:7`` on a CPU-only machine fails deep in the first ``.to(device)`` with
    "AssertionError: Torch not compiled with CUDA enabled", after the model has loaded.
    """
    import torch  # here, not at the top: ConfigError alone must not cost torch's start-up

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(field, device, f"not a device name; {DEVICE_FIX}") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > 0, field, device, "this machine has no usable CUDA GPU; use cpu")
        require(
            parsed.index is None or parsed.index < count,
            field,
            device,
            f"this machine has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}",
        )
        return
    if parsed.type == "mps":
        require(torch.backends.mps.is_available(), field, device, "MPS is not available; use cpu")
        return
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    require(
        callable(available) and bool(available()),
        field,
        device,
        f"this machine has no {parsed.type} device; {DEVICE_FIX}",
    )
