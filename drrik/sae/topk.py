"""TopK SAE (Gao et al., 2024): keep the k largest activations per token, plus AuxK loss.

Training on CPU takes a sparse path when k is small against d_sae: the encoder's matmul stays
dense (every pre-activation is needed to pick the top k), but the decoder reads only the k
selected rows per token (``embedding_bag``) and the backward pass touches only the selected
entries, which removes four of the six dense ``batch x d_in x d_sae`` matmuls of a step. Losses
and gradients are those of the dense path up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from drrik.sae.base import SAE, SparseTrainOutput, TrainOutput
from drrik.sae.config import SAEConfig
from drrik.sae.registry import register

SPARSE_MAX_DENSITY = 1 / 16
"""The sparse training path is taken when k / d_sae is at most this."""


@torch.compiler.disable  # sparse tensors are not traceable; this runs eagerly under compile
def _scatter_matmul(idx: Tensor, values: Tensor, dense: Tensor, n_features: int) -> Tensor:
    """``S^T @ dense`` for the sparse ``[batch, n_features]`` matrix ``S[b, idx[b, i]] =
    values[b, i]``: a ``[n_features, dense.shape[1]]`` result, the gradient of a weight that
    only the selected features touched.

    An unsorted COO product: sorting the indices (``coalesce``, or ``embedding_bag``'s own
    backward) costs more than the product itself with torch's multithreaded CPU sort.
    """
    n, per_row = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(per_row)
    scatter = torch.sparse_coo_tensor(
        torch.stack([idx.reshape(-1), rows]),
        values.reshape(-1).to(dense.dtype),
        (n_features, n),
        check_invariants=False,
    )
    return torch.sparse.mm(scatter, dense)


class _GatherPreActs(torch.autograd.Function):
    """``pre[row, idx[row]]`` for ``pre = sae_in @ W_enc + b_enc``, gathered by the caller.

    Forward hands back the gathered values; backward reaches only the gathered entries: the
    encoder-weight gradient is a sparse product, the input gradient an ``embedding_bag`` over
    encoder columns, the bias gradient an ``index_add``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, selected: Tensor, idx: Tensor
    ) -> Tensor:
        ctx.save_for_backward(sae_in, W_enc, idx)
        return selected.view_as(selected)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        sae_in, W_enc, idx = ctx.saved_tensors
        grad = grad.to(W_enc.dtype)
        grad_in = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_in = F.embedding_bag(
                idx, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum"
            ).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _scatter_matmul(idx, grad, sae_in.to(W_enc.dtype), W_enc.shape[1]).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(W_enc[0]).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        return grad_in, grad_W, grad_b, None, None


class _DecoderGrad(torch.autograd.Function):
    """Identity on ``out``; in backward, also hands ``W_dec`` the gradient of a sparse decode.

    ``out`` is ``embedding_bag(idx, W_dec.detach(), per_sample_weights=values)``, whose own
    backward gives the values' gradient without sorting; this adds ``S^T @ grad`` for W_dec.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, out: Tensor, idx: Tensor, values: Tensor, W_dec: Tensor
    ) -> Tensor:
        ctx.save_for_backward(idx, values)
        ctx.n_features = W_dec.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        idx, values = ctx.saved_tensors
        grad_W = None
        if ctx.needs_input_grad[3]:
            grad_W = _scatter_matmul(idx, values, grad, ctx.n_features)
        return grad, None, None, grad_W


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
    sparse_training: bool | None = None
    """Sparse training path: None picks it on CPU when k is small against d_sae."""

    @classmethod
    def default_normalize_decoder(cls, cfg: SAEConfig) -> bool:
        """Unit rows: k, not a penalty, sets sparsity, so unit rows only fix the scale."""
        return True

    @property
    def k(self) -> int:
        """Features kept per token: k, else target_l0, else the default."""
        return self.cfg.resolved_k()

    @property
    def selection_width(self) -> int:
        """Features one top-k ranks: all of them here (a CLT ranks each layer's own)."""
        return self.d_sae

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
        values, indices, _ = self.top(pre, self.k)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def top(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each row's ``k`` largest values, their indices, and the ``k`` largest values
        themselves; over every slice of a feature-parallel dictionary, this slice's
        candidates (zero outside the global top k) and the global top k."""
        if self.features is None:
            values, indices = pre.topk(k, dim=-1)
            return values, indices, values
        values, indices, mine, kept = self.features.topk(pre, k)
        return torch.where(mine, values, 0.0), indices, kept

    def _picked(self, ranked: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """The sparse path's selection: indices of each row's top ``k`` (this slice's
        candidates, with the mask of those in the global top k, under feature slices)."""
        if self.features is None:
            return ranked.topk(k, dim=-1).indices, None
        _, indices, mine, _ = self.features.topk(ranked, k)
        return indices, mine

    def _aux_due(self, dead_mask: Tensor | None) -> bool:
        """Whether to compute AuxK: some feature may be dead. Every slice of a
        feature-parallel dictionary computes it (its collectives must run on all)."""
        return dead_mask is not None and (self.features is not None or _any_dead(dead_mask))

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.scaled_pre_acts(x))

    def decode_directions(self, feature_acts: Tensor, features: slice = slice(None)) -> Tensor:
        """``feature_acts`` times the decoder, without ``b_dec``; with ``features``, the
        activations of that slice of the features times their decoder rows."""
        rows = self.W_dec[features]
        if self.rescale_by_decoder_norm:
            feature_acts = feature_acts / self.decoder_norms()[features].clamp_min(1e-12)
        return self.joined(feature_acts @ rows)

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
        target: Tensor | None = None,
    ) -> TrainOutput:
        """MSE plus AuxK; ``sparsity_coefficient`` is unused (k sets the sparsity)."""
        target = x if target is None else target
        if self._takes_sparse_path(x):
            return self._sparse_training_forward(x, dead_mask, target)
        pre = self.scaled_pre_acts(x)
        feature_acts = self.train_activation(pre)
        x_hat = self.decode(feature_acts)
        losses = {
            "mse_loss": self.mse(x_hat, target),
            "aux_loss": self.aux_k_loss(target, x_hat, pre, dead_mask),
        }
        loss = torch.stack(list(losses.values())).sum()
        return TrainOutput(loss=loss, losses=losses, feature_acts=feature_acts, x_hat=x_hat)

    def aux_k_loss(
        self, target: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None
    ) -> Tensor:
        """AuxK: the top ``aux_k`` *dead* features reconstruct the detached residual.

        Scaled by ``min(n_dead / aux_k, 1)`` so it fades out as features revive, and is zero
        with no dead features (or no mask yet), all without a host sync.
        """
        if not self._aux_due(dead_mask):
            return x_hat.new_zeros(())
        aux_k = self.cfg.resolved_aux_k()
        residual = (target - x_hat).detach()
        values, indices, _ = self.top(torch.where(dead_mask, pre, float("-inf")), aux_k)
        aux_acts = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        aux_err = (self.decode_directions(aux_acts) - residual).pow(2).sum(dim=-1).mean()
        scale = (self.joined(dead_mask.sum().float()) / aux_k).clamp(max=1.0)
        return self.cfg.aux_k_coefficient * scale * aux_err

    # ---- the sparse training path ---------------------------------------------------------

    def _takes_sparse_path(self, x: Tensor) -> bool:
        if type(self).train_activation is not TopKSAE.train_activation:
            return False  # a per-token top k is what the sparse path computes
        if not torch.is_grad_enabled() or x.dim() != 2:
            return False
        if self.sparse_training is not None:
            return self.sparse_training
        return x.device.type == "cpu" and self.k <= self.selection_width * SPARSE_MAX_DENSITY

    def _sparse_decode(self, idx: Tensor, values: Tensor, norms: Tensor | None) -> Tensor:
        """``sum_i values[:, i] * W_dec[idx[:, i]]`` (divided by row norms when rescaling)."""
        values = values.to(self.W_dec.dtype)
        if norms is not None:
            values = values / _take(norms, idx).clamp_min(1e-12)
        out = F.embedding_bag(idx, self.W_dec.detach(), per_sample_weights=values, mode="sum")
        return self.joined(_DecoderGrad.apply(out, idx, values.detach(), self.W_dec))

    def _sparse_training_forward(
        self, x: Tensor, dead_mask: Tensor | None, target: Tensor
    ) -> TrainOutput:
        """Same losses and gradients as the dense path, touching only selected features."""
        k = self.k
        sae_in = self.entered(self.sae_in(x))
        norms = self.decoder_norms() if self.rescale_by_decoder_norm else None
        with torch.no_grad():
            if norms is None:
                ranked = torch.addmm(self.b_enc, sae_in, self.W_enc)
            else:
                # Contributions pre * ||W_dec_i||, with the norms folded into the encoder: a
                # d_in x d_sae product instead of one over the whole batch x d_sae.
                row_norms = norms.detach()
                ranked = torch.addmm(self.b_enc * row_norms, sae_in, self.W_enc * row_norms)
            idx, mine = self._picked(ranked, k)
            aux = self._aux_due(dead_mask)
            if aux:
                aux_k = self.cfg.resolved_aux_k()
                masked = torch.where(dead_mask, ranked, float("-inf"))  # type: ignore[arg-type]
                aux_idx, aux_mine = self._picked(masked, aux_k)
                idx_all = torch.cat([idx, aux_idx], dim=1)
            else:
                idx_all = idx
            selected = ranked.gather(1, idx_all)
        if norms is not None:  # back to plain pre-activations; the norms' gradient flows below
            taken = _take(norms, idx_all)
            selected = selected / taken.detach().clamp_min(1e-12)
        gathered = _GatherPreActs.apply(sae_in, self.W_enc, self.b_enc, selected, idx_all)
        if norms is not None:
            gathered = gathered * taken
        values = gathered[:, :k].relu()
        if mine is not None:  # another slice's features won these places
            values = torch.where(mine, values, 0.0)
        x_hat = self._sparse_decode(idx, values, norms) + self.b_dec
        losses = {"mse_loss": self.mse(x_hat, target)}
        if aux:
            residual = (target - x_hat).detach()
            # Fewer dead features than aux_k: the rest of the selection must not count.
            counted = dead_mask[aux_idx]  # type: ignore[index]
            if aux_mine is not None:
                counted = counted & aux_mine
            aux_values = torch.where(counted, gathered[:, k:].relu(), 0.0)
            aux_err = (self._sparse_decode(aux_idx, aux_values, norms) - residual).pow(2)
            dead = self.joined(dead_mask.sum().float())  # type: ignore[union-attr]
            scale = (dead / aux_k).clamp(max=1.0)
            losses["aux_loss"] = self.cfg.aux_k_coefficient * scale * aux_err.sum(-1).mean()
        else:
            losses["aux_loss"] = x_hat.new_zeros(())
        loss = losses["mse_loss"] + losses["aux_loss"]
        return SparseTrainOutput(loss, losses, x_hat, idx, values, self.d_sae)

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
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}


@torch.compiler.disable
def _any_dead(dead_mask: Tensor | None) -> bool:
    """Whether AuxK has work to do. On CPU the check is free; elsewhere it would synchronize
    the device every step, so there it always answers yes and the loss is zeroed on device.
    (Run eagerly under torch.compile: the answer decides which graph follows.)"""
    if dead_mask is None:
        return False
    return dead_mask.device.type != "cpu" or bool(dead_mask.any())


def _take(values: Tensor, idx: Tensor) -> Tensor:
    """``values[idx]`` whose backward is a deterministic ``index_add`` (advanced indexing's
    accumulating backward is not reproducible bit for bit on CPU)."""
    return values.index_select(0, idx.reshape(-1)).view(idx.shape)
