"""The ``drrik`` command: train, eval, status, analyze, report, steer, export.

Every command's options are a documented dataclass (:class:`~drrik.config.RunConfig` for
``train``, :mod:`drrik.options` for the others) that simple-parsing turns into flags, so
``drrik COMMAND --help`` lists every field and its choices, and the Python API takes the same
dataclasses. ``--config FILE.yaml`` loads the same fields from YAML for every command (flags
win). Old spellings still work with a one-line deprecation warning. Bad input ends with one
line on stderr and exit status 2. Each command imports torch, the model code or matplotlib
only when it runs, so ``drrik status`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simple_parsing import ArgumentParser, DashVariant

from drrik.errors import ConfigError, check_device, require
from drrik.options import (
    AnalyzeOptions,
    EvalOptions,
    ExportOptions,
    ReportOptions,
    StatusOptions,
    SteerOptions,
    deprecated,
    load_options,
    split_legacy,
)
from drrik.run_dir import CONFIG_FILE
from drrik.status import format_status, run_status

if TYPE_CHECKING:  # the run config imports torch: only the commands that need it load it
    from drrik.config import RunConfig

SAE_DIR_HELP = "run directory or saved SAE directory"
RENAMED = {"--keep-special-tokens": ["--ignore-special-tokens", "false"]}
"""Old flags and what they are now."""
COMMA_LISTS = ("--features", "--compare")
"""List flags that used to take one comma-separated string (``--hook`` and ``--sweep`` are
split by their configs, so a YAML string or a Python one is accepted too)."""


def modernize(argv: list[str]) -> list[str]:
    """``argv`` with old spellings replaced by today's, each with a deprecation warning."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg in RENAMED:
            deprecated(arg, " ".join(RENAMED[arg]))
            out += RENAMED[arg]
        elif i and argv[i - 1] in COMMA_LISTS:
            out += split_legacy([arg], ",", argv[i - 1])
        else:
            out.append(arg)
    return out


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    """The flags that choose the defaults, read before the full parser is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    pre.add_argument("--resume", type=Path)
    pre.add_argument("--device")
    return pre.parse_known_args(argv)[0]


def build_parser(
    command: str,
    description: str,
    options: type,
    defaults: Any = None,
    positional: str | None = None,
    positional_help: str = SAE_DIR_HELP,
) -> ArgumentParser:
    """The parser of one command: ``--config``, an optional positional path, the options."""
    parser = ArgumentParser(
        prog=f"drrik {command}",
        description=description,
        add_option_string_dash_variants=DashVariant.DASH,
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below")
    if positional:
        parser.add_argument(positional, type=Path, metavar=positional.upper(), help=positional_help)
    parser.add_arguments(options, dest="opts", default=defaults)
    return parser


OPTIONS: dict[str, tuple[type, str, str]] = {
    "eval": (
        EvalOptions,
        "dir",
        "Evaluate a saved SAE on held-out text (every SAE of a run that trained several, and "
        "all of them spliced in together when it was trained with --eval-together).",
    ),
    "status": (
        StatusOptions,
        "run_dir",
        "Show a run's progress, speed, ETA, metrics, checkpoint and liveness.",
    ),
    "analyze": (
        AnalyzeOptions,
        "dir",
        "Per-feature statistics, top contexts, quantile-band examples and logit effects of a "
        "saved SAE, streamed over held-out text; saved beside the run.",
    ),
    "report": (
        ReportOptions,
        "dir",
        "Write a self-contained HTML report: run summary, metrics, plots and a page per "
        "selected feature. Reuses the saved analysis (drrik analyze) or runs one.",
    ),
    "steer": (
        SteerOptions,
        "dir",
        "Generate text with SAE feature directions added (or clamped) at the hook the SAE "
        "writes (a transcoder's target hook), and print it next to the unsteered baseline.",
    ),
    "export": (
        ExportOptions,
        "dir",
        "Write a run's transcoders (or the saved transcoder directories under DIR) in another "
        "tool's layout: circuit-tracer's transcoder set, or its CLT layout for a cross-layer "
        "transcoder.",
    ),
}
"""Each command but train: its options dataclass, its positional path, its description."""


def parse_options(command: str, argv: list[str]) -> tuple[Path, Any]:
    """The positional path and the options: defaults, then ``--config``'s, then flags."""
    options, positional, description = OPTIONS[command]
    argv = modernize(argv)
    config = _pre_parse(argv).config
    defaults = load_options(config, options) if config is not None else None
    args = build_parser(command, description, options, defaults, positional).parse_args(argv)
    return getattr(args, positional), args.opts


def train_parser(defaults: RunConfig | None = None) -> ArgumentParser:
    from drrik.config import RunConfig

    parser = build_parser(
        "train",
        "Train sparse autoencoders on a model's activations, streamed.",
        RunConfig,
        defaults,
    )
    parser.add_argument("--resume", type=Path, help="continue the run in this directory")
    return parser


def parse_train_args(argv: list[str]) -> RunConfig:
    """Config from, in rising priority: defaults, --resume's saved config or --config, flags."""
    from drrik.config import load_config_file

    known = _pre_parse(argv)
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
    cfg = train_parser(defaults).parse_args(argv).opts
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
    path, opts = parse_options("eval", argv)
    from drrik.evaluate import SPLICED_TOGETHER, format_metrics
    from drrik.saved import evaluate_saved

    metrics = evaluate_saved(
        path,
        sae_name=opts.sae,
        model=opts.model,
        dataset=opts.dataset,
        eval_split=opts.eval_split,
        eval_contexts=opts.eval_contexts,
        device=opts.device,
    )
    if opts.json:  # one SAE: its metrics, as before runs held several
        print(json.dumps(next(iter(metrics.values())) if len(metrics) == 1 else metrics, indent=2))
        return 0
    together = {k: metrics.pop(k) for k in list(metrics) if k.startswith(SPLICED_TOGETHER)}
    print(format_metrics(metrics))
    if together:  # its own table: it has only the CE and KL rows
        print(format_metrics(together))
    return 0


def cmd_status(argv: list[str]) -> int:
    run_dir, opts = parse_options("status", argv)

    status = run_status(run_dir)
    print(json.dumps(status, indent=2) if opts.json else format_status(status))
    return 0


def _analyze_kwargs(opts: AnalyzeOptions) -> dict[str, Any]:
    """:func:`drrik.analysis.analyze`'s arguments from the options (the path aside)."""
    return {
        "cfg": opts.analysis,
        "sae_name": opts.sae,
        "model": opts.model,
        "dataset": opts.dataset,
        "device": opts.device,
    }


def cmd_analyze(argv: list[str]) -> int:
    path, opts = parse_options("analyze", argv)
    from drrik.analysis import analyze
    from drrik.saved import SavedSAE

    results = analyze(path, **_analyze_kwargs(opts))
    alive = int((results.tensors["count"] > 0).sum())
    where = SavedSAE.locate(path, opts.sae).analysis_dir.resolve()
    print(
        f"analysed {results.n_tokens:,} tokens: {alive}/{results.d_sae} features fired; "
        f"saved to {where}"
    )
    return 0


def cmd_report(argv: list[str]) -> int:
    path, opts = parse_options("report", argv)
    check_device(opts.device)
    from drrik.report import write_report

    kwargs = _analyze_kwargs(opts)
    index = write_report(
        path,
        features=opts.features or None,
        n_features=opts.n_features,
        sae_name=kwargs.pop("sae_name"),
        out=opts.out,
        analyze_kwargs=kwargs,
    )
    print(f"report: {index.resolve()}")
    return 0


def cmd_steer(argv: list[str]) -> int:
    path, opts = parse_options("steer", argv)
    opts.check()
    check_device(opts.device)
    from drrik.saved import SavedSAE
    from drrik.steering import SAESteering, check_mode

    saved = SavedSAE.locate(path, opts.sae)  # cheap checks before the model loads
    saved.check_features(opts.feature)
    check_mode(opts.mode, saved.hook, saved.target_hook)
    require(
        len(saved.hooks) == 1,
        "sae",
        saved.sae_dir.name,
        "it reads several hooks (a crosscoder or CLT), which drrik does not steer yet; steer "
        "with an SAE or a transcoder",
    )
    steering = SAESteering.from_run(path, model=opts.model, device=opts.device, sae_name=opts.sae)
    if opts.find:
        for prompt in opts.prompt:
            print(f"features active on {prompt!r}:")
            for row in steering.find_steering_features(prompt):
                print(f"  {row}")
        return 0
    common = {
        "mode": opts.mode,
        "units": opts.units,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        "seed": opts.seed,
    }
    if opts.compare:
        for prompt in opts.prompt:
            steering.compare_steering(prompt, opts.feature[0], opts.compare, **common)
        return 0
    strengths = opts.strength or [1.0]
    base = steering.generate_batch(opts.prompt, top_p=opts.top_p, **common)
    steered = steering.generate_batch(
        opts.prompt, opts.feature, strengths, top_p=opts.top_p, **common
    )
    for prompt, b, s in zip(opts.prompt, base, steered, strict=True):
        print(f"prompt:   {prompt!r}\nbaseline: {b!r}\nsteered:  {s!r}\n")
    return 0


def cmd_export(argv: list[str]) -> int:
    path, opts = parse_options("export", argv)
    opts.check()
    import yaml

    from drrik.export_circuit_tracer import export_transcoder_set

    out = export_transcoder_set(path, Path(opts.out), n_layers=opts.n_layers)
    kind = yaml.safe_load((out / "config.yaml").read_text())["model_kind"]
    print(f"circuit-tracer {kind.replace('_', ' ')}: {out}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "status": cmd_status,
    "analyze": cmd_analyze,
    "report": cmd_report,
    "steer": cmd_steer,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = ", ".join(COMMANDS)
        print(f"usage: drrik {{{known}}} [options]   (drrik COMMAND --help for details)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as exc:
        print(f"drrik {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"drrik {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
