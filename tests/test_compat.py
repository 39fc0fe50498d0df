"""The first drrik's names still import and do their (new) job."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from saved_sae import HOOK, make_run, text_file

from drrik import compat
from drrik.analysis import AnalysisConfig, analyze
from drrik.config import RunConfig
from drrik.errors import ConfigError
from drrik.sae import SAE, SAEConfig, build_sae


def test_names_map_onto_the_new_design():
    from drrik.settings import EnvironmentSettings, get_settings
    from drrik.steering import SAESteering
    from drrik.wandb_logging import WandbConfig

    assert compat.SparseAutoencoder is SAE
    assert compat.Config is RunConfig
    assert compat.SAESteering is SAESteering
    assert compat.WandbConfig is WandbConfig
    assert compat.EnvironmentSettings is EnvironmentSettings
    assert compat.get_settings is get_settings
    assert isinstance(
        build_sae(SAEConfig(architecture="relu", d_in=8, d_sae=16)), compat.SparseAutoencoder
    )


def test_activation_extractor_round_trip(tiny_model, tiny_model_dir, tmp_path):
    docs = text_file(tmp_path / "docs.txt")
    extractor = compat.ActivationExtractor(
        model_name=str(tiny_model_dir),
        dataset_name=str(docs),
        num_tokens=300,
        max_length=32,
        hook=HOOK,
        batch_size=4,
        output_dir=tmp_path / "acts",
    )
    acts, meta = extractor.extract()
    assert acts.shape == (300, 64) and meta["tokens"].shape == (300,)
    assert meta["hook_name"] == HOOK
    assert tiny_model.tokenizer.bos_token_id not in meta["tokens"]  # special positions dropped
    path = extractor.save_activations(acts, meta)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # a safetensors file
    assert set(header) == {"__metadata__", "activations", "tokens"}
    loaded, loaded_meta = compat.ActivationExtractor.load_activations(path.parent)
    assert torch.equal(loaded, acts) and torch.equal(loaded_meta["tokens"], meta["tokens"])
    assert loaded_meta["num_tokens"] == 300


def test_feature_visualizer(tiny_model, tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model, tiny_model_dir, text_file(tmp_path / "d.txt"))
    analyze(run, AnalysisConfig(n_tokens=128, batch_size_prompts=4), model=tiny_model)
    logged: dict = {}

    class FakeRun:
        def log(self, data, step=None):
            logged.update(data)

    viz = compat.FeatureVisualizer(run, tmp_path / "plots", wandb_run=FakeRun())
    paths = [
        viz.plot_feature_density(),
        viz.plot_activation_histogram(0),
        viz.plot_top_features(5, by="max"),
    ]
    assert all(p.parent == tmp_path / "plots" and p.stat().st_size > 2000 for p in paths)
    assert set(logged) == {"feature_density", "feature_0_histogram", "top_features_by_max"}
    with pytest.raises(ConfigError, match="metrics"):
        viz.plot_training_curves()  # the run logged no metrics
    page = viz.create_feature_dashboard(3).read_text()
    assert 'id="f3"' in page


def test_first_drrik_names_import_from_the_package() -> None:
    """The first drrik's import line keeps working, and names resolve to the new classes."""
    import drrik
    from drrik import (
        ActivationExtractor,
        Config,
        EnvironmentSettings,
        FeatureVisualizer,
        SAESteering,
        SparseAutoencoder,
        WandbConfig,
        get_settings,
    )

    assert SparseAutoencoder is drrik.SAE
    assert Config is drrik.RunConfig
    assert callable(get_settings) and isinstance(get_settings(), EnvironmentSettings)
    assert WandbConfig().wandb_project == "drrik"
    for cls in (ActivationExtractor, FeatureVisualizer, SAESteering):
        assert isinstance(cls, type)
    with pytest.raises(AttributeError):
        drrik.NoSuchName  # noqa: B018
