"""The decode tick's bookkeeping between its layers, as free functions of tensors: RoPE factors, the circular
scans that compact the prelude / coda rows, the cache appends of a phase, the routing around the shared
block's pass, the tick's report and the end rule. Eagerly each is tens of tiny kernels (~240 of a MoR-4
tick's ~360 at the 360M shape on an H100, benchmarks/inference_h100_2026-11-26.md), which bound the tick at
small batches; on CUDA `TickGlue(compiled=True)` runs the elementwise ones through torch.compile (Inductor), a
few fused kernels apiece; the scan, the appends' commit and the counters stay eager (see below).

Free functions, not methods: a compiled bound method would keep its object (an engine and its KV pool) alive
in Dynamo's cache. Shapes vary with the occupancy bucket, so they compile with dynamic shapes;
every function is shape-static within a call and sync-free (the tick runs inside a CUDA graph)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mor_ds.inference.slot_state import end_reasons
from mor_ds.models.block import rope_rows
from mor_ds.models.mor_math import expert_choice_update, expert_choice_weight, token_choice_exit
from mor_ds.patches import raise_recompile_limit


def compact_rows(idx: Tensor, groups: Tensor, cos: Tensor, sin: Tensor, pos: Tensor,
                 unused: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Inputs of a phase on compacted rows of slots idx (W,) (`unused` = an empty place: no cache write, no
    attention; it reads the last slot's RoPE and position, and its output is scratch): the cache rows
    (J, W) of the phase's groups (J,), the rows' RoPE factors and positions, the write mask (J, W) and
    the attend mask (W,)."""
    valid = idx < unused
    slots = idx.clamp(max=pos.numel() - 1)
    write = valid.expand(groups.numel(), -1)
    return groups[:, None] * unused + slots, cos[slots], sin[slots], pos[slots], write, valid


def plan_appends(lengths: Tensor, tables: Tensor, rows: Tensor, write: Tensor, attend: Tensor,
                 page_size: int) -> tuple[Tensor, Tensor]:
    """A fixed-shape phase's cache appends: rows (J, N) cache rows of J layers × N tokens, at most one token
    per cache row, appended where `write` (J, N). Returns the flat page slot of each append (the trash page
    where not written) and each token's attended length, itself included (0 where `attend` is false). The
    layers write their K/V at the slots; `commit_appends` records them after the layers ran."""
    length = lengths[rows].long()
    page = tables[rows, (length // page_size).clamp_max(tables.shape[1] - 1)].long()
    flat = torch.where(write, page * page_size + length % page_size, 0)
    return flat, torch.where(attend, length + write.long(), 0).int()


def enter_recursion(ent: Tensor, in_rec: Tensor, depth: Tensor, gate: Tensor, target: Tensor, h: Tensor,
                    stack_input: Tensor, logits: Tensor, decision: Tensor, block_rows: Tensor, alpha: float,
                    slots: int, expert_choice: bool, kv_share: bool
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Before the block's pass: tokens entering now (ent, their prelude output in h) start at depth 0.
    Expert choice: logits / decision = step 0's router logit and decision margin (> 0: the token runs
    step 0; otherwise it skips the recursion), g = α·σ(logit). Token choice: logits = g, decision = the
    chosen depth, every token runs step 0, and its recursion input x (stack_input) is its h now. Returns
    (depth, skip, rec = tokens in the block's pass, gate, target, x, their cache rows (J, n) at their own
    depth (KV sharing: depth 0's), the write mask (J, n))."""
    depth = torch.where(ent, 0, depth)
    if expert_choice:
        skip = ent & ~(decision > 0)
        gate = torch.where(ent, expert_choice_weight(logits, alpha), gate)
    else:
        skip = torch.zeros_like(ent)
        gate = torch.where(ent, logits, gate)
        target = torch.where(ent, decision, target)
        stack_input = torch.where(ent[:, None], h, stack_input)
    rec = in_rec | (ent & ~skip)
    rows = block_rows if kv_share else block_rows + depth * slots
    write = (rec & (depth == 0) if kv_share else rec).expand(block_rows.shape[0], -1)
    return depth, skip, rec, gate, target, stack_input, rows, write


def blend(h: Tensor, y: Tensor, gate: Tensor, rec: Tensor, depth: Tensor, target: Tensor, stack_input: Tensor,
          rule: str, scale_output: bool, expert_choice: bool) -> Tensor:
    """The hidden rows after the block's pass: where the token ran it, its output y combined by its router
    weight (router.combine; under token choice only at its last step, with its recursion input), h elsewhere."""
    if scale_output and expert_choice:
        y = expert_choice_update(h, y, gate[:, None], rule)
    elif scale_output:
        y = torch.where((target == depth)[:, None], token_choice_exit(stack_input, h, y, gate[:, None], rule), y)
    return torch.where(rec[:, None], y, h)


def exit_recursion(h: Tensor, rec: Tensor, skip: Tensor, depth: Tensor, gate: Tensor, target: Tensor,
                   stack_input: Tensor, logits: Tensor | None, decisions: Tensor | None, alpha: float,
                   num_recursions: int, expert_choice: bool, state_h: Tensor, state_x: Tensor, state_gate: Tensor,
                   state_target: Tensor, state_depth: Tensor, state_in_rec: Tensor, state_exit_steps: Tensor
                   ) -> Tensor:
    """After the block's pass (h: the blended rows): which tokens go on to their next step (expert choice:
    that step's decision margin > 0, logits / decisions (n, Nr−1) of steps 1…Nr−1; token choice: the
    depth chosen); the rest are done (the skipped ones with 0 steps). Writes the slot table's h, x (token
    choice), gate, target, depth, in_rec and exit_steps; returns the mask of tokens done with their recursion."""
    nxt = depth + 1
    if expert_choice and num_recursions > 1:
        col = (nxt - 1).clamp(max=num_recursions - 2)[:, None]
        cont = rec & (nxt < num_recursions) & (decisions.gather(1, col).squeeze(1) > 0)
        gate = torch.where(cont, expert_choice_weight(logits.gather(1, col).squeeze(1), alpha), gate)
    elif expert_choice:
        cont = torch.zeros_like(rec)
    else:
        cont = rec & (target > depth)
    done = (rec & ~cont) | skip
    state_exit_steps.copy_(torch.where(done, torch.where(skip, 0, nxt), state_exit_steps))
    state_h.copy_(h)
    if not expert_choice:
        state_x.copy_(stack_input)
    state_gate.copy_(gate)
    state_target.copy_(target)
    state_depth.copy_(torch.where(cont, nxt, depth))
    state_in_rec.copy_(cont)
    return done


def report_tick(token: Tensor, served: Tensor, nxt_report: Tensor, steps_report: Tensor, idx: Tensor,
                nxt: Tensor, steps: Tensor, unused: int) -> None:
    """The coda rows' chosen tokens enter next tick (slot table's token); the report's row of this tick
    gets their slots, tokens and recursion steps (places beyond the W rows: `unused`)."""
    token.index_copy_(0, idx, nxt)
    w = idx.numel()
    served[:w].copy_(idx)
    served[w:].fill_(unused)
    nxt_report[:w].copy_(nxt)
    steps_report[:w].copy_(steps)


def advance(pos: Tensor, out_len: Tensor, token: Tensor, stop: Tensor, budget: Tensor, state_live: Tensor,
            state_entering: Tensor, live: Tensor, served: Tensor, entering: Tensor, max_len: int) -> None:
    """After the head: a served slot's sequence took its token at the next position; the request ends
    (`end_reasons`, the host's rule) or the token enters next tick."""
    pos.add_(served.long())
    out_len.add_(served.long())
    stop_token, length, full = end_reasons(token, stop, out_len, budget, pos, max_len)
    ended = served & (stop_token | length | full)
    state_live.copy_(live & ~ended)
    state_entering.copy_(entering | (served & ~ended))


# Always eager (Inductor's versions were slower at an H100's max batch of ~2,350 slots: its scans and
# reductions over the n slots ran 40–300 µs apiece, and an index_copy_ into the cache's position pool copied
# the whole pool): the circular scan, the commit of a phase's appends, the tick's counters.

def take(mask: Tensor, width: int, scan: Tensor, slot_ids: Tensor, unused: int) -> tuple[Tensor, Tensor]:
    """Compact the rows where `mask` (n,) into a fixed width W: the first W of them in a circular scan of
    the slots from `scan` (1,), which moves to the first row left over (so it is first in line next tick; a
    scan left beyond n by a larger bucket restarts at 0). Returns (idx (W,) slot ids, `unused` where a
    place is empty; taken (n,) bool)."""
    start = torch.where(scan < mask.numel(), scan, 0)
    before = torch.cumsum(mask, 0) - mask.long()  # masked rows before each slot
    total = before[-1] + mask[-1]
    rank = before - before.gather(0, start)  # masked rows from `start` up to each slot, circularly
    rank = torch.where(rank < 0, rank + total, rank)
    taken = mask & (rank < width)
    idx = torch.full((width + 1,), unused, dtype=torch.long, device=mask.device)
    idx.scatter_(0, torch.where(taken, rank, width), slot_ids)  # place W collects the rest
    scan.copy_((slot_ids * (mask & (rank == width))).sum(0, keepdim=True))  # 0 if nothing is left
    return idx[:width], taken


def commit_appends(cache_pos: Tensor, lengths: Tensor, rows: Tensor, write: Tensor, flat: Tensor,
                   pos: Tensor) -> None:
    """The appends of `plan_appends` recorded: positions at their slots, each written row one longer."""
    cache_pos.view(-1).index_copy_(0, flat.flatten(), pos.expand_as(flat).flatten().to(torch.int32))
    lengths.index_add_(0, rows.flatten(), write.flatten().to(torch.int32))


def count_waits(counters: Tensor, live: Tensor, entering: Tensor, waiting: Tensor) -> None:
    """Adds the tick's live slots, the tokens still waiting to enter (entering) or to leave (waiting), and
    whether any waited, to `counters`."""
    waits = torch.stack([live.sum(), entering.sum(), waiting.sum()])
    counters[:3] += waits
    counters[3] += (waits[1:].sum() > 0).long()


# compiled variants per function: one per pattern of sizes 1 and of equal sizes among its inputs over the
# occupancy buckets and widths (a few in practice; Dynamo's default limit is 8)
RECOMPILE_LIMIT = 64
GLUE = (rope_rows, compact_rows, plan_appends, enter_recursion, blend, exit_recursion, report_tick, advance)


class TickGlue:
    """The functions in GLUE, eager or each compiled (`torch.compile(dynamic=True, fullgraph=True)`; the
    backend: Inductor on CUDA, or e.g. "aot_eager" to trace them on CPU)."""

    rope_rows: Callable
    compact_rows: Callable
    plan_appends: Callable
    enter_recursion: Callable
    blend: Callable
    exit_recursion: Callable
    report_tick: Callable
    advance: Callable

    def __init__(self, compiled: bool = False, backend: str = "inductor"):
        self.compiled = compiled
        if compiled:  # a function compiles again where a bucket's sizes are 1 or equal (0/1 and duck sizing)
            raise_recompile_limit(RECOMPILE_LIMIT)
        for fn in GLUE:
            setattr(self, fn.__name__,
                    torch.compile(fn, dynamic=True, fullgraph=True, backend=backend) if compiled else fn)
