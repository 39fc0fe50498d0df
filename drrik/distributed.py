"""Data and feature parallelism over torch.distributed, launched by torchrun; a no-op in one
process.

Each rank streams its own data shards through its own copy of the model; SAE gradients are
averaged across ranks with one all-reduce per SAE and step (the collective DDP would run), so
every rank holds the same SAE. Only rank 0 writes files. Collectives have a configured timeout,
so a dead or hung rank stops the job in bounded time instead of hanging it forever.

Two process groups: the training group (NCCL on GPUs, gloo on CPU) carries the per-step
collectives, and NCCL takes tensors on the rank's GPU only, so every collective here checks
placement first and names the culprit. A second, gloo group with a long timeout carries what is
not per-step: the waits while rank 0 alone evaluates, plots, saves or uploads (NCCL's watchdog
would abort ranks idling in an NCCL barrier for that long) and the small checkpoint metadata.

With ``--feature-parallel N`` the ranks form a 2-D mesh, data x features: the N consecutive
ranks of a *feature group* each hold a slice of every dictionary's features and train on their
joined rows (:mod:`drrik.sae.feature_shards`), and gradients are averaged over the *data
group*, the ranks that hold the same slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from drrik.errors import ConfigError, require
from drrik.sae.feature_shards import FeatureShards

MAIN_WORK_TIMEOUT = timedelta(days=1)
"""How long other ranks wait while rank 0 alone evaluates, saves or uploads."""


@dataclass
class Distributed:
    """This process's place in the job: rank, world size, and the collectives drrik uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collective_device: torch.device | None = None
    """The training group's device: every tensor handed to a collective must be on it."""
    wait_group: Any = None
    """The gloo group (long timeout) for waits on rank 0 and checkpoint metadata."""
    owns_default_group: bool = False
    """Whether :meth:`from_environment` started the default group, so :meth:`close` ends it."""
    features: FeatureShards | None = None
    """This rank's slice of the features, with ``--feature-parallel`` above 1."""
    data_group: Any = None
    """The ranks holding the same slice as this one (every rank without feature slices)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def data_size(self) -> int:
        """Ranks in the data group: the data-parallel degree."""
        return self.world_size // (1 if self.features is None else self.features.count)

    @classmethod
    def from_environment(
        cls, device: str, timeout_minutes: float, feature_parallel: int = 1
    ) -> Distributed:
        """Join the torchrun job described by the environment, if there is one."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        require(
            world_size % feature_parallel == 0 and world_size >= feature_parallel,
            "feature_parallel",
            feature_parallel,
            f"the data x features mesh needs a multiple of {feature_parallel} processes and "
            f"this job has {world_size}; launch with torchrun --nproc-per-node "
            f"{feature_parallel} (or a multiple), or lower --feature-parallel",
        )
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        placed = cls(rank, world_size, local_rank)
        on_gpu = device.startswith("cuda")
        collective_device = placed.device(device)  # refuses cuda:N before anything starts
        owns_default_group = not dist.is_initialized()
        if owns_default_group:
            if on_gpu:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(
                backend="nccl" if on_gpu else "gloo",
                timeout=timedelta(minutes=timeout_minutes),
            )
        timeout = max(MAIN_WORK_TIMEOUT, timedelta(minutes=timeout_minutes))
        wait_group = dist.new_group(backend="gloo", timeout=timeout)
        placed = cls(
            rank, world_size, local_rank, collective_device, wait_group, owns_default_group
        )
        if feature_parallel > 1:
            placed.features, placed.data_group = _mesh(
                rank, world_size, feature_parallel, timedelta(minutes=timeout_minutes)
            )
        return placed

    def device(self, configured: str) -> torch.device:
        """Under torchrun each rank takes its own GPU: cuda becomes cuda:LOCAL_RANK.

        An explicit ``cuda:N`` is refused there: it would put every rank on the same GPU.
        """
        if self.enabled and configured.startswith("cuda"):
            if configured != "cuda":
                raise ConfigError(
                    "device",
                    configured,
                    "under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda "
                    "(CUDA_VISIBLE_DEVICES chooses the GPUs)",
                )
            return torch.device("cuda", self.local_rank)
        return torch.device(configured)

    def local_shards(self, n_shards: int) -> list[int]:
        """The data shards this rank streams: a contiguous block of n_shards / world_size."""
        require(
            n_shards % self.world_size == 0,
            "data_shards",
            n_shards,
            f"must be a multiple of the number of processes ({self.world_size})",
        )
        per_rank = n_shards // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))

    # -- collectives (identity in one process) -----------------------------------------------
    def check_placement(self, tensors: list[torch.Tensor]) -> None:
        """NCCL's rule, checked for every backend: collectives take tensors on the group's
        device only (a CPU tensor in an NCCL collective kills the job at its first step)."""
        for tensor in tensors:
            if self.collective_device is not None and tensor.device != self.collective_device:
                raise RuntimeError(
                    f"a {tuple(tensor.shape)} tensor on {tensor.device} was handed to a "
                    f"collective of a group on {self.collective_device}"
                )

    def _reach(self, data: bool) -> tuple[bool, Any, int]:
        """(whether a collective has other ranks to reach, its group, the group's size) over
        every rank, or with ``data`` over the data group (every rank without slices)."""
        if not data or self.features is None:
            return self.enabled, None, self.world_size
        return self.data_size > 1, self.data_group, self.data_size

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over the data group in one flat all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        reach, group, size = self._reach(data=True)
        if not reach or not grads:
            return
        self.check_placement(grads)
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)

    def average_(self, tensor: torch.Tensor, data: bool = False) -> torch.Tensor:
        """The mean over every rank (``data``: over the data group, whose ranks hold the same
        feature slice)."""
        reach, group, size = self._reach(data)
        if reach:
            self.check_placement([tensor])
            dist.all_reduce(tensor, group=group)
            tensor.div_(size)
        return tensor

    def max_(self, tensor: torch.Tensor, data: bool = False) -> torch.Tensor:
        """The maximum over every rank (``data``: over the data group)."""
        reach, group, _ = self._reach(data)
        if reach:
            self.check_placement([tensor])
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        return tensor

    def broadcast_(self, tensors: list[torch.Tensor], data: bool = False) -> None:
        """Make every rank's tensors equal to rank 0's (``data``: to the data group's first
        rank's, which holds the same feature slice)."""
        reach, group, _ = self._reach(data)
        if reach:
            self.check_placement(tensors)
            source = 0 if group is None else self.features.index  # type: ignore[union-attr]
            for tensor in tensors:
                dist.broadcast(tensor, src=source, group=group)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's small ``obj`` (names, checksums) on rank 0, in rank order; None
        elsewhere. Pickled through the gloo group on the host, never through GPU memory."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, group=self.wait_group)
        return gathered

    def from_main(self, obj: Any) -> Any:
        """Rank 0's small ``obj`` on every rank (pickled through the gloo group)."""
        if not self.enabled:
            return obj
        shared = [obj]
        dist.broadcast_object_list(shared, src=0, group=self.wait_group)
        return shared[0]

    def wait_for_main(self) -> None:
        """Wait until every rank, rank 0 included, gets here, on the long-timeout gloo group:
        rank 0's evaluations and saves may outlast the training group's timeout."""
        if self.enabled:
            dist.barrier(group=self.wait_group)

    def close(self) -> None:
        """Leave the job: end the groups drrik started. A no-op in one process and on a second
        call; a default group the caller started stays up for the caller to end."""
        if not self.enabled or not dist.is_initialized():
            return
        if self.owns_default_group:
            dist.destroy_process_group()  # every group, the wait group included
        elif self.wait_group is not None:
            dist.destroy_process_group(self.wait_group)
        self.wait_group, self.owns_default_group = None, False


def _mesh(rank: int, world_size: int, degree: int, timeout: timedelta) -> tuple[FeatureShards, Any]:
    """This rank's feature group (``degree`` consecutive ranks) and data group (the ranks
    holding the same slice) on a data x features mesh. Every rank creates every group, in the
    same order, as ``new_group`` requires; each with the training timeout, so a dead or hung
    rank stops the job as it does without slices."""
    rows = [list(range(d * degree, (d + 1) * degree)) for d in range(world_size // degree)]
    feature_groups = [dist.new_group(ranks, timeout=timeout) for ranks in rows]
    columns = [[row[j] for row in rows] for j in range(degree)]
    data_groups = [dist.new_group(ranks, timeout=timeout) for ranks in columns]
    row, index = divmod(rank, degree)
    shards = FeatureShards(index, degree, feature_groups[row], tuple(rows[row]))
    return shards, data_groups[index]
