"""Continuous depth-wise batching: a serving loop with many sequences in flight.

The engine owns `max_slots` (S) sequence slots and one paged KV pool (preallocated once). Each *tick* is
one fixed-shape pass over the first n slots (so it can be captured in a CUDA graph), LM head and greedy
choice of the next token included; n is the smallest occupancy bucket ⌈S·i/16⌉ that holds every live
slot, live slots being kept in a prefix (a slot beyond it moves down between ticks: its state and page
tables, not its K/V):

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

After a tick one device-to-host copy brings back the slots that got a token, the tokens, the recursion
state and the cache lengths (sampled requests — temperature > 0 — redo head and sampling eagerly on the
tick's final hidden rows). Between ticks the host appends the tokens, retires finished requests (freeing
their pages), admits queued requests into free slots (a batched eager prefill through the same modules:
phase by phase, MoR steps on the rows still in the recursion, one host sync per call plus one per step),
reserves pages for the next tick and uploads the slots' positions and states in one copy. Admission
waits until `admit_batch` slots are free (or the queue is that short, or nothing is live): a prefill
costs about the same for one prompt as for many (launch-bound), so prefilling one request per tick as
slots trickle free would cost more than the few slot-ticks the wait idles (vLLM's scheduler delay serves
the same purpose); when the pool runs out it preempts the newest sequence and requeues it (its prompt
grows by what it generated, so greedy output is unchanged).
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
    tokens: int = 0  # generated tokens (prefill's first token included)
    prefill_tokens: int = 0
    prefills: int = 0  # prefill calls (admission batches, split at prefill_rows)
    preemptions: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # wall time of the ticks, host work between them included
    device_wait_s: float = 0.0  # of decode_s: blocked on the tick's report (the rest is host time, device idle)
    depth: np.ndarray | None = None  # tokens by number of recursion steps run (MoR)
    # MoR's fixed prelude / coda widths: row-ticks a token waited because W_in / W_out rows were taken,
    # and ticks in which any token waited
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
# so calls of 8K rows were host-bound on an H100; 32K rows make them device-bound (BENCHMARKS.md, session 5)
PREFILL_ROWS = 32768


class Engine:
    def __init__(self, model: CausalLM, *, max_slots: int, max_len: int, num_pages: int | None = None,
                 page_size: int = 16, cuda_graph: bool = False, decode_backend: str = "auto", seed: int = 0,
                 prefill_rows: int = PREFILL_ROWS, admit_batch: int | None = None, prelude_width: int | None = None,
                 coda_width: int | None = None, slot_buckets: int = SLOT_BUCKETS, count_kv_reads: bool = False):
        """prelude_width / coda_width (MoR: W_in / W_out): rows per tick that run embedding + prelude /
        coda + LM head at the full S slots; default `flow_width(max_slots)`. Vanilla and recursive models
        run every slot. slot_buckets: the tick exists for n = ⌈S·i/slot_buckets⌉ slots (one CUDA graph
        each); live slots are kept in a prefix and each tick runs the smallest n that holds them, so a
        half-empty engine (a draining queue) does not pay GEMMs for its empty slots (1 = always S)."""
        self.im = im = InferenceModel(model, decode_backend)
        if count_kv_reads:  # cached tokens attended by the decode steps (benchmark's bandwidth floor)
            im.kv_tokens_read = torch.zeros((), dtype=torch.long, device=im.device)
        if num_pages is None:  # the worst case: every cache of every slot full
            num_pages = im.layout.num_groups * max_slots * -(-max_len // page_size) + 1
        self.cache = im.new_cache(max_slots=max_slots, max_len=max_len, num_pages=num_pages, page_size=page_size)
        self.max_slots, self.max_len, self.prefill_rows = max_slots, max_len, prefill_rows
        self.admit_batch = max(1, max_slots // 16) if admit_batch is None else admit_batch
        if self.admit_batch < 1:
            raise ValueError(f"admit_batch={admit_batch}: must be >= 1")
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
        dev, d, W = im.device, model.cfg.hidden_size, self.coda_width
        self.slot_ids = torch.arange(S, device=dev)
        # cache groups per layer position (MoR block: depth 0's, the step's depth is added per token)
        self._groups_all = self._groups(list(im.plan.unrolled)) if not im.mor else None
        self._groups_prelude = self._groups([(l, 0) for l in im.plan.prelude])
        self._groups_coda = self._groups([(l, 0) for l in im.plan.coda])
        self._rows_block = self._rows(self._groups([(l, 0) for l in im.block]), self.slot_ids) if im.mor else None
        self._host_groups = {"all": np.arange(im.layout.num_groups), "prelude": self._groups_prelude.cpu().numpy(),
                             "coda": self._groups_coda.cpu().numpy(),
                             "block": self._groups([(l, 0) for l in im.block]).cpu().numpy() if im.mor else None}
        self._projects = torch.tensor([im.layout.writes(r) for _, r in im.plan.unrolled], device=dev)
        # device state of the fixed-shape tick (static buffers: a captured graph reads and writes these).
        # Row S of `tokens` and `h` is scratch: the unused places of a compacted batch gather and scatter it.
        pin = dev.type == "cuda"
        self._upload_host = torch.zeros(4, S, dtype=torch.long, pin_memory=pin)  # see _upload_host_state
        self.upload = torch.zeros(4, S, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(S + 1, dtype=torch.long, device=dev)
        self.h = torch.zeros(S + 1, d, dtype=im.dtype, device=dev)
        self.depth = torch.zeros(S, dtype=torch.long, device=dev)
        self.target = torch.zeros(S, dtype=torch.long, device=dev)  # token-choice depth
        self.gate = torch.zeros(S, dtype=torch.float32, device=dev)  # router weight g of the pending step
        self.exit_steps = torch.zeros(S, dtype=torch.long, device=dev)  # steps run by a token done with them
        self._scan_in = torch.zeros(1, dtype=torch.long, device=dev)  # where the next circular scans start
        self._scan_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_hidden = torch.zeros(W, d, dtype=im.dtype, device=dev)  # final norm of the coda rows
        # what a tick reports (one int32 buffer, one copy): per slot still entering, in the recursion,
        # depth; per coda row its slot (S = unused), next token and steps run; every cache row's length
        layout = {"entering": S, "in_rec": S, "depth": S, "served": W, "next": W, "steps": W,
                  "lengths": self.cache.lengths.numel()}
        self.report = torch.zeros(sum(layout.values()), dtype=torch.int32, device=dev)
        self._report_host = torch.zeros(self.report.numel(), dtype=torch.int32, pin_memory=pin)
        self._report = dict(zip(layout, self.report.split(list(layout.values()))))
        self._report_np = dict(zip(layout, np.split(self._report_host.numpy(), np.cumsum(list(layout.values()))[:-1])))
        self.temperature = torch.zeros(S, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(S, dtype=torch.float32, device=dev)
        # host state (numpy per slot, so a tick's bookkeeping is vectorised)
        self.slots: list[Request | None] = [None] * S
        self.live = np.zeros(S, dtype=bool)
        self.pos_host = np.zeros(S, dtype=np.int64)  # position of the slot's newest (unprocessed) token
        self.entering_host = np.zeros(S, dtype=bool)
        self.depth_host = np.zeros(S, dtype=np.int64)
        self.in_rec_host = np.zeros(S, dtype=bool)
        self.admitted_at = np.zeros(S, dtype=np.int64)
        self.out_buf = np.zeros((S, max_len), dtype=np.int64)  # tokens generated since admission
        self.out_len = np.zeros(S, dtype=np.int64)
        self.budget = np.zeros(S, dtype=np.int64)  # tokens the request may still generate at admission
        self.stop_host = np.full(S, -1, dtype=np.int64)
        self.sampled_live = 0  # live requests that sample (not greedy)
        self.queue: deque[Request] = deque()
        self.finished: list[Request] = []
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.reset_stats()
        self._next_id = 0
        self._admissions = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # slot bucket n -> the captured tick
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
        return bool(self.queue) or bool(self.live.any())

    def step(self) -> list[Request]:
        """Admit what fits, run one tick, retire what finished; returns the requests finished now."""
        done_before = len(self.finished)
        self._admit()
        if self.live.any():
            t0 = time.perf_counter()
            n = self._pack_slots()
            self._reserve_tick()
            self._upload_host_state()
            if n in self.graphs:
                self.graphs[n].replay()
            else:
                self._tick(n)
            self._after_tick(n)
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
        return np.flatnonzero(~self.live)

    def _prefill_pages(self, length: int) -> int:
        """Pages a prompt may need in the worst case (every cache of the slot)."""
        return self.im.layout.num_groups * -(-(length + 1) // self.cache.page_size)

    def _admit(self) -> None:
        free = self._free_slots()
        if self.live.any() and len(free) < min(len(self.queue), self.admit_batch):
            return  # wait for a fuller admission batch
        batch: list[tuple[int, Request]] = []
        budget = self.cache.free_pages
        rows = 0
        while self.queue and len(batch) < len(free):
            req = self.queue[0]
            length = len(req.prompt) + len(req.output)
            need = self._prefill_pages(length)
            if need > budget or (batch and rows + length > self.prefill_rows):
                if not batch and not self.live.any():
                    raise KVCacheFull(f"a prompt of {length} tokens does not fit the KV pool even when empty")
                break
            self.queue.popleft()
            budget -= need
            rows += length
            batch.append((free[len(batch)], req))
        if batch:
            self._prefill(batch)

    @torch.no_grad()
    def _prefill(self, batch: list[tuple[int, Request]]) -> None:
        """One eager forward over the prompts of `batch` (slot, request) (their generated tokens appended
        after a preemption), first token from the last row of each; one upload of the rows, one of the
        requests' sampling parameters, one sync (the first tokens)."""
        t0 = time.perf_counter()
        dev = self.im.device
        slots = np.array([slot for slot, _ in batch])
        seqs = [np.asarray(req.prompt + req.output, dtype=np.int64) for _, req in batch]
        lengths = np.array([len(seq) for seq in seqs])
        ends = np.cumsum(lengths)
        pos = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
        rows = torch.from_numpy(np.stack([np.concatenate(seqs), pos])).to(dev, non_blocking=True)
        hidden = self.im.forward(self.cache, rows[0], np.repeat(slots, lengths), rows[1])
        params = np.array([(req.sampling.temperature, req.sampling.top_p) for _, req in batch], dtype=np.float32)
        at = torch.from_numpy(np.concatenate([slots, ends - 1])).to(dev, non_blocking=True)
        slot_ids, last = at.split(len(batch))
        params = torch.from_numpy(params.T.copy()).to(dev, non_blocking=True)
        self.temperature[slot_ids], self.top_p[slot_ids] = params[0], params[1]
        first_dev = sample(self.im.logits(hidden[last]), params[0], params[1], self.generator,
                           all_greedy=all(req.sampling.greedy for _, req in batch))
        self.tokens[slot_ids] = first_dev
        first = first_dev.cpu().numpy()
        for slot, req in batch:
            self.slots[slot] = req
        self.live[slots] = True
        self.admitted_at[slots] = self._admissions + np.arange(len(batch))
        self._admissions += len(batch)
        self.pos_host[slots] = lengths
        self.out_len[slots] = 0
        self.budget[slots] = [req.max_new_tokens - len(req.output) for _, req in batch]
        self.stop_host[slots] = [-1 if req.stop_token is None else req.stop_token for _, req in batch]
        self.sampled_live += sum(not req.sampling.greedy for _, req in batch)
        self.in_rec_host[slots] = False
        self.depth_host[slots] = 0
        self._record(slots, first)
        self.stats.prefill_tokens += int(ends[-1])
        self.stats.prefills += 1
        self.stats.prefill_s += time.perf_counter() - t0

    def _record(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Append one generated token to each slot; retire finished requests, the rest enter next tick."""
        self.out_buf[slots, self.out_len[slots]] = tokens
        self.out_len[slots] += 1
        self.stats.tokens += len(slots)
        stop = tokens == self.stop_host[slots]
        length = self.out_len[slots] >= self.budget[slots]
        full = self.pos_host[slots] + 1 >= self.max_len
        done = stop | length | full
        self.entering_host[slots[~done]] = True
        for slot, why in zip(slots[done], np.where(stop[done], "stop", np.where(length[done], "length", "max_len"))):
            req = self.slots[slot]
            req.finish_reason = str(why)
            self.finished.append(req)
        self._release(slots[done])

    def _release(self, slots: np.ndarray) -> None:
        """Hand the slots' tokens to their requests and free the slots and their pages (all at once)."""
        for slot in slots:
            req = self.slots[slot]
            req.output.extend(self.out_buf[slot, :self.out_len[slot]].tolist())
            self.sampled_live -= not req.sampling.greedy
            self.slots[slot] = None
        self.cache.release(slots)
        self.live[slots] = False
        self.entering_host[slots] = False
        self.in_rec_host[slots] = False

    def _preempt(self) -> None:
        live = np.nonzero(self.live)[0]
        if len(live) <= 1:
            raise KVCacheFull("the KV pool cannot hold even one sequence; raise num_pages or lower max_len")
        victim = int(live[np.argmax(self.admitted_at[live])])
        req = self.slots[victim]
        req.preemptions += 1
        self.stats.preemptions += 1
        self._release(np.array([victim]))
        self.queue.appendleft(req)

    # ------------------------------------------------------------------ occupancy buckets

    def _pack_slots(self) -> int:
        """The slot bucket of the next tick: the smallest n that holds every live slot; live slots at or
        beyond n move into free slots below it first (state, caches' page tables: no K/V is copied)."""
        live = np.flatnonzero(self.live)
        n = self.buckets[bisect.bisect_left(self.buckets, len(live))]
        if live[-1] >= n:
            src = live[live >= n]
            self._move_slots(src, np.flatnonzero(~self.live[:n])[:len(src)])
        self.stats.slot_rows += n
        return n

    def _move_slots(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Move live slots src to free slots dst: host bookkeeping, page tables and the per-slot device
        state of a token between ticks (next token, hidden state mid-recursion, depth, gate, …)."""
        for host in (self.live, self.pos_host, self.entering_host, self.depth_host, self.in_rec_host,
                     self.admitted_at, self.out_buf, self.out_len, self.budget, self.stop_host):
            host[dst] = host[src]
        self.live[src] = self.entering_host[src] = self.in_rec_host[src] = False
        for a, b in zip(src, dst):
            self.slots[b], self.slots[a] = self.slots[a], None
        self.cache.move_slots(src, dst)
        at = torch.from_numpy(np.concatenate([src, dst])).to(self.im.device, non_blocking=True)
        src_dev, dst_dev = at.split(len(src))
        for buf in (self.tokens, self.h, self.depth, self.target, self.gate, self.exit_steps, self.temperature,
                    self.top_p):
            buf[dst_dev] = buf[src_dev]
        self.stats.slot_moves += len(src)

    # ------------------------------------------------------------------ one tick

    def _reserve_tick(self) -> None:
        """Pages for every cache a slot may append to in the next tick. The layers of one phase (prelude,
        coda, the block at one depth r; every layer of vanilla / recursive models) hold the same tokens of
        a slot, so which slots need a page is read off the phase's first layer, and those slots get one in
        every layer of the phase."""
        S = self.max_slots
        while True:
            rows = []
            for groups, slots, offset in self._tick_writers():
                first = (groups[0] + offset) * S + slots
                full = self.cache.host_lengths[first] >= self.cache.page_count(first) * self.cache.page_size
                rows.append(((groups[:, None] + offset[full]) * S + slots[full]).ravel())
            try:
                self.cache.add_page(np.concatenate(rows))  # a phase's rows are distinct, each full
                return
            except KVCacheFull:
                self._preempt()

    def _tick_writers(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per phase of the next tick: (its layers' cache groups at depth 0, the slots that may append a
        token to them, each slot's group offset: its depth r in the block under recursion-wise caching)."""
        im, groups, live = self.im, self._host_groups, self.live
        entering = np.flatnonzero(live & self.entering_host)
        if not im.mor:
            phases = [(groups["all"], entering, 0)]
        else:
            depth = np.where(self.entering_host, 0, self.depth_host)
            busy = live & (self.entering_host | self.in_rec_host)
            writers = np.flatnonzero(busy if not im.kv_share else busy & (depth == 0))
            phases = [(groups["prelude"], entering, 0),
                      (groups["coda"], np.flatnonzero(live), 0),  # any live token may leave the recursion
                      (groups["block"], writers, 0 if im.kv_share else depth[writers])]
        return [(g, slots, np.broadcast_to(offset, slots.shape)) for g, slots, offset in phases if len(g)]

    def _upload_host_state(self) -> None:
        """One host-to-device copy per tick: each slot's position, entering / in-recursion / waiting-for-coda
        flags (the host's view is the truth: admissions, retirements and preemptions change it)."""
        up = self._upload_host.numpy()
        up[0] = self.pos_host
        up[1] = self.entering_host
        up[2] = self.in_rec_host
        up[3] = self.live & ~self.entering_host & ~self.in_rec_host
        self.upload.copy_(self._upload_host, non_blocking=True)

    def _pull_report(self) -> dict[str, np.ndarray]:
        self._report_host.copy_(self.report, non_blocking=True)
        if self.report.is_cuda:
            t0 = time.perf_counter()
            torch.cuda.current_stream(self.report.device).synchronize()
            self.stats.device_wait_s += time.perf_counter() - t0
        return self._report_np

    def _after_tick(self, n: int) -> None:
        """One device-to-host copy of what the tick over slots [0, n) reports; the tokens of the coda rows
        go to their sequences (sampled requests redo head + sampling eagerly on the tick's final hidden
        rows)."""
        self.stats.ticks += 1
        S, rep = self.max_slots, self._pull_report()
        self.entering_host[:n] = rep["entering"][:n]
        self.in_rec_host[:n] = rep["in_rec"][:n]
        self.depth_host[:n] = rep["depth"][:n]
        self.cache.host_lengths[:] = rep["lengths"]
        served = rep["served"] < S
        slots, tokens = rep["served"][served].astype(np.int64), rep["next"][served].astype(np.int64)
        prelude_waits = int(np.count_nonzero(self.live & self.entering_host))
        coda_waits = int(np.count_nonzero(self.live & ~self.entering_host & ~self.in_rec_host)) - len(slots)
        self.stats.prelude_waits += prelude_waits
        self.stats.coda_waits += coda_waits
        self.stats.wait_ticks += bool(prelude_waits or coda_waits)
        if self.stats.depth is not None:
            self.stats.depth += np.bincount(rep["steps"][served], minlength=len(self.stats.depth))
        if not len(slots):
            return
        if self.sampled_live:
            tokens = self._sample_eager(np.flatnonzero(served), slots)
        self.pos_host[slots] += 1
        self._record(slots, tokens)

    def _sample_eager(self, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Head + sampling (temperature, top-p) of coda rows `rows` (their slots `slots`), outside the graph."""
        dev = self.im.device
        idx = torch.from_numpy(slots).to(dev)
        nxt = sample(self.im.logits(self.out_hidden[torch.from_numpy(rows).to(dev)]), self.temperature[idx],
                     self.top_p[idx], self.generator)
        self.tokens[idx] = nxt
        return nxt.cpu().numpy()

    def _groups(self, keys: list[tuple[int, int]]) -> Tensor:
        """(J,) cache groups of the (layer id, step) positions."""
        return torch.tensor([self.im.layout.read_group(l, r) for l, r in keys], dtype=torch.long,
                            device=self.im.device)

    def _rows(self, groups: Tensor, slots: Tensor) -> Tensor:
        """(J, N) cache rows of `slots` (N,) in `groups` (J,)."""
        return groups[:, None] * self.max_slots + slots

    def _take(self, mask: Tensor, width: int, scan: Tensor) -> tuple[Tensor, Tensor]:
        """Compact the rows where `mask` (n,) into a fixed width W: the first W of them in a circular scan
        of the slots from `scan` (1,), which moves to the first row left over (so it is first in line next
        tick; a scan left beyond n by a larger bucket restarts at 0). Returns (idx (W,) slot ids, S where
        a place is unused; taken (n,) bool)."""
        slot_ids = self.slot_ids[:mask.numel()]
        start = torch.where(scan < mask.numel(), scan, 0)
        before = torch.cumsum(mask, 0) - mask.long()  # masked rows before each slot
        total = before[-1] + mask[-1]
        rank = before - before.gather(0, start)  # masked rows from `start` up to each slot, circularly
        rank = torch.where(rank < 0, rank + total, rank)
        taken = mask & (rank < width)
        idx = torch.full((width + 1,), self.max_slots, dtype=torch.long, device=mask.device)
        idx.scatter_(0, torch.where(taken, rank, width), slot_ids)  # place W collects the rest
        scan.copy_((slot_ids * (mask & (rank == width))).sum(0, keepdim=True))  # 0 if nothing is left
        return idx[:width], taken

    def _phase(self, keys: list[tuple[int, int]], rows: Tensor, x: Tensor, rope, write: Tensor,
               attend: Tensor, pos: Tensor, project: list[bool] | None = None) -> Tensor:
        """Run the layers `keys` (layer id, step) in order on rows x (N, d) at positions pos (N,): appends
        planned once, K/V written per layer, lengths committed after (every layer writes distinct cache
        rows)."""
        cache = self.cache
        flat, attend_len = cache.plan_appends(rows, write, attend)
        if self.im.kv_tokens_read is not None:
            self.im.kv_tokens_read += attend_len.sum()
        backend = self.im.decode_backend
        for j, (layer_id, _) in enumerate(keys):
            writes = project[j] if project is not None else True
            x = self.im.layer_rows(layer_id, x, rope, cache, flat[j] if writes else None,
                                   lambda q, j=j: decode_attention(q, cache, rows[j], attend_len[j], backend))
        cache.commit_appends(rows, write, flat, pos)
        return x

    def _compact_phase(self, layer_ids: list[int], groups: Tensor, idx: Tensor, x: Tensor, rope, pos: Tensor) -> Tensor:
        """Prelude / coda layers on compacted rows x (W, d) of slots idx (W,) (S = unused place: no cache
        write, no attention, its output is scratch)."""
        if not layer_ids:
            return x
        valid = idx < self.max_slots
        slots = idx.clamp(max=pos.numel() - 1)  # (unused places read the last slot's rope; nothing is kept)
        rope = (rope[0][slots], rope[1][slots])
        write = valid.expand(len(layer_ids), -1)
        return self._phase([(l, 0) for l in layer_ids], self._rows(groups, slots), x, rope, write, valid, pos[slots])

    def _head(self, x: Tensor, idx: Tensor, steps: Tensor) -> None:
        """Final norm, LM head and greedy choice on the coda rows x (W, d) of slots idx; the chosen tokens
        enter next tick; the report gets slots, tokens and recursion steps (places beyond W: no slot)."""
        w, rep = x.shape[0], self._report
        out = self.out_hidden[:w]
        out.copy_(self.im.model.norm(x))
        nxt = self.im.logits(out).argmax(dim=-1)
        self.tokens.index_copy_(0, idx, nxt)
        rep["served"][:w].copy_(idx)
        rep["served"][w:].fill_(self.max_slots)
        rep["next"][:w].copy_(nxt)
        rep["steps"][:w].copy_(steps)

    @torch.no_grad()
    def _tick(self, n: int) -> None:
        """The fixed-shape step over slots [0, n) (every live slot is among them); reads and writes only
        the static buffers."""
        im, S, rep = self.im, self.max_slots, self._report
        up = self.upload[:, :n]
        positions, entering, slot_ids = up[0], up[1].bool(), self.slot_ids[:n]
        rope = im.rope(positions)
        if not im.mor:  # the whole stack and the head, every live slot
            keys = list(im.plan.unrolled)
            project = [im.layout.writes(r) for _, r in keys]
            x = self._phase(keys, self._rows(self._groups_all, slot_ids), im.model.embed(self.tokens[:n]),
                            rope, self._projects[:, None] & entering, entering, positions, project)
            self._head(x, torch.where(entering, slot_ids, S), torch.zeros_like(positions))
            # (the report's entering / in_rec / depth stay 0: every token enters and leaves in its tick)
        else:
            width_in, width_out = self._widths[n]
            # embedding + prelude on up to W_in entering tokens; the rest keep entering
            idx, admitted = self._take(entering, width_in, self._scan_in)
            x = self._compact_phase(im.plan.prelude, self._groups_prelude, idx, im.model.embed(self.tokens[idx]),
                                    rope, positions)
            self.h.index_copy_(0, idx, x)
            rep["entering"][:n].copy_(entering & ~admitted)
            done = self._recursion_tick(admitted, up[2].bool(), rope)
            # coda + head on up to W_out tokens done with their recursion (now or in an earlier tick)
            idx, _ = self._take(up[3].bool() | done, width_out, self._scan_out)
            x = self._compact_phase(im.plan.coda, self._groups_coda, idx, self.h[idx], rope, positions)
            self._head(x, idx, self.exit_steps[idx.clamp(max=S - 1)])
        rep["lengths"].copy_(self.cache.lengths)

    def _recursion_tick(self, ent: Tensor, in_rec: Tensor, rope) -> Tensor:
        """One shared-block pass over the tokens in the recursion (ent: tokens entering it now, their
        prelude output in h); returns the mask of tokens done with their recursion this tick."""
        im, nr, n = self.im, self.im.num_recursions, ent.numel()
        h = self.h[:n]
        depth = torch.where(ent, 0, self.depth[:n])
        if im.expert_choice:
            logits, decide = im.router_logits(h, 0)
            skip = ent & ~(decide > 0)
            rec = in_rec | (ent & ~skip)
            gate = torch.where(ent, im.router_weight(logits), self.gate[:n])
            target = self.target[:n]
        else:  # token-choice: every token runs step 0
            chosen, weight = im.token_choice_depth(h)
            skip = torch.zeros_like(ent)
            rec = in_rec | ent
            gate = torch.where(ent, weight, self.gate[:n])
            target = torch.where(ent, chosen, self.target[:n])
        # one pass of the shared block over every token in the recursion, each at its own depth: its
        # depth-r cache (recursion-wise caching) or the step-0 cache (KV sharing, written at r = 0 only)
        keys = [(l, 0) for l in im.block]
        rows = self._rows_block[:, :n]
        rows = rows if im.kv_share else rows + depth * self.max_slots
        write = (rec & (depth == 0) if im.kv_share else rec).expand(len(keys), -1)
        y = self._phase(keys, rows, h, rope, write, rec, self.upload[0, :n])
        if im.scale_output:
            scaled = im.scaled(h, y, gate)
            y = scaled if im.expert_choice else torch.where((target == depth)[:, None], scaled, y)
        h = torch.where(rec[:, None], y, h)
        nxt = depth + 1
        if im.expert_choice and nr > 1:
            logits, decide = zip(*(im.router_logits(h, r) for r in range(1, nr)))
            col = (nxt - 1).clamp(max=nr - 2)[:, None]
            cont = rec & (nxt < nr) & (torch.stack(decide, 1).gather(1, col).squeeze(1) > 0)
            gate = torch.where(cont, im.router_weight(torch.stack(logits, 1).gather(1, col).squeeze(1)), gate)
        elif im.expert_choice:
            cont = torch.zeros_like(rec)
        else:
            cont = rec & (target > depth)
        done = (rec & ~cont) | skip
        exit_steps, new_depth = self.exit_steps[:n], self.depth[:n]
        exit_steps.copy_(torch.where(done, torch.where(skip, 0, nxt), exit_steps))
        self.h[:n].copy_(h)
        self.gate[:n].copy_(gate)
        self.target[:n].copy_(target)
        new_depth.copy_(torch.where(cont, nxt, depth))
        self._report["in_rec"][:n].copy_(cont)
        self._report["depth"][:n].copy_(new_depth)
        return done

    def _capture(self) -> None:
        """Capture the tick of every slot bucket in a CUDA graph (state is empty now: every mask is false,
        nothing is written). The graphs share one memory pool: they never run at once and no tensor of
        one outlives its replay (a tick's results land in the static buffers)."""
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.buckets):  # the largest first: its temporaries size the shared pool
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._tick(n)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._tick(n)
            self.graphs[n] = graph
