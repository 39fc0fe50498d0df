"""Two run configs compared field by field: what a resume may change, and what it may not.

A resumed run must be the run it continues; only its budget, cadences, device and logging may
differ. Configs arrive as plain trees (``cfg.to_dict()``), so this imports no config class.
"""

from __future__ import annotations

from typing import Any

RESUMABLE_CHANGES = (
    "trainer.training_tokens",
    "trainer.log_every_steps",
    "eval.eval_every_tokens",
    "store.prefetch_batches",
    "checkpoint.checkpoint_every_tokens",
    "checkpoint.checkpoint_every_minutes",
    "checkpoint.keep_checkpoints",
    "model.device",
    "distributed.feature_parallel",
    "wandb.",
)
"""Fields (or, ending in a dot, sections) a resumed run may change: budget, cadences, device
and how the features are split over ranks (checkpoints are resliced)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, to list config differences by field."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(
    old: dict[str, Any], new: dict[str, Any], allowed: tuple[str, ...] = ()
) -> list[str]:
    """Fields whose values differ between two config dicts, ignoring ``allowed`` ones."""
    a, b = flatten(old), flatten(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in allowed)
    ]
