"""SIGTERM / SIGUSR1 recorded from the first line of `mor-ds train`, before torch, DeepSpeed and the data are
loaded (seconds): a signal during start-up is kept for the first step instead of killing the process. Imports
nothing heavy on purpose."""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

received: list[int] = []  # signals that arrived before training started; read by callbacks.signals.SignalHandler


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signum))
