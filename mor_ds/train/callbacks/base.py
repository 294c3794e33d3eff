"""The callback protocol: small components the loop calls around each optimizer step, in list order."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mor_ds.train.loop import StepResult, Trainer


class Callback:
    def on_train_start(self, trainer: Trainer) -> None:
        """After the engine is built and any checkpoint is loaded (trainer.state is the resumed state)."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """After optimizer step `trainer.state.step` (already counted); add metrics to `trainer.record`."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Always runs, also after an abort (trainer.exit_code says why)."""
