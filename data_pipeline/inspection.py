"""``mor-data inspect`` (statistics, token histogram, decoded samples) and ``mor-data verify`` (integrity)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from data_pipeline.errors import ShardError
from data_pipeline.loader import check_tokenizer
from data_pipeline.shards import INDEX_FILE, ShardIndex, read_shard, verify_shard
from data_pipeline.tokenizer import Tokenizer, load_tokenizer


def verify(directory: str, tokenizer_path: str | None = None) -> list[str]:
    """Every problem of a prepared directory, one line each naming the file (and byte offset); empty = sound."""
    index = ShardIndex.load(directory)
    problems = []
    if tokenizer_path:
        try:
            check_tokenizer(directory, index, load_tokenizer(tokenizer_path))
        except ShardError as e:
            problems.append(str(e))
    for info in index.shards:
        problems.extend(verify_shard(directory, info, index.token_dtype, index.vocab_size))
    indexed = {s.file for s in index.shards}
    for path in sorted(Path(directory).glob("shard_*.zst")):
        if path.name not in indexed:
            problems.append(f"{path}: shard file not in the index")
    return problems


def index_tokenizer(directory: str, index: ShardIndex, override: str | None) -> Tokenizer | None:
    """The tokenizer to decode with: ``override``, else the copy inside the directory, else the original path."""
    for path in (override, os.path.join(directory, index.tokenizer.get("file", "")), index.tokenizer.get("path")):
        if path and os.path.isfile(path):
            return load_tokenizer(path)
    return None


def _printable(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("\t", "\\t")


def inspect(directory: str, *, tokenizer_path: str | None = None, samples: int = 3, sample_tokens: int = 96,
            top: int = 20, max_tokens: int = 50_000_000, seed: int = 0, console: Console | None = None) -> dict:
    """Print statistics, a token histogram and decoded samples of a prepared directory; returns the statistics."""
    console = console or Console()
    index = ShardIndex.load(directory)
    tokenizer = index_tokenizer(directory, index, tokenizer_path)
    tokens = sum(s.tokens for s in index.shards)
    docs = sum(s.docs for s in index.shards)
    disk = sum(s.bytes for s in index.shards)
    stats = {"shards": len(index.shards), "tokens": tokens, "docs": docs, "tokens_per_doc": tokens / max(docs, 1),
             "bytes": disk, "bytes_per_token": disk / max(tokens, 1),
             "text_bytes_per_token": index.totals.get("text_bytes", 0) / max(tokens, 1)}

    summary = Table(title=f"{directory}", show_header=False)
    for key, value in [
        ("shards", f"{len(index.shards)} (up to {index.shard_tokens:,} tokens each)"),
        ("tokens", f"{tokens:,}"), ("documents", f"{docs:,} ({stats['tokens_per_doc']:.1f} tokens/doc)"),
        ("on disk", f"{disk / 1e6:.1f} MB, {stats['bytes_per_token']:.2f} bytes/token ({index.dtype})"),
        ("text", f"{index.totals.get('text_bytes', 0) / 1e6:.1f} MB, {stats['text_bytes_per_token']:.2f} bytes/token"),
        ("tokenizer", f"{index.tokenizer.get('kind')} vocab {index.vocab_size}, eos {index.eos_id}, "
                      f"sha256 {index.tokenizer_hash[:16]}..."),
        ("source", str(index.source.get("spec"))), ("created", index.created), ("command", index.command),
        ("bad records", str(index.totals.get("bad_records") or "none")),
        ("filtered", str(index.totals.get("filtered") or "none")),
    ]:
        summary.add_row(key, value)
    console.print(summary)
    for example in index.totals.get("bad_examples", [])[:5]:
        console.print(f"  bad: {example}", markup=False)

    counts = np.zeros(max(index.vocab_size, 1), dtype=np.int64)
    seen, loaded = 0, []
    for info in index.shards:
        if seen >= max_tokens:
            break
        ids = read_shard(directory, info, index.token_dtype)
        counts += np.bincount(ids, minlength=len(counts))[:len(counts)]
        seen += len(ids)
        loaded.append(ids)
    stats["histogram_tokens"] = seen
    stats["distinct_ids"] = int(np.count_nonzero(counts))
    histogram = Table(title=f"most frequent of {seen:,} tokens ({stats['distinct_ids']:,} of {index.vocab_size:,} "
                            f"ids used)")
    for column in ("id", "piece", "count", "share"):
        histogram.add_column(column, justify="left" if column == "piece" else "right")
    for token_id in np.argsort(counts)[::-1][:top]:
        piece = _printable(tokenizer.id_to_piece(int(token_id))) if tokenizer else "?"
        histogram.add_row(str(token_id), piece, f"{counts[token_id]:,}", f"{counts[token_id] / max(seen, 1):.2%}")
    console.print(histogram)

    rng = np.random.default_rng(seed)
    for number in range(samples if tokenizer and loaded else 0):
        ids = loaded[int(rng.integers(len(loaded)))]
        start = int(rng.integers(max(len(ids) - sample_tokens, 1)))
        console.rule(f"sample {number + 1}: tokens {start}..{start + sample_tokens}")
        console.print(tokenizer.decode(ids[start:start + sample_tokens].tolist()), markup=False, highlight=False)
    if tokenizer is None:
        console.print("no tokenizer found for decoding (pass --tokenizer)")
    return stats


def verify_command(directory: str, tokenizer_path: str | None, console: Console) -> int:
    """Exit 1 when the index, the shards or the tokenizer do not check out (damage found); a directory without an
    index is not a prepared set: the ShardError reaches `mor-data`, which reports it as for every command (exit 2)."""
    if not (Path(os.path.expanduser(directory)) / INDEX_FILE).exists():
        ShardIndex.load(directory)  # raises the one-line "no shard index" error
    try:
        problems = verify(directory, tokenizer_path)
    except ShardError as e:  # an index that is there but not valid (edited, damaged)
        problems = [str(e)]
    for problem in problems:
        console.print(f"FAILED {problem}", markup=False)
    if problems:
        return 1
    index = ShardIndex.load(directory)
    console.print(f"OK {directory}: {len(index.shards)} shards, {sum(s.tokens for s in index.shards):,} tokens, "
                  f"checksums match", markup=False)
    return 0
