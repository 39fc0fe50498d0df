"""``drrik status RUN_DIR``: how far a run got, how fast it goes, and whether it still lives.

Everything is read from files the trainer keeps current, so status works from another shell,
another machine sharing the disk, or after a crash: ``config.yaml`` (the budget),
``metrics.jsonl`` (progress and metrics), ``checkpoints/`` (what a resume would start from) and
``heartbeat.json`` (liveness), which the trainer writes with
:meth:`drrik.run_dir.RunDir.write_heartbeat`, and who holds the run directory's lock.
``drrik status`` imports neither torch nor datasets, so it answers at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from drrik.errors import ConfigError, require
from drrik.run_dir import CONFIG_FILE, RunDir, is_number
from drrik.run_lock import describe_holder

MIN_STALE_S = 120.0
STALE_LOG_INTERVALS = 10
SUMMARY_KEYS = ("loss", "l0", "explained_variance", "dead_features")
RUN_NUMBERS = (
    ("trainer", "training_tokens"),
    ("trainer", "log_every_steps"),
    ("store", "train_batch_size_tokens"),
)
"""Config values status computes with (progress, staleness), so must be numbers."""


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def liveness(heartbeat: dict[str, Any] | None, stale_after_s: float) -> tuple[bool, str]:
    """Whether the run is alive, and why we think so.

    On the trainer's host the pid is checked too; from another host only the heartbeat's age
    can be judged, which the reason says.
    """
    if heartbeat is None:
        return False, "no heartbeat.json: not started yet, or not written by this drrik"
    state, host, pid = heartbeat.get("state"), heartbeat.get("host"), heartbeat.get("pid")
    age = time.time() - float(heartbeat.get("time", 0))
    if state != "running":
        return False, f"{state} {_duration(age)} ago"
    stale = age > stale_after_s
    limit = f"heartbeat {_duration(age)} old, over {_duration(stale_after_s)}"
    if host != socket.gethostname():
        if stale:
            return False, f"{limit} (on host {host}; judged by time only)"
        return True, f"on host {host}, heartbeat {_duration(age)} ago (judged by time only)"
    if not isinstance(pid, int) or not _pid_exists(pid):
        return False, f"process {pid} is gone: it crashed or was killed (state says running)"
    if stale:
        return False, f"process {pid} exists but {limit}: hung, or the pid was reused"
    return True, f"pid {pid} on this host, heartbeat {_duration(age)} ago"


def _left_its_lock(run: RunDir, heartbeat: dict[str, Any]) -> bool:
    """Whether the heartbeat's process once held the lock on this host (its pid is still in
    the lock file) and holds it no more. Where the file system cannot lock, the file stays
    empty and this says nothing."""
    try:
        written = json.loads(run.lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return False
    same = written.get("pid") == heartbeat.get("pid") and written.get("host") == heartbeat.get(
        "host"
    )
    return bool(same) and heartbeat.get("host") == socket.gethostname()


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Progress, speed, ETA, last metrics per SAE, latest checkpoint, liveness and lock holder
    of a run."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfigError("RUN_DIR", str(run.path), "no such directory; pass a run directory")
    config = run.saved_config()
    if config is None:
        raise ConfigError("RUN_DIR", str(run.path), "it holds no drrik run (no config.yaml)")
    for section, key in RUN_NUMBERS:
        value = config.get(section, {}).get(key, 0)
        require(is_number(value), f"{section}.{key}", value, f"expected a number in {CONFIG_FILE}")
    trainer, store = config.get("trainer", {}), config.get("store", {})
    total = trainer.get("training_tokens")

    rows = run.read_metrics()
    last = rows[-1] if rows else {}
    tokens = int(last.get("tokens", 0))
    speed = last.get("tokens_per_second")
    saes: dict[str, dict[str, Any]] = {}
    for row in rows:
        sae = saes.setdefault(str(row.get("sae", "")), {})
        sae.update({k: row[k] for k in ("tokens", *SUMMARY_KEYS) if k in row})
        evals = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evals:
            sae.update(evals, eval_tokens=row.get("tokens"))

    interval = (
        trainer.get("log_every_steps", 1) * store.get("train_batch_size_tokens", 0) / speed
        if speed
        else 0.0
    )
    stale_after = max(MIN_STALE_S, STALE_LOG_INTERVALS * interval)
    heartbeat = run.read_heartbeat()
    alive, reason = liveness(heartbeat, stale_after)
    holder = run.lock_holder()
    if alive and holder is None and heartbeat is not None and _left_its_lock(run, heartbeat):
        # A killed process can linger as a zombie, so its pid still answers; its lock cannot.
        alive = False
        reason = f"process {heartbeat['pid']} no longer holds the run directory: it was killed"
    remaining = max(total - tokens, 0) if total else None
    return {
        "run_dir": str(run.path),
        "state": heartbeat.get("state") if heartbeat else None,
        "alive": alive,
        "liveness": reason,
        "step": last.get("step"),
        "tokens": tokens,
        "training_tokens": total,
        "progress": tokens / total if total else None,
        "tokens_per_second": speed,
        "eta_s": remaining / speed if alive and speed and remaining is not None else None,
        "checkpoint": _checkpoint_summary(run),
        "lock": holder,
        "saes": saes,
    }


def _checkpoint_summary(run: RunDir) -> dict[str, Any] | None:
    latest = run.latest_checkpoint()
    if latest is None:
        return None
    keys = ("step", "tokens", "created")
    return {
        "name": latest.path.name,
        "path": str(latest.path),
        **{k: latest.manifest.get(k) for k in keys},
    }


def _count(n: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_status(status: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_status`."""
    total = status["training_tokens"]
    lines = [
        f"run         {status['run_dir']}",
        f"alive       {'yes' if status['alive'] else 'no'}: {status['liveness']}",
        f"progress    {_count(status['tokens'])} / {_count(total) if total else '?'} tokens"
        + (f" ({status['progress']:.1%})" if status["progress"] is not None else "")
        + (f", step {status['step']}" if status["step"] is not None else ""),
    ]
    if status["tokens_per_second"]:
        eta = status["eta_s"]
        lines.append(
            f"speed       {_count(status['tokens_per_second'])} tokens/s"
            + (f", ETA {_duration(eta)}" if eta is not None else "")
        )
    checkpoint = status["checkpoint"]
    if checkpoint:
        created = checkpoint["created"]
        when = (
            f"{_duration(time.time() - created)} ago"
            if isinstance(created, int | float)
            else str(created)
        )
        lines.append(
            f"checkpoint  {checkpoint['name']}: step {checkpoint['step']}, "
            f"{_count(checkpoint['tokens'] or 0)} tokens, saved {when}"
        )
    else:
        lines.append("checkpoint  none")
    holder = status["lock"]
    lines.append(f"lock        held by {describe_holder(holder)}" if holder else "lock        free")
    for name, metrics in status["saes"].items():
        train = "  ".join(f"{k} {_value(metrics[k])}" for k in SUMMARY_KEYS if k in metrics)
        lines.append(f"sae {name or '-'}: {train}")
        evals = "  ".join(f"{k} {_value(v)}" for k, v in metrics.items() if k.startswith("eval/"))
        if evals:
            lines.append(f"{'':12}{evals} (at {_count(metrics['eval_tokens'] or 0)} tokens)")
    return "\n".join(lines)
