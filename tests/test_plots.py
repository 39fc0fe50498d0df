"""Every plot writes a non-empty PNG and leaves no figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from drrik import plots  # noqa: E402
from drrik.errors import ConfigError  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000
    image = plt.imread(path)
    assert image.std() > 0.01  # not a blank canvas


@pytest.fixture(autouse=True)
def no_figure_left_open():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def test_feature_density(tmp_path):
    density = torch.cat([torch.zeros(7), torch.logspace(-5, -0.3, 200)])
    assert_png(plots.plot_feature_density(density, tmp_path / "density.png"))


def test_training_curves(tmp_path):
    rows = [
        {"tokens": 512 * s, "sae": name, "loss": 10 / s, "l0": 8.0, "explained_variance": 1 - 1 / s}
        for s in range(1, 30)
        for name in ("a", "b")
    ]
    assert_png(plots.plot_training_curves(rows, tmp_path / "curves.png"))
    with pytest.raises(ConfigError):
        plots.plot_training_curves([], tmp_path / "none.png")


def test_activation_histogram(tmp_path):
    counts = torch.zeros(64, dtype=torch.long)
    counts[20:40] = torch.arange(20)
    edges = torch.logspace(-4, 4, 65)
    assert_png(plots.plot_activation_histogram(counts, edges, tmp_path / "hist.png", "f"))


@pytest.mark.parametrize("by", plots.TOP_FEATURE_KEYS)
def test_top_features(tmp_path, by):
    values = torch.rand(300)
    assert_png(plots.plot_top_features(values, tmp_path / f"{by}.png", by=by, n_features=15))


def test_log_to_wandb_logs_images(tmp_path):
    import wandb

    path = plots.plot_top_features(torch.rand(10), tmp_path / "top.png")

    class FakeRun:
        logged: dict = {}

        def log(self, data, step=None):
            self.logged = data

    run = FakeRun()
    plots.log_to_wandb(run, {"top": path})
    assert isinstance(run.logged["top"], wandb.Image)
