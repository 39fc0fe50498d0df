"""Held-out evaluation of SAEs: reconstruction, sparsity and downstream next-token loss.

Definitions (every mean is over the evaluated tokens, special-token positions excluded):

- ``mse``: mean squared error per activation element, in the model's raw units.
- ``explained_variance``: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with mean(x) over all
  evaluated tokens; ``fvu`` (fraction of variance unexplained) is 1 - explained_variance.
- ``l0``: active features per token; ``l1``: sum of feature activations per token.
- ``cosine_similarity``: mean cos(x, x_hat); ``l2_ratio``: mean ||x_hat|| / ||x||.
- ``dead_features`` fire on no evaluated token; ``dense_features`` on more than
  ``dense_threshold`` of them; ``feature_density`` is each feature's firing fraction.
- ``ce_loss_clean``, ``ce_loss_with_sae`` (hook output replaced by the reconstruction),
  ``ce_loss_zero_ablated`` (hook output replaced by zeros): next-token cross-entropy;
  ``ce_loss_recovered`` = (ablated - with_sae) / (ablated - clean), 1 is perfect.
- ``kl_div_with_sae``: mean KL(clean next-token distribution || distribution with the SAE).

Only non-special positions are replaced: the BOS position's activation is an outlier SAEs are
not trained on, and replacing it would measure that instead of the SAE.

:func:`evaluate_together` measures a set (every layer's transcoder) as one replacement model:
the CE and KL metrics above with every dictionary spliced in during the same forward pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from drrik.data import ContextStream
from drrik.errors import require
from drrik.sae import SAE

SPLICED_TOGETHER = "spliced_together"


"""The name under which a run reports its dictionaries evaluated all at once."""


def held_out_contexts(
    stream: ContextStream, n_contexts: int, batch_size: int
) -> list[torch.Tensor]:
    """The first ``n_contexts`` contexts of a finite stream, in batches: the same every eval."""
    batches: list[torch.Tensor] = []
    n = 0
    for batch in stream.batches(batch_size):
        batches.append(batch[: n_contexts - n])
        n += batches[-1].shape[0]
        if n >= n_contexts:
            break
    require(
        n > 0,
        "dataset",
        stream.cfg.dataset,
        "its held-out part gives no full context to evaluate on; add data, lower "
        "holdout_every or context_size, or set eval_split",
    )
    return batches


@dataclass
class EvalTarget:
    """One dictionary to evaluate: where it reads and writes, and its training input scale.

    A dictionary over several hooks (a crosscoder, a CLT) names them in ``reads`` and
    ``writes``: it reads their concatenation and its output is split back over ``writes``.
    """

    name: str
    hook: str
    sae: SAE
    scale: float | torch.Tensor = 1.0
    target_hook: str = ""
    """The hook its reconstruction replaces; empty means ``hook`` (an SAE)."""
    target_scale: float | torch.Tensor = 0.0
    """The target's training scale (a transcoder's); 0 means ``scale``."""
    reads: tuple[str, ...] = ()
    """Every hook it reads, in order; empty means ``(hook,)``."""
    writes: tuple[str, ...] = ()
    """Every hook it replaces, in order; empty means ``(target_hook,)``."""

    def __post_init__(self) -> None:
        self.target_hook = self.target_hook or self.hook
        if not isinstance(self.target_scale, torch.Tensor) and self.target_scale == 0:
            self.target_scale = self.scale
        self.reads = self.reads or (self.hook,)
        self.writes = self.writes or (self.target_hook,)

    @property
    def causal(self) -> bool:
        """Whether each written hook depends only on hooks read before it (a CLT's layers), so
        that one forward pass can read and replace as it goes; an SAE, a transcoder and a
        CLT are, a crosscoder (every layer from every layer) is not."""
        return len(self.reads) == 1 or bool(getattr(self.sae, "causal", False))

    @property
    def by_layer(self) -> bool:
        """Whether it is evaluated a layer at a time (a CLT: :meth:`reconstruct_layer`)."""
        return hasattr(self.sae, "encode_layer")

    @torch.no_grad()
    def reconstruct_layer(
        self, layer: int, x: torch.Tensor, earlier: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A CLT's layer ``layer``: (its features from its raw input ``x``, its output in raw
        units from those and the ``earlier`` layers' features)."""
        width = x.shape[-1]
        feats = self.sae.encode_layer(layer, x.float() * _part(self.scale, layer, width))  # type: ignore[operator]
        out = self.sae.decode_layer(layer, [*earlier, feats])  # type: ignore[operator]
        return feats, out / _part(self.target_scale, layer, width)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature activations, reconstruction) for raw activations ``x``, in raw units."""
        x = x.float() * self.scale
        feats = self.sae.encode(x)
        out = self.sae.decode(feats)
        skip = self.sae.skip(x)
        out = out if skip is None else out + skip
        return feats, out / self.target_scale


def _part(scale: float | torch.Tensor, index: int, width: int) -> float | torch.Tensor:
    """Hook ``index``'s part of a scale: all of a float, a ``width`` slice of a per-hook one."""
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        return scale[index * width : (index + 1) * width]
    return scale


@dataclass
class _Sums:
    """Running sums from which every metric is derived at the end."""

    d_sae: int
    n: int = 0
    sq_err: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0
    l0: float = 0.0
    l1: float = 0.0
    cos: float = 0.0
    l2_ratio: float = 0.0
    fires: torch.Tensor | None = None
    ce_sae: float = 0.0
    ce_ablated: float = 0.0
    kl: float = 0.0
    elements: int = 0

    def add(self, x: torch.Tensor, feats: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.float()
        self.n += x.shape[0]
        self.elements += x.numel()
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_sq_x += float(x.pow(2).sum())
        active = feats > 0
        self.l0 += float(active.sum())
        self.l1 += float(feats.abs().sum())
        self.cos += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        self.l2_ratio += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-8)).sum())
        counts = active.sum(0)
        self.fires = counts if self.fires is None else self.fires + counts


def _clean_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities ``[batch, ctx-1, vocab]`` in float32, one context at a
    time: computed once per batch and reused by the clean loss and every SAE's KL."""
    out = torch.empty(
        (logits.shape[0], logits.shape[1] - 1, logits.shape[2]),
        dtype=torch.float32,
        device=logits.device,
    )
    for row in range(logits.shape[0]):
        out[row] = logits[row, :-1].float().log_softmax(-1)
    return out


def _nll(log_probs: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of ``next_tokens`` (on any device)."""
    return -log_probs.gather(-1, next_tokens.to(log_probs.device)[..., None]).sum()


def _ce_and_kl(
    logits: torch.Tensor, next_tokens: torch.Tensor, clean_log_probs: torch.Tensor | None
) -> tuple[float, float]:
    """Summed next-token cross-entropy of ``logits``, and KL(clean || these) when given.

    One context at a time: the float32 copy of a whole ``[batch, ctx, vocab]`` batch is
    gigabytes with a large vocabulary (16 x 1024 x 128k is 8 GiB per copy). The loss alone is
    logsumexp minus the target's logit, with no log-probabilities materialised.
    """
    ce = torch.zeros((), device=logits.device)
    kl = torch.zeros((), device=logits.device)
    next_ids = next_tokens.to(logits.device)[..., None]
    for row in range(logits.shape[0]):
        z = logits[row, :-1].float()
        if clean_log_probs is None:
            ce += (z.logsumexp(-1) - z.gather(-1, next_ids[row]).squeeze(-1)).sum()
            continue
        log_probs = z.log_softmax(-1)
        del z
        ce += _nll(log_probs, next_tokens[row])
        # sum p (log p - log q) as one dot product: two row-sized temporaries, not four.
        clean = clean_log_probs[row].to(log_probs.device).flatten()
        kl += clean.exp().dot(clean - log_probs.flatten())
    return float(ce), float(kl)


def _put(acts: torch.Tensor, kept: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of ``acts [batch, ctx, d]`` with ``values`` at the ``kept`` positions."""
    out = acts.clone()
    out[kept] = values.to(acts.device, acts.dtype)
    return out


_Record = Callable[[EvalTarget, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Receives (dictionary, its kept target activations, feature activations, reconstruction)."""


def _splice_hooks(
    targets: list[EvalTarget],
    keep: torch.Tensor,
    record: _Record | None = None,
    clean: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[tuple[str, Any]]:
    """Hooks that capture each dictionary's inputs as they flow in this forward pass and
    replace its target hooks with its output (an SAE captures and replaces the same hook),
    handing ``record`` the clean targets each dictionary reconstructed: the spliced pass sees
    every activation a dictionary's reconstruction metrics need, so no pass is run for them.

    A dictionary over several hooks writes each hook as the pass reaches it, from the inputs
    read so far, those still to come taken as zeros: exact for a causal one (a CLT's layer
    reads nothing later). An acausal one (a crosscoder) reads ``clean[name]``, its inputs from
    a clean pass, instead.
    """
    seen: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in targets}
    layer_feats: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    written: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in targets}

    def capture(target: EvalTarget, name: str) -> Any:
        def hook_fn(act: torch.Tensor, hook: Any) -> None:
            sae_device = next(target.sae.parameters()).device
            seen[target.name][name] = act[keep.to(act.device)].to(sae_device)

        return hook_fn

    def splice(target: EvalTarget, index: int) -> Any:
        def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            kept = keep.to(act.device)
            inputs = seen[target.name] if clean is None or target.causal else clean[target.name]
            if target.by_layer:  # a CLT: this layer's features, its output from all so far
                feats, part = target.reconstruct_layer(
                    index, inputs[target.reads[index]], layer_feats[target.name]
                )
                layer_feats[target.name].append(feats)
            else:
                feats, out = target.reconstruct(_joined(inputs, target.reads, act.shape[-1]))
                width = out.shape[-1] // len(target.writes)
                part = out[:, index * width : (index + 1) * width]
            if record is not None:
                # An SAE's target is its input: gathered once, by the capture.
                same = target.writes[index] == target.reads[index]
                y = inputs[target.reads[index]] if same else act[kept].to(part.device)
                written[target.name].append((y, part))
            if index == len(target.writes) - 1:  # the dictionary's last hook of this pass
                if record is not None:
                    ys, outs = zip(*written[target.name], strict=True)
                    every = torch.cat(layer_feats[target.name], -1) if target.by_layer else feats
                    record(target, torch.cat(ys, -1), every, torch.cat(outs, -1))
                seen[target.name], layer_feats[target.name], written[target.name] = {}, [], []
            return _put(act, kept, part)

        return hook_fn

    return [(h, capture(t, h)) for t in targets for h in t.reads] + [
        (h, splice(t, i)) for t in targets for i, h in enumerate(t.writes)
    ]


def _joined(inputs: dict[str, torch.Tensor], hooks: tuple[str, ...], width: int) -> torch.Tensor:
    """``hooks``' captured activations side by side, zeros for any not reached yet."""
    if len(hooks) == 1:
        return inputs[hooks[0]]
    some = next(iter(inputs.values()))
    zeros = some.new_zeros(some.shape[0], width)
    return torch.cat([inputs.get(h, zeros) for h in hooks], dim=-1)


def _clean_inputs(
    model: Any, tokens: torch.Tensor, targets: list[EvalTarget], keep: torch.Tensor
) -> dict[str, dict[str, torch.Tensor]] | None:
    """The kept activations of every hook an acausal dictionary reads, from one clean pass;
    ``None`` when every dictionary is causal (no pass is run)."""
    acausal = [t for t in targets if not t.causal]
    if not acausal:
        return None
    hooks = list(dict.fromkeys(h for t in acausal for h in t.reads))
    acts: dict[str, torch.Tensor] = {}

    def grab(name: str) -> Any:
        return lambda act, hook: acts.__setitem__(name, act[keep.to(act.device)])

    model.run_with_hooks(tokens, fwd_hooks=[(h, grab(h)) for h in hooks])
    return {
        t.name: {h: acts[h].to(next(t.sae.parameters()).device) for h in t.reads} for t in acausal
    }


def _zero_at(keep: torch.Tensor) -> Any:
    """A hook function that zeroes the hooked activation at the ``keep`` positions."""
    return lambda act, hook: act.masked_fill(keep.to(act.device)[..., None], 0)


def together_name(setting: str) -> str:
    """The name of the metrics of one sweep setting's dictionaries spliced in together."""
    return f"{SPLICED_TOGETHER}__{setting}" if setting else SPLICED_TOGETHER


def spliced_groups(targets: list[EvalTarget], settings: list[str]) -> dict[str, list[EvalTarget]]:
    """``targets`` by :func:`together_name` of their sweep setting (``settings``, in order):
    dictionaries of different settings may write the same hook, so they cannot be spliced in
    at once."""
    groups: dict[str, list[EvalTarget]] = {}
    for target, setting in zip(targets, settings, strict=True):
        groups.setdefault(together_name(setting), []).append(target)
    return groups


@dataclass
class _Batch:
    """One batch of contexts' baselines, which depend only on the model and the contexts."""

    tokens: torch.Tensor
    ce_clean: float
    log_probs: torch.Tensor | None
    """Its clean next-token log-probabilities, kept while the cache's byte budget allows (else
    recomputed): kept as used, so a batch never holds them twice."""
    ce_ablated: dict[tuple[str, ...], float] = field(default_factory=dict)
    """Summed CE with the kept positions of these target hooks zeroed, per set of hooks."""

    def ablated(self, model: Any, keep: torch.Tensor, hooks: list[str]) -> float:
        """Summed CE with ``hooks`` zeroed at the ``keep`` positions, computed at most once per
        set of hooks."""
        key = tuple(sorted(hooks))
        if key not in self.ce_ablated:
            zeroed = model.run_with_hooks(self.tokens, fwd_hooks=[(h, _zero_at(keep)) for h in key])
            self.ce_ablated[key] = _ce_and_kl(zeroed, self.tokens[:, 1:], None)[0]
        return self.ce_ablated[key]


@dataclass
class Baselines:
    """The clean and zero-ablated baselines of a fixed list of context batches, each computed
    once and reused by every later evaluation on those batches (a run's periodic and final
    ones): the zero-ablated CE per target hook (shared by a sweep's dictionaries) and the clean
    CE always, the clean log-probabilities of as many batches as ``cache_bytes`` holds (float32,
    batch x context x vocabulary: 400 MB for 16 x 128 SmolLM2 contexts). Not saved in
    checkpoints: a resumed run computes them again at its first evaluation."""

    cache_bytes: int = 256 * 2**20
    batches: list[_Batch] = field(default_factory=list)

    def clean(self, model: Any, index: int, tokens: torch.Tensor) -> tuple[_Batch, torch.Tensor]:
        """Batch ``index``'s baselines and its clean next-token log-probabilities (one forward
        pass unless they are cached)."""
        batch = self.batches[index] if index < len(self.batches) else None
        if batch is not None and not torch.equal(batch.tokens, tokens):
            raise ValueError("these baselines were computed on other contexts")
        log_probs = batch.log_probs if batch is not None else None
        if log_probs is None:
            log_probs = _clean_log_probs(model.run_with_hooks(tokens, fwd_hooks=[]))
        if batch is None:
            cached = sum(b.log_probs.nbytes for b in self.batches if b.log_probs is not None)
            kept = log_probs if cached + log_probs.nbytes <= self.cache_bytes else None
            batch = _Batch(tokens, float(_nll(log_probs, tokens[:, 1:])), kept)
            self.batches.append(batch)
        return batch, log_probs


@torch.no_grad()
def evaluate_together(
    model: Any,
    targets: list[EvalTarget],
    contexts: Iterable[torch.Tensor],
    exclude_ids: torch.Tensor,
    baselines: Baselines | None = None,
) -> dict[str, float]:
    """CE and KL metrics with every dictionary of ``targets`` spliced in at once.

    One forward pass replaces every target hook, each dictionary reading its input as it flows
    in that pass (downstream of earlier replacements, as a replacement model runs); the
    baseline zero-ablates every target hook at once. ``baselines``: those of earlier
    evaluations on the same ``contexts``, reused and extended.
    """
    writes = [h for t in targets for h in t.writes]
    require(
        len(set(writes)) == len(writes),
        "target_hook",
        writes,
        "dictionaries evaluated together must write different hooks",
    )
    baselines = Baselines(cache_bytes=0) if baselines is None else baselines  # one-off
    device = next(model.parameters()).device
    ce_clean = ce_with = ce_zero = kl = 0.0
    positions = 0
    for i, tokens in enumerate(contexts):
        tokens = tokens.to(device)
        keep = ~torch.isin(tokens, exclude_ids.to(device))
        batch, clean = baselines.clean(model, i, tokens)
        ce_clean += batch.ce_clean
        positions += tokens[:, 1:].numel()
        hooks = _splice_hooks(targets, keep, clean=_clean_inputs(model, tokens, targets, keep))
        spliced = model.run_with_hooks(tokens, fwd_hooks=hooks)
        ce, divergence = _ce_and_kl(spliced, tokens[:, 1:], clean)
        ce_with, kl = ce_with + ce, kl + divergence
        del spliced, clean
        ce_zero += batch.ablated(model, keep, writes)
    n = max(positions, 1)
    clean, with_saes, zero = ce_clean / n, ce_with / n, ce_zero / n
    return {
        "ce_loss_clean": clean,
        "ce_loss_with_sae": with_saes,
        "ce_loss_zero_ablated": zero,
        "ce_loss_recovered": (zero - with_saes) / (zero - clean) if zero > clean else 0.0,
        "kl_div_with_sae": kl / n,
    }


@torch.no_grad()
def evaluate(
    model: Any,
    targets: list[EvalTarget],
    contexts: Iterable[torch.Tensor],
    exclude_ids: torch.Tensor,
    dense_threshold: float = 0.1,
    baselines: Baselines | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Metrics per SAE name, and each SAE's feature density, over batches of ``contexts``.

    Per batch: one clean pass (none when ``baselines`` hold its log-probabilities), one
    zero-ablated pass per target hook not yet in ``baselines``, and one spliced pass per
    dictionary, whose hooks also read the activations the reconstruction metrics need.

    Every tensor goes where it is used: with the model spread over GPUs
    (``--model-n-devices``), a hook's activations sit on its layer's GPU, the logits on the
    last one and each SAE on its own device.
    """
    baselines = Baselines(cache_bytes=0) if baselines is None else baselines  # one-off
    device = next(model.parameters()).device
    sums = {t.name: _Sums(t.sae.d_sae) for t in targets}

    def record(target: EvalTarget, y: torch.Tensor, feats: torch.Tensor, out: torch.Tensor) -> None:
        sums[target.name].add(y, feats, out)

    ce_clean, positions = 0.0, 0
    for i, tokens in enumerate(contexts):
        tokens = tokens.to(device)
        keep = ~torch.isin(tokens, exclude_ids.to(device))
        next_tokens = tokens[:, 1:]
        batch, clean_log_probs = baselines.clean(model, i, tokens)
        ce_clean += batch.ce_clean
        positions += next_tokens.numel()
        for target in targets:
            s = sums[target.name]
            inputs = _clean_inputs(model, tokens, [target], keep)
            hooks = _splice_hooks([target], keep, record, inputs)
            with_sae = model.run_with_hooks(tokens, fwd_hooks=hooks)
            ce, kl = _ce_and_kl(with_sae, next_tokens, clean_log_probs)
            del with_sae
            s.ce_sae += ce
            s.kl += kl
            s.ce_ablated += batch.ablated(model, keep, list(target.writes))
        del clean_log_probs
    return _finish(sums, ce_clean, positions, dense_threshold)


@dataclass
class Evaluator:
    """A run's held-out evaluation: the model, contexts fixed for the whole run, the token ids
    whose positions are not evaluated, and the baselines every evaluation of the run shares."""

    model: Any
    contexts: list[torch.Tensor]
    exclude_ids: torch.Tensor
    dense_threshold: float = 0.1
    baselines: Baselines = field(default_factory=Baselines)
    seconds: float = 0.0
    """Wall time spent evaluating so far, reported next to the run's."""

    def __call__(
        self, targets: list[EvalTarget]
    ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """:func:`evaluate` of ``targets``, their dictionaries in eval mode meanwhile."""
        with _eval_mode(targets), self._timed():
            return evaluate(
                self.model,
                targets,
                self.contexts,
                self.exclude_ids,
                self.dense_threshold,
                self.baselines,
            )

    def together(self, targets: list[EvalTarget]) -> dict[str, float]:
        """:func:`evaluate_together` of ``targets``, their dictionaries in eval mode meanwhile."""
        with _eval_mode(targets), self._timed():
            return evaluate_together(
                self.model, targets, self.contexts, self.exclude_ids, self.baselines
            )

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """Adds the block's wall time to ``seconds``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


@contextlib.contextmanager
def _eval_mode(targets: list[EvalTarget]) -> Iterator[None]:
    """The dictionaries of ``targets`` in eval mode, their modes restored afterwards."""
    modes = [t.sae.training for t in targets]
    for target in targets:
        target.sae.eval()
    try:
        yield
    finally:
        for target, mode in zip(targets, modes, strict=True):
            target.sae.train(mode)


def _finish(
    sums: dict[str, _Sums], ce_clean: float, positions: int, dense_threshold: float
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    metrics, densities = {}, {}
    clean = ce_clean / max(positions, 1)
    for name, s in sums.items():
        n = max(s.n, 1)
        mean_x = s.sum_x / n if s.sum_x is not None else torch.zeros(1)
        total_var = s.sum_sq_x - n * float(mean_x.pow(2).sum())
        ev = 1.0 - s.sq_err / total_var if total_var > 0 else 0.0
        density = (s.fires.float() / n) if s.fires is not None else torch.zeros(s.d_sae)
        ce_sae, ce_abl = s.ce_sae / max(positions, 1), s.ce_ablated / max(positions, 1)
        gap = ce_abl - clean
        metrics[name] = {
            "mse": s.sq_err / max(s.elements, 1),
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "l0": s.l0 / n,
            "l1": s.l1 / n,
            "cosine_similarity": s.cos / n,
            "l2_ratio": s.l2_ratio / n,
            "dead_features": int((density == 0).sum()),
            "dense_features": int((density > dense_threshold).sum()),
            "ce_loss_clean": clean,
            "ce_loss_with_sae": ce_sae,
            "ce_loss_zero_ablated": ce_abl,
            "ce_loss_recovered": (ce_abl - ce_sae) / gap if gap > 0 else 0.0,
            "kl_div_with_sae": s.kl / max(positions, 1),
            "eval_tokens": s.n,
        }
        densities[name] = density.cpu()
    return metrics, densities


def format_metrics(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one column per SAE, one row per metric."""
    names = list(metrics)
    keys = list(next(iter(metrics.values())))
    width = max(len(k) for k in keys) + 2
    cols = [max(len(n), 10) for n in names]
    lines = [
        "metric".ljust(width) + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))
    ]
    for key in keys:
        cells = []
        for name, c in zip(names, cols, strict=True):
            value = metrics[name][key]
            text = f"{value:d}" if isinstance(value, int) else f"{value:.4g}"
            cells.append(text.rjust(c))
        lines.append(key.ljust(width) + "  ".join(cells))
    return "\n".join(lines)
