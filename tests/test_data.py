"""Text to token contexts: concatenation edge cases, local files, row selection, resuming.

Every check compares the contexts against an independent view of the same data (the documents
tokenized one by one, or row markers planted in pretokenized rows), so a token lost, duplicated
or moved across a document boundary fails a test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset, DatasetDict

from drrik.config import DataConfig
from drrik.data import ContextStream, load_source
from drrik.errors import ConfigError

CTX = 16
BODY = CTX - 1  # tokens after the opening BOS


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Any) -> Any:
    return tiny_model.tokenizer


@pytest.fixture(scope="module")
def bos(tokenizer: Any) -> int:
    return tokenizer.bos_token_id


@pytest.fixture(scope="module")
def eos(tokenizer: Any) -> int:
    return tokenizer.eos_token_id


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the Arrow files that load_dataset writes for local files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _docs_dataset() -> Dataset:
    """Short documents, one far longer than a context, none containing special tokens."""
    words = "river stone cloud maple orbit lantern quartz meadow violet harbor".split()
    texts = [" ".join(words[(i + j) % 10] for j in range(3 + (i * 5) % 11)) for i in range(12)]
    texts[4] = " ".join(f"{words[j % 10]}{j}" for j in range(90))  # spans several contexts
    return Dataset.from_dict({"text": texts})


def _stream(dataset: Any, tokenizer: Any, **kwargs: Any) -> ContextStream:
    holdout = kwargs.pop("holdout", "all")
    cycle = kwargs.pop("cycle", False)
    shard = kwargs.pop("shard", (0, 1))
    cfg = DataConfig(**{"context_size": CTX, **kwargs})
    return ContextStream(dataset, tokenizer, cfg, holdout=holdout, shard=shard, cycle=cycle)


def _contexts(stream: ContextStream, batch_size: int = 1) -> torch.Tensor:
    """Every context of a non-cycling stream, stacked."""
    return torch.cat(list(stream.batches(batch_size)))


def _tokenized(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t]


@pytest.mark.parametrize("separator", ["bos", "eos", "none"])
def test_bos_opens_every_context(tokenizer: Any, bos: int, separator: str) -> None:
    ctx = _contexts(_stream(_docs_dataset(), tokenizer, document_separator=separator))
    assert ctx.shape[0] > 5 and ctx.shape[1] == CTX and ctx.dtype == torch.long
    assert (ctx[:, 0] == bos).all()
    if separator == "bos":  # the separator at a cut is the opening BOS, never doubled
        assert not (ctx[:, 1] == bos).any()


@pytest.mark.parametrize("separator", ["eos", "none"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_concatenation_loses_and_duplicates_nothing(
    tokenizer: Any, eos: int, separator: str, prepend_bos: bool
) -> None:
    """Bodies of the contexts, joined, are the documents joined with their separators."""
    dataset = _docs_dataset()
    sep = [eos] if separator == "eos" else []
    expected = [t for doc in _tokenized(tokenizer, dataset["text"]) for t in doc + sep]
    stream = _stream(dataset, tokenizer, document_separator=separator, prepend_bos=prepend_bos)
    ctx = _contexts(stream)
    body = ctx[:, 1:] if prepend_bos else ctx
    joined = body.reshape(-1).tolist()
    assert joined == expected[: len(joined)]
    # The long document really spilled over several contexts.
    long_doc = tokenizer(dataset["text"][4], add_special_tokens=False)["input_ids"]
    assert len(long_doc) > 3 * CTX
    # Only the final partial context is dropped, and one was (the data does not divide evenly).
    assert 0 < len(expected) - len(joined) < body.shape[1]


def test_bos_separator_only_drops_bos_at_cuts(tokenizer: Any, bos: int) -> None:
    """With BOS between documents, the stream is the documents joined by BOS, except a BOS that
    would open a context body (the context's own BOS already separates there)."""
    texts = list(_docs_dataset()["text"])
    # A first document of exactly one body puts a separator right at the first cut.
    words = "river stone cloud maple orbit lantern quartz meadow violet harbor".split() * 2
    texts[0] = " ".join(words[:BODY])  # one token per word
    assert len(_tokenized(tokenizer, texts[:1])[0]) == BODY
    expected = [t for doc in _tokenized(tokenizer, texts) for t in doc + [bos]]
    ctx = _contexts(
        _stream(Dataset.from_dict({"text": texts}), tokenizer, document_separator="bos")
    )
    joined = ctx[:, 1:].reshape(-1).tolist()
    i = dropped = 0
    for j, token in enumerate(joined):
        while expected[i] != token:
            assert expected[i] == bos and j % BODY == 0, f"token {expected[i]} lost at {i}"
            i, dropped = i + 1, dropped + 1
        i += 1
    assert dropped >= 1  # the fixture's documents put a separator at a cut
    assert len(expected) - i <= BODY  # only the final partial context is missing


def test_empty_rows_are_skipped(tokenizer: Any) -> None:
    texts = list(_docs_dataset()["text"])
    with_empty = [x for t in texts for x in (t, "", None)]
    full = _contexts(
        _stream(Dataset.from_dict({"text": with_empty}), tokenizer, document_separator="eos")
    )
    plain = _contexts(
        _stream(Dataset.from_dict({"text": texts}), tokenizer, document_separator="eos")
    )
    assert torch.equal(full, plain)


def test_finite_stream_ends_with_a_partial_batch(tokenizer: Any) -> None:
    """Whole batches of batch_size, then whatever contexts are left; none lost or repeated."""
    singles = _contexts(_stream(_docs_dataset(), tokenizer))
    assert singles.shape[0] % 4 != 0, "the fixture should leave a partial batch"
    batches = list(_stream(_docs_dataset(), tokenizer).batches(4))
    assert all(b.shape == (4, CTX) for b in batches[:-1])
    assert batches[-1].shape == (singles.shape[0] % 4, CTX)
    assert torch.equal(torch.cat(batches), singles)


def _pretokenized_rows(bos: int, n: int, length: int = CTX) -> list[list[int]]:
    """SAELens-style rows: exactly one context each, opened by BOS; token 1 marks the row."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1000, 40000, (n, length), generator=g)
    rows[:, 0] = bos
    rows[:, 1] = 100 + torch.arange(n)
    return rows.tolist()


@pytest.mark.parametrize("column", ["tokens", "input_ids"])
def test_pretokenized_rows_pass_through_unchanged(tokenizer: Any, bos: int, column: str) -> None:
    rows = _pretokenized_rows(bos, 10)
    dataset = Dataset.from_dict({column: rows, "text": ["ignored"] * 10})
    stream = _stream(dataset, tokenizer)
    assert stream.pretokenized and stream.column == column
    assert _contexts(stream, batch_size=2).tolist() == rows


def test_pretokenized_rows_without_bos_prepend(tokenizer: Any, bos: int) -> None:
    rows = _pretokenized_rows(bos, 6)
    ctx = _contexts(_stream(Dataset.from_dict({"tokens": rows}), tokenizer, prepend_bos=False))
    assert ctx.tolist() == rows


def _row_markers(stream: ContextStream) -> list[int]:
    return [m - 100 for m in _contexts(stream)[:, 1].tolist()]


def test_holdout_split_is_disjoint_and_complete(tokenizer: Any, bos: int) -> None:
    dataset = Dataset.from_dict({"tokens": _pretokenized_rows(bos, 40)})
    train = _row_markers(_stream(dataset, tokenizer, holdout="train", holdout_every=5))
    held = _row_markers(_stream(dataset, tokenizer, holdout="eval", holdout_every=5))
    assert held == [i for i in range(40) if i % 5 == 0]
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(40))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_cover_the_data(tokenizer: Any, bos: int, world: int) -> None:
    dataset = Dataset.from_dict({"tokens": _pretokenized_rows(bos, 40)})
    train = _row_markers(_stream(dataset, tokenizer, holdout="train", holdout_every=5))
    shards = [
        _row_markers(
            _stream(dataset, tokenizer, holdout="train", holdout_every=5, shard=(r, world))
        )
        for r in range(world)
    ]
    assert sorted(itertools.chain(*shards)) == sorted(train)
    assert sum(len(s) for s in shards) == len(set(itertools.chain(*shards)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    ("iterable", "shard"),
    [(False, (0, 1)), (True, (0, 1)), (True, (1, 2))],
    ids=["map-style", "streaming", "streaming-shard"],
)
def test_state_dict_resumes_exactly(
    tokenizer: Any, text_dataset: Dataset, iterable: bool, shard: tuple[int, int]
) -> None:
    """A fresh stream loaded with a saved state yields the same batches, across epochs too."""
    data = text_dataset.select(range(40))
    dataset = data.to_iterable_dataset() if iterable else data
    first = _stream(dataset, tokenizer, holdout="train", cycle=True, shard=shard)
    batches = first.batches(3)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, checkpointable as is
    assert state["pending"], "pick a position with tokens waiting to be cut"
    expected = [next(batches) for _ in range(40)]
    assert first.state.epoch >= 1, "the comparison should cross the end of the data"

    resumed = _stream(dataset, tokenizer, holdout="train", cycle=True, shard=shard)
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed.batches(3), 40))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


# -- local files ---------------------------------------------------------------------------
DOCS = ["The first document.\nIt has two lines.", "A second one.", "Third and last."]


def _write_txt(path: Path) -> Path:
    target = path / "docs.txt"
    target.write_text("\n\n".join(DOCS) + "\n")
    return target


def _write_json(path: Path) -> Path:
    target = path / "docs.json"
    target.write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(DOCS)]))
    return target


def _write_jsonl(path: Path) -> Path:
    target = path / "docs.jsonl"
    target.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return target


def _write_parquet(path: Path) -> Path:
    target = path / "docs.parquet"
    Dataset.from_dict({"text": DOCS}).to_parquet(str(target))
    return target


def _write_saved(path: Path) -> Path:
    target = path / "saved"
    Dataset.from_dict({"text": DOCS}).save_to_disk(str(target))
    return target


def _write_saved_dict(path: Path) -> Path:
    target = path / "saved-dict"
    other = Dataset.from_dict({"text": ["not this split"]})
    DatasetDict({"train": Dataset.from_dict({"text": DOCS}), "test": other}).save_to_disk(
        str(target)
    )
    return target


def _write_jsonl_dir(path: Path) -> Path:
    target = path / "shards"
    target.mkdir()
    for i, doc in enumerate(DOCS):
        (target / f"part-{i}.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    return target


@pytest.mark.parametrize(
    "write",
    [
        _write_txt,
        _write_json,
        _write_jsonl,
        _write_parquet,
        _write_saved,
        _write_saved_dict,
        _write_jsonl_dir,
    ],
    ids=lambda f: f.__name__.removeprefix("_write_"),
)
def test_local_files_load(tmp_path: Path, tokenizer: Any, write: Any) -> None:
    dataset = load_source(DataConfig(dataset=str(write(tmp_path))))
    assert [t.strip() for t in dataset["text"]] == DOCS
    stream = ContextStream(
        dataset, tokenizer, DataConfig(context_size=4), holdout="all", cycle=False
    )
    assert len(list(stream.batches(1))) > 3


# -- bad input -----------------------------------------------------------------------------
def _config_error(field: str, fn: Any, *args: Any, **kwargs: Any) -> str:
    """Run ``fn``; it must raise a one-line ConfigError naming ``field``. Returns the message."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert info.value.field == field and message.startswith(f"{field}=")
    assert "\n" not in message
    return message


def test_dataset_without_text_or_tokens_column(tokenizer: Any) -> None:
    dataset = Dataset.from_dict({"content": ["some text"], "id": [0]})
    assert "content" in _config_error("text_column", _stream, dataset, tokenizer)
    _config_error("text_column", _stream, dataset, tokenizer, text_column="body")


def test_empty_dataset(tokenizer: Any) -> None:
    _config_error("dataset", _stream, Dataset.from_dict({"text": []}), tokenizer)


def test_pretokenized_with_another_tokenizer(tokenizer: Any, bos: int) -> None:
    too_big = _pretokenized_rows(bos, 4)
    too_big[2][5] = len(tokenizer) + 10
    message = _config_error("dataset", _stream, Dataset.from_dict({"tokens": too_big}), tokenizer)
    assert str(len(tokenizer)) in message
    gpt2_bos = [[50256] + row[1:] for row in _pretokenized_rows(bos, 4)]
    message = _config_error("dataset", _stream, Dataset.from_dict({"tokens": gpt2_bos}), tokenizer)
    assert "50256" in message


def test_bad_dataset_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert "no such file" in _config_error(
        "dataset", load_source, DataConfig(dataset=str(tmp_path / "missing.jsonl"))
    )
    (tmp_path / "data.csv").write_text("text\nhello\n")
    _config_error("dataset", load_source, DataConfig(dataset=str(tmp_path / "data.csv")))
    (tmp_path / "nothing").mkdir()
    _config_error("dataset", load_source, DataConfig(dataset=str(tmp_path / "nothing")))
    _config_error("dataset", load_source, DataConfig(dataset="no-such-org/no-such-dataset-xyz"))
    _config_error(
        "split", load_source, DataConfig(dataset=str(_write_saved_dict(tmp_path)), split="dev")
    )


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("context_size", {"context_size": -4}),
        ("context_size", {"context_size": 1}),
        ("holdout_every", {"holdout_every": 0}),
        ("document_separator", {"document_separator": "newline"}),
    ],
)
def test_data_config_validation(field: str, kwargs: dict[str, Any]) -> None:
    _config_error(field, DataConfig, **kwargs)
