"""Prepared token shards: zstd files of packed token ids plus one ``index.json`` describing them.

Layout of a prepared directory::

    index.json          format, dtype, tokenizer (hash, ids), source provenance, command, shards, totals
    tokenizer.model     a copy of the tokenizer that made the shards (or tokenizer.json)
    shard_000000.zst    little-endian uint16 (vocab <= 65536) or uint32 token ids, documents separated by EOS

A shard is a sequence of independent zstd frames (each ``frame_tokens`` tokens, with zstd's content checksum); the
index keeps every frame's byte offset, length and CRC-32 plus the whole file's SHA-256 and token/document counts,
so ``verify`` can name the byte range of any corruption and the loader refuses a shard that is not the one indexed.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from data_pipeline.errors import ShardError
from data_pipeline.files import atomic_write_bytes, atomic_write_json

FORMAT = "mor-data-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MiB of uint16 per shard before compression
DEFAULT_FRAME_TOKENS = 1 << 18
ZSTD_LEVEL = 3


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian on disk)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(number: int) -> str:
    return f"shard_{number:06d}.zst"


@dataclass
class ShardInfo:
    """One shard as recorded in the index; ``frames`` are ``[byte offset, byte length, crc32]``."""

    file: str
    tokens: int
    docs: int
    bytes: int
    sha256: str
    frames: list[list[int]] = field(default_factory=list)


def write_shard(directory: str | os.PathLike, number: int, tokens: np.ndarray, docs: int,
                frame_tokens: int = DEFAULT_FRAME_TOKENS) -> ShardInfo:
    """Compress ``tokens`` frame by frame and write the shard atomically (temporary file, fsync, rename)."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    frames, chunks, offset = [], [], 0
    for start in range(0, len(tokens), frame_tokens):
        chunk = compressor.compress(tokens[start:start + frame_tokens].tobytes())
        frames.append([offset, len(chunk), zlib.crc32(chunk)])
        chunks.append(chunk)
        offset += len(chunk)
    data = b"".join(chunks)
    name = shard_name(number)
    atomic_write_bytes(Path(directory) / name, data)
    return ShardInfo(name, int(len(tokens)), int(docs), len(data), hashlib.sha256(data).hexdigest(), frames)


def decode_frames(data: bytes, info: ShardInfo, dtype: np.dtype, path: str) -> np.ndarray:
    """Token array of a shard's bytes (already checked against ``info``); zstd's checksums are checked too."""
    out = np.empty(info.tokens, dtype=dtype)
    dctx = zstandard.ZstdDecompressor()
    position = 0
    for offset, length, _ in info.frames:
        try:
            raw = dctx.decompress(data[offset:offset + length])
        except zstandard.ZstdError as e:
            raise ShardError(f"{path}: corrupt zstd frame at byte offset {offset} ({e})") from None
        count = len(raw) // dtype.itemsize
        if position + count > info.tokens:
            raise ShardError(f"{path}: more tokens than the {info.tokens} indexed")
        out[position:position + count] = np.frombuffer(raw, dtype=dtype)
        position += count
    if position != info.tokens:
        raise ShardError(f"{path}: {position} tokens, the index says {info.tokens}")
    return out


def read_shard(directory: str | os.PathLike, info: ShardInfo, dtype: np.dtype) -> np.ndarray:
    """The tokens of one shard, refusing a file whose size or SHA-256 differs from the index."""
    path = os.path.join(directory, info.file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(data) != info.bytes:
        raise ShardError(f"{path}: {len(data)} bytes, the index says {info.bytes} (truncated or replaced; "
                         f"run `mor-data verify {directory}`)")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise ShardError(f"{path}: SHA-256 differs from the index (corrupt or from another prepared set; "
                         f"run `mor-data verify {directory}`)")
    return decode_frames(data, info, dtype, path)


def shard_file_problem(directory: str | os.PathLike, info: ShardInfo, full: bool = True) -> str | None:
    """What is wrong with a shard file against the index, in one line, or None: its size (one stat) and, with
    ``full``, its SHA-256 (read in chunks). For checks of every shard before a run reads them."""
    path = os.path.join(directory, info.file)
    try:
        size = os.path.getsize(path)
        if size != info.bytes:
            return f"{path}: {size} bytes, the index says {info.bytes} (truncated or replaced)"
        if full:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            if digest.hexdigest() != info.sha256:
                return f"{path}: SHA-256 differs from the index (corrupt or from another prepared set)"
    except OSError as e:
        return f"{path}: cannot read shard ({e.strerror})"
    return None


def verify_shard(directory: str | os.PathLike, info: ShardInfo, dtype: np.dtype, vocab_size: int) -> list[str]:
    """Problems of one shard, each naming the file and the byte offset where it starts (empty when sound)."""
    path = os.path.join(directory, info.file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return [f"{path}: cannot read ({e.strerror})"]
    problems = []
    if len(data) != info.bytes:
        problems.append(f"{path}: {len(data)} bytes, the index says {info.bytes}: "
                        f"{'missing' if len(data) < info.bytes else 'extra'} data from byte offset "
                        f"{min(len(data), info.bytes)}")
    dctx = zstandard.ZstdDecompressor()
    tokens = 0
    for number, (offset, length, crc) in enumerate(info.frames):
        frame = data[offset:offset + length]
        if len(frame) < length:
            break  # already reported as missing data
        if zlib.crc32(frame) != crc:
            problems.append(f"{path}: corrupt bytes in frame {number}, byte offset {offset}..{offset + length - 1}")
            continue
        try:
            ids = np.frombuffer(dctx.decompress(frame), dtype=dtype)
        except zstandard.ZstdError as e:
            problems.append(f"{path}: frame {number} at byte offset {offset} does not decompress ({e})")
            continue
        tokens += len(ids)
        if len(ids) and int(ids.max()) >= vocab_size:
            problems.append(f"{path}: frame {number} at byte offset {offset} holds id {int(ids.max())} "
                            f">= vocab size {vocab_size}")
    if not problems and tokens != info.tokens:
        problems.append(f"{path}: {tokens} tokens, the index says {info.tokens}")
    if not problems and hashlib.sha256(data).hexdigest() != info.sha256:
        problems.append(f"{path}: SHA-256 differs from the index although every frame checks out")
    return problems


@dataclass
class ShardIndex:
    """The contents of ``index.json``."""

    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer: dict
    source: dict
    command: str
    created: str
    versions: dict
    shard_tokens: int
    frame_tokens: int
    shards: list[ShardInfo]
    totals: dict
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer["hash"]

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_json(Path(directory) / INDEX_FILE, asdict(self))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ShardIndex:
        """Read ``DIR/index.json``; a one-line :class:`ShardError` if it is missing or not a shard index."""
        path = Path(os.path.expanduser(str(directory))) / INDEX_FILE
        if not path.exists():
            hint = " (an unfinished prepare: re-run it to continue)" if (path.parent / "progress.json").exists() else ""
            raise ShardError(f"{path}: no shard index{hint}; make one with `mor-data prepare`")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}, "
                                 f"expected {FORMAT!r} version {FORMAT_VERSION}")
            vocab = raw["vocab_size"]
            if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
                raise ValueError(f"vocab_size {vocab!r} is not a positive integer")
            if raw["dtype"] != token_dtype(vocab).str:
                raise ValueError(f"dtype {raw['dtype']!r} does not fit vocab_size {vocab} (prepare writes "
                                 f"{token_dtype(vocab).str!r}: uint16 up to 65536 ids, uint32 above)")
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ShardError(f"{path}: not a valid shard index ({e})") from None
