"""SIGTERM / SIGUSR1 (Slurm's pre-timeout signal, `#SBATCH --signal=USR1@120`): finish the current step,
save a checkpoint, exit with EXIT_PREEMPTED so the job script requeues and the run resumes itself.

A signal may reach only some ranks; with several ranks the flag is max-reduced every step so all stop together."""

from __future__ import annotations

import signal

import torch

from mor_ds import distributed
from mor_ds.train import early_signals
from mor_ds.train.callbacks.base import Callback
from mor_ds.train.early_signals import SIGNALS
from mor_ds.train.faults import EXIT_PREEMPTED


class SignalHandler(Callback):
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def on_train_start(self, trainer) -> None:
        if early_signals.received:  # during start-up (imports, DeepSpeed init, data, resume)
            self.received = early_signals.received[-1]
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, trainer, result) -> None:
        signum = int(self.received or 0)
        if trainer.env.world_size > 1:  # agree on the max over ranks (a host sync; a lone process needs none)
            signum = int(distributed.all_reduce_max(torch.tensor([signum], device=trainer.device)).item())
        if signum:
            name = signal.Signals(signum).name
            trainer.request_stop(EXIT_PREEMPTED, f"{name} received: stopped after step {trainer.state.step} "
                                                 f"with a checkpoint; requeue and run again with --resume auto "
                                                 f"(exit code {EXIT_PREEMPTED})")

    def on_train_end(self, trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
