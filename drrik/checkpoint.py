"""Checkpoints that survive kills, full disks and bit rot.

Each checkpoint is a directory ``RUN_DIR/checkpoints/step-00001234/`` with ``state.pt`` (the
trainer's full state, loaded with ``torch.load(weights_only=True)``: tensors and plain Python
values only, never arbitrary pickle) and ``manifest.json`` (step, tokens, drrik version and the
SHA-256 of every file). It is written into a temporary sibling, fsynced, and renamed into place,
so a checkpoint directory either is complete or does not exist. ``checkpoints/latest`` names the
newest one. Each rank writes its own parts (its data shards' stream position and mixing
buffer, ``store-NNNNN.pt``) into ``checkpoints/.parts-step-N/``; rank 0 gathers only their
names and checksums, moves them into its checkpoint and lists them in the manifest. Loading
verifies the manifest and checksums and falls back to the previous checkpoint, saying why,
when one is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from drrik.errors import ConfigError
from drrik.run_dir import write_text_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.pt"
FORMAT = 1


def drrik_version() -> str:
    from drrik import __version__

    return __version__


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _warn(message: str) -> None:
    print(f"drrik: {message}", file=sys.stderr, flush=True)


class CheckpointManager:
    """Writes, lists, verifies and prunes the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = Path(run_dir) / CHECKPOINTS
        self.keep = keep
        self.loaded: Path | None = None
        """The checkpoint directory :meth:`load_latest` returned, for :meth:`load_part`."""

    def checkpoints(self) -> list[Path]:
        """Checkpoint directories, newest first (by step)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step-")]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def _parts_dir(self, step: int) -> Path:
        return self.root / f".parts-step-{step:010d}"

    def write_part(self, step: int, name: str, obj: Any) -> dict[str, Any]:
        """Write one rank's part of the checkpoint at ``step``; return its name and checksum,
        or the error that stopped it (reported by rank 0, which then skips the checkpoint)."""
        path = self._parts_dir(step) / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_synced(obj, path)
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
        """Write a checkpoint; on a disk error keep the previous one and return None.

        ``extra`` goes into the manifest (the wandb run id), readable without loading state.
        ``parts`` are :meth:`write_part` results of every rank, moved in and checksummed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:010d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            failed = [p["error"] for p in parts or [] if "error" in p]
            if failed:
                raise OSError(failed[0])
            _save_synced(state, tmp / STATE)
            files = {STATE: {"sha256": _sha256(tmp / STATE), "bytes": _size(tmp / STATE)}}
            for part in parts or []:
                os.replace(self._parts_dir(step) / part["name"], tmp / part["name"])
                files[part["name"]] = {"sha256": part["sha256"], "bytes": part["bytes"]}
            manifest = {
                "format": FORMAT,
                "drrik_version": drrik_version(),
                "step": step,
                "tokens": tokens,
                "created": time.time(),
                **(extra or {}),
                "files": files,
            }
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
            _fsync_dir(tmp)
            target = self.root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, name + "\n")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self._parts_dir(step), ignore_errors=True)
            previous = self.checkpoints()
            kept = (
                f"the previous checkpoint {previous[0].name} is intact"
                if previous
                else ("there is no earlier checkpoint")
            )
            _warn(f"checkpoint at step {step} was not written ({exc.strerror or exc}); {kept}")
            return None
        self._prune()
        return target

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for pattern in (".tmp-*", ".parts-*"):
            for leftover in self.root.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

    def verify(self, path: Path) -> dict[str, Any]:
        """The manifest of a complete, uncorrupted checkpoint; raises ValueError otherwise."""
        manifest_path = path / MANIFEST
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
        newer = _version_tuple(manifest.get("drrik_version", "0")) > _version_tuple(drrik_version())
        if newer:
            raise ConfigError(
                "resume",
                str(path.parent.parent),
                f"written by drrik {manifest['drrik_version']}, newer than this drrik "
                f"{drrik_version()}; upgrade drrik to resume it",
            )
        return manifest

    def latest_manifest(self) -> dict[str, Any]:
        """The newest readable manifest, unverified (for small facts such as the wandb id)."""
        for path in self.checkpoints():
            try:
                return json.loads((path / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
        return {}

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(state, manifest) of the newest good checkpoint, skipping damaged ones loudly."""
        for path in self.checkpoints():
            try:
                manifest = self.verify(path)
                state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            except ConfigError:
                raise
            except Exception as exc:  # any damage: say so and fall back to an older one
                _warn(f"skipping checkpoint {path.name}: {exc}")
                continue
            self.loaded = path
            return state, manifest
        return None
