"""A fixed-size mixing buffer: activations from many contexts, served in shuffled batches.

On each refill the whole buffer is permuted once; a ``mix_fraction`` of the rows stays behind to
mix with the next refill, the rest is served batch by batch. The retained share decays
geometrically, which decorrelates batches from the order of the text. Token ids travel with
their activations, and several hooks share one permutation so their rows stay aligned.
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
    ) -> None:
        self.capacity, self.mix_fraction, self.batch_size = capacity, mix_fraction, batch_size
        self.acts = {
            h: torch.empty(capacity, d, dtype=dtype, device=device) for h, d in widths.items()
        }
        self.tokens = torch.empty(capacity, dtype=torch.long, device=device)
        self.size = 0
        # While serving, rows [kept, size) are shuffled and wait to be served from cursor on.
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
        end = self.size + n
        for hook, dest in self.acts.items():
            dest[self.size : end].copy_(acts[hook][:n], non_blocking=True)
        self.tokens[self.size : end].copy_(tokens[:n], non_blocking=True)
        self.size = end
        return n

    def batches_ready(self) -> int:
        """Shuffled batches left to serve from the current permutation."""
        return (self.size - self.cursor) // self.batch_size if self.serving else 0

    def shuffle(self) -> None:
        """Permute the buffer: the retained fraction moves to the front, the rest is served.

        Served rows sit after the kept ones in shuffled order, so serving reads contiguous
        slices and the next refill overwrites them only once they are all served.
        """
        keep = int(self.capacity * self.mix_fraction)
        n_serve = (self.size - keep) // self.batch_size * self.batch_size
        perm = torch.randperm(self.size, generator=self.generator).to(self.tokens.device)
        for buf in self.acts.values():
            buf[: self.size] = buf[: self.size].index_select(0, perm)
        self.tokens[: self.size] = self.tokens[: self.size].index_select(0, perm)
        self.kept = self.cursor = self.size - n_serve
        self.serving = n_serve > 0

    def next_batch(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next shuffled batch, copied out of the buffer; call only while batches_ready()."""
        lo, hi = self.cursor, self.cursor + self.batch_size
        batch = {h: a[lo:hi].clone() for h, a in self.acts.items()}, self.tokens[lo:hi].clone()
        self.cursor = hi
        if self.cursor == self.size:
            self.size, self.serving = self.kept, False
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Buffer contents, serving position and shuffle RNG: enough to continue exactly."""
        return {
            "acts": {h: a[: self.size].clone() for h, a in self.acts.items()},
            "tokens": self.tokens[: self.size].clone(),
            "serving": self.serving,
            "kept": self.kept,
            "cursor": self.cursor,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = state["tokens"].shape[0]
        for hook, buf in self.acts.items():
            buf[: self.size].copy_(state["acts"][hook])
        self.tokens[: self.size].copy_(state["tokens"])
        self.serving, self.kept, self.cursor = state["serving"], state["kept"], state["cursor"]
        self.generator.set_state(state["generator"])
