"""The tutorials run end to end as scripts, with small token budgets.

Tutorials 1-3 use the embedded SmolLM2 (an early hook keeps the forward pass short);
tutorial 4 runs its Hub/GPU/wandb code path with local stand-ins: the tiny model directory, a
local text file, the CPU and wandb in offline mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from saved_sae import text_file

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


def run_tutorial(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(TUTORIALS / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_tutorials_1_to_3_on_the_embedded_model(smollm2_dir, tmp_path):
    run = tmp_path / "run"
    out = run_tutorial(
        "01_train_sae.py",
        *("--out", str(run), "--hook", "blocks.2.hook_resid_post", "--tokens", "2048"),
        *("--context-size", "64", "--batch-tokens", "512", "--buffer-batches", "4"),
        *("--eval-contexts", "4"),
        cwd=tmp_path,
    )
    assert "final held-out evaluation" in out and "explained_variance" in out
    assert (run / "final" / "sae_weights.safetensors").is_file()

    out = run_tutorial(
        "02_analyze_features.py",
        "--run",
        str(run),
        "--tokens",
        "1024",
        "--features",
        "3",
        cwd=tmp_path,
    )
    assert out.count("\nfeature ") == 5 and "[[" in out
    index = run / "report" / "index.html"
    assert f"report: {index.resolve().as_uri()}" in out
    assert (run / "analysis" / "features.safetensors").is_file()

    out = run_tutorial(
        "03_steer_generation.py",
        "--run",
        str(run),
        "--strengths",
        "8",
        "--max-new-tokens",
        "5",
        cwd=tmp_path,
    )
    baseline = next(line for line in out.splitlines() if "baseline" in line)
    steered = next(line for line in out.splitlines() if "strength=8x max" in line)
    assert baseline.split("|", 1)[1] != steered.split("|", 1)[1]
    assert "sampled:" in out


def test_tutorial_4_with_local_stand_ins(tiny_model_dir, tmp_path):
    run = tmp_path / "own"
    out = run_tutorial(
        "04_own_model_gpu_wandb.py",
        *("--model", str(tiny_model_dir), "--dataset", str(text_file(tmp_path / "docs.txt"))),
        *("--hook", "blocks.1.hook_resid_post", "--device", "cpu", "--tokens", "2048"),
        *("--context-size", "32", "--batch-tokens", "256", "--buffer-batches", "4"),
        *("--analysis-tokens", "512", "--wandb-mode", "offline"),
        *("--out", str(run)),
        cwd=tmp_path,
    )
    assert "report: file://" in out
    saved = json.loads((run / "final" / "cfg.json").read_text())
    assert saved["metadata"]["dataset_path"].endswith("docs.txt")
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2  # training + analysis runs
