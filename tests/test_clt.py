"""Cross-layer transcoders: layout, causality, the sparse TopK path, training, folding, saving,
and the circuit-tracer export read back through a reference implementation of its layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from drrik.errors import ConfigError
from drrik.export_circuit_tracer import export_transcoder_set
from drrik.sae import SAEConfig, build_sae, load_sae, save_sae
from drrik.sae.clt import CrossLayerTranscoder, decoder_memory

N_LAYERS, D, FEATURES, K = 3, 8, 64, 3
ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def clt_config(architecture: str = "topk", **kw: object) -> SAEConfig:
    args: dict = {
        "architecture": architecture,
        "dictionary": "clt",
        "hook_widths": [D] * N_LAYERS,
        "d_in": D * N_LAYERS,
        "d_out": D * N_LAYERS,
        "d_sae": FEATURES * N_LAYERS,
        "apply_b_dec_to_input": False,
        "k": K if architecture in ("topk", "batchtopk") else None,
    }
    return SAEConfig(**{**args, **kw})


def make_clt(architecture: str = "topk", seed: int = 0, **kw: object) -> CrossLayerTranscoder:
    """A CLT with random biases and thresholds, so every parameter matters."""
    torch.manual_seed(seed)
    clt = build_sae(clt_config(architecture, **kw))
    assert isinstance(clt, CrossLayerTranscoder)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_()
        for W in clt.W_dec:
            W.mul_(5)
        if architecture == "jumprelu":
            clt.log_threshold.copy_(torch.rand(clt.d_sae).mul(0.3).add(0.05).log())
        if architecture == "batchtopk":
            clt.threshold.copy_(torch.tensor([0.1, 0.3, 0.2]))
            clt.threshold_updates.fill_(4)
    return clt.eval()


def inputs(n: int = 16, seed: int = 1) -> Tensor:
    return torch.randn(n, N_LAYERS * D, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_no_lower_triangle() -> None:
    clt = make_clt()
    assert (clt.n_layers, clt.features_per_layer, clt.d_in, clt.d_out) == (3, 64, 24, 24)
    assert clt.W_enc.shape == (N_LAYERS, D, FEATURES)
    assert clt.b_enc.shape == (N_LAYERS * FEATURES,) and clt.b_dec.shape == (N_LAYERS * D,)
    assert [tuple(W.shape) for W in clt.W_dec] == [(64, 24), (64, 16), (64, 8)]
    blocks = N_LAYERS * (N_LAYERS + 1) // 2
    total = N_LAYERS * D * FEATURES + blocks * FEATURES * D + N_LAYERS * (FEATURES + D)
    assert sum(p.numel() for p in clt.parameters()) == total
    assert "6 blocks" in decoder_memory(clt.cfg)
    x = inputs()
    assert clt.encode(x).shape == (16, 192) and clt(x).shape == (16, 24)
    assert clt.skip(x) is None and clt.decoder_norms().shape == (192,)


@pytest.mark.parametrize("architecture", ARCHS)
def test_causal(architecture: str) -> None:
    """Changing layer j's input leaves every output of layers < j unchanged, and the
    features of other layers too."""
    clt = make_clt(architecture)
    x = inputs()
    for j in range(N_LAYERS):
        changed = x.clone()
        changed[:, j * D : (j + 1) * D] = torch.randn(16, D)
        for mode in (False, True):
            clt.train(mode)
            torch.manual_seed(0)
            a, b = clt(x), clt(changed)
            assert torch.equal(a[:, : j * D], b[:, : j * D])
            assert not torch.allclose(a[:, j * D :], b[:, j * D :])
        clt.eval()
        fa, fb = clt.encode(x), clt.encode(changed)
        mask = torch.ones(clt.d_sae, dtype=torch.bool)
        mask[j * FEATURES : (j + 1) * FEATURES] = False
        assert torch.equal(fa[:, mask], fb[:, mask])


def test_topk_keeps_k_per_layer() -> None:
    clt = make_clt("topk")
    acts = clt.by_layer(clt.encode(inputs()))
    assert ((acts > 0).sum(-1) == K).all()


def test_batchtopk_keeps_k_per_layer_over_the_batch() -> None:
    clt = make_clt("batchtopk").train()
    out = clt.fit_forward(inputs(32), 0.0)
    per_layer = clt.by_layer(out.feature_acts).gt(0).sum(dim=(0, 2))
    assert per_layer.tolist() == [K * 32] * N_LAYERS
    assert clt.threshold.shape == (N_LAYERS,) and (clt.threshold > 0).all()


def _step_grads(clt: CrossLayerTranscoder, sparse: bool, dead: Tensor | None) -> tuple:
    clt.sparse_training = sparse
    clt.zero_grad()
    out = clt.fit_forward(inputs(32), 0.0, dead, inputs(32, seed=2))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in clt.named_parameters()}
    return out, grads


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_and_dense_topk_agree(with_dead: bool) -> None:
    clt = make_clt("topk").train()
    dead = torch.rand(clt.d_sae, generator=torch.Generator().manual_seed(3)) < 0.4
    dead = dead if with_dead else None
    sparse_out, sparse_grads = _step_grads(clt, True, dead)
    dense_out, dense_grads = _step_grads(clt, False, dead)
    assert type(sparse_out).__name__ == "SparseTrainOutput"
    assert type(dense_out).__name__ == "TrainOutput"
    for name in ("mse_loss", "aux_loss"):
        torch.testing.assert_close(sparse_out.losses[name], dense_out.losses[name])
    assert (dense_out.losses["aux_loss"] > 0) == with_dead
    torch.testing.assert_close(sparse_out.x_hat, dense_out.x_hat)
    torch.testing.assert_close(sparse_out.feature_acts, dense_out.feature_acts)
    torch.testing.assert_close(sparse_out.fired(), dense_out.fired())
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, msg=name)


@pytest.mark.parametrize("architecture", ARCHS)
def test_trains(architecture: str) -> None:
    torch.manual_seed(0)
    clt = build_sae(clt_config(architecture)).train()
    x = inputs(64)
    y = torch.cat([x[:, :D] * 2, x[:, :D] - x[:, D : 2 * D], x[:, 2 * D :]], dim=1)
    optimizer = torch.optim.Adam(clt.parameters(), lr=1e-2)
    dead = torch.zeros(clt.d_sae, dtype=torch.bool)
    losses = []
    for _ in range(30):
        out = clt.fit_forward(x, 1e-3, dead, y)
        assert torch.allclose(sum(out.losses.values()), out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        clt.remove_parallel_decoder_grad()
        optimizer.step()
        clt.normalize_decoder_rows()
        losses.append(out.losses["mse_loss"].item())
    assert losses[-1] < 0.7 * losses[0]


def test_normalized_rows_stay_unit() -> None:
    clt = make_clt("topk", normalize_decoder=True).train()
    clt.normalize_decoder_rows()
    clt.fit_forward(inputs(), 0.0).loss.backward()
    clt.remove_parallel_decoder_grad()
    for W in clt.W_dec:  # the gradient has no part along the (unit) rows
        assert (W.grad * W).sum(1).abs().max() < 1e-5
        W.data.add_(torch.randn_like(W))
    clt.normalize_decoder_rows()
    torch.testing.assert_close(clt.decoder_norms(), torch.ones(clt.d_sae))


@pytest.mark.parametrize("architecture", ARCHS)
def test_fold_per_layer_scales(architecture: str) -> None:
    clt = make_clt(architecture)
    folded = make_clt(architecture)
    scale = torch.tensor([0.5, 2.0, 3.0]).repeat_interleave(D)
    target = torch.tensor([4.0, 0.25, 1.5]).repeat_interleave(D)
    folded.fold_activation_scale(scale, target)
    x = inputs() * 3
    torch.testing.assert_close(folded(x), clt(x * scale) / target)
    torch.testing.assert_close(folded.encode(x), clt.encode(x * scale))
    float_folded = make_clt(architecture)
    float_folded.fold_activation_scale(2.0, 0.5)
    torch.testing.assert_close(float_folded(x), clt(x * 2.0) / 0.5)
    with pytest.raises(ValueError):
        float_folded.fold_activation_scale(scale * 0)


@pytest.mark.parametrize("architecture", ARCHS)
def test_save_load_round_trip(tmp_path: Path, architecture: str) -> None:
    clt = make_clt(architecture)
    save_sae(clt, tmp_path / "clt")
    loaded = load_sae(tmp_path / "clt")
    assert type(loaded) is type(clt)
    own, back = clt.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys()
    for name, tensor in own.items():
        assert torch.equal(tensor, back[name]), name
    x = inputs()
    assert torch.equal(loaded(x), clt(x))


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match="share one width"):
        clt_config(hook_widths=[8, 8, 4], d_in=20, d_out=20)
    with pytest.raises(ConfigError, match="per layer"):
        clt_config(k=FEATURES + 1)
    with pytest.raises(ConfigError, match="skip"):
        clt_config(skip_connection=True)
    with pytest.raises(ConfigError, match="ghost"):
        clt_config("relu", use_ghost_grads=True)
    with pytest.raises(NotImplementedError, match="resampling"):
        make_clt().feature_params()


# ---- circuit-tracer -------------------------------------------------------------------------

MODEL_LAYERS = 5
COVERED = [1, 2, 4]  # the CLT's layers in the model: padding before, between and after


def save_for_export(clt: CrossLayerTranscoder, path: Path, theta: Tensor | None = None) -> Path:
    metadata = {
        "model_name": "m",
        "hook_names": [f"blocks.{i}.mlp.hook_in" for i in COVERED],
        "hook_names_out": [f"blocks.{i}.hook_mlp_out" for i in COVERED],
    }
    return save_sae(clt, path, metadata=metadata, threshold=theta)


def circuit_tracer_forward(directory: Path, x: Tensor) -> Tensor:
    """circuit-tracer's CLT read from its files: ``x [N, layers, d]`` (MLP inputs of every model
    layer) to MLP outputs ``[N, layers, d]``; JumpReLU ``pre * (pre > θ)`` if θ, else ReLU."""
    n_layers = x.shape[1]
    out = torch.zeros_like(x)
    for i in range(n_layers):
        enc = load_file(str(directory / f"W_enc_{i}.safetensors"))
        W_dec = load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        assert W_dec.shape[1] == n_layers - i
        pre = x[:, i] @ enc[f"W_enc_{i}"].T + enc[f"b_enc_{i}"]
        theta = enc.get(f"threshold_{i}")
        acts = pre.relu() if theta is None else pre * (pre > theta)
        out[:, i:] += torch.einsum("nf,fld->nld", acts, W_dec)
        out[:, i] += enc[f"b_dec_{i}"]
    return out


@pytest.mark.parametrize("architecture", ["relu", "batchtopk", "jumprelu", "topk"])
def test_circuit_tracer_export(tmp_path: Path, architecture: str) -> None:
    clt = make_clt(architecture)
    theta = torch.rand(clt.d_sae) * 0.2 if architecture == "topk" else None
    saved = save_for_export(clt, tmp_path / "clt", theta)
    out = export_transcoder_set(saved, tmp_path / "ct", n_layers=MODEL_LAYERS)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "model_name": "m",
    }
    x = inputs(16).view(16, N_LAYERS, D)
    model_x = torch.randn(16, MODEL_LAYERS, D)
    model_x[:, COVERED] = x
    got = circuit_tracer_forward(out, model_x)
    if architecture == "topk":  # the JumpReLU form it was saved with
        pre = clt.pre_acts(x.flatten(1))
        want = clt.decode(pre * (pre > theta)).view(16, N_LAYERS, D)
    else:
        want = clt(x.flatten(1)).view(16, N_LAYERS, D)
    torch.testing.assert_close(got[:, COVERED], want)
    uncovered = [i for i in range(MODEL_LAYERS) if i not in COVERED]
    assert torch.equal(got[:, uncovered], torch.zeros(16, len(uncovered), D))


def test_circuit_tracer_refuses_topk_without_threshold(tmp_path: Path) -> None:
    saved = save_for_export(make_clt("topk"), tmp_path / "clt")
    with pytest.raises(ConfigError, match="topk"):
        export_transcoder_set(saved, tmp_path / "ct", n_layers=MODEL_LAYERS)
