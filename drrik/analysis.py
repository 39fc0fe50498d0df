"""Feature analysis of a saved SAE, streamed over a token budget: what each feature responds to.

One pass runs the model over held-out contexts and keeps, per feature and in memory bounded by
the SAE's width (never a dense tokens x d_sae matrix):

- how often it fires (``count`` / ``n_tokens``: its density) and the sum of its activations
  (mean when active), plus a histogram of its activations on log-spaced bins;
- the ``top_k`` contexts with the largest maximum activation, each stored as a ``window`` of
  tokens around its maximum token with the feature's activation on every token;
- quantile-band examples: a uniform sample of the contexts it fires on (the ``n_bands`` x
  ``band_samples`` lowest values of a fixed hash of (context, feature), so the sample is the
  same whatever the batching). Sorted by activation and cut into equal bands, it shows what the
  feature does across its range, not only at its peak;
- its direct logit effect: the decoder row through the final norm's scale and the unembedding,
  with the most promoted and most suppressed tokens.

Positions holding BOS, EOS or pad are ignored (on by default): BOS activations are outliers the
SAE was not trained on. Results are written next to the run as ``analysis/features.safetensors``
(tensors) and ``analysis/analysis.json`` (settings and the token strings the report shows), and
are reused by ``drrik report`` and ``drrik steer``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from drrik.analysis_results import HIST_BINS, HIST_LOG10_RANGE, AnalysisResults, Example
from drrik.data import SpecialTokens
from drrik.errors import check_device, require
from drrik.model import run_hooks
from drrik.options import AnalysisConfig
from drrik.sae import SAE
from drrik.saved import SavedSAE

__all__ = [
    "AnalysisConfig",
    "AnalysisResults",
    "Example",
    "FeatureAnalyzer",
    "analyze",
    "logit_effects",
    "sample_priority",
]
_NO_SAMPLE = 2**40
"""Hash priority of a context the feature does not fire on: never sampled."""
_FP16_MAX = 65504.0
_SLOT_FIELDS = ("act", "ctx", "pos", "start", "window")


def sample_priority(contexts: Tensor, n_features: int, seed: int) -> Tensor:
    """A fixed pseudo-random int64 in [0, 2**32) per (context, feature), ``[len(contexts), F]``.

    Keeping the lowest values per feature draws a uniform sample of its contexts that does not
    depend on batch size or device, so a brute-force computation can reproduce it exactly.
    """
    mask = 0xFFFFFFFF
    features = torch.arange(n_features, device=contexts.device)
    x = (contexts[:, None] * 1_000_003 + features[None, :] * 7_919 + seed * 104_729) & mask
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    return (x >> 16) ^ x


class FeatureAnalyzer:
    """Accumulates per-feature statistics and examples over batches of token contexts."""

    def __init__(
        self,
        model: Any,
        sae: SAE,
        hook: str | tuple[str, ...],
        cfg: AnalysisConfig | None = None,
        ignore_ids: list[int] | None = None,
    ) -> None:
        """``hook``: the hook the SAE reads, or the hooks a crosscoder or CLT reads, in order
        (it encodes their concatenation)."""
        self.model, self.sae = model, sae
        self.hooks = (hook,) if isinstance(hook, str) else tuple(hook)
        self.hook = self.hooks[0]
        self.cfg = cfg or AnalysisConfig()
        if ignore_ids is None and self.cfg.ignore_special_tokens:
            ignore_ids = SpecialTokens.of(model.tokenizer).ids()
        self.device = sae.b_dec.device
        self.ignore = torch.tensor(ignore_ids or [], dtype=torch.long, device=self.device)
        self.contexts: list[Tensor] = []
        self.state: dict[str, Tensor] = {}

    def _init_state(self, n_features: int) -> None:
        k, r, w, dev = self.cfg.top_k, self.cfg.reservoir, self.cfg.window, self.device
        state: dict[str, Tensor] = {
            "count": torch.zeros(n_features, dtype=torch.long, device=dev),
            "act_sum": torch.zeros(n_features, dtype=torch.float64, device=dev),
            "hist": torch.zeros(n_features * HIST_BINS, dtype=torch.long, device=dev),
            "n_tokens": torch.zeros((), dtype=torch.long, device=dev),
        }
        for prefix, slots in (("top", k), ("band", r)):
            state[f"{prefix}_act"] = torch.zeros(slots, n_features, device=dev)
            for name in ("ctx", "pos", "start"):
                state[f"{prefix}_{name}"] = torch.zeros(
                    slots, n_features, dtype=torch.long, device=dev
                )
            state[f"{prefix}_window"] = torch.zeros(slots, w, n_features, device=dev)
        state["band_prio"] = torch.full((r, n_features), _NO_SAMPLE, dtype=torch.long, device=dev)
        self.state = state

    @torch.no_grad()
    def feature_acts(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``[batch, ctx, d_sae]`` float32 activations, zero at ignored positions, and the
        ``[batch, ctx]`` mask of the positions kept."""
        got = run_hooks(self.model, tokens, list(self.hooks))
        acts = torch.cat([got[h].to(self.device) for h in self.hooks], dim=-1)
        feats = self.sae.encode(acts).float()
        keep = ~torch.isin(tokens.to(self.device), self.ignore)
        return feats * keep[..., None], keep

    @torch.no_grad()
    def update(self, tokens: Tensor) -> None:
        """Fold one ``[batch, ctx]`` batch of contexts into the running results."""
        feats, keep = self.feature_acts(tokens)
        batch, length, n_features = feats.shape
        if not self.state:
            self._init_state(n_features)
        s, cfg = self.state, self.cfg
        first = sum(c.shape[0] for c in self.contexts)
        self.contexts.append(tokens.cpu().to(torch.int32))
        s["n_tokens"] += keep.sum()

        active = feats > 0
        s["count"] += active.sum((0, 1))
        s["act_sum"] += feats.sum((0, 1), dtype=torch.float64)
        _, _, feature = active.nonzero(as_tuple=True)
        lo, hi = HIST_LOG10_RANGE
        bins = ((feats[active].log10() - lo) * (HIST_BINS / (hi - lo))).floor().long()
        s["hist"].index_add_(
            0, feature * HIST_BINS + bins.clamp(0, HIST_BINS - 1), torch.ones_like(feature)
        )

        ctx_max, ctx_pos = feats.max(dim=1)  # [batch, F]
        width = min(cfg.window, length)
        left = (width * 3) // 4
        start = (ctx_pos - left).clamp(0, length - width)
        offsets = torch.arange(width, device=self.device)[None, :, None]
        windows = feats.gather(1, start[:, None, :] + offsets)  # [batch, width, F]
        if width < cfg.window:
            windows = torch.nn.functional.pad(windows, (0, 0, 0, cfg.window - width))
        ids = torch.arange(first, first + batch, device=self.device)
        new = {
            "act": ctx_max,
            "ctx": ids[:, None].expand(batch, n_features),
            "pos": ctx_pos,
            "start": start,
            "window": windows,
        }
        _, top = torch.cat([s["top_act"], ctx_max]).topk(cfg.top_k, dim=0)
        self._take("top", top, new)
        priority = sample_priority(ids, n_features, cfg.seed).masked_fill(ctx_max <= 0, _NO_SAMPLE)
        merged_prio = torch.cat([s["band_prio"], priority])
        s["band_prio"], sampled = merged_prio.topk(cfg.reservoir, dim=0, largest=False)
        self._take("band", sampled, new)

    def _take(self, prefix: str, order: Tensor, new: dict[str, Tensor] | None = None) -> None:
        """Keep the slots ``order`` picks from the kept ones (followed by ``new`` contexts)."""
        for name in _SLOT_FIELDS:
            kept = self.state[f"{prefix}_{name}"]
            both = torch.cat([kept, new[name]]) if new else kept
            index = order[:, None, :].expand(-1, both.shape[1], -1) if both.dim() == 3 else order
            self.state[f"{prefix}_{name}"] = both.gather(0, index)

    def run(self, batches: Iterable[Tensor], meta: dict[str, Any] | None = None) -> AnalysisResults:
        """Analyse every batch, then compute logit effects and package the results."""
        for tokens in tqdm(batches, unit="batch", desc="analysing", leave=False):
            self.update(tokens)
        require(bool(self.state), "dataset", "(empty)", "it gave no context to analyse")
        return self.finish(meta)

    @torch.no_grad()
    def finish(self, meta: dict[str, Any] | None = None) -> AnalysisResults:
        s = self.state
        # Unfilled sample slots hold activation 0, so this puts the sample in activation order.
        self._take("band", s["band_act"].argsort(dim=0, descending=True))
        tensors = {
            "count": s["count"],
            "act_sum": s["act_sum"],
            "hist": s["hist"].view(-1, HIST_BINS).to(torch.int32),
            "contexts": torch.cat(self.contexts),
        }
        for prefix in ("top", "band"):
            act = s[f"{prefix}_act"]
            tensors[f"{prefix}_act"] = act.T
            for name in ("ctx", "pos", "start"):  # -1 marks an empty slot
                slot = s[f"{prefix}_{name}"].masked_fill(act <= 0, -1)
                tensors[f"{prefix}_{name}"] = slot.T.to(torch.int32)
            window = s[f"{prefix}_window"].permute(2, 0, 1)
            tensors[f"{prefix}_window"] = window.clamp(max=_FP16_MAX).half()
        tensors.update(logit_effects(self.model, self.sae, self.cfg.logit_k))
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        ids = torch.unique(torch.cat([tensors["contexts"].flatten().long()] + _logit_ids(tensors)))
        strings = self.model.tokenizer.batch_decode([[i] for i in ids.tolist()])
        info = {
            "hook": self.hook,
            **({"hooks": list(self.hooks)} if len(self.hooks) > 1 else {}),
            "n_tokens": int(s["n_tokens"]),
            "n_contexts": int(tensors["contexts"].shape[0]),
            "config": asdict(self.cfg),
            "hist_log10_range": list(HIST_LOG10_RANGE),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            **(meta or {}),
        }
        vocab = dict(zip(ids.tolist(), strings, strict=True))
        return AnalysisResults(info, tensors, vocab)


def _logit_ids(tensors: dict[str, Tensor]) -> list[Tensor]:
    return [tensors[k].flatten().long() for k in ("logit_pos_ids", "logit_neg_ids") if k in tensors]


def _final_norm_scale(model: Any) -> Tensor | None:
    """The final norm's elementwise scale (``weight`` on bridges, ``w`` on HookedTransformer)."""
    norm = getattr(model, "ln_final", None)
    for name in ("weight", "w"):
        value = getattr(norm, name, None)
        if isinstance(value, Tensor):
            return value
    return None


@torch.no_grad()
def logit_effects(model: Any, sae: SAE, k: int, chunk: int = 512) -> dict[str, Tensor]:
    """Direct logit attribution of each decoder row: ``(W_dec[f] * norm_scale) @ W_U``.

    The final norm's own normalization depends on the whole residual and is left out; its
    scale is per dimension and is kept. Empty when the SAE's output width (a transcoder's
    d_out) is not the model's (e.g. an MLP-neuron hook), where the decoder row is not a
    residual-stream direction.
    """
    W_U = getattr(model, "W_U", None)
    if W_U is None or W_U.shape[0] != sae.d_out:
        return {}
    W_U = W_U.float()
    scale = _final_norm_scale(model)
    out: dict[str, list[Tensor]] = {"pos": [], "pos_ids": [], "neg": [], "neg_ids": []}
    for first in range(0, sae.d_sae, chunk):
        rows = sae.W_dec[first : first + chunk].to(W_U)
        if scale is not None:
            rows = rows * scale.to(W_U)
        effect = rows @ W_U
        top = effect.topk(k, dim=1)
        bottom = effect.topk(k, dim=1, largest=False)
        out["pos"].append(top.values)
        out["pos_ids"].append(top.indices)
        out["neg"].append(bottom.values)
        out["neg_ids"].append(bottom.indices)
    return {f"logit_{name}": torch.cat(parts) for name, parts in out.items()}


def analyze(
    path: str | Path,
    cfg: AnalysisConfig | None = None,
    *,
    sae_name: str | None = None,
    model: Any = None,
    dataset: str | None = None,
    device: str = "cpu",
    save: bool = True,
) -> AnalysisResults:
    """Analyse a run's SAE (or a saved SAE) on held-out text; save the results beside it.

    ``model`` may be a loaded TransformerLens model, another model name, or None (the one the
    SAE was trained on); ``dataset`` replaces the training dataset (all its rows are used).
    """
    cfg = cfg or AnalysisConfig()
    check_device(device)
    saved = SavedSAE.locate(path, sae_name)
    model_name = saved.model_name(model if isinstance(model, str) else None)
    # Cheap reads first, so that a damaged SAE, config or dataset fails before the model loads.
    sae = saved.load_sae(device)
    n_contexts = math.ceil(cfg.n_tokens / saved.data_config(dataset).context_size)
    lm, data_cfg, batches = saved.held_out(
        model, device, n_contexts, cfg.batch_size_prompts, dataset
    )
    meta = {
        "sae_dir": str(saved.sae_dir.resolve()),
        "model_name": model_name,
        "dataset": data_cfg.dataset,
        "context_size": data_cfg.context_size,
    }
    results = FeatureAnalyzer(lm, sae, saved.hooks, cfg).run(batches, meta)
    if save:
        results.save(saved.analysis_dir)
    return results
