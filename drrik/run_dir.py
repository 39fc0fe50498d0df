"""The run directory: its layout, the saved config, and the metrics log.

Layout: ``config.yaml`` (the full config used), ``metrics.jsonl`` (one JSON object per logging
step and SAE), ``final/`` (the saved SAE; ``final/<name>/`` per SAE when a run trains several).
A directory that holds a run of a different config is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from drrik.config import RunConfig
from drrik.errors import ConfigError, read_yaml, require

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
SAE_CONFIG_FILE = "cfg.json"
"""The file that marks a saved SAE directory (SAELens's name)."""
METRIC_NUMBERS = ("step", "tokens", "tokens_per_second")
"""Keys of a metrics row that readers compute with, so must be numbers."""
RESUMABLE_CHANGES = (
    "trainer.training_tokens",
    "trainer.log_every_steps",
    "eval.eval_every_tokens",
    "store.prefetch_batches",
    "checkpoint.checkpoint_every_tokens",
    "checkpoint.checkpoint_every_minutes",
    "checkpoint.keep_checkpoints",
    "model.device",
    "wandb.",
)
"""Fields (or, ending in a dot, sections) a resumed run may change: budget, cadences, device."""


def default_run_name(cfg: RunConfig) -> str:
    model = Path(cfg.model.model).name.replace(".gguf", "")
    return f"runs/{model}-{cfg.sae.architecture}-{time.strftime('%Y%m%d-%H%M%S')}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, to list config differences by field."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(
    old: dict[str, Any], new: dict[str, Any], allowed: tuple[str, ...] = ()
) -> list[str]:
    """Fields whose values differ between two config dicts, ignoring ``allowed`` ones."""
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in allowed)
    ]


def is_number(value: Any) -> bool:
    """An int or float read from JSON or YAML (where ``true`` would pass as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """Paths of one run and the rules for (re)using its directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.final_path = self.path / FINAL_DIR

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

    def check_reusable(self, cfg: RunConfig) -> None:
        """Refuse a non-empty directory that is not a run of this same config."""
        require(not self.path.is_file(), "out", str(self.path), "it is a file; name a directory")
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        saved = self.saved_config()
        if saved is None:
            raise ConfigError(
                "out",
                str(self.path),
                "the directory is not empty and holds no drrik run; choose a new --out",
            )
        differences = config_differences(saved, _comparable(cfg), RESUMABLE_CHANGES)
        if differences:
            raise ConfigError(
                "out",
                str(self.path),
                "it holds a run of a different config ("
                + "; ".join(differences[:6])
                + "); choose a new --out",
            )

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(_comparable(cfg), sort_keys=True)
        write_text_atomic(self.config_path, text)

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
        """The logged rows. A torn last line (a kill mid-write, or a write in progress when
        read from another process) is dropped; damage anywhere else is a ConfigError."""
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
                    # Its step comes after the newest checkpoint: a resumed run logs it again.
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


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    """The config as saved: every field except the run directory itself."""
    tree = cfg.to_dict()
    tree.pop("out", None)
    return tree


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


def locate_saved_sae(path: str | Path, name: str | None = None) -> SavedLocation:
    """Accept a run directory, its ``final/`` directory, or any saved SAE directory;
    ``name`` picks one SAE of a run that trained several."""
    path = Path(path)
    if path.name == FINAL_DIR and (path.parent / CONFIG_FILE).is_file():
        path = path.parent
    final = path / FINAL_DIR
    if (path / SAE_CONFIG_FILE).is_file():
        return SavedLocation(path, None, None)
    if (final / SAE_CONFIG_FILE).is_file():
        return SavedLocation(final, path, None)
    names = sorted(p.name for p in final.glob("*") if (p / SAE_CONFIG_FILE).is_file())
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
