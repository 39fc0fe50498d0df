"""The one SAE interface every architecture implements.

Layout follows SAELens so saved SAEs load there: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_out]``, ``b_enc [d_sae]``, ``b_dec [d_out]``, and a skip transcoder's
``W_skip [d_out, d_in]``. An SAE has ``d_out == d_in``.

Loss convention: reconstruction error is the squared L2 norm summed over ``d_in`` and
averaged over the batch; sparsity terms are summed over features and averaged over the batch.
Both sides of the trade-off then scale the same way with width, so a coefficient tuned at one
``d_in`` means the same at another (averaging the MSE over ``d_in`` while summing the L1 made
the first drrik's coefficient depend on ``d_in``).

Nothing in the training path reads a value back to the host (no ``.item()``, no
data-dependent Python branches), so a GPU step never stalls on a sync.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from drrik.sae import saving
from drrik.sae.config import SAEConfig
from drrik.sae.feature_shards import FeatureShards
from drrik.sae.registry import sae_class

DECODER_INIT_NORM = 0.1
"""Initial decoder-row norm when rows are not held at unit norm (Anthropic, April 2024)."""


def firing_quantile(pre: Tensor, per_token: float) -> Tensor:
    """Per feature, the value its pre-activations ``pre`` ([tokens, d_sae]) exceed on
    ``per_token / d_sae`` of the tokens: a start at which about ``per_token`` features fire."""
    n, d_sae = pre.shape
    kept = min(n, max(1, round(n * per_token / d_sae)))
    return pre.float().topk(kept, dim=0).values[-1]


def as_scale(value: float | Tensor, width: int) -> Tensor:
    """A scale as a float32 ``[width]`` vector, refused unless finite and > 0 everywhere."""
    scale = torch.as_tensor(value, dtype=torch.float32).expand(width)
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"fold_activation_scale needs finite scales > 0, got {value!r}")
    return scale


@dataclass
class TrainOutput:
    """What one training forward pass returns.

    ``losses`` holds the terms exactly as they enter ``loss`` (already multiplied by their
    coefficients), so ``sum(losses.values()) == loss``. All are scalar tensors on device.
    """

    loss: Tensor
    losses: dict[str, Tensor]
    feature_acts: Tensor
    x_hat: Tensor

    # Every architecture's activations are >= 0, so a feature fired where its maximum is > 0
    # and a token's L0 is the sum of the signs: single passes over the batch x d_sae
    # activations in their own dtype (a boolean mask's sum over features takes 15x longer).
    def fired(self) -> Tensor:
        """``[d_sae]`` bool: features active on at least one token of the batch."""
        return self.feature_acts.amax(dim=0) > 0

    def l0(self) -> Tensor:
        """Mean number of active features per token (a float scalar on device)."""
        return self.feature_acts.sign().sum(dim=-1).float().mean()


class SparseTrainOutput(TrainOutput):
    """A training output that holds only each token's selected features.

    ``fired`` and ``l0`` read the selection; the dense ``feature_acts`` (``batch x d_sae``,
    far larger than everything else a sparse step touches) is built only if something reads it.
    """

    def __init__(
        self,
        loss: Tensor,
        losses: dict[str, Tensor],
        x_hat: Tensor,
        indices: Tensor,
        values: Tensor,
        d_sae: int,
    ) -> None:
        self.loss, self.losses, self.x_hat = loss, losses, x_hat
        self.indices, self.values, self.d_sae = indices, values.detach(), d_sae

    @functools.cached_property
    def feature_acts(self) -> Tensor:  # type: ignore[override]
        dense = self.values.new_zeros(self.indices.shape[0], self.d_sae)
        return dense.scatter_(1, self.indices, self.values)

    def fired(self) -> Tensor:
        counts = self.values.new_zeros(self.d_sae, dtype=torch.float32)
        active = (self.values > 0).reshape(-1).float()
        return counts.index_add_(0, self.indices.reshape(-1), active) > 0

    def l0(self) -> Tensor:
        return (self.values > 0).sum(dim=-1).float().mean()


class SAE(nn.Module):
    """Base sparse autoencoder: linear encoder, architecture-specific activation, linear decoder.

    Subclasses set ``architecture`` / ``saelens_architecture`` (and the class flags below),
    implement :meth:`encode` and :meth:`training_forward`, and override the hooks further
    down when they own extra per-feature parameters (JumpReLU thresholds, gated magnitudes).
    """

    architecture: ClassVar[str]
    saelens_architecture: ClassVar[str]
    needs_k: ClassVar[bool] = False
    """Whether the config must set ``k``."""
    supports_ghost_grads: ClassVar[bool] = False
    """Whether ``use_ghost_grads`` is allowed."""
    features: FeatureShards | None = None
    """Set when this module holds one slice of a feature-parallel dictionary: the forward
    pass then joins the slices with collectives (:mod:`drrik.sae.feature_shards`)."""

    @classmethod
    def default_normalize_decoder(cls, cfg: SAEConfig) -> bool:
        """Unit-norm decoder rows unless the sparsity penalty is weighted by decoder norms:
        such a penalty already removes the incentive to grow rows, so they may stay free."""
        return not cfg.scale_sparsity_by_decoder_norm

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        cfg.check_buildable()
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.d_out = cfg.resolved_d_out()
        self.d_sae = cfg.resolved_d_sae()
        self.normalize_decoder = cfg.resolved_normalize_decoder()
        dtype = cfg.torch_dtype()
        # Drawn on CPU in float32 so one seed gives the same SAE on every device and dtype.
        # The encoder starts as the decoder's transpose, which needs equal widths.
        W_dec = self._unit_rows(self.d_out) * (1.0 if self.normalize_decoder else DECODER_INIT_NORM)
        W_enc = W_dec.T if self.d_out == self.d_in else self._unit_rows(self.d_in).T
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(W_enc.contiguous().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))
        skip = torch.zeros(self.d_out, self.d_in, device=device, dtype=dtype)
        self.W_skip = nn.Parameter(skip) if cfg.skip_connection else None

    def _unit_rows(self, width: int) -> Tensor:
        """``[d_sae, width]`` random unit rows (float32, CPU)."""
        directions = torch.randn(self.d_sae, width)
        return directions / directions.norm(dim=1, keepdim=True)

    # ---- forward --------------------------------------------------------------------------

    def sae_in(self, x: Tensor) -> Tensor:
        """The encoder's input: ``x`` in the SAE's dtype, minus ``b_dec`` when configured."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc``.

        One fused op, so under autocast the ``batch x d_sae`` result and everything computed
        from it stay in bf16 (a separate fp32 bias add would promote them all to fp32).
        """
        return torch.nn.functional.linear(self.entered(self.sae_in(x)), self.W_enc.t(), self.b_enc)

    def entered(self, sae_in: Tensor) -> Tensor:
        """The encoder's input as this slice of the features reads it (see ``features``)."""
        return sae_in if self.features is None else self.features.enter(sae_in)

    def joined(self, partial: Tensor) -> Tensor:
        """A sum over features (a decoder output, an L1) completed over every slice."""
        return partial if self.features is None else self.features.join(partial)

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]`` for inputs ``[..., d_in]``."""
        raise NotImplementedError

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction ``feature_acts @ W_dec + b_dec``."""
        return self.joined(feature_acts @ self.W_dec) + self.b_dec

    def skip(self, x: Tensor) -> Tensor | None:
        """The skip connection's term ``x @ W_skip.T``, or ``None`` without one."""
        if self.W_skip is None:
            return None
        return torch.nn.functional.linear(x.to(self.W_skip.dtype), self.W_skip)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (an SAE) or of the target hook (a transcoder)."""
        out = self.decode(self.encode(x))
        skip = self.skip(x)
        return out if skip is None else out + skip

    def fit_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> TrainOutput:
        """:meth:`training_forward` with the skip connection, if any.

        The dictionary reconstructs what the skip leaves, ``target - skip(x)``, so every
        architecture's losses (MSE, AuxK, ghost grads) measure the right residual and train
        ``W_skip`` through it, with no architecture knowing about the skip. ``x_hat`` is the
        whole output.
        """
        skip = self.skip(x)
        if skip is None:
            return self.training_forward(x, sparsity_coefficient, dead_mask, target)
        residual = (x if target is None else target) - skip
        out = self.training_forward(x, sparsity_coefficient, dead_mask, residual)
        out.x_hat = out.x_hat + skip
        return out

    def training_forward(
        self,
        x: Tensor,
        sparsity_coefficient: float | Tensor,
        dead_mask: Tensor | None = None,
        target: Tensor | None = None,
    ) -> TrainOutput:
        """Loss and activations for one batch ``x [batch, d_in]``.

        ``dead_mask [d_sae]`` (bool) marks dead features for the auxiliary losses that
        revive them (ghost grads, AuxK); ``None`` turns those losses off. ``target`` is what
        the decoder reconstructs, where that is not ``x`` (a transcoder's output hook).
        """
        raise NotImplementedError

    def feature_total(self, acts: Tensor, weights: Tensor | None = None) -> Tensor:
        """``sum_i acts_i * weights_i`` averaged over tokens, for ``acts [..., d_sae]``.

        Summed over the batch first, then weighted: the same value as weighting every
        activation, without a second ``batch x d_sae`` tensor forward and back. The batch sum
        runs in the activations' dtype with autocast off (it accumulates in float32 anyway and
        rounds once per feature): CUDA autocast would copy a bf16 ``batch x d_sae`` tensor to
        float32 first, and so would asking for a float32 result on CPU.
        """
        with torch.autocast(acts.device.type, enabled=False):
            per_feature = acts.reshape(-1, self.d_sae).sum(0)
        per_feature = per_feature.to(torch.promote_types(acts.dtype, torch.float32))
        if weights is not None:
            per_feature = per_feature * weights
        return self.joined(per_feature.sum()) / (acts.numel() // self.d_sae)

    @staticmethod
    def mse(x_hat: Tensor, x: Tensor) -> Tensor:
        """Squared error summed over ``d_in``, averaged over the batch (in the wider dtype of
        the two, so a bf16 reconstruction is not compared with a bf16-rounded input)."""
        return (x_hat - x).pow(2).sum(dim=-1).mean()

    def decoder_norms(self) -> Tensor:
        """L2 norm of each decoder row, ``[d_sae]``."""
        return self.W_dec.norm(dim=1)

    # ---- decoder-norm constraint -----------------------------------------------------------

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the part of ``W_dec.grad`` parallel to each decoder row.

        Call after ``backward`` and *before* ``optimizer.step()``: that component would only
        change row norms, which :meth:`normalize_decoder_rows` undoes anyway, and it would
        pollute Adam's moments. No-op when rows are not held at unit norm.
        """
        grad = self.W_dec.grad
        if not self.normalize_decoder or grad is None:
            return
        unit = self.W_dec / self.decoder_norms().clamp_min(1e-12)[:, None]
        grad.sub_((grad * unit).sum(dim=1, keepdim=True) * unit)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        """Rescale decoder rows to unit norm; call after ``optimizer.step()``.

        No-op when the architecture keeps rows free (decoder-norm-weighted sparsity).
        """
        if self.normalize_decoder:
            self.W_dec.div_(self.decoder_norms().clamp_min(1e-12)[:, None])

    # ---- folding ---------------------------------------------------------------------------

    @torch.no_grad()
    def fold_activation_scale(
        self, scale: float | Tensor, target_scale: float | Tensor | None = None
    ) -> None:
        """Turn a dictionary trained on ``x * scale`` (and, for a transcoder, on targets
        ``y * target_scale``) into one for raw ``x`` and ``y``, exactly.

        Afterwards ``new(x) == old(x * scale) / target_scale``. Feature activations shrink by
        ``target_scale`` (they are now in raw output units) while decoder rows keep their
        norm, so a unit-norm decoder stays unit-norm: every encoder bias, decoder bias and
        threshold is divided by ``target_scale``, and the encoder and skip weights, which read
        raw inputs now, are multiplied by ``scale / target_scale`` (1 for an SAE). Scales must
        be finite and > 0 (the store refuses activations that would give another).
        """
        target_scale = scale if target_scale is None else target_scale
        if isinstance(scale, Tensor) or isinstance(target_scale, Tensor):
            self._fold_hook_scales(scale, target_scale)
            return
        for value in (scale, target_scale):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"fold_activation_scale needs a finite scale > 0, got {value!r}")
        if scale != target_scale:
            self.W_enc.mul_(scale / target_scale)
            if self.W_skip is not None:
                self.W_skip.mul_(scale / target_scale)
        self.b_enc.div_(target_scale)
        self.b_dec.div_(target_scale)
        self._fold_scale_extras(target_scale)

    def _fold_hook_scales(self, scale: float | Tensor, target_scale: float | Tensor) -> None:
        """The fold for per-hook scales (``[d_in]`` and ``[d_out]``, a crosscoder's): feature
        activations cannot shrink by one number, so they keep their training units (and every
        threshold stays), the encoder rows take the input scale and the decoder's output
        columns and bias the target scale's inverse. Decoder rows lose their unit norm."""
        scale, target_scale = as_scale(scale, self.d_in), as_scale(target_scale, self.d_out)
        self.W_enc.mul_(scale.to(self.W_enc)[:, None])
        self.W_dec.div_(target_scale.to(self.W_dec))
        self.b_dec.div_(target_scale.to(self.b_dec))
        if self.W_skip is not None:
            self.W_skip.mul_(scale.to(self.W_skip)[None, :] / target_scale.to(self.W_skip)[:, None])

    def _fold_scale_extras(self, scale: float) -> None:
        """Divide architecture-specific biases/thresholds by ``scale``."""

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Adam's parameter groups: one by default; an architecture may give some parameters a
        multiple of the learning rate (``lr_scale``)."""
        return [{"params": list(self.parameters())}]

    def start_near_l0(self, x: Tensor, target_l0: int) -> None:
        """Before training with ``target_l0``: set whatever the L0 cannot move fast from
        inputs ``x`` (as the encoder sees them), so the run starts near the target. Nothing
        by default: a coefficient moves a penalty's L0 within tens of steps."""

    # ---- per-feature parameters (resampling) -----------------------------------------------

    def feature_params(self) -> list[tuple[nn.Parameter, int]]:
        """Every parameter with a per-feature axis, and that axis (for resampling)."""
        return [(self.W_enc, 1), (self.W_dec, 0), (self.b_enc, 0)]

    def _reset_feature_extras(self, mask: Tensor) -> None:
        """Reset architecture-specific per-feature parameters of features in ``mask``."""

    # ---- SAELens layout --------------------------------------------------------------------

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Tensors to write to ``sae_weights.safetensors``, named as SAELens expects."""
        return {name: getattr(self, name).detach() for name in self.saelens_weight_names()}

    def saelens_weight_names(self) -> tuple[str, ...]:
        """The shared tensors every saved dictionary holds (``W_skip`` with a skip)."""
        shared = ("W_enc", "W_dec", "b_enc", "b_dec")
        return shared if self.W_skip is None else (*shared, "W_skip")

    def saelens_cfg_extras(self) -> dict[str, Any]:
        """Architecture-specific keys for SAELens's ``cfg.json``."""
        return {}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`saelens_tensors`."""
        for name in self.saelens_weight_names():
            getattr(self, name).copy_(tensors[name])

    def save(
        self,
        directory: str | Path,
        sparsity: Tensor | None = None,
        metadata: dict[str, Any] | None = None,
        threshold: Tensor | None = None,
    ) -> Path:
        """Write the SAE atomically in SAELens's directory layout; see :mod:`drrik.sae.saving`
        (``threshold`` saves a TopK transcoder for SAELens as a JumpReLU one)."""
        return saving.save_sae(self, directory, sparsity, metadata, threshold)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str | None = None) -> SAE:
        """Load an SAE written by :meth:`save` (or by SAELens) as the right subclass."""
        return saving.load_sae(directory, device=device)

    @classmethod
    def from_config(cls, cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
        """Build the registered class for ``cfg.architecture``."""
        return sae_class(cfg)(cfg, device=device)
