"""Read back what an offline wandb run wrote, since wandb 0.31 ships no reader for it.

A ``run-<id>.wandb`` file is a 7-byte header followed by LevelDB-log framing: 32 KiB blocks of
records, each a 7-byte header (crc32c, little-endian uint16 length, type 1 full / 2 first /
3 middle / 4 last) and a payload; joined payloads are ``Record`` protobuf messages.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, LAST = 1, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if len(data) < HEADER:  # not written yet: the service may flush after finish() returns
        return
    assert data[:4] == b":W&B", f"{path} is not a wandb data file"
    pos, payload = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the writer pads a block tail too short for a header
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def finished_records(path: Path, timeout_s: float = 10.0) -> list[wandb_internal_pb2.Record]:
    """All records, once the run's exit record is on disk.

    wandb 0.31's ``run.finish()`` may return before its service has flushed the file (seen: a
    7-byte file right after finish, complete half a second later), so poll for the exit record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(records(path))
        if any(r.HasField("exit") for r in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def run_files(run_dir: Path) -> list[Path]:
    """The data files of every offline wandb session under a drrik run directory, in order."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def history(path: Path) -> list[dict[str, Any]]:
    """Each logged history row as {key: value}; nested keys are joined with '/'."""
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in finished_records(path)
        if r.HasField("history")
    ]
