"""BatchTopK SAE (Bussmann et al., 2024): k active features per token on average over a batch.

Training keeps the ``k * batch`` largest activations of the whole batch, so busy tokens can use
more features than quiet ones. Inference cannot depend on the batch, so the SAE learns one
global threshold (EMA of the smallest kept activation) and, in eval mode, acts as a JumpReLU
with that threshold; it is saved as a SAELens "jumprelu" SAE. The smallest kept activation is
the threshold at which the batch keeps exactly k features per token; it falls as training goes
on, so the EMA's memory is short (``batchtopk_threshold_momentum``, 0.9: about ten steps)
lest the threshold trail it and keep fewer than k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drrik.sae.config import SAEConfig
from drrik.sae.registry import register
from drrik.sae.topk import TopKSAE


@register
class BatchTopKSAE(TopKSAE):
    """TopK over the flattened batch at train time; threshold (JumpReLU) in eval mode.

    The threshold is updated inside :meth:`training_forward` whenever the module is in
    training mode; the trainer calls nothing extra.
    """

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device=device)
        self.register_thresholds((), device)

    def register_thresholds(
        self, shape: tuple[int, ...], device: torch.device | str | None
    ) -> None:
        """The inference threshold buffers: one global (``()``), or one per group of features
        that keeps its own k (a CLT's layers)."""
        dtype = self.cfg.torch_dtype()
        self.register_buffer("threshold", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("threshold_updates", torch.zeros(shape, device=device))

    def batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the ``k * tokens`` largest ReLU'd activations of the batch; also return them."""
        flat = pre.relu().flatten()
        n_keep = self.k * (flat.numel() // self.d_sae)
        # Over every slice of a feature-parallel dictionary; ``kept`` is the same on each.
        values, indices, kept = self.top(flat, n_keep)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre), kept

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return self.batch_topk(pre)[0]
        return pre * (pre > self.threshold)

    def train_activation(self, pre: Tensor) -> Tensor:
        feature_acts, kept = self.batch_topk(pre)
        if self.training:
            self.update_threshold(kept)
        return feature_acts

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """EMA of the smallest positive kept activation; the first update sets it directly.
        ``kept`` is ``[n]``, or ``[groups, n]`` for per-group thresholds."""
        smallest = torch.where(kept > 0, kept.detach(), float("inf")).amin(-1).to(self.threshold)
        momentum = self.cfg.batchtopk_threshold_momentum
        blended = momentum * self.threshold + (1 - momentum) * smallest
        updated = torch.where(self.threshold_updates == 0, smallest, blended)
        has_positive = torch.isfinite(smallest)
        self.threshold.copy_(torch.where(has_positive, updated, self.threshold))
        self.threshold_updates.add_(has_positive.to(self.threshold_updates))

    def _fold_scale_extras(self, scale: float) -> None:
        self.threshold.div_(scale)

    def saelens_tensors(self) -> dict[str, Tensor]:
        tensors = super().saelens_tensors()
        tensors["threshold"] = self.threshold.detach().to(self.W_dec.dtype).expand(self.d_sae)
        return tensors

    def saelens_cfg_extras(self) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saelens_tensors(tensors)
        self.threshold.copy_(tensors["threshold"].float().mean())
        self.threshold_updates.fill_(1)
