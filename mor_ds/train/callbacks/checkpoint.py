"""Save every checkpoint.interval steps, at the end of the budget, and whenever the run is stopping
(signal, NaN abort), so every exit but a crash leaves a checkpoint to resume from.

Never a checkpoint of NaN/Inf weights: such a run stops with EXIT_NONFINITE and keeps the checkpoints it has. A
save during a streak of skipped NaN/Inf steps holds the weights of the last applied update (a skipped step changes
nothing) and prunes nothing, so the checkpoints from before the streak survive whatever caused it.
"""

from __future__ import annotations

from mor_ds.train.callbacks.base import Callback
from mor_ds.train.checkpoint_dir import CheckpointManager
from mor_ds.train.faults import EXIT_NONFINITE, TrainingAborted


class CheckpointCallback(Callback):
    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager

    def on_step_end(self, trainer, result) -> None:
        step = trainer.state.step
        if not (step % trainer.cfg.checkpoint.interval == 0 or trainer.finished or trainer.stopping):
            return
        if not trainer.engine.weights_finite():
            latest = self.manager.latest()
            kept = f"the newest checkpoint {latest.path} (step {latest.step}) is kept" if latest else "none was kept"
            raise TrainingAborted(f"step {step}: the model weights hold NaN/Inf; no checkpoint written ({kept}): "
                                  f"resume from it with a lower optim.lr or check the data", EXIT_NONFINITE)
        meta = {"tokens": trainer.state.tokens, "flops": trainer.state.flops,
                "world_size": trainer.env.world_size, "config": trainer.cfg.to_dict(),
                "provenance": trainer.provenance}
        ref = self.manager.save(trainer.engine, step, trainer.client_state(), meta,
                                prune=trainer.state.bad_steps_in_a_row == 0)
        if trainer.is_main:
            print(f"[mor-ds] saved checkpoint {ref.path}", flush=True)
