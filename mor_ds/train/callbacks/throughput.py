"""Tokens/s, achieved TFLOP/s and MFU per GPU, data-wait fraction and peak memory, on logging steps.

Achieved FLOPs use the planner's exact convention (forward + backward of every matmul the model runs; for
token-choice MoR the measured depth fractions), so MFU is comparable across vanilla / recursive / MoR arms.
Time is the loop's step time only (eval, checkpoints and logging excluded).
Peak: train.peak_tflops, else the device's dense bf16/fp32 tensor-core peak from the table below.
"""

from __future__ import annotations

import resource

import torch

from mor_ds.flops import flops_per_token
from mor_ds.train.callbacks.base import Callback

# dense peak TFLOP/s per GPU (bf16, and tf32 for fp32 runs), from the vendors' data sheets (SXM parts)
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.5},
    "H100": {"bf16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
}


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


class Throughput(Callback):
    def __init__(self) -> None:
        self._time = 0.0
        self._tokens = 0
        self._wait = 0.0

    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg
        self.peak = cfg.train.peak_tflops or device_peak_tflops(trainer.device, cfg.train.precision)
        self.exact_flops_per_token = flops_per_token(cfg, "exact")
        self.token_choice = cfg.model.family == "mor" and cfg.router.type == "token_choice"
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

    def on_step_end(self, trainer, result) -> None:
        self._tokens += trainer.tokens_per_step
        self._wait += result.data_wait_s
        self._time += result.step_time_s
        if not trainer.is_log_step():
            return
        elapsed = max(self._time, 1e-9)
        per_token = self.exact_flops_per_token
        if self.token_choice:
            nr = trainer.cfg.model.num_recursions
            fractions = [result.stats.get(f"depth_frac/{r}") for r in range(nr)]
            if all(f is not None for f in fractions):
                per_token = flops_per_token(trainer.cfg, "exact", active_fractions=[float(f) for f in fractions])
        world = trainer.env.world_size
        tokens_per_s = self._tokens / elapsed
        tflops = per_token * tokens_per_s / world / 1e12
        rec = trainer.record
        rec["perf/tokens_per_s"] = tokens_per_s
        rec["perf/tflops_per_gpu"] = tflops
        if self.peak:
            rec["perf/mfu"] = tflops / self.peak
        rec["perf/data_wait_frac"] = self._wait / elapsed
        if trainer.device.type == "cuda":
            rec["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        else:
            rec["perf/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self._time, self._tokens, self._wait = 0.0, 0, 0.0
