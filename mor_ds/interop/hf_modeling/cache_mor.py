"""The KV cache of an exported recursive / Mixture-of-Recursions model, in transformers' `Cache` API.

Its semantics are mor-ds's inference (mor_ds/inference/kv_cache.py, runner.py): one cache *group* per
  prelude / coda layer;
  (shared layer, recursion step r) under recursion-wise caching (kv_mode "cache"): the depth-r cache of a sequence
      holds only its tokens that reached step r;
  shared layer under recursive KV sharing (kv_mode "share"): written at step 0, read by every step, written by none
      after it.
A recursive (non-MoR) model runs every token at every unrolled position, so each of its groups holds every token.

A group keeps, per batch row, its tokens packed in the order they came (which is position order) together with
their original positions, so attention stays causal by position whatever a row skipped; padding never enters.
Torch only: the exported directory loads without mor-ds.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

_GROWTH = 64  # capacity is grown to a multiple of this many tokens (and at least doubled): amortised O(1) appends


class MoRCacheLayer:
    """One cache group. keys / values (B, Hkv, C + 1, D) and positions (B, C + 1), column C a trash slot that
    padded slots of an append land in and no read reaches; lengths (B,) tokens held per row, on the device and
    (host_lengths) on the host, so that reads are sliced and capacity grown without a device sync."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.positions: Tensor | None = None
        self.lengths: Tensor | None = None
        self.host_lengths: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2] - 1

    def is_empty(self, host_rows: Tensor) -> bool:
        return self.host_lengths is None or int(self.host_lengths[host_rows].max()) == 0

    def _reserve(self, batch: int, need: int, like: Tensor) -> None:
        """Room for `need` tokens per row; like: new keys (…, Hkv, D) giving heads, head size, dtype and device."""
        if need <= self.capacity:
            return
        cap = -(-max(need, 2 * self.capacity) // _GROWTH) * _GROWTH
        heads, dim = like.shape[-2:]
        keys = like.new_zeros(batch, heads, cap + 1, dim)
        values = like.new_zeros(batch, heads, cap + 1, dim)
        positions = torch.zeros(batch, cap + 1, dtype=torch.long, device=like.device)
        if self.keys is not None:
            old = self.capacity
            keys[:, :, :old], values[:, :, :old], positions[:, :old] = (
                self.keys[:, :, :old], self.values[:, :, :old], self.positions[:, :old])
        self.keys, self.values, self.positions = keys, values, positions

    def append(self, tokens, k: Tensor, v: Tensor) -> None:
        """Append the real slots of `tokens` (a modeling_mor.TokenSet: R rows of K slots) with their K/V
        (R, K, Hkv, D) after the tokens each row holds."""
        if self.lengths is None:
            self.lengths = torch.zeros(tokens.batch, dtype=torch.long, device=k.device)
            self.host_lengths = torch.zeros(tokens.batch, dtype=torch.long)
        self._reserve(tokens.batch, int((self.host_lengths[tokens.host_rows] + tokens.host_counts).max()), k)
        rows = tokens.rows[:, None]
        slot = self.lengths[rows] + tokens.rank
        if tokens.valid is not None:
            slot = torch.where(tokens.valid, slot, self.capacity)
        self.keys[rows, :, slot] = k.to(self.keys.dtype)
        self.values[rows, :, slot] = v.to(self.values.dtype)
        self.positions[rows, slot] = tokens.pos
        self.lengths[tokens.rows] += tokens.counts
        self.host_lengths[tokens.host_rows] += tokens.host_counts

    def read(self, tokens) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(keys, values (R, Hkv, L, D), positions (R, L), lengths (R,)) of the rows of `tokens`, L the longest."""
        width = int(self.host_lengths[tokens.host_rows].max())
        if tokens.all_rows:
            return (self.keys[:, :, :width], self.values[:, :, :width], self.positions[:, :width], self.lengths)
        rows = tokens.rows
        return (self.keys[rows, :, :width], self.values[rows, :, :width], self.positions[rows, :width],
                self.lengths[rows])

    def select_rows(self, index: Tensor) -> None:
        """Keep batch rows `index` (in that order, repeats allowed): beam search's reordering and expansion."""
        if self.keys is None:
            return
        index = index.to(self.keys.device)
        self.keys, self.values, self.positions, self.lengths = (
            t.index_select(0, index) for t in (self.keys, self.values, self.positions, self.lengths))
        self.host_lengths = self.host_lengths.index_select(0, index.cpu())

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.lengths is not None:
            self.select_rows(torch.arange(self.lengths.shape[0]).repeat_interleave(repeats))

    def reset(self) -> None:
        self.__init__()


def cache_groups(config) -> list[tuple[int, int]]:
    """The (layer id, recursion step) owning each cache group of a MoRConfig; unique layers have step 0."""
    share = config.kv_mode == "share"
    recursive = sorted({(layer, 0 if share else step) for layer, step in config.recursive_part})
    return [(layer, 0) for layer in config.prelude] + recursive + [(layer, 0) for layer in config.coda]


class MoRCache(Cache):
    """Every cache group of a model (MoRCacheLayer each, in `layers`), plus per batch row how many real tokens it has
    seen (the next token's position) and how many input columns, padding included, have gone in: what `generate()`
    calls the sequence length."""

    def __init__(self, config) -> None:
        groups = cache_groups(config)
        super().__init__(layers=[MoRCacheLayer() for _ in groups])
        self._group = {key: i for i, key in enumerate(groups)}
        self.kv_share = config.family != "vanilla" and config.kv_mode == "share"
        self.columns = 0
        self.seen: Tensor | None = None  # (B,) real tokens per row

    def group(self, layer_id: int, step: int) -> MoRCacheLayer:
        """The group (layer id, step) reads: under KV sharing, step r ≥ 1 reads what step 0 of the layer wrote."""
        return self.layers[self._group[(layer_id, 0 if self.kv_share else step)]]

    def writes(self, step: int) -> bool:
        return not (self.kv_share and step > 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def next_positions(self, real: Tensor) -> Tensor:
        """Original positions of new input columns (B, S) whose real tokens are `real` (left or right padding
        allowed; a padded column gets its neighbour's position, never used), and count them as seen."""
        batch = real.shape[0]
        if self.seen is None:
            self.seen = torch.zeros(batch, dtype=torch.long, device=real.device)
        elif self.seen.shape[0] != batch:
            raise ValueError(f"the cache holds {self.seen.shape[0]} sequences but the input has {batch} rows")
        pos = (self.seen[:, None] + real.long().cumsum(1) - 1).clamp_min(0)
        self.seen = self.seen + real.sum(1)
        self.columns += real.shape[1]
        return pos

    def _select_rows(self, index: Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index.to(self.seen.device))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.seen is not None:
            self._select_rows(torch.arange(self.seen.shape[0]).repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.columns, self.seen = 0, None
