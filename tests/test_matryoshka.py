"""Matryoshka BatchTopK: the nested-prefix loss against a hand computation, the widths'
validation, and what the loss is for: the first prefix alone reconstructs far better than the
same prefix of a plain BatchTopK trained on the same data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from drrik.assemble import assemble
from drrik.config import ModelConfig, RunConfig
from drrik.errors import ConfigError
from drrik.sae import MatryoshkaBatchTopKSAE, SAEConfig, build_sae


def make(**overrides) -> MatryoshkaBatchTopKSAE:
    kwargs = {"architecture": "matryoshka_batchtopk", "d_in": 8, "d_sae": 24, "k": 4}
    kwargs.update(overrides)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(**kwargs))
    assert isinstance(sae, MatryoshkaBatchTopKSAE)
    with torch.no_grad():
        sae.b_enc.add_(0.2 * torch.randn_like(sae.b_enc))
        sae.b_dec.add_(0.2 * torch.randn_like(sae.b_dec))
    return sae


def test_default_widths_halve_down_to_an_eighth() -> None:
    assert SAEConfig(d_in=64).resolved_matryoshka_widths() == [64, 128, 256, 512]
    assert SAEConfig(d_sae=3, k=1).resolved_matryoshka_widths() == [1, 3]
    given = SAEConfig(d_sae=40, k=4, matryoshka_widths=[5, 40])
    assert given.resolved_matryoshka_widths() == [5, 40]


@pytest.mark.parametrize("normalize", [True, False])
def test_loss_sums_every_prefix_reconstruction(normalize: bool) -> None:
    sae = make(matryoshka_widths=[3, 10, 24], normalize_decoder=normalize)
    if not normalize:
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(24, 1) + 0.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    out = sae.training_forward(x, 0.0)
    acts = out.feature_acts.detach()
    assert (acts > 0).sum(dim=1).float().mean() == 4  # BatchTopK's selection
    norms = sae.W_dec.detach().norm(dim=1)
    unit = acts / norms if not normalize else acts  # activations are in unit-decoder units

    def prefix_error(width: int) -> torch.Tensor:
        x_hat = unit[:, :width] @ sae.W_dec.detach()[:width] + sae.b_dec.detach()
        return ((x_hat - x) ** 2).sum(dim=1).mean()

    torch.testing.assert_close(out.losses["mse_loss"], prefix_error(24))
    torch.testing.assert_close(out.losses["prefix_mse_loss"], prefix_error(3) + prefix_error(10))
    torch.testing.assert_close(out.x_hat, sae.decode(out.feature_acts))
    torch.testing.assert_close(out.loss, sum(out.losses.values()))


def test_inference_is_batchtopk_threshold() -> None:
    sae = make()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    sae.training_forward(x, 0.0)
    assert sae.threshold > 0
    sae.eval()
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > sae.threshold))


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"matryoshka_widths": [8, 4, 24]}, "increasing"),
        ({"matryoshka_widths": [8, 8, 24]}, "increasing"),
        ({"matryoshka_widths": [0, 24]}, "> 0"),
        ({"matryoshka_widths": [8, 16]}, "end the prefix widths at d_sae (24)"),
    ],
)
def test_bad_widths_are_refused_naming_the_field(kwargs: dict, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        SAEConfig(architecture="matryoshka_batchtopk", d_sae=24, k=4, **kwargs)
    assert err.value.field == "matryoshka_widths" and hint in str(err.value)
    assert "\n" not in str(err.value)


def test_widths_are_checked_against_a_width_from_the_model() -> None:
    """d_sae = 8 * d_in is known only once the hook's width fills d_in."""
    cfg = SAEConfig(architecture="matryoshka_batchtopk", k=4, matryoshka_widths=[16, 32])
    cfg.d_in = 8
    with pytest.raises(ConfigError, match=r"matryoshka_widths=.*d_sae \(64\)"):
        cfg.check_buildable()


def test_first_prefix_alone_reconstructs_better_than_plain_batchtopk() -> None:
    """Data with four frequent directions and many rare ones: the Matryoshka's first four
    features learn the frequent ones, so they reconstruct alone; a plain BatchTopK spreads
    them over the whole dictionary."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_sae, n = 16, 64, 4096
    directions = torch.nn.functional.normalize(torch.randn(40, d_in, generator=gen), dim=1)
    frequent = torch.rand(n, 4, generator=gen) < 0.6
    rare = torch.rand(n, 36, generator=gen) < 0.03
    codes = torch.cat([frequent * 3.0, rare * 1.0], dim=1) * torch.rand(n, 40, generator=gen)
    data = codes @ directions

    def first_prefix_fvu(architecture: str) -> float:
        torch.manual_seed(0)
        cfg = SAEConfig(
            architecture=architecture, d_in=d_in, d_sae=d_sae, k=4, matryoshka_widths=[4, d_sae]
        )
        sae = build_sae(cfg)
        optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for step in range(300):
            batch = data[(step * 256) % n :][:256]
            sae.training_forward(batch, 0.0).loss.backward()
            sae.remove_parallel_decoder_grad()
            optimizer.step()
            optimizer.zero_grad()
            sae.normalize_decoder_rows()
        sae.eval()
        with torch.no_grad():
            acts = sae.encode(data)
            x_hat = sae.decode_directions(acts[:, :4], slice(0, 4)) + sae.b_dec
        return float(((data - x_hat) ** 2).sum() / ((data - data.mean(0)) ** 2).sum())

    matryoshka, plain = first_prefix_fvu("matryoshka_batchtopk"), first_prefix_fvu("batchtopk")
    assert matryoshka < 0.5 < plain, (matryoshka, plain)  # measured: 0.08 against 1.8


def test_widths_not_ending_at_the_models_width_are_refused_before_it_loads(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """d_sae comes from the hook's width (64 in the tiny model's config.json, 8x): the widths
    are checked against it without loading the model, and nothing is written."""

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loaded before the width check")

    monkeypatch.setattr("drrik.assemble.load_model", no_load)
    cfg = RunConfig(
        model=ModelConfig(model=str(tiny_model_dir), hook=["blocks.1.hook_resid_post"]),
        sae=SAEConfig(architecture="matryoshka_batchtopk", k=8, matryoshka_widths=[16, 64]),
        out=str(tmp_path / "out"),
    )
    with pytest.raises(ConfigError, match=r"^matryoshka_widths=\[16, 64\]: .*d_sae \(512\)$"):
        assemble(cfg, verbose=False)
    assert not (tmp_path / "out").exists()
