"""Cross-layer transcoders in a run (issue 15): built from --dictionary clt over --layers,
trained, evaluated in place (every covered MLP output replaced in one causal pass), saved,
analysed and exported for circuit-tracer; bad layer sets refused before the model loads.

The unit tests of the dictionary itself are in test_clt.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from datasets import Dataset
from test_crosscoder import assert_refused_before_load, assert_saved_as_trained
from test_trainer import fit, one_thread, run_config

from drrik.analysis import FeatureAnalyzer
from drrik.evaluate import EvalTarget, evaluate
from drrik.export_circuit_tracer import export_transcoder_set
from drrik.sae import SAEConfig, build_sae

__all__ = ["one_thread"]  # the autouse fixture: one torch thread here too

IN, OUT = "blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out"
CLT = {"hook": [IN], "target_hook": [OUT], "layers": ["all"]}
N_LAYERS = 4
READS = tuple(IN.format(layer=n) for n in range(N_LAYERS))
WRITES = tuple(OUT.format(layer=n) for n in range(N_LAYERS))


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_clt_trains_saves_evaluates_and_exports(
    architecture: str, tiny_model: Any, tiny_model_dir: Path, docs: Dataset, tmp_path: Path
) -> None:
    sae: dict[str, Any] = {"dictionary": "clt", "architecture": architecture, "k": 4}
    if architecture == "jumprelu":
        sae |= {"k": None, "target_l0": 4}
    cfg = run_config(tmp_path / "run", tiny_model_dir, model=CLT, sae=sae)
    (spec,) = cfg.dictionaries(N_LAYERS)
    assert (spec.name, spec.reads, spec.writes) == ("clt", READS, WRITES)
    run, metrics = fit(cfg, tiny_model, docs)
    learner = run.learners[0]
    assert learner.sae.d_sae == 2 * 64 * N_LAYERS and not learner.sae.cfg.apply_b_dec_to_input
    scales = learner.target_scale.reshape(N_LAYERS, 64)  # type: ignore[union-attr]
    assert len(set(scales[:, 0].tolist())) == N_LAYERS  # each layer its own

    final = metrics[learner.name]
    assert final["explained_variance"] > 0.1
    if architecture == "topk":  # k per layer: the token's L0 is k times the layers
        assert final["l0"] == pytest.approx(4 * N_LAYERS)
    else:  # target_l0 is per layer too: the controller steers the token's L0 to 4 x layers
        assert learner.controller is not None
        assert learner.controller.log_target == pytest.approx(math.log(4 * N_LAYERS))
    saved = Path(cfg.out) / "final"
    loaded, tokens = assert_saved_as_trained(learner, saved, tiny_model)
    meta = json.loads((saved / "cfg.json").read_text())["metadata"]
    results = FeatureAnalyzer(tiny_model, loaded, READS).run([tokens])
    assert results.d_sae == learner.sae.d_sae and results.density.sum() > 0
    if architecture == "topk":  # circuit-tracer takes it in its JumpReLU form
        assert len(meta["jumprelu_form"]["threshold"]) == N_LAYERS
    out = export_transcoder_set(saved, tmp_path / "ct", n_layers=N_LAYERS)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"
    assert sorted(p.name for p in out.glob("W_dec_*.safetensors")) == [
        f"W_dec_{n}.safetensors" for n in range(N_LAYERS)
    ]


def test_in_place_evaluation_is_causal_and_replaces_every_layer(tiny_model: Any) -> None:
    """Each MLP output is replaced as the pass reaches it, from the CLT's features of that
    layer and the earlier ones, read from the inputs of this same (replaced) pass; checked
    against the whole-CLT computation with later inputs zeroed, written out by hand."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        dictionary="clt", d_in=64 * N_LAYERS, d_sae=32 * N_LAYERS, k=4, hook_widths=[64] * 4
    )
    sae = build_sae(cfg).eval()
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    target = EvalTarget("clt", READS[0], sae, 3.0, WRITES[0], 0.5, READS, WRITES)
    tokens = torch.randint(1, 1000, (2, 16))
    metrics, _ = evaluate(tiny_model, [target], [tokens], torch.tensor([], dtype=torch.long))

    inputs: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Any:
        return lambda act, hook: inputs.__setitem__(layer, act.reshape(32, 64))

    def put(layer: int) -> Any:
        def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            x = torch.cat([inputs.get(n, torch.zeros(32, 64)) for n in range(N_LAYERS)], -1)
            out = sae(x * 3.0) / 0.5
            return out[:, layer * 64 : (layer + 1) * 64].reshape(act.shape)

        return hook_fn

    hooks = [(h, grab(n)) for n, h in enumerate(READS)] + [
        (h, put(n)) for n, h in enumerate(WRITES)
    ]
    with torch.no_grad():
        logits = tiny_model.run_with_hooks(tokens, fwd_hooks=hooks)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert metrics["clt"]["ce_loss_with_sae"] == pytest.approx(float(ce), rel=1e-5)
    assert metrics["clt"]["l0"] == pytest.approx(4 * N_LAYERS)


def test_a_sweep_gives_one_clt_per_setting(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = run_config(
        tmp_path / "run",
        tiny_model_dir,
        model=CLT,
        sae={"dictionary": "clt"},
        trainer={"sweep": ["k=4,8"]},
    )
    specs = cfg.dictionaries(N_LAYERS)
    assert [(s.name, s.reads, s.sae.k) for s in specs] == [("k=4", READS, 4), ("k=8", READS, 8)]


ONE_LAYER = {"hook": ["blocks.1.mlp.hook_in"], "target_hook": ["blocks.1.hook_mlp_out"]}
CLT_SAE = {"dictionary": "clt"}


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"model": {**CLT, "layers": ["2", "1"]}, "sae": CLT_SAE}, "layers"),
        ({"model": {**CLT, "target_hook": []}, "sae": CLT_SAE}, "target_hook"),
        (
            {"model": {**CLT, "target_hook": ["blocks.2.hook_mlp_out"]}, "sae": CLT_SAE},
            "target_hook",
        ),
        ({"model": ONE_LAYER, "sae": CLT_SAE}, "target_hook"),
        ({"model": CLT, "sae": {**CLT_SAE, "architecture": "gated"}}, "architecture"),
        (
            {"model": CLT, "sae": CLT_SAE, "trainer": {"resample_every_tokens": 512}},
            "resample_every_tokens",
        ),
    ],
)
def test_bad_clts_are_refused_before_the_model_loads(
    sections: dict[str, dict[str, Any]],
    field: str,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert_refused_before_load(sections, field, tiny_model_dir, tmp_path, monkeypatch)
