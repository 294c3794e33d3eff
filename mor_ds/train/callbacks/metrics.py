"""Training metrics on logging steps: a concise console line and DIR/metrics.jsonl (one object per logged step);
with a data mixture also each source's tokens and epochs so far (`data/<name>/tokens`, `data/<name>/epochs`).

Loss, aux losses and model stats are averaged over data-parallel ranks (one all-reduce of a stacked vector);
only rank 0 prints and writes. After a resume, lines of steps past the checkpoint (written by the interrupted
run) are dropped, so metrics.jsonl is always the history of the run that produced the current weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

import torch

from mor_ds import distributed
from mor_ds.train.callbacks.base import Callback

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (an interrupted run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def console_line(rec: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {rec['step']}/{total_steps}", f"loss {_fmt(rec['loss'])}"]
    aux = sum(v for k, v in rec.items() if k.startswith("aux/"))
    if any(k.startswith("aux/") for k in rec):
        parts.append(f"aux {_fmt(aux)}")
    if "val/loss" in rec:
        parts.append(f"val {_fmt(rec['val/loss'])} (ppl {_fmt(rec['val/ppl'])})")
    parts.append(f"lr {rec['lr']:.3g}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {_fmt(rec['grad_norm'])}")
    if "perf/tokens_per_s" in rec:
        parts.append(f"{rec['perf/tokens_per_s'] / 1e3:.1f}k tok/s")
        parts.append(f"{rec['perf/tflops_per_gpu']:.3g} TFLOP/s")
    if "perf/mfu" in rec:
        parts.append(f"MFU {100 * rec['perf/mfu']:.1f}%")
    if "perf/peak_mem_gib" in rec:
        parts.append(f"mem {rec['perf/peak_mem_gib']:.1f} GiB")
    if "perf/data_wait_frac" in rec:
        parts.append(f"data {100 * rec['perf/data_wait_frac']:.1f}%")
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']}")
    return " | ".join(parts)


class MetricsLogger(Callback):
    def __init__(self, console: bool = True) -> None:
        self.console = console
        self._file: TextIO | None = None

    def on_train_start(self, trainer) -> None:
        if trainer.is_main:
            path = Path(trainer.run_dir) / METRICS_FILE
            truncate_metrics(path, trainer.state.step)
            self._file = open(path, "a")

    def on_step_end(self, trainer, result) -> None:
        if not (trainer.is_log_step() or trainer.record):
            return
        names = [f"aux/{k}" for k in sorted(result.aux_losses)] + sorted(result.stats)
        values = [result.loss] + [result.aux_losses[k] for k in sorted(result.aux_losses)]
        values += [result.stats[k] for k in sorted(result.stats)]
        reduced = distributed.all_reduce_mean(torch.stack([v.float().reshape(()) for v in values])).tolist()
        state = trainer.state
        grad_norm = trainer.engine.grad_norm()
        rec: dict[str, Any] = {"step": state.step, "loss": reduced[0], "lr": result.lr, "tokens": state.tokens,
                               "flops": state.flops, "grad_norm": grad_norm, "skipped_steps": state.skipped_steps,
                               "elapsed_s": state.elapsed_s}
        rec.update(zip(names, reduced[1:]))
        loader = trainer.train_loader
        if hasattr(loader, "source_windows"):  # a data mixture: what each source has given so far (all ranks)
            for name, windows in loader.source_windows().items():
                rec[f"data/{name}/tokens"] = windows * trainer.cfg.train.seq_len
            rec.update({f"data/{name}/epochs": epochs for name, epochs in loader.source_epochs().items()})
        rec.update(trainer.record)
        trainer.record = rec
        if not trainer.is_main:
            return
        if self.console:
            print(console_line(rec, trainer.total_steps), flush=True)
        assert self._file is not None
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def on_train_end(self, trainer) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
