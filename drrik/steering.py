"""Steer a language model's generation with SAE feature directions.

An edit at the hook point the dictionary writes (an SAE's own hook; a transcoder's target hook,
``hook_name_out``, since its decoder rows live in the target's space) changes the activation on
every position while the model generates (:mod:`drrik.generation`: Hugging Face's own KV-cached
``generate`` with a forward hook where the hook point sits, not the hooked model's
``generate``), under ``torch.no_grad``:

- ``add`` mode adds ``strength * W_dec[f]`` for each steered feature ``f``: as if the feature
  fired with activation ``strength`` on top of what is there;
- ``clamp`` mode sets the feature's activation instead: it adds ``(strength - a_f(x)) * W_dec[f]``
  where ``a_f(x)`` is the SAE's current activation of ``f``, so in the SAE's decomposition of
  the new activation feature ``f`` contributes exactly ``strength`` (0 ablates it). SAEs only:
  a transcoder's ``a_f`` comes from another hook than the one edited.

Strengths are in units of the feature's typical maximum activation (``units="max"``: its max
over the saved analysis, so 1.0 means "as strongly as it ever fires") or absolute activation
values (``units="absolute"``). BOS/EOS/pad positions of the prompt are left alone, as in
training. The change is computed in float32 and cast to the model's dtype, so fp16/bf16 models
steer as well. With every strength 0 in ``add`` mode the output is exactly the unsteered one.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from drrik.analysis import AnalysisConfig, analyze
from drrik.data import SpecialTokens
from drrik.errors import check_device, require
from drrik.generation import Edit, generate_tokens
from drrik.model import run_hooks
from drrik.options import SteerMode, SteerUnits
from drrik.sae import SAE
from drrik.saved import SavedSAE

MODES = typing.get_args(SteerMode)
UNITS = typing.get_args(SteerUnits)
CALIBRATION_TOKENS = 16_384
"""Tokens analysed to find features' max activations when a run has no saved analysis."""


def check_mode(mode: str, hook: str, target_hook: str) -> None:
    """Refuse an unknown mode, and clamp for a transcoder (``target_hook`` is not ``hook``):
    its feature's activation is read at another hook than the one edited."""
    require(mode in MODES, "mode", mode, f"use one of {MODES}")
    require(
        mode == "add" or target_hook == hook,
        "mode",
        mode,
        "a transcoder's features are read at another hook than the one steered; use add",
    )


class SAESteering:
    """Generate text from ``model`` with features of ``sae`` (read at ``hook``) steered.

    Edits go to ``target_hook``, the hook the dictionary reconstructs (a transcoder's output
    hook; default ``hook``, an SAE's). ``max_activations [d_sae]`` gives the scale of
    ``units="max"``; :meth:`from_run` reads it from the run's saved analysis.
    """

    def __init__(
        self,
        model: Any,
        sae: SAE,
        hook: str,
        max_activations: Tensor | None = None,
        prepend_bos: bool = True,
        target_hook: str | None = None,
    ) -> None:
        self.target_hook = target_hook or hook
        for name in (hook, self.target_hook):
            require(name in model.hook_dict, "hook", name, "the model has no such hook")
        self.model, self.sae, self.hook = model, sae.eval(), hook
        self.max_activations = max_activations
        self.prepend_bos = prepend_bos
        self.tokenizer = model.tokenizer
        self.special = SpecialTokens.of(self.tokenizer)
        self.device = next(model.parameters()).device
        self._pad = self.special.pad if self.special.pad is not None else self.special.eos or 0

    @classmethod
    def from_run(
        cls,
        path: str | Path,
        *,
        model: Any = None,
        device: str = "cpu",
        sae_name: str | None = None,
    ) -> SAESteering:
        """Steering with a run's (or saved SAE's) SAE, its model and its saved analysis.

        Without a saved analysis, a short one (:data:`CALIBRATION_TOKENS`, not saved) finds
        the features' max activations.
        """
        check_device(device)
        saved = SavedSAE.locate(path, sae_name)
        lm = saved.load_model(model, device)
        if saved.has_analysis():
            max_acts = saved.load_analysis().max_activation
        else:
            cfg = AnalysisConfig(n_tokens=CALIBRATION_TOKENS, logit_k=1)
            calibration = analyze(path, cfg, sae_name=sae_name, model=lm, device=device, save=False)
            max_acts = calibration.max_activation
        prepend_bos = bool(saved.metadata.get("prepend_bos", True))
        sae = saved.load_sae(device)
        return cls(lm, sae, saved.hook, max_acts, prepend_bos, saved.target_hook)

    # -- prompts -----------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded ``[batch, len]`` tokens (BOS first when the SAE saw one) and their mask."""
        rows = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        if self.prepend_bos:
            rows = [[self.special.bos, *r] for r in rows]
        require(all(rows), "prompt", "", "give a non-empty prompt")
        width = max(len(r) for r in rows)
        tokens = torch.tensor([[self._pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return tokens.to(self.device), mask.to(self.device)

    def _coefficients(
        self, features: Sequence[int], strengths: Tensor, units: str
    ) -> tuple[Tensor, Tensor]:
        """Feature ids ``[n]`` and activation values ``[batch, n]`` in absolute units."""
        require(units in UNITS, "units", units, f"use one of {UNITS}")
        for f in features:
            require(0 <= f < self.sae.d_sae, "feature", f, f"use ids in [0, {self.sae.d_sae})")
        ids = torch.tensor(list(features), dtype=torch.long, device=self.sae.W_dec.device)
        values = strengths.to(self.sae.W_dec.device, torch.float32)
        if units == "max":
            require(
                self.max_activations is not None,
                "units",
                units,
                "no max activations known; run drrik analyze first or use units='absolute'",
            )
            scale = self.max_activations.to(values)[ids]  # type: ignore[union-attr]
            unseen = ids[scale <= 0].tolist()
            require(
                not unseen,
                "feature",
                unseen,
                "never fired in the analysis, so its max activation is unknown; analyse more "
                "tokens or use units='absolute'",
            )
            values = values * scale
        return ids, values

    def _edit(self, ids: Tensor, values: Tensor, mode: str) -> Edit:
        """The change steering makes to an activation ``[batch, pos, d_out]`` at the target.

        ``values [batch, n]``: one row per prompt. The SAE may sit on another device than the
        model's layer (``--model-n-devices``): the clamp's encode runs on the SAE's device and
        the change moves to the activation's.
        """
        directions = self.sae.W_dec[ids].float()  # [n, d_out]
        sae_device = directions.device

        def edit(act: Tensor) -> Tensor:
            coef = values[:, None, :]  # [batch, 1, n]
            if mode == "clamp":
                coef = coef - self.sae.encode(act.to(sae_device))[..., ids].float()
            return (coef @ directions).to(act.device)  # [batch, pos|1, d_out]

        return edit

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[str],
        features: Sequence[int] = (),
        strengths: Tensor | Sequence[float] | float = 1.0,
        *,
        mode: str = "add",
        units: str = "max",
        max_new_tokens: int = 30,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = 0,
    ) -> list[str]:
        """Continuations of ``prompts`` (without the prompt), one batched KV-cached generation.

        ``strengths`` is a number, one per feature, or a ``[len(prompts), len(features)]``
        tensor giving each prompt its own strengths. ``temperature`` 0 is greedy; otherwise
        tokens are sampled (``top_p`` nucleus) with torch's RNG seeded with ``seed`` inside a
        forked RNG state, so the caller's random stream is left as it was.
        """
        check_mode(mode, self.hook, self.target_hook)
        require(temperature >= 0, "temperature", temperature, "use a value >= 0")
        require(max_new_tokens > 0, "max_new_tokens", max_new_tokens, "use a positive number")
        tokens, mask = self._encode(prompts)
        values = torch.as_tensor(strengths, dtype=torch.float32).expand(len(prompts), len(features))
        edit, keep = None, None
        if features:
            ids, absolute = self._coefficients(features, values, units)
            edit = self._edit(ids, absolute, mode)
            keep = mask.bool() & ~torch.isin(tokens, torch.tensor(self.special.ids()).to(tokens))
        rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            out = generate_tokens(
                self.model,
                tokens,
                mask,
                max_new_tokens,
                hook=self.target_hook,
                edit=edit,
                prompt_mask=keep,
                temperature=temperature,
                top_p=top_p,
                eos_token_id=self.special.eos,
                pad_token_id=self._pad,
            )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def generate(
        self,
        text: str | Sequence[str],
        feature_idx: int | Sequence[int] | None = None,
        strength: float | Sequence[float] = 1.0,
        max_new_tokens: int = 30,
        temperature: float = 0.0,
        top_p: float | None = None,
        *,
        mode: str = "add",
        units: str = "max",
        seed: int | None = 0,
    ) -> str | list[str]:
        """Steered continuation of ``text`` (a prompt or a list of prompts).

        ``feature_idx``: one feature or several, ``strength``: one for all or one per feature;
        None steers nothing (the baseline).
        """
        if feature_idx is None:
            features = []
        else:
            features = [feature_idx] if isinstance(feature_idx, int) else list(feature_idx)
        prompts = [text] if isinstance(text, str) else list(text)
        outputs = self.generate_batch(
            prompts,
            features,
            strength,
            mode=mode,
            units=units,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return outputs[0] if isinstance(text, str) else outputs

    def compare_steering(
        self,
        text: str,
        feature_idx: int,
        strengths: Sequence[float] = (2.0, 5.0, 10.0),
        max_new_tokens: int = 30,
        temperature: float = 0.0,
        *,
        mode: str = "add",
        units: str = "max",
        seed: int | None = 0,
        show: bool = True,
    ) -> dict[str, str]:
        """Baseline and one continuation per strength, generated as one batch; printed as a
        table when ``show``. Keys: ``baseline`` and ``strength=<s>``."""
        rows = [0.0, *strengths] if mode == "add" else list(strengths)
        outputs = self.generate_batch(
            [text] * len(rows),
            [feature_idx],
            torch.tensor(rows)[:, None],
            mode=mode,
            units=units,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
        )
        if mode == "add":
            baseline = outputs.pop(0)
        else:
            baseline = self.generate_batch(
                [text], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            )[0]
        results = {"baseline": baseline}
        results.update({f"strength={s:g}": o for s, o in zip(strengths, outputs, strict=True)})
        if show:
            unit = "x max" if units == "max" else ""
            # ``show`` asks for the table itself (as tutorials and notebooks do): printed.
            print(f"prompt: {text!r}   feature {feature_idx}, {mode} mode")
            width = max(len(k) for k in results) + len(unit) + 1
            for key, value in results.items():
                label = key if key == "baseline" else f"{key}{unit}"
                print(f"  {label:<{width}} | {value!r}")
        return results

    @torch.no_grad()
    def find_steering_features(
        self, text: str, top_k: int = 20, min_activation: float = 0.0
    ) -> list[dict[str, Any]]:
        """Features active on the tokens of ``text`` (BOS/EOS/pad ignored), strongest first:
        by activation relative to the feature's max in the analysis; features with no known
        max come last, by raw activation."""
        tokens, _ = self._encode([text])
        acts = run_hooks(self.model, tokens, [self.hook])[self.hook]
        feats = self.sae.encode(acts[0].to(self.sae.W_dec.device)).float()  # [pos, d_sae]
        keep = ~torch.isin(tokens[0], torch.tensor(self.special.ids()).to(tokens))
        feats = feats * keep[:, None].to(feats)
        peak, where = feats.max(dim=0)
        known = torch.zeros_like(peak, dtype=torch.bool)
        relative = torch.zeros_like(peak)
        if self.max_activations is not None:
            scale = self.max_activations.to(peak)
            known = scale > 0
            relative = torch.where(known, peak / scale.clamp_min(1e-12), relative)
        active = (peak > max(min_activation, 0.0)).nonzero().flatten().tolist()
        score = torch.where(known, relative, peak)
        order = sorted(active, key=lambda f: (not bool(known[f]), -float(score[f])))
        return [
            {
                "feature": f,
                "max_activation": float(peak[f]),
                "relative_to_feature_max": float(relative[f]) if known[f] else None,
                "active_tokens": int((feats[:, f] > 0).sum()),
                "top_token": self.tokenizer.decode([int(tokens[0, where[f]])]),
            }
            for f in order[:top_k]
        ]

    def get_steering_direction(self, feature_idx: int, normalize: bool = True) -> Tensor:
        """The feature's decoder row (unit norm when ``normalize``), float32 on the CPU."""
        require(0 <= feature_idx < self.sae.d_sae, "feature", feature_idx, "no such feature")
        row = self.sae.W_dec[feature_idx].detach().float().cpu()
        return row / row.norm().clamp_min(1e-12) if normalize else row
