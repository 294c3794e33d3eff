"""Per-slot state of the engine: the tick's, kept on the device so the tick can advance it for several ticks in
a row (one graph replay) without the host (which slots are live, where each token is in its pass through the
model, and when a sequence ends), and the host's bookkeeping of the same slots."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

INT_FIELDS = ("token", "pos", "live", "entering", "in_rec", "waiting", "out_len", "budget", "stop", "depth",
              "target", "exit_steps")
FLOAT_FIELDS = ("gate", "temperature", "top_p")


def end_reasons(token, stop, out_len, budget, pos, max_len: int):
    """Why a sequence that just took `token` ends (numpy arrays or tensors alike, so the host and the tick
    decide with one rule): its stop token, its budget of new tokens spent (out_len counts them since
    admission), or its next token's position `pos` being the cache's last (max_len)."""
    return token == stop, out_len >= budget, pos + 1 >= max_len


class SlotTable:
    """The state a tick reads and writes per sequence slot, as rows of one (fields, S + 1) tensor per dtype
    plus the hidden rows h and x, each (S + 1, d), of one (2, S + 1, d) tensor, so that admitting, moving or
    clearing slots is one indexed copy per tensor. Column / row S is scratch: the unused places of a compacted
    batch gather and scatter it.

      token, pos         the slot's newest token (it enters the next tick) and its position
      live               a request holds the slot (the tick clears it when the request ends)
      out_len, budget    tokens generated since admission (the prefill's first included), how many it may
      stop               its stop token id (−1: none)
      entering           its token waits to run embedding + prelude (MoR), the whole stack (vanilla)
      in_rec, depth      MoR: in the recursion, about to run step `depth` (0-based)
      gate, target       MoR: router weight g of that step; token-choice: the depth chosen at step 0
      waiting            MoR: done with the recursion, waits for a coda row
      exit_steps         MoR: recursion steps the waiting token ran
      temperature, top_p sampling parameters (0 = greedy)
      h                  the token's hidden state (prelude output, then after each recursion step)
      x                  MoR token-choice: its recursion's input (the exit combines with it)
    """

    token: Tensor
    pos: Tensor
    live: Tensor
    entering: Tensor
    in_rec: Tensor
    waiting: Tensor
    out_len: Tensor
    budget: Tensor
    stop: Tensor
    depth: Tensor
    target: Tensor
    exit_steps: Tensor
    gate: Tensor
    temperature: Tensor
    top_p: Tensor
    h: Tensor
    x: Tensor

    def __init__(self, slots: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.device = device
        self.ints = torch.zeros(len(INT_FIELDS), slots + 1, dtype=torch.long, device=device)
        self.floats = torch.zeros(len(FLOAT_FIELDS), slots + 1, dtype=torch.float32, device=device)
        self.hidden = torch.zeros(2, slots + 1, hidden_size, dtype=dtype, device=device)
        self.h, self.x = self.hidden
        for name, row in zip(INT_FIELDS + FLOAT_FIELDS, [*self.ints, *self.floats]):
            setattr(self, name, row)

    def _upload(self, *arrays: np.ndarray) -> list[Tensor]:
        """Host int64 arrays, concatenated into one non-blocking copy, split back on the device."""
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64))
        return list(flat.to(self.device, non_blocking=True).split([a.size for a in arrays]))

    def reset(self, slots: np.ndarray, **fields: np.ndarray) -> None:
        """Slots start over: every field 0, the hidden rows kept, except `fields` (name -> one value per
        slot), set in one upload per dtype."""
        ints = np.zeros((len(INT_FIELDS), len(slots)), dtype=np.int64)
        floats = np.zeros((len(FLOAT_FIELDS), len(slots)), dtype=np.float32)
        for name, values in fields.items():
            if name in INT_FIELDS:
                ints[INT_FIELDS.index(name)] = values
            else:
                floats[FLOAT_FIELDS.index(name)] = values
        at, ints_dev, bits = self._upload(slots, ints, floats.view(np.int32).astype(np.int64))
        self.ints[:, at] = ints_dev.view(len(INT_FIELDS), -1)
        self.floats[:, at] = bits.int().view(torch.float32).view(len(FLOAT_FIELDS), -1)

    def clear(self, slots: np.ndarray) -> None:
        """The slots hold nothing: every field 0."""
        (at,) = self._upload(slots)
        self.ints[:, at] = 0
        self.floats[:, at] = 0

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Slots src take the places dst (every field and the hidden rows); src are left empty."""
        src_dev, dst_dev = self._upload(src, dst)
        for table in (self.ints, self.floats):
            table[:, dst_dev] = table[:, src_dev]
            table[:, src_dev] = 0
        self.hidden[:, dst_dev] = self.hidden[:, src_dev]

    def set_live(self, slots: np.ndarray, live: np.ndarray) -> None:
        """The host's decision on the slots' requests (live and entering next tick, or ended)."""
        at, value = self._upload(slots, live)
        self.live[at] = value
        self.entering[at] = value


class HostSlots:
    """The host's per-slot bookkeeping (numpy, so it is vectorised): the request each slot serves and, per slot,
    every array below; `move` carries all of them, so an array added here moves with its slot.

      live          a request holds the slot
      pos           position of the slot's newest token
      admitted_at   admission order (the newest is preempted first)
      out_buf       tokens generated since admission (out_len of them)
      budget, stop  tokens the request may still generate at admission; its stop token (−1: none)
    """

    def __init__(self, slots: int, max_len: int):
        self.requests: list[Any] = [None] * slots
        self.live = np.zeros(slots, dtype=bool)
        self.pos = np.zeros(slots, dtype=np.int64)
        self.admitted_at = np.zeros(slots, dtype=np.int64)
        self.out_buf = np.zeros((slots, max_len), dtype=np.int64)
        self.out_len = np.zeros(slots, dtype=np.int64)
        self.budget = np.zeros(slots, dtype=np.int64)
        self.stop = np.full(slots, -1, dtype=np.int64)

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Slots src take the places dst; src are left free."""
        for array in vars(self).values():
            if isinstance(array, np.ndarray):
                array[dst] = array[src]
        self.live[src] = False
        for a, b in zip(src, dst):
            self.requests[b], self.requests[a] = self.requests[a], None
