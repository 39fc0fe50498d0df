"""TopK SAE (Gao et al., 2024): keep the k largest activations per token, plus AuxK loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drrik.sae.base import SAE, TrainOutput, register
from drrik.sae.config import SAEConfig


@register
class TopKSAE(SAE):
    """``f = TopK_k(ReLU(pre))``; loss = MSE + AuxK.

    When decoder rows are not held at unit norm, selection ranks ``pre * ||W_dec_i||`` (a
    feature's actual contribution to the output), the activations are reported in those
    unit-decoder units, and :meth:`decode` divides them back. Reconstructions and gradients
    are the same as selecting on contributions with plain activations; the saved SAE folds
    the norms in, so its unit-norm decoder gives identical activations and outputs.
    """

    architecture = "topk"
    saelens_architecture = "topk"
    needs_k = True

    @classmethod
    def default_normalize_decoder(cls, cfg: SAEConfig) -> bool:
        """Unit rows: k, not a penalty, sets sparsity, so unit rows only fix the scale."""
        return True

    @property
    def rescale_by_decoder_norm(self) -> bool:
        """Whether activations are measured as if decoder rows had unit norm."""
        return not self.normalize_decoder

    def scaled_pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations, times decoder norms when rows are free."""
        pre = self.pre_acts(x)
        return pre * self.decoder_norms() if self.rescale_by_decoder_norm else pre

    def activation(self, pre: Tensor) -> Tensor:
        """Keep each row's k largest values (after ReLU), zero the rest."""
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.scaled_pre_acts(x))

    def decode_directions(self, feature_acts: Tensor) -> Tensor:
        """``feature_acts`` times the decoder, without ``b_dec``."""
        if self.rescale_by_decoder_norm:
            feature_acts = feature_acts / self.decoder_norms().clamp_min(1e-12)
        return feature_acts @ self.W_dec

    def decode(self, feature_acts: Tensor) -> Tensor:
        return self.decode_directions(feature_acts) + self.b_dec

    def train_activation(self, pre: Tensor) -> Tensor:
        """The activation used in :meth:`training_forward` (BatchTopK overrides it)."""
        return self.activation(pre)

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor = 0.0,
        dead_mask: Tensor | None = None,
    ) -> TrainOutput:
        """MSE plus AuxK; ``sparsity_coefficient`` is unused (k sets the sparsity)."""
        pre = self.scaled_pre_acts(x)
        feature_acts = self.train_activation(pre)
        x_hat = self.decode(feature_acts)
        losses = {
            "mse_loss": self.mse(x_hat, x),
            "aux_loss": (
                self.aux_k_loss(x, x_hat, pre, dead_mask)
                if dead_mask is not None
                else x_hat.new_zeros(())
            ),
        }
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)

    def aux_k_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK: the top ``aux_k`` *dead* features reconstruct the detached residual.

        Scaled by ``min(n_dead / aux_k, 1)`` so it fades out as features revive, and is zero
        with no dead features, all without a host sync.
        """
        aux_k = self.cfg.resolved_aux_k()
        residual = (x - x_hat).detach()
        values, indices = torch.where(dead_mask, pre, float("-inf")).topk(aux_k, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        aux_err = (self.decode_directions(aux_acts) - residual).pow(2).sum(dim=-1).mean()
        scale = (dead_mask.sum() / aux_k).clamp(max=1.0)
        return self.cfg.aux_k_coefficient * scale * aux_err

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Decoder norms folded in (rows become unit norm), so SAELens needs no rescaling."""
        tensors = super().saelens_tensors()
        if self.rescale_by_decoder_norm:
            norms = self.decoder_norms().detach().clamp_min(1e-12)
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            tensors["W_enc"] = tensors["W_enc"] * norms
            tensors["b_enc"] = tensors["b_enc"] * norms
        return tensors

    def saelens_cfg_extras(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
