"""The activations store against a direct forward pass: values, alignment, mixing, memory, resume.

The reference is always computed independently: the same contexts (from a separate
ContextStream) through a full ``model.run_with_cache``. Served rows are matched to reference rows
by nearest activation, and the match must also agree on the token id, which catches rows that
were shuffled apart from their tokens or taken from the wrong hook.
"""

from __future__ import annotations

import gc
import io
import itertools
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from datasets import Dataset

from drrik.config import DataConfig, StoreConfig
from drrik.data import ContextStream
from drrik.errors import ConfigError
from drrik.store import ActivationsStore

HOOK = "blocks.1.hook_resid_post"
CTX, PROMPTS, N_BUF, BATCH = 16, 4, 4, 32
CAPACITY = CTX * PROMPTS * N_BUF  # 256 rows, 8 training batches


@pytest.fixture(scope="module")
def text_dataset() -> Dataset:
    """Random words: no two contexts share a prefix, so only BOS rows repeat across contexts."""
    g = torch.Generator().manual_seed(0)
    vocab = [w for w in __doc__.split() if w.isalpha()]
    texts = []
    for _ in range(200):
        n = int(torch.randint(0, 40, (1,), generator=g))
        texts.append(" ".join(vocab[i] for i in torch.randint(0, len(vocab), (n,), generator=g)))
    return Dataset.from_dict({"text": texts})


def _cfgs(**kw: Any) -> tuple[DataConfig, StoreConfig]:
    data = DataConfig(
        context_size=CTX,
        document_separator=kw.pop("document_separator", "eos"),
        exclude_special_tokens=kw.pop("exclude", False),
    )
    store = StoreConfig(
        train_batch_size_tokens=kw.pop("batch", BATCH),
        n_batches_in_buffer=kw.pop("n_buf", N_BUF),
        store_batch_size_prompts=PROMPTS,
        mix_fraction=kw.pop("mix", 0.5),
        buffer_dtype=kw.pop("buffer_dtype", "model"),
    )
    assert not kw, kw
    return data, store


def _store(model: Any, dataset: Dataset, hooks: tuple[str, ...] = (HOOK,), **kw: Any) -> Any:
    seed = kw.pop("seed", 0)
    data, store = _cfgs(**kw)
    return ActivationsStore(
        model, list(hooks), data, store, dataset=dataset, seed=seed, verbose=False
    )


def _direct(
    model: Any, dataset: Dataset, n_batches: int, hooks: tuple[str, ...] = (HOOK,), **kw: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rows of the first ``n_batches`` model batches, one full forward per hook."""
    data, _ = _cfgs(**kw)
    stream = ContextStream(dataset, model.tokenizer, data)
    tokens = torch.cat(list(itertools.islice(stream.batches(PROMPTS), n_batches)))
    acts = {}
    for hook in hooks:  # separate forwards on purpose: the store shares one
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        acts[hook] = cache[hook].reshape(-1, cache[hook].shape[-1]).float()
    return acts, tokens.reshape(-1)


def _match(served: torch.Tensor, served_tokens: torch.Tensor, ref: torch.Tensor, ref_tokens: Any):
    """Class of the reference row equal to each served row; asserts the token agrees.

    Identical reference rows (every context's BOS position, for one) form one class, named by
    their first index, so that a multiset of classes says which rows were served how often.
    """
    exact = "donot_use_mm_for_euclid_dist"
    best = torch.cdist(served.float(), ref, compute_mode=exact).argmin(dim=1)
    torch.testing.assert_close(served.float(), ref[best], rtol=1e-4, atol=1e-5)
    assert torch.equal(ref_tokens[best], served_tokens), "activations and tokens came apart"
    return _classes(ref)[best]


def _classes(ref: torch.Tensor) -> torch.Tensor:
    same = torch.cdist(ref, ref, compute_mode="donot_use_mm_for_euclid_dist") < 1e-5
    return same.float().argmax(dim=1)  # first index of an identical row


def _serve(store: Any, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batches = [store.next_batch() for _ in range(n)]
    acts = {h: torch.cat([b.acts[h] for b in batches]) for h in batches[0].acts}
    return acts, torch.cat([b.tokens for b in batches])


def test_batches_have_the_configured_shape_dtype_and_device(
    tiny_model: Any, text_dataset: Dataset
) -> None:
    store = _store(tiny_model, text_dataset, buffer_dtype="bfloat16")
    batch = store.next_batch()
    d_model = tiny_model.cfg.d_model
    assert store.d_in == {HOOK: d_model}
    assert batch.acts[HOOK].shape == (BATCH, d_model)
    assert batch.acts[HOOK].dtype == torch.bfloat16
    assert batch.tokens.shape == (BATCH,) and batch.tokens.dtype == torch.long
    assert batch.acts[HOOK].device.type == batch.tokens.device.type == "cpu"
    assert torch.isfinite(batch.acts[HOOK].float()).all()
    store.close()


def test_one_fill_serves_every_direct_row_once_shuffled(
    tiny_model: Any, text_dataset: Dataset
) -> None:
    """With mix 0 and no exclusion, each fill is a permutation of the direct rows."""
    store = _store(tiny_model, text_dataset, mix=0.0)
    ref, ref_tokens = _direct(tiny_model, text_dataset, 2 * N_BUF, mix=0.0)
    per_fill = CAPACITY // BATCH
    for fill in range(2):
        acts, tokens = _serve(store, per_fill)
        rows = slice(fill * CAPACITY, (fill + 1) * CAPACITY)
        got = _match(acts[HOOK], tokens, ref[HOOK][rows], ref_tokens[rows])
        every = _classes(ref[HOOK][rows])
        assert sorted(got.tolist()) == sorted(every.tolist()), "a row served twice or never"
        assert not torch.equal(got, every), "the fill was not shuffled"
    assert store.tokens_seen == 2 * CAPACITY
    store.close()


def test_mixing_keeps_the_configured_share(tiny_model: Any, text_dataset: Dataset) -> None:
    """Each refill brings (1 - mix) x capacity new rows; the rest mixes in from before."""
    store = _store(tiny_model, text_dataset, mix=0.5)
    ref, ref_tokens = _direct(tiny_model, text_dataset, 3 * N_BUF)
    half = CAPACITY // 2 // BATCH  # batches served per refill
    seen_after_fill = []
    served = []
    for _ in range(4):
        acts, tokens = _serve(store, half)
        seen_after_fill.append(store.tokens_seen)
        served.append(_match(acts[HOOK], tokens, ref[HOOK], ref_tokens))
    assert seen_after_fill == [CAPACITY, CAPACITY * 3 // 2, CAPACITY * 2, CAPACITY * 5 // 2]
    # No row is served more often than it occurs among the direct rows.
    classes = _classes(ref[HOOK])
    occurs = torch.bincount(classes, minlength=len(classes))
    assert (torch.bincount(torch.cat(served), minlength=len(classes)) <= occurs).all()
    # After the first refill, about half of what is served was kept back from the first fill
    # (counted on rows that occur once, whose origin is certain).
    after_refill = served[1][occurs[served[1]] == 1]
    assert after_refill.numel() > BATCH
    from_first_fill = (after_refill < CAPACITY).float().mean().item()
    assert 0.3 < from_first_fill < 0.7
    store.close()


def test_several_hooks_share_a_forward_and_stay_aligned(
    tiny_model: Any, text_dataset: Dataset
) -> None:
    hooks = ("blocks.0.hook_resid_post", "blocks.2.hook_mlp_out")
    store = _store(tiny_model, text_dataset, hooks=hooks)
    acts, tokens = _serve(store, 4)
    ref, ref_tokens = _direct(tiny_model, text_dataset, N_BUF, hooks=hooks)
    best = _match(acts[hooks[0]], tokens, ref[hooks[0]], ref_tokens)
    torch.testing.assert_close(acts[hooks[1]], ref[hooks[1]][best], rtol=1e-4, atol=1e-5)
    assert store.tokens_seen == CAPACITY, "one forward pass must serve both hooks"
    store.close()


@pytest.fixture
def drrik_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for drrik's loggers: their root does not propagate, and pytest before 9.2 only
    listens on the root logger."""
    logger = logging.getLogger("drrik")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="drrik")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_memory_bound_and_describe(
    tiny_model: Any, text_dataset: Dataset, drrik_log: pytest.LogCaptureFixture
) -> None:
    hooks = [HOOK, "blocks.3.hook_resid_post"]
    data, store_cfg = _cfgs(buffer_dtype="bfloat16")
    store = ActivationsStore(tiny_model, hooks, data, store_cfg, dataset=text_dataset)
    d = tiny_model.cfg.d_model
    assert store.buffer.capacity == CAPACITY
    assert store.buffer.nbytes == CAPACITY * d * 2 * len(hooks) + CAPACITY * 8
    (line,) = [r.getMessage() for r in drrik_log.records if r.name == "drrik.store"]
    assert "activations buffer" in line and f"{CAPACITY:,} tokens" in line
    assert f"{store.buffer.nbytes / 2**30:.3f} GiB" in line
    store.close()


@pytest.mark.parametrize("fresh", [False, True], ids=["same-store", "fresh-store"])
def test_state_dict_reproduces_the_next_batches(
    tiny_model: Any, text_dataset: Dataset, fresh: bool
) -> None:
    """Saved mid-serving with rows carried over from a forward pass that did not fit."""
    kw: dict[str, Any] = {"mix": 0.3, "exclude": True, "seed": 7}
    store = _store(tiny_model, text_dataset, **kw)
    for _ in range(30):
        store.next_batch()
        if store._carry is not None and store.buffer.batches_ready() > 0:
            break
    assert store._carry is not None, "pick a position with a pending carry-over"
    blob = io.BytesIO()
    torch.save(store.state_dict(), blob)  # a checkpoint must survive serialization
    expected = [store.next_batch() for _ in range(12)]

    blob.seek(0)
    state = torch.load(blob)
    target = _store(tiny_model, text_dataset, **kw) if fresh else store
    target.load_state_dict(state)
    for want, got in zip(expected, (target.next_batch() for _ in range(12)), strict=True):
        assert torch.equal(want.tokens, got.tokens)
        assert torch.equal(want.acts[HOOK], got.acts[HOOK])
    store.close()
    target.close()


def test_exclude_special_tokens(tiny_model: Any, text_dataset: Dataset) -> None:
    special = {tiny_model.tokenizer.bos_token_id, tiny_model.tokenizer.eos_token_id}
    special.add(tiny_model.tokenizer.pad_token_id)
    kept = _store(tiny_model, text_dataset, exclude=True)
    _, tokens = _serve(kept, 8)
    assert not set(tokens.tolist()) & special
    everything = _store(tiny_model, text_dataset, exclude=False)
    _, tokens = _serve(everything, 8)
    assert {tiny_model.tokenizer.bos_token_id, tiny_model.tokenizer.eos_token_id} <= set(
        tokens.tolist()
    )
    kept.close()
    everything.close()


def test_norm_scaling_factor(
    tiny_model: Any, text_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tiny_model, text_dataset)
    factor = store.norm_scaling_factor(HOOK, n=CAPACITY)
    ref, _ = _direct(tiny_model, text_dataset, N_BUF)  # exactly the first fill's rows
    d = tiny_model.cfg.d_model
    expected = d**0.5 / ref[HOOK].norm(dim=-1).mean().item()
    assert factor == pytest.approx(expected, rel=1e-4)
    scaled = store.sample(HOOK, CAPACITY) * factor
    assert scaled.norm(dim=-1).mean().item() == pytest.approx(d**0.5, rel=1e-4)
    monkeypatch.setattr(store, "sample", lambda hook, n: torch.zeros(n, d))  # a dead hook
    assert "no usable scale" in _config_error("hook", store.norm_scaling_factor, HOOK)
    store.close()


@pytest.mark.parametrize("eval_split", [None, "test"])
def test_rows_are_held_out_only_without_an_eval_split(
    tiny_model: Any, eval_split: str | None
) -> None:
    """Pretokenized rows carry their index at position 1; the first fill shows which were used."""
    rows = torch.randint(1000, 40000, (40, CTX), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = tiny_model.tokenizer.bos_token_id
    rows[:, 1] = 100 + torch.arange(40)
    data = DataConfig(
        context_size=CTX, eval_split=eval_split, holdout_every=5, exclude_special_tokens=False
    )
    _, store_cfg = _cfgs(mix=0.0)
    store = ActivationsStore(
        tiny_model,
        [HOOK],
        data,
        store_cfg,
        dataset=Dataset.from_dict({"tokens": rows.tolist()}),
        verbose=False,
    )
    _, tokens = _serve(store, CAPACITY // BATCH)  # exactly the first PROMPTS x N_BUF rows
    used = sorted(t - 100 for t in tokens.tolist() if 100 <= t < 140)
    candidates = [i for i in range(40) if eval_split or i % 5]
    assert used == candidates[: PROMPTS * N_BUF]
    store.close()


def test_producer_errors_reach_the_caller(tiny_model: Any) -> None:
    """A dataset whose rows are all empty fails in the producer thread, raised on next_batch."""
    store = _store(tiny_model, Dataset.from_dict({"text": ["", "", ""]}))
    with pytest.raises(ConfigError, match=r"^dataset="):
        store.next_batch()
    store.close()


# -- bad input -----------------------------------------------------------------------------
def _config_error(field: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``fn``; it must raise a one-line ConfigError naming ``field``. Returns the message."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert info.value.field == field and message.startswith(f"{field}=")
    assert "\n" not in message
    return message


def test_store_refuses_bad_input(
    tiny_model: Any, text_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    data, store = _cfgs()
    build = ActivationsStore
    message = _config_error(
        "hook", build, tiny_model, ["blocks.1.hook_resid_pots"], data, store, dataset=text_dataset
    )
    assert "blocks.1.hook_resid_post" in message
    too_long = DataConfig(context_size=tiny_model.cfg.n_ctx + 1)
    assert "256" in _config_error(
        "context_size", build, tiny_model, [HOOK], too_long, store, dataset=text_dataset
    )
    small = StoreConfig(
        train_batch_size_tokens=4096, n_batches_in_buffer=2, store_batch_size_prompts=PROMPTS
    )
    _config_error(
        "n_batches_in_buffer", build, tiny_model, [HOOK], data, small, dataset=text_dataset
    )
    no_text = Dataset.from_dict({"body": ["text"]})
    _config_error("text_column", build, tiny_model, [HOOK], data, store, dataset=no_text)
    gc.collect()  # half-built stores are collected without errors in __del__
    assert not unraisable


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("train_batch_size_tokens", {"train_batch_size_tokens": -1}),
        ("n_batches_in_buffer", {"n_batches_in_buffer": 0}),
        ("store_batch_size_prompts", {"store_batch_size_prompts": -8}),
        ("mix_fraction", {"mix_fraction": 1.0}),
        ("mix_fraction", {"mix_fraction": -0.1}),
        ("buffer_dtype", {"buffer_dtype": "float8"}),
        ("prefetch_batches", {"prefetch_batches": 0}),
    ],
)
def test_store_config_validation(field: str, kwargs: dict[str, Any]) -> None:
    _config_error(field, StoreConfig, **kwargs)
