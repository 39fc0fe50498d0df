"""A TopK transcoder's JumpReLU form, for the tools that have no TopK transcoder.

SAELens and circuit-tracer run transcoders with ReLU or JumpReLU only, so a TopK transcoder is
saved for them as a JumpReLU with one global threshold θ (drrik itself still reloads the TopK).

**Rule.** θ lies halfway between the smallest activation that a BatchTopK over the run's
held-out tokens keeps and the largest one it drops: with N held-out tokens, the mean of the
(k·N)-th and (k·N+1)-th largest of all their ReLU'd pre-activations. The JumpReLU
``pre · (pre > θ)`` then keeps exactly what that BatchTopK keeps, k features per token *on
average* over the held-out tokens, as the TopK keeps k on every token; halfway, no held-out
activation sits on θ, where float rounding in another tool would flip it. It is the threshold
BatchTopK learns (the boundary of what it keeps), read off the held-out set as one batch. At
most :data:`MAX_TOKENS` held-out tokens are used (fewer when :data:`MAX_VALUES` binds).

The JumpReLU is not the TopK: a busy token keeps more than k features and a quiet one fewer.
:func:`jumprelu_form` therefore also measures both on those tokens, FVU against the real target
and L0, and the export saves the numbers in the dictionary's metadata.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor

from drrik.sae.base import SAE
from drrik.sae.clt import CrossLayerTranscoder
from drrik.sae.topk import TopKSAE

MAX_TOKENS = 8192
"""Held-out tokens used at most: their inputs and targets are held in memory."""
MAX_VALUES = 2**28
"""Float32 values held at most (1 GiB) over every transcoder's inputs and targets: a set of
many wide layers gets fewer held-out tokens than :data:`MAX_TOKENS`."""
CHUNK = 1024
"""Tokens encoded at once (a ``CHUNK x d_sae`` block of pre-activations)."""
RULE = (
    "global threshold: the mean of the (k*N)-th and (k*N+1)-th largest ReLU'd pre-activations "
    "over N held-out tokens"
)


@dataclass
class HeldOut:
    """One transcoder's held-out inputs and targets, in raw units, special positions dropped."""

    x: Tensor
    y: Tensor


def is_topk_transcoder(sae: SAE, same_hook: bool) -> TypeGuard[TopKSAE]:
    """Whether a dictionary is saved in JumpReLU form: a TopK (not BatchTopK, which has its own
    threshold) that writes another hook than it reads or has a skip connection."""
    transcoder = not same_hook or sae.W_skip is not None
    return isinstance(sae, TopKSAE) and sae.cfg.architecture == "topk" and transcoder


Hooks = tuple[tuple[str, ...], tuple[str, ...]]
"""A dictionary's (input hooks, target hooks): one each, or a CLT's every layer."""


@torch.no_grad()
def collect(
    model: Any,
    contexts: Iterable[Tensor],
    exclude_ids: Tensor,
    hooks: list[Hooks],
    width: int,
) -> dict[Hooks, HeldOut]:
    """Inputs and targets of every dictionary's hooks on the held-out contexts (several
    hooks side by side), from one forward pass per batch, until :data:`MAX_TOKENS` tokens are
    in, or as many as :data:`MAX_VALUES` allows for ``width`` values a token (all the
    dictionaries' widths together)."""
    max_tokens = max(1, min(MAX_TOKENS, MAX_VALUES // width))
    names = sorted({h for pair in hooks for side in pair for h in side})
    parts: dict[Hooks, tuple[list[Tensor], list[Tensor]]] = {p: ([], []) for p in hooks}
    device = next(model.parameters()).device
    n = 0
    for tokens in contexts:
        if n >= max_tokens:
            break
        tokens = tokens.to(device)
        keep = ~torch.isin(tokens, exclude_ids.to(device))
        _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False)
        for pair, (xs, ys) in parts.items():
            for side, out in zip(pair, (xs, ys), strict=True):
                acts = [cache[h][keep.to(cache[h].device)][: max_tokens - n] for h in side]
                out.append(torch.cat(acts, dim=-1).float().cpu())
        n += min(int(keep.sum()), max_tokens - n)
    return {p: HeldOut(torch.cat(xs), torch.cat(ys)) for p, (xs, ys) in parts.items()}


@torch.no_grad()
def threshold(sae: TopKSAE, x: Tensor) -> Tensor:
    """θ by the module's rule for a folded ``sae`` (reading raw ``x``): the mean of the
    (k·N)-th and (k·N+1)-th largest ReLU'd pre-activations, found exactly by merging each
    chunk's largest into a running top. A CLT keeps k per layer, so each layer gets its own
    θ by the same rule, repeated over its features (``[d_sae]``)."""
    device = sae.b_dec.device
    groups = sae.n_layers if isinstance(sae, CrossLayerTranscoder) else 1
    n_keep = sae.k * x.shape[0]
    top = torch.empty(groups, 0, device=device)
    for chunk in x.split(CHUNK):
        pre = sae.scaled_pre_acts(chunk.to(device)).float().relu()
        pre = pre.reshape(pre.shape[0], groups, -1).transpose(0, 1).reshape(groups, -1)
        merged = torch.cat([top, pre], dim=1)
        top = merged.topk(min(n_keep + 1, merged.shape[1]), dim=1).values
    theta = top[:, n_keep - 1 : n_keep + 1].mean(dim=1)
    return theta[0] if groups == 1 else theta.repeat_interleave(sae.d_sae // groups)


def _per_layer(sae: TopKSAE, theta: Tensor) -> list[float]:
    """A CLT's θ, one per layer (each repeated over its layer's features in ``theta``)."""
    assert isinstance(sae, CrossLayerTranscoder)
    return theta[:: sae.features_per_layer].tolist()


def _fvu(sq_err: float, y: Tensor) -> float:
    """Fraction of variance unexplained: squared error over ``y``'s total variance."""
    variance = float((y - y.mean(0)).pow(2).sum())
    return sq_err / variance if variance > 0 else 0.0


@torch.no_grad()
def jumprelu_form(sae: TopKSAE, held_out: HeldOut) -> tuple[Tensor, dict[str, Any]]:
    """θ for a folded TopK transcoder, and how far its JumpReLU form is from it on the held-out
    tokens: FVU (against the real target) and L0 of both, and their differences."""
    theta = threshold(sae, held_out.x)
    device = sae.b_dec.device
    sq = {"topk": 0.0, "jumprelu": 0.0}
    active = {"topk": 0.0, "jumprelu": 0.0}
    for x, y in zip(held_out.x.split(CHUNK), held_out.y.split(CHUNK), strict=True):
        x, y = x.to(device), y.to(device)
        pre = sae.scaled_pre_acts(x)
        skip = sae.skip(x)
        for name, acts in (("topk", sae.activation(pre)), ("jumprelu", pre * (pre > theta))):
            out = sae.decode(acts) + (0 if skip is None else skip)
            sq[name] += float((out.float() - y).pow(2).sum())
            active[name] += float((acts > 0).sum())
    n = held_out.x.shape[0]
    fvu = {name: _fvu(err, held_out.y) for name, err in sq.items()}
    l0 = {name: count / n for name, count in active.items()}
    report = {
        "rule": RULE,
        "threshold": float(theta) if theta.dim() == 0 else _per_layer(sae, theta),
        "held_out_tokens": n,
        "fvu_topk": fvu["topk"],
        "fvu_jumprelu": fvu["jumprelu"],
        "fvu_difference": fvu["jumprelu"] - fvu["topk"],
        "l0_topk": l0["topk"],
        "l0_jumprelu": l0["jumprelu"],
    }
    return theta, report
