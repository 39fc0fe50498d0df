"""A fixed-size mixing buffer: activations from many contexts, served in shuffled batches.

On each refill the whole buffer is permuted once; a ``mix_fraction`` of the rows stays behind to
mix with the next refill, the rest is served batch by batch. The retained share decays
geometrically, which decorrelates batches from the order of the text. Token ids travel with
their activations, and several hooks share one permutation so their rows stay aligned.

The rows never move: a permutation of row indices (``order``) says which physical row holds
each logical one, so a shuffle permutes ``capacity`` integers instead of copying the buffer
(a copy would keep a second buffer's worth of device memory reserved), and a refill writes
into the rows served last. A buffer on the CPU that feeds a GPU is pinned, and its batches are
gathered into pinned memory, so their copies to the GPU overlap with compute.
"""

from __future__ import annotations

from typing import Any

import torch


class MixingBuffer:
    """Preallocated ``capacity x d`` tensors per hook, plus the token id of every row."""

    def __init__(
        self,
        capacity: int,
        widths: dict[str, int],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        mix_fraction: float,
        batch_size: int,
        seed: int,
        pin_memory: bool = False,
    ) -> None:
        self.capacity, self.mix_fraction, self.batch_size = capacity, mix_fraction, batch_size
        self.pin_memory = pin_memory
        self.acts = {
            h: torch.empty(capacity, d, dtype=dtype, device=device, pin_memory=pin_memory)
            for h, d in widths.items()
        }
        self.tokens = torch.empty(capacity, dtype=torch.long, device=device, pin_memory=pin_memory)
        self.order = torch.arange(capacity, device=device)
        """Physical row of each logical row: rows order[:size] hold data, in logical order."""
        self.size = 0
        # While serving, logical rows [kept, size) are shuffled and served from cursor on.
        self.serving = False
        self.kept = self.cursor = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def nbytes(self) -> int:
        """Memory held by the buffer (activations and token ids)."""
        return sum(a.nbytes for a in self.acts.values()) + self.tokens.nbytes

    def free(self) -> int:
        return 0 if self.serving else self.capacity - self.size

    def add(self, acts: dict[str, torch.Tensor], tokens: torch.Tensor) -> int:
        """Append as many rows as fit; return how many were taken."""
        n = min(self.free(), tokens.shape[0])
        rows = self.order[self.size : self.size + n]
        for hook, dest in self.acts.items():
            source = acts[hook][:n].to(dest.device, dest.dtype, non_blocking=True)
            dest.index_copy_(0, rows, source)
        self.tokens.index_copy_(0, rows, tokens[:n].to(self.tokens.device, torch.long))
        self.size += n
        return n

    def batches_ready(self) -> int:
        """Shuffled batches left to serve from the current permutation."""
        return (self.size - self.cursor) // self.batch_size if self.serving else 0

    def shuffle(self) -> None:
        """Permute the buffer: the retained fraction comes first, the rest is served in order.

        Only the row order is permuted; the next refill writes into the served rows once they
        are all served.
        """
        keep = int(self.capacity * self.mix_fraction)
        n_serve = (self.size - keep) // self.batch_size * self.batch_size
        perm = torch.randperm(self.size, generator=self.generator).to(self.order.device)
        self.order[: self.size] = self.order[: self.size][perm]
        self.kept = self.cursor = self.size - n_serve
        self.serving = n_serve > 0

    def rows(self, hook: str, n: int) -> torch.Tensor:
        """The first ``n`` logical rows of ``hook`` (a copy)."""
        return self.acts[hook].index_select(0, self.order[: min(n, self.size)])

    def _gather(self, source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.pin_memory:
            return source.index_select(0, index)
        out = torch.empty((index.shape[0], *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        return torch.index_select(source, 0, index, out=out)

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next shuffled batch, copied out of the buffer; call only while batches_ready()."""
        index = self.order[self.cursor : self.cursor + self.batch_size]
        batch = {h: self._gather(a, index) for h, a in self.acts.items()}
        tokens = self._gather(self.tokens, index)
        self.cursor += self.batch_size
        if self.cursor == self.size:
            self.size, self.serving = self.kept, False
        return batch, tokens

    def state_dict(self) -> dict[str, Any]:
        """Buffer contents in logical order, serving position and shuffle RNG: enough to
        continue exactly. Gathered on the host: no buffer-sized copy on the buffer's device."""
        order = self.order[: self.size].cpu()

        def host_rows(source: torch.Tensor) -> torch.Tensor:
            host = source if source.device.type == "cpu" else source.cpu()
            return host.index_select(0, order)

        return {
            "acts": {h: host_rows(a) for h, a in self.acts.items()},
            "tokens": host_rows(self.tokens),
            "serving": self.serving,
            "kept": self.kept,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = state["tokens"].shape[0]
        self.order = torch.arange(self.capacity, device=self.order.device)
        for hook, buf in self.acts.items():
            buf[: self.size].copy_(state["acts"][hook])
        self.tokens[: self.size].copy_(state["tokens"])
        self.serving, self.kept, self.cursor = state["serving"], state["kept"], state["cursor"]
        self.generator.set_state(state["generator"])
