"""The tutorials run end to end as scripts, with small token budgets.

Tutorials 1-3 and 5 use the embedded SmolLM2 (early hooks keep the forward pass short);
tutorial 4 runs its Hub/GPU/wandb code path with local stand-ins: the tiny model directory, a
local text file, the CPU and wandb in offline mode.
"""

from __future__ import annotations

import json
import os
import re
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


def test_tutorial_5_transcoders_on_the_embedded_model(smollm2_dir, tmp_path):
    run, export = tmp_path / "tc", tmp_path / "ct"
    out = run_tutorial(
        "05_transcoders.py",
        *("--out", str(run), "--layers", "0", "2", "--tokens", "2048"),
        *("--context-size", "64", "--batch-tokens", "512", "--buffer-batches", "4"),
        *("--eval-contexts", "4", "--analysis-tokens", "1024", "--export", str(export)),
        cwd=tmp_path,
    )
    # One held-out row per trained layer, and the run spliced in together.
    assert "held-out evaluation of 2 transcoders (model has 30 layers)" in out
    assert re.search(r"^ +0 +-?[\d.]", out, re.M) and re.search(r"^ +2 +-?[\d.]", out, re.M)
    assert "all spliced in together: ce_loss_recovered" in out
    for layer in (0, 2):
        cfg = json.loads((run / "final" / f"blocks.{layer}.mlp.hook_in" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out"
    # The default analysed layer is the middle one of the two: a feature, its contexts, logits.
    assert "layer 2: analysed" in out and "top contexts:" in out and "[[" in out
    assert "writes: promotes ['" in out and "suppresses ['" in out
    assert (run / "analysis" / "blocks.2.mlp.hook_in" / "features.safetensors").is_file()
    # The circuit-tracer set: one file per model layer, two of them trained.
    assert "30 layer files, 2 trained" in out and f"exported to {export.resolve()}" in out
    assert len(list(export.glob("layer_*.safetensors"))) == 30
    assert (export / "config.yaml").is_file()
