"""The run directory lock: one trainer per directory, a killed holder never blocks the resume,
status shows the holder, readers need no lock. Every holder is a real process."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import drrik
from drrik.errors import ConfigError
from drrik.run_dir import RunDir, locate_saved_sae
from drrik.status import format_status, run_status

HOLDER = """
import sys, types
from pathlib import Path

# Past drrik/__init__ (it imports torch today): these processes start in a fraction of a second.
package = types.ModuleType("drrik")
package.__path__ = [str(Path(sys.argv[1]).parent)]
sys.modules["drrik"] = package
from drrik.errors import ConfigError
from drrik.run_dir import RunDir

try:
    lock = RunDir(sys.argv[2]).lock()
except ConfigError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
print("held", flush=True)
if sys.stdin.readline() == "release\\n":
    lock.release()
    print("released", flush=True)
sys.stdin.readline()
"""


def start(run: Path) -> subprocess.Popen[str]:
    """A process that locks ``run`` and holds it until told (``release``) or its stdin ends."""
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, drrik.__file__, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A saved run (config, metrics, final SAE) held by another process."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "cfg.json").write_text("{}")
    (run / "config.yaml").write_text("trainer: {training_tokens: 100}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 10}\n')
    proc = start(run)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n", proc.stderr
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_locker_is_refused_naming_the_holder(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    second = start(tmp_path / "run")
    _, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert err.count("\n") == 1
    assert f"in use by PID {holder.pid} on host {socket.gethostname()} (since " in err
    assert "wait for it, stop it, or choose another --out" in err
    with pytest.raises(ConfigError, match=f"PID {holder.pid}"):
        RunDir(tmp_path / "run").lock()


def test_a_killed_holder_never_blocks_the_resume(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    run = RunDir(tmp_path / "run")
    assert json.loads(run.lock_path.read_text())["pid"] == holder.pid  # the stale content
    assert run.lock_holder() is None
    with run.lock() as lock:
        assert run.lock_holder() == lock.info and lock.info["pid"] != holder.pid
        with pytest.raises(ConfigError, match="in use by PID"):
            run.lock()  # this process too holds it only once
    assert run.lock_holder() is None


def test_status_sees_a_killed_trainer_by_its_lock_even_as_a_zombie(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    run = RunDir(tmp_path / "run")
    beat = {"pid": holder.pid, "host": socket.gethostname(), "time": time.time()}
    run.heartbeat_path.write_text(json.dumps({**beat, "state": "running"}))
    assert run_status(run.path)["alive"]
    holder.send_signal(signal.SIGKILL)  # not waited for: a zombie whose pid still answers
    deadline = time.time() + 10
    while run.lock_holder() is not None and time.time() < deadline:
        time.sleep(0.05)
    status = run_status(run.path)
    assert not status["alive"] and "no longer holds the run directory" in status["liveness"]


def test_status_shows_the_holder_until_release(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    status = run_status(run)
    assert status["lock"]["pid"] == holder.pid
    assert f"lock        held by PID {holder.pid} on host " in format_status(status)
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("release\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    status = run_status(run)
    assert status["lock"] is None and "lock        free" in format_status(status)


def test_readers_need_no_lock(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert locate_saved_sae(run.path).sae_dir == run.final_path
    assert run.read_metrics() == [{"step": 1, "tokens": 10}]
    assert run_status(run.path)["tokens"] == 10
    assert run.lock_holder() is not None  # looking took nothing


def test_a_file_system_without_locks_warns_once_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with caplog.at_level(logging.WARNING, logger="drrik"):
        for name in ("a", "b"):
            with RunDir(tmp_path / name).lock() as lock:
                assert lock.fd is None
    assert caplog.text.count("cannot lock run directories") == 1
