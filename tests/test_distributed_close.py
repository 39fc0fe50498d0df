"""Distributed.close: safe in one process, idempotent, and it ends only the groups drrik
started. Runs in this process on a one-rank gloo group (the torchrun tests live in
test_distributed.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from drrik.distributed import Distributed


@pytest.fixture
def default_group(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo default group that the calling program started itself."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def joined(owns_default_group: bool) -> Distributed:
    """A Distributed that takes part in a job (world_size > 1 turns the collectives on)."""
    wait_group = dist.new_group(backend="gloo")
    return Distributed(world_size=2, wait_group=wait_group, owns_default_group=owns_default_group)


def test_close_in_one_process_does_nothing() -> None:
    single = Distributed()
    single.close()
    single.close()
    assert not dist.is_initialized()


def test_close_ends_the_default_group_drrik_started_once(default_group: None) -> None:
    placed = joined(owns_default_group=True)
    placed.close()
    assert not dist.is_initialized()
    placed.close()


def test_close_leaves_the_callers_default_group_up(default_group: None) -> None:
    placed = joined(owns_default_group=False)
    placed.close()
    placed.close()
    assert dist.is_initialized() and placed.wait_group is None
    assert dist.get_world_size() == 1  # the caller's group still works
