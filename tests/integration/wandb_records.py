"""Read a wandb offline run back from its `.wandb` transaction log, decoded with wandb's own protobufs.

The file is wandb's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then records split
into chunks that never cross a 32 KiB block; each chunk has a 7-byte header (CRC, length, type: 1 full,
2 first, 3 middle, 4 last). wandb 0.31 ships no Python reader for it (its reader lives in wandb-core).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    pos, pending, payloads = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left - HEADER
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history(path: str | Path) -> list[dict[str, Any]]:
    """Logged rows ({key: value}, with `_step`) in order."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_info(path: str | Path) -> dict[str, Any]:
    """Run id, project, the rewind point (`branch_point`: (run id, step) of a `resume_from`, else None) and the
    logged config (top-level keys → values)."""
    info: dict[str, Any] = {"config": {}, "branch_point": None}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["id"], info["project"] = record.run.run_id, record.run.project
            point = record.run.branch_point
            info["branch_point"] = (point.run, point.value) if point.run else None
            for item in record.run.config.update:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return info
