"""Timing and environment records shared by the benchmarks."""

from __future__ import annotations

import datetime
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Callable

import torch


def bench_ms(fn: Callable[[], object], *, grad_to_none: list[torch.Tensor] | None = None,
             warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of `fn` on the current CUDA device (events; L2 flushed before each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def bench_graph_ms(fn: Callable[[], object], *, replays: int = 20, trials: int = 5) -> float:
    """Median milliseconds per replay of `fn` captured in a CUDA graph: device time without the host's launch
    overhead (inputs stay as they are; no L2 flush between replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles, allocator settles) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return sorted(times)[len(times) // 2]


def source_fingerprint(package_dir: Path | None = None) -> str:
    """sha256 (first 12 hex digits) over every .py file of the mor_ds package, by relative path and content. It
    names the code a benchmark ran even where the checkout's git metadata is stale (a device that receives a copy
    of the working tree): recompute it at a commit to match a record to it."""
    root = package_dir or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def environment() -> dict[str, str]:
    """Device, clocks, library versions and the code's fingerprint, for the record next to every table."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mor_ds_source": source_fingerprint(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout.strip()
            info["nvidia-smi (" + query + ")"] = out.splitlines()[0]
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia-smi"] = f"unavailable ({exc.__class__.__name__})"
    return info
