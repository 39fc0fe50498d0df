"""Feature parallelism: one dictionary's features split across the ranks of a process group.

Each rank of a *feature group* holds a contiguous slice of the features: its columns of
``W_enc``, its rows of ``W_dec``, its entries of ``b_enc`` and of any per-feature parameter;
``b_dec`` (and a skip transcoder's ``W_skip``) is whole on every rank. Every rank of the group
sees the same batch, so the forward pass needs three collectives, each in one place:

- :meth:`FeatureShards.enter` before the encoder: identity forward, all-reduce backward (each
  rank's encoder slice contributes part of the input's gradient, and of ``b_dec``'s);
- :meth:`FeatureShards.join` after the decoder and over per-feature sums (L1, L0): all-reduce
  forward, identity backward (every rank then computes the same loss from the same sum);
- :meth:`FeatureShards.topk`: TopK and BatchTopK ranked over all features, from each rank's
  own top candidates (the global top k is always among the ranks' local top k).

This is the tensor-parallel pair of Megatron-LM's linear layers, written with plain
``torch.distributed`` collectives so that it runs on gloo (CPU) and NCCL alike. Gradients of
the sliced parameters are then exactly the slices of one process's gradients; the data-parallel
average happens across the *data group* (the ranks holding the same slice), outside this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class FeatureShards:
    """This rank's slice of every dictionary's features, and the group holding the others."""

    index: int
    """This rank's place in its feature group (its slice)."""
    count: int
    """Ranks per feature group: the feature-parallel degree."""
    group: Any
    """The feature group (ranks that split one batch's features between them)."""
    ranks: tuple[int, ...]
    """The feature group's global ranks, in slice order."""

    def slice(self, width: int) -> slice:
        """This rank's features of a ``width``-feature dictionary."""
        per_rank = width // self.count
        return slice(self.index * per_rank, (self.index + 1) * per_rank)

    @torch.compiler.disable
    def enter(self, x: Tensor) -> Tensor:
        """``x`` on its way into this rank's encoder slice (its gradient summed over ranks)."""
        return _Enter.apply(x, self.group)

    @torch.compiler.disable
    def join(self, partial: Tensor) -> Tensor:
        """The sum over ranks of each rank's ``partial`` (a decoder output, a feature total)."""
        return _Join.apply(partial, self.group)

    @torch.no_grad()
    def sum_(self, tensor: Tensor) -> Tensor:
        """In place, the sum over the group of a statistic (no gradient): a dead count."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    @torch.no_grad()
    def gather_rows(self, x: Tensor) -> Tensor:
        """Every rank's rows of ``x``, in rank order: the group's common batch."""
        parts = [torch.empty_like(x) for _ in range(self.count)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)

    @torch.compiler.disable
    def topk(self, values: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The top ``k`` along the last axis over every rank's features.

        Returns this rank's candidates ``(values, indices)`` (its local top ``k``, indices
        into its slice), a mask of those in the global top ``k``, and the global top ``k``
        values themselves (the same on every rank).
        """
        top, idx = values.topk(min(k, values.shape[-1]), dim=-1)
        with torch.no_grad():
            parts = [torch.empty_like(top) for _ in range(self.count)]
            dist.all_gather(parts, top.detach().contiguous(), group=self.group)
            everyone = torch.cat(parts, dim=-1)
            kept, chosen = everyone.topk(k, dim=-1)
            picked = torch.zeros_like(everyone, dtype=torch.bool).scatter_(-1, chosen, True)
            width = top.shape[-1]
            mine = picked[..., self.index * width : (self.index + 1) * width]
        return top, idx, mine, kept

    def gather_to_first(self, tensor: Tensor, axis: int) -> Tensor | None:
        """The whole of a sliced ``tensor`` (slices joined along ``axis``) on the group's
        first rank; ``None`` on the others. Rank 0's group is where a run is saved."""
        tensor = tensor.detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.count)] if self.index == 0 else None
        dist.gather(tensor, parts, dst=self.ranks[0], group=self.group)
        return None if parts is None else torch.cat(parts, dim=axis)

    def clip_grad_norm_(self, sliced: list[Tensor], whole: list[Tensor], max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` over the whole dictionary: the sliced
        parameters' squared norms summed over ranks, the whole ones' counted once."""
        grads = [p.grad for p in sliced if p.grad is not None]
        whole_grads = [p.grad for p in whole if p.grad is not None]
        if not grads and not whole_grads:
            return
        device = (grads or whole_grads)[0].device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for grad in grads:
            squares += grad.float().pow(2).sum()
        self.sum_(squares)
        for grad in whole_grads:
            squares += grad.float().pow(2).sum()
        factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for grad in grads + whole_grads:
            grad.mul_(factor.to(grad.dtype))


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Join(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def reshard(parts: list[Tensor], axis: int | None, index: int, count: int) -> Tensor:
    """Slice ``index`` of ``count`` of a tensor saved as ``parts`` (slices along ``axis``, in
    order; one part when saved whole); a tensor without a feature axis is the first part."""
    if axis is None:
        return parts[0]
    whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)
    per_rank = whole.shape[axis] // count
    return whole.narrow(axis, index * per_rank, per_rank).clone()
