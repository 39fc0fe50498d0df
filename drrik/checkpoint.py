"""Checkpoints that survive kills, full disks and bit rot.

Each checkpoint is a directory ``RUN_DIR/checkpoints/step-00001234/`` with ``state.pt`` (the
trainer's full state, loaded with ``torch.load(weights_only=True)``: tensors and plain Python
values only, never arbitrary pickle) and ``manifest.json`` (step, tokens, drrik version and the
SHA-256 of every file). It is written with :func:`drrik.run_dir.atomic_write`, so a checkpoint
directory either is complete or does not exist; the newest complete one is
:meth:`drrik.run_dir.RunDir.latest_checkpoint`, the one rule resume and ``drrik status`` share
(older drrik also wrote a ``checkpoints/latest`` pointer, now ignored). Each rank writes its
own parts (its data shards' stream position and mixing buffer, ``store-NNNNN.pt``) into
``checkpoints/.parts-step-N/``; rank 0 gathers only their names and checksums, moves them into
its checkpoint and lists them in the manifest. Loading verifies the manifest and checksums and
falls back to the previous checkpoint, saying why, when one is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from drrik.errors import ConfigError
from drrik.logs import get_logger
from drrik.run_dir import MANIFEST_FILE, RunDir, atomic_write, checkpoint_name

log = get_logger(__name__)

STATE = "state.pt"
FORMAT = 1
UNKNOWN_VERSION = "0+unknown"
try:
    DRRIK_VERSION = version("drrik")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    DRRIK_VERSION = UNKNOWN_VERSION
"""Written into each manifest; resuming refuses checkpoints of a newer drrik, except when this
drrik's own version is unknown, which then cannot judge."""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size


class CheckpointManager:
    """Writes, verifies, loads and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run = RunDir(run_dir)
        self.root = self.run.checkpoints_path
        self.keep = keep
        self.loaded: Path | None = None
        """The checkpoint directory :meth:`load_latest` returned, for :meth:`load_part`."""

    def _parts_dir(self, step: int) -> Path:
        return self.root / f".parts-{checkpoint_name(step)}"

    def write_part(self, step: int, name: str, obj: Any) -> dict[str, Any]:
        """Write one rank's part of the checkpoint at ``step``; return its name and checksum,
        or the error that stopped it (reported by rank 0, which then skips the checkpoint)."""
        path = self._parts_dir(step) / name
        try:
            with atomic_write(path) as tmp:
                torch.save(obj, tmp)
            return {"name": name, "sha256": _sha256(path), "bytes": _size(path)}
        except OSError as exc:
            return {"name": name, "error": exc.strerror or str(exc)}

    def load_part(self, name: str) -> Any:
        """A part of the checkpoint :meth:`load_latest` returned."""
        assert self.loaded is not None, "load_latest first"
        return torch.load(self.loaded / name, map_location="cpu", weights_only=True)

    def save(
        self,
        state: dict[str, Any],
        step: int,
        tokens: int,
        extra: dict[str, Any] | None = None,
        parts: list[dict[str, Any]] | None = None,
    ) -> Path | None:
        """Write a checkpoint and return its directory, or None when it was NOT written.

        None means a disk error (full disk, a rank's failed part): it is logged, the
        previous checkpoint stays intact and training may go on; a caller reporting the
        checkpoint (a signal's stop message) must then say it was not saved.
        ``extra`` goes into the manifest (the wandb run id), readable without loading state.
        ``parts`` are :meth:`write_part` results of every rank, moved in and checksummed.
        """
        target = self.root / checkpoint_name(step)
        try:
            failed = [p["error"] for p in parts or [] if "error" in p]
            if failed:
                raise OSError(failed[0])
            with atomic_write(target) as tmp:
                tmp.mkdir()
                torch.save(state, tmp / STATE)
                files = {STATE: {"sha256": _sha256(tmp / STATE), "bytes": _size(tmp / STATE)}}
                for part in parts or []:
                    os.replace(self._parts_dir(step) / part["name"], tmp / part["name"])
                    files[part["name"]] = {"sha256": part["sha256"], "bytes": part["bytes"]}
                manifest = {
                    "format": FORMAT,
                    "drrik_version": DRRIK_VERSION,
                    "step": step,
                    "tokens": tokens,
                    "created": time.time(),
                    **(extra or {}),
                    "files": files,
                }
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        except OSError as exc:
            shutil.rmtree(self._parts_dir(step), ignore_errors=True)
            previous = self.run.latest_checkpoint()
            kept = (
                f"the previous checkpoint {previous.path.name} is intact"
                if previous
                else "there is no earlier checkpoint"
            )
            log.warning(
                "checkpoint at step %d was not written (%s); %s", step, exc.strerror or exc, kept
            )
            return None
        self._prune()
        return target

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints; remove what killed writes left (parts and
        staging directories, the only hidden entries here)."""
        for old in self.run.checkpoints()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of a complete, uncorrupted checkpoint; raises ValueError otherwise."""
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ValueError("missing manifest (partial checkpoint)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"unreadable manifest ({exc.msg})") from None
        for file, meta in manifest.get("files", {}).items():
            if not (path / file).is_file():
                raise ValueError(f"missing {file}")
            if _size(path / file) != meta["bytes"]:
                raise ValueError(f"{file} is truncated or resized")
            if _sha256(path / file) != meta["sha256"]:
                raise ValueError(f"{file} fails its checksum")
        written = manifest.get("drrik_version", "0")
        if DRRIK_VERSION != UNKNOWN_VERSION and _version_tuple(written) > _version_tuple(
            DRRIK_VERSION
        ):
            raise ConfigError(
                "resume",
                str(self.run.path),
                f"written by drrik {written}, newer than this drrik {DRRIK_VERSION}; "
                "upgrade drrik to resume it",
            )
        return manifest

    def latest_manifest(self) -> dict[str, Any]:
        """The newest complete checkpoint's manifest, unverified (for small facts such as the
        wandb run id); empty without one."""
        latest = self.run.latest_checkpoint()
        return latest.manifest if latest else {}

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, manifest) of the newest good checkpoint, skipping damaged ones loudly."""
        for path in self.run.checkpoints():
            try:
                manifest = self.verify(path)
                state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            except ConfigError:
                raise
            except Exception as exc:  # any damage: say so and fall back to an older one
                log.warning("skipping checkpoint %s: %s", path.name, exc)
                continue
            self.loaded = path
            return state, manifest
        return None
