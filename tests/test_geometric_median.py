"""Geometric median against brute-force minimizers."""

from __future__ import annotations

import pytest
import torch

from drrik.errors import ConfigError
from drrik.geometric_median import geometric_median


def objective(points: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (points - m).norm(dim=-1).sum(dim=-1)


def grid_minimizer_2d(points: torch.Tensor) -> torch.Tensor:
    """Brute force: coarse grid over the bounding box, then finer grids around the best."""
    center = points.mean(dim=0).double()
    half = (points.max(dim=0).values - points.min(dim=0).values).max().double()
    p = points.double()
    for _ in range(6):
        axis = torch.linspace(-half, half, 201, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
        candidates = center + grid
        values = (p[None, :, :] - candidates[:, None, :]).norm(dim=-1).sum(dim=1)
        center = candidates[values.argmin()]
        half = half / 20
    return center


def test_matches_grid_search_with_outliers_2d() -> None:
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(40, 2, generator=g, dtype=torch.float64)
    outliers = torch.tensor([[60.0, 60.0], [80.0, -50.0], [70.0, 10.0]], dtype=torch.float64)
    points = torch.cat([cluster, outliers])
    median = geometric_median(points, max_iter=500, tol=1e-12)
    brute = grid_minimizer_2d(points)
    torch.testing.assert_close(median, brute, atol=1e-3, rtol=0)
    assert objective(points, median) <= objective(points, brute) + 1e-6
    # the mean is dragged far away by three outliers, the median is not
    assert (points.mean(dim=0) - median).norm() > 3.0
    assert median.norm() < 1.0


def test_matches_gradient_descent_in_higher_dimension() -> None:
    g = torch.Generator().manual_seed(1)
    points = torch.randn(64, 12, generator=g) * torch.linspace(0.5, 3.0, 12)
    points[:4] += 40.0
    median = geometric_median(points)
    m = points.median(dim=0).values.clone().double().requires_grad_(True)
    optimizer = torch.optim.Adam([m], lr=0.05)
    for step in range(1500):
        if step == 1000:
            optimizer.param_groups[0]["lr"] = 0.002
        optimizer.zero_grad()
        objective(points.double(), m).backward()
        optimizer.step()
    found = objective(points.double(), m.detach())
    ours = objective(points.double(), median.double())
    assert ours <= found * (1 + 1e-5)
    torch.testing.assert_close(median.double(), m.detach(), atol=2e-2, rtol=0)


def test_one_dimension_is_the_median() -> None:
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    torch.testing.assert_close(
        geometric_median(points, max_iter=1000, tol=0.0), torch.tensor([2.0]), atol=1e-3, rtol=0
    )


def test_duplicates_and_coincident_start_stay_finite() -> None:
    points = torch.tensor([[1.0, 1.0]] * 5 + [[0.0, 0.0], [2.0, 2.0]])
    median = geometric_median(points)
    assert torch.isfinite(median).all()
    torch.testing.assert_close(median, torch.tensor([1.0, 1.0]))


def test_dtype_kept_and_single_point() -> None:
    points = torch.randn(10, 4).to(torch.bfloat16)
    assert geometric_median(points).dtype == torch.bfloat16
    single = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(geometric_median(single), single[0])


def test_bad_shape_is_a_programming_error() -> None:
    """The caller passes its own buffer sample: a wrong shape is a bug, not bad user input."""
    with pytest.raises(ValueError, match="points") as err:
        geometric_median(torch.zeros(3))
    assert not isinstance(err.value, ConfigError)
