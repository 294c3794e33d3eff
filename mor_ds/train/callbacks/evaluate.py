"""Validation loss / perplexity every train.eval_interval steps and at the end, on held-out shards.

A validation shard that cannot be read (damaged since start-up) stops the run with a checkpoint and a one-line
error, on every rank at once: an eval at the end of the budget must not cost the final checkpoint.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from mor_ds import distributed
from mor_ds.train.callbacks.base import Callback
from mor_ds.train.faults import EXIT_CONFIG


class ValidationDataError(RuntimeError):
    """The validation batches could not be read on some rank (the message names the file)."""


@torch.no_grad()
def evaluate(engine, batches: Iterable[Tensor], max_batches: int, device: torch.device,
             eos_id: int | None = None, routing: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Mean LM loss over the first `max_batches` windows of every rank (same count on all ranks: ZeRO-3's
    forward is collective), averaged over ranks. Routing: the model's eval default (causal) unless given; for MoR
    also the fraction of held-out tokens that reach each recursion step under it (`val/depth_frac/r`), which training's
    top-k routing fixes to the capacity schedule but causal routing has to learn. Collective also when a rank
    cannot read its batches: every rank raises ValidationDataError. `progress(done, total)` is called after each
    batch."""
    from data_pipeline.errors import DataError
    from mor_ds.train.loop import split_batch

    try:
        local, error = list(itertools.islice(iter(batches), max_batches)), ""
    except DataError as exc:
        local, error = [], str(exc)
    shares = distributed.all_gather_object((len(local), error))
    errors = [err for _, err in shares if err]
    if errors:
        raise ValidationDataError(errors[0])
    n = min(count for count, _ in shares)
    if n == 0:
        return {}
    was_training = engine.training
    engine.eval()
    try:
        total = torch.zeros((), device=device, dtype=torch.float64)
        depth: dict[str, Tensor] = {}  # every step's fraction is reported, also when no token reaches it
        extra = {"routing": routing} if routing else {}
        for done, batch in enumerate(local[:n], 1):
            inputs, labels, doc_ids = split_batch(batch, device, eos_id)
            out = engine(inputs, labels=labels, doc_ids=doc_ids, **extra)
            total += out.loss.double()
            for name, value in out.stats.items():
                if name.startswith("depth_frac/"):
                    depth[name] = depth.get(name, 0.0) + value.double()
            if progress is not None:
                progress(done, n)
    finally:
        if was_training:
            engine.train()
    names = sorted(depth)
    means = distributed.all_reduce_mean(torch.stack([total, *(depth[k] for k in names)]) / n).tolist()
    loss = means[0]
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/batches": n,
            **{f"val/{name}": value for name, value in zip(names, means[1:])}}


class EvalCallback(Callback):
    def on_step_end(self, trainer, result) -> None:
        if trainer.make_val_batches is None or trainer.stopping:
            return
        step = trainer.state.step
        if step % trainer.cfg.train.eval_interval == 0 or trainer.finished:
            def batches() -> Iterator[Tensor]:  # opened inside evaluate(), so a bad index is caught there too
                yield from trainer.make_val_batches()

            try:
                trainer.record.update(evaluate(trainer.engine, batches(), trainer.cfg.train.eval_batches,
                                               trainer.device, trainer.eos_id))
            except ValidationDataError as exc:
                trainer.request_stop(EXIT_CONFIG, f"data error in the validation at step {step}: {exc}; stopped "
                                                  f"with a checkpoint")
