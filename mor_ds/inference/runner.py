"""The model's own modules run on *rows* (tokens of many sequences, each with its slot and original
position) against a paged KV cache. Used by `generate` and by the engine's prefill and decode step.

Semantics are those of `CausalLM.forward(ids, routing="causal")`, token by token:
- MoR expert-choice: a token runs step r iff it ran step r−1 and its step-r router says so (logit > 0 of
  the router, or of the aux router in aux_router mode); its update is h ← h + g·(F(h) − h), g = α·σ(logit).
- MoR token-choice: the depth comes from the router on the prelude output; steps 0…depth run, the last
  one scaled by g.
- Attention at step r: recursion-wise caching reads/writes the depth-r cache (only tokens that reached
  r); KV sharing at r >= 1 reads the step-0 cache of the same layer and projects no K/V.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mor_ds.inference.kv_cache import CacheLayout, PagedKVCache
from mor_ds.inference.paged_attention import decode_attention, prefill_attention
from mor_ds.models.block import apply_rope, rope_cos_sin
from mor_ds.models.model import CausalLM
from mor_ds.models.recursion import ExpertChoiceMoR, TokenChoiceMoR


class InferenceModel:
    """Wraps a CausalLM (put in eval mode) for cached inference; holds no per-request state."""

    def __init__(self, model: CausalLM, decode_backend: str = "auto"):
        self.model = model.eval()
        self.cfg, self.plan = model.cfg, model.plan
        self.decode_backend = decode_backend
        self.kv_tokens_read: Tensor | None = None  # optional device counter of cached tokens attended (bench)
        self.expert_choice = isinstance(model.recursion, ExpertChoiceMoR)
        self.token_choice = isinstance(model.recursion, TokenChoiceMoR)
        self.mor = self.expert_choice or self.token_choice
        self.kv_share = self.cfg.family != "vanilla" and self.cfg.kv_mode == "share"
        self.layout = CacheLayout.for_plan(self.plan, self.kv_share)
        self.num_recursions = self.plan.num_recursions
        rcfg = model.router_cfg
        self.scale_output = rcfg.scale_output
        if self.expert_choice and rcfg.activation != "sigmoid":
            raise ValueError("expert-choice routing with router.activation=softmax normalises over the whole "
                             "sequence and cannot decode causally; use sigmoid")
        if self.mor:
            blocks = {self.plan.block(r) for r in range(self.num_recursions)}
            if len(blocks) != 1 or not self.plan.steps_contiguous:
                raise ValueError("MoR inference needs cycle-type sharing (one shared block for every step)")
            self.block = blocks.pop()

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def new_cache(self, *, max_slots: int, max_len: int, num_pages: int, page_size: int = 16) -> PagedKVCache:
        return PagedKVCache(self.layout, max_slots=max_slots, max_len=max_len, num_pages=num_pages,
                            page_size=page_size, num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                            dtype=self.dtype, device=self.device)

    def rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin (N, 1, 1, D/2) for rows at original positions pos (N,)."""
        return rope_cos_sin(pos[:, None], self.cfg.head_dim, self.cfg.rope_theta, self.dtype)

    # ------------------------------------------------------------------ one decoder block on rows

    def layer(self, layer_id: int, x: Tensor, rope: tuple[Tensor, Tensor], pos: Tensor, cache: PagedKVCache,
              rows: Tensor, write: Tensor | bool | None, attend: Tensor | None = None, prefill: bool = False) -> Tensor:
        """DecoderBlock.forward for rows x (N, d) whose K/V live in cache rows `rows` (N,).

        write: None = project no K/V (KV sharing, r >= 1); True = append every row's K/V, reserving pages
        (eager); a bool tensor = append where true, pages reserved by the caller (fixed-shape step).
        attend: bool (N,) rows that attend (others get zero attention output; fixed-shape step only).
        prefill: several rows per cache row, causal by position (else one query per cache row)."""
        block = self.model.layers[layer_id]
        attn = block.attn
        n = x.shape[0]
        a = block.attn_norm(x)
        q = apply_rope(attn.q_proj(a).view(n, attn.num_heads, 1, attn.head_dim), *rope).squeeze(2)
        if write is not None:
            k = apply_rope(attn.k_proj(a).view(n, attn.num_kv_heads, 1, attn.head_dim), *rope).squeeze(2)
            v = attn.v_proj(a).view(n, attn.num_kv_heads, attn.head_dim)
            if write is True:
                self._append_all(cache, rows, k, v, pos)
            else:
                cache.append(rows, k, v, pos, write)
        if prefill:
            out = prefill_attention(q, pos, cache, rows, backend=attn.backend)
        else:
            lengths = cache.lengths[rows]
            if attend is not None:
                lengths = torch.where(attend, lengths, 0)
            if self.kv_tokens_read is not None:
                self.kv_tokens_read += lengths.sum()
            out = decode_attention(q, cache, rows, lengths, backend=self.decode_backend)
        x = x + attn.o_proj(out.reshape(n, -1))
        return x + block.mlp(block.mlp_norm(x))

    @staticmethod
    def _append_all(cache: PagedKVCache, rows: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Eager append of every row (rows grouped by cache row, in position order)."""
        run_rows, counts = torch.unique_consecutive(rows, return_counts=True)
        host_rows, host_counts = run_rows.cpu().numpy(), counts.cpu().numpy()
        cache.reserve(host_rows, host_counts)
        rank = None
        if len(run_rows) != len(rows):
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(len(rows), device=rows.device) - torch.repeat_interleave(starts, counts)
        cache.append(rows, k, v, pos, torch.ones_like(rows, dtype=torch.bool), rank)
        np.add.at(cache.host_lengths, host_rows, host_counts)

    def cache_rows(self, layer_id: int, step: Tensor | int, slots: Tensor, cache: PagedKVCache) -> Tensor:
        """Cache row of each token of `slots` at (layer, step); step may be a per-row tensor."""
        base = self.layout.read_group(layer_id, 0)
        group = base if self.kv_share else base + step  # a layer's depth groups are contiguous
        return group * cache.max_slots + slots

    # ------------------------------------------------------------------ routing

    def router_logits(self, h: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Expert-choice step r: (weight logits, decision logits) of rows h (N, d)."""
        router = self.model.recursion.router
        logits = router.routers[step](h).squeeze(-1)
        decide = router.aux_routers[step](h).squeeze(-1) if router.aux_routers is not None else logits
        return logits, decide

    def token_choice_depth(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Token-choice: (depth, g) per row, as TokenChoiceRouter.assign chooses them (top-1 of the
        probabilities, plus the balancing bias under loss-free balancing), without its aux losses and
        host syncs, so it can run inside a captured decode step."""
        router = self.model.recursion.router
        logits = router.router(h)
        probs = torch.softmax(logits, -1) if router.cfg.activation == "softmax" else torch.sigmoid(logits)
        scores = probs + router.balance_bias if router.cfg.balancing == "loss_free" else probs
        depth = scores.argmax(dim=-1)
        return depth, router.cfg.alpha * probs.gather(-1, depth[:, None]).squeeze(-1)

    def router_weight(self, logits: Tensor) -> Tensor:
        return self.model.router_cfg.alpha * torch.sigmoid(logits)

    def scaled(self, x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
        """h ← h + g·(F(h) − h) for the rows whose update the router weight scales."""
        return x + gate.to(y.dtype)[:, None] * (y - x)

    # ------------------------------------------------------------------ synchronous forward (eager)

    @torch.no_grad()
    def forward(self, cache: PagedKVCache, tokens: Tensor, slots: Tensor, pos: Tensor, *, prefill: bool,
                stats: dict | None = None) -> Tensor:
        """Run whole tokens (N,) of sequences in `slots` at positions `pos` through the model, appending
        their K/V; returns the final hidden states after the last norm (N, d). Rows of one slot must be
        consecutive and in position order (prefill); decode passes one row per slot.
        stats: optional dict; counts["depth"] (Nr+1,) accumulates how many tokens ran 0…Nr steps."""
        h = self.model.embed(tokens)
        rope = self.rope(pos)

        def run(layer_id: int, step: int, x: Tensor, idx: Tensor | None) -> Tensor:
            sel = slice(None) if idx is None else idx
            sub_rope = rope if idx is None else (rope[0][idx], rope[1][idx])
            write = True if self.layout.writes(step) else None
            rows = self.cache_rows(layer_id, step, slots[sel], cache)
            return self.layer(layer_id, x, sub_rope, pos[sel], cache, rows, write, prefill=prefill)

        for layer_id in self.plan.prelude:
            h = run(layer_id, 0, h, None)
        if not self.mor:
            for layer_id, step in self.plan.recursive_part:
                h = run(layer_id, step, h, None)
        else:
            h = self._recursion(h, run, stats)
        for layer_id in self.plan.coda:
            h = run(layer_id, 0, h, None)
        return self.model.norm(h)

    def _recursion(self, h: Tensor, run, stats: dict | None) -> Tensor:
        idx = torch.arange(h.shape[0], device=h.device)
        steps_run = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        if self.token_choice:
            depth, weight = self.token_choice_depth(h)
        for step in range(self.num_recursions):
            if self.expert_choice:
                logits, decide = self.router_logits(h[idx], step)
                keep = decide > 0
                idx, gate = idx[keep], self.router_weight(logits[keep])
            else:
                idx = idx[depth[idx] >= step]
                gate = weight[idx]
            if idx.numel() == 0:
                break
            x = h[idx]
            y = x
            for layer_id in self.block:
                y = run(layer_id, step, y, idx)
            if self.scale_output:
                scaled = self.scaled(x, y, gate)
                y = scaled if self.expert_choice else torch.where((depth[idx] == step)[:, None], scaled, y)
            h = h.index_copy(0, idx, y)
            steps_run[idx] += 1
        if stats is not None:
            counts = torch.bincount(steps_run, minlength=self.num_recursions + 1).cpu()
            stats["depth"] = stats.get("depth", 0) + counts
        return h

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)
