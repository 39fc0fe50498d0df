"""Text to token contexts: dataset loading, column detection and document concatenation.

Documents are tokenized without special tokens and concatenated into one stream with a
separator token after each; every context is cut from that stream and, with ``prepend_bos``,
opened by BOS. A :class:`ContextStream` knows exactly where it is (row index, the tokens
waiting to be cut) so that a run can be resumed bit-exactly from its :meth:`state_dict`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk

from drrik.config import DataConfig
from drrik.corpus import OFFLINE_CORPUS_NAME, load_offline_corpus
from drrik.errors import reading, require

TOKEN_COLUMNS = ("tokens", "input_ids")
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_TOKENIZE_CHUNK = 64

AnyDataset = Dataset | IterableDataset


def _load_local(path: Path, split: str) -> AnyDataset:
    """A local dataset; unreadable or empty files fail in one line that names the path."""
    if path.is_dir():
        if any((path / f).exists() for f in _SAVED_DATASET_FILES):
            with reading("dataset", str(path), "save it again with Dataset.save_to_disk"):
                loaded = load_from_disk(str(path))
            if isinstance(loaded, DatasetDict):
                require(split in loaded, "split", split, f"use one of {list(loaded)}")
                return loaded[split]
            return loaded
        files = sorted(p for p in path.iterdir() if p.suffix in _FILE_BUILDERS)
        require(bool(files), "dataset", str(path), "the directory holds no txt/json/jsonl/parquet")
        builders = {_FILE_BUILDERS[p.suffix] for p in files}
        require(len(builders) == 1, "dataset", str(path), "mix of file types; keep one kind")
    else:
        require(
            path.suffix in _FILE_BUILDERS,
            "dataset",
            str(path),
            f"use a file ending in one of {tuple(_FILE_BUILDERS)} or a saved dataset directory",
        )
        builders, files = {_FILE_BUILDERS[path.suffix]}, [path]
    require(
        any(p.stat().st_size > 0 for p in files),
        "dataset",
        str(path),
        ("it is empty" if path.is_file() else "every file there is empty") + "; give it some text",
    )
    builder = builders.pop()
    # Paragraphs, not lines, make natural documents out of plain text files.
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    fix = {"text": "save it as UTF-8 text"}.get(builder, f"check that it is valid {builder}")
    with reading("dataset", str(path), fix):
        return load_dataset(builder, data_files=[str(p) for p in files], split="train", **extra)


def load_source(cfg: DataConfig, split: str | None = None) -> AnyDataset:
    """Open the configured dataset: the offline corpus, a local path, or a hub name."""
    split = split or cfg.split
    name = cfg.dataset
    if name == OFFLINE_CORPUS_NAME:
        return load_offline_corpus()
    path = Path(name).expanduser()
    if path.exists():
        return _load_local(path, split)
    require(
        not name.startswith((".", "/", "~")),
        "dataset",
        name,
        "no such file or directory; check the path",
    )
    fix = f"use a hub name, a local file or directory, or {OFFLINE_CORPUS_NAME}"
    with reading("dataset", name, fix, problem="could not load it from the Hugging Face Hub"):
        return load_dataset(name, cfg.dataset_config, split=split, streaming=cfg.streaming)


def _first_row(dataset: AnyDataset) -> dict[str, Any] | None:
    if isinstance(dataset, Dataset):
        return dataset[0] if len(dataset) else None
    return next(iter(dataset), None)


def _is_token_row(value: Any) -> bool:
    """Token ids come as sequences (lists, arrays, tensors); text as strings (or None)."""
    return value is not None and not isinstance(value, str) and hasattr(value, "__len__")


def detect_column(dataset: AnyDataset, text_column: str | None) -> tuple[str, bool]:
    """Pick the column to read and say whether it holds token ids (pretokenized) or text."""
    first = _first_row(dataset)
    require(first is not None, "dataset", "(empty)", "the dataset has no rows; give it some text")
    columns = list(first)
    if text_column is not None:
        require(text_column in first, "text_column", text_column, f"use one of {columns}")
        return text_column, _is_token_row(first[text_column])
    for name in TOKEN_COLUMNS:
        if name in first:
            return name, True
    require(
        "text" in first,
        "text_column",
        None,
        f"the dataset has no text, tokens or input_ids column; name one of {columns}",
    )
    return "text", False


@dataclass
class SpecialTokens:
    """The tokenizer's special ids that matter for concatenation and exclusion."""

    bos: int | None
    eos: int | None
    pad: int | None
    vocab_size: int

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        return cls(
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
        )

    def ids(self) -> list[int]:
        """Ids excluded from training batches when exclude_special_tokens is on."""
        return sorted({i for i in (self.bos, self.eos, self.pad) if i is not None})


def check_pretokenized(rows: list[list[int]], special: SpecialTokens, prepend_bos: bool) -> None:
    """Refuse token ids that could not come from the model's tokenizer."""
    top = max((max(r) for r in rows if len(r)), default=0)
    require(
        top < special.vocab_size,
        "dataset",
        f"token id {top}",
        f"the pretokenized data does not match the model's tokenizer (vocab {special.vocab_size}); "
        "pretokenize it with this model's tokenizer",
    )
    firsts = {r[0] for r in rows if len(r)}
    if prepend_bos and len(rows) > 1 and len(firsts) == 1 and special.bos is not None:
        (first,) = firsts
        require(
            first == special.bos,
            "dataset",
            f"rows start with token {first}",
            f"the model's BOS is {special.bos}: the data was pretokenized with another tokenizer",
        )


@dataclass
class StreamState:
    """Where a stream stands: next row to read, rows taken, tokens not yet cut, passes made."""

    row: int = 0
    taken: int = 0
    pending: list[int] = field(default_factory=list)
    epoch: int = 0


class ContextStream:
    """Deterministic iterator of ``[batch, context_size]`` token batches from a dataset.

    ``select`` picks rows by their index: the training stream skips held-out rows, the eval
    stream takes only those, and data-parallel ranks take disjoint shards. ``cycle`` restarts
    the dataset when it runs out (training); the eval stream ends instead.
    """

    def __init__(
        self,
        dataset: AnyDataset,
        tokenizer: Any,
        cfg: DataConfig,
        *,
        holdout: str = "train",
        shard: tuple[int, int] = (0, 1),
        cycle: bool = True,
    ) -> None:
        self.dataset, self.tokenizer, self.cfg = dataset, tokenizer, cfg
        self.holdout, self.shard, self.cycle = holdout, shard, cycle
        self.column, self.pretokenized = detect_column(dataset, cfg.text_column)
        self.special = SpecialTokens.of(tokenizer)
        require(
            not cfg.prepend_bos or self.special.bos is not None,
            "prepend_bos",
            True,
            "the tokenizer has no BOS token; set prepend_bos false",
        )
        sep = {"bos": self.special.bos, "eos": self.special.eos, "none": None}
        self.separator: int | None = None if self.pretokenized else sep[cfg.document_separator]
        if self.pretokenized:
            first_rows = [list(r[self.column]) for r in itertools.islice(iter(dataset), 8)]
            check_pretokenized(first_rows, self.special, cfg.prepend_bos)
        self.state = StreamState()

    # -- row selection ---------------------------------------------------------------------
    def _holds(self, row: int) -> bool:
        if self.holdout == "all":
            return True
        held_out = row % self.cfg.holdout_every == 0
        return held_out if self.holdout == "eval" else not held_out

    def _rows(self, start: int) -> Iterator[tuple[int, Any]]:
        if isinstance(self.dataset, Dataset):
            for row in range(start, len(self.dataset)):
                if self._holds(row):
                    yield row, self.dataset[row][self.column]
        else:
            for row, item in enumerate(self.dataset.skip(start), start=start):
                if self._holds(row):
                    yield row, item[self.column]

    def _documents(self) -> Iterator[tuple[int, int, list[int]]]:
        """(row, rows taken so far, token ids) of this shard's documents, tokenized in chunks.

        A row of ``-1`` marks the end of one pass over the data.
        """
        rank, world = self.shard
        while True:
            taken = self.state.taken
            chunk: list[tuple[int, int, Any]] = []
            for row, value in self._rows(self.state.row):
                taken += 1
                if (taken - 1) % world == rank:
                    chunk.append((row, taken, value))
                if len(chunk) == _TOKENIZE_CHUNK:
                    yield from self._tokenize(chunk)
                    chunk = []
            yield from self._tokenize(chunk)
            if not self.cycle:
                return
            yield -1, 0, []

    def _tokenize(self, chunk: list[tuple[int, int, Any]]) -> Iterator[tuple[int, int, list[int]]]:
        if not chunk:
            return
        if self.pretokenized:
            docs = [list(map(int, v)) for *_, v in chunk]
            if self.cfg.prepend_bos:
                docs = [d[1:] if d and d[0] == self.special.bos else d for d in docs]
        else:
            texts = [v or "" for *_, v in chunk]
            docs = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for (row, taken, _), doc in zip(chunk, docs, strict=True):
            yield row, taken, doc

    # -- contexts --------------------------------------------------------------------------
    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield ``[batch_size, context_size]`` int64 batches; ``self.state`` follows each yield.

        A stream that does not cycle ends with a last, possibly smaller, batch.
        """
        bos = self.special.bos
        body = self.cfg.context_size - (1 if self.cfg.prepend_bos else 0)
        prefix = [bos] if self.cfg.prepend_bos else []
        # With BOS as separator, the BOS that opens a context already separates documents.
        drop_leading_bos = self.cfg.prepend_bos and self.separator == bos
        contexts: list[list[int]] = []
        pending = list(self.state.pending)
        empty_pass = True
        for row, taken, doc in self._documents():
            if row < 0:
                require(
                    not empty_pass,
                    "dataset",
                    self.cfg.dataset,
                    "it gave no tokens for this stream; check the text column and the split",
                )
                self.state.epoch += 1
                self.state.row, self.state.taken, empty_pass = 0, 0, True
                continue
            self.state.row, self.state.taken = row + 1, taken
            if not doc:
                continue
            empty_pass = False
            pending.extend(doc)
            if self.separator is not None:
                pending.append(self.separator)
            while True:
                if drop_leading_bos and pending and pending[0] == bos:
                    pending = pending[1:]
                if len(pending) < body:
                    break
                contexts.append(prefix + pending[:body])
                pending = pending[body:]
                if len(contexts) == batch_size:
                    self.state.pending = list(pending)
                    yield torch.tensor(contexts, dtype=torch.long)
                    contexts = []
        if contexts:  # a finite (eval) stream ends with what it has
            self.state.pending = list(pending)
            yield torch.tensor(contexts, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        """The exact position after the last yielded batch."""
        s = self.state
        return {"row": s.row, "taken": s.taken, "pending": list(s.pending), "epoch": s.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = state
        self.state = StreamState(s["row"], s["taken"], list(s["pending"]), s["epoch"])
