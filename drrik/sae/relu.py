"""ReLU SAE with an L1 penalty (SAELens "standard"), optionally with ghost gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from drrik.sae.base import SAE, TrainOutput
from drrik.sae.registry import register

_EPS = 1e-12


@register
class ReLUSAE(SAE):
    """``f = ReLU((x - b_dec) W_enc + b_enc)``; loss = MSE + lambda * sum_i f_i * ||W_dec_i||.

    The decoder-norm weight (on by default) makes the penalty invariant to moving scale
    between encoder and decoder, so rows need not be held at unit norm.
    """

    architecture = "relu"
    saelens_architecture = "standard"
    supports_ghost_grads = True

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))

    def sparsity_penalty(self, feature_acts: Tensor) -> Tensor:
        """Per-batch-mean L1 of ``feature_acts``, weighted by decoder norms when configured
        (see :meth:`feature_total` for how it stays off float32 copies)."""
        scale = self.cfg.scale_sparsity_by_decoder_norm
        return self.feature_total(feature_acts, self.decoder_norms() if scale else None)

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> TrainOutput:
        target = x if target is None else target
        pre = self.pre_acts(x)
        feature_acts = torch.relu(pre)
        x_hat = self.decode(feature_acts)
        losses = {
            "mse_loss": self.mse(x_hat, target),
            "l1_loss": sparsity_coefficient * self.sparsity_penalty(feature_acts),
        }
        if self.cfg.use_ghost_grads:
            losses["ghost_loss"] = (
                self.ghost_grad_loss(target, x_hat, pre, dead_mask)
                if dead_mask is not None
                else x_hat.new_zeros(())
            )
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)

    def ghost_grad_loss(
        self, target: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor
    ) -> Tensor:
        """Ghost-gradient term: lets dead features learn to predict the residual.

        Dead features get ``exp`` activations; their decoded output ``g`` is rescaled to half
        the residual's norm (scale detached) and regressed on the detached residual. Each
        token's term is multiplied by the detached ratio MSE / ghost-MSE, so its *value*
        equals the MSE while its *gradient* reaches only dead features' encoder columns,
        decoder rows and biases (plus the shared ``b_dec`` through the input). Zero when no
        feature is dead; decided on device, without a host sync.
        """
        residual = (target - x_hat).detach()
        with torch.autocast(pre.device.type, enabled=False):  # CUDA's would copy to float32
            ghost_acts = torch.where(dead_mask, pre, float("-inf")).exp()
        ghost_out = ghost_acts @ self.W_dec
        scale = residual.norm(dim=-1, keepdim=True) / (
            2 * ghost_out.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        )
        ghost_out = ghost_out * scale.detach()
        ghost_err = (ghost_out - residual).pow(2).sum(dim=-1)
        token_mse = residual.pow(2).sum(dim=-1)
        ratio = (token_mse / ghost_err.clamp_min(_EPS)).detach()
        return (ratio * ghost_err).mean() * dead_mask.any()
