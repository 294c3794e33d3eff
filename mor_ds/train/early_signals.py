"""Stop signals as this process received them, recorded from the first line of `mor-ds train` / `uptrain`, before
torch, DeepSpeed and the data are loaded (seconds): a signal during start-up is kept instead of killing the process.
The training callback (callbacks.signals.SignalHandler) acts on them at step boundaries. Imports nothing heavy on
purpose.

  SIGTERM / SIGUSR1   recorded (the last one wins)
  SIGINT (Ctrl-C)     counted; one line from rank 0 says what happens next. A second Ctrl-C raises KeyboardInterrupt
                      (stop at once, without saving: the CLI turns it into one line); a third kills the process (the
                      default handler is back).
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SIGNALS = (*PREEMPT_SIGNALS, signal.SIGINT)


class Received:
    """Stop signals seen by this process."""

    def __init__(self) -> None:
        self.preempt = 0  # the last SIGTERM / SIGUSR1, 0 = none
        self.interrupts = 0  # Ctrl-Cs
        self.training = False  # the callback is installed: the next step boundary stops the run

    def flag(self) -> int:
        """What ranks agree on by max-reduction: a preemption signal's number, else SIGINT's (lower), else 0."""
        return self.preempt or (int(signal.SIGINT) if self.interrupts else 0)

    def clear(self) -> None:
        self.__init__()


received = Received()


def is_main_process() -> bool:
    """Rank 0 by the launch environment (usable before the process group exists)."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return rank == "0"


def _notice(text: str) -> None:
    """One line on stderr from rank 0, written straight to the descriptor (a handler may interrupt a print)."""
    if is_main_process():
        os.write(sys.stderr.fileno(), f"[mor-ds] {text}\n".encode())


def _on_signal(signum: int, frame: object) -> None:
    if signum != signal.SIGINT:
        received.preempt = signum
        return
    received.interrupts += 1
    if received.interrupts > 1:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third Ctrl-C kills the process
        raise KeyboardInterrupt
    if received.training:
        _notice("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop at once, without saving)")
    else:
        _notice("Ctrl-C: stopping before training starts (Ctrl-C again: stop at once)")


def install() -> dict[int, object]:
    """Our handler for every stop signal; returns the previous handlers. An inherited SIG_IGN for SIGINT (a
    background job of a non-interactive shell) is kept: Ctrl-C at that terminal is not meant for this process."""
    previous = {}
    for sig in SIGNALS:
        if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        previous[sig] = signal.signal(sig, _on_signal)
    return previous


def restore(previous: dict[int, object]) -> None:
    """Put back the handlers `install` returned and forget the signals seen: an in-process caller (tests, a
    notebook, the demo) gets its own handlers back and may train again."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    received.clear()
