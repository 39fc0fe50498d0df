"""The lock that gives a run directory to one training process at a time.

A POSIX record lock (``fcntl.lockf``) on the run's ``.lock`` file: the kernel drops it when
its process dies, even by ``kill -9``, so a crash never blocks the resume. Asking who holds it
(``F_GETLK``) never takes it, so ``drrik status`` cannot make a starting trainer fail.
:class:`drrik.run_dir.RunDir` hands it out; nothing else opens the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drrik.errors import ConfigError
from drrik.logs import get_logger

log = get_logger(__name__)

_LOCKING_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_LOCK_HELD = {errno.EACCES, errno.EAGAIN}
if sys.platform.startswith(("darwin", "freebsd", "openbsd", "netbsd")):
    _FLOCK = ("qqihh", ("start", "len", "pid", "type", "whence"))
else:  # Linux's struct flock
    _FLOCK = ("hhqqi", ("type", "whence", "start", "len", "pid"))
_HELD: dict[str, RunLock] = {}
"""Locks this process holds, by lock file: a POSIX lock is released when its owner closes
*any* descriptor of the file, so this process must not open it again while holding it."""


def _lock_owner(fd: int) -> int | None:
    """The pid holding a lock on ``fd``'s file, None when free. F_GETLK only asks: unlike a
    trial lock, it can never make a trainer starting at the same moment fail."""
    fmt, names = _FLOCK
    query = {"type": fcntl.F_WRLCK, "whence": os.SEEK_SET, "start": 0, "len": 0, "pid": 0}
    packed = struct.pack(fmt, *(query[n] for n in names))
    values = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, packed))
    answer = dict(zip(names, values, strict=True))
    return None if answer["type"] == fcntl.F_UNLCK else answer["pid"]


def _holder_info(fd: int, pid: int | None) -> dict[str, Any]:
    """What the holder wrote into the lock file; the kernel's pid alone in the moment between
    its lock and its write."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0))
        if isinstance(info, dict) and "pid" in info:
            return info
    return {"pid": pid, "host": None, "since": None}


def describe_holder(info: dict[str, Any]) -> str:
    """``PID 1234 on host h (since 2026-12-03 10:57:33)``."""
    since = info.get("since")
    when = (
        f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})"
        if isinstance(since, int | float) and not isinstance(since, bool)
        else ""
    )
    return f"PID {info.get('pid')} on host {info.get('host') or '?'}{when}"


@functools.cache
def _warn_unlockable(reason: str) -> None:
    log.warning(
        "drrik cannot lock run directories on this file system (%s); training goes on "
        "without the lock, so make sure no two runs use one directory",
        reason,
    )


@dataclass
class RunLock:
    """The exclusive lock of a run directory, held until :meth:`release` or the process ends
    (the kernel drops it even after ``kill -9``). ``fd`` is None where the file system
    cannot lock (see :func:`acquire`)."""

    path: Path
    fd: int | None
    info: dict[str, Any] = field(default_factory=dict)
    made_dir: bool = False
    """Whether taking the lock created the run directory."""

    def release(self) -> None:
        """Unlock and empty the lock file (a no-op the second time)."""
        if self.fd is None:
            return
        _HELD.pop(os.path.realpath(self.path), None)
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the lock
        self.fd = None

    def discard(self) -> None:
        """Release after a run that failed to start, leaving the directory as it was found:
        the lock file goes (unlinked while still held, so no other process can lock the old
        file meanwhile), and so does the directory if taking the lock made it."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.release()
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only while empty

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def acquire(lock_path: Path, run_dir: str, made_dir: bool = False) -> RunLock:
    """Hold the directory for this process's training: a second trainer, resume or
    torchrun job on it is refused until :meth:`RunLock.release` or this process ends.

    A POSIX record lock (``fcntl.lockf``) on ``.lock``: the kernel drops it when its
    process dies, even by ``kill -9``, so a crash never blocks the resume; the pid, host
    and start time written into the file are only for display. Readers (status, eval,
    analyze, report) take no lock. Where the file system cannot lock (some NFS mounts
    answer ENOLCK), this warns once and returns a lock that holds nothing, so such users
    can still train. Raises ConfigError naming the holder when the directory is held.
    """
    key = os.path.realpath(lock_path)
    if key in _HELD:
        raise _in_use(run_dir, _HELD[key].info)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            if exc.errno in _LOCKING_UNSUPPORTED:
                _warn_unlockable(os.strerror(exc.errno))
                return RunLock(lock_path, None, made_dir=made_dir)
            if exc.errno not in _LOCK_HELD:
                raise
            raise _in_use(run_dir, _holder_info(fd, _lock_owner(fd))) from None
        finally:
            os.close(fd)  # this process holds no lock on the file: closing is harmless
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)  # a holder killed before its release left its own
    os.pwrite(fd, json.dumps(info).encode(), 0)
    held = _HELD[key] = RunLock(lock_path, fd, info, made_dir)
    return held


def _in_use(run_dir: str, holder: dict[str, Any]) -> ConfigError:
    return ConfigError(
        "out",
        run_dir,
        f"the run directory is in use by {describe_holder(holder)}; "
        "wait for it, stop it, or choose another --out",
    )


def holder(lock_path: Path) -> dict[str, Any] | None:
    """Who holds the lock (``pid``, ``host``, ``since``), None when nobody does or the
    file system cannot lock. Only asks: never takes the lock, even for a moment."""
    held = _HELD.get(os.path.realpath(lock_path))
    if held is not None:
        return held.info
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        pid = _lock_owner(fd)
        return None if pid is None else _holder_info(fd, pid)
    except OSError:  # no locking on this file system
        return None
    finally:
        os.close(fd)
