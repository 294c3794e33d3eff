"""Training loaders: fixed-length token windows, rank-sharded, prefetched, exactly resumable.

Both loaders are iterables of ``torch.int64`` tensors of shape ``(batch_size, seq_len + 1)`` (inputs are
``x[:, :-1]``, targets ``x[:, 1:]``) with ``state_dict()`` / ``load_state_dict()`` for checkpoints: after loading a
state saved at batch k (same world size, same settings) the next batch is bit-identical to batch k+1 of an
uninterrupted run. ``load_state_dicts(states)`` continues from the states of all ranks of a run that may have had
another world size: from an optimizer-step boundary, every later step takes exactly the windows the uninterrupted
run's step takes (split differently over the ranks), so no token is skipped or seen twice. Use one active iterator
per loader at a time.

:class:`ShardLoader` reads prepared shards (``mor-data prepare``). Windows are ``seq_len + 1`` tokens with stride
``seq_len`` inside each shard, so every token is a target exactly once per epoch (the < ``seq_len`` tokens at the
end of each shard are dropped). The windows of all training shards form one sequence per epoch: shard order and
window order within each shard are permuted by ``(seed, epoch)``, and epochs follow each other without a gap. Global
batch ``k`` is positions ``[k*W*B, (k+1)*W*B)`` of that endless sequence and rank ``r`` takes the slice
``[r*B, (r+1)*B)`` of it: ranks are disjoint, together they cover every window, and the data order depends only on
the global batch size ``W*B``, not on how it is split into ranks. Every rank decompresses the shards it visits
(zstd at ~0.6 GB/s per core; a shard's SHA-256 is checked when it is loaded), which costs a few percent of one core
per rank even for hundreds of ranks. Validation uses the last ``val_shards`` full-size shards (see :func:`held_out`),
in order, unshuffled, finite; a set with too few shards for that (a small corpus in one large shard) holds out the
last ``val_shards × 5%`` of the windows of its last shard instead (:data:`VAL_FRACTION_PER_SHARD`).

:class:`StreamLoader` reads a source directly (see ``sources.py``), tokenizing in worker processes; the source is split
into one part per rank of the run that started (``datasets.distributed.split_dataset_by_node``); windows are shuffled
within blocks of ``shuffle_windows`` windows seeded by ``(seed, part, block)``; its state holds, for each part the rank
reads, the source's ``state_dict()`` at the start of the current block, a token offset and the windows already passed
in the block and in the part.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_pipeline.errors import DataError, ShardError
from data_pipeline.shards import ShardIndex, read_shard
from data_pipeline.sources import DocumentStream, parse_source
from data_pipeline.tokenize_pool import TokenizePool, document_tasks
from data_pipeline.tokenizer import Tokenizer, difference, load_tokenizer

STATE_VERSION = 1
STREAM_STATE_VERSION = 2  # v2: per-part positions, counted in windows (v1 states still load on their world size)
# held out per requested validation shard when the set has too few shards to hold out whole ones
VAL_FRACTION_PER_SHARD = 0.05


def _windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """A ``(count, seq_len + 1)`` view of ``tokens`` with stride ``seq_len`` (no copy)."""
    step = tokens.strides[0]
    return np.lib.stride_tricks.as_strided(tokens, shape=(count, seq_len + 1), strides=(seq_len * step, step),
                                           writeable=False)


class _Prefetcher:
    """Runs a producer iterator in a daemon thread, ``size`` items ahead; re-raises its errors in the consumer."""

    _END = object()

    def __init__(self, producer: Iterator, size: int):
        self._producer = producer
        self._queue: queue.Queue = queue.Queue(size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mor-data-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._producer:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
        finally:
            close = getattr(self._producer, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _iterate(producer: Iterator, prefetch: int) -> tuple[Iterator, Any]:
    if prefetch <= 0:
        return producer, getattr(producer, "close", lambda: None)
    prefetcher = _Prefetcher(producer, prefetch)
    return iter(prefetcher), prefetcher.close


def held_out(index: ShardIndex, val_shards: int) -> set[int]:
    """Numbers of the validation shards: the last ``val_shards``, not counting a final shard shorter than the rest."""
    count = len(index.shards)
    end = count - 1 if count > val_shards + 1 and index.shards[-1].tokens < index.shards[0].tokens else count
    return set(range(end - val_shards, end)) if val_shards else set()


def check_tokenizer(shard_dir: str, index: ShardIndex, tokenizer: Tokenizer) -> None:
    """ShardError unless ``tokenizer`` has the identity of the one the shards were made with (the index records it;
    else the copy of that tokenizer in the shard directory tells), naming the first difference."""
    recorded = index.tokenizer
    if tokenizer.hash == recorded["hash"] or tokenizer.identity == recorded.get("identity", tokenizer.identity + "?"):
        return
    index_path = os.path.join(shard_dir, "index.json")
    copy = os.path.join(shard_dir, recorded.get("file", ""))
    why = None
    if recorded.get("file") and os.path.isfile(copy):  # indexes from before identities were recorded
        why = difference(load_tokenizer(copy), tokenizer)
        if why is None:
            return
    raise ShardError(f"{index_path}: shards were made with tokenizer {recorded['hash'][:16]}... "
                     f"({recorded.get('path')}), this run uses {tokenizer.path} ({tokenizer.hash[:16]}...)"
                     + (f": {why}" if why else "") + "; re-prepare, or use the tokenizer the shards were made with")


def _windows_in(tokens: int, seq_len: int) -> int:
    return max(tokens - 1, 0) // seq_len


def split_segments(index: ShardIndex, seq_len: int, val_shards: int,
                   split: str) -> tuple[list[tuple[int, int, int]], str]:
    """The ``(shard number, first window, window count)`` pieces of a split, and a note on how validation was held
    out ("" for whole shards). Whole shards when there are more than ``val_shards``; else the tail of the last
    shard (see the module docstring)."""
    count = len(index.shards)
    windows = [_windows_in(s.tokens, seq_len) for s in index.shards]
    if count > val_shards:
        val = held_out(index, val_shards)
        return [(n, 0, windows[n]) for n in range(count) if (n in val) == (split == "val")], ""
    last = count - 1
    fraction = VAL_FRACTION_PER_SHARD * val_shards
    held = min(max(1, round(fraction * windows[last])), windows[last] - 1)
    note = (f"{count} shard(s) for val_shards={val_shards}: the last {held} windows ({fraction:.0%}) of "
            f"{index.shards[last].file} are held out")
    if split == "val":
        return [(last, windows[last] - held, held)], note
    return [(n, 0, windows[n]) for n in range(last)] + [(last, 0, windows[last] - held)], note


class GlobalOrderLoader:
    """A loader whose batches are cut from one global sequence of windows: global batch k is positions
    ``[k·W·B, (k+1)·W·B)`` and rank r takes ``[r·B, (r+1)·B)`` of it, so the position (windows consumed) is the
    same on every rank and any world size whose global batch divides it continues the run. Subclasses set
    ``global_batch``, ``prefetch``, ``num_batches`` (None: endless) and ``_next_batch``, yield batches from
    ``_batches(first)``, and name in ``MATCHING`` the keys of their ``state_dict()`` a resumed state must agree on
    (``location()`` says what the loader reads, for errors)."""

    MATCHING: tuple[str, ...]
    global_batch: int
    prefetch: int
    num_batches: int | None
    _next_batch: int  # rank-local batches handed out so far

    def _batches(self, first: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[torch.Tensor]:
        first = self._next_batch
        if self.num_batches is not None and first >= self.num_batches:
            first = 0  # a new pass over the validation split
        batches, close = _iterate(self._batches(first), self.prefetch)
        try:
            for k, batch in enumerate(batches, first):
                self._next_batch = k + 1
                yield batch
        finally:
            close()

    def location(self) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; a different global batch size works if it divides the position."""
        name = type(self).__name__
        if state.get("loader") != name or state.get("version") != STATE_VERSION:
            raise DataError(f"loader state is not a {name} v{STATE_VERSION} state: {state.get('loader')!r} "
                            f"v{state.get('version')!r}")
        mine = self.state_dict()
        for key in self.MATCHING:
            if state[key] != mine[key]:
                raise DataError(f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r} "
                                f"({self.location()})")
        consumed = int(state["consumed_windows"])
        if consumed % self.global_batch:
            raise DataError(f"loader state is at window {consumed}, not a multiple of this run's global batch "
                            f"{self.global_batch}; resume with a global batch that divides it")
        self._next_batch = consumed // self.global_batch

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue a run from the states its ranks saved, on any world size whose global batch divides the position:
        the position is a count of windows of the one global order, the same in every rank's state."""
        positions = sorted({int(s.get("consumed_windows", -1)) for s in states})
        if len(positions) != 1:
            raise DataError(f"the ranks' loader states are at windows {positions}: not one step of one run")
        self.load_state_dict(states[0])


class ShardLoader(GlobalOrderLoader):
    """Batches of windows from prepared shards (see the module docstring for the order and sharding).

    Args:
        shard_dir: a ``mor-data prepare`` output directory.
        seq_len, batch_size: each batch is ``(batch_size, seq_len + 1)`` int64.
        rank, world_size: data-parallel position; ranks get disjoint windows that together cover all.
        seed: permutes shards and windows per epoch (train split only).
        split: ``"train"`` (endless, epoch after epoch) or ``"val"`` (finite, deterministic).
        val_shards: the last ``val_shards`` full-size shards are held out for validation (a shorter final shard
            stays in training, so validation never shrinks to a stub); with ``val_shards`` or fewer shards, the
            last ``val_shards × 5%`` of the last shard's windows (``split_note`` then says so).
        prefetch: batches prepared ahead in a background thread (0 = none).
        expected_tokenizer: refuse shards made with another tokenizer (a different ``Tokenizer.identity``: the
            same tokenizer in another file format is accepted).

    Attributes: ``tokens_per_batch`` (target tokens per batch, ``batch_size * seq_len``), ``num_windows``
    (windows in the split), ``num_batches`` (batches per pass of the val split; None for train), ``index``.
    """

    MATCHING = ("split", "seed", "seq_len", "num_windows", "tokenizer_hash")

    def __init__(self, shard_dir: str, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train", val_shards: int = 1, prefetch: int = 2,
                 expected_tokenizer: Tokenizer | None = None):
        self.index = ShardIndex.load(shard_dir)
        self.shard_dir = str(shard_dir)
        index_path = f"{shard_dir}/index.json"
        if expected_tokenizer is not None:
            check_tokenizer(self.shard_dir, self.index, expected_tokenizer)
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', not {split!r}")
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad loader shape: seq_len={seq_len} batch_size={batch_size} rank={rank} "
                            f"world_size={world_size}")
        if val_shards < 0 or (split == "val" and val_shards == 0):
            raise DataError(f"{index_path}: val_shards={val_shards} does not fit: need val_shards >= 1 for a "
                            f"validation split, >= 0 for training")
        segments, self.split_note = split_segments(self.index, seq_len, val_shards, split)
        self.shards = [self.index.shards[n] for n, _, _ in segments]
        self.first_windows = np.array([first for _, first, _ in segments], dtype=np.int64)
        self.shard_windows = np.array([windows for _, _, windows in segments], dtype=np.int64)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.split, self.prefetch = seed, split, prefetch
        self.num_windows = int(self.shard_windows.sum())
        self.global_batch = world_size * batch_size
        self.tokens_per_batch = batch_size * seq_len
        smaller = (f"prepare with a smaller --shard-tokens (now {self.index.shard_tokens:,}) or raise val_shards"
                   if self.split_note else "raise val_shards")
        if self.num_windows == 0:
            raise DataError(f"{index_path}: the {split} split holds no window of {seq_len + 1} tokens"
                            + (f" ({smaller})" if split == "val" else ""))
        self.num_batches = self.num_windows // self.global_batch if split == "val" else None
        if self.num_batches == 0:
            raise DataError(f"{index_path}: the val split has {self.num_windows} windows of {seq_len + 1} tokens, "
                            f"fewer than one global batch ({self.global_batch}); {smaller}")
        self._next_batch = 0

    # ----- order of windows
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Shard positions of this split in the order epoch ``epoch`` visits them."""
        if self.split == "val":
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        count = int(self.shard_windows[shard])
        if self.split == "val":
            return np.arange(count)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(count)

    def windows_at(self, positions: np.ndarray, cache: dict) -> np.ndarray:
        """The ``(len(positions), seq_len + 1)`` windows at these positions of the split's endless window sequence
        (epoch after epoch). ``cache`` (a dict the caller keeps) holds the current epoch's shard order and the
        current shard's windows, so consecutive positions decompress each shard once."""
        L, N = self.seq_len, self.num_windows
        rows_out = np.empty((len(positions), L + 1), dtype=np.int64)
        epochs, within = np.divmod(positions, N)
        for epoch in np.unique(epochs).tolist():
            if cache.get("epoch") != epoch:
                shard_order = self._epoch_order(epoch)
                cache.update(epoch=epoch, order=(shard_order, np.cumsum(self.shard_windows[shard_order])))
            shard_order, ends = cache["order"]
            rows = np.flatnonzero(epochs == epoch)
            slots = np.searchsorted(ends, within[rows], side="right")
            for slot in np.unique(slots).tolist():
                shard = int(shard_order[slot])
                if cache.get("shard") != (epoch, shard):
                    tokens = read_shard(self.shard_dir, self.shards[shard], self.index.token_dtype)
                    tokens = tokens[int(self.first_windows[shard]) * L:]
                    cache.update(shard=(epoch, shard), windows=_windows(tokens, L, int(self.shard_windows[shard])),
                                 window_order=self._window_order(epoch, shard))
                picked = rows[slots == slot]
                local = within[picked] - (ends[slot] - self.shard_windows[shard])
                rows_out[picked] = cache["windows"][cache["window_order"][local]]
        return rows_out

    def _batches(self, first: int) -> Iterator[torch.Tensor]:
        """This rank's batches from rank-local batch number ``first`` on."""
        cache: dict = {}
        k = first
        while self.num_batches is None or k < self.num_batches:
            positions = k * self.global_batch + self.rank * self.batch_size + np.arange(self.batch_size)
            yield torch.from_numpy(self.windows_at(positions, cache))
            k += 1

    # ----- state
    def state_dict(self) -> dict:
        """Position after the last batch handed out, plus what must match on resume."""
        return {"loader": "ShardLoader", "version": STATE_VERSION, "split": self.split, "seed": self.seed,
                "seq_len": self.seq_len, "num_windows": self.num_windows, "tokenizer_hash": self.index.tokenizer_hash,
                "global_batch": self.global_batch, "consumed_windows": self._next_batch * self.global_batch}

    def location(self) -> str:
        return self.shard_dir


class StreamLoader:
    """Batches of windows tokenized on the fly from a streaming source (no prepare step).

    Args:
        source: a ``--source`` string (see ``sources.py``).
        tokenizer_path: SentencePiece ``.model`` or HF ``tokenizer.json``.
        seq_len, batch_size, rank, world_size, seed: as for :class:`ShardLoader`.
        text_field, min_chars, max_chars, strict: document selection (see ``sources.DocumentStream``).
        num_workers: tokenizer processes per part read (0 = tokenize in the loader's thread).
        shuffle_windows: windows per shuffle block (rounded up to a multiple of ``batch_size``; <= 1: no shuffle).
        prefetch: batches prepared ahead in a background thread (0 = none).
        global_batch: windows per optimizer step over all ranks (``train.global_batch_size``; 0 = ``world_size *
            batch_size``, no gradient accumulation): micro-batch ``k`` of a rank belongs to step ``k // (global_batch
            / (world_size * batch_size))``.

    The source is split into ``partitions`` parts with ``split_dataset_by_node``, one per rank of the run that
    started (a resumed run keeps that count). Each part's documents are packed EOS-separated into one endless stream
    (epochs follow each other), cut into windows of ``seq_len + 1`` tokens with stride ``seq_len`` and shuffled
    within blocks of ``block_windows`` windows seeded by ``(seed, part, block)``. Optimizer step ``s`` takes the next
    ``global_batch / partitions`` windows of every part; laid end to end, part after part, these are the step's
    windows, and rank ``r`` takes the ``r``-th ``global_batch / world_size`` of them, ``batch_size`` per micro-batch.
    On the world size that started this is simply "rank r reads part r". Resumed on another world size
    (:meth:`load_state_dicts`), a rank may read two or more parts (skipping the windows other ranks take) and every
    step still takes exactly the windows the uninterrupted run would have. ``tokens_per_batch`` and
    ``bad_records()`` report progress.
    """

    def __init__(self, source: str, tokenizer_path: str, seq_len: int, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, text_field: str = "text", num_workers: int = 1,
                 min_chars: int = 0, max_chars: int = 0, strict: bool = False, shuffle_windows: int = 1024,
                 prefetch: int = 2, global_batch: int = 0):
        if seq_len < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad loader shape: seq_len={seq_len} batch_size={batch_size} rank={rank} "
                            f"world_size={world_size}")
        global_batch = global_batch or world_size * batch_size
        if global_batch % (world_size * batch_size):
            raise DataError(f"global_batch={global_batch} is not a multiple of world_size x batch_size = "
                            f"{world_size} x {batch_size}")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.spec = parse_source(source)
        self.documents = {"text_field": text_field, "min_chars": min_chars, "max_chars": max_chars, "strict": strict}
        self.source, self.seq_len, self.batch_size = source, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.global_batch = rank, world_size, seed, global_batch
        self.num_workers, self.prefetch = num_workers, prefetch
        self.partitions = world_size
        self.block_windows = batch_size * max(1, -(-shuffle_windows // batch_size))
        self.shuffle = shuffle_windows > 1
        self.tokens_per_batch = batch_size * seq_len
        self._batches_done = 0  # micro-batches handed out by this rank
        self._positions: dict[int, dict] = {}  # part -> position after its last window passed by this rank
        self._start_missing_parts()

    # ----- which windows this rank reads
    def _stream(self, part: int) -> DocumentStream:
        return DocumentStream(self.spec, rank=part, world_size=self.partitions, **self.documents)

    def _parts(self) -> list[int]:
        """The parts this rank reads: those holding its slice of every step's windows."""
        per_part, per_rank = self.global_batch // self.partitions, self.global_batch // self.world_size
        return sorted({g // per_part for g in range(self.rank * per_rank, (self.rank + 1) * per_rank)})

    def _start_missing_parts(self) -> None:
        for part in self._parts():
            if part not in self._positions:
                self._positions[part] = {"stream": self._stream(part).state_dict(), "offset": 0, "block": 0,
                                         "windows": 0, "taken": 0}

    # ----- one part's windows
    def _tasks(self, stream: DocumentStream) -> Iterator[tuple[dict, list[str]]]:
        """``(stream state before the task, texts)`` over endless epochs of one part's documents."""
        before, empty_passes = stream.state_dict(), 0
        while True:
            tasks = 0
            for after, texts in document_tasks(stream, state=stream.state_dict):
                yield before, texts
                before, tasks = after, tasks + 1
            empty_passes = 0 if tasks else empty_passes + 1
            if empty_passes == 2:  # one empty pass is the tail of a resumed epoch; two mean no data at all
                raise DataError(f"--source {self.source}: part {stream.rank} of {stream.world_size} (the documents "
                                f"split_dataset_by_node gives rank {stream.rank} of {stream.world_size}) holds no "
                                f"documents; use fewer ranks or a source with more files")

    def _part_windows(self, part: int, position: dict) -> Iterator[tuple[np.ndarray, dict]]:
        """``(window, position after it)`` for the windows of ``part`` from ``position`` on.

        The buffer starts at the current block's first token; ``segments`` holds ``(buffer index of the task's
        first token, stream state before the task)`` for the buffered tasks (an index < 0: the task began in an
        earlier block), which turns any buffer index back into a resumable ``(state, offset)``. ``windows`` counts
        the current block's windows already passed, ``taken`` the part's windows passed since the run started.
        """
        L, M = self.seq_len, self.block_windows
        cut = M * L  # tokens per block; the last window also reads the next block's first token
        stream = self._stream(part)
        stream.load_state_dict(position["stream"])
        skip, block, done, taken = position["offset"], position["block"], position["windows"], position["taken"]
        parts: list[np.ndarray] = []
        segments: list[tuple[int, dict]] = []
        size = 0
        pool = TokenizePool(self.tokenizer, self.num_workers)
        try:
            for before, task in pool.encode(self._tasks(stream)):
                segments.append((size - skip, before))
                parts.append(task.tokens[skip:])
                size += len(task.tokens) - skip
                skip = 0
                while size >= cut + 1:
                    buffer = np.concatenate(parts)
                    windows = _windows(buffer, L, M)
                    order = (np.random.default_rng([self.seed, part, block]).permutation(M)
                             if self.shuffle else np.arange(M))
                    start, state = max((seg for seg in segments if seg[0] <= cut), key=lambda seg: seg[0])
                    next_block = {"stream": state, "offset": cut - start, "block": block + 1, "windows": 0}
                    for w in range(done, M):
                        taken += 1
                        after = next_block if w + 1 == M else {**position, "block": block, "windows": w + 1}
                        yield windows[order[w]], {**after, "taken": taken}
                    parts, size = [buffer[cut:]], size - cut
                    segments = [(first - cut, st) for first, st in segments if first >= start]
                    position, block, done = next_block, block + 1, 0
        finally:
            pool.close()

    def _batches(self, positions: dict[int, dict], first: int) -> Iterator[tuple[torch.Tensor, dict[int, dict]]]:
        """``(batch, positions of the parts after it)`` from this rank's micro-batch number ``first`` on."""
        B, L = self.batch_size, self.seq_len
        per_part, per_rank = self.global_batch // self.partitions, self.global_batch // self.world_size
        accumulation = per_rank // B
        current = dict(positions)
        readers = {part: self._part_windows(part, current[part]) for part in self._parts()}
        try:
            for k in itertools.count(first):
                step, micro = divmod(k, accumulation)
                batch = np.empty((B, L + 1), dtype=np.int64)
                for i in range(B):
                    part, offset = divmod(self.rank * per_rank + micro * B + i, per_part)
                    target = step * per_part + offset  # the part's window this row takes
                    while current[part]["taken"] < target:  # windows of other ranks: passed over
                        _, current[part] = next(readers[part])
                    batch[i], current[part] = next(readers[part])
                yield torch.from_numpy(batch), dict(current)
        finally:
            for reader in readers.values():
                reader.close()

    # ----- iteration and state
    def __iter__(self) -> Iterator[torch.Tensor]:
        batches, close = _iterate(self._batches(self._positions, self._batches_done), self.prefetch)
        try:
            for batch, after in batches:
                self._positions = after
                self._batches_done += 1
                yield batch
        finally:
            close()

    def bad_records(self) -> dict:
        """Bad records counted so far in the parts this rank reads (their current stream states)."""
        total: dict[str, int] = {}
        for position in self._positions.values():
            for kind, count in position["stream"]["bad"]["counts"].items():
                total[kind] = total.get(kind, 0) + count
        return total

    def state_dict(self) -> dict:
        return {"loader": "StreamLoader", "version": STREAM_STATE_VERSION, "source": self.source, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "rank": self.rank,
                "world_size": self.world_size, "tokenizer_hash": self.tokenizer.hash,
                "block_windows": self.block_windows, "partitions": self.partitions,
                "global_batch": self.global_batch, "batches": self._batches_done,
                "positions": {part: dict(pos) for part, pos in self._positions.items()}}

    def _checked(self, state: dict, keys: tuple[str, ...]) -> dict:
        """``state`` in the current layout, refused unless it is a StreamLoader state agreeing on ``keys``."""
        if state.get("loader") != "StreamLoader" or state.get("version") not in (1, STREAM_STATE_VERSION):
            raise DataError(f"loader state is not a StreamLoader v{STREAM_STATE_VERSION} state: "
                            f"{state.get('loader')!r} v{state.get('version')!r}")
        if state["version"] == 1:  # one position per rank, counted in batches of the rank's stream
            pos, B = state["position"], state["batch_size"]
            taken = pos["block"] * state["block_windows"] + pos["batches"] * B
            state = {**state, "partitions": state["world_size"], "global_batch": self.global_batch,
                     "batches": taken // B, "positions": {state["rank"]: {
                         "stream": pos["stream"], "offset": pos["offset"], "block": pos["block"],
                         "windows": pos["batches"] * B, "taken": taken}}}
        mine = self.state_dict()
        for key in keys:
            if state[key] != mine[key]:
                raise DataError(f"loader state has {key}={state[key]!r} but this loader has {mine[key]!r}")
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off (same source, tokenizer, shape, rank and world size)."""
        state = self._checked(state, ("source", "seed", "seq_len", "batch_size", "rank", "world_size",
                                      "tokenizer_hash", "global_batch"))
        self.partitions, self.block_windows = state["partitions"], state["block_windows"]
        self._positions = {part: dict(pos) for part, pos in state["positions"].items()}
        self._batches_done = state["batches"]

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue a run from the states its ranks saved (in rank order) at an optimizer-step boundary, on this
        loader's rank and world size, which may differ: each part continues from the rank that passed its last
        window of the last step, and no window is skipped or taken twice."""
        if len(states) == self.world_size and all(s.get("batch_size") == self.batch_size for s in states):
            self.load_state_dict(states[self.rank])
            return
        states = [self._checked(s, ("source", "seed", "seq_len", "tokenizer_hash")) for s in states]
        for key in ("partitions", "block_windows", "global_batch"):
            if len({s[key] for s in states}) != 1:
                raise DataError(f"the ranks' loader states disagree on {key}: not one run's states")
        saved = states[0]
        if saved["global_batch"] != self.global_batch:
            raise DataError(f"loader states have global_batch={saved['global_batch']} but this loader has "
                            f"{self.global_batch}: a streamed source continues on another world size only with the "
                            f"same global batch")
        accumulation = saved["global_batch"] // (len(states) * saved["batch_size"])
        steps = {s["batches"] / accumulation for s in states}
        if len(steps) != 1 or not float(next(iter(steps))).is_integer():
            raise DataError(f"loader states are at micro-batches {sorted({s['batches'] for s in states})}, not at one "
                            f"optimizer-step boundary (gradient accumulation {accumulation})")
        step = int(next(iter(steps)))
        self.partitions, self.block_windows = saved["partitions"], saved["block_windows"]
        end = step * (self.global_batch // self.partitions)  # every part's position after that step
        latest = {part: pos for s in states for part, pos in s["positions"].items() if pos["taken"] == end}
        missing = sorted(set(range(self.partitions)) - set(latest))
        if missing:
            raise DataError(f"loader states hold no position of part(s) {missing} at step {step}: not one run's "
                            f"states of all its ranks")
        self._positions = {part: dict(latest[part]) for part in self._parts()}
        self._batches_done = step * (self.global_batch // (self.world_size * self.batch_size))
