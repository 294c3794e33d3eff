"""Continuous depth-wise batching: a serving loop with many sequences in flight.

The engine owns `max_slots` sequence slots and one paged KV pool (preallocated once). Each *tick* is one
fixed-shape pass over all slots (so it can be captured in a CUDA graph):

  MoR:    tokens that are new this tick run embedding + prelude and the step-0 routing decision; then the
          shared block runs ONCE over every token in the recursion, each at its own depth r (its attention
          reads its own depth-r cache, or the step-0 cache under KV sharing; its router is step r's);
          tokens the router lets go leave through coda + head in the same tick, their sequence samples
          its next token, and that token enters in the next tick. A token that runs d steps occupies its
          slot for max(d, 1) ticks, so the shared block always runs on a batch mixing depths 0…Nr−1 instead of
          shrinking batches step after step.
  vanilla / recursive: every live slot runs its whole layer stack each tick.

Between ticks the host appends sampled tokens, retires finished requests (freeing their pages), admits
queued requests into free slots (a batched prefill through the same modules) and reserves pages for the
next tick. Admission waits until `admit_batch` slots are free (or the queue is that short, or nothing is
live): a prefill costs about the same for one prompt as for many (launch-bound), so prefilling one
request per tick as slots trickle free would cost more than the few slot-ticks the wait idles (vLLM's
scheduler delay serves the same purpose); when the pool runs out it preempts the newest sequence and
requeues it (its prompt grows by what it generated, so greedy output is unchanged).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mor_ds.inference.kv_cache import KVCacheFull
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
    decode_s: float = 0.0
    depth: np.ndarray | None = None  # tokens by number of recursion steps run (MoR)

    def depth_fractions(self) -> list[float]:
        if self.depth is None or self.depth.sum() == 0:
            return []
        return (self.depth / self.depth.sum()).round(4).tolist()


class Engine:
    def __init__(self, model: CausalLM, *, max_slots: int, max_len: int, num_pages: int | None = None,
                 page_size: int = 16, cuda_graph: bool = False, decode_backend: str = "auto", seed: int = 0,
                 prefill_rows: int = 8192, admit_batch: int | None = None, count_kv_reads: bool = False):
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
        dev, d, S = im.device, model.cfg.hidden_size, max_slots
        self.slot_ids = torch.arange(S, device=dev)
        # cache rows per layer position (MoR block: depth 0's, the step's depth is added per token)
        self._rows_all = self._static_rows(list(im.plan.unrolled)) if not im.mor else None
        self._rows_prelude = self._static_rows([(l, 0) for l in im.plan.prelude])
        self._rows_coda = self._static_rows([(l, 0) for l in im.plan.coda])
        self._rows_block = self._static_rows([(l, 0) for l in im.block]) if im.mor else None
        self._projects = torch.tensor([im.layout.writes(r) for _, r in im.plan.unrolled], device=dev)
        # device state of the fixed-shape tick (static buffers: a captured graph reads and writes these)
        self.tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.positions = torch.zeros(S, dtype=torch.long, device=dev)
        self.entering = torch.zeros(S, dtype=torch.bool, device=dev)
        self.in_rec = torch.zeros(S, dtype=torch.bool, device=dev)
        self.depth = torch.zeros(S, dtype=torch.long, device=dev)
        self.target = torch.zeros(S, dtype=torch.long, device=dev)  # token-choice depth
        self.gate = torch.zeros(S, dtype=torch.float32, device=dev)  # router weight g of the pending step
        self.h = torch.zeros(S, d, dtype=im.dtype, device=dev)
        self.exit = torch.zeros(S, dtype=torch.bool, device=dev)
        self.exit_steps = torch.zeros(S, dtype=torch.long, device=dev)
        self.hidden = torch.zeros(S, d, dtype=im.dtype, device=dev)
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
        self.graph: torch.cuda.CUDAGraph | None = None
        if cuda_graph:
            if dev.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            self._capture()

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
            self._reserve_tick()
            self._upload_host_state()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._tick()
            self._after_tick()
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

    def _free_slots(self) -> list[int]:
        return np.nonzero(~self.live)[0].tolist()

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
        while self.queue and free:
            req = self.queue[0]
            ids = req.prompt + req.output
            need = self._prefill_pages(len(ids))
            if need > budget or (batch and rows + len(ids) > self.prefill_rows):
                if not batch and not self.live.any():
                    raise KVCacheFull(f"a prompt of {len(ids)} tokens does not fit the KV pool even when empty")
                break
            self.queue.popleft()
            budget -= need
            rows += len(ids)
            batch.append((free.pop(0), req))
        if batch:
            self._prefill(batch)

    @torch.no_grad()
    def _prefill(self, batch: list[tuple[int, Request]]) -> None:
        t0 = time.perf_counter()
        dev = self.im.device
        ids = [req.prompt + req.output for _, req in batch]
        tokens = torch.tensor([t for seq in ids for t in seq], device=dev)
        slots = np.array([s for (s, _), seq in zip(batch, ids) for _ in seq])
        pos = torch.tensor([p for seq in ids for p in range(len(seq))], device=dev)
        hidden = self.im.forward(self.cache, tokens, slots, pos)
        last = torch.tensor(np.cumsum([len(seq) for seq in ids]) - 1, device=dev)
        logits = self.im.logits(hidden[last])
        params = [req.sampling for _, req in batch]
        first = sample(logits, torch.tensor([p.temperature for p in params], device=dev),
                       torch.tensor([p.top_p for p in params], device=dev), self.generator,
                       all_greedy=all(p.greedy for p in params)).tolist()
        for (slot, req), seq in zip(batch, ids):
            self.slots[slot] = req
            self.live[slot] = True
            self.admitted_at[slot] = self._admissions
            self._admissions += 1
            self.pos_host[slot] = len(seq)
            self.out_len[slot] = 0
            self.budget[slot] = req.max_new_tokens - len(req.output)
            self.stop_host[slot] = -1 if req.stop_token is None else req.stop_token
            self.sampled_live += not req.sampling.greedy
            self.temperature[slot], self.top_p[slot] = req.sampling.temperature, req.sampling.top_p
            self.in_rec_host[slot] = False
            self.depth_host[slot] = 0
        slots = np.array([slot for slot, _ in batch])
        self.tokens[torch.from_numpy(slots).to(dev)] = torch.tensor(first, device=dev)
        self._record(slots, np.array(first, dtype=np.int64))
        self.stats.prefill_tokens += len(tokens)
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
            self._release(int(slot))

    def _release(self, slot: int) -> None:
        """Hand the slot's tokens to its request and free the slot and its pages."""
        req = self.slots[slot]
        req.output.extend(self.out_buf[slot, :self.out_len[slot]].tolist())
        self.sampled_live -= not req.sampling.greedy
        self.cache.release(slot)
        self.slots[slot] = None
        self.live[slot] = False
        self.entering_host[slot] = False
        self.in_rec_host[slot] = False

    def _preempt(self) -> None:
        live = np.nonzero(self.live)[0]
        if len(live) <= 1:
            raise KVCacheFull("the KV pool cannot hold even one sequence; raise num_pages or lower max_len")
        victim = int(live[np.argmax(self.admitted_at[live])])
        req = self.slots[victim]
        req.preemptions += 1
        self.stats.preemptions += 1
        self._release(victim)
        self.queue.appendleft(req)

    # ------------------------------------------------------------------ one tick

    def _reserve_tick(self) -> None:
        """Pages for every cache a slot may append to in the next tick."""
        layout, S = self.im.layout, self.max_slots
        while True:
            live = self.live
            groups_rows = []
            if self.im.mor:
                depth = np.where(self.entering_host, 0, self.depth_host)
                busy = live & (self.entering_host | self.in_rec_host)
                for layer_id in self.im.plan.prelude + self.im.plan.coda:
                    groups_rows.append(layout.groups[(layer_id, 0)] * S + np.nonzero(busy)[0])
                writers = busy if not self.im.kv_share else busy & (depth == 0)
                for layer_id in self.im.block:
                    group = layout.read_group(layer_id, 0) + (0 if self.im.kv_share else depth)
                    groups_rows.append((group * S + np.arange(S))[writers])
            else:
                slots = np.nonzero(live & self.entering_host)[0]
                groups_rows = [g * S + slots for g in range(layout.num_groups)]
            try:
                self.cache.reserve(np.concatenate(groups_rows), 1)
                return
            except KVCacheFull:
                self._preempt()

    def _upload_host_state(self) -> None:
        dev = self.im.device
        self.positions.copy_(torch.from_numpy(self.pos_host).to(dev, non_blocking=True))
        self.entering.copy_(torch.from_numpy(self.entering_host).to(dev, non_blocking=True))
        self.in_rec.copy_(torch.from_numpy(self.in_rec_host).to(dev, non_blocking=True))

    def _after_tick(self) -> None:
        """One device-to-host copy of the step's state and cache lengths; then the LM head and sampling on
        the exiting rows only (MoR: a fraction of the slots per tick)."""
        self.stats.ticks += 1
        S = self.max_slots
        state = torch.stack([self.exit.long(), self.depth, self.in_rec.long(), self.exit_steps]).flatten()
        host = torch.cat([state, self.cache.lengths.long()]).cpu().numpy()
        exit_, self.depth_host[:], in_rec, steps = host[:S].astype(bool), host[S:2 * S], host[2 * S:3 * S], host[3 * S:4 * S]
        self.cache.host_lengths[:] = host[4 * S:]
        self.in_rec_host[:] = in_rec.astype(bool)
        self.entering_host[:] = False
        if self.stats.depth is not None:
            self.stats.depth += np.bincount(steps[exit_], minlength=len(self.stats.depth))
        slots = np.nonzero(exit_)[0]
        if not len(slots):
            return
        idx = torch.from_numpy(slots).to(self.im.device)
        nxt = sample(self.im.logits(self.hidden[idx]), self.temperature[idx], self.top_p[idx], self.generator,
                     all_greedy=self.sampled_live == 0)
        self.tokens[idx] = nxt
        self.pos_host[slots] += 1
        self._record(slots, nxt.cpu().numpy())

    def _static_rows(self, keys: list[tuple[int, int]]) -> Tensor:
        """(J, S) cache rows of every slot at the given (layer id, step) positions."""
        groups = torch.tensor([self.im.layout.read_group(l, r) for l, r in keys], device=self.im.device)
        return groups[:, None] * self.max_slots + self.slot_ids

    def _phase(self, keys: list[tuple[int, int]], rows: Tensor, x: Tensor, rope, write: Tensor,
               attend: Tensor, project: list[bool] | None = None) -> Tensor:
        """Run the layers `keys` (layer id, step) in order on every slot: appends planned once, K/V written
        per layer, lengths committed after (every layer writes distinct cache rows)."""
        cache = self.cache
        flat, attend_len = cache.plan_appends(rows, write, attend)
        if self.im.kv_tokens_read is not None:
            self.im.kv_tokens_read += attend_len.sum()
        for j, (layer_id, _) in enumerate(keys):
            writes = project[j] if project is not None else True
            x = self.im.layer_masked(layer_id, x, rope, cache, rows[j], flat[j] if writes else None, attend_len[j])
        cache.commit_appends(rows, write, flat, self.positions)
        return x

    @torch.no_grad()
    def _tick(self) -> None:
        """The fixed-shape step over all slots; reads and writes only the static buffers."""
        im = self.im
        self.exit.zero_()
        rope = im.rope(self.positions)
        x = im.model.embed(self.tokens)
        ent = self.entering
        if not im.mor:  # the whole stack, every live slot
            keys = list(im.plan.unrolled)
            project = [im.layout.writes(r) for _, r in keys]
            x = self._phase(keys, self._rows_all, x, rope, self._projects[:, None] & ent, ent, project)
            exit_ = ent
        else:
            keys = [(l, 0) for l in im.plan.prelude]
            if keys:
                x = self._phase(keys, self._rows_prelude, x, rope, ent.expand(len(keys), -1), ent)
            x, exit_ = self._recursion_tick(x, rope)
            keys = [(l, 0) for l in im.plan.coda]
            if keys:
                x = self._phase(keys, self._rows_coda, x, rope, exit_.expand(len(keys), -1), exit_)
        self.hidden.copy_(im.model.norm(x))
        self.exit.copy_(exit_)

    def _recursion_tick(self, x: Tensor, rope) -> tuple[Tensor, Tensor]:
        im, nr = self.im, self.im.num_recursions
        ent = self.entering
        h = torch.where(ent[:, None], x, self.h)
        depth = torch.where(ent, 0, self.depth)
        if im.expert_choice:
            logits, decide = im.router_logits(h, 0)
            skip = ent & ~(decide > 0)
            rec = self.in_rec | (ent & ~skip)
            gate = torch.where(ent, im.router_weight(logits), self.gate)
            target = self.target
        else:  # token-choice: every token runs step 0
            chosen, weight = im.token_choice_depth(h)
            skip = torch.zeros_like(ent)
            rec = self.in_rec | ent
            gate = torch.where(ent, weight, self.gate)
            target = torch.where(ent, chosen, self.target)
        # one pass of the shared block over every token in the recursion, each at its own depth: its
        # depth-r cache (recursion-wise caching) or the step-0 cache (KV sharing, written at r = 0 only)
        keys = [(l, 0) for l in im.block]
        rows = self._rows_block if im.kv_share else self._rows_block + depth * self.max_slots
        write = (rec & (depth == 0) if im.kv_share else rec).expand(len(keys), -1)
        y = self._phase(keys, rows, h, rope, write, rec)
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
        exit_ = (rec & ~cont) | skip
        self.exit_steps.copy_(torch.where(skip, 0, depth + 1))
        self.h.copy_(h)
        self.gate.copy_(gate)
        self.target.copy_(target)
        self.depth.copy_(torch.where(cont, nxt, depth))
        self.in_rec.copy_(cont)
        return h, exit_

    def _capture(self) -> None:
        """Capture the tick in a CUDA graph (state is empty now: every mask is false, nothing is written)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._tick()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._tick()
