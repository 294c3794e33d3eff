"""``mor-data collect``: directory trees of text files (source code, docs) → one JSON-lines corpus, a file per line.

Each kept file becomes ``{"text": <its contents>, "path": <path relative to its root>}``, the input ``mor-data
train-tokenizer`` and ``mor-data prepare`` read as a local ``.jsonl[.zst|.gz]`` source.

Order: by the SHA-256 of each file's bytes. The output then depends only on the set of texts, not on where the roots
are mounted or how the file system lists them, and packages are interleaved: the last shards of a prepared
directory, which the loader holds out for validation (``data.val_shards``), are a uniform sample of the files
rather than the end of the alphabet. Exact duplicates (a module vendored twice) are kept once, under the smallest of
their relative paths. Skipped and counted:
files that are not UTF-8, empty (whitespace only), or larger than ``max_file_bytes``. ``max_total_bytes`` keeps
files in hash order until the corpus reaches that size (a uniform sample, for small runs). Symbolic links,
``__pycache__`` and hidden directories are not followed.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

from data_pipeline.errors import DataError

DEFAULT_EXTENSIONS = (".py", ".pyi", ".md", ".rst", ".txt")
DEFAULT_MAX_FILE_BYTES = 1 << 20  # larger "sources" are generated tables and data dumps, not prose or code
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class _File:
    sha256: str
    path: str  # absolute, for reading
    name: str  # relative to its root, for the record
    ext: str
    size: int


@dataclass
class CollectStats:
    roots: list[str]
    extensions: list[str]
    files: int = 0  # kept
    bytes: int = 0  # UTF-8 bytes kept
    by_extension: dict[str, dict[str, int]] = field(default_factory=dict)  # ext -> {"files", "bytes"}
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # not_utf8 | empty | too_large | over_total | excluded
    sha256: str = ""  # of the uncompressed output

    def to_dict(self) -> dict:
        return {"roots": self.roots, "extensions": self.extensions, "files": self.files, "bytes": self.bytes,
                "by_extension": self.by_extension, "duplicates": self.duplicates, "skipped": self.skipped,
                "sha256": self.sha256}


def _walk(root: str, extensions: tuple[str, ...], exclude: tuple[str, ...],
          skipped: Counter) -> Iterator[tuple[str, str]]:
    """(absolute path, path relative to root) of the regular files under root with a wanted extension."""
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for name in files:
            path = os.path.join(directory, name)
            if not name.lower().endswith(extensions) or os.path.islink(path):
                continue
            if any(fnmatch.fnmatch(path, pattern) for pattern in exclude):
                skipped["excluded"] += 1
                continue
            yield path, os.path.relpath(path, root)


def _open_output(path: str, name: str) -> tuple[BinaryIO, BinaryIO]:
    """(file to close, stream to write) at `path`, compressed as the final file `name` says (.zst, .gz or none)."""
    raw = open(path, "wb")
    if name.endswith((".zst", ".zstd")):
        return raw, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(raw, closefd=False)
    if name.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
    return raw, raw


def collect(roots: list[str], out: str, *, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
            max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_total_bytes: int = 0,
            exclude: tuple[str, ...] = ()) -> CollectStats:
    """Write the corpus of ``roots`` to ``out`` (atomically) and return what was kept and skipped."""
    if not out.endswith((".jsonl", ".jsonl.zst", ".jsonl.zstd", ".jsonl.gz")):
        raise DataError(f"--out {out}: expected a .jsonl, .jsonl.zst or .jsonl.gz file name")
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not extensions:
        raise DataError("--ext: no file extension given")
    for root in roots:
        if not os.path.isdir(root):
            raise DataError(f"{root}: not a directory")
    stats = CollectStats(roots=[os.path.abspath(r) for r in roots], extensions=list(extensions))
    skipped: Counter[str] = Counter()
    kept: dict[str, _File] = {}
    for root in roots:
        for path, name in _walk(root, extensions, exclude, skipped):
            if os.path.getsize(path) > max_file_bytes:
                skipped["too_large"] += 1
                continue
            data = Path(path).read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in kept:  # the copy named first in path order stays, whatever order the walk took
                stats.duplicates += 1
                if name >= kept[digest].name:
                    continue
            ext = next(e for e in extensions if name.lower().endswith(e))
            kept[digest] = _File(digest, path, name, ext, len(data))
    if not kept:
        raise DataError(f"no {'/'.join(extensions)} files with text under {', '.join(roots)}")

    tmp = f"{os.path.dirname(os.path.abspath(out))}/.{os.path.basename(out)}.tmp"
    by_ext: dict[str, Counter] = {}
    whole = hashlib.sha256()
    raw, stream = _open_output(tmp, out)
    try:
        order = sorted(kept)
        for position, digest in enumerate(order):
            file = kept[digest]
            if max_total_bytes and stats.bytes + file.size > max_total_bytes:
                skipped["over_total"] = len(order) - position
                break
            data = Path(file.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise DataError(f"{file.path}: changed while the corpus was being written; run collect again")
            line = (json.dumps({"text": data.decode("utf-8"), "path": file.name}, ensure_ascii=False) + "\n").encode()
            stream.write(line)
            whole.update(line)
            stats.files += 1
            stats.bytes += file.size
            counts = by_ext.setdefault(file.ext, Counter())
            counts["files"] += 1
            counts["bytes"] += file.size
        if stream is not raw:
            stream.close()
        raw.close()
    except BaseException:
        raw.close()
        os.unlink(tmp)
        raise
    os.replace(tmp, out)
    stats.by_extension = {ext: dict(by_ext[ext]) for ext in sorted(by_ext)}
    stats.skipped = dict(sorted(skipped.items()))
    stats.sha256 = whole.hexdigest()
    return stats
