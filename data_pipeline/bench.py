"""``mor-data bench``: tokenization MB/s (SentencePiece alone vs. our pipeline, scaling with workers) and loader
tokens/s from prepared shards on one core."""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time
from datetime import datetime, timezone

import numpy as np

from data_pipeline.loader import GlobalOrderLoader, ShardLoader
from data_pipeline.mixture import MixtureLoader, Source
from data_pipeline.prepare import library_versions
from data_pipeline.shards import DEFAULT_FRAME_TOKENS, ShardIndex, read_shard, write_shard
from data_pipeline.sources import DocumentStream
from data_pipeline.testing import fineweb_records, write_records
from data_pipeline.tokenize_pool import TokenizePool, document_tasks, encode_documents
from data_pipeline.tokenizer import load_tokenizer


def _sample_documents(source: str, text_field: str, sample_bytes: int) -> list[str]:
    docs, size = [], 0
    for text in DocumentStream(source, text_field=text_field):
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= sample_bytes:
            break
    return docs


def _best_seconds(run, repeats: int, clock=time.perf_counter) -> float:
    """Fastest of ``repeats`` timed calls (the least disturbed by other load on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def bench_tokenization(source: str, tokenizer_path: str, worker_counts: list[int], *, text_field: str = "text",
                       sample_bytes: int = 8_000_000, repeats: int = 3) -> dict:
    """Tokenization throughput, best of ``repeats``.

    Single-threaded stages are timed in CPU seconds of this process (``time.process_time``), so other load on the
    machine does not skew their comparison: reading the sample back as FineWeb-schema ``.jsonl.zst`` through
    ``datasets`` streaming (what feeds the workers), the tokenizer library alone, and our encode + EOS packing.
    The worker pool is timed in wall-clock seconds: what a ``prepare`` with N workers gets on this machine now.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    docs = _sample_documents(source, text_field, sample_bytes)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tasks = list(document_tasks(docs))
    tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(docs))
    tokenizer.set_threads(1)
    cpu = time.process_time
    library = _best_seconds(lambda: [tokenizer.encode_batch(texts) for _, texts in tasks], repeats, cpu)
    inline = _best_seconds(lambda: [encode_documents(tokenizer, texts) for _, texts in tasks], repeats, cpu)
    with tempfile.TemporaryDirectory(prefix="mor-data-bench-") as tmp:
        path = write_records(os.path.join(tmp, "sample.jsonl.zst"), fineweb_records(docs))
        reading = _best_seconds(lambda: sum(1 for _ in DocumentStream(path, text_field="text")), repeats, cpu)
    rows = []
    for workers in worker_counts:
        with TokenizePool(tokenizer, workers) as pool:
            list(pool.encode([(None, ["warm up"])] * workers))  # start the processes before timing
            seconds = _best_seconds(lambda: sum(1 for _ in pool.encode(tasks)), repeats)
        rows.append({"workers": workers, "mb_per_s": megabytes / seconds,
                     "mb_per_s_per_worker": megabytes / seconds / max(workers, 1), "tokens_per_s": tokens / seconds})
    for row in rows:
        row["scaling"] = row["mb_per_s"] / rows[0]["mb_per_s"]
    return {"sample_mb": megabytes, "tokens": tokens, "repeats": repeats,
            "read_jsonl_zst_mb_per_cpu_s": megabytes / reading, "library_mb_per_cpu_s": megabytes / library,
            "pipeline_mb_per_cpu_s": megabytes / inline, "workers": rows}


def synthetic_shards(directory: str, reference_dir: str, shards: int, shard_tokens: int) -> str:
    """A shard set of production-sized shards whose ids follow the unigram distribution of ``reference_dir``."""
    reference = ShardIndex.load(reference_dir)
    counts = np.zeros(reference.vocab_size, dtype=np.float64)
    for info in reference.shards:
        counts += np.bincount(read_shard(reference_dir, info, reference.token_dtype), minlength=reference.vocab_size)
    rng = np.random.default_rng(0)
    infos = []
    for number in range(shards):
        ids = rng.choice(reference.vocab_size, size=shard_tokens, p=counts / counts.sum()).astype(reference.dtype)
        infos.append(write_shard(directory, number, ids, docs=0, frame_tokens=DEFAULT_FRAME_TOKENS))
    ShardIndex(**{**reference.__dict__, "shards": infos, "shard_tokens": shard_tokens,
                  "command": "mor-data bench (synthetic unigram shards)"}).save(directory)
    return directory


def bench_loader(loader: GlobalOrderLoader, description: str, *, seconds: float = 5.0) -> dict:
    """Tokens/s a :class:`ShardLoader` or :class:`MixtureLoader` hands out on this thread (torch limited to one
    thread), after a warm-up."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = iter(loader)
        next(batches)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in itertools.islice(batches, 50):
                count += 1
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    parts = getattr(loader, "loaders", [loader])  # a mixture's shard sets
    return {"loader": type(loader).__name__, "shard_dir": description, "shards": sum(len(p.shards) for p in parts),
            "shard_tokens": max(p.index.shard_tokens for p in parts), "seq_len": loader.seq_len,
            "batch_size": loader.batch_size, "prefetch": loader.prefetch,
            "tokens_per_s": count * loader.tokens_per_batch / elapsed, "batches": count}


def environment() -> dict:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": _cpu_model(), "cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "versions": library_versions()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run_bench(source: str, tokenizer_path: str, shard_dir: str, worker_counts: list[int], *, text_field: str,
              sample_bytes: int, repeats: int, seq_len: int, batch_size: int, seconds: float,
              synthetic_shard_tokens: int) -> dict:
    results = {"environment": environment(), "source": source, "tokenizer": tokenizer_path,
               "tokenization": bench_tokenization(source, tokenizer_path, worker_counts, text_field=text_field,
                                                  sample_bytes=sample_bytes, repeats=repeats),
               "loader": [bench_loader(ShardLoader(shard_dir, seq_len, batch_size, prefetch=p, val_shards=0), shard_dir,
                                       seconds=seconds) for p in (0, 2)]}
    if synthetic_shard_tokens:
        with tempfile.TemporaryDirectory(prefix="mor-data-bench-") as tmp:
            synthetic_shards(tmp, shard_dir, 2, synthetic_shard_tokens)
            synthetic = f"synthetic: 2 shards x {synthetic_shard_tokens:,} unigram-sampled tokens"
            results["loader"] += [bench_loader(ShardLoader(tmp, seq_len, batch_size, prefetch=p, val_shards=0),
                                               synthetic, seconds=seconds) for p in (0, 2)]
            # the two shard sets as a 70/30 data mixture: what interleaving costs over one ShardLoader
            mixture = [Source("shards", shard_dir, 0.7), Source("synthetic", tmp, 0.3)]
            results["loader"] += [bench_loader(MixtureLoader(mixture, seq_len, batch_size, prefetch=p, val_shards=0),
                                               " + ".join(f"{m.weight:g} x {m.name}" for m in mixture),
                                               seconds=seconds) for p in (0, 2)]
    return results

