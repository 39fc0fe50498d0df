"""Graceful stop on SIGTERM/SIGINT, which preemptible clouds and SLURM send before a kill.

The first signal only raises a flag: the trainer finishes its step, writes a checkpoint and
exits with status 128 + signal. A second signal exits at once, which is safe because every
file drrik writes is replaced atomically. Both are logged on drrik's logger (stderr).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

from drrik.logs import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager that records the first stop signal in ``received``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        # The leading newline ends a progress bar's line on the terminal.
        if self.received is not None:
            log.warning("\nsecond %s, exiting now", name)
            os._exit(128 + signum)
        self.received = signum
        log.warning(
            "\n%s received; finishing the step and writing a checkpoint "
            "(send it again to exit at once)",
            name,
        )

    def __enter__(self) -> GracefulStop:
        # Handlers can only be installed from the main thread (e.g. not under a test runner's
        # worker thread); elsewhere signals keep their default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}
