"""The training shards' SHA-256, checked by rank 0 in a background thread while the run trains.

Start-up checks only the shards' sizes (one stat each; data.check_shards): reading every shard first would delay
a large run by minutes. The loader checks each shard's SHA-256 when it reaches it, but that may be hours in, on one
rank while the others wait in a collective. The audit finds a damaged shard early instead: every
train.log_interval steps the ranks agree on its status, and a damaged shard stops the run with a checkpoint and a
one-line error naming the file (exit 2).
"""

from __future__ import annotations

import threading
from typing import Any

from mor_ds import distributed
from mor_ds.train.callbacks.base import Callback
from mor_ds.train.faults import EXIT_CONFIG

_RUNNING = None  # the audit's status while it reads; "" once every shard matched; else the problem


class ShardAudit(Callback):
    def __init__(self, shards: list[tuple[str, Any]]) -> None:
        self.shards = shards  # (shard directory, data_pipeline.shards.ShardInfo) of the training split
        self.pending = bool(shards)
        self._status: str | None = _RUNNING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        from data_pipeline.shards import shard_file_problem

        for shard_dir, info in self.shards:
            if self._stop.is_set():
                return
            problem = shard_file_problem(shard_dir, info)
            if problem:
                self._status = f"{problem} (found by the background check of the training shards); stopped " \
                               f"with a checkpoint: run `mor-data verify {shard_dir}`"
                return
        self._status = ""

    def on_train_start(self, trainer) -> None:
        if self.pending and trainer.is_main:
            self._thread = threading.Thread(target=self._run, name="mor-ds-shard-audit", daemon=True)
            self._thread.start()

    def on_step_end(self, trainer, result) -> None:
        if not self.pending or trainer.state.step % trainer.cfg.train.log_interval:
            return
        status = distributed.broadcast_object(self._status)
        if status is _RUNNING:
            return
        self.pending = False
        if status:
            trainer.request_stop(EXIT_CONFIG, f"data error: {status}")

    def on_train_end(self, trainer) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
