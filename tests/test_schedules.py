"""Learning-rate and sparsity schedules at key steps."""

from __future__ import annotations

import math

import pytest
import torch

from drrik.config import TrainerConfig
from drrik.errors import ConfigError
from drrik.schedules import LR_SCHEDULES, LRSchedule, build_lr_scheduler, sparsity_warm_up


def test_constant_with_warmup_and_decay() -> None:
    s = LRSchedule(
        "constant", total_steps=20, lr_warm_up_steps=4, lr_decay_steps=5, lr_end_fraction=0.1
    )
    assert [s.lr_factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(s.lr_factor(i) == 1.0 for i in range(4, 15))
    decay = [s.lr_factor(i) for i in range(15, 20)]
    expected = [1.0 + (0.1 - 1.0) * (j + 1) / 5 for j in range(5)]
    assert decay == pytest.approx(expected)
    assert s.lr_factor(19) == pytest.approx(0.1)
    assert s.lr_factor(500) == pytest.approx(0.1)  # past the end: stays at the end value


def test_constant_without_phases_is_one() -> None:
    s = LRSchedule("constant", total_steps=10)
    assert all(s(i) == 1.0 for i in range(12))


def test_cosine_annealing() -> None:
    s = LRSchedule("cosineannealing", total_steps=110, lr_warm_up_steps=10, lr_end_fraction=0.2)
    assert s(9) == 1.0
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.6)  # halfway: (1 + end) / 2
    assert s(35) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(109) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert s(110) == pytest.approx(0.2)


def test_cosine_then_decay_is_continuous() -> None:
    s = LRSchedule("cosineannealing", total_steps=30, lr_decay_steps=10, lr_end_fraction=0.0)
    values = [s(i) for i in range(30)]
    assert max(abs(a - b) for a, b in zip(values, values[1:], strict=False)) < 0.2
    assert values[-1] == pytest.approx(0.0)


def test_warm_restarts() -> None:
    s = LRSchedule(
        "cosineannealingwarmrestarts", total_steps=40, n_restart_cycles=4, lr_end_fraction=0.0
    )
    for start in (0, 10, 20, 30):
        assert s(start) == pytest.approx(1.0)
        assert s(start + 5) == pytest.approx(0.5)
        assert s(start + 9) < 0.05
    assert s(40) == pytest.approx(0.0)


def test_lambda_lr_scheduler_and_resume() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = build_lr_scheduler(
        opt, TrainerConfig(lr_scheduler_name="cosineannealing", lr_warm_up_steps=5), 20
    )
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    schedule = LRSchedule("cosineannealing", total_steps=20, lr_warm_up_steps=5)
    assert lrs == pytest.approx([0.5 * schedule(i) for i in range(12)])

    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    sched2 = build_lr_scheduler(opt2, TrainerConfig(), 1)  # replaced by the state
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0] == schedule
    for _ in range(3):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_sparsity_warm_up_ramps_the_fraction_to_one() -> None:
    assert sparsity_warm_up(0, 4) == 0.25
    assert sparsity_warm_up(1, 4) == 0.5
    assert sparsity_warm_up(3, 4) == 1.0
    assert sparsity_warm_up(100, 4) == 1.0
    assert sparsity_warm_up(0, 0) == 1.0


def test_unknown_schedule_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        LRSchedule("linear", total_steps=10)
    for name in LR_SCHEDULES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "lr_warm_up_steps": 6, "lr_decay_steps": 5}, "lr_warm_up_steps"),
        ({"total_steps": 10, "lr_end_fraction": 1.5}, "lr_end_fraction"),
        ({"total_steps": 10, "n_restart_cycles": 0}, "n_restart_cycles"),
    ],
)
def test_bad_schedule_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        LRSchedule("constant", **kwargs)
    assert err.value.field == field


def test_schedule_errors_name_the_trainer_flags() -> None:
    """The schedule's fields are the trainer config's: every error names a real flag."""
    with pytest.raises(ConfigError) as err:
        TrainerConfig(lr_decay_steps=-1)
    assert err.value.field == "lr_decay_steps"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    with pytest.raises(ConfigError) as err:
        build_lr_scheduler(opt, TrainerConfig(lr_warm_up_steps=8, lr_decay_steps=4), 10)
    assert err.value.field == "lr_warm_up_steps"
    assert "training_tokens" in str(err.value)
