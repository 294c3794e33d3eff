"""`mor-data collect`: a tree of source files and docs → one JSON-lines corpus the real pipeline reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import zstandard

from data_pipeline.cli import main
from data_pipeline.collect import collect
from data_pipeline.errors import DataError
from data_pipeline.sources import DocumentStream

FILES = {
    "pkg/__init__.py": "from pkg.core import run\n",
    "pkg/core.py": "def run():\n    return 42\n",
    "pkg/README.md": "# pkg\n\nRuns things.\n",
    "other/vendored/core.py": "def run():\n    return 42\n",  # the same bytes as pkg/core.py
    "other/notes.txt": "plain notes\n",
    "other/blank.py": "  \n\n",
    "other/table.py": "x = 1\n" * 400,  # 2,400 bytes: over max_file_bytes below
    "other/data.csv": "a,b\n1,2\n",  # not a wanted extension
    "pkg/__pycache__/core.cpython-312.py": "cached = True\n",
    ".hidden/secret.py": "token = 1\n",
}


def make_tree(root) -> None:
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "other" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    os.symlink(root / "pkg" / "core.py", root / "other" / "link.py")


def read(path) -> list[dict]:
    with zstandard.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_one_record_per_file_in_content_hash_order_with_duplicates_and_bad_files_counted(tmp_path):
    make_tree(tmp_path / "tree")
    out = tmp_path / "corpus.jsonl.zst"
    stats = collect([str(tmp_path / "tree")], str(out), max_file_bytes=2000)
    records = read(out)
    kept = ["pkg/__init__.py", "other/vendored/core.py", "pkg/README.md", "other/notes.txt"]
    def digest(name: str) -> str:
        return hashlib.sha256(FILES[name].encode()).hexdigest()

    assert [r["path"] for r in records] == sorted(kept, key=digest)
    assert [r["text"] for r in records] == [FILES[r["path"]] for r in records]
    assert (stats.files, stats.duplicates) == (4, 1)  # pkg/core.py is other/vendored/core.py again
    assert stats.skipped == {"empty": 1, "not_utf8": 1, "too_large": 1}
    def size(*names: str) -> int:
        return sum(len(FILES[n].encode()) for n in names)

    assert stats.by_extension == {".md": {"files": 1, "bytes": size("pkg/README.md")},
                                  ".py": {"files": 2, "bytes": size("pkg/__init__.py", "pkg/core.py")},
                                  ".txt": {"files": 1, "bytes": size("other/notes.txt")}}
    with zstandard.open(out, "rb") as f:
        assert stats.sha256 == hashlib.sha256(f.read()).hexdigest()
    # the pipeline reads it as any local source, through `datasets`
    assert list(DocumentStream(str(out))) == [r["text"] for r in records]


def test_output_depends_only_on_the_texts(tmp_path):
    make_tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "pkg", tmp_path / "b" / "site" / "pkg", symlinks=True)
    shutil.copytree(tmp_path / "a" / "other", tmp_path / "b" / "site" / "other", symlinks=True)
    first = collect([str(tmp_path / "a" / "other"), str(tmp_path / "a" / "pkg")], str(tmp_path / "1.jsonl"))
    second = collect([str(tmp_path / "b" / "site")], str(tmp_path / "2.jsonl"))
    def texts(path):
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]

    assert texts(tmp_path / "1.jsonl") == texts(tmp_path / "2.jsonl") and first.files == second.files == 5


def test_max_total_keeps_a_prefix_in_hash_order(tmp_path):
    make_tree(tmp_path / "tree")
    full = collect([str(tmp_path / "tree")], str(tmp_path / "full.jsonl"))
    part = collect([str(tmp_path / "tree")], str(tmp_path / "part.jsonl.gz"), max_total_bytes=60)
    assert part.bytes <= 60 and part.files + part.skipped["over_total"] == full.files
    whole = [json.loads(line)["path"] for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [t for t in DocumentStream(str(tmp_path / "part.jsonl.gz"))] == [FILES.get(p) for p in whole[:part.files]]


def test_cli_and_bad_input(tmp_path, capsys):
    make_tree(tmp_path / "tree")
    stats_file = tmp_path / "stats.json"
    assert main(["collect", str(tmp_path / "tree"), "--out", str(tmp_path / "c.jsonl"), "--ext", ".md,txt",
                 "--exclude", "*/notes.txt", "--stats", str(stats_file)]) == 0
    assert "1 files, 0.0 MB of text (.md 1 (0.0 MB))" in capsys.readouterr().out
    assert json.loads(stats_file.read_text())["skipped"] == {"excluded": 1}
    assert main(["collect", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert capsys.readouterr().err.strip() == f"mor-data collect: error: {tmp_path / 'nowhere'}: not a directory"
    with pytest.raises(DataError, match="expected a .jsonl, .jsonl.zst or .jsonl.gz file name"):
        collect([str(tmp_path / "tree")], str(tmp_path / "c.txt"))
    with pytest.raises(DataError, match=r"no \.rs files with text under"):
        collect([str(tmp_path / "tree")], str(tmp_path / "c.jsonl"), extensions=(".rs",))
