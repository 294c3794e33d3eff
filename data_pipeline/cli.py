"""``mor-data``: collect, train-tokenizer, prepare, merge, inspect, verify, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console

from data_pipeline.errors import DataError
from data_pipeline.shards import DEFAULT_FRAME_TOKENS, DEFAULT_SHARD_TOKENS
from data_pipeline.sources import SOURCE_HELP

DEFAULT_CACHE_DIR = "~/.cache/mor-ds"


def _add_source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--source", required=required, default=None if required else "embedded",
                        help=f"{SOURCE_HELP}" + ("" if required else " (default: embedded)"))
    parser.add_argument("--text-field", default="text", help="record field holding the document text")
    parser.add_argument("--min-chars", type=int, default=0, help="skip documents shorter than this")
    parser.add_argument("--max-chars", type=int, default=0, help="skip documents longer than this (0 = no limit)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")


def _stream(args):
    from data_pipeline.sources import DocumentStream

    return DocumentStream(args.source, text_field=args.text_field, min_chars=args.min_chars,
                          max_chars=args.max_chars, strict=args.strict)


def cmd_train_tokenizer(args, console: Console) -> int:
    from data_pipeline.tokenizer import load_tokenizer, train_sentencepiece

    stream = _stream(args)
    used: dict = {}
    path = train_sentencepiece(stream, args.out, args.vocab_size, model_type=args.model_type,
                               byte_fallback=not args.no_byte_fallback, sample_bytes=int(args.sample_mb * 1e6),
                               threads=args.threads, character_coverage=args.character_coverage, used=used)
    tokenizer = load_tokenizer(path)
    bad = stream.bad.total
    capped = used["bytes"] >= args.sample_mb * 1e6
    console.print(f"wrote {path}: {args.model_type} vocab {tokenizer.vocab_size} (pad {tokenizer.pad_id}, "
                  f"bos {tokenizer.bos_id}, eos {tokenizer.eos_id}), sha256 {tokenizer.hash}; trained on "
                  f"{used['bytes'] / 1e6:,.1f} MB of text ({used['documents']:,} documents, {used['lines']:,} lines"
                  + (f", the first --sample-mb {args.sample_mb:g} of the source" if capped else ", the whole source")
                  + ")" + (f"; skipped {bad} bad records" if bad else ""), markup=False)
    return 0


def _part(text: str) -> tuple[int, int]:
    """``--part K/N``: task K (from 0) of N."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit()) or not 0 <= int(k) < int(n):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N, e.g. 3/16")
    return int(k), int(n)


def _summary(where: str, index, console: Console) -> None:
    bad = index.totals.get("bad_records", {})
    console.print(f"{where}: {len(index.shards)} shards, {index.totals['tokens']:,} tokens, "
                  f"{index.totals['docs']:,} documents; bad records skipped: {sum(bad.values())}"
                  + (f" {bad}" if bad else "") + f"; filtered: {index.totals.get('filtered') or 'none'}", markup=False)


def cmd_prepare(args, console: Console) -> int:
    from data_pipeline.prepare import part_dir, prepare

    index = prepare(args.source, args.tokenizer, args.out, workers=args.workers, text_field=args.text_field,
                    min_chars=args.min_chars, max_chars=args.max_chars, strict=args.strict,
                    shard_tokens=args.shard_tokens, frame_tokens=args.frame_tokens, max_shards=args.max_shards,
                    command=shlex.join(["mor-data", *sys.argv[1:]]), show_progress=not args.no_progress,
                    progress_interval=args.progress_interval, part=args.part)
    if index is None:
        console.print(f"stopped after {args.max_shards} new shards in {args.out}; run the same command again to "
                      f"continue", markup=False)
        return 0
    if args.part is None or "parts" in index.source:
        _summary(args.out, index, console)
    else:
        k, n = args.part
        _summary(f"{part_dir(Path(args.out), args.part)} (part {k} of {n})", index, console)
        console.print(f"once all {n} parts are done: mor-data merge {args.out}", markup=False)
    return 0


def cmd_merge(args, console: Console) -> int:
    from data_pipeline.prepare import merge_parts

    index = merge_parts(args.out, keep_parts=args.keep_parts, command=shlex.join(["mor-data", *sys.argv[1:]]))
    _summary(f"{args.out} (merged from {index.source.get('parts', '?')} parts, verified)", index, console)
    return 0


def cmd_collect(args, console: Console) -> int:
    from data_pipeline.collect import collect

    stats = collect(args.roots, args.out, extensions=tuple(e for e in args.ext.split(",") if e),
                    max_file_bytes=int(args.max_file_mb * 1e6), max_total_bytes=int(args.max_mb * 1e6),
                    exclude=tuple(args.exclude))
    parts = ", ".join(f"{ext} {c['files']:,} ({c['bytes'] / 1e6:.1f} MB)" for ext, c in stats.by_extension.items())
    skipped = ", ".join(f"{k} {v:,}" for k, v in stats.skipped.items()) or "none"
    console.print(f"{args.out}: {stats.files:,} files, {stats.bytes / 1e6:.1f} MB of text ({parts}); duplicates "
                  f"dropped {stats.duplicates:,}; skipped: {skipped}; sha256 {stats.sha256}", markup=False)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats.to_dict(), f, indent=1)
    return 0


def cmd_inspect(args, console: Console) -> int:
    from data_pipeline.inspection import inspect

    inspect(args.dir, tokenizer_path=args.tokenizer, samples=args.samples, sample_tokens=args.sample_tokens,
            top=args.top, max_tokens=args.max_tokens, seed=args.seed, console=console)
    return 0


def cmd_verify(args, console: Console) -> int:
    from data_pipeline.inspection import verify_command

    return verify_command(args.dir, args.tokenizer, console)


def cmd_bench(args, console: Console) -> int:
    from data_pipeline.bench import run_bench
    from data_pipeline.embedded import ensure_embedded

    tokenizer, shard_dir = args.tokenizer, args.shards
    if not tokenizer or not shard_dir:
        embedded_dir, embedded_tokenizer = ensure_embedded(args.cache_dir, args.vocab_size)
        tokenizer, shard_dir = tokenizer or embedded_tokenizer, shard_dir or embedded_dir
    workers = [int(w) for w in args.workers.split(",")]
    results = run_bench(args.source, tokenizer, shard_dir, workers, text_field=args.text_field,
                        sample_bytes=int(args.sample_mb * 1e6), repeats=args.repeats, seq_len=args.seq_len,
                        batch_size=args.batch_size,
                        seconds=args.seconds, synthetic_shard_tokens=args.synthetic_shard_tokens)
    results["command"] = shlex.join(["mor-data", *sys.argv[1:]])
    _print_bench(results, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _print_bench(results: dict, console: Console) -> None:
    from rich.table import Table

    env, tok = results["environment"], results["tokenization"]
    console.print(f"{env['date']} | {env['processor']} | {env['cpus']} CPUs | load average "
                  f"{env['load_average_1min']:.1f} | {env['versions']}", markup=False)
    console.print(f"tokenization of {tok['sample_mb']:.1f} MB ({tok['tokens']:,} tokens) from {results['source']}, "
                  f"best of {tok['repeats']}, in MB per CPU-second of one thread: reading it as .jsonl.zst "
                  f"{tok['read_jsonl_zst_mb_per_cpu_s']:.1f}, tokenizer library alone "
                  f"{tok['library_mb_per_cpu_s']:.2f}, "
                  f"our encode+pack {tok['pipeline_mb_per_cpu_s']:.2f}", markup=False)
    table = Table(title="tokenization with N worker processes (wall clock)")
    for column in ("workers", "MB/s", "MB/s per worker", "tokens/s", "scaling"):
        table.add_column(column, justify="right")
    for row in tok["workers"]:
        table.add_row(str(row["workers"]), f"{row['mb_per_s']:.2f}", f"{row['mb_per_s_per_worker']:.2f}",
                      f"{row['tokens_per_s']:,.0f}", f"{row['scaling']:.2f}x")
    console.print(table)
    table = Table(title="ShardLoader and MixtureLoader on one core (torch 1 thread)")
    for column in ("loader", "shards", "seq_len x batch", "prefetch", "tokens/s"):
        table.add_column(column, justify="right")
    for row in results["loader"]:
        table.add_row(row["loader"], f"{row['shard_dir']} ({row['shards']} x <= {row['shard_tokens']:,})",
                      f"{row['seq_len']} x {row['batch_size']}", str(row["prefetch"]), f"{row['tokens_per_s']:,.0f}")
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-data", description="Streaming tokenization pipeline of mor-ds.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tokenizer", help="train a SentencePiece model on a sample of a source")
    _add_source_args(p)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unseen characters to <unk> instead of bytes")
    p.add_argument("--sample-mb", type=float, default=200.0, help="text to train on, from the start of the stream")
    p.add_argument("--threads", type=int, default=0, help="trainer threads (0 = all cores)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of the sample's characters that get pieces of their own (default 0.9995; 1.0 for "
                        "small alphabets, ~0.9995 for CJK); the rest are bytes (byte fallback) or <unk>")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare", help="tokenize a source into zstd token shards + index (resumable)")
    _add_source_args(p)
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or HF tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="tokenizer processes (0 = in this process)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS}; the last shard may be shorter)")
    p.add_argument("--frame-tokens", type=int, default=DEFAULT_FRAME_TOKENS,
                   help="tokens per zstd frame (the unit verify locates corruption in)")
    p.add_argument("--max-shards", type=int, default=0, help="stop after this many new shards (0 = run to the end)")
    p.add_argument("--part", type=_part, metavar="K/N",
                   help="prepare only the K-th (from 0) of N contiguous runs of the source's files into OUT/parts/ "
                        "(one task of a many-host prepare, e.g. a Slurm array); then `mor-data merge OUT`")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-interval", type=float, default=30.0,
                   help="seconds between progress lines when stderr is not a terminal (batch jobs; default 30)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("merge", help="pack the parts of a many-host prepare (--part K/N) into one verified shard set")
    p.add_argument("out", help="the --out of the parts' prepare: writes its shards and index.json there")
    p.add_argument("--keep-parts", action="store_true", help="keep OUT/parts/ after the merge (default: remove)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("collect", help="directory trees of text files (code, docs) -> one .jsonl[.zst] corpus, "
                                       "a document per file, in content-hash order")
    p.add_argument("roots", nargs="+", metavar="ROOT", help="directories to walk (symlinks and hidden dirs skipped)")
    p.add_argument("--out", required=True, help="output .jsonl, .jsonl.zst or .jsonl.gz")
    p.add_argument("--ext", default=".py,.pyi,.md,.rst,.txt", help="comma-separated file name endings to keep")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose absolute path matches this glob (repeatable)")
    p.add_argument("--max-file-mb", type=float, default=1.0, help="skip larger files (generated tables, dumps)")
    p.add_argument("--max-mb", type=float, default=0.0,
                   help="stop at this much text, files taken in hash order (a uniform sample); 0 = everything")
    p.add_argument("--stats", help="also write the counts as JSON here")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("inspect", help="statistics, token histogram and decoded samples of a shard directory")
    p.add_argument("dir")
    p.add_argument("--tokenizer", help="decode with this tokenizer (default: the copy in DIR)")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--top", type=int, default=20, help="most frequent tokens to list")
    p.add_argument("--max-tokens", type=int, default=50_000_000, help="tokens read for the histogram")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every shard against the index; non-zero exit names the corruption")
    p.add_argument("dir")
    p.add_argument("--tokenizer", help="also check that the shards were made with this tokenizer")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="tokenization MB/s and its scaling with workers; loader and mixture tokens/s")
    _add_source_args(p, required=False)
    p.add_argument("--tokenizer", help="default: the embedded corpus's SentencePiece model")
    p.add_argument("--shards", help="prepared shard directory for the loader (default: the embedded corpus)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocab of the embedded tokenizer")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (0 = in the calling process)")
    p.add_argument("--sample-mb", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3, help="tokenization timings keep the best of this many runs")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0, help="per loader measurement")
    p.add_argument("--synthetic-shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="also time 2 production-size shards of this many tokens (0 = skip)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_bench)
    return parser


def configure_logging() -> None:
    """Library warnings once each, as `mor-data: …` lines: huggingface_hub and datasets attach a handler of their
    own to their loggers, which also propagate to the root handler (every hub retry warning was printed twice)."""
    import datasets.utils.logging  # noqa: F401 — attaches the libraries' own handlers, removed below
    import huggingface_hub.utils.logging  # noqa: F401

    logging.basicConfig(level=logging.WARNING, format="mor-data: %(message)s")
    for name in ("huggingface_hub", "datasets"):
        logging.getLogger(name).handlers.clear()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    console = Console(soft_wrap=True)
    try:
        return args.func(args, console)
    except DataError as e:
        print(f"mor-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mor-data {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
