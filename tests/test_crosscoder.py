"""Crosscoders (issue 15): one dictionary that reads several hooks jointly, each with its own
scale, and reconstructs all of them; trained, folded, saved, evaluated in place (every hook
replaced at once, from the clean pass's inputs) and analysed like an SAE.

The end-to-end tests train on the tiny model over the residual stream of three layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from test_trainer import fit, one_thread, run_config

import drrik
from drrik.analysis import FeatureAnalyzer
from drrik.assemble import assemble
from drrik.errors import ConfigError
from drrik.evaluate import EvalTarget, evaluate
from drrik.sae import SAEConfig, build_sae

__all__ = ["one_thread"]  # the autouse fixture: one torch thread here too

LAYERS = ["0", "1", "3"]
HOOKS = tuple(f"blocks.{n}.hook_resid_post" for n in LAYERS)
CROSSCODER = {"hook": ["blocks.{layer}.hook_resid_post"], "layers": LAYERS}


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu", "batchtopk"])
def test_per_hook_scales_fold_exactly(architecture: str) -> None:
    """Scales that differ per hook cannot shrink the features by one number: the fold keeps
    them and moves the scales into encoder rows and decoder columns, exactly."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=12, d_sae=32, k=4))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.eval()
    scale = torch.tensor([0.5] * 4 + [2.0] * 4 + [7.0] * 4)
    x = torch.randn(64, 12) * 3
    with torch.no_grad():
        feats, expected = sae.encode(x * scale), sae(x * scale) / scale
        sae.fold_activation_scale(scale, scale)
        torch.testing.assert_close(sae.encode(x), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_crosscoder_trains_saves_evaluates_and_analyses(
    tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    cfg = run_config(
        tmp_path / "run", tiny_model_dir, model=CROSSCODER, sae={"dictionary": "crosscoder"}
    )
    (spec,) = cfg.dictionaries(tiny_model.cfg.n_layers)
    assert (spec.name, spec.reads, spec.writes) == ("crosscoder", HOOKS, HOOKS)
    run, metrics = fit(cfg, tiny_model, docs)
    learner = run.learners[0]
    assert learner.sae.d_in == 3 * 64 and learner.sae.cfg.hook_widths == [64, 64, 64]
    per_hook = learner.scale.reshape(3, 64)  # type: ignore[union-attr]
    assert (per_hook == per_hook[:, :1]).all() and len(set(per_hook[:, 0].tolist())) == 3

    loaded, tokens = assert_saved_as_trained(learner, Path(cfg.out) / "final", tiny_model)

    final = metrics[learner.name]
    assert final["explained_variance"] > 0.2 and final["l0"] == pytest.approx(8)
    results = FeatureAnalyzer(tiny_model, loaded, HOOKS).run([tokens])
    assert results.meta["hooks"] == list(HOOKS) and results.density.sum() > 0


def assert_saved_as_trained(learner: Any, saved: Path, model: Any) -> tuple[Any, torch.Tensor]:
    """The saved dictionary names its hooks and maps raw activations of them as the trained
    one does through its scales; returns it and the random tokens it was checked on."""
    reads, writes = learner.spec.reads, learner.spec.writes
    meta = json.loads((saved / "cfg.json").read_text())["metadata"]
    assert (meta["hook_names"], meta["hook_names_out"]) == (list(reads), list(writes))
    loaded = drrik.load_sae(saved)
    tokens = torch.randint(1, 1000, (2, 16))
    _, cache = model.run_with_cache(tokens, names_filter=list(reads))
    x = torch.cat([cache[h].reshape(32, 64) for h in reads], dim=-1)
    learner.sae.eval()
    with torch.no_grad():
        expected = learner.eval_target().reconstruct(x)[1]
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
    return loaded, tokens


def test_in_place_evaluation_replaces_every_hook_from_clean_inputs(tiny_model: Any) -> None:
    """A crosscoder is acausal: every hook's reconstruction comes from the clean pass's
    activations of all of them, and all are replaced in one pass. Checked against the same
    computation written out by hand."""
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=192, d_sae=64, k=4)).eval()
    target = EvalTarget("cc", HOOKS[0], sae, 0.5, reads=HOOKS, writes=HOOKS)
    tokens = torch.randint(1, 1000, (2, 16))
    keep = torch.ones_like(tokens, dtype=torch.bool)
    metrics, _ = evaluate(tiny_model, [target], [tokens], torch.tensor([], dtype=torch.long))

    _, cache = tiny_model.run_with_cache(tokens, names_filter=list(HOOKS))
    x = torch.cat([cache[h][keep] for h in HOOKS], dim=-1)
    _, out = target.reconstruct(x)
    parts = out.split(64, dim=-1)

    def put(i: int) -> Any:
        return lambda act, hook: parts[i].reshape(act.shape).to(act.dtype)

    with torch.no_grad():
        logits = tiny_model.run_with_hooks(
            tokens, fwd_hooks=[(h, put(i)) for i, h in enumerate(HOOKS)]
        )
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert metrics["cc"]["ce_loss_with_sae"] == pytest.approx(float(ce), rel=1e-5)
    y = torch.cat([cache[h][keep] for h in HOOKS], dim=-1)
    fvu = float((y - out).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics["cc"]["fvu"] == pytest.approx(fvu, rel=1e-4)


@pytest.mark.parametrize(
    ("model", "sae", "field"),
    [
        ({"hook": ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_post"]}, {}, "hook"),
        ({"hook": ["blocks.1.hook_resid_post"]}, {}, "hook"),
        ({**CROSSCODER, "target_hook": ["blocks.{layer}.hook_mlp_out"]}, {}, "target_hook"),
        (CROSSCODER, {"normalize_decoder": False}, "normalize_decoder"),
    ],
)
def test_bad_crosscoders_are_refused_before_the_model_loads(
    model: dict[str, Any],
    sae: dict[str, Any],
    field: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sections = {"model": model, "sae": {"dictionary": "crosscoder", **sae}}
    assert_refused_before_load(sections, field, tiny_model_dir, tmp_path, monkeypatch)


def assert_refused_before_load(
    sections: dict[str, dict[str, Any]],
    field: str,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of ``sections`` fails in one line naming ``field``, before the model loads and
    before anything is written."""

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the check")

    monkeypatch.setattr("drrik.assemble.load_model", no_load)
    with pytest.raises(ConfigError, match=rf"^{field}=") as caught:
        assemble(run_config(tmp_path / "run", model_dir, **sections), verbose=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()
