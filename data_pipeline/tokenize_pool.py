"""Tokenization in N worker processes, results in submission order, with bounded read-ahead.

Both ``prepare`` and the streaming loader send batches of documents ("tasks") through :class:`TokenizePool`.
Each worker loads the tokenizer once and returns one flat ``uint32`` array per task: every document's ids followed
by EOS, so packing downstream is pure numpy. ``workers=0`` encodes in the calling process (tiny corpora, tests).
Workers are started with ``spawn`` (safe inside a training process that already runs threads or CUDA) and, on
Linux, die with the process that started them.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.tokenizer import Tokenizer, load_tokenizer

_worker_tokenizer: Tokenizer | None = None
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class EncodedTask:
    """Tokens of one task: ``tokens`` = doc ids + EOS for each doc, ``doc_ends`` = end offset of each doc."""

    tokens: np.ndarray
    doc_ends: np.ndarray
    text_bytes: int

    @property
    def docs(self) -> int:
        return len(self.doc_ends)


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> EncodedTask:
    """Encode ``texts`` and pack them EOS-separated into one array (the work of one task)."""
    ids = tokenizer.encode_batch(texts)
    flat: list[int] = []
    for doc in ids:
        flat += doc
        flat.append(tokenizer.eos_id)
    doc_ends = np.cumsum([len(doc) + 1 for doc in ids], dtype=np.int64)
    return EncodedTask(np.array(flat, dtype=np.uint32), doc_ends, sum(len(t.encode("utf-8", "surrogatepass"))
                                                                      for t in texts))


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die with the process that feeds it: after a kill -9 of `mor-data prepare` (or of a training
    rank) nobody reads its results, yet it would block on the task queue for as long as the queue stays open.
    Linux: the kernel sends SIGKILL when the parent thread ends (PR_SET_PDEATHSIG); elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(tokenizer_path: str, expected_hash: str, parent_pid: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent decides (a training run finishes its step and saves),
    # then shuts the pool down; a worker's own KeyboardInterrupt would only break the pool and print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    if _worker_tokenizer.hash != expected_hash:
        raise RuntimeError(f"{tokenizer_path} changed while the pipeline was running")
    _worker_tokenizer.set_threads(1)


def _encode_in_worker(texts: list[str]) -> EncodedTask:
    assert _worker_tokenizer is not None
    return encode_documents(_worker_tokenizer, texts)


class TokenizePool:
    """An ordered tokenization pipeline over ``workers`` processes (0 = in this process)."""

    def __init__(self, tokenizer: Tokenizer, workers: int, max_pending: int = 0):
        self.tokenizer = tokenizer
        self.workers = workers
        self.max_pending = max_pending or 2 * max(workers, 1)
        self._executor = None
        if workers > 0:
            self._executor = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(tokenizer.path, tokenizer.hash, os.getpid()))

    def encode(self, tasks: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, EncodedTask]]:
        """``(tag, EncodedTask)`` for every ``(tag, texts)`` task, in order; at most ``max_pending`` in flight."""
        if self._executor is None:
            for tag, texts in tasks:
                yield tag, encode_documents(self.tokenizer, texts)
            return
        pending: deque[tuple[Any, Future]] = deque()
        try:
            for tag, texts in tasks:
                pending.append((tag, self._executor.submit(_encode_in_worker, texts)))
                if len(pending) >= self.max_pending:
                    done_tag, future = pending.popleft()
                    yield done_tag, future.result()
            while pending:
                done_tag, future = pending.popleft()
                yield done_tag, future.result()
        finally:
            for _, future in pending:
                future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> TokenizePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def document_tasks(documents: Iterable[str], task_bytes: int = 1 << 18, task_docs: int = 512,
                   state=None) -> Iterator[tuple[Any, list[str]]]:
    """Group documents into tasks of about ``task_bytes`` characters (at most ``task_docs`` documents).

    With ``state`` (a zero-argument callable, e.g. ``DocumentStream.state_dict``) each task's tag is the stream's
    state right after its last document: resuming from that state continues with the next task.
    """
    texts: list[str] = []
    size = 0
    for text in documents:
        texts.append(text)
        size += len(text)
        if size >= task_bytes or len(texts) >= task_docs:
            yield (state() if state else None), texts
            texts, size = [], 0
    if texts:
        yield (state() if state else None), texts
