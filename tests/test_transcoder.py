"""Transcoders (issue 13): a dictionary that reads one hook and reconstructs another, with an
optional linear skip connection, folded, saved and evaluated like an SAE.

The unit tests use hand-made dictionaries; the end-to-end ones train on the tiny model an MLP
transcoder ``blocks.1.mlp.hook_in -> blocks.1.hook_mlp_out`` (a second or two per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from test_sae import make
from test_trainer import BATCH, fit, one_thread, run_config

import drrik
from drrik.config import TrainerConfig
from drrik.evaluate import SPLICED_TOGETHER, EvalTarget
from drrik.learner import Learner
from drrik.run_dir import RunDir
from drrik.sae import SAE, SAEConfig, build_sae, resample_dead_features
from drrik.sae.spec import DictionarySpec
from drrik.saved import SavedSAE, evaluate_saved
from drrik.topk_jumprelu import HeldOut, jumprelu_form

__all__ = ["one_thread"]  # the autouse fixture: one torch thread here too

IN, OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
D_IN, D_OUT = 6, 4
TRAINED = ["relu", "topk", "batchtopk", "jumprelu"]


def transcoder(architecture: str, skip: bool = True, **overrides: Any) -> SAE:
    """A small transcoder with every parameter randomized (``W_skip`` too)."""
    return make(
        architecture,
        d_out=D_OUT,
        skip_connection=skip,
        apply_b_dec_to_input=False,
        **overrides,
    )


def pair(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and a mostly linear target of another width."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    mix = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(0))
    return x, x @ mix.T + 0.1 * torch.randn(n, D_OUT, generator=g).relu()


# ---- the dictionary ------------------------------------------------------------------------


def test_shapes_follow_the_target_width() -> None:
    sae = transcoder("relu")
    assert sae.W_enc.shape == (D_IN, 10) and sae.W_dec.shape == (10, D_OUT)
    assert sae.b_dec.shape == (D_OUT,) and sae.W_skip is not None
    assert sae.W_skip.shape == (D_OUT, D_IN)
    assert (
        build_sae(SAEConfig(architecture="relu", d_in=D_IN, d_sae=10, skip_connection=True))
        .W_skip.abs()
        .sum()
        == 0
    )
    assert sae(pair(3)[0]).shape == (3, D_OUT)


@pytest.mark.parametrize("architecture", [*TRAINED, "gated"])
def test_fold_maps_raw_input_to_raw_target(architecture: str) -> None:
    sae = transcoder(architecture, normalize_decoder=False)
    x, y = pair(32)
    if architecture == "batchtopk":
        sae.fit_forward(x, 0.0, None, y)  # learn a non-zero threshold
    sae.eval()
    scale, target_scale = 3.7, 0.6
    with torch.no_grad():
        expected = sae(x * scale) / target_scale
        sae.fold_activation_scale(scale, target_scale)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_the_skip_connection_trains_and_helps() -> None:
    x, y = pair(256)
    losses = {}
    for skip in (False, True):
        sae = transcoder("relu", skip=skip, seed=3)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
        for step in range(150):
            out = sae.fit_forward(x, 0.1, None, y)
            out.loss.backward()
            if skip and step == 0:
                assert sae.W_skip is not None and sae.W_skip.grad is not None
                assert sae.W_skip.grad.abs().sum() > 0
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # the whole output, skip included, as inference gives it
            torch.testing.assert_close(sae.fit_forward(x, 0.1, None, y).x_hat, sae(x))
        losses[skip] = float(out.losses["mse_loss"].detach())
    assert losses[True] < 0.7 * losses[False]


@pytest.mark.parametrize(
    ("architecture", "skip", "saelens"),
    [
        ("relu", False, "transcoder"),
        ("relu", True, "skip_transcoder"),
        ("jumprelu", False, "jumprelu_transcoder"),
        ("jumprelu", True, "jumprelu_skip_transcoder"),
    ],
)
def test_saved_transcoder_reloads(tmp_path: Path, architecture: str, skip: bool, saelens: str):
    sae = transcoder(architecture, skip=skip).eval()
    sae.save(tmp_path / "tc", metadata={"hook_name": IN, "hook_name_out": OUT})
    loaded = drrik.load_sae(tmp_path / "tc")
    x, _ = pair(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == saelens and cfg["apply_b_dec_to_input"] is False
    assert (cfg["d_in"], cfg["d_out"]) == (D_IN, D_OUT)
    assert cfg["metadata"]["hook_name_out"] == OUT
    weights = load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))
    assert ("W_skip" in weights) == skip and weights["b_dec"].shape == (D_OUT,)

    del cfg["drrik"]  # as SAELens writes it
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        torch.testing.assert_close(drrik.load_sae(tmp_path / "tc")(x), sae(x))


def test_topk_transcoder_saves_as_jumprelu_and_reloads_as_topk(tmp_path: Path) -> None:
    sae = transcoder("topk", normalize_decoder=False).eval()  # decoder norms get folded
    x, y = pair(64)
    theta, report = jumprelu_form(sae, HeldOut(x, y))  # type: ignore[arg-type]
    # The rule: k features per token on average over the held-out tokens.
    assert report["l0_jumprelu"] == pytest.approx(3) and report["l0_topk"] <= 3
    with torch.no_grad():
        pre = sae.scaled_pre_acts(x)
        jumprelu = sae.decode(pre * (pre > theta)) + sae.skip(x)
        variance = (y - y.mean(0)).pow(2).sum()
        for name, out in (("topk", sae(x)), ("jumprelu", jumprelu)):
            fvu = float((out - y).pow(2).sum() / variance)
            assert report[f"fvu_{name}"] == pytest.approx(fvu, rel=1e-5)
    assert report["fvu_difference"] == report["fvu_jumprelu"] - report["fvu_topk"]

    meta = {"hook_name": IN, "hook_name_out": OUT, "jumprelu_form": report}
    sae.save(tmp_path / "tc", metadata=meta, threshold=theta)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and "k" not in cfg
    assert cfg["metadata"]["jumprelu_form"]["threshold"] == pytest.approx(float(theta))
    threshold = load_file(str(tmp_path / "tc" / "sae_weights.safetensors"))["threshold"]
    assert threshold.shape == (10,) and bool((threshold == theta).all())
    with torch.no_grad():
        torch.testing.assert_close(drrik.load_sae(tmp_path / "tc")(x), sae(x))  # drrik: TopK
        del cfg["drrik"]  # what SAELens and circuit-tracer read: the JumpReLU
        (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
        loaded = drrik.load_sae(tmp_path / "tc")
        assert loaded.cfg.architecture == "jumprelu"
        torch.testing.assert_close(loaded(x), jumprelu)


def test_a_plain_topk_sae_keeps_the_topk_layout(tmp_path: Path) -> None:
    make("topk").save(tmp_path / "sae", metadata={"hook_name": IN})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"]) == ("topk", 3)


# ---- training on the tiny model ------------------------------------------------------------


@pytest.mark.parametrize("architecture", TRAINED)
def test_transcoder_trains_saves_and_evaluates(
    architecture: str,
    tiny_model: Any,
    tiny_model_dir: Path,
    docs: Dataset,
    tmp_path: Path,
) -> None:
    sae: dict[str, Any] = {"architecture": architecture, "skip_connection": True}
    if architecture in ("relu", "jumprelu"):
        sae |= {"k": None, "l1_coefficient": 0.01}
    cfg = run_config(
        tmp_path / "run", tiny_model_dir, model={"hook": [IN], "target_hook": [OUT]}, sae=sae
    )
    run, metrics = fit(cfg, tiny_model, docs)
    learner = run.learners[0]
    assert learner.sae.W_dec.shape[1] == learner.sae.W_skip.shape[0]  # type: ignore[union-attr]
    assert not learner.sae.cfg.apply_b_dec_to_input and learner.target_scale != learner.scale

    rows = RunDir(cfg.out).read_metrics()
    assert rows[-1]["explained_variance"] > rows[0]["explained_variance"] + 0.1  # FVU falls

    saved = Path(cfg.out) / "final"
    cfg_json = json.loads((saved / "cfg.json").read_text())
    meta = cfg_json["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"]) == (IN, OUT)
    if architecture == "topk":  # saved for SAELens as a JumpReLU, measured on held-out tokens
        assert cfg_json["architecture"] == "jumprelu_skip_transcoder"
        form = meta["jumprelu_form"]
        assert form["threshold"] > 0 and form["held_out_tokens"] == final_tokens(metrics)
        assert form["fvu_topk"] == pytest.approx(metrics[run.learners[0].name]["fvu"], rel=1e-4)
    else:
        assert "jumprelu_form" not in meta
    tokens = torch.randint(1, 1000, (2, 16))
    _, cache = tiny_model.run_with_cache(tokens, names_filter=[IN, OUT])
    x = cache[IN].reshape(-1, cache[IN].shape[-1])
    learner.sae.eval()
    expected = learner.eval_target().reconstruct(x)[1]
    with torch.no_grad():
        torch.testing.assert_close(drrik.load_sae(saved)(x), expected, rtol=1e-4, atol=1e-4)

    # Held-out eval splices at the target hook: its zero-ablation is the target's.
    final = metrics[learner.name]
    # (The random tiny model barely uses its MLP: zero-ablating it leaves CE as it is, so
    # ce_loss_recovered is reported but carries no signal here.)
    assert {"ce_loss_recovered", "kl_div_with_sae"} <= set(final)
    assert final["explained_variance"] > 0.1 and final["ce_loss_with_sae"] != final["ce_loss_clean"]
    assert run.evaluator is not None
    at_out, _ = run.evaluator(
        [EvalTarget("out", OUT, build_sae(SAEConfig(architecture="relu", d_in=64, d_sae=8)))]
    )
    assert final["ce_loss_zero_ablated"] == pytest.approx(at_out["out"]["ce_loss_zero_ablated"])


def final_tokens(metrics: dict[str, dict[str, float]]) -> int:
    """The tokens the held-out evaluation read (the one dictionary's)."""
    return int(next(iter(metrics.values()))["eval_tokens"])


def test_every_layer_from_one_stream(
    tiny_model: Any, tiny_model_dir: Path, dataset_file: Path, tmp_path: Path
) -> None:
    model = {
        "hook": ["blocks.{layer}.mlp.hook_in"],
        "target_hook": ["blocks.{layer}.hook_mlp_out"],
        "layers": ["all"],
    }
    cfg = run_config(
        tmp_path / "run",
        tiny_model_dir,
        model=model,
        data={"dataset": str(dataset_file)},  # a file: drrik eval reads its held-out rows too
        eval={"eval_together": True},
    )
    n_layers = tiny_model.cfg.n_layers
    specs = cfg.dictionaries(n_layers)
    assert [s.name for s in specs] == [f"blocks.{n}.mlp.hook_in" for n in range(n_layers)]
    assert [s.target_hook for s in specs] == [f"blocks.{n}.hook_mlp_out" for n in range(n_layers)]
    run, metrics = fit(cfg, tiny_model, None)
    assert set(metrics) == {s.name for s in specs} | {SPLICED_TOGETHER}
    for spec in specs:
        meta = json.loads((Path(cfg.out) / "final" / spec.name / "cfg.json").read_text())
        assert meta["metadata"]["hook_name_out"] == spec.target_hook
    assert run.progress.tokens == cfg.trainer.training_tokens // BATCH * BATCH

    # Every transcoder spliced in at once: its own file, the per-dictionary metric names.
    together = metrics[SPLICED_TOGETHER]
    saved = json.loads((Path(cfg.out) / "final" / f"{SPLICED_TOGETHER}.json").read_text())
    assert saved == together and together["kl_div_with_sae"] > 0
    assert set(together) == {
        "ce_loss_clean",
        "ce_loss_with_sae",
        "ce_loss_zero_ablated",
        "ce_loss_recovered",
        "kl_div_with_sae",
    }
    assert run.evaluator is not None
    one = run.learners[2]
    alone = run.evaluator.together([one.eval_target()])  # one dictionary: as evaluated alone
    for key, value in alone.items():
        assert value == pytest.approx(metrics[one.name][key], rel=1e-4, abs=1e-6), key
    assert together["ce_loss_zero_ablated"] != alone["ce_loss_zero_ablated"]

    # drrik eval of the run: every saved transcoder, and spliced_together as it was trained.
    again = evaluate_saved(cfg.out, model=tiny_model, eval_contexts=cfg.eval.eval_contexts)
    assert set(again) == set(metrics)
    picked = SavedSAE.locate(Path(cfg.out) / "final" / specs[1].name)  # as --sae would pick it
    assert (picked.run_dir, picked.name) == (Path(cfg.out), specs[1].name)
    for name, values in again.items():
        for key in values.keys() - {"l1"}:  # saved with unit decoder rows: features rescaled
            assert values[key] == pytest.approx(metrics[name][key], rel=1e-4, abs=1e-6), (name, key)


def test_checkpoint_keeps_the_target_scale_and_old_ones_load() -> None:
    spec = DictionarySpec(
        "tc", (IN,), (OUT,), SAEConfig(architecture="relu", d_in=D_IN, d_out=D_OUT, d_sae=10)
    )
    learner = Learner.build(spec, TrainerConfig(), 10, torch.device("cpu"))
    learner.scale, learner.target_scale = 2.0, 5.0
    state = learner.state_dict()
    fresh = Learner.build(spec, TrainerConfig(), 10, torch.device("cpu"))
    fresh.load_state_dict(state)
    assert (fresh.scale, fresh.target_scale) == (2.0, 5.0)
    del state["target_scale"]  # a checkpoint from before transcoders: one scale
    fresh.load_state_dict(state)
    assert (fresh.scale, fresh.target_scale) == (2.0, 2.0)


def test_resampling_points_decoder_rows_at_targets() -> None:
    sae = transcoder("relu", skip=False)
    x, y = pair(64)
    dead = torch.zeros(10, dtype=torch.bool)
    dead[:3] = True
    resample_dead_features(sae, None, dead, x, y)
    rows = sae.W_dec[:3]
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))
    unit_targets = y / y.norm(dim=1, keepdim=True)
    assert (rows @ unit_targets.T).amax(dim=1).min() > 1 - 1e-5  # each row is a drawn target


def test_a_sweep_trains_plain_and_skip_transcoders_from_one_stream(
    tiny_model: Any, tiny_model_dir: Path, dataset_file: Path, tmp_path: Path
) -> None:
    cfg = run_config(
        tmp_path / "run",
        tiny_model_dir,
        model={"hook": [IN], "target_hook": [OUT]},
        data={"dataset": str(dataset_file)},
        trainer={"sweep": ["skip_connection=false,TRUE"], "training_tokens": BATCH * 4},
        eval={"eval_together": True},
    )
    plain, skip = (f"skip_connection={v}" for v in ("false", "TRUE"))
    assert [s.sae.skip_connection for s in cfg.dictionaries()] == [False, True]
    run, metrics = fit(cfg, tiny_model, None)
    assert len(run.stores) == 1 and run.progress.tokens == BATCH * 4  # every step fed both
    final = Path(cfg.out) / "final"
    assert "W_skip" not in load_file(str(final / plain / "sae_weights.safetensors"))
    assert "W_skip" in load_file(str(final / skip / "sae_weights.safetensors"))
    # Spliced in together per sweep setting: the two write the same hook, so never at once.
    together = [f"{SPLICED_TOGETHER}__{name}" for name in (plain, skip)]
    assert set(metrics) == {plain, skip, *together}
    for name in together:
        saved = json.loads((final / f"{name}.json").read_text())
        assert saved == metrics[name] and saved["kl_div_with_sae"] > 0
    again = evaluate_saved(cfg.out, model=tiny_model, eval_contexts=cfg.eval.eval_contexts)
    for name in together:
        assert again[name] == pytest.approx(metrics[name], rel=1e-4, abs=1e-6)
