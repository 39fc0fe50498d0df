"""Dead features: find them without host syncs, revive them by resampling.

Resampling follows Anthropic's "Towards Monosemanticity" (2023): dead features are pointed at
inputs the SAE reconstructs badly, so they start where they can lower the loss the most.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drrik.sae.base import SAE

RESAMPLE_ENCODER_SCALE = 0.2
"""New encoder columns get this fraction of the mean alive encoder-column norm."""


class DeadFeatureTracker:
    """Tokens since each feature last fired, kept on device.

    Under data parallelism, all-reduce the firing mask (or the counter, with MIN) across ranks
    before trusting :meth:`dead_mask`; this class sees only its own tokens.
    """

    def __init__(self, d_sae: int, device: torch.device | str | None = None) -> None:
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, feature_acts: Tensor) -> None:
        """Count the batch's tokens; reset features that fired on any of them. No host sync."""
        acts = feature_acts.reshape(-1, feature_acts.shape[-1])
        self.record((acts > 0).any(dim=0), acts.shape[0])

    @torch.no_grad()
    def record(self, fired: Tensor, tokens: int) -> None:
        """Count ``tokens`` and reset the ``fired`` features (data parallelism passes the
        firing mask all-reduced over ranks and the global token count)."""
        self.tokens_since_fired.add_(tokens).masked_fill_(fired, 0)

    def dead_mask(self, window_tokens: int) -> Tensor:
        """Bool ``[d_sae]``: features that have not fired in the last ``window_tokens`` tokens."""
        return self.tokens_since_fired >= window_tokens

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


@torch.no_grad()
def resample_dead_features(
    sae: SAE,
    optimizer: torch.optim.Optimizer | None,
    dead_mask: Tensor,
    inputs: Tensor,
    targets: Tensor | None = None,
) -> None:
    """Re-initialize dead features from badly reconstructed inputs; vectorized, no host sync.

    Inputs are drawn (with replacement) with probability proportional to their squared
    reconstruction error (uniformly if all errors are 0). For a dead feature and its drawn
    input ``x``, with ``v`` the unit vector along the encoder's input ``x - b_dec`` (or
    ``x``, without ``apply_b_dec_to_input``): the decoder row becomes
    ``v`` (a transcoder's, given ``targets``, the unit vector along its drawn target), the
    encoder column ``v * 0.2 * mean alive encoder-column norm`` and ``b_enc`` 0;
    architecture-specific per-feature parameters go back to their initial values. Adam's
    ``exp_avg`` / ``exp_avg_sq`` for those entries are zeroed; alive features are untouched.

    Draws one input per feature and keeps only the dead ones' draws, so nothing depends on
    how many features are dead.
    """
    inputs = inputs.reshape(-1, sae.d_in).to(sae.W_dec.dtype)
    outputs = inputs if targets is None else targets.reshape(-1, sae.d_out).to(inputs.dtype)
    errors = (sae(inputs) - outputs).pow(2).sum(dim=-1).float()
    weights = torch.where(errors.sum() > 0, errors, torch.ones_like(errors))
    picks = torch.multinomial(weights, sae.d_sae, replacement=True)
    directions = _unit(sae.sae_in(inputs[picks]))
    decoder_rows = directions if targets is None else _unit(outputs[picks])

    alive = ~dead_mask
    enc_norms = sae.W_enc.norm(dim=0)
    n_alive = alive.sum()
    mean_alive = torch.where(
        n_alive > 0, (enc_norms * alive).sum() / n_alive.clamp_min(1), torch.ones_like(enc_norms[0])
    )
    dead_rows = dead_mask[:, None]
    sae.W_dec.copy_(torch.where(dead_rows, decoder_rows, sae.W_dec))
    new_enc = directions * (RESAMPLE_ENCODER_SCALE * mean_alive)
    sae.W_enc.copy_(torch.where(dead_rows, new_enc, sae.W_enc.T).T)
    sae.b_enc.masked_fill_(dead_mask, 0.0)
    sae._reset_feature_extras(dead_mask)

    if optimizer is not None:
        _reset_optimizer_moments(sae, optimizer, dead_mask)


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _reset_optimizer_moments(sae: SAE, optimizer: torch.optim.Optimizer, mask: Tensor) -> None:
    """Zero every per-parameter optimizer buffer (Adam moments) at the masked features."""
    for param, axis in sae.feature_params():
        state = optimizer.state.get(param)
        if not state:
            continue
        shape = [1] * param.dim()
        shape[axis] = -1
        keep = (~mask).view(shape)
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            buf = state.get(name)
            if isinstance(buf, Tensor) and buf.shape == param.shape:
                buf.mul_(keep.to(buf.dtype))
