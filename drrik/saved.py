"""A saved SAE and the run it came from: what analysis, report, steering and eval load.

It finds the SAE (:func:`drrik.run_dir.locate_saved_sae`), reads its ``cfg.json`` and the
run's ``config.yaml``, loads its model, data settings and saved analysis, and says where its
analysis and report go. Every read that can fail is cheap and comes before the model loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drrik.analysis_results import ANALYSIS_DIR, META_FILE, AnalysisResults
from drrik.config import DataConfig, EvalConfig, RunConfig, load_config_file
from drrik.data import ContextStream, SpecialTokens, load_source
from drrik.errors import check_device, require
from drrik.evaluate import (
    EvalTarget,
    evaluate,
    evaluate_together,
    held_out_contexts,
    spliced_groups,
)
from drrik.model import check_hooks, load_model
from drrik.run_dir import CONFIG_FILE, SavedLocation, locate_saved_sae, saved_names
from drrik.sae import SAE, load_sae
from drrik.sae.saving import SAVED_SAE_FIX, read_sae_cfg


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
        return SavedLocation(self.sae_dir, self.run_dir, self.name).output_dir(kind)

    @property
    def analysis_dir(self) -> Path:
        return self.output_dir(ANALYSIS_DIR)

    @property
    def hook(self) -> str:
        hook = self.metadata.get("hook_name")
        require(bool(hook), "hook", hook, "the SAE's cfg.json names no metadata.hook_name")
        return str(hook)

    @property
    def target_hook(self) -> str:
        """The hook the dictionary writes: a transcoder's ``hook_name_out``, else its input."""
        return str(self.metadata.get("hook_name_out") or self.hook)

    @property
    def hooks(self) -> tuple[str, ...]:
        """Every hook it reads, in order (a crosscoder's or CLT's several)."""
        return tuple(self.metadata.get("hook_names") or (self.hook,))

    @property
    def target_hooks(self) -> tuple[str, ...]:
        """Every hook it writes, in order."""
        return tuple(
            self.metadata.get("hook_names_out")
            or self.metadata.get("hook_names")
            or (self.target_hook,)
        )

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
        check_hooks(model, list(dict.fromkeys(self.hooks + self.target_hooks)))
        return model

    def held_out(
        self,
        model: Any,
        device: str,
        n_contexts: int,
        batch_size: int,
        dataset: str | None = None,
        eval_split: str | None = None,
    ) -> tuple[Any, DataConfig, list[Tensor]]:
        """(language model, data settings, held-out contexts in batches) to study the SAE on.

        The run's own held-out text by default (its eval split, else the rows training
        skipped); ``dataset`` replaces it whole, ``eval_split`` names a split to use. The data
        opens before the model loads, so a bad dataset fails first.
        """
        data_cfg = self.data_config(dataset)
        if eval_split is not None:
            data_cfg = replace(data_cfg, eval_split=eval_split)
        source = load_source(data_cfg, data_cfg.eval_split)
        lm = self.load_model(model, device)
        holdout = "all" if data_cfg.eval_split or dataset else "eval"
        stream = ContextStream(source, lm.tokenizer, data_cfg, holdout=holdout, cycle=False)
        return lm, data_cfg, held_out_contexts(stream, n_contexts, batch_size)

    def load_sae(self, device: str = "cpu") -> SAE:
        return load_sae(self.sae_dir, device=device)

    def has_analysis(self) -> bool:
        return (self.analysis_dir / META_FILE).is_file()

    def load_analysis(self) -> AnalysisResults:
        return AnalysisResults.load(self.analysis_dir)


def evaluate_saved(
    path: str | Path,
    *,
    sae_name: str | None = None,
    model: Any = None,
    dataset: str | None = None,
    eval_split: str | None = None,
    eval_contexts: int = 64,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Held-out metrics by SAE name (``drrik eval``), as training's final evaluation computes
    them: on the run's held-out text unless ``dataset``/``eval_split`` say other.

    Without ``sae_name``, a run's every SAE (a transcoder per layer, say) is evaluated on the
    same forward passes, and a run trained with ``--eval-together`` also gets
    ``spliced_together``: all of them spliced in at once (one per sweep setting), as
    training reported.
    """
    check_device(device)
    cfg = EvalConfig(eval_contexts=eval_contexts)
    names = [sae_name] if sae_name is not None else saved_names(path) or [None]
    located = [SavedSAE.locate(path, name) for name in names]
    first = located[0]
    first.model_name(model if isinstance(model, str) else None)
    # Cheap reads first: a damaged SAE fails before the model loads.
    saes = [saved.load_sae(device) for saved in located]
    lm, _, contexts = first.held_out(
        model, device, cfg.eval_contexts, cfg.eval_batch_size_prompts, dataset, eval_split
    )
    for saved in located[1:]:
        saved.load_model(lm)  # checks its hooks on the loaded model
    targets = [
        EvalTarget(
            saved.sae_dir.name,
            saved.hook,
            sae,
            target_hook=saved.target_hook,
            reads=saved.hooks,
            writes=saved.target_hooks,
        )
        for saved, sae in zip(located, saes, strict=True)
    ]
    exclude = torch.tensor(SpecialTokens.of(lm.tokenizer).ids(), dtype=torch.long)
    metrics, _ = evaluate(lm, targets, contexts, exclude, cfg.dense_threshold)
    run_cfg = first._run_config()
    if sae_name is None and run_cfg is not None and run_cfg.eval.eval_together:
        specs = {spec.name: spec for spec in run_cfg.dictionaries(lm.cfg.n_layers)}
        settings = [specs[saved.name].setting if saved.name else "" for saved in located]
        for name, group in spliced_groups(targets, settings).items():
            metrics[name] = evaluate_together(lm, group, contexts, exclude)
    return metrics
