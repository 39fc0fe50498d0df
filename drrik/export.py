"""Export: a trained run's dictionaries saved for use, with their plots and artifacts.

Each dictionary is copied, its input scale folded in (so it reads raw activations), and saved
in SAELens's layout under ``final/`` (``final/<name>/`` when the run trained several), with its
held-out metrics and feature densities. A TopK transcoder is saved for SAELens and circuit-tracer
as a JumpReLU, its threshold and the distance between the two forms measured on the run's
held-out tokens (:mod:`drrik.topk_jumprelu`). The training curves and density plots go to
``plots/``; wandb gets the histograms, the images and, if asked, each saved directory as an
artifact. Rank 0 only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drrik.learner import Learner
from drrik.logs import get_logger
from drrik.plots import plot_feature_density, plot_training_curves
from drrik.run import Run
from drrik.run_dir import atomic_write
from drrik.sae import build_sae
from drrik.topk_jumprelu import HeldOut, Hooks, collect, is_topk_transcoder, jumprelu_form
from drrik.wandb_logging import WandbLogger

log = get_logger(__name__)

Metrics = dict[str, dict[str, float]]


def final_dir(run: Run, learner: Learner) -> Path:
    """Where ``learner``'s dictionary is saved."""
    final = run.run_dir.final_path
    return final if len(run.learners) == 1 else final / learner.name


def metadata(run: Run, learner: Learner, metrics: dict[str, float]) -> dict[str, object]:
    """The saved dictionary's ``cfg.json`` metadata: where it reads, on what data."""
    cfg = run.cfg
    return {
        "model_name": cfg.model.model,
        "hook_name": learner.spec.input_hook,
        **({} if learner.spec.same_hook else {"hook_name_out": learner.spec.target_hook}),
        **(
            {"hook_names": list(learner.spec.reads), "hook_names_out": list(learner.spec.writes)}
            if len(learner.spec.reads) > 1
            else {}
        ),
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.dataset,
        "training_tokens": run.progress.tokens,
        "eval": metrics,
    }


def export_run(
    run: Run, metrics: Metrics, densities: dict[str, torch.Tensor], logger: WandbLogger
) -> None:
    """Save every dictionary of ``run`` with its final ``metrics`` and ``densities``."""
    plots = run.run_dir.plots_path
    tokens = run.progress.tokens
    several = len(run.learners) > 1
    images = {
        "training_curves": plot_training_curves(
            run.run_dir.read_metrics(), plots / "training_curves.png"
        )
    }
    held_out = topk_held_out(run)
    for learner in run.learners:
        sae = build_sae(learner.sae.cfg, device=learner.sae.b_dec.device)
        sae.load_state_dict(learner.sae.state_dict())
        sae.fold_activation_scale(learner.scale, learner.target_scale)
        sparsity = torch.log10(densities[learner.name] + 1e-10)
        meta = metadata(run, learner, metrics[learner.name])
        threshold = None
        pair = (learner.spec.reads, learner.spec.writes)
        if pair in held_out and is_topk_transcoder(sae, learner.spec.same_hook):
            threshold, form = jumprelu_form(sae, held_out[pair])
            meta["jumprelu_form"] = form
            theta = form["threshold"]
            shown = f"{theta:.4g}" if isinstance(theta, float) else "per layer"
            log.info(
                f"{learner.name or 'final'}: saved in JumpReLU form, threshold {shown}: FVU "
                f"{form['fvu_topk']:.4f} -> {form['fvu_jumprelu']:.4f}, L0 "
                f"{form['l0_topk']:.2f} -> {form['l0_jumprelu']:.2f} on held-out tokens"
            )
        path = sae.save(final_dir(run, learner), sparsity, meta, threshold)
        prefix = f"{learner.name}/" if several else ""
        logger.log_histogram(f"{prefix}log10_feature_density", sparsity, tokens)
        logger.log_artifact(path, f"sae-{learner.name or 'final'}".replace("=", "-"))
        images[f"{prefix}feature_density"] = plot_feature_density(
            densities[learner.name],
            plots / f"feature_density{'-' + learner.name if several else ''}.png",
            run.cfg.eval.dense_threshold,
        )
    logger.log_images(images, tokens)


def topk_held_out(run: Run) -> dict[Hooks, HeldOut]:
    """Held-out inputs and targets of the run's TopK transcoders (none for other runs)."""
    learners = [
        learner
        for learner in run.learners
        if is_topk_transcoder(learner.sae, learner.spec.same_hook)
    ]
    evaluator = run.evaluator
    if not learners or evaluator is None:
        return {}
    pairs = [(learner.spec.reads, learner.spec.writes) for learner in learners]
    width = sum(learner.sae.d_in + learner.sae.d_out for learner in learners)
    return collect(evaluator.model, evaluator.contexts, evaluator.exclude_ids, pairs, width)


def save_together(run: Run, name: str, metrics: dict[str, float]) -> Path:
    """The metrics of dictionaries spliced in at once, as ``final/<name>.json``
    (``spliced_together.json``, or one per sweep setting)."""
    path = run.run_dir.final_path / f"{name}.json"
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    return path
