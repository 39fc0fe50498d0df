"""The ``drrik`` command: train, eval, status, analyze, report, steer.

Every config field is a flag (``drrik train --help``) and ``--config FILE.yaml`` loads the same
fields from YAML (flags win). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from simple_parsing import ArgumentParser, DashVariant

from drrik.config import DataConfig, EvalConfig, ModelConfig, RunConfig, load_config_file
from drrik.errors import ConfigError, require
from drrik.run_dir import CONFIG_FILE, locate_saved_sae

Command = Callable[[list[str]], int]


def train_parser(defaults: RunConfig | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog="drrik train",
        description="Train sparse autoencoders on a model's activations, streamed.",
        add_option_string_dash_variants=DashVariant.DASH,
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    parser.add_argument("--resume", type=Path, help="continue the run in this directory")
    parser.add_arguments(RunConfig, dest="cfg", default=defaults)
    return parser


def parse_train_args(argv: list[str]) -> RunConfig:
    """Config from, in rising priority: defaults, --resume's saved config or --config, flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    pre.add_argument("--resume", type=Path)
    pre.add_argument("--device")
    known, _ = pre.parse_known_args(argv)
    defaults = None
    if known.resume is not None:
        saved = known.resume / CONFIG_FILE
        require(
            saved.is_file(),
            "resume",
            str(known.resume),
            "no drrik run there (no config.yaml); check the path",
        )
        defaults = load_config_file(saved, device=known.device)
    elif known.config is not None:
        defaults = load_config_file(known.config, device=known.device)
    cfg = train_parser(defaults).parse_args(argv).cfg
    if known.resume is not None:
        cfg.out = str(known.resume)
    return cfg


def cmd_train(argv: list[str]) -> int:
    from drrik.learner import TrainingDiverged
    from drrik.pipeline import train
    from drrik.trainer import TrainingStopped

    cfg = parse_train_args(argv)
    try:
        train(cfg)
    except TrainingDiverged as exc:
        print(f"drrik train: {exc}", file=sys.stderr)
        return 1
    except TrainingStopped as exc:
        print(f"drrik train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="drrik eval", description="Evaluate a saved SAE on held-out text."
    )
    parser.add_argument("dir", type=Path, help="run directory or saved SAE directory")
    parser.add_argument("--model", help="model (default: the one the SAE was trained on)")
    parser.add_argument("--dataset", help="dataset (default: the training dataset)")
    parser.add_argument("--eval-split", help="split to evaluate on (default: held-out rows)")
    parser.add_argument("--eval-contexts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    import torch

    from drrik.data import ContextStream, SpecialTokens, load_source
    from drrik.evaluate import EvalTarget, evaluate, format_metrics, held_out_contexts
    from drrik.model import check_hooks, load_model, resolve_dtype
    from drrik.sae import load_sae
    from drrik.sae.saving import read_sae_cfg

    sae_dir = locate_saved_sae(args.dir).sae_dir
    meta = read_sae_cfg(sae_dir)["metadata"]
    model_name = args.model or meta.get("model_name")
    require(bool(model_name), "model", model_name, "the SAE names no model; pass --model")
    model_cfg = ModelConfig(model=model_name, hook=meta.get("hook_name", ""), device=args.device)
    data_cfg = DataConfig(
        dataset=args.dataset or meta.get("dataset_path", "drrik-offline"),
        eval_split=args.eval_split,
        context_size=int(meta.get("context_size", 128)),
        prepend_bos=bool(meta.get("prepend_bos", True)),
    )
    eval_cfg = EvalConfig(eval_contexts=args.eval_contexts)
    # Cheap reads first, so that a damaged SAE or dataset fails before the model loads.
    sae = load_sae(sae_dir, device=args.device)
    dataset = load_source(data_cfg, args.eval_split)
    dtype = resolve_dtype(model_cfg.model_dtype, args.device)
    model = load_model(model_cfg.model, device=args.device, dtype=dtype)
    check_hooks(model, model_cfg.hook_names)
    holdout = "all" if args.eval_split else "eval"
    stream = ContextStream(dataset, model.tokenizer, data_cfg, holdout=holdout, cycle=False)
    contexts = held_out_contexts(stream, eval_cfg.eval_contexts, eval_cfg.eval_batch_size_prompts)
    exclude = torch.tensor(SpecialTokens.of(model.tokenizer).ids(), dtype=torch.long)
    target = EvalTarget(sae_dir.name, model_cfg.hook_names[0], sae)
    metrics, _ = evaluate(model, [target], contexts, exclude, eval_cfg.dense_threshold)
    if args.json:
        print(json.dumps(metrics[target.name], indent=2))
    else:
        print(format_metrics(metrics))
    return 0


COMMANDS: dict[str, str] = {
    "train": "drrik.cli:cmd_train",
    "eval": "drrik.cli:cmd_eval",
    "status": "drrik.status:cmd_status",
    "analyze": "drrik.analysis:cmd_analyze",
    "report": "drrik.report:cmd_report",
    "steer": "drrik.steering:cmd_steer",
}
"""Each command's function, imported only when that command runs (plots load matplotlib)."""


def _command(name: str) -> Command:
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"usage: drrik {{{known}}} [options]   (drrik COMMAND --help for details)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return _command(argv[0])(argv[1:])
    except ConfigError as exc:
        print(f"drrik {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drrik {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
