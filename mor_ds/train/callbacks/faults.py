"""NaN/Inf steps: DeepSpeed skips the update when the gradients are not finite; count, and abort after
train.max_bad_steps in a row (the checkpoint callback then saves the weights of the last applied update). A budget
that ends inside such a streak is not a success: exit EXIT_NONFINITE too."""

from __future__ import annotations

from mor_ds.train.callbacks.base import Callback
from mor_ds.train.faults import EXIT_NONFINITE


class NonFiniteGuard(Callback):
    def on_step_end(self, trainer, result) -> None:
        state = trainer.state
        if result.applied:
            state.bad_steps_in_a_row = 0
            return
        state.skipped_steps += 1
        state.bad_steps_in_a_row += 1
        if trainer.is_main:
            print(f"[mor-ds] step {state.step}: non-finite loss or gradients, update skipped "
                  f"({state.bad_steps_in_a_row} in a row, {state.skipped_steps} in total)", flush=True)
        limit = trainer.cfg.train.max_bad_steps
        last_applied = state.step - state.bad_steps_in_a_row
        weights = (f"the checkpoint of step {state.step} holds the weights of step {last_applied}, the last applied "
                   f"update, and the earlier checkpoints are kept")
        if state.bad_steps_in_a_row >= limit:
            trainer.request_stop(
                EXIT_NONFINITE,
                f"aborting at step {state.step}: {state.bad_steps_in_a_row} steps in a row had NaN/Inf loss or "
                f"gradients (train.max_bad_steps={limit}); {weights} — lower optim.lr, check the data, or raise "
                f"train.max_bad_steps, then --resume auto")
        elif trainer.finished:
            trainer.request_stop(
                EXIT_NONFINITE,
                f"the budget ended at step {state.step} in {state.bad_steps_in_a_row} NaN/Inf steps in a row: the run "
                f"did not finish healthy; {weights} — check the data and the weights before using them")
