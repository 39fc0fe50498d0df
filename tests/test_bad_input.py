"""A battery of bad input, tried as a new user would, across every command.

Each case builds its bad input (a damaged file, a wrong flag) in a fresh directory that also
holds a copy of a saved run, runs the command in-process through ``drrik.cli.main`` and
asserts: exit status 2, no traceback, one error line naming the offending value, and no file
in that directory created or changed. Most cases fail before any model loads; the four from
the bug report also run through the real ``python -m drrik``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from saved_sae import D_SAE, HOOK, make_run, text_file

from drrik.cli import main, parse_train_args
from drrik.config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "run/final/sae_weights.safetensors"
CFG = "run/final/cfg.json"


Files = dict[str, str | bytes]


@dataclass(frozen=True)
class Bad:
    """One bad input. ``args`` may hold ``{tmp}`` (the case's directory), ``{run}`` (its copy
    of a saved run), ``{model}`` and ``{data}`` (a good model and dataset); ``train`` args
    follow the flags of a valid small run; ``{tmp}/tiny-copy`` is a copy of the model.
    ``files`` are written under ``{tmp}`` first, ``cut``
    files truncated to 100 bytes (as a full disk or a killed copy leaves them) and ``gone``
    files deleted."""

    command: str
    args: tuple[str, ...]
    named: str
    files: Files = field(default_factory=dict)
    cut: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()


def train(*args: str, named: str, files: Files | None = None) -> Bad:
    return Bad("train", args, named, files or {})


def on_run(
    command: str, *args: str, named: str, files: Files | None = None, cut: str = "", gone: str = ""
) -> Bad:
    """``command`` on the saved run's copy."""
    return Bad(
        command,
        ("{run}", *args),
        named,
        files or {},
        (cut,) if cut else (),
        (gone,) if gone else (),
    )


def dataset(command: str, name: str, files: Files) -> Bad:
    """``command`` with ``--dataset {tmp}/name``, made of ``files``."""
    args = ("--dataset", f"{{tmp}}/{name}")
    if command == "train":
        return train(*args, named=name, files=files)
    return on_run(command, *args, named=name, files=files)


def sae_cfg(cfg_json: dict[str, object], named: str) -> Bad:
    """``drrik eval`` of the saved SAE with its cfg.json replaced by ``cfg_json``."""
    return on_run("eval", "--model", "{model}", named=named, files={CFG: json.dumps(cfg_json)})


def config_file(text: str | bytes, named: str) -> Bad:
    """``drrik train --config`` a file holding ``text``."""
    return train("--config", "{tmp}/c.yaml", named=named, files={"c.yaml": text})


def status(named: str, files: Files) -> Bad:
    """``drrik status`` on a run directory holding ``files`` (a good config.yaml unless given)."""
    good = yaml.safe_dump({"trainer": {"training_tokens": 1000}, "store": {}})
    written = {"st/config.yaml": good} | {f"st/{k}": v for k, v in files.items()}
    return Bad("status", ("{tmp}/st",), named, written)


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


TORN_JSONL = '{"text": "one"}\n{"text": \n'
NOT_UTF8 = b"\xff\xfe\x00 not text \xc3"
BAD_YAML = "trainer:\n  lr: [0.1, 0.2\nsae: {k: 8}\n"
ROW = {"step": 1, "tokens": 64, "tokens_per_second": 10.0, "sae": ""}
BEAT = {"pid": 1, "host": "elsewhere", "time": 0.0, "state": "finished"}
ANALYSIS = "run/analysis/analysis.json"
TENSORS = "run/analysis/features.safetensors"

CASES: dict[str, Bad] = {
    # -- train: datasets -------------------------------------------------------------------
    "train-dataset-empty-txt": dataset("train", "empty.txt", {"empty.txt": ""}),
    "train-dataset-torn-jsonl": dataset("train", "torn.jsonl", {"torn.jsonl": TORN_JSONL}),
    "train-dataset-not-parquet": dataset("train", "x.parquet", {"x.parquet": b"PAR1 junk"}),
    "train-dataset-not-utf8": dataset("train", "bin.txt", {"bin.txt": NOT_UTF8}),
    "train-dataset-missing": train("--dataset", "./no-such.txt", named="no-such.txt"),
    "train-dataset-csv": dataset("train", "d.csv", {"d.csv": "text\nhello\n"}),
    "train-dataset-dir-of-empty-files": dataset(
        "train", "blank", {"blank/a.txt": "", "blank/b.txt": ""}
    ),
    "train-dataset-dir-without-data": dataset("train", "notes", {"notes/notes.md": "hi"}),
    "train-dataset-damaged-saved-dataset": dataset(
        "train", "saved", {"saved/state.json": "{oops", "saved/dataset_info.json": "{}"}
    ),
    # -- train: devices ----------------------------------------------------------------------
    "train-device-cuda-7": train("--device", "cuda:7", named="cuda:7"),
    "train-device-gpu": train("--device", "gpu", named="gpu"),
    "train-device-mps": train("--device", "mps", named="mps"),
    "train-device-meta": train("--device", "meta", named="meta"),
    "train-device-cuda-x": train("--device", "cuda:x", named="cuda:x"),
    "train-act-store-device": train("--act-store-device", "cuda:1", named="cuda:1"),
    # -- train: config files -------------------------------------------------------------------
    "train-config-malformed-yaml": config_file(BAD_YAML, named="line 3, column 4"),
    "train-config-missing": train("--config", "{tmp}/none.yaml", named="none.yaml"),
    "train-config-a-list": config_file("- 1\n- 2\n", named="c.yaml"),
    "train-config-not-utf8": config_file(NOT_UTF8, named="c.yaml"),
    "train-config-unknown-section": config_file("optimizer: {}\n", named="optimizer"),
    "train-config-unknown-field": config_file("trainer: {lrr: 1}\n", named="trainer.lrr"),
    "train-config-word-for-number": config_file("trainer: {lr: fast}\n", named="'fast'"),
    "train-config-fraction-for-int": config_file("sae: {k: 8.5}\n", named="sae.k=8.5"),
    "train-config-list-for-int": config_file("data: {context_size: [1, 2]}\n", named="[1, 2]"),
    "train-config-word-for-bool": config_file("data: {streaming: maybe}\n", named="'maybe'"),
    "train-config-null-for-float": config_file("trainer: {lr: null}\n", named="trainer.lr"),
    "train-config-section-not-mapping": config_file("sae: 5\n", named="sae=5"),
    "train-config-bad-value": config_file("trainer: {lr: -1}\n", named="lr=-1.0"),
    # -- train: resume, model, flags -------------------------------------------------------------
    "train-resume-missing": train("--resume", "{tmp}/gone", named="gone"),
    "train-resume-damaged-config": train(
        "--resume", "{tmp}/old", named="config.yaml", files={"old/config.yaml": BAD_YAML}
    ),
    "train-resume-run-of-a-gpu": train(
        "--resume",
        "{tmp}/old",
        named="cuda:3",
        files={"old/config.yaml": yaml.safe_dump({"model": {"device": "cuda:3"}})},
    ),
    "train-model-missing": train("--model", "/no/such/model", named="/no/such/model"),
    "train-model-dir-without-config": train(
        "--model", "{tmp}/no-config", named="no-config", files={"no-config/w.bin": b"0"}
    ),
    "train-model-config-garbage": train(
        "--model", "{tmp}/tiny-copy", named="tiny-copy", files={"tiny-copy/config.json": "{"}
    ),
    "train-model-weights-truncated": Bad(
        "train", ("--model", "{tmp}/tiny-copy"), "tiny-copy", cut=("tiny-copy/model.safetensors",)
    ),
    "train-model-gguf-missing": train("--model", "{tmp}/m.gguf", named="m.gguf"),
    "train-sweep-word-for-k": train("--sweep", "k=8,abc", named="k=abc"),
    "train-target-l0-zero": train(
        "--architecture", "relu", "--target-l0", "0", named="target_l0=0"
    ),
    "train-target-l0-with-k": train("--target-l0", "16", named="target_l0=16"),  # and --k 8
    "train-target-l0-above-d_sae": train(
        "--architecture", "relu", "--target-l0", "40", "--sweep", "d_sae=32", named="target_l0=40"
    ),
    "train-target-l0-above-the-hook-width": train(
        "--architecture", "relu", "--target-l0", "65", named="d_in (64)"
    ),
    "train-out-is-a-file": train("--out", "{tmp}/a-file", named="a-file", files={"a-file": "x"}),
    "train-dataset-only-blank-lines": dataset("train", "blank.txt", {"blank.txt": "\n\n \n"}),
    "train-flag-not-a-number": train("--lr", "abc", named="abc"),
    "train-context-size-1": train("--context-size", "1", named="context_size=1"),
    "train-hook-unknown": train("--hook", "blocks.99.hook_resid_post", named="blocks.99"),
    # -- transcoders and layer templates (issue 13) -------------------------------------------
    "train-target-hooks-fewer-than-hooks": train(
        *("--hook", "blocks.0.mlp.hook_in", "blocks.1.mlp.hook_in"),
        *("--target-hook", "blocks.1.hook_mlp_out"),
        named="target_hook",
    ),
    "train-target-hook-before-its-input": train(
        *("--hook", "blocks.2.mlp.hook_in", "--target-hook", "blocks.1.hook_mlp_out"),
        named="blocks.1.hook_mlp_out",
    ),
    "train-target-hook-unknown": train(
        *("--hook", "blocks.1.mlp.hook_in", "--target-hook", "blocks.1.hook_mlp_outt"),
        named="blocks.1.hook_mlp_out,",  # the closest valid name is offered
    ),
    "train-skip-connection-on-an-sae": train("--skip-connection", named="skip_connection"),
    "train-layer-template-without-layers": train(
        "--hook", "blocks.{{layer}}.hook_resid_post", named="{layer}"
    ),
    "train-layers-without-a-template": train(
        "--hook", "blocks.1.hook_resid_post", "--layers", "0", "1", named="hook_resid_post"
    ),
    "train-layers-beyond-the-model": train(
        *("--hook", "blocks.{{layer}}.hook_resid_post", "--layers", "0", "9"),
        named="blocks.9.hook_resid_post",
    ),
    "train-layers-a-word": train(
        "--hook", "blocks.{{layer}}.hook_resid_post", "--layers", "first", named="first"
    ),
    # -- eval ------------------------------------------------------------------------------
    "eval-truncated-weights": on_run("eval", named="sae_weights.safetensors", cut=WEIGHTS),
    "eval-garbage-cfg-json": on_run("eval", named="cfg.json", files={CFG: "{not json"}),
    "eval-cfg-json-a-list": on_run("eval", named="cfg.json", files={CFG: "[1, 2]"}),
    "eval-cfg-json-unknown-architecture": sae_cfg(
        {"architecture": "resnet", "d_in": 64, "d_sae": 8}, named="resnet"
    ),
    "eval-cfg-json-without-d_in": sae_cfg({"architecture": "standard"}, named="cfg.json"),
    "eval-weights-of-another-shape": sae_cfg(
        {"architecture": "standard", "d_in": 64, "d_sae": 8}, named="W_enc"
    ),
    "eval-weights-missing": on_run("eval", named="sae_weights.safetensors", gone=WEIGHTS),
    "eval-device-cuda-7": on_run("eval", "--device", "cuda:7", named="cuda:7"),
    "eval-dataset-empty": dataset("eval", "e.jsonl", {"e.jsonl": ""}),
    "eval-dataset-torn": dataset("eval", "t.jsonl", {"t.jsonl": TORN_JSONL}),
    "eval-eval-contexts-0": on_run("eval", "--eval-contexts", "0", named="eval_contexts=0"),
    "eval-eval-contexts-word": on_run("eval", "--eval-contexts", "many", named="many"),
    "eval-model-tokenizer-garbage": on_run(
        "eval",
        *("--model", "{tmp}/tiny-copy"),
        named="tiny-copy",
        files={"tiny-copy/tokenizer.json": "{"},
    ),
    "eval-model-missing": on_run("eval", "--model", "./no-model", named="no-model"),
    "eval-not-an-sae": Bad("eval", ("{tmp}",), named="DIR="),
    # -- analyze -----------------------------------------------------------------------------
    "analyze-truncated-weights": on_run("analyze", named="sae_weights.safetensors", cut=WEIGHTS),
    "analyze-device-cuda-3": on_run("analyze", "--device", "cuda:3", named="cuda:3"),
    "analyze-dataset-empty": dataset("analyze", "e.txt", {"e.txt": ""}),
    "analyze-tokens-0": on_run("analyze", "--tokens", "0", named="n_tokens=0"),
    "analyze-window-1": on_run("analyze", "--window", "1", named="window=1"),
    "analyze-damaged-run-config": on_run(
        "analyze", named="config.yaml", files={"run/config.yaml": BAD_YAML}
    ),
    "analyze-run-config-wrong-type": on_run(
        "analyze",
        named="data.context_size",
        files={"run/config.yaml": yaml.safe_dump({"data": {"context_size": "long"}})},
    ),
    # -- report --------------------------------------------------------------------------------
    "report-damaged-analysis-json": on_run(
        "report", named="analysis.json", files={ANALYSIS: "{", TENSORS: b"x"}
    ),
    "report-truncated-analysis-tensors": on_run(
        "report",
        named="features.safetensors",
        files={ANALYSIS: json.dumps({"meta": {}, "vocab": {}}), TENSORS: b"\x08\x00junk"},
    ),
    "report-features-not-ints": on_run("report", "--features", "1", "two", named="'two'"),
    "report-feature-out-of-range": on_run(
        "report", "--features", f"3,{D_SAE}", named=f"features={D_SAE}"
    ),
    "report-feature-negative": on_run("report", "--features", "-1", named="features=-1"),
    "report-out-is-a-file": on_run(
        "report", "--out", "{tmp}/a-file", named="a-file", files={"a-file": "mine"}
    ),
    "report-n-features-0": on_run("report", "--n-features", "0", named="n_features=0"),
    "report-device-cuda-7": on_run("report", "--device", "cuda:7", named="cuda:7"),
    "report-truncated-weights": on_run("report", named="sae_weights.safetensors", cut=WEIGHTS),
    # -- steer ---------------------------------------------------------------------------------
    "steer-feature-out-of-range": on_run(
        "steer", "--prompt", "Hi", "--feature", str(D_SAE), named=f"feature={D_SAE}"
    ),
    "steer-feature-negative": on_run(
        "steer", "--prompt", "Hi", "--feature", "-3", named="feature=-3"
    ),
    "steer-strength-count": on_run(
        "steer",
        *("--prompt", "Hi", "--feature", "1", "--feature", "2"),
        *("--strength", "1", "--strength", "2", "--strength", "3"),
        named="[1.0, 2.0, 3.0]",
    ),
    "steer-compare-not-numbers": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", "--compare", "2", "lots", named="'lots'"
    ),
    "steer-max-new-tokens-0": on_run(
        "steer",
        "--prompt",
        "Hi",
        "--feature",
        "1",
        "--max-new-tokens",
        "0",
        named="max_new_tokens=0",
    ),
    "steer-temperature-negative": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", "--temperature", "-1", named="temperature=-1.0"
    ),
    "steer-top-p-above-1": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", "--top-p", "1.5", named="top_p=1.5"
    ),
    "steer-no-feature": on_run("steer", "--prompt", "Hi", named="--feature"),
    "steer-feature-not-int": on_run("steer", "--prompt", "Hi", "--feature", "one", named="'one'"),
    "steer-mode-unknown": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", "--mode", "swap", named="'swap'"
    ),
    "steer-device-cuda-7": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", "--device", "cuda:7", named="cuda:7"
    ),
    "steer-garbage-cfg-json": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", named="cfg.json", files={CFG: "{"}
    ),
    "steer-truncated-weights": on_run(
        "steer", "--prompt", "Hi", "--feature", "1", named="sae_weights", cut=WEIGHTS
    ),
    # -- status --------------------------------------------------------------------------------
    "status-missing-dir": Bad("status", ("{tmp}/nowhere",), named="nowhere"),
    "status-not-a-run": Bad("status", ("{tmp}",), named="no config.yaml"),
    "status-malformed-config": status("line 3, column 4", {"config.yaml": BAD_YAML}),
    "status-config-a-list": status("config.yaml", {"config.yaml": "- 1\n"}),
    "status-config-section-a-number": status("config.yaml", {"config.yaml": "trainer: 5\n"}),
    "status-config-word-for-number": status(
        "trainer.training_tokens", {"config.yaml": "trainer: {training_tokens: lots}\n"}
    ),
    "status-heartbeat-garbage": status("heartbeat.json", {"heartbeat.json": "{"}),
    "status-heartbeat-a-list": status("heartbeat.json", {"heartbeat.json": "[]"}),
    "status-heartbeat-time-a-word": status(
        "heartbeat.json", {"heartbeat.json": json.dumps(BEAT | {"time": "noon"})}
    ),
    "status-heartbeat-unknown-state": status(
        "heartbeat.json", {"heartbeat.json": json.dumps(BEAT | {"state": "paused"})}
    ),
    "status-metrics-damaged-line": status("line 1", {"metrics.jsonl": jsonl("{oops", ROW, ROW)}),
    "status-metrics-row-a-list": status("line 2", {"metrics.jsonl": jsonl(ROW, [1, 2], ROW)}),
    "status-metrics-tokens-a-word": status(
        "metrics.jsonl", {"metrics.jsonl": jsonl(ROW | {"tokens": "many"}, ROW)}
    ),
}


@pytest.fixture(scope="module")
def saved_run(
    tiny_model: object, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A run directory holding a saved SAE (no analysis), on the tiny model."""
    root = tmp_path_factory.mktemp("bad-input")
    return make_run(root / "run", tiny_model, tiny_model_dir, text_file(root / "docs.txt"))


def snapshot(directory: Path) -> dict[Path, bytes]:
    """Every file under ``directory`` with its content, to prove nothing was touched."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def prepare(bad: Bad, tmp: Path, saved_run: Path, model: Path, data: Path) -> list[str]:
    """Build the case's input under ``tmp``; its argv."""
    shutil.copytree(saved_run, tmp / "run")
    if any("{tmp}/tiny-copy" in a for a in bad.args):  # a model copy to damage
        shutil.copytree(model, tmp / "tiny-copy")
    for name, content in bad.files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for name in bad.cut:
        (tmp / name).write_bytes((tmp / name).read_bytes()[:100])
    for name in bad.gone:
        (tmp / name).unlink()
    places = {"tmp": tmp, "run": tmp / "run", "model": model, "data": data}
    args = [a.format(**places) for a in bad.args]
    if bad.command == "train":
        args = [
            *("--model", str(model), "--dataset", str(data), "--hook", HOOK),
            *("--context-size", "16", "--architecture", "topk", "--k", "8"),
            *("--expansion-factor", "2", "--train-batch-size-tokens", "64"),
            *("--training-tokens", "768", "--n-batches-in-buffer", "4"),
            *("--store-batch-size-prompts", "8", "--eval-contexts", "8"),
            *("--eval-batch-size-prompts", "8", "--out", str(tmp / "out"), *args),
        ]
    return [bad.command, *args]


def run_main(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``drrik ...`` in-process: (exit status, stderr); argparse's own errors exit too."""
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capfd.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_it_and_touches_nothing(
    case: str,
    saved_run: Path,
    tiny_model_dir: Path,
    dataset_file: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = CASES[case]
    argv = prepare(bad, tmp_path, saved_run, tiny_model_dir, dataset_file)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_main(argv, capfd)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"drrik {bad.command}: ")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"drrik {bad.command}: error: "), err
    assert bad.named in errors[0], errors[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "argv", [["status", "{tmp}/st"], ["eval", "{run}", "--eval-contexts", "2"]]
)
def test_the_undamaged_inputs_work(
    argv: list[str],
    saved_run: Path,
    tiny_model_dir: Path,
    dataset_file: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The run copy and status directory the cases start from are good: each case fails by its
    own damage alone."""
    good = status("", {})
    prepare(good, tmp_path, saved_run, tiny_model_dir, dataset_file)
    argv = [a.format(tmp=tmp_path, run=tmp_path / "run") for a in argv]
    code, err = run_main(argv, capfd)
    assert code == 0, err


def test_the_battery_covers_every_command_with_enough_cases() -> None:
    commands = [bad.command for bad in CASES.values()]
    assert set(commands) == {"train", "eval", "analyze", "report", "steer", "status"}
    assert len(commands) >= 60
    assert min(commands.count(c) for c in set(commands)) >= 5


def test_resume_takes_a_device_flag_over_the_saved_one(tmp_path: Path) -> None:
    """A run saved on a GPU machine resumes on a CPU one: --device replaces the saved device
    before the saved config is checked."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"device": "cuda:3"}}))
    cfg = parse_train_args(["--resume", str(tmp_path), "--device", "cpu"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.device, cfg.out) == ("cpu", str(tmp_path))


def test_config_values_are_read_as_their_fields_types(tmp_path: Path) -> None:
    """YAML reads 1.5e6 as a string and 2 as an int: both become what the field holds."""
    path = tmp_path / "c.yaml"
    path.write_text("trainer: {training_tokens: 1.5e6, lr: 2}\nmodel: {model: 123}\n")
    cfg = parse_train_args(["--config", str(path)])
    assert cfg.trainer.training_tokens == 1_500_000 and isinstance(cfg.trainer.lr, float)
    assert cfg.model.model == "123"


@pytest.mark.parametrize(
    "case",
    [
        "train-dataset-empty-txt",
        "train-device-cuda-7",
        "train-config-malformed-yaml",
        "eval-truncated-weights",
    ],
)
def test_the_reported_cases_through_the_real_command(
    case: str, saved_run: Path, tiny_model_dir: Path, dataset_file: Path, tmp_path: Path
) -> None:
    """The four inputs of the bug report, through ``python -m drrik``: status 2, one line."""
    bad = CASES[case]
    argv = prepare(bad, tmp_path, saved_run, tiny_model_dir, dataset_file)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "drrik", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"drrik {bad.command}: error: ") and bad.named in last
    assert snapshot(tmp_path) == before


def test_device_check_counts_the_gpus_it_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with two GPUs, cuda and cuda:1 pass and cuda:2 names the count."""
    import torch

    from drrik.errors import ConfigError, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cpu", "cuda", "cuda:0", "cuda:1"):
        check_device(device)
    with pytest.raises(ConfigError, match=r"device='cuda:2': this machine has 2 CUDA device"):
        check_device("cuda:2")
    with pytest.raises(ConfigError, match="act_store_device='cuda:5'.*cuda:0 to cuda:1"):
        check_device("cuda:5", "act_store_device")


def test_library_errors_become_one_line_naming_the_root_cause() -> None:
    """A wrapped library error shows its root cause on one line; a ConfigError raised while
    reading keeps its field and says where the value came from."""
    from drrik.errors import ConfigError, reading

    with pytest.raises(ConfigError) as info, reading("dataset", "d.jsonl", "fix it"):
        try:
            raise ValueError("parse error\n  in row 3")
        except ValueError as exc:
            raise RuntimeError("An error occurred while generating the dataset") from exc
    assert str(info.value) == (
        "dataset='d.jsonl': cannot read it (ValueError: parse error in row 3); fix it"
    )
    with pytest.raises(ConfigError) as info, reading("config", "c.yaml", "fix it"):
        raise ConfigError("lr", -1.0, "use a value >= 0")
    assert (info.value.field, str(info.value)) == ("lr", "lr=-1.0: use a value >= 0 (in c.yaml)")
