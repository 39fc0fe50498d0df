"""The run directory's rules: atomic writes, the torn metrics line, the latest checkpoint,
reuse of a directory, and configs given as plain trees."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from drrik.errors import ConfigError
from drrik.run_dir import (
    RunDir,
    atomic_write,
    checkpoint_name,
    default_run_name,
    write_text_atomic,
)

CONFIG = {"model": {"model": "models/tiny.gguf"}, "sae": {"architecture": "topk", "k": 8}}


def test_a_failed_write_leaves_the_old_file_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "file.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_directory_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "sae"
    for version in ("one", "two"):
        with atomic_write(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text(version)
    assert [p.name for p in target.iterdir()] == ["weights"]
    assert (target / "weights").read_text() == "two"

    replace = os.replace

    def full_disk(src: Any, dst: Any) -> None:
        if Path(dst) == target and Path(src).name == target.name:  # the new one, not the old
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError), atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("three")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "two"  # moved aside, then back
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_only_a_torn_last_metrics_line_is_dropped(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rows = [{"step": s, "tokens": 10 * s, "loss": 1.0 / s} for s in (1, 2)]
    run.append_metrics(rows)
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 3, "tok')  # a kill mid-write
    assert run.read_metrics() == rows
    run.truncate_metrics(after_step=1)
    assert run.metrics_path.read_text() == json.dumps(rows[0]) + "\n"

    run.metrics_path.write_text('{"step": 1, "tok\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ConfigError, match="line 1 is not a metrics row"):
        run.read_metrics()


def _checkpoint(run: RunDir, name: str, step: int | None) -> None:
    path = run.checkpoints_path / name
    path.mkdir(parents=True)
    if step is not None:
        (path / "manifest.json").write_text(json.dumps({"step": step, "tokens": 100 * step}))


def test_latest_checkpoint_is_the_highest_complete_step(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.checkpoints() == [] and run.latest_checkpoint() is None
    _checkpoint(run, "step-9", 9)
    _checkpoint(run, "step-10", 10)  # not zero-padded: still after step 9
    _checkpoint(run, checkpoint_name(11), None)  # being written, or damaged
    _checkpoint(run, ".parts-step-12", 12)
    (run.checkpoints_path / "latest").write_text("step-9\n")  # older drrik's pointer: ignored
    assert [p.name for p in run.checkpoints()] == [checkpoint_name(11), "step-10", "step-9"]
    latest = run.latest_checkpoint()
    assert latest is not None and latest.path.name == "step-10"
    assert latest.manifest["tokens"] == 1000


def test_reuse_rules_take_a_plain_config_tree(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.check_reusable(CONFIG)  # missing: fine
    run.path.mkdir()
    (run.path / ".lock").write_text("")  # left by an attempt that failed before its config
    run.check_reusable(CONFIG)
    run.write_config({**CONFIG, "out": "ignored"})
    assert yaml.safe_load(run.config_path.read_text()) == CONFIG
    run.check_reusable(CONFIG)
    with pytest.raises(ConfigError, match=r"sae.k: 8 -> 16"):
        run.check_reusable({**CONFIG, "sae": {"architecture": "topk", "k": 16}})
    assert default_run_name(CONFIG).startswith("runs/tiny-topk-")


def test_heartbeat_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_heartbeat() is None
    run.write_heartbeat("running")
    beat = run.read_heartbeat()
    assert beat is not None and beat["state"] == "running" and beat["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="state='paused'"):
        run.write_heartbeat("paused")
