"""Assemble a run from its config: processes, model, data, stores, dictionaries, resume.

:func:`assemble` does everything that comes before the first training step and nothing after
it. The pieces it returns (a :class:`Run`) are what :class:`~drrik.trainer.Trainer` trains
and :func:`~drrik.export.export_run` saves; each can also be built by hand, as the trainer's
unit tests build a run from a stand-in store and no model.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from drrik.checkpoint import CheckpointManager
from drrik.config import RunConfig, check_feature_slices, load_config_file
from drrik.data import ContextStream, load_source
from drrik.distributed import Distributed
from drrik.errors import ConfigError, require
from drrik.evaluate import Evaluator, held_out_contexts
from drrik.learner import Learner
from drrik.logs import get_logger
from drrik.model import (
    config_hook_width,
    config_n_layers,
    load_model,
    local_model_config,
    native_bfloat16,
    resolve_dtype,
    use_tf32_matmuls,
)
from drrik.rng import seed_everything
from drrik.run import Run, restore
from drrik.run_dir import RunDir, default_run_name
from drrik.run_lock import RunLock
from drrik.sae.clt import decoder_memory
from drrik.sae.config import DEFAULT_L1_COEFFICIENT
from drrik.sae.spec import DictionarySpec
from drrik.store import ActivationsStore

log = get_logger(__name__)


def resolved_config(cfg: RunConfig, dist: Distributed) -> RunConfig:
    """A copy of ``cfg`` as this run uses and saves it: 0 data shards means one per process,
    auto dtype and autocast what this hardware gets (so a resume elsewhere keeps them). The caller's
    config is left as it was."""
    cfg = copy.deepcopy(cfg)
    cfg.distributed.data_shards = cfg.distributed.data_shards or dist.world_size
    cfg.model.model_dtype = resolve_dtype(cfg.model.model_dtype, cfg.model.device)
    if cfg.trainer.autocast is None:
        cfg.trainer.autocast = native_bfloat16(cfg.model.device)
    cfg.out = cfg.out or default_run_name(cfg)
    return cfg


def assemble(
    cfg: RunConfig, *, model: Any = None, dataset: Any = None, verbose: bool = True
) -> Run:
    """Build the run ``cfg`` describes; ``model`` and ``dataset`` replace loading them.

    Everything that can be refused is checked before the model loads: the process layout, k
    and target_l0 against the hook width (when the model's config is on disk), the run
    directory (another config's run, or one in use), the wandb mode and the dataset.
    """
    dist = Distributed.from_environment(
        cfg.model.device,
        cfg.distributed.distributed_timeout_minutes,
        cfg.distributed.feature_parallel,
    )
    require(
        not (dist.enabled and cfg.model.model_n_devices > 1),
        "model_n_devices",
        cfg.model.model_n_devices,
        "spreading the model over GPUs is a single-process layout; run it without torchrun",
    )
    require(
        bool(cfg.out) or not dist.enabled,
        "out",
        cfg.out,
        "name the run directory (--out) when training with several processes",
    )
    cfg = resolved_config(cfg, dist)
    if model is None:
        _check_widths_before_loading(cfg)
    run_dir = RunDir(cfg.out)
    run_dir.check_reusable(cfg, load=lambda path: load_config_file(path, cfg.model.device))
    lock = _hold(run_dir, dist)
    try:
        return _build(cfg, dist, run_dir, lock, model, dataset, verbose)
    except BaseException:
        if lock is not None:
            lock.discard()
        raise


def _check_widths_before_loading(cfg: RunConfig) -> None:
    """k and target_l0 against the hook widths the model's config gives, when it is on disk: a
    target wider than its hook is refused in seconds, not after the model loads. Every hook is
    checked again once the model gives its widths."""
    config = local_model_config(cfg.model.model)
    n_layers = None if config is None else config_n_layers(config)
    if config is None or n_layers is None:
        return
    for spec in cfg.dictionaries(n_layers):
        widths = {h: config_hook_width(config, h) for h in spec.hooks}
        if None not in widths.values():
            sized = sized_spec(spec, widths).sae  # type: ignore[arg-type]
            sized.check_buildable()
            check_feature_slices(sized, cfg.distributed.feature_parallel)


def sized_spec(spec: DictionarySpec, widths: dict[str, int]) -> DictionarySpec:
    """``spec`` with its widths filled from the hooks' (``widths``): a dictionary over several
    hooks reads and writes their concatenation, so its widths are the sums, and it records
    each read hook's width. Its hooks must share one width (a crosscoder's and a CLT's do)."""
    d_in = sum(widths[h] for h in spec.reads)
    d_out = sum(widths[h] for h in spec.writes)
    if spec.sae.dictionary == "sae":
        return replace(spec, sae=replace(spec.sae, d_in=d_in, d_out=d_out))
    found = {h: widths[h] for h in spec.hooks}
    require(
        len(set(found.values())) == 1,
        "hook",
        found,
        f"a {spec.sae.dictionary}'s hooks must share one width; read one kind of hook",
    )
    hook_widths = [widths[h] for h in spec.reads]
    return replace(spec, sae=replace(spec.sae, d_in=d_in, d_out=d_out, hook_widths=hook_widths))


def _hold(run_dir: RunDir, dist: Distributed) -> RunLock | None:
    """Rank 0 locks the run directory; if another process holds it, every rank stops."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = run_dir.lock()
        except ConfigError as exc:
            refusal = (exc.field, exc.value, exc.fix)
    refusal = dist.from_main(refusal)
    if refusal is not None:
        raise ConfigError(*refusal)
    return lock


def _build(
    cfg: RunConfig,
    dist: Distributed,
    run_dir: RunDir,
    lock: RunLock | None,
    model: Any,
    dataset: Any,
    verbose: bool,
) -> Run:
    """Everything after the run directory is held: model, data, stores, learners, resume."""
    cfg.wandb.resolved_mode()  # a bad WANDB_MODE fails before the model loads
    seed_everything(cfg.trainer.seed)
    device = dist.device(cfg.model.device)
    dataset = dataset if dataset is not None else load_source(cfg.data)
    use_tf32_matmuls(device)
    model = load_model(
        model if model is not None else cfg.model.model,
        device=device,
        dtype=cfg.model.model_dtype,
        n_devices=cfg.model.model_n_devices,
    )
    specs = cfg.dictionaries(model.cfg.n_layers)
    hooks = list(dict.fromkeys(h for spec in specs for h in spec.hooks))
    shards = dist.local_shards(cfg.distributed.data_shards)
    stores = [
        ActivationsStore(
            model,
            hooks,
            cfg.data,
            cfg.store,
            dataset=dataset,
            device=device,
            seed=cfg.trainer.seed + shard,
            shard=(shard, cfg.distributed.data_shards),
            verbose=verbose and dist.is_main and i == 0,
        )
        for i, shard in enumerate(shards)
    ]
    evaluator = _evaluator(cfg, model, dataset, stores[0].exclude) if dist.is_main else None
    dist.wait_for_main()  # rank 0 read its held-out contexts alone
    run = Run(
        cfg,
        dist,
        run_dir,
        stores,
        shards,
        [],
        CheckpointManager(run_dir.path, cfg.checkpoint.keep_checkpoints),
        evaluator,
        model,
        lock,
        verbose=verbose and dist.is_main,
    )
    sized = [sized_spec(spec, stores[0].d_in) for spec in specs]
    for spec in sized:  # every width-dependent check (k, target_l0) before any SAE is built
        spec.sae.check_buildable()
        check_feature_slices(spec.sae, cfg.distributed.feature_parallel)
    for i, spec in enumerate(sized):
        if run.verbose and spec.sae.dictionary == "clt":  # they grow with layers squared
            log.info(f"{spec.name}: {decoder_memory(spec.sae)}")
        torch.manual_seed(cfg.trainer.seed + i)
        learner = Learner.build(spec, cfg.trainer, run.total_steps, device, dist.features)
        run.learners.append(learner)
        start = spec.sae.l1_coefficient
        if run.verbose and learner.controller is not None and start != DEFAULT_L1_COEFFICIENT:
            log.info(
                f"{spec.name}: target_l0={spec.sae.target_l0} adapts the sparsity coefficient, "
                f"starting from l1_coefficient={start}"
            )
    if restore(run):
        if run.verbose:
            log.info(
                f"resuming {run_dir.path} from checkpoint step {run.progress.step} "
                f"({run.progress.tokens:,} tokens done)"
            )
    else:
        for learner in run.learners:
            learner.initialize(stores, dist)
    if dist.is_main:
        run_dir.write_config(cfg)
        # Rows logged after the checkpoint resumed from (or by an attempt killed before its
        # first one) come again.
        run_dir.truncate_metrics(after_step=run.progress.step)
    return run


def _evaluator(cfg: RunConfig, model: Any, train_dataset: Any, exclude: torch.Tensor) -> Evaluator:
    """The held-out evaluation, on contexts fixed for the whole run: the eval split, or the
    rows the training stream skips."""
    if cfg.data.eval_split:
        dataset, holdout = load_source(cfg.data, cfg.data.eval_split), "all"
    else:
        dataset, holdout = train_dataset, "eval"
    stream = ContextStream(dataset, model.tokenizer, cfg.data, holdout=holdout, cycle=False)
    contexts = held_out_contexts(stream, cfg.eval.eval_contexts, cfg.eval.eval_batch_size_prompts)
    return Evaluator(model, contexts, exclude, cfg.eval.dense_threshold)
