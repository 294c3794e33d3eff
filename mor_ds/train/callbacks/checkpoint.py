"""Save every checkpoint.interval steps, at the end of the budget, and whenever the run is stopping
(signal, NaN abort), so every exit but a crash leaves a checkpoint to resume from."""

from __future__ import annotations

from mor_ds.train.callbacks.base import Callback
from mor_ds.train.checkpoint import CheckpointManager


class CheckpointCallback(Callback):
    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager

    def on_step_end(self, trainer, result) -> None:
        step = trainer.state.step
        if step % trainer.cfg.checkpoint.interval == 0 or trainer.finished or trainer.stopping:
            meta = {"tokens": trainer.state.tokens, "flops": trainer.state.flops,
                    "world_size": trainer.env.world_size, "config": trainer.cfg.to_dict()}
            ref = self.manager.save(trainer.engine, step, trainer.client_state(), meta)
            if trainer.is_main:
                print(f"[mor-ds] saved checkpoint {ref.path}", flush=True)
