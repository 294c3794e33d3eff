"""Validation loss / perplexity every train.eval_interval steps and at the end, on held-out shards."""

from __future__ import annotations

import itertools
import math
from typing import Iterable

import torch
from torch import Tensor

from mor_ds import distributed
from mor_ds.train.callbacks.base import Callback


@torch.no_grad()
def evaluate(engine, batches: Iterable[Tensor], max_batches: int, device: torch.device,
             eos_id: int | None = None) -> dict[str, float]:
    """Mean LM loss over the first `max_batches` windows of every rank (same count on all ranks: ZeRO-3's
    forward is collective), averaged over ranks. Routing is the model's eval default (causal)."""
    from mor_ds.train.loop import split_batch

    local = list(itertools.islice(iter(batches), max_batches))
    count = distributed.all_reduce_min(torch.tensor([len(local)], device=device))
    n = int(count.item())
    if n == 0:
        return {}
    was_training = engine.training
    engine.eval()
    try:
        total = torch.zeros((), device=device, dtype=torch.float64)
        for batch in local[:n]:
            inputs, labels, doc_ids = split_batch(batch, device, eos_id)
            total += engine(inputs, labels=labels, doc_ids=doc_ids).loss.double()
    finally:
        if was_training:
            engine.train()
    loss = float(distributed.all_reduce_mean(total / n).item())
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/batches": n}


class EvalCallback(Callback):
    def on_step_end(self, trainer, result) -> None:
        if trainer.make_val_batches is None or trainer.stopping:
            return
        step = trainer.state.step
        if step % trainer.cfg.train.eval_interval == 0 or trainer.finished:
            trainer.record.update(evaluate(trainer.engine, trainer.make_val_batches(),
                                           trainer.cfg.train.eval_batches, trainer.device, trainer.eos_id))
