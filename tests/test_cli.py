"""The ``drrik`` command: train and eval end to end, and how bad input is refused.

Bad input must end in exit status 2 with one line on stderr that names the field, before any
model is loaded, and must never touch an existing run. Commands run in-process through
``drrik.cli.main`` (stdout and stderr captured at the file-descriptor level); one test runs
the real ``python -m drrik`` to check the exit status and the single stderr line there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from drrik.cli import main, parse_options, parse_train_args
from drrik.config import ModelConfig, RunConfig, TrainerConfig, load_config_file
from drrik.errors import ConfigError
from drrik.options import (
    AnalysisConfig,
    AnalyzeOptions,
    EvalOptions,
    ReportOptions,
    StatusOptions,
    SteerOptions,
)
from drrik.sae import KNOWN_ARCHITECTURES, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 64
STEPS = 12


@pytest.fixture(scope="module")
def base_args(tiny_model_dir: Path, dataset_file: Path) -> list[str]:
    """Flags of a valid 12-step run, without --out."""
    return [
        *("--model", str(tiny_model_dir), "--dataset", str(dataset_file)),
        *("--hook", "blocks.1.hook_resid_post", "--context-size", "16"),
        *("--architecture", "topk", "--k", "8", "--expansion-factor", "2"),
        *("--train-batch-size-tokens", str(BATCH), "--training-tokens", str(BATCH * STEPS)),
        *("--n-batches-in-buffer", "4", "--store-batch-size-prompts", "8"),
        *("--log-every-steps", "4", "--eval-contexts", "8", "--eval-batch-size-prompts", "8"),
    ]


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``drrik ...`` in-process: (exit status, stdout, stderr)."""
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def snapshot(directory: Path) -> dict[Path, bytes]:
    """Every file under ``directory`` with its content, to prove nothing was touched."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(base_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *base_args, "--out", str(out)]) == 0
    return out


def test_eval_json_prints_parseable_metrics_matching_the_training_eval(
    trained_run: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["eval", str(trained_run), "--json", "--eval-contexts", "8"], capfd)
    assert code == 0, err
    metrics = json.loads(out)  # stdout holds the JSON and nothing else
    keys = ("explained_variance", "l0", "ce_loss_recovered", "kl_div_with_sae", "mse")
    for key in keys:
        assert isinstance(metrics[key], int | float), key
    assert metrics["l0"] == pytest.approx(8.0)
    # The same SAE on the same held-out contexts as the trainer's final evaluation.
    saved = json.loads((trained_run / "final" / "cfg.json").read_text())["metadata"]["eval"]
    for key in keys:
        assert metrics[key] == pytest.approx(saved[key], rel=1e-4, abs=1e-6), key


def test_eval_prints_a_table_for_a_saved_sae_directory(
    trained_run: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["eval", str(trained_run / "final"), "--eval-contexts", "4"], capfd)
    assert code == 0, err
    assert "explained_variance" in out and "ce_loss_recovered" in out


def test_eval_of_a_directory_without_an_sae_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["eval", str(tmp_path)], capfd)
    assert code == 2
    assert err.count("\n") == 1 and "DIR=" in err and "cfg.json" in err


BAD_FLAGS: dict[str, tuple[list[str], str, str]] = {
    # case: (flags added to a valid run, field named, words the message must contain)
    "d_sae-and-expansion_factor": (["--d-sae", "128"], "d_sae", "not both"),
    "target-l0-and-k": (["--target-l0", "4"], "target_l0", "drop one"),  # with --k 8
    "negative-l1-coefficient": (["--l1-coefficient", "-1"], "l1_coefficient", ">= 0"),
    "negative-lr": (["--lr", "-0.001"], "lr", "positive"),
    "zero-lr": (["--lr", "0"], "lr", "positive"),
    "budget-below-one-batch": (["--training-tokens", "10"], "training_tokens", "one batch"),
    "unknown-architecture": (["--architecture", "resnet"], "architecture", "use one of"),
    "bad-sweep-field": (["--sweep", "lr=1,2"], "sweep", "field=v1,v2"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_exits_2_with_one_line_naming_the_field(
    case: str, base_args: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    flags, field, words = BAD_FLAGS[case]
    argv = ["train", *base_args, "--out", str(tmp_path / "run"), *flags]
    code, out, err = run_cli(argv, capfd)
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"drrik train: error: {field}="), err
    assert words in err
    if case == "unknown-architecture":
        assert all(name in err for name in KNOWN_ARCHITECTURES)
    assert not (tmp_path / "run").exists(), "nothing is written for bad input"


CONFIG_ERRORS: dict[str, tuple[Callable[[], Any], str]] = {
    "d_sae-and-expansion_factor": (lambda: SAEConfig(d_sae=8, expansion_factor=2), "d_sae"),
    "topk-k-above-d_sae": (lambda: SAEConfig(architecture="topk", k=9, d_sae=8), "k"),
    "negative-l1-coefficient": (lambda: SAEConfig(l1_coefficient=-1.0), "l1_coefficient"),
    "negative-lr": (lambda: TrainerConfig(lr=-1.0), "lr"),
    "budget-below-one-batch": (
        lambda: RunConfig(trainer=TrainerConfig(training_tokens=10)),
        "training_tokens",
    ),
    "unknown-architecture": (lambda: SAEConfig(architecture="resnet"), "architecture"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_config_in_python_raises_config_error_naming_the_field(case: str) -> None:
    build, field = CONFIG_ERRORS[case]
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_out_holding_a_run_of_another_config_is_refused_untouched(
    trained_run: Path, base_args: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(trained_run)
    argv = ["train", *base_args, "--out", str(trained_run), "--lr", "0.01", "--k", "4"]
    code, _, err = run_cli(argv, capfd)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("drrik train: error: out=")
    assert "trainer.lr: 0.001 -> 0.01" in err and "sae.k: 8 -> 4" in err
    assert snapshot(trained_run) == before


def test_out_holding_other_files_is_refused_untouched(
    base_args: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(["train", *base_args, "--out", str(tmp_path)], capfd)
    assert code == 2 and "holds no drrik run" in err
    assert snapshot(tmp_path) == {tmp_path / "notes.txt": b"mine"}


def test_diverging_run_exits_1_naming_the_step_and_saves_no_sae(
    base_args: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *base_args, "--out", str(out), "--lr", "1e30"], capfd)
    assert code == 1
    assert "the loss became NaN or Inf at step" in err and "Lower --lr" in err
    assert not (out / "final").exists()


def test_config_file_is_loaded_and_flags_win(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"sae": {"architecture": "topk", "k": 16}, "trainer": {}}))
    cfg = parse_train_args(["--config", str(path), "--k", "32", "--lr", "0.002"])
    assert (cfg.sae.architecture, cfg.sae.k, cfg.trainer.lr) == ("topk", 32, 0.002)
    path.write_text(yaml.safe_dump({"sae": {"kk": 16}}))
    with pytest.raises(ConfigError, match="sae.kk"):
        parse_train_args(["--config", str(path)])


def test_usage_and_unknown_command(capfd: pytest.CaptureFixture[str]) -> None:
    assert run_cli([], capfd)[0] == 0
    code, out, _ = run_cli(["fly"], capfd)
    assert code == 2 and "usage: drrik" in out


def test_real_command_exits_2_with_one_stderr_line(tmp_path: Path) -> None:
    """The installed entry point, not just ``main``: status 2, one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "drrik", "train", "--d-sae", "64", "--expansion-factor", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "drrik train: error: d_sae=64: set either d_sae or expansion_factor, not both"
    ]
    assert not any(tmp_path.iterdir())


# -- one parser per command, on the options dataclasses -------------------------------------

FROM_YAML: dict[str, tuple[dict[str, Any], list[str], Any]] = {
    "eval": (
        {"eval_contexts": 8, "json": True},
        ["--eval-contexts", "4"],
        EvalOptions(eval_contexts=4, json=True),
    ),
    "status": ({"json": True}, [], StatusOptions(json=True)),
    "analyze": (
        {"device": "cpu", "analysis": {"logit_k": 3, "top_k": 2}},
        ["--top-k", "5"],
        AnalyzeOptions(analysis=AnalysisConfig(logit_k=3, top_k=5)),
    ),
    "report": (
        {"features": [1, 2], "n_features": 5},
        [],
        ReportOptions(features=[1, 2], n_features=5),
    ),
    "steer": (
        {"prompt": ["hi"], "mode": "clamp"},
        ["--units", "absolute"],
        SteerOptions(prompt=["hi"], mode="clamp", units="absolute"),
    ),
}


@pytest.mark.parametrize("command", list(FROM_YAML))
def test_every_command_reads_config_yaml_and_flags_win(command: str, tmp_path: Path) -> None:
    tree, flags, expected = FROM_YAML[command]
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(tree))
    where, opts = parse_options(command, ["somewhere", "--config", str(path), *flags])
    assert where == Path("somewhere") and opts == expected
    path.write_text(yaml.safe_dump({"no_such_option": 1}))
    with pytest.raises(ConfigError, match="no_such_option"):
        parse_options(command, ["somewhere", "--config", str(path)])


HELP_CHOICES = {
    "train": [
        "{auto,float32,bfloat16,float16}",
        "{bos,eos,none}",
        "{model,float32,bfloat16,float16}",
        "{constant,cosineannealing,cosineannealingwarmrestarts}",
        "{geometric_median,mean,zeros}",
        "{expected_average_only_in,none}",
        "{,online,offline,disabled}",
    ],
    "steer": ["{add,clamp}", "{max,absolute}"],
    "analyze": ["--logit-k", "--seed", "--tokens"],
    "report": ["--logit-k", "--features", "--n-features"],
    "eval": ["--eval-split", "--json"],
    "status": ["--json"],
}


@pytest.mark.parametrize("command", list(HELP_CHOICES))
def test_help_lists_the_choices_and_config(command: str, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capfd.readouterr().out
    assert exit_.value.code == 0
    assert "--config" in out
    for text in HELP_CHOICES[command]:
        assert text in out, text


def test_bad_choice_exits_2(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["steer", "d", "--prompt", "x", "--feature", "1", "--mode", "subtract"])
    assert exit_.value.code == 2
    assert "invalid choice: 'subtract'" in capfd.readouterr().err.splitlines()[-1]


def test_cli_options_equal_the_python_api_dataclasses() -> None:
    """``drrik analyze --logit-k N --seed S`` reaches the AnalysisConfig analyze() takes."""
    _, opts = parse_options("analyze", ["d", "--logit-k", "5", "--seed", "3", "--tokens", "128"])
    assert opts.analysis == AnalysisConfig(logit_k=5, seed=3, n_tokens=128)
    _, opts = parse_options(
        "steer", ["d", "--prompt", "a", "b", "--prompt", "c", "--feature", "1", "2"]
    )
    assert opts == SteerOptions(prompt=["a", "b", "c"], feature=[1, 2])
    flags = ["--hook", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cfg = parse_train_args([*flags, "--sweep", "k=16,32", "--architecture", "topk", "--k", "8"])
    assert cfg.model == ModelConfig(hook=flags[1:])
    assert cfg.trainer == TrainerConfig(sweep=["k=16,32"])


def test_dictionaries_name_and_type_the_sweep() -> None:
    cfg = RunConfig(
        model=ModelConfig(hook=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]),
        trainer=TrainerConfig(sweep=["l1_coefficient=1,2.5", "expansion_factor=4"]),
    )
    specs = cfg.dictionaries()
    assert [s.name for s in specs] == [
        f"blocks.{i}.hook_resid_post__l1_coefficient={v}__expansion_factor=4"
        for i in (0, 1)
        for v in ("1", "2.5")
    ]
    assert [s.sae.l1_coefficient for s in specs[:2]] == [1.0, 2.5]
    assert specs[0].sae.expansion_factor == 4 and specs[0].reads == ("blocks.0.hook_resid_post",)
    with pytest.raises(ConfigError, match="k=abc"):
        RunConfig(trainer=TrainerConfig(sweep=["k=abc"]))


HOOKS = "blocks.0.hook_resid_post blocks.1.hook_resid_post"
DEPRECATED: dict[str, tuple[str, list[str], str]] = {
    "hook": ("train", ["--hook", HOOKS.replace(" ", ",")], f"--hook {HOOKS}"),
    "sweep": (
        "train",
        ["--sweep", "k=16,32;l1_coefficient=1,2"],
        "--sweep k=16,32 l1_coefficient=1,2",
    ),
    "features": ("report", ["d", "--features", "0,3"], "--features 0 3"),
    "compare": ("steer", ["d", "--prompt", "p", "--compare", "2,5"], "--compare 2 5"),
    "keep-special-tokens": (
        "analyze",
        ["d", "--keep-special-tokens"],
        "--ignore-special-tokens false",
    ),
}


@pytest.mark.parametrize("case", list(DEPRECATED))
def test_old_flags_work_with_a_deprecation_line(
    case: str, capfd: pytest.CaptureFixture[str]
) -> None:
    command, old, new = DEPRECATED[case]
    flag = new.split()[0]
    modern = [*old[: old.index(flag) if flag in old else len(old)], *new.split()]
    if flag not in old:  # a renamed flag
        modern = [a for a in old if not a.startswith("--")] + new.split()
    capfd.readouterr()
    if command == "train":
        got, want = parse_train_args(old), parse_train_args(modern)
        assert (got.model, got.trainer) == (want.model, want.trainer)
    else:
        assert parse_options(command, old) == parse_options(command, modern)
    err = capfd.readouterr().err
    assert err.splitlines()[0].endswith(f"is deprecated; write {new}"), err


def test_old_run_config_with_one_hook_string_loads(tmp_path: Path) -> None:
    """config.yaml of runs saved before hooks and sweeps were lists."""
    path = tmp_path / "config.yaml"
    tree = RunConfig().to_dict()
    tree["model"]["hook"] = "blocks.1.hook_resid_post"
    tree["trainer"]["sweep"] = ""
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config_file(path)
    assert cfg.model.hook == ["blocks.1.hook_resid_post"] and cfg.trainer.sweep == []
    assert cfg.model.hook_names == ["blocks.1.hook_resid_post"]


def test_status_options_and_help_load_no_torch() -> None:
    """``drrik status`` must stay fast: the CLI and the options import neither torch nor
    datasets (``drrik/__init__`` is bypassed here; it is made lazy on its own)."""
    code = """
import importlib.util, sys, types
sys.modules["torch"] = sys.modules["datasets"] = None  # importing them now fails
package = types.ModuleType("drrik")
package.__path__ = importlib.util.find_spec("drrik").submodule_search_locations
sys.modules["drrik"] = package
from drrik.cli import main
main(["status", "--help"])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout
