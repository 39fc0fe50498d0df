"""W&B logging: config rules, the disabled no-op, and offline runs read back from their files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from PIL import Image
from test_trainer import BATCH, fit, one_thread, run_config
from wandb_reader import finished_records, history, run_files

from drrik.errors import ConfigError
from drrik.settings import EnvironmentSettings
from drrik.wandb_logging import WandbConfig, WandbLogger, rows_to_metrics

__all__ = ["one_thread"]  # the autouse fixture: one torch thread here too

ROWS = [
    {"step": 10, "tokens": 4096, "tokens_per_second": 900.0, "sae": "k=16", "loss": 0.5, "l0": 16},
    {"step": 10, "tokens": 4096, "tokens_per_second": 900.0, "sae": "k=32", "loss": 0.25, "l0": 32},
]


@pytest.fixture
def wandb_home(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Path:
    """Keep wandb's cache, staging and config files inside the test's directory."""
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        clean_env.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    clean_env.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_config_validation_and_resolution() -> None:
    with pytest.raises(ConfigError, match="wandb_mode='sometimes'"):
        WandbConfig(wandb_mode="sometimes")
    with pytest.raises(ConfigError, match="wandb_project"):
        WandbConfig(wandb_project=" ")
    env = EnvironmentSettings(wandb_mode="offline", wandb_project="from-env")
    assert WandbConfig().resolved_mode(env) == "offline"
    assert WandbConfig(wandb_mode="disabled").resolved_mode(env) == "disabled"
    assert WandbConfig().resolved_mode(EnvironmentSettings()) == "disabled"
    with pytest.raises(ConfigError, match="WANDB_MODE='dryrun'"):
        WandbConfig().resolved_mode(EnvironmentSettings(wandb_mode="dryrun"))
    assert WandbConfig().resolved_project(env) == "from-env"
    assert WandbConfig(wandb_project="mine").resolved_project(env) == "mine"


def test_rows_to_metrics_prefixes_each_sae_only_when_several() -> None:
    assert rows_to_metrics(ROWS[:1]) == {
        "step": 10,
        "tokens": 4096,
        "tokens_per_second": 900.0,
        "loss": 0.5,
        "l0": 16,
    }
    many = rows_to_metrics(ROWS)
    assert many["k=16/loss"] == 0.5 and many["k=32/l0"] == 32 and many["tokens"] == 4096
    assert "loss" not in many and not any("sae" in k for k in many)


def test_disabled_logger_does_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with WandbLogger(WandbConfig(wandb_mode="disabled"), run_dir, {"a": 1}) as logger:
        assert logger.run is None and logger.run_id is None
        logger.log({"loss": 1.0}, step=1)
        logger.log_rows(ROWS)
        logger.log_histogram("density", torch.rand(8), step=1)
        logger.log_images({"plot": tmp_path / "missing.png"}, step=1)
        logger.log_artifact(tmp_path, "sae")
    assert not run_dir.exists()


def test_secrets_never_reach_run_files(wandb_home: Path) -> None:
    """Runs before this file's other wandb run so that wandb's service starts with the secrets."""
    secrets = {"WANDB_API_KEY": "wandbfake7f3a9c1e5b", "HF_TOKEN": "hf_fake4d8e2b6a0c"}
    env_file = wandb_home / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()) + "WANDB_MODE=offline\n")
    settings = EnvironmentSettings.load(env_file)
    cfg = WandbConfig()
    leaky = {"data": {"dataset": f"hf://{secrets['HF_TOKEN']}@corpus"}}
    with pytest.raises(ConfigError) as info:
        WandbLogger(cfg, wandb_home / "run", leaky, settings=settings)
    assert secrets["HF_TOKEN"] not in str(info.value)

    with WandbLogger(cfg, wandb_home / "run", {"trainer": {"lr": 0.001}}, settings=settings) as lg:
        assert lg.mode == "offline"
        assert {k: os.environ[k] for k in secrets} == secrets  # exported for wandb/hf to read
        lg.log({"loss": 1.0}, step=1)

    (data_file,) = run_files(wandb_home / "run")
    assert any(r.HasField("exit") for r in finished_records(data_file))  # all on disk now
    files = [p for p in wandb_home.rglob("*") if p.is_file() and p != env_file]
    leaks = [str(p) for p in files for s in secrets.values() if s.encode() in p.read_bytes()]
    assert leaks == []


def test_offline_run_records_metrics_and_resumes_the_same_run(wandb_home: Path) -> None:
    run_dir = wandb_home / "run"
    png = wandb_home / "plot.png"
    Image.new("RGB", (4, 4), "red").save(png)
    sae_dir = wandb_home / "final"
    sae_dir.mkdir()
    (sae_dir / "cfg.json").write_text("{}")
    cfg = WandbConfig(wandb_mode="offline", wandb_run_name="first", wandb_log_artifact=True)
    settings = EnvironmentSettings()
    config = {"trainer": {"lr": 0.001}, "sae": {"k": 16}}

    with WandbLogger(cfg, run_dir, config, settings=settings) as logger:
        run_id = logger.run_id
        assert run_id and logger.run is not None
        logger.log_rows(ROWS)
        logger.log({"loss": 0.125, "note": "dropped", "eval/ce": float("nan")}, step=8192)
        logger.log_histogram("density", torch.tensor([0.1, 0.2, float("-inf"), 0.3]), step=8192)
        logger.log_images({"plot": png}, step=8192)
        logger.log_artifact(sae_dir, "blocks.6.hook_resid_post__k=16")
    assert logger.run is None

    (first,) = run_files(run_dir)
    assert first.name == f"run-{run_id}.wandb" and first.parent.name.endswith(f"-{run_id}")
    rows = history(first)
    assert [r["_step"] for r in rows] == [4096, 8192]
    assert rows[0]["k=16/loss"] == 0.5 and rows[0]["k=32/l0"] == 32
    assert rows[1]["loss"] == 0.125 and rows[1]["eval/ce"] != rows[1]["eval/ce"]  # NaN kept
    assert "note" not in rows[1]
    assert rows[1]["density/_type"] == "histogram" and sum(rows[1]["density/values"]) == 3
    assert rows[1]["plot/_type"] == "image-file"
    recs = finished_records(first)
    (run_record,) = [r.run for r in recs if r.HasField("run")]
    assert run_record.display_name == "first" and run_record.project == "drrik"
    config_items = {i.key: i.value_json for i in run_record.config.update}
    assert json.loads(config_items["sae"]) == {"k": 16}
    (artifact,) = [r.artifact for r in recs if r.HasField("artifact")]
    assert artifact.name == "blocks.6.hook_resid_post__k-16" and artifact.type == "model"

    # wandb names a session's directory by its start second: a resume within the same second
    # would share the first session's directory (seen with wandb 0.19 to 0.22).
    time.sleep(1.05 - time.time() % 1)
    with WandbLogger(cfg, run_dir, config, run_id=run_id, settings=settings) as resumed:
        assert resumed.run_id == run_id
        resumed.log({"loss": 0.0625}, step=12288)
    files = run_files(run_dir)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    second = next(f for f in files if f != first)
    (resumed_row,) = history(second)  # a new session's file, named by the same run id
    assert resumed_row["_step"] == 12288 and resumed_row["loss"] == 0.0625


def test_a_transcoder_set_logs_each_transcoder_under_its_name(
    wandb_home: Path, tiny_model: Any, tiny_model_dir: Path, docs: Dataset
) -> None:
    """Training curves and final held-out metrics of every transcoder, and the metrics of all
    of them spliced in together, each under its own name."""
    cfg = run_config(
        wandb_home / "run",
        tiny_model_dir,
        model={
            "hook": ["blocks.{layer}.mlp.hook_in"],
            "target_hook": ["blocks.{layer}.hook_mlp_out"],
            "layers": ["0", "1"],
        },
        sae={"skip_connection": True},
        trainer={"training_tokens": BATCH * 4},
        eval={"eval_together": True},
    )
    cfg.wandb = WandbConfig(wandb_mode="offline")
    fit(cfg, tiny_model, docs)
    (data,) = run_files(wandb_home / "run")
    keys = {key for row in history(data) for key in row}
    for name in ("blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"):
        assert {f"{name}/loss", f"{name}/eval/explained_variance", f"{name}/eval/fvu"} <= keys
    assert "spliced_together/eval/ce_loss_recovered" in keys
