"""Attention of query rows over their paged KV caches.

- `decode_attention`: one query per cache row that sees the row's whole cache (one new token per
  sequence; its own K/V already appended). Fixed shapes, no host sync: CUDA-graph safe. On CUDA a
  Triton kernel reads only the `length` cached tokens of each row; elsewhere a PyTorch version gathers
  the pages (the oracle for the kernel).
- `PrefillAttention`: several queries per cache row (a prompt chunk), causal by original position, for
  the layers of one phase (mask and page lists built once; SDPA per layer).
Rows with length 0 (masked rows in a fixed-shape step) return zeros.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mor_ds.attention.reference import PAD_POS, visibility_mask
from mor_ds.inference.kv_cache import PagedKVCache

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":  # CPU tests run the kernel interpreted
    from mor_ds.patches import patch_interpreter

    patch_interpreter()


def _gather_pages(cache: PagedKVCache, rows: Tensor, num_pages: int) -> tuple[Tensor, Tensor, Tensor]:
    """K, V (R, Hkv, T, D) and positions (R, T) of the first `num_pages` pages of each cache row."""
    pages = cache.tables[rows, :num_pages].long()  # (R, P)
    k = cache.k[pages].flatten(1, 2).transpose(1, 2)
    v = cache.v[pages].flatten(1, 2).transpose(1, 2)
    return k, v, cache.pos[pages].flatten(1)


def decode_attention_torch(q: Tensor, cache: PagedKVCache, rows: Tensor, lengths: Tensor) -> Tensor:
    """q (N, Hq, D); each row attends to the first lengths[i] tokens of cache row rows[i]."""
    k, v, _ = _gather_pages(cache, rows, cache.pages_per_seq)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("nhd,nhtd->nht", q.to(compute), k.to(compute)) / math.sqrt(q.shape[-1])
    visible = torch.arange(k.shape[2], device=q.device) < lengths[:, None, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("nht,nhtd->nhd", probs, v.to(compute)).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_kernel(Q, K, V, Out, Tables, Rows, Lengths, scale,
                       stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_on, stride_oh, stride_t,
                       PAGE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK: tl.constexpr):
        """One program per (query row, KV head): the GROUP query heads sharing that KV head (GQA, padded
        to GROUP_PAD >= 16 rows for tl.dot), online softmax over the row's cached tokens in blocks of
        BLOCK, each token's page looked up in the row's page table."""
        n = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(Lengths + n)
        table = Tables + tl.load(Rows + n).to(tl.int64) * stride_t
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(Q + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < GROUP, other=0.0)
        q = (q.to(tl.float32) * scale).to(K.dtype.element_ty)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        denom = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, length, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < length
            page = tl.load(table + t // PAGE, mask=valid, other=0).to(tl.int64)
            offs = page * stride_kp + (t % PAGE) * stride_ks + kv_head * stride_kh
            k = tl.load(K + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(V + offs[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))  # (GROUP_PAD, BLOCK), fp32 accumulation
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.maximum(denom, 1e-30)[:, None]
        tl.store(Out + n * stride_on + heads[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty),
                 mask=g[:, None] < GROUP)


def decode_attention_triton(q: Tensor, cache: PagedKVCache, rows: Tensor, lengths: Tensor, block: int = 64,
                            num_warps: int = 4) -> Tensor:
    n, heads, head_dim = q.shape
    kv_heads = cache.k.shape[2]
    group = heads // kv_heads
    assert q.stride(2) == 1, "head_dim must be contiguous"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode_kernel[(n, kv_heads)](
        q, cache.k, cache.v, out, cache.tables, rows, lengths, 1.0 / math.sqrt(head_dim),
        q.stride(0), q.stride(1), cache.k.stride(0), cache.k.stride(1), cache.k.stride(2),
        out.stride(0), out.stride(1), cache.tables.stride(0),
        PAGE=cache.page_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK=block, num_warps=num_warps,
    )
    return out


def decode_attention(q: Tensor, cache: PagedKVCache, rows: Tensor, lengths: Tensor, backend: str = "auto") -> Tensor:
    """backend: "auto" (Triton on CUDA, else torch), "triton" or "torch"."""
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton is not None else "torch"
    if backend == "triton":
        return decode_attention_triton(q, cache, rows, lengths)
    return decode_attention_torch(q, cache, rows, lengths)


# On CUDA the masked prefill SDPA runs the memory-efficient kernel: SDPA's first choice for a masked call on Hopper,
# cuDNN attention, builds an execution plan for every new shape — ~1.5 ms of host time per layer call, paid on every
# prefill as MoR's compacted recursion steps change their widths. The memory-efficient kernel takes the same mask with
# no per-shape setup.
MASKED_PREFILL_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class PrefillAttention:
    """Several queries per cache row (prompt chunks), causal by original position, for the J layers of one
    phase. The layers of a phase hold the same tokens of each slot, so which cached key each query sees is
    the same for all of them: the visibility mask and every layer's K/V slots are worked out once per
    phase, and each layer gathers its K/V and runs SDPA (masked) over the runs padded to the longest
    (`width`).

    q_pos (N,) the queries' positions; rows (J, R) the cache rows each layer reads, one per run of
    queries; run_of / rank (N,) each query's run and rank in it; max_len = the longest cached row
    (host-known, so no sync). Key j is visible iff its position <= the query's (the queries' own K/V
    are appended before the layer attends)."""

    def __init__(self, q_pos: Tensor, cache: PagedKVCache, rows: Tensor, run_of: Tensor, rank: Tensor, width: int,
                 max_len: int, num_heads: int):
        self.cache, self.run_of, self.rank = cache, run_of, rank
        dev, page = q_pos.device, cache.page_size
        pages = cache.tables[rows, :-(-max_len // page)].long()  # (J, R, P)
        self.kv_slots = (pages[..., None] * page + torch.arange(page, device=dev)).flatten(2)  # (J, R, T)
        # each query head's K/V head (GQA), so one gather yields (R, T, Hq, D): SDPA's memory-efficient kernel
        # (the one that takes a mask) does no GQA, and with enable_gqa it would fall back to the math path
        self.heads = torch.arange(num_heads, device=dev) // (num_heads // cache.k.shape[2])
        kv_pos = cache.pos.view(-1)[self.kv_slots[0]]  # (R, T)
        filled = torch.arange(kv_pos.shape[1], device=dev) < cache.lengths[rows[0], None]
        kv_pos = torch.where(filled, kv_pos.long(), PAD_POS)
        runs = rows.shape[1]
        dense_pos = torch.zeros(runs, width, dtype=torch.long, device=dev)
        dense_pos[run_of, rank] = q_pos
        self.mask = visibility_mask(dense_pos, kv_pos)  # (R, 1, width, T); padded queries see every key
        self.dense_rows = torch.zeros(runs, width, dtype=torch.long, device=dev)  # padded places read row 0
        self.dense_rows[run_of, rank] = torch.arange(len(q_pos), device=dev)

    def __call__(self, q: Tensor, layer: int) -> Tensor:
        """q (N, Hq, D) of the phase's layer `layer` -> attention output (N, Hq, D)."""
        at = (self.kv_slots[layer][..., None], self.heads)
        k = self.cache.k.view(-1, *self.cache.k.shape[2:])[at].transpose(1, 2)  # (R, Hq, T, D)
        v = self.cache.v.view(-1, *self.cache.v.shape[2:])[at].transpose(1, 2)
        with sdpa_kernel(MASKED_PREFILL_BACKENDS) if q.is_cuda else nullcontext():
            out = F.scaled_dot_product_attention(q[self.dense_rows].transpose(1, 2), k, v, attn_mask=self.mask)
        return out.transpose(1, 2)[self.run_of, self.rank]
