"""A weighted mixture of prepared shard directories: deterministic, rank-sharded, exactly resumable.

The mixture is one endless sequence of windows (global positions 0, 1, 2, …), cut into blocks of ``block`` windows.
Block ``b`` holds ``C_s(b + 1) - C_s(b)`` windows of source ``s``, where ``C_s(b)`` — the windows of ``s`` among the
first ``b · block`` positions — is the largest-remainder apportionment of the target ``w_s · b · block``. So every
block boundary is within one window of the weights, for any length of run, and ``C_s`` of any block is computed
in O(sources) — no replay on resume. Inside a block each position goes to the source furthest below its share (among
those with block quota left; Megatron's rule), so every stretch of the sequence, a global batch included, holds each
source in proportion to within a window or two. The k-th window a source contributes is position k of that source's
own endless window sequence (its shards and windows permuted per epoch exactly as
:class:`~data_pipeline.loader.ShardLoader` does, seeded by the source's name), so a source smaller than its share
repeats — epoch after epoch — and the run's per-source epochs say so. As with ShardLoader, global batch k is
positions ``[k·W·B, (k+1)·W·B)`` and rank r takes ``[r·B, (r+1)·B)``: the order depends on the global batch only
(a resume on another world size continues it). This is Megatron's blended dataset (exact proportions by construction,
rather than by sampling) with OLMo-core's per-source accounting, in closed form.

Validation (``split="val"``) interleaves the sources' held-out windows the same way and ends when a source's held-out
windows run out, so each is used once, in order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import STATE_VERSION, GlobalOrderLoader, ShardLoader
from data_pipeline.tokenizer import Tokenizer

DEFAULT_BLOCK = 4096  # windows per interleaving block (raised to fit the smallest weight)


@dataclass(frozen=True)
class Source:
    """One prepared shard directory of a mixture and its share (weights are normalised over the mixture)."""

    name: str
    path: str
    weight: float


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, each within one of ``weights · total`` (largest remainder; ties go to
    the earlier source)."""
    target = weights * total
    counts = np.floor(target).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.lexsort((np.arange(len(weights)), -(target - counts)))
        counts[order[:short]] += 1
    return counts


class MixtureLoader(GlobalOrderLoader):
    """Batches of windows from several prepared shard directories in fixed proportions (module docstring).

    Args:
        sources: the mixture (names unique, weights > 0).
        seq_len, batch_size, rank, world_size, seed, split, val_shards, prefetch: as for ShardLoader (``val_shards``
            applies to each source).
        expected_tokenizer: every source must have been prepared with a tokenizer of this identity.
        block: windows per interleaving block.

    Attributes: ``tokens_per_batch``, ``num_batches`` (val split), ``loaders`` (one ShardLoader per source),
    ``weights`` (normalised).
    """

    MATCHING = ("split", "seed", "seq_len", "block", "sources")

    def __init__(self, sources: list[Source], seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, split: str = "train", val_shards: int = 1, prefetch: int = 2,
                 expected_tokenizer: Tokenizer | None = None, block: int = DEFAULT_BLOCK):
        if not sources:
            raise DataError("a mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"mixture sources need distinct names, got {names}")
        for s in sources:
            if not s.weight > 0:
                raise DataError(f"mixture source {s.name!r}: weight {s.weight!r} must be > 0")
        if not 0 <= rank < world_size:
            raise DataError(f"bad loader shape: rank={rank} world_size={world_size}")
        self.sources = list(sources)
        self.weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        # every source at least twice per block, so C_s never decreases (see the module docstring)
        self.block = max(block, int(np.ceil(2 / self.weights.min())))
        self._cached_block: tuple = (-1, None, None)
        self.loaders = [ShardLoader(s.path, seq_len, 1, seed=zlib.crc32(f"{seed}:{s.name}".encode()), split=split,
                                    val_shards=val_shards, prefetch=0, expected_tokenizer=expected_tokenizer)
                        for s in sources]
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.split, self.prefetch = seed, split, prefetch
        self.global_batch = world_size * batch_size
        self.tokens_per_batch = batch_size * seq_len
        self.num_batches = None
        if split == "val":  # the interleave up to the first source whose held-out windows run out
            self.num_batches = self._val_positions() // self.global_batch
            if self.num_batches == 0:
                raise DataError(f"the mixture's validation split holds fewer windows than one global batch "
                                f"({self.global_batch}); raise val_shards")
        self._next_batch = 0

    # ----- the interleave
    def counts_before(self, position: int) -> np.ndarray:
        """Windows of each source among global positions [0, position)."""
        b, offset = divmod(position, self.block)
        start = apportion(self.weights, b * self.block)
        if not offset:
            return start
        labels, _ = self._block(b)
        return start + np.bincount(labels[:offset], minlength=len(self.sources))

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's source labels and, per position, the index within its source's window sequence."""
        cached = self._cached_block  # one read: the prefetch thread and the consumer both get here
        if cached[0] != b:
            start = apportion(self.weights, b * self.block)
            quota = apportion(self.weights, (b + 1) * self.block) - start
            counts, labels = start.astype(np.float64), np.empty(self.block, dtype=np.int64)
            local = np.empty(self.block, dtype=np.int64)
            for i in range(self.block):  # the source furthest below its share, among those with quota left
                behind = self.weights * (b * self.block + i + 1) - counts
                behind[quota == 0] = -np.inf
                source = int(np.argmax(behind))
                labels[i], local[i] = source, counts[source]
                counts[source] += 1
                quota[source] -= 1
            cached = self._cached_block = (b, labels, local)
        return cached[1], cached[2]

    def assign(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's window sequence) of global positions [first, first + count)."""
        sources = np.empty(count, dtype=np.int64)
        local = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            b, offset = divmod(first + done, self.block)
            labels, indices = self._block(b)
            take = min(count - done, self.block - offset)
            sources[done:done + take] = labels[offset:offset + take]
            local[done:done + take] = indices[offset:offset + take]
            done += take
        return sources, local

    def _val_positions(self) -> int:
        """Global positions of the val interleave before some source has used all its held-out windows."""
        available = np.array([loader.num_windows for loader in self.loaders])
        lo, hi = 0, int(available.sum()) + 1  # counts_before is monotone in the position: binary search
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if (self.counts_before(mid) <= available).all():
                lo = mid
            else:
                hi = mid
        return lo

    # ----- iteration and state
    def _batches(self, first: int) -> Iterator[torch.Tensor]:
        caches: list[dict] = [{} for _ in self.loaders]
        k = first
        while self.num_batches is None or k < self.num_batches:
            sources, local = self.assign(k * self.global_batch + self.rank * self.batch_size, self.batch_size)
            batch = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
            for s in np.unique(sources).tolist():
                rows = np.flatnonzero(sources == s)
                batch[rows] = self.loaders[s].windows_at(local[rows], caches[s])
            yield torch.from_numpy(batch)
            k += 1

    def source_windows(self) -> dict[str, int]:
        """Windows each source has contributed to the batches handed out so far (all ranks together)."""
        counts = self.counts_before(self._next_batch * self.global_batch)
        return {s.name: int(c) for s, c in zip(self.sources, counts)}

    def source_epochs(self) -> dict[str, float]:
        """Passes over each source's split so far (> 1: the source repeats)."""
        return {name: count / loader.num_windows
                for (name, count), loader in zip(self.source_windows().items(), self.loaders)}

    def state_dict(self) -> dict:
        return {"loader": "MixtureLoader", "version": STATE_VERSION, "split": self.split, "seed": self.seed,
                "seq_len": self.seq_len, "block": self.block,
                "sources": [{"name": s.name, "weight": float(w), "num_windows": loader.num_windows,
                             "tokenizer_hash": loader.index.tokenizer_hash}
                            for s, w, loader in zip(self.sources, self.weights, self.loaders)],
                "global_batch": self.global_batch, "consumed_windows": self._next_batch * self.global_batch}

    def location(self) -> str:
        return ", ".join(s.path for s in self.sources)
