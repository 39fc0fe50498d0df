"""ReLU SAE with an L1 penalty (SAELens "standard"), optionally with ghost gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from drrik.sae.base import SAE, TrainOutput, register

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
        """Per-batch-mean L1 of ``feature_acts``, weighted by decoder norms when configured.

        Summed over the batch first, then weighted: the same value as weighting every
        activation, without a second ``batch x d_sae`` tensor forward and back. The sum
        accumulates in float32 even for bf16 activations and is rounded once per feature;
        asking for a float32 result instead would copy the whole batch to float32, and its
        gradient back.
        """
        dtype = torch.promote_types(feature_acts.dtype, torch.float32)
        per_feature = feature_acts.reshape(-1, self.d_sae).sum(0).to(dtype)
        n_tokens = feature_acts.numel() // self.d_sae
        if self.cfg.scale_sparsity_by_decoder_norm:
            per_feature = per_feature * self.decoder_norms()
        return per_feature.sum() / n_tokens

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor,
        dead_mask: Tensor | None = None,
    ) -> TrainOutput:
        pre = self.pre_acts(x)
        feature_acts = torch.relu(pre)
        x_hat = self.decode(feature_acts)
        losses = {
            "mse_loss": self.mse(x_hat, x),
            "l1_loss": sparsity_coefficient * self.sparsity_penalty(feature_acts),
        }
        if self.cfg.use_ghost_grads:
            losses["ghost_loss"] = (
                self.ghost_grad_loss(x, x_hat, pre, dead_mask)
                if dead_mask is not None
                else x_hat.new_zeros(())
            )
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)

    def ghost_grad_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor) -> Tensor:
        """Ghost-gradient term: lets dead features learn to predict the residual.

        Dead features get ``exp`` activations; their decoded output ``g`` is rescaled to half
        the residual's norm (scale detached) and regressed on the detached residual. Each
        token's term is multiplied by the detached ratio MSE / ghost-MSE, so its *value*
        equals the MSE while its *gradient* reaches only dead features' encoder columns,
        decoder rows and biases (plus the shared ``b_dec`` through the input). Zero when no
        feature is dead; decided on device, without a host sync.
        """
        residual = (x - x_hat).detach()
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
