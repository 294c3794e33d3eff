"""Continuous depth-wise batching: a serving loop with many sequences in flight.

The engine owns `max_slots` (S) sequence slots and one paged KV pool (preallocated once). Each *tick* is
one fixed-shape pass over the first n slots (so it can be captured in a CUDA graph), LM head and greedy
choice of the next token included; n is the smallest occupancy bucket ⌈S·i/16⌉ that holds every live
slot, live slots being kept in a prefix (a slot beyond it moves down between replays: its state and
page tables, not its K/V):

  MoR:    up to W_in tokens that are new this tick run embedding + prelude on compacted rows and take
          the step-0 routing decision; then the shared block runs ONCE over every token in the recursion,
          each at its own depth r (its attention reads its own depth-r cache, or the step-0 cache under KV
          sharing; its router is step r's); up to W_out tokens the router let go (this tick or earlier)
          leave through coda + head on compacted rows, their sequence takes its next token, and that
          token enters in the next tick. A token that runs d steps occupies its slot for max(d, 1) ticks,
          so the shared block always runs on a batch mixing depths 0…Nr−1 instead of shrinking batches
          step after step, and only ~S / E[d] tokens enter and leave per tick: the prelude and coda run at
          the fixed widths W_in, W_out ≈ that flow with headroom, not at S. A token that finds its width
          full waits for the next tick with its state kept (still entering; or done with its recursion,
          waiting for the coda); each width is filled by a circular scan that starts at the first row
          left over last tick, so a waiting row is first in line. Waiting changes no output.
  vanilla / recursive: every live slot runs its whole layer stack and the head each tick.

The tick's per-slot state lives on the device (`SlotTable`): the tick itself advances positions, marks
the token that just took its next token as entering, and ends a request (stop token, budget, max_len), so one
CUDA-graph replay runs `ticks_per_replay` (K) ticks back to back with no host work between them (the
bookkeeping between a tick's layers is `tick_glue`'s free functions, compiled by default with CUDA graphs). Before a
replay the host reserves pages for K appends to every cache row a live slot may write; after it, one
device-to-host copy brings back, per tick, the slots that got a token, the tokens and their recursion steps,
and every cache row's length. The host appends the tokens in tick order (deciding with the tick's own rule,
`end_reasons`, which requests ended), frees the ended requests' pages, admits queued requests into free slots
(a batched eager prefill through the same modules: phase by phase, MoR steps on the rows still in the
recursion, one host sync per call plus one per step), packs the live slots and reserves the next replay's
pages. Sampled requests (temperature > 0) redo head and sampling eagerly after each tick, so while one is
live a replay is a single tick and the host's decision on its end is written back. Admission waits until
`admit_batch` slots are free (or the queue is that short, or nothing is live): a prefill costs about the same
for one prompt as for many (launch-bound), so prefilling one request per replay as slots trickle free would
cost more than the few slot-ticks the wait idles (vLLM's scheduler delay serves the same purpose); when the
pool runs out it preempts the newest sequence and requeues it (its prompt grows by what it generated, so
greedy output is unchanged).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mor_ds.inference.kv_cache import KVCacheFull
from mor_ds.inference.paged_attention import decode_attention
from mor_ds.inference.runner import InferenceModel
from mor_ds.inference.sampling import SamplingParams, sample
from mor_ds.inference.slot_state import HostSlots, SlotTable, end_reasons
from mor_ds.inference.tick_glue import TickGlue, commit_appends, count_waits, take
from mor_ds.models.model import CausalLM


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token: int | None = None
    # filled in by the engine
    id: int = -1
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "max_len"
    preemptions: int = 0


@dataclass
class EngineStats:
    ticks: int = 0
    replays: int = 0  # host round trips: each ran ticks_per_replay ticks (1 while a sampled request is live)
    tokens: int = 0  # generated tokens (prefill's first token included)
    prefill_tokens: int = 0
    prefills: int = 0  # prefill calls (admission batches, split at prefill_rows)
    preemptions: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # wall time of the replays, host work between them included
    replay_device_s: float = 0.0  # of decode_s: the device running the replays (CUDA events; the rest: device idle)
    depth: np.ndarray | None = None  # tokens by number of recursion steps run (MoR)
    # slot-ticks of live slots; MoR's fixed prelude / coda widths: slot-ticks a token waited because W_in / W_out
    # rows were taken, and ticks in which any token waited
    live_slot_ticks: int = 0
    prelude_waits: int = 0
    coda_waits: int = 0
    wait_ticks: int = 0
    # occupancy buckets: slot rows the ticks ran (Σ of each tick's bucket n) and slots moved to keep the
    # live ones in a prefix
    slot_rows: int = 0
    slot_moves: int = 0

    def depth_fractions(self) -> list[float]:
        if self.depth is None or self.depth.sum() == 0:
            return []
        return (self.depth / self.depth.sum()).round(4).tolist()


# headroom of the default prelude / coda widths over the expected flow of tokens per tick
WIDTH_HEADROOM = 1.25
# the tick is built for slot counts S·i/SLOT_BUCKETS, i = 1…SLOT_BUCKETS (occupancy buckets)
SLOT_BUCKETS = 16
# rows per eager prefill call: a call costs ~20 ms of host time (launches) whatever its size at the 360M shape,
# so calls of 8K rows were host-bound on an H100; 32K rows make them device-bound
PREFILL_ROWS = 32768
# ticks per graph replay (at most the page size): the host's work between replays (~1–1.5 ms on an H100 host) is
# paid once per K ticks; MoR-4 decode +7% at 8 against 1 on an H100
TICKS_PER_REPLAY = 8


class Engine:
    def __init__(self, model: CausalLM, *, max_slots: int, max_len: int, num_pages: int | None = None,
                 page_size: int = 16, cuda_graph: bool = False, decode_backend: str = "auto", seed: int = 0,
                 prefill_rows: int = PREFILL_ROWS, admit_batch: int | None = None, prelude_width: int | None = None,
                 coda_width: int | None = None, slot_buckets: int = SLOT_BUCKETS,
                 ticks_per_replay: int | None = None, compile_glue: bool | None = None,
                 count_kv_reads: bool = False):
        """prelude_width / coda_width (MoR: W_in / W_out): rows per tick that run embedding + prelude /
        coda + LM head at the full S slots; default `flow_width(max_slots)`. Vanilla and recursive models
        run every slot. slot_buckets: the tick exists for n = ⌈S·i/slot_buckets⌉ slots (one CUDA graph
        each); live slots are kept in a prefix and each tick runs the smallest n that holds them, so a
        half-empty engine (a draining queue) does not pay GEMMs for its empty slots (1 = always S).
        ticks_per_replay (K, at most page_size; default TICKS_PER_REPLAY or page_size if smaller): ticks
        run back to back between two visits of the host (one graph replay); a request that ends mid-replay
        leaves its slot idle for the rest of it. compile_glue: the tick's bookkeeping between its layers
        (`tick_glue`) compiled with torch.compile, a few fused kernels per function instead of tens (default:
        with cuda_graph; MoR-4 decode +4% at the max batch, +14% at batch 32 on an H100)."""
        self.im = im = InferenceModel(model, decode_backend)
        self.glue = TickGlue(compiled=cuda_graph if compile_glue is None else compile_glue)
        if count_kv_reads:  # cached tokens attended by the decode steps (benchmark's bandwidth floor)
            im.kv_tokens_read = torch.zeros((), dtype=torch.long, device=im.device)
        if num_pages is None:  # the worst case: every cache of every slot full
            num_pages = im.layout.num_groups * max_slots * -(-max_len // page_size) + 1
        self.cache = im.new_cache(max_slots=max_slots, max_len=max_len, num_pages=num_pages, page_size=page_size)
        self.max_slots, self.max_len, self.prefill_rows = max_slots, max_len, prefill_rows
        self.admit_batch = max(1, max_slots // 16) if admit_batch is None else admit_batch
        if self.admit_batch < 1:
            raise ValueError(f"admit_batch={admit_batch}: must be >= 1")
        if ticks_per_replay is None:
            ticks_per_replay = min(TICKS_PER_REPLAY, page_size)
        if not 1 <= ticks_per_replay <= page_size:  # K appends per row then need at most one new page
            raise ValueError(f"ticks_per_replay={ticks_per_replay}: must be in 1..page_size={page_size}")
        self.ticks_per_replay = K = ticks_per_replay
        S = max_slots
        if slot_buckets < 1:
            raise ValueError(f"slot_buckets={slot_buckets}: must be >= 1")
        self.buckets = sorted({math.ceil(S * i / slot_buckets) for i in range(1, slot_buckets + 1)})
        for name, width in (("prelude_width", prelude_width), ("coda_width", coda_width)):
            if im.mor and width is not None and not 1 <= width <= S:
                raise ValueError(f"{name}={width}: must be in 1..max_slots={S}")
        # (W_in, W_out) of the tick over n slots: the flow of n slots, or the widths asked for (at most n)
        self._widths = {n: (self._bucket_width(n, prelude_width), self._bucket_width(n, coda_width))
                        for n in self.buckets}
        self.prelude_width, self.coda_width = self._widths[S]  # the widest (S is the last bucket)
        dev, W = im.device, self.coda_width
        self.slot_ids = torch.arange(S, device=dev)
        # cache groups per layer position (MoR block: depth 0's, the step's depth is added per token)
        self._groups_all = self._groups(list(im.plan.unrolled)) if not im.mor else None
        self._groups_prelude = self._groups([(layer, 0) for layer in im.plan.prelude])
        self._groups_coda = self._groups([(layer, 0) for layer in im.plan.coda])
        self._groups_block = self._groups([(layer, 0) for layer in im.block]) if im.mor else None
        self._rows_block = self._rows(self._groups_block, self.slot_ids) if im.mor else None
        self._write_phases = self._phases_written()
        self._projects = torch.tensor([im.layout.writes(r) for _, r in im.plan.unrolled], device=dev)
        # the tick's state (static buffers: a captured graph reads and writes these)
        self.state = SlotTable(S, model.cfg.hidden_size, im.dtype, dev)
        self._scan_in = torch.zeros(1, dtype=torch.long, device=dev)  # where the next circular scans start
        self._scan_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_hidden = torch.zeros(W, model.cfg.hidden_size, dtype=im.dtype, device=dev)  # coda rows' final norm
        # live slot-ticks, prelude waits, coda waits, ticks with a wait: summed over a replay's ticks
        self.counters = torch.zeros(4, dtype=torch.long, device=dev)
        # what a replay reports (one int32 buffer, one copy): per tick and coda row its slot (S = unused), next
        # token and steps run; the counters; every cache row's length
        layout = {"served": K * W, "next": K * W, "steps": K * W, "counters": 4,
                  "lengths": self.cache.lengths.numel()}
        pin = dev.type == "cuda"
        self.report = torch.zeros(sum(layout.values()), dtype=torch.int32, device=dev)
        self._replay_events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) if pin else ()
        self._report_host = torch.zeros(self.report.numel(), dtype=torch.int32, pin_memory=pin)
        per_tick = {"served", "next", "steps"}
        self._report = {name: part.view(K, W) if name in per_tick else part
                        for name, part in zip(layout, self.report.split(list(layout.values())))}
        self._report_np = {name: part.reshape(K, W) if name in per_tick else part for name, part in
                           zip(layout, np.split(self._report_host.numpy(), np.cumsum(list(layout.values()))[:-1]))}
        self.host = HostSlots(S, max_len)
        self.sampled_live = 0  # live requests that sample (not greedy)
        self.queue: deque[Request] = deque()
        self.finished: list[Request] = []
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.reset_stats()
        self._next_id = 0
        self._admissions = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (slot bucket n, ticks) -> the replay
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture()

    def flow_width(self, slots: int) -> int:
        """Default W_in = W_out: the expected tokens per tick, slots / E[ticks a token holds its slot], with
        WIDTH_HEADROOM. A token of d recursion steps holds its slot max(d, 1) ticks, and E[d] is the sum of
        the capacity schedule (the fraction of tokens reaching each step: (Nr+1)/2 for the paper's
        (Nr−r)/Nr; token-choice balanced over 1…Nr steps gives the same)."""
        im = self.im
        ticks = max(1.0, sum(im.model.router_cfg.capacities(im.num_recursions)))
        return min(slots, math.ceil(round(WIDTH_HEADROOM * slots / ticks, 6)))

    def _bucket_width(self, n: int, width: int | None) -> int:
        if not self.im.mor:
            return n
        return self.flow_width(n) if width is None else min(width, n)

    def _phases_written(self) -> list[tuple[np.ndarray, int]]:
        """The phases whose layers hold the same tokens of a slot, as (their cache groups, group offset):
        vanilla / recursive the whole stack; MoR prelude, coda and the block at each depth r (recursion-wise
        caching: group offset r) or at depth 0 (KV sharing: the only depth that writes)."""
        im = self.im
        if not im.mor:
            return [(np.arange(im.layout.num_groups), 0)]
        block = self._groups_block.cpu().numpy()
        phases = [(self._groups_prelude.cpu().numpy(), 0), (self._groups_coda.cpu().numpy(), 0)]
        phases += [(block, r) for r in range(1 if im.kv_share else im.num_recursions)]
        return [(groups, offset) for groups, offset in phases if len(groups)]

    # ------------------------------------------------------------------ public API

    def add(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("request prompt is empty")
        if request.max_new_tokens < 1:
            raise ValueError(f"request max_new_tokens={request.max_new_tokens}: must be >= 1")
        if len(request.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens does not fit max_len={self.max_len}")
        request.id = self._next_id
        self._next_id += 1
        self.queue.append(request)
        return request

    def reset_stats(self) -> None:
        """Zero the counters (e.g. after a warm-up run)."""
        self.stats = EngineStats(depth=np.zeros(self.im.num_recursions + 1, dtype=np.int64) if self.im.mor else None)
        self.finished.clear()
        if self.im.kv_tokens_read is not None:
            self.im.kv_tokens_read.zero_()

    def has_work(self) -> bool:
        return bool(self.queue) or bool(self.host.live.any())

    def step(self) -> list[Request]:
        """Admit what fits, run one replay of ticks, retire what finished; returns the requests finished now."""
        done_before = len(self.finished)
        self._admit()
        if self.host.live.any():
            t0 = time.perf_counter()
            ticks = 1 if self.sampled_live else self.ticks_per_replay
            n = self._pack_slots()
            self._reserve(ticks)
            if self.report.is_cuda:
                self._replay_events[0].record()
            if (n, ticks) in self.graphs:
                self.graphs[n, ticks].replay()
            else:
                self._replay(n, ticks)
            if self.report.is_cuda:
                self._replay_events[1].record()
            self._after_replay(n, ticks)
            self.stats.decode_s += time.perf_counter() - t0
        return self.finished[done_before:]

    def run(self, requests: list[Request] | None = None) -> list[Request]:
        """Serve `requests` (and anything queued) to completion; returns them in submission order."""
        for r in requests or []:
            self.add(r)
        while self.has_work():
            self.step()
        return list(requests) if requests is not None else self.finished

    # ------------------------------------------------------------------ admission and prefill (eager)

    def _free_slots(self) -> np.ndarray:
        return np.flatnonzero(~self.host.live)

    def _prefill_pages(self, length: int) -> int:
        """Pages a prompt may need in the worst case (every cache of the slot)."""
        return self.im.layout.num_groups * -(-(length + 1) // self.cache.page_size)

    def _admit(self) -> None:
        """Fill free slots from the queue, in prefill calls of up to prefill_rows prompt rows each."""
        free = self._free_slots()
        if self.host.live.any() and len(free) < min(len(self.queue), self.admit_batch):
            return  # wait for a fuller admission batch
        while self.queue and len(free):
            batch: list[tuple[int, Request]] = []
            budget, rows = self.cache.free_pages, 0
            while self.queue and len(batch) < len(free):
                req = self.queue[0]
                length = len(req.prompt) + len(req.output)
                need = self._prefill_pages(length)
                if need > budget or (batch and rows + length > self.prefill_rows):
                    break
                self.queue.popleft()
                budget -= need
                rows += length
                batch.append((free[len(batch)], req))
            if not batch:
                if not self.host.live.any():
                    raise KVCacheFull(f"a prompt of {length} tokens does not fit the KV pool even when empty")
                return
            self._prefill(batch)
            free = free[len(batch):]

    @torch.no_grad()
    def _prefill(self, batch: list[tuple[int, Request]]) -> None:
        """One eager forward over the prompts of `batch` (slot, request) (their generated tokens appended
        after a preemption), first token from the last row of each; one upload of the rows, one of the
        requests' sampling parameters, one sync (the first tokens), one upload of the slots' state."""
        t0 = time.perf_counter()
        dev = self.im.device
        slots = np.array([slot for slot, _ in batch])
        seqs = [np.asarray(req.prompt + req.output, dtype=np.int64) for _, req in batch]
        lengths = np.array([len(seq) for seq in seqs])
        ends = np.cumsum(lengths)
        pos = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
        rows = torch.from_numpy(np.stack([np.concatenate(seqs), pos])).to(dev, non_blocking=True)
        hidden = self.im.forward(self.cache, rows[0], np.repeat(slots, lengths), rows[1])
        params = np.array([(req.sampling.temperature, req.sampling.top_p) for _, req in batch], dtype=np.float32).T
        last = torch.from_numpy(ends - 1).to(dev, non_blocking=True)
        params_dev = torch.from_numpy(params.copy()).to(dev, non_blocking=True)
        first = sample(self.im.logits(hidden[last]), params_dev[0], params_dev[1], self.generator,
                       all_greedy=all(req.sampling.greedy for _, req in batch)).cpu().numpy()
        host = self.host
        for slot, req in batch:
            host.requests[slot] = req
        host.live[slots] = True
        host.admitted_at[slots] = self._admissions + np.arange(len(batch))
        self._admissions += len(batch)
        host.pos[slots] = lengths
        host.out_len[slots] = 0
        host.budget[slots] = [req.max_new_tokens - len(req.output) for _, req in batch]
        host.stop[slots] = [-1 if req.stop_token is None else req.stop_token for _, req in batch]
        self.sampled_live += sum(not req.sampling.greedy for _, req in batch)
        go_on = ~self._record(slots, first)
        self.state.reset(slots, token=first, pos=lengths, live=go_on, entering=go_on, out_len=1,
                         budget=host.budget[slots], stop=host.stop[slots], temperature=params[0], top_p=params[1])
        self.stats.prefill_tokens += int(ends[-1])
        self.stats.prefills += 1
        self.stats.prefill_s += time.perf_counter() - t0

    def _record(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Append one generated token to each slot (its position already moved on) and retire the requests
        that ended (the tick's rule); returns which ended."""
        host = self.host
        host.out_buf[slots, host.out_len[slots]] = tokens
        host.out_len[slots] += 1
        self.stats.tokens += len(slots)
        stop, length, full = end_reasons(tokens, host.stop[slots], host.out_len[slots], host.budget[slots],
                                         host.pos[slots], self.max_len)
        ended = stop | length | full
        for slot, why in zip(slots[ended], np.where(stop[ended], "stop", np.where(length[ended], "length", "max_len"))):
            req = self.host.requests[slot]
            req.finish_reason = str(why)
            self.finished.append(req)
        self._release(slots[ended])
        return ended

    def _release(self, slots: np.ndarray) -> None:
        """Hand the slots' tokens to their requests and free the slots and their pages (all at once); the
        device state is the tick's (it ended them) or the caller's to clear (`_evict`)."""
        for slot in slots:
            req = self.host.requests[slot]
            req.output.extend(self.host.out_buf[slot, :self.host.out_len[slot]].tolist())
            self.sampled_live -= not req.sampling.greedy
            self.host.requests[slot] = None
        self.cache.release(slots)
        self.host.live[slots] = False

    def _evict(self, slots: np.ndarray) -> None:
        """Release live slots whose requests have not ended (their device state is cleared)."""
        self._release(slots)
        self.state.clear(slots)

    def _preempt(self) -> None:
        live = np.nonzero(self.host.live)[0]
        if len(live) <= 1:
            raise KVCacheFull("the KV pool cannot hold even one sequence; raise num_pages or lower max_len")
        victim = int(live[np.argmax(self.host.admitted_at[live])])
        req = self.host.requests[victim]
        req.preemptions += 1
        self.stats.preemptions += 1
        self._evict(np.array([victim]))
        self.queue.appendleft(req)

    # ------------------------------------------------------------------ occupancy buckets

    def _pack_slots(self) -> int:
        """The slot bucket of the next replay: the smallest n that holds every live slot; live slots at or
        beyond n move into free slots below it first (state, caches' page tables: no K/V is copied)."""
        live = np.flatnonzero(self.host.live)
        n = self.buckets[bisect.bisect_left(self.buckets, len(live))]
        if live[-1] >= n:
            src = live[live >= n]
            self._move_slots(src, np.flatnonzero(~self.host.live[:n])[:len(src)])
        return n

    def _move_slots(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Move live slots src to free slots dst: host bookkeeping, page tables and the device state."""
        self.host.move(src, dst)
        self.cache.move_slots(src, dst)
        self.state.move(src, dst)
        self.stats.slot_moves += len(src)

    # ------------------------------------------------------------------ one replay: K ticks

    def _reserve(self, ticks: int) -> None:
        """Pages for `ticks` appends to every cache a live slot may write before the host looks again (a row
        takes at most one token per tick; ticks <= page_size, so at most one page). The layers of one
        phase hold the same tokens of a slot, so which slots need a page is read off the phase's first
        layer, and those slots get one in every layer of the phase."""
        S, cache = self.max_slots, self.cache
        while True:
            live, rows = np.flatnonzero(self.host.live), []
            for groups, offset in self._write_phases:
                first = (groups[0] + offset) * S + live
                need = np.minimum(cache.host_lengths[first] + ticks, self.max_len)
                short = live[cache.page_count(first) * cache.page_size < need]
                rows.append(((groups[:, None] + offset) * S + short).ravel())
            try:
                cache.add_page(np.concatenate(rows))  # a phase's rows are distinct
                return
            except KVCacheFull:
                self._preempt()

    def _pull_report(self) -> dict[str, np.ndarray]:
        self._report_host.copy_(self.report, non_blocking=True)
        if self.report.is_cuda:
            start, end = self._replay_events
            torch.cuda.current_stream(self.report.device).synchronize()
            self.stats.replay_device_s += start.elapsed_time(end) / 1e3
        return self._report_np

    def _after_replay(self, n: int, ticks: int) -> None:
        """One device-to-host copy of what the ticks over slots [0, n) report; their tokens go to their
        sequences tick by tick (sampled requests redo head + sampling eagerly on the tick's final hidden
        rows, and the host's decision on their end goes back to the device)."""
        st, S, rep = self.stats, self.max_slots, self._pull_report()
        st.ticks += ticks
        st.replays += 1
        st.slot_rows += n * ticks
        self.cache.host_lengths[:] = rep["lengths"]
        live_slots, prelude, coda, wait_ticks = rep["counters"].tolist()
        st.live_slot_ticks += live_slots
        st.prelude_waits += prelude
        st.coda_waits += coda
        st.wait_ticks += wait_ticks
        sampled = self.sampled_live > 0  # (then the replay was one tick)
        for served, nxt, steps in zip(rep["served"][:ticks], rep["next"][:ticks], rep["steps"][:ticks]):
            got = served < S
            if st.depth is not None:
                st.depth += np.bincount(steps[got], minlength=len(st.depth))
            slots, tokens = served[got].astype(np.int64), nxt[got].astype(np.int64)
            if not len(slots):
                continue
            if sampled:
                tokens = self._sample_eager(np.flatnonzero(got), slots)
            self.host.pos[slots] += 1
            ended = self._record(slots, tokens)
            if sampled:
                self.state.set_live(slots, ~ended)

    def _sample_eager(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Head + sampling (temperature, top-p) of coda rows `rows` (their slots `slots`), outside the graph."""
        dev, st = self.im.device, self.state
        idx = torch.from_numpy(slots).to(dev)
        nxt = sample(self.im.logits(self.out_hidden[torch.from_numpy(rows).to(dev)]), st.temperature[idx],
                     st.top_p[idx], self.generator)
        st.token[idx] = nxt
        return nxt.cpu().numpy()

    def _groups(self, keys: list[tuple[int, int]]) -> Tensor:
        """(J,) cache groups of the (layer id, step) positions."""
        return torch.tensor([self.im.layout.read_group(layer, r) for layer, r in keys], dtype=torch.long,
                            device=self.im.device)

    def _rows(self, groups: Tensor, slots: Tensor) -> Tensor:
        """(J, N) cache rows of `slots` (N,) in `groups` (J,)."""
        return groups[:, None] * self.max_slots + slots

    def _phase(self, keys: list[tuple[int, int]], rows: Tensor, x: Tensor, rope, write: Tensor,
               attend: Tensor, pos: Tensor, project: list[bool] | None = None) -> Tensor:
        """Run the layers `keys` (layer id, step) in order on rows x (N, d) at positions pos (N,): appends
        planned once, K/V written per layer, lengths committed after (every layer writes distinct cache
        rows)."""
        cache = self.cache
        flat, attend_len = self.glue.plan_appends(cache.lengths, cache.tables, rows, write, attend, cache.page_size)
        if self.im.kv_tokens_read is not None:
            self.im.kv_tokens_read += attend_len.sum()
        backend = self.im.decode_backend
        for j, (layer_id, _) in enumerate(keys):
            writes = project[j] if project is not None else True
            x = self.im.layer_rows(layer_id, x, rope, cache, flat[j] if writes else None,
                                   lambda q, j=j: decode_attention(q, cache, rows[j], attend_len[j], backend))
        commit_appends(cache.pos, cache.lengths, rows, write, flat, pos)
        return x

    def _compact_phase(self, layer_ids: list[int], groups: Tensor, idx: Tensor, x: Tensor, rope, pos: Tensor) -> Tensor:
        """Prelude / coda layers on compacted rows x (W, d) of slots idx (W,) (S = unused place: no cache
        write, no attention, its output is scratch)."""
        if not layer_ids:
            return x
        rows, cos, sin, pos, write, valid = self.glue.compact_rows(idx, groups, *rope, pos, self.max_slots)
        return self._phase([(layer, 0) for layer in layer_ids], rows, x, (cos, sin), write, valid, pos)

    def _head(self, x: Tensor, idx: Tensor, steps: Tensor, tick: int) -> None:
        """Final norm, LM head and greedy choice on the coda rows x (W, d) of slots idx; the chosen tokens
        enter next tick; the report's row `tick` gets slots, tokens and recursion steps (places beyond W:
        no slot)."""
        out, rep = self.out_hidden[:x.shape[0]], self._report
        out.copy_(self.im.model.norm(x))
        nxt = self.im.logits(out).argmax(dim=-1)
        self.glue.report_tick(self.state.token, rep["served"][tick], rep["next"][tick], rep["steps"][tick], idx, nxt,
                              steps, self.max_slots)

    @torch.no_grad()
    def _replay(self, n: int, ticks: int) -> None:
        """`ticks` ticks over slots [0, n), then the report's lengths and counters (what a graph replays)."""
        for tick in range(ticks):
            self._tick(n, tick)
        self._report["lengths"].copy_(self.cache.lengths)
        self._report["counters"].copy_(self.counters)
        self.counters.zero_()

    def _tick(self, n: int, tick: int) -> None:
        """The fixed-shape step over slots [0, n) (every live slot is among them); reads and writes only
        the static buffers."""
        im, S, st = self.im, self.max_slots, self.state
        pos, slot_ids = st.pos[:n], self.slot_ids[:n]
        live, entering = st.live[:n].bool(), st.entering[:n].bool()
        rope = self.glue.rope_rows(pos, im.cfg.head_dim, im.cfg.rope_theta, im.dtype)
        if not im.mor:  # the whole stack and the head, every live slot
            keys = list(im.plan.unrolled)
            project = [im.layout.writes(r) for _, r in keys]
            x = self._phase(keys, self._rows(self._groups_all, slot_ids), im.model.embed(st.token[:n]),
                            rope, self._projects[:, None] & entering, entering, pos, project)
            self._head(x, torch.where(entering, slot_ids, S), torch.zeros_like(pos), tick)
            served, entering, waiting = entering, torch.zeros_like(entering), torch.zeros_like(entering)
        else:
            width_in, width_out = self._widths[n]
            # embedding + prelude on up to W_in entering tokens; the rest keep entering
            idx, admitted = take(entering, width_in, self._scan_in, slot_ids, S)
            x = self._compact_phase(im.plan.prelude, self._groups_prelude, idx, im.model.embed(st.token[idx]),
                                    rope, pos)
            st.h.index_copy_(0, idx, x)
            entering = entering & ~admitted
            ready = st.waiting[:n].bool() | self._recursion_tick(admitted, st.in_rec[:n].bool(), rope, pos)
            # coda + head on up to W_out tokens done with their recursion (now or in an earlier tick)
            idx, served = take(ready, width_out, self._scan_out, slot_ids, S)
            x = self._compact_phase(im.plan.coda, self._groups_coda, idx, st.h[idx], rope, pos)
            self._head(x, idx, st.exit_steps[idx], tick)
            waiting = ready & ~served
            st.waiting[:n].copy_(waiting)
        self._advance(n, live, served, entering, waiting)

    def _advance(self, n: int, live: Tensor, served: Tensor, entering: Tensor, waiting: Tensor) -> None:
        """After the head: served slots take their token, ended requests leave (`tick_glue.advance`)."""
        st = self.state
        self.glue.advance(st.pos[:n], st.out_len[:n], st.token[:n], st.stop[:n], st.budget[:n], st.live[:n],
                          st.entering[:n], live, served, entering, self.max_len)
        count_waits(self.counters, live, entering, waiting)

    def _recursion_tick(self, ent: Tensor, in_rec: Tensor, rope, pos: Tensor) -> Tensor:
        """One shared-block pass over the tokens in the recursion (ent: tokens entering it now, their
        prelude output in h), each at its own depth: its depth-r cache (recursion-wise caching) or the
        step-0 cache (KV sharing, written at r = 0 only), its step's router; returns the mask of tokens
        done with their recursion this tick."""
        im, nr, n, st, glue = self.im, self.im.num_recursions, ent.numel(), self.state, self.glue
        h = st.h[:n]
        alpha = im.model.router_cfg.alpha
        if im.expert_choice:  # step 0's router: weight logit, decision margin
            weight, decision = im.router_logits(h, 0)
        else:  # token choice: the depth chosen and the router weight g
            decision, weight = im.token_choice_depth(h)
        depth, skip, rec, gate, target, x, rows, write = glue.enter_recursion(
            ent, in_rec, st.depth[:n], st.gate[:n], st.target[:n], h, st.x[:n], weight, decision,
            self._rows_block[:, :n], alpha, self.max_slots, im.expert_choice, im.kv_share)
        y = self._phase([(layer, 0) for layer in im.block], rows, h, rope, write, rec, pos)
        h = glue.blend(h, y, gate, rec, depth, target, x, im.rule, im.scale_output, im.expert_choice)
        logits = decisions = None
        if im.expert_choice and nr > 1:  # steps 1…Nr−1's routers on the updated rows
            logits, decisions = (torch.stack(t, 1) for t in zip(*(im.router_logits(h, r) for r in range(1, nr))))
        return glue.exit_recursion(h, rec, skip, depth, gate, target, x, logits, decisions, alpha, nr,
                                   im.expert_choice, st.h[:n], st.x[:n], st.gate[:n], st.target[:n], st.depth[:n],
                                   st.in_rec[:n], st.exit_steps[:n])

    def _capture(self) -> None:
        """Capture the replay of every slot bucket, of ticks_per_replay ticks and of one (while a sampled
        request is live), in CUDA graphs (state is empty now: every mask is false, nothing is written).
        The graphs share one memory pool: they never run at once and no tensor of one outlives its replay
        (a tick's results land in the static buffers)."""
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.buckets):  # the largest first: its temporaries size the shared pool
            for ticks in sorted({self.ticks_per_replay, 1}, reverse=True):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self._replay(n, ticks)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._replay(n, ticks)
                self.graphs[n, ticks] = graph
