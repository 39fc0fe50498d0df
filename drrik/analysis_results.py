"""The results of one analysis pass, saved beside the run and reused by report and steer.

``features.safetensors`` holds the tensors, ``analysis.json`` the settings and the token
strings the report shows; see :mod:`drrik.analysis` for what each statistic means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from drrik.errors import read_json, reading, require
from drrik.run_dir import write_text_atomic

ANALYSIS_DIR = "analysis"
TENSORS_FILE = "features.safetensors"
META_FILE = "analysis.json"
HIST_LOG10_RANGE = (-3.0, 3.0)
"""Activation histograms span 1e-3 .. 1e3 (raw units), 20 log-spaced bins a decade."""
HIST_BINS = 120


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
