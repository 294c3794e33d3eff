"""``mor-data prepare``: stream a source, tokenize it with N workers, pack it and write zstd shards + an index.

Packing: documents in source order, each followed by EOS, concatenated and cut into shards of exactly
``shard_tokens`` tokens (the last one shorter); a document may continue into the next shard. Every token of every
document appears exactly once. The output does not depend on the number of workers.

Crash safety and resumption: shards are written to a temporary file and renamed, and after every shard
``progress.json`` records the finished shards, the source stream's state (``datasets`` ``state_dict()``), the
already-tokenized tokens past the shard boundary (``progress.carry-*.zst``) and every source file's identity (size,
modification time, content digest, taken before the first record is read). Re-running the same command continues
after the last complete shard and produces the same bytes an uninterrupted run would; a re-run over a source whose
files were rewritten, added or removed is refused naming them, and so is the end of a run whose files changed
while it read them. ``index.json`` appears only when everything is written; then the progress files go.

On many hosts: ``part=(k, n)`` (``--part k/n``, one Slurm array task each) prepares only the k-th of n contiguous
runs of the source's files into ``OUT/parts/k-of-n/``, a prepared directory of its own whose shards also record
where each document ends (``shard_*.ends.zst``). :func:`merge_parts` (``mor-data merge``) then packs the parts' tokens
in order into ``OUT`` exactly as one host would have: the same shard files byte for byte, the same index (but for
its provenance), verified before ``index.json`` is written; the parts go afterwards.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zstandard
from filelock import FileLock, Timeout

from data_pipeline.errors import DataError
from data_pipeline.files import atomic_write_bytes, atomic_write_json
from data_pipeline.shards import (DEFAULT_FRAME_TOKENS, DEFAULT_SHARD_TOKENS, INDEX_FILE, ShardIndex, ShardInfo,
                                  read_shard, token_dtype, verify_shard, write_shard)
from data_pipeline.sources import MAX_REPORTED, DocumentStream, parse_source, source_changes, source_identity
from data_pipeline.tokenize_pool import TokenizePool, document_tasks
from data_pipeline.tokenizer import load_tokenizer

PROGRESS_FILE = "progress.json"
PARTS_DIR = "parts"
_PART_DIR = re.compile(r"^(\d+)-of-(\d+)$")


def part_dir(out: Path, part: tuple[int, int]) -> Path:
    return out / PARTS_DIR / f"{part[0]}-of-{part[1]}"


def _ends_file(shard: ShardInfo) -> str:
    return shard.file.replace(".zst", ".ends.zst")


def _write_ends(out: Path, shard: ShardInfo, ends: np.ndarray) -> None:
    """Where the shard's documents end (offsets in the shard), so a merge can count them per re-cut shard."""
    atomic_write_bytes(out / _ends_file(shard), zstandard.ZstdCompressor().compress(ends.astype("<u8").tobytes()))


def _read_ends(directory: Path, shard: ShardInfo) -> np.ndarray:
    path = directory / _ends_file(shard)
    try:
        ends = np.frombuffer(zstandard.ZstdDecompressor().decompress(path.read_bytes()), dtype="<u8")
    except (OSError, zstandard.ZstdError) as e:
        raise DataError(f"{path}: cannot read the part's document ends ({e}); prepare that part again") from None
    if len(ends) != shard.docs:
        raise DataError(f"{path}: {len(ends)} document ends, the part's index says {shard.docs}")
    return ends.astype(np.int64)


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each of these distributions (those not installed left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def library_versions() -> dict:
    return {"python": platform.python_version(),
            **installed_versions(("mor-ds", "datasets", "sentencepiece", "tokenizers", "zstandard", "numpy"))}


def _settings(source: str, text_field: str, min_chars: int, max_chars: int, tokenizer_hash: str,
              shard_tokens: int, frame_tokens: int) -> dict:
    """What must be equal for a resumed or repeated prepare to continue the same shard set (a part's add its
    ``part``, [k, n])."""
    return {"source": source, "text_field": text_field, "min_chars": min_chars, "max_chars": max_chars,
            "tokenizer_hash": tokenizer_hash, "shard_tokens": shard_tokens, "frame_tokens": frame_tokens}


def _check_same(path: Path, recorded: dict, wanted: dict) -> None:
    for key, value in wanted.items():
        if recorded.get(key) != value:
            raise DataError(f"{path}: made with {key}={recorded.get(key)!r}, this run has {value!r}; "
                            f"use another --out or the same settings")


def _listed(changes: list[str], most: int = 5) -> str:
    more = f"; and {len(changes) - most} more" if len(changes) > most else ""
    return "; ".join(changes[:most]) + more


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """docs/s, MB/s, tokens, shards and (local files) the share of the source read and an ETA: a live rich line on
    a terminal, else a plain line on stderr every ``interval`` seconds (batch jobs, logs), else nothing."""

    def __init__(self, enabled: bool, label: str, interval: float = 30.0, source_bytes: int | None = None):
        self.label, self.interval, self.source_bytes = label, interval, source_bytes
        self.docs = self.text_bytes = self.tokens = self.shards = self.bytes_read = 0
        self.first_read: int | None = None  # where this process started reading (a resumed run starts part-way)
        self.start = self.last = time.perf_counter()
        self.live = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.live
        if self.live:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                                 TextColumn("{task.fields[line]}", markup=False), TimeElapsedColumn(),
                                 console=Console(stderr=True))
            self._task = self._bar.add_task(label, total=None, line="")
            self._bar.start()

    def rates(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        line = (f"{self.docs:,} docs {self.docs / seconds:,.0f} docs/s | {self.text_bytes / seconds / 1e6:.2f} MB/s | "
                f"{self.tokens:,} tokens {self.tokens / seconds:,.0f} tokens/s | {self.shards} shards")
        if self.source_bytes:
            done = self.bytes_read / self.source_bytes
            rate = (self.bytes_read - (self.first_read or 0)) / seconds
            eta = f", ETA {_duration((self.source_bytes - self.bytes_read) / rate)}" if rate > 0 else ""
            line += f" | {100 * done:.1f}% of {self.source_bytes / 1e6:,.1f} MB{eta}"
        return line

    def advance(self, docs: int, text_bytes: int, tokens: int, shards: int, bytes_read: int = 0) -> None:
        self.docs += docs
        self.text_bytes += text_bytes
        self.tokens += tokens
        if self.first_read is None:
            self.first_read = bytes_read
        self.shards, self.bytes_read = shards, max(self.bytes_read, bytes_read)
        if self.live:
            self._bar.update(self._task, line=self.rates())
        elif self.lines and time.perf_counter() - self.last >= self.interval:
            self.last = time.perf_counter()
            print(f"{self.label}: {self.rates()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            self._bar.stop()
        elif self.lines:
            print(f"{self.label}: {self.rates()}, {_duration(time.perf_counter() - self.start)} elapsed",
                  file=sys.stderr, flush=True)


class _Packer:
    """Accumulates tokenized tasks and cuts exact ``shard_tokens`` slices, tracking document ends."""

    def __init__(self, carry: np.ndarray, doc_ends: np.ndarray):
        self.parts = [carry] if len(carry) else []
        self.size = len(carry)
        self.doc_ends = [doc_ends] if len(doc_ends) else []  # positions (exclusive ends) relative to the buffer

    def add(self, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
        self.doc_ends.append(doc_ends + self.size)
        self.parts.append(tokens)
        self.size += len(tokens)

    def cut(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` buffered tokens and the ends of the documents ending among them."""
        tokens = np.concatenate(self.parts)
        ends = np.concatenate(self.doc_ends) if self.doc_ends else np.zeros(0, np.int64)
        docs = int(np.searchsorted(ends, count, side="right"))
        rest = tokens[count:]
        self.parts, self.size = ([rest] if len(rest) else []), len(rest)
        self.doc_ends = [ends[docs:] - count]
        return tokens[:count], ends[:docs]

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint32)
        ends = np.concatenate(self.doc_ends) if self.doc_ends else np.zeros(0, np.int64)
        return tokens, ends


def _save_progress(out: Path, settings: dict, sources: dict, shards: list[ShardInfo], stream_state: dict,
                   packer: _Packer, totals: dict) -> None:
    tokens, ends = packer.pending()
    carry = f"progress.carry-{len(shards):06d}.zst"
    atomic_write_bytes(out / carry, zstandard.ZstdCompressor().compress(tokens.astype(np.uint32).tobytes()))
    atomic_write_json(out / PROGRESS_FILE, {"settings": settings, "sources": sources,
                                            "shards": [asdict(s) for s in shards], "stream_state": stream_state,
                                            "carry_file": carry, "carry_doc_ends": ends.tolist(), "totals": totals})
    for old in out.glob("progress.carry-*.zst"):
        if old.name != carry:
            old.unlink(missing_ok=True)


def _copy_tokenizer(tokenizer_path: str, out: Path) -> str:
    """Copy the tokenizer (and an HF ``tokenizer_config.json``) into the shard dir; returns the copy's name."""
    name = "tokenizer.json" if tokenizer_path.endswith(".json") else "tokenizer.model"
    atomic_write_bytes(out / name, Path(tokenizer_path).read_bytes())
    config = Path(tokenizer_path).with_name("tokenizer_config.json")
    if name == "tokenizer.json" and config.exists():
        atomic_write_bytes(out / config.name, config.read_bytes())
    return name


def prepare(source: str, tokenizer_path: str, out_dir: str, *, workers: int = 1, text_field: str = "text",
            min_chars: int = 0, max_chars: int = 0, strict: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            frame_tokens: int = DEFAULT_FRAME_TOKENS, max_shards: int = 0, command: str = "",
            show_progress: bool = True, progress_interval: float = 30.0, task_bytes: int = 1 << 18,
            part: tuple[int, int] | None = None) -> ShardIndex | None:
    """Tokenize ``source`` into shards under ``out_dir``; returns the index, or None if ``max_shards`` stopped it.

    Re-running with the same arguments resumes an interrupted run, or returns the index of a finished one.
    ``max_shards`` > 0 stops after writing that many new shards (e.g. to fit a Slurm time limit); run again to go on.
    ``task_bytes``: text per worker task (the unit of parallel work; it does not change the output).
    ``progress_interval``: seconds between progress lines when stderr is not a terminal.
    ``part=(k, n)``: only the k-th of n contiguous runs of the source's files, into ``out_dir/parts/k-of-n/``
    (returns that part's index, or the merged one if :func:`merge_parts` already ran).
    """
    if shard_tokens < 2 or frame_tokens < 1:
        raise DataError(f"--shard-tokens ({shard_tokens}) must be >= 2 and --frame-tokens ({frame_tokens}) >= 1")
    for flag, value in (("--workers", workers), ("--max-shards", max_shards)):
        if value < 0:
            raise DataError(f"{flag} {value}: must be >= 0")
    out = Path(os.path.expanduser(out_dir))
    if part is not None and (out / INDEX_FILE).exists():  # a re-run task of a prepare that is merged already
        return ShardIndex.load(out)
    target = out if part is None else part_dir(out, part)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(target / ".prepare.lock"), timeout=0):
            return _prepare(source, tokenizer_path, target, workers=workers, text_field=text_field,
                            min_chars=min_chars, max_chars=max_chars, strict=strict, shard_tokens=shard_tokens,
                            frame_tokens=frame_tokens, max_shards=max_shards, command=command,
                            show_progress=show_progress, progress_interval=progress_interval,
                            task_bytes=task_bytes, part=part)
    except Timeout:
        raise DataError(f"{target}: another `mor-data prepare` is writing here") from None


def _prepare(source: str, tokenizer_path: str, out: Path, *, workers: int, text_field: str, min_chars: int,
             max_chars: int, strict: bool, shard_tokens: int, frame_tokens: int, max_shards: int, command: str,
             show_progress: bool, progress_interval: float, task_bytes: int,
             part: tuple[int, int] | None) -> ShardIndex | None:
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    spec = parse_source(source)
    settings = _settings(source, text_field, min_chars, max_chars, tokenizer.hash, shard_tokens, frame_tokens)
    if part is not None:
        settings["part"] = list(part)
    if (out / INDEX_FILE).exists():
        index = ShardIndex.load(out)
        _check_same(out / INDEX_FILE, {**index.source["settings"]}, settings)
        return index

    for stale in out.glob(".*.tmp-*"):  # half-written files of a killed run (we hold the directory's lock)
        stale.unlink()
    stream = DocumentStream(spec, text_field=text_field, min_chars=min_chars, max_chars=max_chars, strict=strict,
                            part=part)
    shards: list[ShardInfo] = []
    totals = {"docs": 0, "tokens": 0, "text_bytes": 0}
    carry, carry_ends = np.zeros(0, np.uint32), np.zeros(0, np.int64)
    progress_path = out / PROGRESS_FILE
    if progress_path.exists():
        saved = json.loads(progress_path.read_text())
        _check_same(progress_path, saved["settings"], settings)
        sources = saved.get("sources", {})
        changes = source_changes(sources, spec)
        if changes:
            raise DataError(f"{progress_path}: the source changed since this prepare began ({_listed(changes)}); "
                            f"resuming would duplicate or drop documents: restore the files, or prepare into a new "
                            f"--out")
        shards = [ShardInfo(**s) for s in saved["shards"]]
        stream.load_state_dict(saved["stream_state"])
        carry = np.frombuffer(zstandard.ZstdDecompressor().decompress((out / saved["carry_file"]).read_bytes()),
                              dtype=np.uint32)
        carry_ends = np.asarray(saved["carry_doc_ends"], dtype=np.int64)
        totals = saved["totals"]
    else:
        if any(out.glob("shard_*.zst")):
            raise DataError(f"{out}: holds shards but no {PROGRESS_FILE} or {INDEX_FILE}; refusing to overwrite "
                            f"them (use an empty --out)")
        sources = source_identity(spec)  # before the first record is read
    tokenizer_file = _copy_tokenizer(tokenizer.path, out)

    packer = _Packer(carry, carry_ends)
    new_shards = 0

    def write(count: int) -> None:
        tokens, ends = packer.cut(count)
        shards.append(write_shard(out, len(shards), tokens.astype(dtype), len(ends), frame_tokens))
        if part is not None:
            _write_ends(out, shards[-1], ends)

    def write_full_shards(stream_state: dict) -> bool:
        """Cut every complete shard out of the buffer; False once ``max_shards`` new shards are written."""
        nonlocal new_shards
        while packer.size >= shard_tokens:
            write(shard_tokens)
            _save_progress(out, settings, sources, shards, stream_state, packer, totals)
            new_shards += 1
            if max_shards and new_shards >= max_shards:
                return False
        return True

    bar = _Progress(show_progress, f"prepare {source}", progress_interval, stream.source_bytes)
    try:
        if not write_full_shards(stream.state_dict()):
            return None
        with TokenizePool(tokenizer, workers) as pool:
            documents = stream if stream.epoch == 0 else ()  # epoch 1: a resumed run had read everything
            tasks = document_tasks(documents, task_bytes=task_bytes, state=stream.state_dict)
            for stream_state, task in pool.encode(tasks):
                packer.add(task.tokens, task.doc_ends)
                totals["docs"] += task.docs
                totals["tokens"] += len(task.tokens)
                totals["text_bytes"] += task.text_bytes
                bar.advance(task.docs, task.text_bytes, len(task.tokens), len(shards), stream.bytes_read)
                if not write_full_shards(stream_state):
                    return None
        if packer.size:
            write(packer.size)
        bar.shards, bar.bytes_read = len(shards), stream.source_bytes or 0  # all of it read
    finally:
        bar.close()
    changes = source_changes(sources, spec)
    if changes:
        raise DataError(f"--source {source}: changed while prepare read it ({_listed(changes)}); the shards would "
                        f"mix old and new contents or miss documents: restore the files and run the same command "
                        f"again (it resumes from {progress_path}), or prepare into a new --out")
    if not shards and part is None:  # (a part may be empty: the other parts hold the documents)
        raise DataError(f"--source {source}: no documents (every record was bad, filtered or empty)")
    files = [{"path": path, **identity} for path, identity in sources.items()]
    index = ShardIndex(
        dtype=dtype.str, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
        tokenizer={**tokenizer.describe(), "file": tokenizer_file},
        source={**spec.describe(), **({"files": files} if files else {}), "settings": settings}, command=command,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), versions=library_versions(),
        shard_tokens=shard_tokens, frame_tokens=frame_tokens, shards=shards,
        totals={**totals, **stream.stats()})
    index.save(out)
    progress_path.unlink(missing_ok=True)
    for old in out.glob("progress.carry-*.zst"):
        old.unlink()
    return index


def _finished_parts(out: Path) -> list[tuple[Path, ShardIndex]]:
    """Every part of ``out``'s many-host prepare, in order, each finished; a one-line DataError otherwise."""
    found = {}
    for path in (out / PARTS_DIR).glob("*-of-*"):
        match = _PART_DIR.match(path.name)
        if match and path.is_dir():
            found[(int(match[1]), int(match[2]))] = path
    counts = sorted({n for _, n in found})
    if not counts:
        raise DataError(f"{out / PARTS_DIR}: no parts to merge; run `mor-data prepare … --out {out} --part K/N` "
                        f"for K = 0..N-1 first")
    if len(counts) > 1:
        raise DataError(f"{out / PARTS_DIR}: parts of different part counts {counts}; keep one set")
    count = counts[0]
    parts = []
    for k in range(count):
        path = found.get((k, count))
        if path is None or not (path / INDEX_FILE).exists():
            raise DataError(f"{part_dir(out, (k, count))}: part {k} of {count} is not finished (no {INDEX_FILE}); "
                            f"run (or re-run: it resumes) its `mor-data prepare … --part {k}/{count}`")
        parts.append((path, ShardIndex.load(path)))
    first = {k: v for k, v in parts[0][1].source["settings"].items() if k != "part"}
    for path, index in parts[1:]:
        mine = {k: v for k, v in index.source["settings"].items() if k != "part"}
        for key, value in first.items():
            if mine.get(key) != value:
                raise DataError(f"{path}: made with {key}={mine.get(key)!r}, part 0 with {value!r}; prepare every "
                                f"part with the same settings")
        if index.source.get("files") != parts[0][1].source.get("files"):
            raise DataError(f"{path}: the source's files differ from those part 0 read (rewritten, added or removed "
                            f"between the tasks); prepare every part again from the same files")
    return parts


def _merged_totals(indexes: list[ShardIndex]) -> dict:
    """The totals one host would have counted: sums, and the first MAX_REPORTED bad records in source order."""
    totals: dict = {"docs": 0, "tokens": 0, "text_bytes": 0, "bad_records": {}, "bad_examples": [], "filtered": {}}
    for index in indexes:
        for key in ("docs", "tokens", "text_bytes"):
            totals[key] += index.totals[key]
        for key in ("bad_records", "filtered"):
            for kind, n in index.totals[key].items():
                totals[key][kind] = totals[key].get(kind, 0) + n
        totals["bad_examples"] += index.totals["bad_examples"]
    totals["bad_examples"] = totals["bad_examples"][:MAX_REPORTED]
    return totals


def merge_parts(out_dir: str, *, keep_parts: bool = False, command: str = "") -> ShardIndex:
    """Pack the finished parts of ``out_dir/parts/`` (``prepare(..., part=(k, n))``) into ``out_dir`` as one host's
    prepare of the whole source would have: the same tokens in the same shards, byte for byte. Every new shard is
    verified against its index entry before ``index.json`` is written; then the parts are removed (unless
    ``keep_parts``). Returns the existing index when the merge already ran; an interrupted merge starts over."""
    out = Path(os.path.expanduser(out_dir))
    if not out.is_dir():
        raise DataError(f"{out}: no such directory")
    try:
        with FileLock(str(out / ".prepare.lock"), timeout=0):
            if (out / INDEX_FILE).exists():
                return ShardIndex.load(out)
            return _merge(out, keep_parts, command)
    except Timeout:
        raise DataError(f"{out}: another `mor-data prepare` or `merge` is writing here") from None


def _merge(out: Path, keep_parts: bool, command: str) -> ShardIndex:
    parts = _finished_parts(out)
    first = parts[0][1]
    dtype, shard_tokens = first.token_dtype, first.shard_tokens
    for stale in [*out.glob("shard_*.zst"), *out.glob(".*.tmp-*")]:  # what an interrupted merge wrote
        stale.unlink()
    packer = _Packer(np.zeros(0, np.uint32), np.zeros(0, np.int64))
    shards: list[ShardInfo] = []

    def write(count: int) -> None:
        tokens, ends = packer.cut(count)
        shards.append(write_shard(out, len(shards), tokens.astype(dtype), len(ends), first.frame_tokens))

    for path, index in parts:
        for info in index.shards:  # read_shard checks each part shard's SHA-256
            packer.add(read_shard(path, info, dtype).astype(np.uint32), _read_ends(path, info))
            while packer.size >= shard_tokens:
                write(shard_tokens)
    if packer.size:
        write(packer.size)
    if not shards:
        raise DataError(f"{out}: no documents in any of the {len(parts)} parts (every record was bad, filtered or "
                        f"empty)")
    for info in shards:
        problems = verify_shard(out, info, dtype, first.vocab_size)
        if problems:
            raise DataError(f"merged shard does not verify: {problems[0]}")
    settings = {k: v for k, v in first.source["settings"].items() if k != "part"}
    for name in (first.tokenizer["file"], "tokenizer_config.json"):  # as _copy_tokenizer left them in part 0
        if (parts[0][0] / name).exists():
            atomic_write_bytes(out / name, (parts[0][0] / name).read_bytes())
    index = ShardIndex(
        dtype=first.dtype, vocab_size=first.vocab_size, eos_id=first.eos_id, tokenizer=first.tokenizer,
        source={**parse_source(settings["source"]).describe(), **({"files": first.source["files"]} if
                                                                  "files" in first.source else {}),
                "settings": settings, "parts": len(parts)},
        command=command, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=library_versions(), shard_tokens=shard_tokens, frame_tokens=first.frame_tokens, shards=shards,
        totals=_merged_totals([index for _, index in parts]))
    index.save(out)
    if not keep_parts:
        shutil.rmtree(out / PARTS_DIR)
    return index
