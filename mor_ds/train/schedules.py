"""Learning-rate schedules as pure functions of the optimizer step (no state to checkpoint).

`step` is the 0-based index of the optimizer step about to run, `total` the number of steps in the run.
  warmup   linear from peak/W to the peak over the first W = ceil(warmup_fraction · total) steps
  wsd      warmup-stable-decay ("trapezoid", the paper's recipe): peak until the last
           D = ceil(decay_fraction · total) steps, then linear down to min_lr (reached at the last step)
  cosine   after warmup, half a cosine from the peak down to min_lr at the last step
  constant after warmup, the peak
with min_lr = min_lr_ratio · peak.
"""

from __future__ import annotations

import math

from mor_ds.config import OptimConfig


def warmup_steps(total: int, cfg: OptimConfig) -> int:
    return min(total, math.ceil(cfg.warmup_fraction * total))


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    if total < 1:
        raise ValueError(f"total steps must be >= 1, got {total}")
    step = min(max(step, 0), total - 1)
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = warmup_steps(total, cfg)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay = math.ceil(cfg.decay_fraction * total)
        decay_start = total - decay
        if decay == 0 or step < decay_start:
            return peak
        progress = (step - decay_start + 1) / decay  # (0, 1]; 1 at the last step
        return peak + (floor - peak) * progress
    if cfg.schedule == "cosine":
        span = total - warm
        progress = (step - warm + 1) / span if span > 0 else 1.0
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"optim.schedule={cfg.schedule!r}: unknown schedule")
