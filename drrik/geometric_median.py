"""Geometric median (Weiszfeld's algorithm), used to initialize the SAE's ``b_dec``.

The geometric median minimizes the sum of Euclidean distances to the points. Unlike the mean
it is not dragged by a few huge activations, and unlike a coordinate-wise median (what the
first drrik used) it is a genuine point of the data's geometry.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _objective(points: Tensor, median: Tensor) -> Tensor:
    return (points - median).norm(dim=1).sum()


@torch.no_grad()
def geometric_median(
    points: Tensor, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8
) -> Tensor:
    """The point ``[d]`` minimizing the summed distance to ``points [n, d]``.

    Weiszfeld iterations from the mean: ``m <- sum(w_i p_i) / sum(w_i)`` with
    ``w_i = 1 / max(||p_i - m||, eps)`` (the ``eps`` keeps a point that coincides with ``m``
    from dividing by zero). Stops after ``max_iter`` iterations or once the objective changes
    by less than ``tol`` relative to itself. Computed in at least float32; returned in the
    input's dtype. Runs once at initialization, so it may read the objective on the host.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(
            f"geometric_median needs points [n, d] with n > 0, got {tuple(points.shape)}"
        )
    if max_iter < 0:
        raise ValueError(f"geometric_median needs max_iter >= 0, got {max_iter}")
    work = points if points.dtype in (torch.float32, torch.float64) else points.float()
    median = work.mean(dim=0)
    objective = _objective(work, median).item()
    for _ in range(max_iter):
        weights = 1.0 / (work - median).norm(dim=1).clamp_min(eps)
        median = (weights[:, None] * work).sum(dim=0) / weights.sum()
        new_objective = _objective(work, median).item()
        converged = abs(objective - new_objective) <= tol * max(objective, eps)
        objective = new_objective
        if converged:
            break
    return median.to(points.dtype)
