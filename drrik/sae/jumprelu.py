"""JumpReLU SAE (Rajamanoharan et al., 2024): per-feature learned thresholds, L0 penalty.

``JumpReLU(z) = z * H(z - theta)`` and ``L0 = sum_i H(z_i - theta_i)`` have zero gradient
with respect to ``theta`` almost everywhere. Straight-through estimators replace the
derivative of the Heaviside step ``H`` with a rectangle kernel of width ``epsilon``
(the bandwidth):

    d JumpReLU / d theta = -(theta / epsilon) * K((z - theta) / epsilon)
    d H(z - theta) / d theta = -(1 / epsilon) * K((z - theta) / epsilon)

with ``K(u) = 1`` for ``|u| < 1/2``, else 0. ``z`` itself gets the exact gradient of
JumpReLU (``H(z - theta)``) and none through the L0 step. The threshold is stored as its log
so it stays positive.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from drrik.sae.base import SAE, TrainOutput, firing_quantile
from drrik.sae.config import SAEConfig
from drrik.sae.registry import register

START_L0_FACTOR = 1.0
"""With ``target_l0``, the thresholds start where this multiple of the target fires."""

THRESHOLD_LR_SCALE = 30.0
"""With ``target_l0``: the thresholds' learning rate, as a multiple of the run's."""


def rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel: 1 where ``-1/2 < u < 1/2``, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_features(grad: Tensor) -> Tensor:
    """Sum a ``[..., d_sae]`` gradient over all leading axes."""
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)


class JumpReLUFunction(torch.autograd.Function):
    """``z * H(z - theta)`` with the straight-through threshold gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return z * (z > theta)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps = ctx.bandwidth  # type: ignore[attr-defined]
        grad_z = grad_out * (z > theta)
        grad_theta = -(theta / eps) * rectangle((z - theta) / eps) * grad_out
        return grad_z, _sum_to_features(grad_theta), None


class StepFunction(torch.autograd.Function):
    """``H(z - theta)`` with the straight-through threshold gradient (none to ``z``)."""

    @staticmethod
    def forward(ctx: FunctionCtx, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth  # type: ignore[attr-defined]
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        eps = ctx.bandwidth  # type: ignore[attr-defined]
        grad_theta = -(1.0 / eps) * rectangle((z - theta) / eps) * grad_out
        return None, _sum_to_features(grad_theta), None


@register
class JumpReLUSAE(SAE):
    """``f = JumpReLU_theta(pre)``; loss = MSE + lambda * L0 (L0 averaged over the batch)."""

    architecture = "jumprelu"
    saelens_architecture = "jumprelu"

    @classmethod
    def default_normalize_decoder(cls, cfg: SAEConfig) -> bool:
        """Unit rows: the L0 penalty ignores magnitudes, so unit rows only fix the scale."""
        return True

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device=device)
        self.log_threshold = self.initial_log_threshold(device)

    def initial_log_threshold(self, device: torch.device | str | None) -> nn.Parameter:
        """Every feature's log threshold at ``jumprelu_init_threshold``."""
        init = math.log(self.cfg.jumprelu_init_threshold)
        log_theta = torch.full((self.d_sae,), init, dtype=self.cfg.torch_dtype())
        return nn.Parameter(log_theta.to(device))

    @property
    def threshold(self) -> Tensor:
        """Per-feature threshold ``exp(log_threshold)``."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return JumpReLUFunction.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> TrainOutput:
        """MSE + ``sparsity_coefficient`` * L0; ``dead_mask`` is unused."""
        pre = self.pre_acts(x)
        theta = self.threshold
        eps = self.cfg.jumprelu_bandwidth
        feature_acts = JumpReLUFunction.apply(pre, theta, eps)
        x_hat = self.decode(feature_acts)
        l0 = self.feature_total(StepFunction.apply(pre, theta, eps))
        losses = {
            "mse_loss": self.mse(x_hat, x if target is None else target),
            "l0_loss": sparsity_coefficient * l0,
        }
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """With ``target_l0``, the thresholds learn ``THRESHOLD_LR_SCALE`` times faster: the L0
        penalty reaches nothing else (the encoder gets no gradient through the step), so its
        controller can move the L0 only as fast as the thresholds move."""
        if self.cfg.target_l0 is None:
            return super().optimizer_groups()
        rest = [p for p in self.parameters() if p is not self.log_threshold]
        return [{"params": rest}, {"params": [self.log_threshold], "lr_scale": THRESHOLD_LR_SCALE}]

    @torch.no_grad()
    def start_near_l0(self, x: Tensor, target_l0: int) -> None:
        """Start each feature's threshold at the quantile of its pre-activations on ``x`` that
        it exceeds on ``START_L0_FACTOR * target_l0 / d_sae`` of the tokens (a CLT's target is
        per layer: ``/ features_per_layer``), so the L0 starts
        near ``START_L0_FACTOR * target_l0``. Thresholds move by about the learning rate per
        step in log space, so from a fixed start (0.001) no run of hundreds of steps gets from
        the ~half of the features that fire there down to a target of tens; from here the L0
        controller only has the rest to do. A feature whose quantile is not above the
        configured start keeps that start."""
        per_token = START_L0_FACTOR * target_l0 * self.cfg.l0_units()
        if self.features is not None:  # this slice's share of the features that fire
            per_token /= self.features.count
        quantile = firing_quantile(self.pre_acts(x), per_token)
        start = torch.full_like(quantile, self.cfg.jumprelu_init_threshold)
        self.log_threshold.copy_(torch.maximum(quantile, start).log())

    def _fold_scale_extras(self, scale: float) -> None:
        self.log_threshold.sub_(math.log(scale))

    def feature_params(self) -> list[tuple[nn.Parameter, int]]:
        return [*super().feature_params(), (self.log_threshold, 0)]

    def _reset_feature_extras(self, mask: Tensor) -> None:
        init = math.log(self.cfg.jumprelu_init_threshold)
        self.log_threshold.copy_(torch.where(mask, init, self.log_threshold))

    def saelens_tensors(self) -> dict[str, Tensor]:
        return {**super().saelens_tensors(), "threshold": self.threshold.detach()}

    def saelens_cfg_extras(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saelens_tensors(tensors)
        self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
