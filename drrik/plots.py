"""PNG plots of a run and its features, drawn with matplotlib's object API.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``:
nothing is registered in pyplot's global figure list, so no figure outlives its function (the
first drrik leaked one per plot) and no GUI backend is ever needed. Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from drrik.errors import require

DPI = 110
TOP_FEATURE_KEYS = ("density", "max", "mean")
CURVE_KEYS = ("loss", "l0", "explained_variance", "dead_features")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()
    return path


def plot_feature_density(
    density: Tensor, path: str | Path, dense_threshold: float = 0.1, title: str = ""
) -> Path:
    """Histogram of log10 feature density, with the dead (never fired) and dense counts."""
    density = density.double().cpu()
    alive = density[density > 0]
    dead = int((density == 0).sum())
    dense = int((density > dense_threshold).sum())
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=50, color="#4c72b0")
    ax.axvline(torch.tensor(dense_threshold).log10().item(), color="#c44e52", linestyle="--")
    ax.set_xlabel("log10 feature density (fraction of tokens a feature fires on)")
    ax.set_ylabel("features")
    ax.set_title(title or f"Feature density ({density.numel()} features)")
    ax.text(
        0.02,
        0.95,
        f"dead (never fired): {dead}\ndense (> {dense_threshold:g}): {dense}",
        transform=ax.transAxes,
        va="top",
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#999"},
    )
    return _save(fig, path)


def plot_training_curves(
    rows: Sequence[dict[str, Any]], path: str | Path, keys: Sequence[str] = CURVE_KEYS
) -> Path:
    """One panel per metric of ``metrics.jsonl`` rows against training tokens, a line per SAE."""
    require(bool(rows), "metrics", "(empty)", "the run has logged no metrics yet")
    keys = [k for k in keys if any(k in row for row in rows)]
    cols = 2
    nrows = max(1, (len(keys) + cols - 1) // cols)
    fig = Figure(figsize=(10, 3.2 * nrows))
    names = sorted({str(row.get("sae", "")) for row in rows})
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for name in names:
            points = [(r["tokens"], r[key]) for r in rows if r.get("sae", "") == name and key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name or None)
        ax.set_xlabel("training tokens")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")
        if len(names) > 1 and i == 0:
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_activation_histogram(
    counts: Tensor, edges: Tensor, path: str | Path, title: str = ""
) -> Path:
    """A feature's activation histogram on log-spaced bins (zeros are not counted)."""
    counts, edges = counts.cpu().double(), edges.cpu().double()
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    nonzero = counts.nonzero().flatten()
    if nonzero.numel():  # show the occupied range only
        lo, hi = int(nonzero.min()), int(nonzero.max()) + 1
        counts, edges = counts[lo:hi], edges[lo : hi + 1]
    ax.stairs(counts.numpy(), edges.numpy(), fill=True, color="#dd8452")
    ax.set_xscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    ax.set_title(title or "Activation histogram")
    return _save(fig, path)


def plot_top_features(
    values: Tensor, path: str | Path, by: str = "density", n_features: int = 20
) -> Path:
    """Bar chart of the ``n_features`` features with the largest ``values``."""
    require(by in TOP_FEATURE_KEYS, "by", by, f"use one of {TOP_FEATURE_KEYS}")
    values = values.double().cpu()
    top = values.topk(min(n_features, values.numel()))
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    ax.bar(range(len(top.values)), top.values.numpy(), color="#55a868")
    ax.set_xticks(range(len(top.values)), [str(i) for i in top.indices.tolist()], rotation=90)
    ax.set_xlabel("feature")
    label = {"density": "density", "max": "max activation", "mean": "mean activation (active)"}
    ax.set_ylabel(label[by])
    ax.set_title(f"Top {len(top.values)} features by {label[by]}")
    if by == "density":
        ax.set_yscale("log")
    return _save(fig, path)


def log_to_wandb(wandb_run: Any, images: dict[str, Path], step: int | None = None) -> None:
    """Log PNGs to an already initialized wandb run (``wandb_run.log``); drrik never starts one."""
    import wandb

    wandb_run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)
