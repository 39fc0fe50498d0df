"""Export to circuit-tracer: the per-layer files compute what the saved transcoders compute.

Saved transcoders are written by hand in SAELens's layout with random tensors; the exported
layer files are read back by a reader written here from circuit-tracer's layout
(pre = x @ W_encᵀ + b_enc; JumpReLU pre·(pre > θ), else ReLU; @ W_dec + b_dec; + x @ W_skipᵀ)
and compared with the SAELens-layout forward (relu(pre)·(pre > θ)). No model, no network.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from drrik.cli import main
from drrik.errors import ConfigError
from drrik.export_circuit_tracer import TRANSCODER_ARCHITECTURES, export_transcoder_set
from drrik.sae import SAEConfig, build_sae
from drrik.sae.topk import TopKSAE
from drrik.topk_jumprelu import HeldOut, jumprelu_form

D_MODEL, D_SAE, N_LAYERS = 12, 20, 4
MODEL = "local-model"


def save_transcoder(
    path: Path,
    layer: int,
    architecture: str = "jumprelu_skip_transcoder",
    d_sae: int = D_SAE,
    hooks: tuple[str, str] = ("mlp.hook_in", "hook_mlp_out"),
    model_name: str = MODEL,
    seed: int = 0,
) -> Path:
    """A transcoder directory as drrik saves one, random tensors, thresholds of both signs."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(D_MODEL, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, D_MODEL, generator=gen),
        "b_dec": torch.randn(D_MODEL, generator=gen),
    }
    if architecture.startswith("jumprelu"):
        tensors["threshold"] = torch.randn(d_sae, generator=gen)
    if "skip" in architecture:
        tensors["W_skip"] = torch.randn(D_MODEL, D_MODEL, generator=gen) / D_MODEL
    cfg = {
        "architecture": architecture,
        "d_in": D_MODEL,
        "d_sae": d_sae,
        "d_out": D_MODEL,
        "dtype": "float32",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "model_name": model_name,
            "hook_name": f"blocks.{layer}.{hooks[0]}",
            "hook_name_out": f"blocks.{layer}.{hooks[1]}",
            "context_size": 32,
            "prepend_bos": True,
        },
    }
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def saelens_forward(directory: Path, x: Tensor) -> Tensor:
    """The saved transcoder's output as SAELens computes it."""
    t = load_file(str(directory / "sae_weights.safetensors"))
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = pre.relu() * (pre > t["threshold"]) if "threshold" in t else pre.relu()
    out = acts @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


def circuit_tracer_forward(directory: Path, layer: int, x: Tensor) -> Tensor:
    """Layer ``layer``'s output as circuit-tracer computes it from the exported file."""
    t = load_file(str(directory / f"layer_{layer}.safetensors"))
    pre = x @ t["W_enc"].T + t["b_enc"]
    threshold = t.get("activation_function.threshold")
    acts = pre * (pre > threshold) if threshold is not None else pre.relu()
    out = acts @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


@pytest.fixture
def x() -> Tensor:
    return torch.randn(256, D_MODEL, generator=torch.Generator().manual_seed(1)) * 2


@pytest.mark.parametrize("architecture", TRANSCODER_ARCHITECTURES)
def test_exported_layers_compute_the_saved_transcoders(
    tmp_path: Path, x: Tensor, architecture: str
) -> None:
    saved = {
        layer: save_transcoder(tmp_path / f"tc{layer}", layer, architecture, seed=layer)
        for layer in (1, 3)
    }
    out = export_transcoder_set(list(saved.values()), tmp_path / "ct", n_layers=N_LAYERS)
    assert sorted(p.name for p in out.glob("layer_*")) == [
        f"layer_{i}.safetensors" for i in range(N_LAYERS)
    ]
    for layer, directory in saved.items():
        expected = saelens_forward(directory, x)
        torch.testing.assert_close(circuit_tracer_forward(out, layer, x), expected)
    for layer in (0, 2):  # padding: no output at all
        assert circuit_tracer_forward(out, layer, x).abs().max() == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "model_name": MODEL,
    }


def test_negative_thresholds_are_written_as_zero(tmp_path: Path) -> None:
    saved = save_transcoder(tmp_path / "tc", 0, "jumprelu_transcoder")
    threshold = load_file(str(saved / "sae_weights.safetensors"))["threshold"]
    assert (threshold < 0).any() and (threshold > 0).any()
    out = export_transcoder_set([saved], tmp_path / "ct", n_layers=1)
    written = load_file(str(out / "layer_0.safetensors"))["activation_function.threshold"]
    torch.testing.assert_close(written, threshold.clamp_min(0), rtol=0, atol=0)


def test_a_mixed_set_gets_zero_thresholds_and_skips_where_a_layer_had_none(
    tmp_path: Path, x: Tensor
) -> None:
    """circuit-tracer loads one kind of transcoder for every layer: a ReLU layer gets θ = 0
    (pre·(pre > 0) is ReLU) and a layer without skip a zero W_skip, both exact."""
    relu = save_transcoder(tmp_path / "relu", 0, "transcoder")
    skip = save_transcoder(tmp_path / "skip", 1, "jumprelu_skip_transcoder", seed=1)
    out = export_transcoder_set([relu, skip], tmp_path / "ct", n_layers=3)
    for layer in range(3):
        assert set(load_file(str(out / f"layer_{layer}.safetensors"))) == {
            "W_enc",
            "b_enc",
            "W_dec",
            "b_dec",
            "activation_function.threshold",
            "W_skip",
        }
    torch.testing.assert_close(circuit_tracer_forward(out, 0, x), saelens_forward(relu, x))
    torch.testing.assert_close(circuit_tracer_forward(out, 1, x), saelens_forward(skip, x))


def test_a_run_directory_and_the_models_layer_count(tmp_path: Path) -> None:
    """A run's transcoders are exported, an SAE trained beside them is left out, and the
    layer count comes from the model's local directory."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    final = tmp_path / "run" / "final"
    for layer in (0, 2):
        save_transcoder(final / f"layer{layer}", layer, model_name=str(model))
    save_transcoder(final / "sae", 1, "jumprelu")
    out = export_transcoder_set(tmp_path / "run", tmp_path / "ct")
    assert len(list(out.glob("layer_*.safetensors"))) == 5
    assert yaml.safe_load((out / "config.yaml").read_text())["model_name"] == str(model)
    assert set(json.loads((out / "drrik_export.json").read_text())["layers"]) == {"0", "2"}
    for name in ("layer0", "layer2"):
        (final / name / "cfg.json").unlink()
    with pytest.raises(ConfigError, match=r"it saved no transcoder \(only sae\)"):
        export_transcoder_set(final, tmp_path / "ct")


def test_export_replaces_an_existing_set(tmp_path: Path) -> None:
    saved = save_transcoder(tmp_path / "tc", 0)
    out = tmp_path / "ct"
    export_transcoder_set([saved], out, n_layers=3)
    export_transcoder_set([saved], out, n_layers=2)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "drrik_export.json",
        "layer_0.safetensors",
        "layer_1.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


EDITS = {
    "across blocks": ("hook_name_out", "blocks.1.hook_mlp_out"),
    "outside blocks": ("hook_name_out", "ln_final.hook_normalized"),
    "b_dec subtracted": ("apply_b_dec_to_input", True),
    "scaled input": ("normalize_activations", "expected_average_only_in"),
}
"""cfg.json edits that make a saved transcoder unexportable."""


def test_a_topk_transcoder_exports_as_its_jumprelu_form(tmp_path: Path, x: Tensor) -> None:
    # A transcoder as drrik trains one: b_dec belongs to the output, not subtracted from x.
    cfg = SAEConfig("topk", D_MODEL, skip_connection=True, d_sae=D_SAE, k=3)
    sae = build_sae(replace(cfg, apply_b_dec_to_input=False))
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.3 * torch.randn_like(param))
    assert isinstance(sae, TopKSAE)
    theta, report = jumprelu_form(sae.eval(), HeldOut(x, x.roll(1, dims=1)))
    meta = {"model_name": MODEL, "hook_name": "blocks.1.mlp.hook_in"}
    meta["hook_name_out"] = "blocks.1.hook_mlp_out"
    sae.save(tmp_path / "tc", metadata={**meta, "jumprelu_form": report}, threshold=theta)
    out = export_transcoder_set([tmp_path / "tc"], tmp_path / "ct", n_layers=2)
    with torch.no_grad():
        pre = sae.scaled_pre_acts(x)
        expected = sae.decode(pre * (pre > theta)) + sae.skip(x)  # type: ignore[operator]
    torch.testing.assert_close(circuit_tracer_forward(out, 1, x), expected)


def _bad(tmp_path: Path, case: str) -> tuple[list[Path], int | None]:
    """Saved directories and a layer count that the export must refuse."""
    first = save_transcoder(tmp_path / "a", 0)
    other = {
        "width": {"d_sae": D_SAE * 2},
        "hooks": {"hooks": ("hook_resid_mid", "hook_mlp_out")},
        "model": {"model_name": "another-model"},
        "same layer": {},
    }
    if case in other:
        return [
            first,
            save_transcoder(tmp_path / "b", 1 - (case == "same layer"), **other[case]),
        ], 4
    if case == "not a transcoder":
        return [save_transcoder(tmp_path / "b", 0, "jumprelu")], 4
    if case in EDITS:
        cfg = json.loads((first / "cfg.json").read_text())
        key, value = EDITS[case]
        (cfg["metadata"] if key.startswith("hook") else cfg)[key] = value
        (first / "cfg.json").write_text(json.dumps(cfg))
        return [first], 4
    if case == "too few layers":
        return [save_transcoder(tmp_path / "b", 3)], 3
    return [first], None  # "no layer count": the model is no local directory


BAD = {
    "width": "d_sae=40: widths differ",
    "hooks": "hook_name=('hook_resid_mid', 'hook_mlp_out'): hook kinds differ",
    "model": "model_name='another-model': models differ",
    "same layer": "layer=[0]: give one transcoder per layer",
    "not a transcoder": "architecture='jumprelu':",
    "across blocks": "hook_name_out='blocks.1.hook_mlp_out': a per-layer transcoder writes",
    "outside blocks": "hook_name_out='ln_final.hook_normalized': circuit-tracer needs",
    "b_dec subtracted": "apply_b_dec_to_input=True: circuit-tracer's transcoders read raw",
    "scaled input": "normalize_activations='expected_average_only_in': circuit-tracer's",
    "too few layers": "n_layers=3: a transcoder reads layer 3; use > 3",
    "no layer count": "n_layers=None: model 'local-model' is no local directory",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(tmp_path: Path, case: str) -> None:
    dirs, n_layers = _bad(tmp_path, case)
    with pytest.raises(ConfigError) as exc:
        export_transcoder_set(dirs, tmp_path / "ct", n_layers=n_layers)
    assert str(exc.value).startswith(BAD[case]) and "\n" not in str(exc.value)
    assert not (tmp_path / "ct").exists()


def test_drrik_export_command(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    for layer in (0, 1):
        save_transcoder(tmp_path / "run" / "final" / f"l{layer}", layer, seed=layer)
    out = tmp_path / "ct"
    argv = ["export", str(tmp_path / "run"), "--to", "circuit-tracer", "--out", str(out)]
    assert main([*argv, "--n-layers", "3"]) == 0
    assert str(out) in capfd.readouterr().out
    assert len(list(out.glob("layer_*.safetensors"))) == 3
    assert main(argv[:-2]) == 2  # no --out
    assert main(argv) == 2  # no layer count: the model is no local directory
    errors = capfd.readouterr().err.splitlines()
    assert errors == [
        "drrik export: error: out=None: give --out DIR",
        "drrik export: error: n_layers=None: model 'local-model' is no local directory; pass "
        "the model's layer count",
    ]
