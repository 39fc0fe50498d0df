"""Text generation with an activation edit at one TransformerLens hook point.

drrik does not call the hooked model's own ``generate``: with transformer-lens 4.3 and
transformers 5.24, ``TransformerBridge.generate``'s KV cache returned garbage (every greedy
continuation of SmolLM2 came out as ``' to-----'``) without any error. Instead:

- **Hugging Face path** (a ``TransformerBridge``, hook at a component's input or output, which
  covers ``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``, ``mlp.hook_in`` and
  ``attn.hook_z``): Hugging Face's own ``generate`` runs on the HF modules that the bridge wraps,
  in a shallow copy of the module tree that shares every weight (no memory is copied), with a
  plain torch forward hook where the TransformerLens hook point sits. Unsteered output is then
  HF's own, token for token, with HF's KV cache and sampling; only the forward hook is drrik's.
- **Forward path** (hooks inside a component such as ``ln2.hook_normalized``, models with no
  wrapped HF model such as a ``HookedTransformer``): a loop that runs the hooked model's full
  forward pass for each new token, with the edit as a TransformerLens hook. It has no KV cache,
  so it is slower, but it depends only on the forward pass that training already uses.

Both take the same edit, a function of the activation that returns the change to add; the
change is applied in float32 and cast back, at every generated position and at the prompt
positions ``prompt_mask`` selects.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

Edit = Callable[[Tensor], Tensor]
"""Activation ``[batch, pos, d]`` -> the change to add to it (any float dtype)."""

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The HF module a bridge component wraps, or None for a plain module."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) and inner is not module else None


def plain_hf_model(model: Any) -> tuple[nn.Module, dict[int, nn.Module]] | None:
    """The bridge's HF model with every bridge component replaced by the module it wraps.

    Returns the copy and a map from each original HF module's ``id`` to its copy, or None when
    ``model`` wraps no HF model, or when a module's ``forward`` was replaced on the instance
    (accelerate does that when it spreads a model over devices, and the replacement would call
    the original, wrapped module). Only module objects are copied: parameters, buffers and the
    config are shared, and hooks already registered on HF modules are kept. Hooks added to the
    copy do not reach the original.
    """
    root = getattr(model, "original_model", None)
    if not isinstance(root, nn.Module):
        return None
    if any("forward" in vars(m) for m in root.modules()):
        return None
    copies: dict[int, nn.Module] = {}

    def unwrap(module: nn.Module) -> nn.Module:
        while (inner := _wrapped(module)) is not None:
            module = inner
        clone = copy.copy(module)
        for name in _HOOK_DICTS:
            if hasattr(module, name):
                setattr(clone, name, OrderedDict(getattr(module, name)))
        clone._modules = {
            k: (unwrap(v) if v is not None else None) for k, v in module._modules.items()
        }
        copies[id(module)] = clone
        return clone

    return unwrap(root), copies


def hf_site(model: Any, hook: str) -> tuple[nn.Module, str] | None:
    """The HF module where TransformerLens hook ``hook`` fires, and ``"in"`` or ``"out"``.

    A bridge hook point named ``hook_in``/``hook_out`` of a component sees that component's
    wrapped module's input/output; other hook points (inside a component) have no HF site.
    """
    point = getattr(model, "hook_dict", {}).get(hook)
    if point is None or getattr(model, "original_model", None) is None:
        return None
    owners = {id(m): (name, m) for name, m in model.named_modules()}
    path, _ = owners.get(id(point), ("", None))
    parent_path, _, leaf = path.rpartition(".")
    if leaf not in ("hook_in", "hook_out") or not parent_path:
        return None
    inner = _wrapped(model.get_submodule(parent_path))
    return (inner, leaf.removeprefix("hook_")) if inner is not None else None


class _Masked:
    """Applies ``edit`` where steering is wanted: at ``prompt_mask``'s prompt positions and at
    every generated one. A call sees the whole sequence when ``whole_sequence`` (no KV cache) or
    when it is the first (the prompt); later KV-cached calls see only new positions."""

    def __init__(self, edit: Edit, prompt_mask: Tensor, whole_sequence: bool) -> None:
        self.edit, self.prompt_mask, self.whole_sequence = edit, prompt_mask, whole_sequence
        self.calls = 0

    def __call__(self, act: Tensor) -> Tensor:
        delta = self.edit(act).float().to(act.device)
        if self.whole_sequence or self.calls == 0:
            keep = torch.ones(act.shape[:2], dtype=torch.float32, device=act.device)
            keep[:, : self.prompt_mask.shape[1]] = self.prompt_mask.to(keep)
            delta = delta * keep[:, :, None]
        self.calls += 1
        return act + delta.to(act.dtype)


@contextmanager
def _forward_hook(module: nn.Module, side: str, apply: _Masked) -> Iterator[None]:
    """A torch hook that edits ``module``'s input hidden states or (first) output."""
    if side == "out":

        def after(_: nn.Module, __: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (apply(output[0]), *output[1:])
            return apply(output)

        handle = module.register_forward_hook(after)
    else:

        def before(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(before, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _pick(logits: Tensor, temperature: float, top_p: float | None) -> Tensor:
    """Next token per row: argmax when ``temperature`` is 0, else a nucleus sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1)[:, 0]


@torch.no_grad()
def _generate_with_forward(
    model: Any,
    tokens: Tensor,
    mask: Tensor,
    max_new_tokens: int,
    hook: str | None,
    apply: _Masked | None,
    temperature: float,
    top_p: float | None,
    eos: int | None,
    pad: int,
) -> Tensor:
    hooks = [(hook, lambda act, hook: apply(act))] if apply is not None and hook else []
    seq, seq_mask = tokens, mask
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    new: list[Tensor] = []
    with model.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            positions = (seq_mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(seq, attention_mask=seq_mask, position_ids=positions)[:, -1]
            token = _pick(logits, temperature, top_p).to(seq).masked_fill(done, pad)
            new.append(token)
            if eos is not None:
                done |= token == eos
            seq = torch.cat([seq, token[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
            if bool(done.all()):
                break
    return torch.stack(new, dim=1)


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokens: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    *,
    hook: str | None = None,
    edit: Edit | None = None,
    prompt_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    backend: str = "auto",
) -> Tensor:
    """New tokens ``[batch, <= max_new_tokens]`` after left-padded ``tokens``, with ``edit``
    applied at ``hook`` (prompt positions where ``prompt_mask``, default ``attention_mask``).

    ``backend``: ``"auto"`` (Hugging Face where the hook has an HF site, else forward),
    ``"hf"`` or ``"forward"``. Rows that reach ``eos_token_id`` continue with ``pad_token_id``.
    """
    site = hf_site(model, hook) if hook and edit else None
    plain = None if backend == "forward" else plain_hf_model(model)
    hf_ready = plain is not None and (edit is None or site is not None)
    if backend == "hf" and not hf_ready:
        raise ValueError(f"hook {hook!r} has no Hugging Face module; use backend='forward'")
    apply = None
    if edit is not None:
        keep = attention_mask if prompt_mask is None else prompt_mask
        apply = _Masked(edit, keep, whole_sequence=not hf_ready)
    if not hf_ready:
        return _generate_with_forward(
            model,
            tokens,
            attention_mask,
            max_new_tokens,
            hook,
            apply,
            temperature,
            top_p,
            eos_token_id,
            pad_token_id,
        )
    hf, copies = plain  # type: ignore[misc]
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p or 1.0, top_k=0)
    edited = nullcontext() if site is None else _forward_hook(copies[id(site[0])], site[1], apply)
    with edited:
        out = hf.generate(
            input_ids=tokens,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **sampling,
        )
    return out[:, tokens.shape[1] :]
