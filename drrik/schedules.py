"""Learning-rate and sparsity-coefficient schedules.

The learning rate runs in three phases over ``total_steps`` optimizer steps:

1. warm-up (``lr_warm_up_steps``): linear from ``1 / lr_warm_up_steps`` to 1;
2. main phase (``lr_scheduler_name``): ``constant`` (1), ``cosineannealing`` (1 down to
   ``lr_end_fraction``) or ``cosineannealingwarmrestarts`` (``n_restart_cycles`` such cosines
   back to back);
3. decay (``lr_decay_steps``): linear from where the main phase ended down to
   ``lr_end_fraction``, reached on the last step.

Unlike a chain of torch schedulers, the curve is continuous between phases (a cosine is not
followed by a jump back to the full rate). :func:`build_lr_scheduler` wraps it in a
``LambdaLR``, whose ``state_dict`` stores the schedule's plain fields, so checkpoints resume.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, fields

import torch

from drrik.errors import require
from drrik.training_config import LRScheduleConfig, LRScheduler

LR_SCHEDULES = typing.get_args(LRScheduler)


@dataclass
class LRSchedule(LRScheduleConfig):
    """Multiplier of the base learning rate at each step; call it as ``schedule(step)``.

    Its fields are the trainer config's (``--lr-warm-up-steps``, ...), validated there, so
    every error names a real flag; only whether the phases fit in ``total_steps`` is new.
    """

    total_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.total_steps > 0, "total_steps", self.total_steps, "use a positive int")
        require(
            self.lr_warm_up_steps + self.lr_decay_steps <= self.total_steps,
            "lr_warm_up_steps",
            self.lr_warm_up_steps,
            f"lr_warm_up_steps + lr_decay_steps ({self.lr_warm_up_steps} + "
            f"{self.lr_decay_steps}) must fit in the run's {self.total_steps} optimizer steps; "
            "lower them or raise training_tokens",
        )

    @property
    def main_steps(self) -> int:
        """Length of the main phase."""
        return self.total_steps - self.lr_warm_up_steps - self.lr_decay_steps

    def _main(self, t: int) -> float:
        """Main-phase factor ``t`` steps into it (``t`` may equal ``main_steps``)."""
        if self.lr_scheduler_name == "constant" or self.main_steps == 0:
            return 1.0
        if self.lr_scheduler_name == "cosineannealing":
            progress = min(t / self.main_steps, 1.0)
        else:
            cycle = math.ceil(self.main_steps / self.n_restart_cycles)
            progress = 1.0 if t >= self.main_steps else (t % cycle) / cycle
        end = self.lr_end_fraction
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at optimizer step ``step`` (0-based)."""
        if step < self.lr_warm_up_steps:
            return (step + 1) / self.lr_warm_up_steps
        t = step - self.lr_warm_up_steps
        if t < self.main_steps:
            return self._main(t)
        if self.lr_decay_steps == 0:
            return self._main(self.main_steps)
        start = self._main(self.main_steps)
        done = min((t - self.main_steps + 1) / self.lr_decay_steps, 1.0)
        return start + (self.lr_end_fraction - start) * done

    __call__ = lr_factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``cfg``'s schedule (the trainer config) over ``total_steps``;
    call ``scheduler.step()`` after each ``optimizer.step()``."""
    values = {f.name: getattr(cfg, f.name) for f in fields(LRScheduleConfig)}
    schedule = LRSchedule(**values, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)


def sparsity_warm_up(step: int, warm_up_steps: int) -> float:
    """The fraction of the sparsity coefficient in force at ``step``: a linear ramp to 1 over
    ``warm_up_steps`` (``l1_warm_up_steps``), 1 without a warm-up.

    Starting sparse-free lets features form before the penalty pushes activations to zero.
    """
    if warm_up_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warm_up_steps)
