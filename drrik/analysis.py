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

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from drrik.config import DataConfig, RunConfig, load_config_file
from drrik.data import ContextStream, SpecialTokens, load_source
from drrik.errors import check_device, read_json, reading, require
from drrik.evaluate import held_out_contexts
from drrik.model import check_hooks, load_model, run_hooks
from drrik.run_dir import CONFIG_FILE, locate_saved_sae, write_text_atomic
from drrik.sae import SAE, load_sae
from drrik.sae.saving import SAVED_SAE_FIX, read_sae_cfg

ANALYSIS_DIR = "analysis"
TENSORS_FILE = "features.safetensors"
META_FILE = "analysis.json"
HIST_LOG10_RANGE = (-3.0, 3.0)
"""Activation histograms span 1e-3 .. 1e3 (raw units), 20 log-spaced bins a decade."""
HIST_BINS = 120
_NO_SAMPLE = 2**40
"""Hash priority of a context the feature does not fire on: never sampled."""
_FP16_MAX = 65504.0
_SLOT_FIELDS = ("act", "ctx", "pos", "start", "window")


@dataclass
class AnalysisConfig:
    """How much to read and how much to keep per feature."""

    n_tokens: int = 65_536
    """Token budget: contexts are read until this many tokens (context_size each)."""
    batch_size_prompts: int = 16
    """Contexts per model forward pass."""
    top_k: int = 16
    """Top-activating contexts kept per feature."""
    n_bands: int = 4
    """Quantile bands of a feature's activating contexts shown as examples."""
    band_samples: int = 4
    """Examples per band."""
    window: int = 32
    """Tokens kept around each example's maximum token (3/4 before it, 1/4 after)."""
    logit_k: int = 10
    """Promoted and suppressed tokens kept per feature."""
    ignore_special_tokens: bool = True
    """Ignore BOS, EOS and pad positions."""
    seed: int = 0
    """Seed of the hash that draws the quantile-band sample."""

    def __post_init__(self) -> None:
        for name in ("n_tokens", "batch_size_prompts", "top_k", "n_bands", "band_samples"):
            value = getattr(self, name)
            require(value > 0, name, value, "use a positive number")
        require(self.window >= 2, "window", self.window, "use at least 2 tokens")
        require(self.logit_k >= 1, "logit_k", self.logit_k, "use a positive number")

    @property
    def reservoir(self) -> int:
        return self.n_bands * self.band_samples


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


@dataclass
class Example:
    """A window of tokens around a context's strongest activation of one feature."""

    context: int
    position: int
    activation: float
    token_ids: list[int]
    activations: list[float]
    max_index: int
    """Index of the maximum token inside the window."""


class FeatureAnalyzer:
    """Accumulates per-feature statistics and examples over batches of token contexts."""

    def __init__(
        self,
        model: Any,
        sae: SAE,
        hook: str,
        cfg: AnalysisConfig | None = None,
        ignore_ids: list[int] | None = None,
    ) -> None:
        self.model, self.sae, self.hook = model, sae, hook
        self.cfg = cfg or AnalysisConfig()
        if ignore_ids is None and self.cfg.ignore_special_tokens:
            ignore_ids = SpecialTokens.of(model.tokenizer).ids()
        self.device = sae.W_dec.device
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
        acts = run_hooks(self.model, tokens, [self.hook])[self.hook]
        feats = self.sae.encode(acts.to(self.device)).float()
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
    scale is per dimension and is kept. Empty when the SAE's width is not the model's (e.g. an
    MLP-neuron hook), where the decoder row is not a residual-stream direction.
    """
    W_U = getattr(model, "W_U", None)
    if W_U is None or W_U.shape[0] != sae.d_in:
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


@dataclass
class AnalysisResults:
    """Per-feature results of one analysis pass; see the module docstring for their meaning."""

    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    vocab: dict[int, str]

    @property
    def d_sae(self) -> int:
        return int(self.tensors["count"].shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def density(self) -> Tensor:
        """Fraction of analysed tokens each feature fires on."""
        return self.tensors["count"].double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation when active (0 for features that never fired)."""
        return self.tensors["act_sum"] / self.tensors["count"].clamp_min(1)

    @property
    def max_activation(self) -> Tensor:
        return self.tensors["top_act"][:, 0]

    @property
    def has_logits(self) -> bool:
        return "logit_pos" in self.tensors

    def token(self, token_id: int) -> str:
        return self.vocab.get(int(token_id), f"<{int(token_id)}>")

    def _examples(self, prefix: str, feature: int) -> list[Example]:
        t = self.tensors
        contexts = t["contexts"]
        width = min(int(self.meta["config"]["window"]), contexts.shape[1])
        examples = []
        for slot in range(t[f"{prefix}_act"].shape[1]):
            activation = float(t[f"{prefix}_act"][feature, slot])
            if activation <= 0:
                continue
            ctx, pos, start = (
                int(t[f"{prefix}_{n}"][feature, slot]) for n in ("ctx", "pos", "start")
            )
            examples.append(
                Example(
                    context=ctx,
                    position=pos,
                    activation=activation,
                    token_ids=contexts[ctx, start : start + width].tolist(),
                    activations=t[f"{prefix}_window"][feature, slot, :width].float().tolist(),
                    max_index=pos - start,
                )
            )
        return examples

    def top_examples(self, feature: int) -> list[Example]:
        """The feature's top-activating contexts, strongest first."""
        return self._examples("top", feature)

    def band_examples(self, feature: int) -> list[tuple[str, list[Example]]]:
        """The sampled activating contexts cut into quantile bands, highest band first."""
        examples = self._examples("band", feature)
        n_bands = int(self.meta["config"]["n_bands"])
        bands = []
        for band in range(n_bands):
            lo, hi = band * len(examples) // n_bands, (band + 1) * len(examples) // n_bands
            if hi > lo:
                upper, lower = 100 - 100 * band // n_bands, 100 - 100 * (band + 1) // n_bands
                label = f"quantile {lower}-{upper}% of activating contexts"
                bands.append((label, examples[lo:hi]))
        return bands

    def logit_effects(
        self, feature: int
    ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(promoted, suppressed) tokens with their direct logit effect."""
        if not self.has_logits:
            return [], []
        t = self.tensors

        def pairs(side: str) -> list[tuple[str, float]]:
            ids, values = t[f"logit_{side}_ids"][feature], t[f"logit_{side}"][feature]
            return [(self.token(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]

        return pairs("pos"), pairs("neg")

    def histogram(self, feature: int) -> tuple[Tensor, Tensor]:
        """(counts, bin edges) of the feature's activations on log-spaced bins."""
        counts = self.tensors["hist"][feature].long()
        lo, hi = self.meta["hist_log10_range"]
        return counts, torch.logspace(lo, hi, counts.numel() + 1, dtype=torch.float64)

    def save(self, directory: str | Path) -> Path:
        """Write ``features.safetensors`` and ``analysis.json`` into ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{TENSORS_FILE}.tmp"
        save_file(self.tensors, str(tmp))
        tmp.replace(path / TENSORS_FILE)
        content = {"meta": self.meta, "vocab": {str(k): v for k, v in self.vocab.items()}}
        write_text_atomic(path / META_FILE, json.dumps(content))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> AnalysisResults:
        path = Path(directory)
        require(
            (path / META_FILE).is_file() and (path / TENSORS_FILE).is_file(),
            "analysis",
            str(path),
            "no analysis there; run drrik analyze first",
        )
        fix = "run drrik analyze again to rewrite it"
        content = read_json(path / META_FILE, fix)
        with reading("file", str(path / META_FILE), fix, "not an analysis"):
            vocab = {int(k): v for k, v in content["vocab"].items()}
            meta = dict(content["meta"])
        with reading("file", str(path / TENSORS_FILE), fix):
            tensors = load_file(str(path / TENSORS_FILE))
        return cls(meta, tensors, vocab)


# -- saved runs ------------------------------------------------------------------------------


@dataclass
class SavedSAE:
    """A saved SAE, the run it belongs to (if any), and where its analysis and report go.

    A run keeps them beside ``final/``: ``analysis/``, ``report/`` (``analysis/<name>/`` when
    the run trained several SAEs). A bare SAE directory keeps them inside itself, so saving a
    new SAE over it also removes the now stale analysis.
    """

    sae_dir: Path
    run_dir: Path | None
    output_root: Path
    name: str | None
    metadata: dict[str, Any]
    cfg_json: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def locate(cls, path: str | Path, name: str | None = None) -> SavedSAE:
        """Accept a run directory, its ``final/`` directory, or any saved SAE directory."""
        where = locate_saved_sae(path, name)
        sae_dir, run_dir, name = where.sae_dir, where.run_dir, where.name
        cfg_json = read_sae_cfg(sae_dir)
        return cls(sae_dir, run_dir, run_dir or sae_dir, name, cfg_json["metadata"], cfg_json)

    @property
    def d_sae(self) -> int:
        """The SAE's width from ``cfg.json``: feature ids are checked against it before any
        model loads."""
        d_sae = self.cfg_json.get("d_sae")
        require(
            isinstance(d_sae, int) and d_sae > 0,
            "file",
            str(self.sae_dir / "cfg.json"),
            f"it gives no positive integer d_sae; {SAVED_SAE_FIX}",
        )
        return d_sae

    def check_features(self, features: Iterable[int], field: str = "feature") -> None:
        """Refuse feature ids outside ``[0, d_sae)``."""
        for f in features:
            require(0 <= f < self.d_sae, field, f, f"use ids in [0, {self.d_sae})")

    def output_dir(self, kind: str) -> Path:
        """``analysis`` or ``report`` directory of this SAE."""
        base = self.output_root / kind
        return base / self.name if self.name else base

    @property
    def analysis_dir(self) -> Path:
        return self.output_dir(ANALYSIS_DIR)

    @property
    def hook(self) -> str:
        hook = self.metadata.get("hook_name")
        require(bool(hook), "hook", hook, "the SAE's cfg.json names no metadata.hook_name")
        return str(hook)

    def _run_config(self) -> RunConfig | None:
        """The run's config.yaml, checked; its device is not used here, so not checked."""
        if self.run_dir is None or not (self.run_dir / CONFIG_FILE).is_file():
            return None
        return load_config_file(self.run_dir / CONFIG_FILE, device="cpu")

    def data_config(self, dataset: str | None = None) -> DataConfig:
        """The run's data settings (config.yaml), else what the SAE's metadata records."""
        saved = self._run_config()
        if saved is not None:
            values = saved.data.to_dict()
        else:
            values = {
                "dataset": self.metadata.get("dataset_path", "drrik-offline"),
                "context_size": int(self.metadata.get("context_size", 128)),
                "prepend_bos": bool(self.metadata.get("prepend_bos", True)),
            }
        if dataset is not None:
            values.update(dataset=dataset, eval_split=None, dataset_config=None)
        return DataConfig.from_dict(values)

    def model_name(self, override: str | None = None) -> str:
        name = override or self.metadata.get("model_name")
        require(bool(name), "model", name, "the SAE names no model; pass --model")
        return str(name)

    def load_model(self, model: Any = None, device: str = "cpu") -> Any:
        """The SAE's language model (``model``: a name, a loaded model, or None), hook checked."""
        if model is None or isinstance(model, str):
            saved = self._run_config()
            dtype = saved.model.model_dtype if saved else "float32"
            model = load_model(self.model_name(model), device=device, dtype=dtype)
        check_hooks(model, [self.hook])
        return model

    def load_sae(self, device: str = "cpu") -> SAE:
        return load_sae(self.sae_dir, device=device)

    def has_analysis(self) -> bool:
        return (self.analysis_dir / META_FILE).is_file()

    def load_analysis(self) -> AnalysisResults:
        return AnalysisResults.load(self.analysis_dir)


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
    data_cfg = saved.data_config(dataset)
    source = load_source(data_cfg, data_cfg.eval_split)
    lm = saved.load_model(model, device)
    holdout = "all" if data_cfg.eval_split or dataset else "eval"
    stream = ContextStream(source, lm.tokenizer, data_cfg, holdout=holdout, cycle=False)
    n_contexts = math.ceil(cfg.n_tokens / data_cfg.context_size)
    batches = held_out_contexts(stream, n_contexts, cfg.batch_size_prompts)
    meta = {
        "sae_dir": str(saved.sae_dir.resolve()),
        "model_name": model_name,
        "dataset": data_cfg.dataset,
        "context_size": data_cfg.context_size,
    }
    results = FeatureAnalyzer(lm, sae, saved.hook, cfg).run(batches, meta)
    if save:
        results.save(saved.analysis_dir)
    return results


def cmd_analyze(argv: list[str]) -> int:
    """``drrik analyze DIR``: analyse a saved SAE's features and save the results in the run."""
    parser = argparse.ArgumentParser(
        prog="drrik analyze",
        description="Per-feature statistics, top contexts, quantile-band examples and logit "
        "effects of a saved SAE, streamed over held-out text.",
    )
    parser.add_argument("dir", type=Path, help="run directory or saved SAE directory")
    add_analysis_arguments(parser)
    args = parser.parse_args(argv)
    results = analyze(
        args.dir,
        analysis_config(args),
        sae_name=args.sae,
        model=args.model,
        dataset=args.dataset,
        device=args.device,
    )
    saved = SavedSAE.locate(args.dir, args.sae)
    alive = int((results.tensors["count"] > 0).sum())
    print(
        f"analysed {results.n_tokens:,} tokens: {alive}/{results.d_sae} features fired; "
        f"saved to {saved.analysis_dir.resolve()}"
    )
    return 0


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``drrik analyze`` and ``drrik report`` (which analyses when needed)."""
    defaults = AnalysisConfig()
    parser.add_argument("--sae", help="which SAE of a run that trained several")
    parser.add_argument("--model", help="model (default: the one the SAE was trained on)")
    parser.add_argument("--dataset", help="dataset (default: the training dataset's held-out rows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=defaults.n_tokens, help="token budget")
    parser.add_argument("--batch-size-prompts", type=int, default=defaults.batch_size_prompts)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--n-bands", type=int, default=defaults.n_bands)
    parser.add_argument("--band-samples", type=int, default=defaults.band_samples)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument(
        "--keep-special-tokens", action="store_true", help="also analyse BOS/EOS/pad positions"
    )


def analysis_config(args: argparse.Namespace) -> AnalysisConfig:
    return AnalysisConfig(
        n_tokens=args.tokens,
        batch_size_prompts=args.batch_size_prompts,
        top_k=args.top_k,
        n_bands=args.n_bands,
        band_samples=args.band_samples,
        window=args.window,
        ignore_special_tokens=not args.keep_special_tokens,
    )
