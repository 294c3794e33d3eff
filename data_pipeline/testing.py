"""Small FineWeb-schema corpora on disk, built from the embedded corpus, for tests and offline demos."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import zstandard

from data_pipeline.embedded import embedded_documents


def fineweb_records(documents: list[str], first_id: int = 0) -> list[dict]:
    """Records with FineWeb's columns (``text``, ``id``, ``dump``, ``url``, ``date``, ``language``, ...)."""
    return [{"text": text, "id": f"<urn:uuid:{first_id + i:08d}>", "dump": "CC-MAIN-2024-10",
             "url": f"https://example.org/doc/{first_id + i}", "date": "2024-02-21T00:00:00Z",
             "file_path": "s3://commoncrawl/fake.warc.gz", "language": "en", "language_score": 0.97,
             "token_count": len(text.split())} for i, text in enumerate(documents)]


def encode_jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def write_records(path: str | os.PathLike, records: list[dict]) -> str:
    """Write records as ``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz`` or ``.parquet`` (by the path's suffix)."""
    path = str(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=64)
        return path
    data = encode_jsonl(records)
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.endswith(".gz"):
        data = gzip.compress(data)
    Path(path).write_bytes(data)
    return path


def embedded_sample(count: int, max_chars: int = 0) -> list[str]:
    """The first ``count`` documents (scenes) of the embedded corpus, optionally cut to ``max_chars``."""
    docs = list(itertools.islice(embedded_documents(), count))
    return [d[:max_chars] for d in docs] if max_chars else docs
