"""Paged KV memory for generation: one preallocated pool of pages shared by every cache of the model.

A *cache* is the K/V history of one unrolled attention position for one sequence slot. Which unrolled
positions own a cache is the model's `CacheLayout`:
  prelude / coda layers and vanilla layers: one cache each;
  recursion-wise KV caching (kv_mode "cache"): one cache per (shared layer, recursion step r) — the
      depth-r cache of a sequence holds only its tokens that reached step r, so it fills more slowly;
  recursive KV sharing (kv_mode "share"): one cache per shared layer, written at r = 0 and read at r >= 1.
Pages are handed out on demand from a free list, so memory follows what each depth really holds
(the paper's ≈ (Nr+1)/(2Nr) of vanilla for recursion-wise caching) instead of a worst case.

Device tensors (fixed after construction, so a decode step can be captured in a CUDA graph):
  k, v     (num_pages, page_size, Hkv, head_dim)  keys after RoPE and values; page 0 is a trash page
           that masked writes land in and that no table row ever reads
  pos      (num_pages, page_size) original positions of the cached tokens (prefill masks)
  tables   (num_groups·max_slots, pages_per_seq) int32 page ids; row `group·max_slots + slot`
  lengths  (num_groups·max_slots,) int32 cached tokens per row
The host keeps the free list, each row's page list and a mirror of `lengths` for allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mor_ds.models.sharing import LayerPlan


class KVCacheFull(RuntimeError):
    """The page pool has no free page left (the engine preempts a sequence when it sees this)."""


@dataclass(frozen=True)
class CacheLayout:
    """Which cache group each (layer id, recursion step) reads and writes."""

    num_groups: int
    groups: dict[tuple[int, int], int]  # (layer id, step) -> group that owns its K/V
    kv_share: bool

    @staticmethod
    def for_plan(plan: LayerPlan, kv_share: bool) -> "CacheLayout":
        owners = [(i, 0) for i in plan.prelude] + [(i, 0) for i in plan.coda]
        owners += sorted({(i, 0 if kv_share else r) for i, r in plan.recursive_part})  # (l, 0..Nr−1) contiguous
        return CacheLayout(len(owners), {key: g for g, key in enumerate(owners)}, kv_share)

    def read_group(self, layer_id: int, step: int) -> int:
        """Under KV sharing, step r >= 1 attends to the K/V that step 0 of the same layer wrote."""
        return self.groups[(layer_id, 0 if self.kv_share else step)]

    def writes(self, step: int) -> bool:
        return not (self.kv_share and step > 0)


class PagedKVCache:
    def __init__(self, layout: CacheLayout, *, max_slots: int, max_len: int, num_pages: int, page_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: need at least 2 (page 0 is the trash page)")
        self.layout, self.max_slots, self.max_len, self.page_size = layout, max_slots, max_len, page_size
        self.pages_per_seq = -(-max_len // page_size)
        rows = layout.num_groups * max_slots
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(num_pages, page_size, dtype=torch.int32, device=device)
        self.tables = torch.zeros(rows, self.pages_per_seq, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=device)
        self.host_lengths = np.zeros(rows, dtype=np.int32)  # the dtype of `lengths`: a tick's report copies in
        # host mirror of the page tables, pages in use per row, and a stack of free pages (its top at the end)
        self._tables = np.zeros((rows, self.pages_per_seq), dtype=np.int32)
        self._page_count = np.zeros(rows, dtype=np.int64)
        self._free = np.arange(num_pages - 1, 0, -1, dtype=np.int32)
        self._free_top = num_pages - 1

    # ---------------------------------------------------------------- bookkeeping (host)

    @staticmethod
    def bytes_per_token(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token in one cache (plus its int32 position)."""
        return 2 * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8 + 4

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def free_pages(self) -> int:
        return self._free_top

    def page_count(self, rows: np.ndarray) -> np.ndarray:
        """Pages each cache row holds."""
        return self._page_count[rows]

    def row(self, group: int, slot: int) -> int:
        return group * self.max_slots + slot

    def reserve(self, rows: np.ndarray, extra: np.ndarray | int = 1) -> None:
        """Make sure each cache row in `rows` has room for `extra` more tokens (allocating pages).

        Raises KVCacheFull (nothing is allocated for the rows that did not fit) or ValueError when a
        sequence would outgrow max_len."""
        rows = np.asarray(rows, dtype=np.int64)
        need = self.host_lengths[rows] + extra
        if need.size and need.max() > self.max_len:
            raise ValueError(f"sequence needs {int(need.max())} cached tokens, more than max_len={self.max_len}")
        missing = -(-need // self.page_size) - self._page_count[rows]
        todo = missing > 0
        if not todo.any():
            return
        rows, missing = rows[todo], missing[todo]
        pages = self._pop(int(missing.sum()))
        # row i gets pages at table columns page_count[i], page_count[i] + 1, …
        owner = np.repeat(rows, missing)
        column = np.arange(len(pages)) - np.repeat(np.cumsum(missing) - missing, missing) + self._page_count[owner]
        self._page_count[rows] += missing
        self._set_tables(owner, column, pages)

    def add_page(self, rows: np.ndarray) -> None:
        """One more page for each cache row in `rows` (distinct rows; a tick's appends to full pages)."""
        pages = self._pop(len(rows))
        column = self._page_count[rows]
        self._page_count[rows] += 1
        self._set_tables(rows, column, pages)

    def _pop(self, count: int) -> np.ndarray:
        if count > self._free_top:
            raise KVCacheFull(f"KV pool exhausted: {self.num_pages - 1} pages of {self.page_size} tokens")
        pages = self._free[self._free_top - count:self._free_top][::-1]  # the stack's top first
        self._free_top -= count
        return pages

    def _set_tables(self, rows: np.ndarray, column: np.ndarray, pages: np.ndarray) -> None:
        """Page table entries (rows, column) = pages, on the host and (one upload, no sync) the device."""
        self._tables[rows, column] = pages
        update = torch.from_numpy(np.stack([rows * self.pages_per_seq + column, pages])).to(self.tables.device,
                                                                                            non_blocking=True)
        self.tables.view(-1)[update[0]] = update[1].int()

    def release(self, slots: np.ndarray | int) -> None:
        """Free every page of the slots (all groups) and empty their caches."""
        rows = self._slot_rows(np.atleast_1d(slots))
        if not len(rows):
            return
        freed = self._tables[rows][np.arange(self.pages_per_seq)[None, :] < self._page_count[rows][:, None]]
        self._free[self._free_top:self._free_top + len(freed)] = freed[::-1]  # each row's first page on top
        self._free_top += len(freed)
        self._page_count[rows] = 0
        self.host_lengths[rows] = 0
        self.lengths[torch.from_numpy(rows).to(self.lengths.device, non_blocking=True)] = 0

    def _slot_rows(self, slots: np.ndarray) -> np.ndarray:
        """Cache rows of `slots` in every group, group-major."""
        return (np.arange(self.layout.num_groups)[:, None] * self.max_slots + slots).ravel()

    def move_slots(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Hand every cache of slots src (all groups) to the empty slots dst: page lists, lengths and
        table rows move, the pages and their K/V stay where they are; src is left empty."""
        src_rows, dst_rows = self._slot_rows(src), self._slot_rows(dst)
        for host in (self._tables, self._page_count, self.host_lengths):
            host[dst_rows] = host[src_rows]
        self._page_count[src_rows] = 0
        self.host_lengths[src_rows] = 0
        rows = torch.from_numpy(np.concatenate([src_rows, dst_rows])).to(self.tables.device, non_blocking=True)
        src_dev, dst_dev = rows.split(len(src_rows))
        self.tables[dst_dev] = self.tables[src_dev]
        self.lengths[dst_dev] = self.lengths[src_dev]
        self.lengths[src_dev] = 0

    # ---------------------------------------------------------------- device ops (graph-safe)

    def append_slots(self, rows: Tensor, pos: Tensor, rank: Tensor | None = None) -> Tensor:
        """Eager appends of one phase: N tokens at positions pos (N,) to cache rows (J, N) of J layers that
        hold the same tokens of each slot, several tokens of one row in the order given; rank (N,) is each
        token's index among the tokens of its row (None: at most one per row). Pages must have been
        reserved. Records the positions and lengths now and returns each append's flat page slot (J, N),
        where the layer writes its K/V (`write_at` or the fused RoPE + K/V write) before it attends."""
        offset = self.lengths[rows].long() + (rank if rank is not None else 0)
        page = self.tables.view(-1)[rows * self.pages_per_seq + offset // self.page_size].long()
        flat = page * self.page_size + offset % self.page_size
        self.pos.view(-1).index_copy_(0, flat.flatten(), pos.to(torch.int32).expand_as(flat).flatten())
        self.lengths.index_add_(0, rows.flatten(), torch.ones_like(rows.flatten(), dtype=torch.int32))
        return flat

    def write_at(self, flat: Tensor, k: Tensor, v: Tensor) -> None:
        self.k.view(-1, *self.k.shape[2:]).index_copy_(0, flat, k.to(self.k.dtype))
        self.v.view(-1, *self.v.shape[2:]).index_copy_(0, flat, v.to(self.v.dtype))
