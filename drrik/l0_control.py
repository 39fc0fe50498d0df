"""A feedback controller that trains a penalty-based dictionary to a target L0.

relu, gated and jumprelu set their sparsity through a coefficient, and which coefficient gives
which L0 depends on the model, the hook, the width and the learning rate: finding it takes a
sweep. With ``--target-l0`` the coefficient instead follows the measured L0 of the training
batches. The control acts in log space, because the L0 a coefficient buys spans orders of
magnitude (half the features fire at initialization, a few dozen at the target):

    m      = log of the EMA of the batch L0 (bias-corrected: step 1 reads its own batch)
    ahead  = (m - log target) + HORIZON * (m - m_previous)
    log c += clamp(GAIN * ahead, -MAX_STEP, +MAX_STEP)

``ahead`` is the error HORIZON steps on at the current trend. The error alone (an integral
controller on c) overshoots: under Adam the dictionary answers a change of c over tens of
steps, so c keeps climbing while the L0 is already falling fast. Counting the trend eases off
as soon as the L0 is on course to reach the target within HORIZON steps. The clamp bounds the
change per step, and ``RANGE`` bounds c around its start: a dictionary whose L0 cannot follow
(JumpReLU thresholds move by at most about the learning rate per step in log space) would
otherwise wind c up without end and take as long to unwind it.

Everything stays on device: the batch L0 is a device scalar, and so are the state and the
coefficient the step reads, so no step waits for the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch

GAIN = 0.05
"""Change of log c per step per unit of log(L0 / target), trend included."""
HORIZON = 20.0
"""Steps ahead at which the trend is extrapolated."""
MAX_STEP = 0.1
"""Largest change of log c in one step (a factor of 1.105)."""
RANGE = math.log(1000.0)
"""c stays within this factor (in log) of its start, either way."""
EMA_DECAY = 0.8
"""Weight of the past in the L0 average: the batch L0 of a small batch is noisy."""
MIN_L0 = 1e-3
"""Floor of the averaged L0 before its log, for batches where nothing fires."""


class L0Controller:
    """The live sparsity coefficient of one dictionary, steered to ``target`` features/token."""

    def __init__(self, target: int, start: float, device: torch.device) -> None:
        self.log_target = math.log(target)
        self.bounds = (math.log(start) - RANGE, math.log(start) + RANGE)
        self.log_coefficient = torch.full((), math.log(start), device=device)
        self.ema = torch.zeros((), device=device)
        self.last = torch.zeros((), device=device)
        """The previous step's log L0 (the trend's reference)."""
        self.updates = 0
        """Updates so far, counted on the host: every step after the warm-up makes one."""

    @property
    def coefficient(self) -> torch.Tensor:
        """The coefficient in force, a device scalar."""
        return self.log_coefficient.exp()

    @torch.no_grad()
    def update(self, l0: torch.Tensor) -> None:
        """Fold in one training batch's mean L0 (a device scalar) and move the coefficient."""
        self.updates += 1
        self.ema.mul_(EMA_DECAY).add_(l0.float(), alpha=1 - EMA_DECAY)
        measured = (self.ema / (1 - EMA_DECAY**self.updates)).clamp_min(MIN_L0).log()
        trend = measured - self.last if self.updates > 1 else torch.zeros_like(measured)
        self.last.copy_(measured)
        ahead = measured - self.log_target + HORIZON * trend
        self.log_coefficient.add_((GAIN * ahead).clamp(-MAX_STEP, MAX_STEP))
        self.log_coefficient.clamp_(*self.bounds)

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_coefficient": self.log_coefficient.clone(),
            "ema": self.ema.clone(),
            "last": self.last.clone(),
            "updates": self.updates,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.log_coefficient.copy_(saved["log_coefficient"])
        self.ema.copy_(saved["ema"])
        self.last.copy_(saved["last"])
        self.updates = saved["updates"]
