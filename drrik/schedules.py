"""Learning-rate and sparsity-coefficient schedules.

The learning rate runs in three phases over ``total_steps`` optimizer steps:

1. warm-up (``warmup_steps``): linear from ``1 / warmup_steps`` to 1;
2. main phase: ``constant`` (1), ``cosineannealing`` (1 down to ``lr_end_fraction``) or
   ``cosineannealingwarmrestarts`` (``n_restart_cycles`` such cosines back to back);
3. decay (``decay_steps``): linear from where the main phase ended down to
   ``lr_end_fraction``, reached on the last step.

Unlike a chain of torch schedulers, the curve is continuous between phases (a cosine is not
followed by a jump back to the full rate). :func:`build_lr_scheduler` wraps it in a
``LambdaLR``, whose ``state_dict`` stores the schedule's plain fields, so checkpoints resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drrik.errors import require

LR_SCHEDULES = ("constant", "cosineannealing", "cosineannealingwarmrestarts")


@dataclass
class LRSchedule:
    """Multiplier of the base learning rate at each step; call it as ``schedule(step)``."""

    name: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    decay_steps: int = 0
    lr_end_fraction: float = 0.0
    n_restart_cycles: int = 1

    def __post_init__(self) -> None:
        require(
            self.name in LR_SCHEDULES,
            "lr_schedule",
            self.name,
            f"use one of {', '.join(LR_SCHEDULES)}",
        )
        require(self.total_steps > 0, "total_steps", self.total_steps, "use a positive int")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "use an int >= 0")
        require(self.decay_steps >= 0, "decay_steps", self.decay_steps, "use an int >= 0")
        require(
            self.warmup_steps + self.decay_steps <= self.total_steps,
            "warmup_steps",
            self.warmup_steps,
            f"warm-up + decay ({self.warmup_steps} + {self.decay_steps}) must fit in "
            f"{self.total_steps} total steps",
        )
        require(
            0.0 <= self.lr_end_fraction <= 1.0,
            "lr_end_fraction",
            self.lr_end_fraction,
            "use a fraction of the base learning rate in [0, 1]",
        )
        require(
            self.n_restart_cycles >= 1,
            "n_restart_cycles",
            self.n_restart_cycles,
            "use an int >= 1",
        )

    @property
    def main_steps(self) -> int:
        """Length of the main phase."""
        return self.total_steps - self.warmup_steps - self.decay_steps

    def _main(self, t: int) -> float:
        """Main-phase factor ``t`` steps into it (``t`` may equal ``main_steps``)."""
        if self.name == "constant" or self.main_steps == 0:
            return 1.0
        if self.name == "cosineannealing":
            progress = min(t / self.main_steps, 1.0)
        else:
            cycle = math.ceil(self.main_steps / self.n_restart_cycles)
            progress = 1.0 if t >= self.main_steps else (t % cycle) / cycle
        end = self.lr_end_fraction
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if t < self.main_steps:
            return self._main(t)
        if self.decay_steps == 0:
            return self._main(self.main_steps)
        start = self._main(self.main_steps)
        done = min((t - self.main_steps + 1) / self.decay_steps, 1.0)
        return start + (self.lr_end_fraction - start) * done

    __call__ = lr_factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    total_steps: int = 1,
    warmup_steps: int = 0,
    decay_steps: int = 0,
    lr_end_fraction: float = 0.0,
    n_restart_cycles: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :class:`LRSchedule`; call ``scheduler.step()`` after each
    ``optimizer.step()``."""
    schedule = LRSchedule(
        name=name,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        lr_end_fraction=lr_end_fraction,
        n_restart_cycles=n_restart_cycles,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)


def sparsity_coefficient(step: int, final: float, warmup_steps: int) -> float:
    """Sparsity coefficient at ``step``: linear ramp to ``final`` over ``warmup_steps``.

    Starting sparse-free lets features form before the penalty pushes activations to zero.
    """
    if warmup_steps <= 0:
        return final
    return final * min(1.0, (step + 1) / warmup_steps)
