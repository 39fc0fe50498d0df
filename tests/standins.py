"""Stand-ins that let CPU tests see what only differs on GPUs.

- :class:`HostTensors` marks tensors a factory made without ``device=``: on a GPU run those
  are CPU tensors, which NCCL collectives reject; it also lists tensors made on a device
  from Python data (host-to-device copies that wait, on a GPU).
- :class:`CheckedDistributed` is rank 0 of a pretend two-process job whose collectives check
  NCCL's placement rule and carry no tensors where only metadata should travel.
- :class:`VirtualDevices` lets the CPU play several GPUs: tensors carry a pretend CUDA device,
  ``.to()`` moves them, and an op mixing two devices raises as CUDA does.
- :class:`SpreadModel` lays a model out as ``--model-n-devices`` does (embedding, a hooked
  layer and the LM head on three GPUs).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from drrik.distributed import Distributed

_FACTORIES = frozenset(
    {
        torch.tensor,
        torch.as_tensor,
        torch.scalar_tensor,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.empty,
        torch.arange,
        torch.rand,
        torch.randn,
        torch.randint,
    }
)
_FROM_PYTHON = frozenset({torch.tensor, torch.as_tensor})


def is_host(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` came from a factory called without a device or with ``"cpu"``
    spelled out: a CPU tensor on a GPU run, where the training device is a torch.device."""
    return getattr(tensor, "_standin_host", False)


class HostTensors(TorchFunctionMode):
    """Marks factory-made tensors that name no device; lists those made on a device from
    Python data (``torch.tensor(x, device=...)``: a copy from pageable host memory that waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_python: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES and isinstance(out, torch.Tensor):
            device = kwargs.get("device")
            if device is None or device == "cpu":  # none, or the host by name (Adam's step)
                out._standin_host = True
            if device is not None and func in _FROM_PYTHON and not torch.is_tensor(args[0]):
                self.from_python.append(f"{_caller()}: {func.__name__}({args[0]!r}, device=...)")
        return out


def _caller() -> str:
    """The module that called into torch (skipping torch's and this file's frames)."""
    frame = sys._getframe(1)
    while frame.f_globals.get("__name__", "").startswith(("torch.overrides", __name__)):
        frame = frame.f_back  # type: ignore[assignment]
    return frame.f_globals.get("__name__", "?")


def tensors_in(obj: Any) -> list[torch.Tensor]:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]


@dataclass
class CheckedDistributed(Distributed):
    """Rank 0 of two, whose collectives (see :meth:`install`) check what NCCL checks.

    Both pretend ranks hold the same values, so a sum doubles and a max or broadcast keeps
    them; the other rank writes no checkpoint part.
    """

    world_size: int = 2
    collective_device: torch.device | None = torch.device("cpu")
    wait_group: Any = "the long-timeout gloo group"
    calls: list[str] = field(default_factory=list)

    def check_placement(self, tensors: list[torch.Tensor]) -> None:
        super().check_placement(tensors)
        for tensor in tensors:
            assert not is_host(tensor), (
                f"a {tuple(tensor.shape)} tensor made without a device went to a collective: "
                "on a GPU run it is a CPU tensor, which NCCL rejects"
            )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make the Trainer join this job, and torch.distributed answer as its peers would."""
        monkeypatch.setattr(Distributed, "from_environment", classmethod(lambda *a: self))
        tdist = torch.distributed

        def all_reduce(tensor: torch.Tensor, op: Any = tdist.ReduceOp.SUM, **_: Any) -> None:
            self.calls.append("all_reduce")
            if op == tdist.ReduceOp.SUM:
                tensor.mul_(self.world_size)

        def broadcast(tensor: torch.Tensor, src: int = 0, **_: Any) -> None:
            self.calls.append("broadcast")

        def gather_object(obj: Any, gathered: list | None, dst: int = 0, **_: Any) -> None:
            assert not tensors_in(obj), "tensors gathered to rank 0 (through NCCL on GPUs)"
            self.calls.append("gather_object")
            if gathered is not None:
                gathered[:] = [obj] + [[] for _ in range(self.world_size - 1)]

        def broadcast_object_list(objects: list[Any], src: int = 0, **_: Any) -> None:
            self.calls.append("broadcast_object_list")  # this is rank 0: its objects stand

        def barrier(group: Any = None, **_: Any) -> None:
            self.calls.append("barrier" if group is None else "wait_for_main")

        for name, fn in [
            ("all_reduce", all_reduce),
            ("broadcast", broadcast),
            ("gather_object", gather_object),
            ("broadcast_object_list", broadcast_object_list),
            ("barrier", barrier),
            ("is_initialized", lambda: True),
            ("destroy_process_group", lambda *a, **k: self.calls.append("destroy")),
        ]:
            monkeypatch.setattr(tdist, name, fn)


_DEVICE_GETTER = torch.Tensor.device.__get__
_MOVES = {torch.Tensor.to, torch.Tensor.cpu}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def vdev(tensor: torch.Tensor) -> torch.device | None:
    """The pretend CUDA device of ``tensor``; None for a plain CPU tensor."""
    return getattr(tensor, "_vdev", None)


def place(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    tensor._vdev = device
    return tensor


class VirtualDevices(TorchFunctionMode):
    """The CPU as several pretend GPUs (see the module docstring); ``paused()`` runs code as
    plain CPU code, e.g. a real model behind a stand-in that places its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.is_paused = False

    @contextlib.contextmanager
    def paused(self, paused: bool = True) -> Iterator[None]:
        """Plain CPU code meanwhile (``paused=False``: pretend GPUs again, e.g. in a hook)."""
        before, self.is_paused = self.is_paused, paused
        try:
            yield
        finally:
            self.is_paused = before

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if self.is_paused:
            return func(*args, **kwargs)
        if func == _DEVICE_GETTER:
            return vdev(args[0]) or func(*args)
        if func in _MOVES:
            return self._move(func, args, kwargs)
        target = kwargs.get("device")
        if target is not None and torch.device(target).type == "cuda":
            kwargs["device"] = "cpu"  # a factory asked for a pretend GPU
        else:
            target = self._common_device(func, args, kwargs)
        out = func(*args, **kwargs)
        if target is not None:
            for tensor in tensors_in(out):
                place(tensor, torch.device(target))
        return out

    @staticmethod
    def _common_device(func: Any, args: tuple, kwargs: dict) -> torch.device | None:
        """The one device the op's tensors share; raise as CUDA does when there are two.

        CUDA lets a 0-dim CPU tensor join any op, copies cross devices, and CPU indices
        index a GPU tensor.
        """
        if func is torch.Tensor.copy_:
            return vdev(args[0])
        checked = tensors_in((args[:1] + args[2:], kwargs)) if func in _INDEXING else None
        found = {}
        for tensor in checked if checked is not None else tensors_in((args, kwargs)):
            device = vdev(tensor)
            if device is None and tensor.dim() == 0:
                continue
            found[str(device or "cpu")] = device
        if checked is not None:
            for index in tensors_in(args[1]):
                if vdev(index) is not None:
                    found[str(vdev(index))] = vdev(index)
        if len(found) > 1:
            raise RuntimeError(
                f"{getattr(func, '__name__', func)}: expected all tensors to be on the same "
                f"device, but found at least two devices, {' and '.join(sorted(found))}"
            )
        return next(iter(found.values()), None)

    @staticmethod
    def _move(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        tensor = args[0]
        if func is torch.Tensor.cpu:
            return tensor.clone() if vdev(tensor) is not None else tensor
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
        if device is None:
            target = vdev(tensor)
        else:
            target = device if device.type == "cuda" else None
        moved = target != vdev(tensor)
        out = tensor.to(dtype or tensor.dtype, non_blocking=non_blocking, copy=moved)
        return place(out, target) if moved or target is not None else out


class SpreadModel:
    """A hooked model whose layers ``--model-n-devices`` spread: the embedding (and the first
    parameter) on ``cuda:0``, every hooked layer's activations on ``cuda:1``, the logits of an
    untied LM head on ``cuda:2``. Hooks must hand back replacements on the layer's device."""

    def __init__(self, model: Any, mode: VirtualDevices) -> None:
        self.model, self.mode = model, mode
        self.tokenizer = model.tokenizer
        self.embedding, self.layer, self.head = (torch.device("cuda", i) for i in range(3))

    def parameters(self) -> Iterator[torch.Tensor]:
        yield place(next(self.model.parameters()).detach(), self.embedding)

    def _check_input(self, tokens: torch.Tensor) -> None:
        assert vdev(tokens) == self.embedding, f"tokens on {vdev(tokens)}, not the embedding's"

    def run_with_cache(self, tokens: torch.Tensor, **kwargs: Any) -> tuple[Any, dict]:
        self._check_input(tokens)
        with self.mode.paused():
            logits, cache = self.model.run_with_cache(tokens, **kwargs)
        return place(logits, self.head), {k: place(v, self.layer) for k, v in cache.items()}

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: list[tuple[str, Callable]]) -> Any:
        self._check_input(tokens)

        def on_layer(fn: Callable) -> Callable:
            """The hook sees its activation on the layer's device, as in the spread model."""

            def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
                with self.mode.paused(False):
                    new = fn(place(act, self.layer), hook)
                if new is not None:  # None: a hook that only reads
                    assert vdev(new) == self.layer, f"a replacement on {vdev(new)}, not the layer's"
                return new

            return hook

        wrapped = [(name, on_layer(fn)) for name, fn in fwd_hooks]
        with self.mode.paused():
            logits = self.model.run_with_hooks(tokens, fwd_hooks=wrapped)
        return place(logits, self.head)


# CUDA autocast runs these in float32: a bf16 input is first copied to float32.
_CUDA_AUTOCAST_FP32 = frozenset(
    {
        "sum", "exp", "pow", "__pow__", "norm", "vector_norm", "log", "prod", "softmax",
        "log_softmax", "cumsum", "rsqrt", "reciprocal", "mse_loss", "cosine_similarity",
    }
)  # fmt: skip


class CudaAutocastPolicy(TorchFunctionMode):
    """Lists the ops CUDA autocast would copy to float32, run under CPU autocast.

    CPU autocast keeps these in bf16, so CPU runs cannot see the copies; this applies CUDA's
    list while autocast is on for the tensor's device, to bf16 inputs of ``shape`` (batch x
    d_sae). Float32 outputs of that shape (type promotion) are listed too.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.upcast: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _CUDA_AUTOCAST_FP32:
            for tensor in tensors_in((args, kwargs)):
                if tensor.dtype == torch.bfloat16 and self._counts(tensor):
                    self.upcast.append(f"{name}{tuple(tensor.shape)}")
        out = func(*args, **(kwargs or {}))
        for tensor in tensors_in(out):  # float32 by type promotion, e.g. bf16 + a float32 bias
            if tensor.dtype == torch.float32 and self._counts(tensor):
                self.upcast.append(f"{name}->float32{tuple(tensor.shape)}")
        return out

    def _counts(self, tensor: torch.Tensor) -> bool:
        return tensor.shape == self.shape and torch.is_autocast_enabled(tensor.device.type)
