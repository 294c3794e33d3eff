"""The model's own modules run on *rows* (tokens of many sequences, each with its slot and original
position) against a paged KV cache. Used by `generate` and by the engine's prefill and decode step.

Semantics are those of `CausalLM.forward(ids, routing="causal")`, token by token:
- MoR expert-choice: a token runs step r iff it ran step r−1 and its step-r decision logit (the router's,
  or the aux router's in aux_router mode) exceeds the calibrated threshold τ_r (see ExpertChoiceRouter);
  g = α·σ(logit) combines the step's output (router.combine; mor_ds.models.mor_math).
- MoR token-choice: the depth comes from the router on the prelude output x; steps 0…depth run, the
  last one's output combined with x by g.
- Attention at step r: recursion-wise caching reads/writes the depth-r cache (only tokens that reached
  r); KV sharing at r >= 1 reads the step-0 cache of the same layer and projects no K/V.

The eager path (`forward`: prefill, `generate`'s decode) runs *phases*: the layers of the prelude, of the
coda, of the shared block at one step, of a vanilla stack hold the same tokens of each slot, so pages,
append slots, cache lengths and the prefill mask are worked out once per phase; MoR steps run on the rows
still in the recursion (one host sync per step, the only syncs of a call).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mor_ds.inference.fused_ops import rope_write_kv_torch, rope_write_kv_triton, silu_mul_torch, silu_mul_triton
from mor_ds.inference.kv_cache import CacheLayout, PagedKVCache
from mor_ds.inference.paged_attention import PrefillAttention, decode_attention
from mor_ds.models.block import apply_rope_rows, rope_rows
from mor_ds.models.model import CausalLM
from mor_ds.models.mor_math import expert_choice_update, expert_choice_weight, token_choice_exit
from mor_ds.models.recursion import ExpertChoiceMoR, TokenChoiceMoR


class InferenceModel:
    """Wraps a CausalLM (put in eval mode) for cached inference; holds no per-request state."""

    def __init__(self, model: CausalLM, decode_backend: str = "auto", fuse_weights: bool = True):
        self.model = model.eval()
        self.fused = fuse_weights
        if fuse_weights:
            self._fuse_weights()
        self.cfg, self.plan = model.cfg, model.plan
        self.decode_backend = decode_backend
        # Triton for the decode attention and the fused elementwise ops ("auto": on CUDA)
        triton_ops = decode_backend == "triton" or (decode_backend == "auto" and self.device.type == "cuda")
        self._rope_write_kv = rope_write_kv_triton if triton_ops else rope_write_kv_torch
        self._silu_mul = silu_mul_triton if triton_ops and fuse_weights else silu_mul_torch
        self.kv_tokens_read: Tensor | None = None  # optional device counter of cached tokens attended (bench)
        self.expert_choice = isinstance(model.recursion, ExpertChoiceMoR)
        self.token_choice = isinstance(model.recursion, TokenChoiceMoR)
        self.mor = self.expert_choice or self.token_choice
        self.kv_share = self.cfg.family != "vanilla" and self.cfg.kv_mode == "share"
        self.layout = CacheLayout.for_plan(self.plan, self.kv_share)
        self.num_recursions = self.plan.num_recursions
        rcfg = model.router_cfg
        self.scale_output, self.rule = rcfg.scale_output, rcfg.combine
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
        """RoPE factors (cos, signed sin), each (N, 1, D), for rows at original positions pos (N,)."""
        return rope_rows(pos, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)

    def _fuse_weights(self) -> None:
        """Per layer one [q; k; v] and one [gate; up] matrix (copies; snapshot of the current weights)."""
        self.qkv_weight, self.gate_up_weight = [], []
        for block in self.model.layers:
            attn, mlp = block.attn, block.mlp
            self.qkv_weight.append(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach())
            self.gate_up_weight.append(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach())

    # ------------------------------------------------------------------ one decoder block on rows

    def _mlp(self, block, layer_id: int, x: Tensor) -> Tensor:
        """x + MLP(norm(x)); x is the block's own intermediate, so the fused path adds into it in the down
        projection's GEMM (addmm_, β = 1: no separate add kernel)."""
        h = block.mlp_norm(x)
        if self.fused:
            return x.addmm_(self._silu_mul(F.linear(h, self.gate_up_weight[layer_id])), block.mlp.down_proj.weight.t())
        return x + block.mlp(h)

    def layer_rows(self, layer_id: int, x: Tensor, rope: tuple[Tensor, Tensor], cache: PagedKVCache,
                   flat: Tensor | None, attend: Callable[[Tensor], Tensor]) -> Tensor:
        """DecoderBlock.forward on rows x (N, d) whose cache appends are planned: K/V written to the flat
        page slots `flat` (N,) (None = no K/V projected: KV sharing at r >= 1; RoPE and the write are one
        fused step with fused weights), then `attend(q)` reads the cache and returns (N, Hq, D).
        Shape-static and sync-free, so the fixed-shape tick can run it inside a CUDA graph."""
        block = self.model.layers[layer_id]
        attn = block.attn
        n, hq, hkv, hd = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
        a = block.attn_norm(x)
        if self.fused and flat is not None:
            qkv = F.linear(a, self.qkv_weight[layer_id]).view(n, hq + 2 * hkv, hd)
            q = self._rope_write_kv(qkv, rope, hq, cache.k.view(-1, hkv, hd), cache.v.view(-1, hkv, hd), flat)
        else:
            if self.fused:  # queries only
                qk = F.linear(a, self.qkv_weight[layer_id][:hq * hd]).view(n, hq, hd)
            elif flat is not None:
                qk = torch.cat([attn.q_proj(a), attn.k_proj(a)], -1).view(n, hq + hkv, hd)
            else:
                qk = attn.q_proj(a).view(n, hq, hd)
            qk = apply_rope_rows(qk, rope)
            q = qk[:, :hq]
            if flat is not None:
                cache.write_at(flat, qk[:, hq:], attn.v_proj(a).view(n, hkv, hd))
        return self._mlp(block, layer_id, x + attn.o_proj(attend(q).reshape(n, -1)))

    # ------------------------------------------------------------------ routing

    def router_logits(self, h: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Expert-choice step r: (weight logits, decision margins) of rows h (N, d); a row continues iff
        its margin (decision logit − τ_r) is > 0."""
        router = self.model.recursion.router
        logits = router.routers[step](h).squeeze(-1)
        decide = router.aux_routers[step](h).squeeze(-1) if router.aux_routers is not None else logits
        return logits, router.causal_margin(step, decide)

    def token_choice_depth(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Token-choice: (depth, g) per row, as TokenChoiceRouter.assign chooses them (top-1 of the
        probabilities, plus the balancing bias under loss-free balancing), without its aux losses and
        host syncs, so it can run inside a captured decode step."""
        router = self.model.recursion.router
        _, depth, weight = router.route(router.router(h))
        return depth, weight

    # ------------------------------------------------------------------ synchronous forward (eager)

    @torch.no_grad()
    def forward(self, cache: PagedKVCache, tokens: Tensor, slots: np.ndarray, pos: Tensor,
                stats: dict | None = None) -> Tensor:
        """Run whole tokens (N,) of sequences in `slots` (host array) at positions `pos` through the model,
        appending their K/V; returns the final hidden states after the last norm (N, d). Rows of one slot
        must be consecutive and in position order: several rows per slot (prefill) attend causally.
        Host syncs: MoR expert choice one per recursion step (which rows go on), token choice one (the
        depths), none otherwise.
        stats: optional dict; stats["depth"] (Nr+1,) accumulates how many tokens ran 0…Nr steps."""
        h = self.model.embed(tokens)
        rope = self.rope(pos)
        everyone = RowSet(np.asarray(slots), self.device)
        h = self._phase([(layer, 0) for layer in self.plan.prelude], h, rope, pos, cache, everyone)
        if not self.mor:
            for keys in self._phases(self.plan.recursive_part):
                h = self._phase(keys, h, rope, pos, cache, everyone)
        else:
            h = self._recursion(h, rope, pos, cache, everyone, stats)
        h = self._phase([(layer, 0) for layer in self.plan.coda], h, rope, pos, cache, everyone)
        return self.model.norm(h)

    @staticmethod
    def _phases(keys: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Split unrolled positions (layer id, step) into runs of one step: the layers of a run hold the
        same tokens of each slot (under KV sharing, steps r >= 1 write nothing and read step 0's caches)."""
        runs: list[list[tuple[int, int]]] = []
        for key in keys:
            if runs and runs[-1][-1][1] == key[1]:
                runs[-1].append(key)
            else:
                runs.append([key])
        return runs

    def _phase(self, keys: list[tuple[int, int]], x: Tensor, rope: tuple[Tensor, Tensor], pos: Tensor,
               cache: PagedKVCache, rs: "RowSet") -> Tensor:
        """The layers `keys` (layer id, step) of one phase on rows x (N, d) of `rs`. They hold the same
        tokens of each slot, so the pages are reserved, the appends planned and the lengths and positions
        recorded once for the phase (one table upload, no sync); each layer then writes its K/V (fused with
        RoPE) and attends: several rows of a slot causally by position (prefill), one row per slot over
        its whole cache (decode)."""
        if not keys:
            return x
        S, dev = cache.max_slots, self.device
        groups = np.array([self.layout.read_group(layer, r) for layer, r in keys])
        host_rows = (groups[:, None] * S + rs.run_slots).ravel()  # (J·R,)
        rows = torch.from_numpy(groups).to(dev, non_blocking=True)[:, None] * S  # (J, 1) -> (J, N) below
        flat = None
        if self.layout.writes(keys[0][1]):
            counts = np.tile(rs.counts, len(keys))
            cache.reserve(host_rows, counts)
            flat = cache.append_slots(rows + rs.slots, pos, rs.rank)
            cache.host_lengths[host_rows] += counts
        if rs.newest:
            cache_rows = rows + rs.slots
            lengths = cache.lengths[cache_rows]
            attend = [lambda q, j=j: decode_attention(q, cache, cache_rows[j], lengths[j], self.decode_backend)
                      for j in range(len(keys))]
        else:
            prefill = PrefillAttention(pos, cache, rows + rs.run_slots_dev, rs.run_of, rs.rank, rs.width,
                                       int(cache.host_lengths[host_rows].max()), self.cfg.num_heads)
            attend = [lambda q, j=j: prefill(q, j) for j in range(len(keys))]
        for j, (layer_id, _) in enumerate(keys):
            x = self.layer_rows(layer_id, x, rope, cache, None if flat is None else flat[j], attend[j])
        return x

    def _recursion(self, h: Tensor, rope: tuple[Tensor, Tensor], pos: Tensor, cache: PagedKVCache,
                   everyone: "RowSet", stats: dict | None) -> Tensor:
        """The recursion steps, each on the rows still in it (compacted, so a token runs the shared block
        only at the depths it reaches): one host sync per step learns which rows go on (expert choice:
        step r's decision; token choice: the depth, read once), so each depth cache gets exactly its
        tokens' pages and the host knows every length."""
        dev, n = self.device, h.shape[0]
        idx = np.arange(n)  # rows in the recursion
        steps_run = np.zeros(n, dtype=np.int64)
        if self.token_choice:
            depth, weight = self.token_choice_depth(h)
            depth_host = depth.cpu().numpy()
            stack_input = h.clone()  # x, kept for the tokens' exits (h is updated in place)
        for step in range(self.num_recursions):
            at = torch.from_numpy(idx).to(dev, non_blocking=True)
            x = h[at]
            if self.expert_choice:
                logits, decide = self.router_logits(x, step)
                keep = np.flatnonzero((decide > 0).cpu().numpy())
                gate = expert_choice_weight(logits, self.model.router_cfg.alpha)
            else:
                keep = np.flatnonzero(depth_host[idx] >= step)
                gate = weight[at]
            if not len(keep):
                break
            if len(keep) < len(idx):
                sel = torch.from_numpy(keep).to(dev, non_blocking=True)
                idx, at, x, gate = idx[keep], at[sel], x[sel], gate[sel]
            y = self._phase([(layer, step) for layer in self.block], x, (rope[0][at], rope[1][at]), pos[at], cache,
                            RowSet(everyone.host_slots[idx], dev, newest=everyone.newest))
            if self.scale_output and self.expert_choice:
                y = expert_choice_update(x, y, gate[:, None], self.rule)
            elif self.scale_output:
                done = token_choice_exit(stack_input[at], x, y, gate[:, None], self.rule)
                y = torch.where((depth[at] == step)[:, None], done, y)
            h.index_copy_(0, at, y)
            steps_run[idx] += 1
        if stats is not None:
            stats["depth"] = stats.get("depth", 0) + np.bincount(steps_run, minlength=self.num_recursions + 1)
        return h

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.lm_head(hidden)


class RowSet:
    """Rows of the eager path grouped by slot, known on the host (so no layer needs a host sync): runs
    of consecutive rows of one slot, their lengths, and each row's rank within its run; the device
    copies come in one upload.

    newest: every row is its sequence's newest token (a decode call: one row per slot), so it may see every
    cached key. A recursion step's subset of a prefill can hold one row of a slot that is not: under KV
    sharing it reads step 0's cache, which holds the later tokens of its prompt too."""

    def __init__(self, slots: np.ndarray, device: torch.device, newest: bool | None = None):
        self.host_slots = slots
        n = len(slots)
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if n else np.zeros(0, dtype=np.int64)
        self.counts = np.diff(np.r_[starts, n])
        self.run_slots = slots[starts]
        self.width = int(self.counts.max()) if n else 0
        self.newest = self.width == 1 if newest is None else newest and self.width == 1
        run_of = np.repeat(np.arange(len(starts)), self.counts)
        packed = torch.from_numpy(np.concatenate([slots, run_of, np.arange(n) - starts[run_of], self.run_slots])
                                  .astype(np.int64)).to(device, non_blocking=True)
        self.slots, self.run_of, rank, self.run_slots_dev = packed.split([n, n, n, len(starts)])
        self.rank: Tensor | None = None if self.newest else rank
