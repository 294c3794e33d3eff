"""Timing and environment records shared by the benchmarks."""

from __future__ import annotations

import datetime
import platform
import subprocess
from typing import Callable

import torch


def bench_ms(fn: Callable[[], object], *, grad_to_none: list[torch.Tensor] | None = None,
             warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of `fn` on the current CUDA device (events; L2 flushed before each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def environment() -> dict[str, str]:
    """Device, clocks and library versions, for the record next to every table."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
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
