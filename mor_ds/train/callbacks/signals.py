"""Stop signals: finish the current step, save a checkpoint, exit.

  SIGTERM / SIGUSR1   Slurm's pre-timeout signal (`#SBATCH --signal=USR1@120`), preemption, scancel: exit
                      EXIT_PREEMPTED so the job script requeues and the run resumes itself.
  SIGINT (Ctrl-C)     a person stopping the run: the same checkpoint, then exit EXIT_INTERRUPTED. A second Ctrl-C
                      stops at once without saving (KeyboardInterrupt, which the command turns into one line); a
                      third kills the process (the default handler is back).

Signals are recorded from process start (mor_ds.train.early_signals), so one during start-up (imports, DeepSpeed
init, data, resume) is not fatal: SIGTERM/SIGUSR1 end the first step with a checkpoint; a Ctrl-C stops before the
first step, as nothing new would be saved.

A signal may reach only some ranks; with several ranks the flag is max-reduced every step so all stop together
(SIGTERM and SIGUSR1 outrank SIGINT: a requeue must not be lost to a Ctrl-C).
"""

from __future__ import annotations

import signal

import torch

from mor_ds import distributed
from mor_ds.train import early_signals
from mor_ds.train.callbacks.base import Callback
from mor_ds.train.faults import EXIT_INTERRUPTED, EXIT_PREEMPTED


class SignalHandler(Callback):
    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def _agreed(self, trainer) -> int:
        flag = early_signals.received.flag()
        if trainer.env.world_size > 1:  # agree on the max over ranks (a host sync; a lone process needs none)
            flag = int(distributed.all_reduce_max(torch.tensor([flag], device=trainer.device)).item())
        return flag

    def on_train_start(self, trainer) -> None:
        self._previous = early_signals.install()
        early_signals.received.training = True
        if self._agreed(trainer) == signal.SIGINT:
            trainer.request_stop(EXIT_INTERRUPTED, f"Ctrl-C during start-up: stopped before training (step "
                                                   f"{trainer.state.step}); nothing new to save")

    def on_step_end(self, trainer, result) -> None:
        flag = self._agreed(trainer)
        step = trainer.state.step
        if flag == signal.SIGINT:
            trainer.request_stop(EXIT_INTERRUPTED, f"Ctrl-C: stopped after step {step} with a checkpoint; run the "
                                                   f"same command again to continue (exit code {EXIT_INTERRUPTED})")
        elif flag:
            name = signal.Signals(flag).name
            trainer.request_stop(EXIT_PREEMPTED, f"{name} received: stopped after step {step} with a checkpoint; "
                                                 f"requeue and run again with --resume auto (exit code "
                                                 f"{EXIT_PREEMPTED})")

    def on_train_end(self, trainer) -> None:
        early_signals.restore(self._previous)  # the signals are consumed: an in-process caller may train again
        self._previous = {}
