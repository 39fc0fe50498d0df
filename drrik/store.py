"""The activations store: token batches -> hooked forward pass -> mixing buffer -> SAE device.

A background thread tokenizes and batches text ahead of the model (host-side work); the
calling thread runs the model, which stops after the last hooked layer, drops special-token
positions, and feeds the mixing buffer. ``next_batch`` serves shuffled activations for every
hook from one forward pass, with their token ids, on the training device. Nothing is written
to disk. ``state_dict`` captures the exact stream position, buffer contents and RNG so that a
resumed run sees the same batches.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from drrik.config import DataConfig, StoreConfig
from drrik.data import AnyDataset, ContextStream, load_source
from drrik.dtypes import torch_dtype
from drrik.errors import require
from drrik.logs import get_logger
from drrik.mixing_buffer import MixingBuffer
from drrik.model import check_context_size, check_hooks, hook_dims, run_hooks

log = get_logger(__name__)


def map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


@dataclass
class ActivationBatch:
    """Shuffled activations of one training step: one ``[batch, d_in]`` tensor per hook."""

    acts: dict[str, torch.Tensor]
    tokens: torch.Tensor


class _Prefetcher:
    """Runs a ContextStream in a thread, queueing (tokens, stream state after them)."""

    _STOP = object()

    def __init__(self, stream: ContextStream, batch_size: int, depth: int) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(stream, batch_size), daemon=True, name="drrik-prefetch"
        )
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, stream: ContextStream, batch_size: int) -> None:
        try:
            for tokens in stream.batches(batch_size):
                if not self._put((tokens, stream.state_dict())):
                    return
            self._put(self._STOP)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def get(self) -> tuple[torch.Tensor, dict[str, Any]] | None:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is self._STOP else item

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)


class ActivationsStore:
    """Streams shuffled activations of ``hooks`` from ``model`` over a dataset."""

    def __init__(
        self,
        model: Any,
        hooks: list[str],
        data_cfg: DataConfig,
        store_cfg: StoreConfig,
        *,
        dataset: AnyDataset | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        verbose: bool = True,
    ) -> None:
        check_hooks(model, hooks)
        check_context_size(model, data_cfg.context_size)
        store_cfg.check_fits(data_cfg.context_size)
        self.model, self.hooks = model, hooks
        self.data_cfg, self.store_cfg = data_cfg, store_cfg
        self.model_device = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.model_device
        self.dataset = dataset if dataset is not None else load_source(data_cfg)
        # With a separate eval split nothing needs holding out of the training split.
        holdout = "all" if data_cfg.eval_split else "train"
        self.stream = ContextStream(
            self.dataset, model.tokenizer, data_cfg, holdout=holdout, shard=shard
        )
        self.d_in = hook_dims(model, hooks)
        model_dtype = next(model.parameters()).dtype
        dtype = (
            model_dtype
            if store_cfg.buffer_dtype == "model"
            else torch_dtype(store_cfg.buffer_dtype, "buffer_dtype")
        )
        buffer_device = self._buffer_device()
        self.buffer = MixingBuffer(
            store_cfg.buffer_tokens(data_cfg.context_size),
            self.d_in,
            dtype=dtype,
            device=buffer_device,
            mix_fraction=store_cfg.mix_fraction,
            batch_size=store_cfg.train_batch_size_tokens,
            seed=seed,
            # A host buffer feeding a GPU: pinned, so batch copies overlap with compute.
            pin_memory=buffer_device.type == "cpu" and self.device.type == "cuda",
        )
        self.exclude = torch.tensor(
            self.stream.special.ids() if data_cfg.exclude_special_tokens else [], dtype=torch.long
        )
        self._carry: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None
        self._stream_state = self.stream.state_dict()
        self._prefetch: _Prefetcher | None = None
        self.tokens_seen = 0  # model-forward tokens, special positions included
        if verbose:
            log.info(self.describe())

    def _buffer_device(self) -> torch.device:
        where = self.store_cfg.act_store_device
        if where == "sae":
            return self.device
        if where == "model":
            return self.model_device
        return torch.device(where)

    def describe(self) -> str:
        """One line on the memory the buffer holds, as the config bounds it."""
        gib = self.buffer.nbytes / 2**30
        dims = ", ".join(f"{h}: {d}" for h, d in self.d_in.items())
        return (
            f"activations buffer: {self.buffer.capacity:,} tokens x d_in ({dims}) x "
            f"{self.buffer.tokens.device}/{next(iter(self.buffer.acts.values())).dtype} = "
            f"{gib:.3f} GiB"
        )

    # -- producing ---------------------------------------------------------------------------
    def _next_tokens(self) -> torch.Tensor:
        if self._prefetch is None:
            # A private copy: a closing producer may still be mid-batch on the old one.
            stream = copy.copy(self.stream)
            stream.load_state_dict(self._stream_state)
            self._prefetch = _Prefetcher(
                stream, self.store_cfg.store_batch_size_prompts, self.store_cfg.prefetch_batches
            )
        item = self._prefetch.get()
        if item is None:
            raise RuntimeError("the training stream ended; it should cycle over the dataset")
        tokens, self._stream_state = item
        return tokens

    def _forward(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Activations of one model batch, flattened to rows, special-token rows removed."""
        acts = run_hooks(self.model, tokens.to(self.model_device, non_blocking=True), self.hooks)
        flat_tokens = tokens.reshape(-1)
        self.tokens_seen += flat_tokens.numel()
        keep = None
        if self.exclude.numel():
            # Index computed on the host from host tokens: no device sync.
            keep = (~torch.isin(flat_tokens, self.exclude)).nonzero().squeeze(1)
            flat_tokens = flat_tokens[keep]
        rows = {}
        # A non-blocking copy to the host may be read before it lands: block for a CPU buffer.
        to_host = self.buffer.tokens.device.type == "cpu"
        for hook, act in acts.items():
            act = act.reshape(-1, act.shape[-1])
            if keep is not None:
                act = act.index_select(0, keep.to(act.device))
            rows[hook] = act.to(self.buffer.tokens.device, non_blocking=not to_host)
        return rows, flat_tokens.to(self.buffer.tokens.device)

    def _fill(self) -> None:
        """Top the buffer up to capacity, then shuffle it."""
        while self.buffer.free() > 0:
            if self._carry is None:
                self._carry = self._forward(self._next_tokens())
            acts, tokens = self._carry
            taken = self.buffer.add(acts, tokens)
            rest = tokens.shape[0] - taken
            self._carry = (
                None
                if rest == 0
                else (
                    {h: a[taken:] for h, a in acts.items()},
                    tokens[taken:],
                )
            )
        self.buffer.shuffle()

    # -- serving -----------------------------------------------------------------------------
    def next_batch(self) -> ActivationBatch:
        """One shuffled training batch on the training device."""
        if not self.buffer.batches_ready():
            self._fill()
        acts, tokens = self.buffer.next_batch()
        moved = {h: a.to(self.device, non_blocking=True) for h, a in acts.items()}
        return ActivationBatch(moved, tokens.to(self.device, non_blocking=True))

    def __iter__(self) -> Iterator[ActivationBatch]:
        while True:
            yield self.next_batch()

    def sample(self, hook: str, n: int) -> torch.Tensor:
        """Up to ``n`` activations of ``hook`` from the buffer, without consuming any batch.

        Used for norm estimates and b_dec initialization before training starts.
        """
        if self.buffer.size == 0:
            self._fill()
        return self.buffer.rows(hook, n).to(self.device, torch.float32)

    def norm_scaling_factor(self, hook: str, n: int = 65536) -> float:
        """sqrt(d_in) / E||x||: scales activations to an expected norm of sqrt(d_in)."""
        mean_norm = self.sample(hook, n).norm(dim=-1).mean()
        require(
            math.isfinite(float(mean_norm)) and float(mean_norm) > 0,
            "hook",
            hook,
            f"its activations have no usable scale (mean norm {float(mean_norm)}); use another "
            "hook, or a wider model dtype if they overflow",
        )
        # Divided in float32, as runs before this check were: resumed and repeated runs keep
        # their exact scale.
        return float(self.d_in[hook] ** 0.5 / mean_norm)

    # -- resuming ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Exact position: stream state of the last consumed batch, buffer, carry-over rows."""
        return {
            "stream": copy.deepcopy(self._stream_state),
            "buffer": map_tensors(self.buffer.state_dict(), torch.Tensor.cpu),
            "carry": map_tensors(self._carry, torch.Tensor.cpu),
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self._stream_state = state["stream"]
        self.buffer.load_state_dict(state["buffer"])
        device = self.buffer.tokens.device
        self._carry = map_tensors(state["carry"], lambda t: t.to(device))
        self.tokens_seen = state["tokens_seen"]

    def close(self) -> None:
        """Stop the producer thread (it restarts from the saved position on demand)."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def __del__(self) -> None:
        if hasattr(self, "_prefetch"):  # __init__ may have raised before setting it
            self.close()
