"""``drrik status`` on synthetic run directories: progress, ETA, metrics, checkpoint, liveness."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from drrik.errors import ConfigError
from drrik.status import cmd_status, latest_checkpoint, run_status, write_heartbeat

TOTAL = 1_000_000
SPEED = 1000.0


def make_run(path: Path) -> Path:
    """A run of two SAEs at 20k of 1M tokens, with an eval at 10k and a cut-off last line."""
    path.mkdir()
    config = {"trainer": {"training_tokens": TOTAL, "log_every_steps": 10}}
    config["store"] = {"train_batch_size_tokens": 1000}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for step in (10, 20):
        for i, sae in enumerate(("k=16", "k=32")):
            row = {"step": step, "tokens": step * 1000, "tokens_per_second": SPEED, "sae": sae}
            row |= {"loss": 1.0 / step + i, "l0": 16.0 * (i + 1), "explained_variance": 0.9}
            row |= {"dead_features": step + i, "lr": 0.001}
            if step == 10:
                row["eval/ce_loss_score"] = 0.8 + i / 10
            rows.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 30, "tok')
    for name, tokens in (("step-10", 10_000), ("step-20", 20_000)):
        (path / "checkpoints" / name).mkdir(parents=True)
        manifest = {"step": tokens // 1000, "tokens": tokens, "created": time.time() - 60}
        (path / "checkpoints" / name / "manifest.json").write_text(json.dumps(manifest))
    (path / "checkpoints" / "step-30").mkdir()  # being written: no manifest yet
    return path


def heartbeat(run: Path, **fields: object) -> None:
    beat = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    beat |= {"state": "running", **fields}
    (run / "heartbeat.json").write_text(json.dumps(beat))


def test_live_run_progress_eta_metrics_and_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run")
    write_heartbeat(run, "running")
    status = run_status(run)
    assert status["alive"] and "on this host" in status["liveness"]
    assert status["state"] == "running"
    assert (status["step"], status["tokens"], status["training_tokens"]) == (20, 20_000, TOTAL)
    assert status["progress"] == pytest.approx(0.02)
    assert status["eta_s"] == pytest.approx((TOTAL - 20_000) / SPEED)
    assert status["checkpoint"]["name"] == "step-20"  # newest with a manifest, no pointer yet
    small = status["saes"]["k=16"]
    assert small["loss"] == pytest.approx(0.05) and small["dead_features"] == 20
    assert small["eval/ce_loss_score"] == pytest.approx(0.8) and small["eval_tokens"] == 10_000
    assert status["saes"]["k=32"]["l0"] == 32.0 and "lr" not in small

    assert cmd_status([str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(status))
    assert cmd_status([str(run)]) == 0
    text = capsys.readouterr().out
    assert "alive       yes" in text and "20k / 1M tokens (2.0%), step 20" in text
    assert "ETA 16m 20s" in text and "checkpoint  step-20: step 20, 20k tokens, saved 1m" in text
    assert "sae k=32: loss 1.05  l0 32" in text and "eval/ce_loss_score 0.9 (at 10k tokens)" in text


def test_latest_pointer_wins_and_missing_checkpoints(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("step-10\n")
    assert latest_checkpoint(run)["name"] == "step-10"
    (run / "checkpoints" / "latest").write_text("deleted-checkpoint\n")
    assert latest_checkpoint(run)["tokens"] == 20_000
    assert latest_checkpoint(tmp_path) is None


def test_dead_process_is_detected(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    heartbeat(run, pid=gone.pid)
    status = run_status(run)
    assert not status["alive"] and f"process {gone.pid} is gone" in status["liveness"]
    assert status["eta_s"] is None and status["progress"] == pytest.approx(0.02)


def test_stale_heartbeat_and_other_hosts(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    heartbeat(run, time=time.time() - 600)  # 10 log intervals = 100 s < the 120 s floor
    status = run_status(run)
    assert not status["alive"] and "hung" in status["liveness"]
    heartbeat(run, time=time.time() - 60)
    assert run_status(run)["alive"]

    heartbeat(run, host="elsewhere", pid=1, time=time.time() - 30)
    status = run_status(run)
    assert status["alive"] and "judged by time only" in status["liveness"]
    heartbeat(run, host="elsewhere", pid=1, time=time.time() - 600)
    assert not run_status(run)["alive"]


def test_ended_runs_and_bad_input(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert run_status(run)["liveness"].startswith("no heartbeat.json")
    write_heartbeat(run, "finished")
    status = run_status(run)
    assert not status["alive"] and status["state"] == "finished" and status["eta_s"] is None
    with pytest.raises(ConfigError, match="state='paused'"):
        write_heartbeat(run, "paused")
    with pytest.raises(ConfigError, match="RUN_DIR=.*no such directory"):
        cmd_status([str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="no config.yaml"):
        run_status(tmp_path)
