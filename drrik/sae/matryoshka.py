"""Matryoshka BatchTopK SAE (Bussmann et al., 2025; Nabeshima, 2024): nested dictionaries.

The features are ordered, and every prefix of the widths in ``matryoshka_widths`` must
reconstruct the input on its own: the loss sums the reconstruction error of each prefix (the
first ``w`` features and ``b_dec``) over every width. The first features then carry the
broad, frequent directions and later ones refine them, instead of a wide dictionary splitting
a general feature into specific ones that absorb it (feature absorption).

Selection is BatchTopK's over the whole width, so the inference form is BatchTopK's too: a
JumpReLU at the learned global threshold, saved as a SAELens ``jumprelu`` SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drrik.sae.base import TrainOutput
from drrik.sae.batchtopk import BatchTopKSAE
from drrik.sae.registry import register


@register
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose loss is the summed MSE of every nested prefix's reconstruction.

    ``losses["mse_loss"]`` is the full dictionary's error, as for every architecture;
    ``losses["prefix_mse_loss"]`` sums the narrower prefixes' errors.
    """

    architecture = "matryoshka_batchtopk"

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor = 0.0,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> TrainOutput:
        """Prefix reconstructions built cumulatively: each adds one slice of the decoder, so
        the whole costs one decode, not one per prefix."""
        target = x if target is None else target
        pre = self.scaled_pre_acts(x)
        feature_acts = self.train_activation(pre)
        x_hat = self.b_dec.expand_as(target)
        prefix_errors = []
        start = 0
        for end in self.cfg.resolved_matryoshka_widths():
            features = slice(start, end)
            x_hat = x_hat + self.decode_directions(feature_acts[:, features], features)
            prefix_errors.append(self.mse(x_hat, target))
            start = end
        losses = {
            "mse_loss": prefix_errors[-1],
            "prefix_mse_loss": torch.stack(prefix_errors[:-1]).sum()
            if len(prefix_errors) > 1
            else x_hat.new_zeros(()),
            "aux_loss": self.aux_k_loss(target, x_hat, pre, dead_mask),
        }
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)
