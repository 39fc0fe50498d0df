"""Cross-layer transcoder (CLT): layer l's features read layer l's MLP input and write, through
a decoder of their own, to the MLP output of layer l and of every later layer.

The learner sees one dictionary over concatenated hooks: an input ``[batch, L*d]`` (layer 0's
MLP input, then layer 1's, ...) and a target ``[batch, L*d]`` (the MLP outputs, same order).
Feature ``l*F + j`` is layer l's j-th feature. Parameters:

- ``W_enc [L, d, F]``, ``b_enc [L*F]``: layer l's encoder reads only layer l's input slice.
- ``W_dec_{i} [F, (L-i)*d]`` (``W_dec`` lists them): one row per feature of layer i holding
  its output to layers i..L-1 side by side (so it adds to the output slice ``[i*d:]``). The
  lower-triangular blocks (a feature writing to earlier layers) do not exist: about half the
  memory of a dense ``[L*F, L*d]`` decoder.
- ``b_dec [L*d]``: the output bias of every layer, flat, as an SAE's.

Sparsity is per layer (k per layer per token, per-layer BatchTopK thresholds, per-feature
JumpReLU thresholds), never across layers, so the output of layer j depends only on the
inputs of layers <= j (:attr:`CrossLayerTranscoder.causal`): the evaluator splices the CLT in
layer by layer with later inputs zero-filled and relies on it.

Each sparsity is a subclass of both :class:`CrossLayerTranscoder` (the layout: encode to and
decode from the blocks, decoder norms, folding, saving) and the architecture's SAE class (its
activation and losses, which only call the layout's methods).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drrik.sae.base import DECODER_INIT_NORM, SAE, SparseTrainOutput, TrainOutput, as_scale
from drrik.sae.batchtopk import BatchTopKSAE
from drrik.sae.config import SAEConfig
from drrik.sae.jumprelu import JumpReLUSAE
from drrik.sae.registry import register_clt
from drrik.sae.relu import ReLUSAE
from drrik.sae.topk import TopKSAE, _any_dead, _DecoderGrad, _GatherPreActs

ADAM_COPIES = 3
"""Copies of every parameter Adam training holds: the weights and its two moments."""


def _unit_rows(n: int, width: int) -> Tensor:
    """``[n, width]`` random unit rows (float32, CPU: one seed, one CLT on every device)."""
    directions = torch.randn(n, width)
    return directions / directions.norm(dim=1, keepdim=True)


class _Assemble(torch.autograd.Function):
    """``bias + sum_i pad_left(parts[i], i*d)``: each source layer's output added into the
    slice of the layers it writes. Autograd of in-place slice adds would copy the whole
    ``[N, L*d]`` gradient once per layer (a third of a 30-layer step on CPU); here each part's
    gradient is a view of the output's."""

    @staticmethod
    def forward(ctx: Any, d_layer: int, bias: Tensor, *parts: Tensor) -> Tensor:  # type: ignore[override]
        ctx.d_layer, ctx.bias_shape = d_layer, bias.shape
        out = parts[0] + bias
        for i, part in enumerate(parts[1:], start=1):
            out[:, i * d_layer :] += part
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        d = ctx.d_layer
        grad_bias = grad.sum(0) if ctx.bias_shape != torch.Size([]) else grad.sum()
        parts = [grad[:, i * d :] for i in range(grad.shape[1] // d)]
        return None, grad_bias if ctx.needs_input_grad[1] else None, *parts


def decoder_memory(cfg: SAEConfig) -> str:
    """One line on the size of a CLT's decoders, the bulk of its memory: L(L+1)/2 blocks of
    ``F x d``, their bytes in the parameter dtype, and with Adam's two moments."""
    n_layers, d_layer = cfg.n_layers(), cfg.hook_widths[0]
    blocks = n_layers * (n_layers + 1) // 2
    params = blocks * (cfg.resolved_d_sae() // n_layers) * d_layer
    gigabytes = params * cfg.torch_dtype().itemsize / 1e9
    return (
        f"CLT decoders: {blocks} blocks, {params / 1e6:.1f}M parameters, {gigabytes:.2f} GB "
        f"({ADAM_COPIES * gigabytes:.2f} GB with Adam)"
    )


class CrossLayerTranscoder(SAE):
    """The CLT layout (module docstring); a sparsity subclass adds the activation and losses."""

    supports_ghost_grads: ClassVar[bool] = False
    causal: ClassVar[bool] = True
    """Output layer j depends only on input layers <= j (per-layer sparsity)."""
    extra_tensor_names: ClassVar[tuple[str, ...]] = ()
    """The sparsity's own saved tensors (thresholds)."""

    @classmethod
    def default_normalize_decoder(cls, cfg: SAEConfig) -> bool:
        """Free rows, except for an L1 that ignores decoder norms (growing rows would shrink
        it for free). Unit rows would not survive the export anyway: folding per-layer target
        scales divides each layer's columns by its own scale. And holding them costs a pass
        over every decoder block per step, a CLT's largest tensors, which a sparse TopK step
        otherwise touches only in the selected rows."""
        return cfg.architecture == "relu" and not cfg.scale_sparsity_by_decoder_norm

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        nn.Module.__init__(self)  # SAE.__init__ would allocate a dense [L*F, L*d] decoder
        cfg.check_buildable()
        cfg.check_clt()
        self.cfg = cfg
        self.n_layers = L = cfg.n_layers()
        self.d_layer = d = cfg.hook_widths[0]
        self.d_in = self.d_out = L * d
        self.d_sae = cfg.resolved_d_sae()
        self.features_per_layer = n = self.d_sae // L
        self.normalize_decoder = cfg.resolved_normalize_decoder()
        dtype = cfg.torch_dtype()
        row_norm = 1.0 if self.normalize_decoder else DECODER_INIT_NORM
        W_enc = _unit_rows(L * n, d).view(L, n, d).transpose(1, 2).contiguous()
        self.W_enc = nn.Parameter(W_enc.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(L * n, device=device, dtype=dtype))
        for i in range(L):
            W_dec = (_unit_rows(n, (L - i) * d) * row_norm).to(device=device, dtype=dtype)
            self.register_parameter(f"W_dec_{i}", nn.Parameter(W_dec))
        self.b_dec = nn.Parameter(torch.zeros(L * d, device=device, dtype=dtype))
        self.W_skip = None

    @property
    def W_dec(self) -> list[nn.Parameter]:  # type: ignore[override]
        """The decoder blocks, ``W_dec_{i} [F, (L-i)*d]``: separate parameters (not a
        ParameterList) so that each is an attribute, saved and loaded under its own name."""
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    # ---- forward --------------------------------------------------------------------------

    def sae_in(self, x: Tensor) -> Tensor:
        """``x`` in the CLT's dtype. ``b_dec`` is never subtracted: it lives in the output
        hooks, not the input ones (``apply_b_dec_to_input`` is ignored)."""
        return x.to(self.W_enc.dtype)

    def layer_pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``[N, L, F]`` of inputs ``[..., L*d]``: one batched matmul, each
        layer's encoder on its own input slice."""
        by_layer = self.sae_in(x).reshape(-1, self.n_layers, self.d_layer).transpose(0, 1)
        bias = self.b_enc.view(self.n_layers, 1, self.features_per_layer)
        return torch.baddbmm(bias, by_layer, self.W_enc).transpose(0, 1)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations ``[..., L*F]`` of inputs ``[..., L*d]``."""
        return self.layer_pre_acts(x).reshape(*x.shape[:-1], self.d_sae)

    def by_layer(self, acts: Tensor) -> Tensor:
        """``[..., L*F]`` as ``[..., L, F]``."""
        return acts.unflatten(-1, (self.n_layers, self.features_per_layer))

    def assemble(self, parts: list[Tensor], bias: Tensor) -> Tensor:
        """``bias`` plus every source layer's output ``parts[i] [N, (L-i)*d]`` added to the
        output slice of layers i..L-1."""
        return _Assemble.apply(self.d_layer, bias, *parts)

    def decode_directions(self, feature_acts: Tensor) -> Tensor:
        """``feature_acts [..., L*F]`` through the decoder blocks, without ``b_dec``."""
        acts = self.by_layer(feature_acts).reshape(-1, self.n_layers, self.features_per_layer)
        parts = [acts[:, i] @ W for i, W in enumerate(self.W_dec)]
        out = self.assemble(parts, acts.new_zeros(()))
        return out.reshape(*feature_acts.shape[:-1], self.d_out)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return self.decode_directions(feature_acts) + self.b_dec

    def decoder_norms(self) -> Tensor:
        """``[L*F]``: each feature's decoder norm over every layer it writes."""
        return torch.cat([W.norm(dim=1) for W in self.W_dec])

    # ---- decoder-norm constraint -----------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """:meth:`SAE.remove_parallel_decoder_grad` on each block's (whole-row) gradient."""
        if not self.normalize_decoder:
            return
        for W in self.W_dec:
            if W.grad is not None:
                unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
                W.grad.sub_((W.grad * unit).sum(dim=1, keepdim=True) * unit)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        """Unit norm over each feature's whole row (all the layers it writes)."""
        if self.normalize_decoder:
            for W in self.W_dec:
                W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- folding ---------------------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_scale(
        self, scale: float | Tensor, target_scale: float | Tensor | None = None
    ) -> None:
        """Always the per-hook fold (:meth:`SAE._fold_hook_scales`), for floats too: per-layer
        target scales give the features no one unit to move to."""
        self._fold_hook_scales(scale, scale if target_scale is None else target_scale)

    def _fold_hook_scales(self, scale: float | Tensor, target_scale: float | Tensor) -> None:
        """The per-hook fold on the block layout: encoder rows take the input scale, each
        decoder block's output columns and ``b_dec`` the inverse target scale."""
        scale, target = as_scale(scale, self.d_in), as_scale(target_scale, self.d_out)
        self.W_enc.mul_(scale.view(self.n_layers, self.d_layer, 1).to(self.W_enc))
        for i, W in enumerate(self.W_dec):
            W.div_(target[i * self.d_layer :].to(W))
        self.b_dec.div_(target.to(self.b_dec))

    def feature_params(self) -> list[tuple[nn.Parameter, int]]:
        raise NotImplementedError(
            "resampling dead features is not implemented for a cross-layer transcoder "
            "(its decoder is split in blocks); use AuxK (topk, batchtopk) instead"
        )

    # ---- saving ----------------------------------------------------------------------------

    def saelens_weight_names(self) -> tuple[str, ...]:
        """``W_enc [L, d, F]``, ``b_enc [L*F]``, ``b_dec [L*d]``, ``W_dec_{i} [F, (L-i)*d]``
        and the sparsity's thresholds, exactly as held (a bit-exact round trip)."""
        decoders = tuple(f"W_dec_{i}" for i in range(self.n_layers))
        return ("W_enc", "b_enc", "b_dec", *decoders, *self.extra_tensor_names)

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The tensors as held: the sparsity classes' conversions for SAELens (a threshold from
        its log, a broadcast one) would cost bit-exactness, and SAELens loads no CLT anyway."""
        return SAE.saelens_tensors(self)

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        SAE.load_saelens_tensors(self, tensors)

    def saelens_cfg_extras(self) -> dict[str, Any]:
        """The layout's sizes (SAELens has no CLT class and cannot load one anyway)."""
        extras = {"n_layers": self.n_layers, "features_per_layer": self.features_per_layer}
        return {**extras, "k": self.cfg.resolved_k()} if self.needs_k else extras

    def encode_layer(self, layer: int, x: Tensor) -> Tensor:
        """Layer ``layer``'s eval-mode features ``[N, F]`` from its own input ``[N, d]``: what
        an in-place evaluation computes as each layer's input arrives, at 1/L of the cost of
        :meth:`encode` (the sparsity is per layer, so the result is the same)."""
        cols = slice(layer * self.features_per_layer, (layer + 1) * self.features_per_layer)
        pre = torch.addmm(self.b_enc[cols], self.sae_in(x), self.W_enc[layer])
        return self.layer_activation(pre, cols)

    def layer_activation(self, pre: Tensor, cols: slice) -> Tensor:
        """The eval-mode activation of one layer's pre-activations (features ``cols``)."""
        theta = self.feature_thresholds()
        return pre.relu() if theta is None else pre * (pre > theta[cols])

    def decode_layer(self, layer: int, feats: list[Tensor]) -> Tensor:
        """Layer ``layer``'s output ``[N, d]`` from the features of layers ``0..layer``
        (``feats[i]`` ``[N, F]``), with its ``b_dec``."""
        d = self.d_layer
        out = self.b_dec[layer * d : (layer + 1) * d]
        for i, acts in enumerate(feats):
            out = out + acts @ self.W_dec[i][:, (layer - i) * d : (layer - i + 1) * d]
        return out

    def feature_thresholds(self) -> Tensor | None:
        """``[L*F]`` thresholds θ with which ``pre * (pre > θ)`` is this CLT's activation in
        eval mode (circuit-tracer's JumpReLU), or None where the activation is ReLU."""
        return None


@register_clt
class ReLUCLT(CrossLayerTranscoder, ReLUSAE):
    """ReLU features; L1 weighted by each feature's decoder norm over all its target layers
    (``scale_sparsity_by_decoder_norm``)."""


@register_clt
class JumpReLUCLT(CrossLayerTranscoder, JumpReLUSAE):
    """Per-feature JumpReLU thresholds, trained through the L0 penalty's straight-through
    estimator; ``start_near_l0`` reads ``target_l0`` per layer."""

    extra_tensor_names = ("log_threshold",)

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device=device)
        self.log_threshold = self.initial_log_threshold(device)

    def feature_thresholds(self) -> Tensor:
        return self.threshold.detach()


@register_clt
class TopKCLT(CrossLayerTranscoder, TopKSAE):
    """The k largest activations of every layer per token, plus AuxK over dead features.

    Selection ranks plain pre-activations, never ``pre * ||W_dec_i||`` as a free-row
    :class:`TopKSAE` does: folding per-layer target scales changes row norms by a different
    factor in each layer, so a norm-weighted ranking would not survive the export.
    """

    @property
    def selection_width(self) -> int:
        return self.features_per_layer

    @property
    def rescale_by_decoder_norm(self) -> bool:
        return False

    @property
    def aux_k_per_layer(self) -> int:
        """Dead features per layer AuxK uses: ``aux_k``, else d/2, at most F."""
        aux_k = self.cfg.aux_k if self.cfg.aux_k is not None else max(self.d_layer // 2, 1)
        return min(aux_k, self.features_per_layer)

    def layer_activation(self, pre: Tensor, cols: slice) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def activation(self, pre: Tensor) -> Tensor:
        """Keep the k largest ReLU'd values of each layer, zero the rest."""
        by_layer = self.by_layer(pre)
        values, indices = by_layer.topk(self.k, dim=-1)
        return torch.zeros_like(by_layer).scatter(-1, indices, values.relu()).flatten(-2)

    def _aux_scale(self, dead_mask: Tensor) -> Tensor:
        """AuxK's weight: fades out as the dead features revive."""
        return (dead_mask.sum() / (self.aux_k_per_layer * self.n_layers)).clamp(max=1.0)

    def aux_k_loss(
        self, target: Tensor, x_hat: Tensor, pre: Tensor, dead_mask: Tensor | None
    ) -> Tensor:
        """AuxK with each layer's ``aux_k_per_layer`` largest dead features; see
        :meth:`TopKSAE.aux_k_loss`."""
        if dead_mask is None or not _any_dead(dead_mask):
            return x_hat.new_zeros(())
        residual = (target - x_hat).detach()
        masked = self.by_layer(torch.where(dead_mask, pre, float("-inf")))
        values, indices = masked.topk(self.aux_k_per_layer, dim=-1)
        aux_acts = torch.zeros_like(masked).scatter(-1, indices, values.relu()).flatten(-2)
        aux_err = (self.decode_directions(aux_acts) - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_k_coefficient * self._aux_scale(dead_mask) * aux_err

    def _sparse_decode(self, layer: int, idx: Tensor, values: Tensor) -> Tensor:
        """Source layer ``layer``'s output ``[N, (L-layer)*d]`` from its selected features,
        reading only their rows; W_dec's gradient is as sparse."""
        W = self.W_dec[layer]
        values = values.to(W.dtype)
        out = F.embedding_bag(idx, W.detach(), per_sample_weights=values, mode="sum")
        return _DecoderGrad.apply(out, idx, values.detach(), W)

    def _sparse_training_forward(
        self, x: Tensor, dead_mask: Tensor | None, target: Tensor
    ) -> TrainOutput:
        """The dense path's losses and gradients, per layer touching only selected features."""
        k, n = self.k, self.features_per_layer
        sae_in = self.sae_in(x).unflatten(-1, (self.n_layers, self.d_layer))
        with torch.no_grad():
            ranked = self.layer_pre_acts(x)
            idx = ranked.topk(k, dim=-1).indices
            aux = _any_dead(dead_mask)
            if aux:
                layer_dead = dead_mask.view(self.n_layers, n)  # type: ignore[union-attr]
                masked = torch.where(layer_dead, ranked, float("-inf"))
                aux_idx = masked.topk(self.aux_k_per_layer, dim=-1).indices
                idx_all = torch.cat([idx, aux_idx], dim=-1)
            else:
                idx_all = idx
            selected = ranked.gather(-1, idx_all)
        b_enc = self.b_enc.view(-1, n).unbind(0)
        encoders = zip(sae_in.unbind(1), self.W_enc.unbind(0), b_enc, strict=True)
        parts, aux_parts, values = [], [], []
        for i, (layer_in, W_enc, b_enc) in enumerate(encoders):
            layer_idx = idx_all[:, i].contiguous()
            own, dead = layer_idx[:, :k].contiguous(), layer_idx[:, k:].contiguous()
            gathered = _GatherPreActs.apply(layer_in, W_enc, b_enc, selected[:, i], layer_idx)
            values.append(gathered[:, :k].relu())
            parts.append(self._sparse_decode(i, own, values[-1]))
            if aux:
                # Fewer dead features than aux_k: the rest of the selection must not count.
                aux_values = torch.where(layer_dead[i][dead], gathered[:, k:].relu(), 0.0)
                aux_parts.append(self._sparse_decode(i, dead, aux_values))
        x_hat = self.assemble(parts, self.b_dec)
        losses = {"mse_loss": self.mse(x_hat, target)}
        if aux:
            aux_hat = self.assemble(aux_parts, x_hat.new_zeros(()))
            aux_err = (aux_hat - (target - x_hat).detach()).pow(2).sum(-1).mean()
            scale = self._aux_scale(dead_mask)  # type: ignore[arg-type]
            losses["aux_loss"] = self.cfg.aux_k_coefficient * scale * aux_err
        else:
            losses["aux_loss"] = x_hat.new_zeros(())
        loss = losses["mse_loss"] + losses["aux_loss"]
        offsets = torch.arange(self.n_layers, device=idx.device)[:, None] * n
        global_idx = (idx + offsets).flatten(1)
        return SparseTrainOutput(
            loss, losses, x_hat, global_idx, torch.cat(values, dim=1), self.d_sae
        )


@register_clt
class BatchTopKCLT(TopKCLT, BatchTopKSAE):
    """Each layer keeps its ``k * batch`` largest activations over the batch in training; in
    eval mode each layer's features fire above that layer's threshold (an EMA, as
    :class:`BatchTopKSAE`'s)."""

    extra_tensor_names = ("threshold", "threshold_updates")

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__(cfg, device=device)
        self.register_thresholds((self.n_layers,), device)

    def batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Per layer, keep the ``k * tokens`` largest ReLU'd activations of the batch; also
        return them, ``[L, k * tokens]``."""
        by_layer = self.by_layer(pre.relu()).reshape(-1, self.n_layers, self.features_per_layer)
        tokens = by_layer.shape[0]
        flat = by_layer.transpose(0, 1).reshape(self.n_layers, -1)
        values, indices = flat.topk(self.k * tokens, dim=-1)
        kept = torch.zeros_like(flat).scatter(-1, indices, values)
        acts = kept.view(self.n_layers, tokens, -1).transpose(0, 1).reshape(pre.shape)
        return acts, values

    def feature_thresholds(self) -> Tensor:
        return self.threshold.detach().repeat_interleave(self.features_per_layer)

    def layer_activation(self, pre: Tensor, cols: slice) -> Tensor:
        return CrossLayerTranscoder.layer_activation(self, pre, cols)

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return self.batch_topk(pre)[0]
        return pre * (pre > self.feature_thresholds())
