"""The run directory: its layout, and every rule for reading, writing and holding it.

Layout of a run directory:

- ``config.yaml``: the full config used (every field but ``out``).
- ``metrics.jsonl``: one JSON object per logging step and SAE.
- ``final/``: the saved SAE; ``final/<name>/`` per SAE when a run trains several.
- ``checkpoints/step-NNNNNNNNNN/``: one checkpoint, complete once its ``manifest.json`` is
  there (its files are :mod:`drrik.checkpoint`'s business).
- ``heartbeat.json``: pid, host, time and state of the trainer, for ``drrik status``.
- ``plots/``: training curves and feature densities.
- ``.lock``: locked by the one process that trains in the directory (:meth:`RunDir.lock`).

A directory that holds a run of a different config is refused, never overwritten. Every file
here is replaced with :func:`atomic_write`, except ``metrics.jsonl``, which is appended to.

This module imports nothing heavy (no torch, datasets or config classes), so ``drrik status``
answers at once; configs arrive as trees (``cfg.to_dict()``) or objects with ``to_dict``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from drrik.config_diff import RESUMABLE_CHANGES, config_differences
from drrik.errors import ConfigError, read_json, read_yaml, require
from drrik.logs import get_logger
from drrik.run_lock import RunLock, acquire, holder

log = get_logger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
MANIFEST_FILE = "manifest.json"
HEARTBEAT_FILE = "heartbeat.json"
PLOTS_DIR = "plots"
LOCK_FILE = ".lock"
SAE_CONFIG_FILE = "cfg.json"
"""The file that marks a saved SAE directory (SAELens's name)."""
HEARTBEAT_STATES = ("running", "stopped", "finished", "failed")
METRIC_NUMBERS = ("step", "tokens", "tokens_per_second")
"""Keys of a metrics row that readers compute with, so must be numbers."""


class HasToDict(Protocol):
    """A config object (drrik.config.RunConfig) seen only through its tree."""

    def to_dict(self) -> dict[str, Any]: ...


Config = Mapping[str, Any] | HasToDict
"""A run config: its tree, or an object that gives it."""


def _tree(cfg: Config) -> dict[str, Any]:
    """The config as saved: every field except the run directory itself."""
    tree = dict(cfg) if isinstance(cfg, Mapping) else cfg.to_dict()
    tree.pop("out", None)
    return tree


def default_run_name(cfg: Config) -> str:
    tree = _tree(cfg)
    model = Path(tree["model"]["model"]).name.replace(".gguf", "")
    return f"runs/{model}-{tree['sae']['architecture']}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_number(value: Any) -> bool:
    """An int or float read from JSON or YAML (where ``true`` would pass as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- atomic writes -----------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _fsync_tree(child)
    _fsync(path)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Replace the file or directory ``path`` so that readers, kills and power cuts see the
    old content or the new, never a mix.

    Yields a path in a private staging directory beside ``path`` (same file system, so the
    final rename is atomic); the caller creates its file or directory there. When the block
    ends, everything written is fsynced, renamed over ``path`` (an existing directory is
    moved aside first and removed after) and the parent directory fsynced. If the block or
    any of that fails, ``path`` keeps its old content and the staging directory is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        new = staging / path.name
        yield new
        _fsync_tree(new)
        if path.is_dir() and not path.is_symlink():
            old = staging / f"{path.name}.old"
            os.replace(path, old)
            try:
                os.replace(new, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(new, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (UTF-8) with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint at ``step``: zero-padded, so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:010d}"


def _checkpoint_step(path: Path) -> int | None:
    digits = path.name.removeprefix(CHECKPOINT_PREFIX)
    named = path.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit()
    return int(digits) if named and path.is_dir() else None


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's manifest, or None when it is missing or unreadable: a checkpoint is
    complete only once its manifest is, and damage makes it unusable the same way."""
    try:
        value = json.loads((checkpoint / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    usable = isinstance(value, dict) and all(is_number(value.get(k, 0)) for k in ("step", "tokens"))
    return value if usable else None


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its directory and its manifest."""

    path: Path
    manifest: dict[str, Any]


# -- the run directory -------------------------------------------------------------------------


class RunDir:
    """Paths of one run and the rules for (re)using, reading and holding its directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.final_path = self.path / FINAL_DIR
        self.checkpoints_path = self.path / CHECKPOINTS_DIR
        self.heartbeat_path = self.path / HEARTBEAT_FILE
        self.plots_path = self.path / PLOTS_DIR
        self.lock_path = self.path / LOCK_FILE

    # -- config ----------------------------------------------------------------------------------
    def saved_config(self) -> dict[str, Any] | None:
        """The saved config as a tree, None without one; a damaged one is a ConfigError."""
        if not self.config_path.is_file():
            return None
        fix = "restore it from a copy, or start a new run with another --out"
        tree = read_yaml(self.config_path, fix, field="file")
        sections = isinstance(tree, dict) and all(
            isinstance(v, dict) for k, v in tree.items() if k != "out"
        )
        require(sections, "file", str(self.config_path), f"not a mapping of sections; {fix}")
        return tree

    def check_reusable(self, cfg: Config, load: Callable[[Path], Config] | None = None) -> None:
        """Refuse a non-empty directory that is not a run of this same config.

        ``load`` reads the saved config as the current config class does (an older drrik's
        file then compares in today's form, e.g. a hook string as a list).
        """
        require(not self.path.is_file(), "out", str(self.path), "it is a file; name a directory")
        if not self.path.exists() or all(p.name == LOCK_FILE for p in self.path.iterdir()):
            return
        saved = self.saved_config()
        if saved is None:
            raise ConfigError(
                "out",
                str(self.path),
                "the directory is not empty and holds no drrik run; choose a new --out",
            )
        if load is not None:
            saved = _tree(load(self.config_path))
        differences = config_differences(saved, _tree(cfg), RESUMABLE_CHANGES)
        if differences:
            raise ConfigError(
                "out",
                str(self.path),
                "it holds a run of a different config ("
                + "; ".join(differences[:6])
                + "); choose a new --out",
            )

    def write_config(self, cfg: Config) -> None:
        write_text_atomic(self.config_path, yaml.safe_dump(_tree(cfg), sort_keys=True))

    # -- metrics ---------------------------------------------------------------------------------
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Append rows to metrics.jsonl and flush them to disk (a watcher may be tailing it)."""
        with open(self.metrics_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after ``after_step`` (a resumed run logs those steps again)."""
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if self.metrics_path.is_file():
            write_text_atomic(self.metrics_path, text)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged rows. A last line that does not parse is torn (a kill mid-write, or a
        write in progress seen from another process) and dropped: its step comes after the
        newest checkpoint, so a resumed run logs it again. Damage anywhere else is a
        ConfigError naming the line."""
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    continue
                row = None
            require(
                isinstance(row, dict)
                and "step" in row
                and all(is_number(row.get(k, 0)) for k in METRIC_NUMBERS),
                "file",
                str(self.metrics_path),
                f"line {i + 1} is not a metrics row with numbers for {', '.join(METRIC_NUMBERS)}; "
                "delete that line or restore the file",
            )
            rows.append(row)
        return rows

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, complete or not, newest (highest step) first."""
        if not self.checkpoints_path.is_dir():
            return []
        steps = {
            p: s for p in self.checkpoints_path.iterdir() if (s := _checkpoint_step(p)) is not None
        }
        return sorted(steps, key=steps.__getitem__, reverse=True)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint (highest step with a readable manifest): the one
        status shows and a resume loads, unless its files then fail their checksums."""
        for path in self.checkpoints():
            manifest = read_manifest(path)
            if manifest is not None:
                return Checkpoint(path, manifest)
        return None

    # -- heartbeat -------------------------------------------------------------------------------
    def write_heartbeat(self, state: str) -> None:
        """Record that this process is alive (or how it ended); call at start, each log, end."""
        require(state in HEARTBEAT_STATES, "state", state, f"use one of {HEARTBEAT_STATES}")
        beat = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        write_text_atomic(self.heartbeat_path, json.dumps(beat | {"state": state}))

    def read_heartbeat(self) -> dict[str, Any] | None:
        """The heartbeat, None before the first one; written atomically, so damage is not a
        write in progress but a broken file, which is a ConfigError naming it."""
        if not self.heartbeat_path.exists():
            return None
        fix = "the trainer rewrites it at every log; delete it if the run has ended"
        beat = read_json(self.heartbeat_path, fix)
        require(
            beat.get("state") in HEARTBEAT_STATES and is_number(beat.get("time")),
            "file",
            str(self.heartbeat_path),
            f"it needs a state in {HEARTBEAT_STATES} and a numeric time; {fix}",
        )
        return beat

    # -- the lock --------------------------------------------------------------------------------
    def lock(self) -> RunLock:
        """Hold the directory for this process's training (see :func:`drrik.run_lock.acquire`):
        a second trainer, resume or torchrun job on it is refused until the lock is released
        or this process ends. Readers take no lock."""
        require(not self.path.is_file(), "out", str(self.path), "it is a file; name a directory")
        made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        return acquire(self.lock_path, str(self.path), made)

    def lock_holder(self) -> dict[str, Any] | None:
        """Who holds the lock (``pid``, ``host``, ``since``), None when nobody does."""
        return holder(self.lock_path)


# -- saved SAEs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedLocation:
    """Where a saved SAE lies, the run it belongs to (if any), and where its outputs go.

    A run keeps analysis and report beside ``final/`` (``analysis/<name>/`` when it trained
    several SAEs); a bare SAE directory keeps them inside itself, so saving a new SAE over it
    also removes the now stale outputs.
    """

    sae_dir: Path
    run_dir: Path | None
    name: str | None

    def output_dir(self, kind: str) -> Path:
        """The ``analysis`` or ``report`` directory of this SAE."""
        base = (self.run_dir or self.sae_dir) / kind
        return base / self.name if self.name else base


def _run_path(path: str | Path) -> Path:
    """``path``, or the run directory when it names a run's ``final/``."""
    path = Path(path)
    return path.parent if path.name == FINAL_DIR and (path.parent / CONFIG_FILE).is_file() else path


def saved_names(path: str | Path) -> list[str]:
    """The names of the SAEs a run saved as ``final/<name>/`` (a run that trained several);
    empty for a saved SAE directory or a run that trained one."""
    path = _run_path(path)
    if (path / SAE_CONFIG_FILE).is_file():
        return []
    final = path / FINAL_DIR
    return sorted(p.name for p in final.glob("*") if (p / SAE_CONFIG_FILE).is_file())


def locate_saved_sae(path: str | Path, name: str | None = None) -> SavedLocation:
    """Accept a run directory, its ``final/`` directory, or any saved SAE directory;
    ``name`` picks one SAE of a run that trained several."""
    path = _run_path(path)
    final = path / FINAL_DIR
    if (path / SAE_CONFIG_FILE).is_file():
        # final/<name>/ of a run that trained several: the same SAE as --sae <name>, with its
        # run's config (model dtype, held-out text) and the run's analysis/report directories.
        run = path.parent.parent
        in_run = path.parent.name == FINAL_DIR and (run / CONFIG_FILE).is_file()
        return SavedLocation(path, run, path.name) if in_run else SavedLocation(path, None, None)
    if (final / SAE_CONFIG_FILE).is_file():
        return SavedLocation(final, path, None)
    names = saved_names(path)
    require(
        bool(names),
        "DIR",
        str(path),
        f"expected a run directory or a saved SAE ({SAE_CONFIG_FILE})",
    )
    if name is None and len(names) == 1:
        name = names[0]
    require(name in names, "sae", name, f"the run holds several SAEs: {', '.join(names)}")
    return SavedLocation(final / str(name), path, name)
