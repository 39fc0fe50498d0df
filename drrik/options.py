"""Options of the commands other than ``train``, and the YAML reading every command shares.

Each command's options are one documented dataclass that ``drrik.cli`` turns into flags with
simple-parsing, and the Python API shares them, so the two cannot drift apart:
:func:`drrik.analysis.analyze` takes the :class:`AnalysisConfig` that ``drrik analyze`` and
``drrik report`` parse, and :mod:`drrik.steering` checks modes and units against the same
``Literal`` types that ``drrik steer`` offers.
Choices are ``Literal`` types: ``--help`` lists them and :func:`check_choices` refuses others
in Python. This module imports neither torch nor any runtime module, so ``drrik status`` and
every ``--help`` stay fast.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from simple_parsing.helpers import Serializable
from simple_parsing.helpers import field as flag

from drrik.errors import read_yaml, reading, require
from drrik.logs import get_logger

log = get_logger(__name__)

S = TypeVar("S", bound=Serializable)
SteerMode = Literal["add", "clamp"]
SteerUnits = Literal["max", "absolute"]
ExportFormat = Literal["circuit-tracer"]
_BOOLS = {"true": True, "false": False}
"""How a bool is written where values are text (a sweep's values, a quoted YAML value)."""
_EXPECTED = {bool: "true or false", str: "a string", int: "a whole number", float: "a number"}


def deprecated(old: str, new: str) -> None:
    """One stderr line for an old spelling that still works."""
    log.warning(f"drrik: {old} is deprecated; write {new}")


def split_legacy(values: list[str], sep: str, flag: str) -> list[str]:
    """``values`` with each old one-string list (``"a,b"``) split at ``sep``, with a warning."""
    out: list[str] = []
    for value in values:
        parts = [p.strip() for p in value.split(sep) if p.strip()]
        if len(parts) > 1:
            deprecated(f"{flag} {value}", f"{flag} {' '.join(parts)}")
        out += parts
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their types (its ClassVars left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def choices(hint: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` type allows; empty for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def check_choices(obj: Any) -> None:
    """Refuse a ``Literal`` field holding a value outside its choices (Python does not)."""
    for name, hint in field_types(type(obj)).items():
        allowed = choices(hint)
        value = getattr(obj, name)
        require(not allowed or value in allowed, name, value, f"use one of {allowed}")


def field_value(name: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` (from YAML or a sweep) as the field's type, or a ConfigError naming the field.

    YAML types do not always match the fields' (``1.5e6`` is a string, ``8.5`` a float for an
    int field); left to the dataclass converters they fail with a traceback or truncate. A
    single value where a list is expected is a one-item list.
    """
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        require(type(None) in options, name, value, f"give a value in {where} (null not allowed)")
        return None
    kind = next(t for t in options if t is not type(None))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        items = value if isinstance(value, list) else [value]
        return [field_value(name, v, item, where) for v in items]
    allowed = choices(kind)
    if allowed:
        require(value in allowed, name, value, f"use one of {allowed} in {where}")
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    converted: Any = None
    if kind is bool:  # a sweep's values are strings: --sweep skip_connection=false,true
        converted = value if isinstance(value, bool) else _BOOLS.get(str(value).lower())
    elif kind is str:
        converted = str(value) if isinstance(value, str) or number else None
    elif kind in (int, float) and (number or isinstance(value, str)):
        with contextlib.suppress(ValueError):
            as_float = float(value)
            if kind is float:
                converted = as_float
            elif as_float.is_integer():
                converted = int(as_float)
    require(converted is not None, name, value, f"expected {_EXPECTED[kind]} in {where}")
    return converted


def _typed(values: Any, cls: type, path: Path, prefix: str = "") -> dict[str, Any]:
    """A YAML mapping for dataclass ``cls``, each value converted; nested sections recurse."""
    values = {} if values is None else values
    where = prefix.rstrip(".") or "config"
    require(isinstance(values, dict), where, values, f"expected a mapping of fields in {path}")
    hints = field_types(cls)
    for key, value in values.items():
        name = f"{prefix}{key}"
        close = difflib.get_close_matches(str(key), hints, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"use {sorted(hints)}"
        require(key in hints, name, value, f"no such field in {path}; {hint}")
        if is_dataclass(hints[key]):
            values[key] = _typed(value, hints[key], path, f"{name}.")
        else:
            values[key] = field_value(name, value, hints[key], str(path))
    return values


def read_options_tree(path: str | Path, cls: type) -> dict[str, Any]:
    """The YAML file's fields for ``cls``, checked and typed (sections for nested configs)."""
    path = Path(path)
    require(path.is_file(), "config", str(path), "no such file; check the path")
    tree = read_yaml(path, "fix the file or pass the values as flags") or {}
    return _typed(tree, cls, path)


def load_options(path: str | Path, cls: type[S]) -> S:
    """``cls`` built from a YAML file (``--config``); fields it leaves out keep their defaults."""
    tree = read_options_tree(path, cls)
    with reading("config", str(path), "fix the file or pass the values as flags"):
        return cls.from_dict(tree, drop_extra_fields=False)


@dataclass
class AnalysisConfig(Serializable):
    """How much text ``drrik analyze`` reads and how much it keeps per feature."""

    n_tokens: int = flag(default=65_536, alias=["--tokens"])
    """Token budget: contexts are read until this many tokens (context_size each)."""
    batch_size_prompts: int = 16
    """Contexts per model forward pass."""
    top_k: int = 16
    """Top-activating contexts kept per feature."""
    n_bands: int = 4
    """Quantile bands of a feature's activating contexts shown as examples."""
    band_samples: int = 4
    """Examples per band."""
    window: int = 32
    """Tokens kept around each example's maximum token (3/4 before it, 1/4 after)."""
    logit_k: int = 10
    """Promoted and suppressed tokens kept per feature."""
    ignore_special_tokens: bool = True
    """Ignore BOS, EOS and pad positions (BOS activations are outliers the SAE never saw)."""
    seed: int = 0
    """Seed of the hash that draws the quantile-band sample."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "batch_size_prompts", "top_k", "n_bands", "band_samples"):
            value = getattr(self, name)
            require(value > 0, name, value, "use a positive number")
        require(self.window >= 2, "window", self.window, "use at least 2 tokens")
        require(self.logit_k >= 1, "logit_k", self.logit_k, "use a positive number")

    @property
    def reservoir(self) -> int:
        return self.n_bands * self.band_samples


@dataclass
class StatusOptions(Serializable):
    """How ``drrik status`` prints a run's progress."""

    json: bool = False
    """Print JSON instead of text."""


@dataclass
class ExportOptions(Serializable):
    """Where ``drrik export`` writes a run's transcoders, and for which tool."""

    to: ExportFormat = "circuit-tracer"
    """Target layout: circuit-tracer (a transcoder set, one file per model layer)."""
    out: str | None = None
    """Directory to write (replaced whole if it exists)."""
    n_layers: int | None = None
    """The model's layer count (default: read from the model's local directory)."""

    def check(self) -> None:
        check_choices(self)
        require(bool(self.out), "out", self.out, "give --out DIR")
        require(self.n_layers is None or self.n_layers > 0, "n_layers", self.n_layers, "use > 0")


@dataclass
class SavedSAEOptions(Serializable):
    """Which SAE of a saved run, and the model and device it runs with."""

    sae: str | None = None
    """Which SAE of a run that trained several (its name under final/)."""
    model: str | None = None
    """Model to load instead of the one the SAE was trained on."""
    device: str = "cpu"
    """Device of the model and the SAE: cpu, cuda, cuda:1, mps."""


@dataclass
class TextOptions(SavedSAEOptions):
    """A saved SAE and the text it reads."""

    dataset: str | None = None
    """Dataset to read (all its rows) instead of the training dataset's held-out rows."""


@dataclass
class EvalOptions(TextOptions):
    """What ``drrik eval`` measures a saved SAE on, and how it prints the metrics."""

    eval_split: str | None = None
    """Split to evaluate on (default: held-out rows of the training split)."""
    eval_contexts: int = 64
    """Held-out contexts to evaluate on."""
    json: bool = False
    """Print JSON instead of a table (an object per SAE when a run holds several)."""


@dataclass
class AnalyzeOptions(TextOptions):
    """What ``drrik analyze`` reads, and the analysis settings."""

    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


@dataclass
class ReportOptions(AnalyzeOptions):
    """Which features ``drrik report`` shows, and the analysis it runs when none is saved."""

    features: list[int] = flag(default_factory=list, action="extend")
    """Feature ids to give a page each (default: a spread of n_features)."""
    n_features: int = 20
    """Features chosen when --features is not given."""
    out: str | None = None
    """Report directory (default: DIR/report)."""


@dataclass
class SteerOptions(SavedSAEOptions):
    """What ``drrik steer`` generates: prompts, steered features, strengths and sampling."""

    prompt: list[str] = flag(default_factory=list, action="extend")
    """Prompts to continue, generated as one batch."""
    feature: list[int] = flag(default_factory=list, action="extend")
    """Features to steer."""
    strength: list[float] = flag(default_factory=list, action="extend")
    """One strength for all features or one per --feature (default 1)."""
    compare: list[float] = flag(default_factory=list, action="extend")
    """Strengths to compare side by side for the first --feature, next to the baseline."""
    mode: SteerMode = "add"
    """add: add strength x the feature's direction; clamp: set the feature's activation."""
    units: SteerUnits = "max"
    """max: strengths in units of the feature's max activation; absolute: raw activations."""
    max_new_tokens: int = 30
    """Tokens generated per prompt."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest token set with this much probability."""
    seed: int = 0
    """Seed of the sampling RNG."""
    find: bool = False
    """List the features active on the prompts instead of generating."""

    def check(self) -> None:
        """Every option is checked before the model loads (tens of seconds); not at
        construction, since a --config file may leave the prompts to the flags."""
        check_choices(self)
        require(bool(self.prompt), "prompt", self.prompt, "give at least one --prompt")
        strengths = self.strength or [1.0]
        require(
            len(strengths) in (1, len(self.feature)),
            "strength",
            strengths,
            "give one --strength for all features or one per --feature",
        )
        require(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "use > 0")
        require(self.temperature >= 0, "temperature", self.temperature, "use >= 0 (0: greedy)")
        require(
            self.top_p is None or 0 < self.top_p <= 1,
            "top_p",
            self.top_p,
            "use a fraction in (0, 1]",
        )
        require(
            self.find or bool(self.feature),
            "feature",
            None,
            "name at least one --feature (or use --find)",
        )
