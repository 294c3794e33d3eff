"""RUN_DIR/loss_curve.png (rank 0): redrawn with every checkpoint and when the run stops, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from mor_ds.train.callbacks.base import Callback
from mor_ds.train.callbacks.metrics import METRICS_FILE
from mor_ds.train.plot import PLOT_FILE, plot_losses


class LossCurve(Callback):
    def __init__(self) -> None:
        self._drawn_at = -1

    def _draw(self, trainer) -> None:
        run_dir = Path(trainer.run_dir)
        if not trainer.is_main or self._drawn_at == trainer.state.step or not (run_dir / METRICS_FILE).is_file():
            return
        self._drawn_at = trainer.state.step
        m = trainer.cfg.model
        plot_losses(run_dir / METRICS_FILE, run_dir / PLOT_FILE,
                    f"{trainer.cfg.name or run_dir.name}: {m.family} Nr={m.num_recursions}, step "
                    f"{trainer.state.step}/{trainer.total_steps}")

    def on_step_end(self, trainer, result) -> None:
        if trainer.state.step % trainer.cfg.checkpoint.interval == 0 or trainer.finished or trainer.stopping:
            self._draw(trainer)

    def on_train_end(self, trainer) -> None:
        self._draw(trainer)  # also after a crash: the curve up to it
