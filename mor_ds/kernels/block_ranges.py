"""Which tiles of the (query block × key block) grid an attention kernel must visit, and which need a mask.

For each "row" block (a query block for the forward and dQ kernels, a key block for the dK/dV kernel) the
blocks of the other side are summarised as four indices (lo, a, b, hi):
- blocks outside [lo, hi) hold no visible (query, key) pair: skipped;
- blocks in [a, b) are *full*: every pair visible, every row real: processed without a mask;
- the rest of [lo, hi) is processed with the mask.
A block pair is relevant iff min key position <= max query position (and the document ranges overlap); it
is full iff max key position <= min query position, both blocks have only real rows and one shared
document. This holds for any positions (sorted or not). For MoR's sorted original positions it gives the
usual causal structure: full blocks up to the diagonal band, masked blocks on it, nothing after it; with
document ids also nothing before the document's first block. Queries at PAD_POS count as absent.

One launch writes both tables (query-major for forward/dQ, key-major for dK/dV); the forward keeps them
for the backward. Column blocks are scanned CHUNK at a time with vector reductions. With a fused gather/scatter
the same launch also writes the row maps (int8, (B, full length): 1 where a real active slot reads/writes the
row) with which the kernels' extra programs zero the rows of full-length results that no slot writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mor_ds.kernels.common import INT32_MAX, PAD_POS, load_docs, load_positions, seq_bounds


@triton.jit
def _block_stats(pos_ptr, doc_ptr, offs, length, IS_KEY: tl.constexpr, POS_IS_INDEX: tl.constexpr,
                 HAS_DOC: tl.constexpr):
    """Per block (reducing axis 1 of `offs`): min/max position and document of the real rows, and whether
    every row is real. Keys: the max counts padded keys too (a block holding one is never full)."""
    valid = offs < length
    pos = load_positions(pos_ptr, offs, valid, PAD_POS, POS_IS_INDEX)
    real = valid & (pos < PAD_POS)
    pmin = tl.min(tl.where(real, pos, INT32_MAX), 1)
    if IS_KEY:
        pmax = tl.max(tl.where(valid, pos, INT32_MAX), 1)
    else:
        pmax = tl.max(tl.where(real, pos, -1), 1)
    complete = tl.min(real.to(tl.int32), 1) == 1
    if HAS_DOC:
        doc = load_docs(doc_ptr, offs, valid, 0)
        dmin = tl.min(tl.where(real, doc, INT32_MAX), 1)
        dmax = tl.max(tl.where(real, doc, -INT32_MAX), 1)
    else:
        dmin = pmin * 0
        dmax = pmin * 0
    return pmin, pmax, dmin, dmax, complete


@triton.jit
def _table_row(out, row, qpos, kpos, qdoc, kdoc, q_len, k_len, n_cols,
               BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_ARE_KEYS: tl.constexpr, CHUNK: tl.constexpr,
               Q_POS_IS_INDEX: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, HAS_DOC: tl.constexpr):
    if ROWS_ARE_KEYS:
        kmin, kmax, kdmin, kdmax, kfull = _block_stats(
            kpos, kdoc, row * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], k_len, True, KV_POS_IS_INDEX, HAS_DOC)
    else:
        qmin, qmax, qdmin, qdmax, qfull = _block_stats(
            qpos, qdoc, row * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :], q_len, False, Q_POS_IS_INDEX, HAS_DOC)
    lo = n_cols + row * 0
    hi = row * 0
    a = row * 0 - 1
    b_end = row * 0 - 1
    for c0 in range(0, n_cols, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        if ROWS_ARE_KEYS:
            qmin, qmax, qdmin, qdmax, qfull = _block_stats(
                qpos, qdoc, cols[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :], q_len, False,
                Q_POS_IS_INDEX, HAS_DOC)
        else:
            kmin, kmax, kdmin, kdmax, kfull = _block_stats(
                kpos, kdoc, cols[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], k_len, True,
                KV_POS_IS_INDEX, HAS_DOC)
        relevant = (kmin <= qmax) & (cols < n_cols)
        full = qfull & kfull & (kmax <= qmin) & relevant
        if HAS_DOC:
            relevant = relevant & (kdmin <= qdmax) & (qdmin <= kdmax)
            full = full & (qdmin == qdmax) & (kdmin == kdmax) & (qdmin == kdmin)
        lo = tl.minimum(lo, tl.min(tl.where(relevant, cols, n_cols), 0))
        hi = tl.maximum(hi, tl.max(tl.where(relevant, cols + 1, 0), 0))
        first_full = tl.min(tl.where(full, cols, INT32_MAX), 0)
        a = tl.where((a < 0) & (first_full < INT32_MAX), first_full, a)
        first_partial = tl.min(tl.where((full == 0) & (cols > a) & (a >= 0), cols, INT32_MAX), 0)
        b_end = tl.where((b_end < 0) & (first_partial < INT32_MAX), first_partial, b_end)
    lo = tl.where(hi == 0, 0, lo)
    no_full = a < 0
    a = tl.where(no_full, lo, a)
    b_end = tl.where(b_end < 0, tl.where(no_full, lo, hi), b_end)
    tl.store(out, lo)
    tl.store(out + 1, a)
    tl.store(out + 2, b_end)
    tl.store(out + 3, hi)


@triton.jit
def _row_map(out, rows, pos, n_slots, full_len, POS_IS_INDEX: tl.constexpr, TILE: tl.constexpr):
    """out[r] = 1 iff some real slot (position < PAD_POS) of this sequence has rows[slot] = r, else 0."""
    for r0 in range(0, full_len, TILE):
        r = r0 + tl.arange(0, TILE)
        tl.store(out + r, tl.zeros([TILE], dtype=tl.int8), mask=r < full_len)
    tl.debug_barrier()  # the zeros land before any thread's ones
    for s0 in range(0, n_slots, TILE):
        slot = s0 + tl.arange(0, TILE)
        real = (slot < n_slots) & (load_positions(pos, slot, slot < n_slots, PAD_POS, POS_IS_INDEX) < PAD_POS)
        r = tl.load(rows + slot, mask=real, other=0)
        tl.store(out + r, tl.full([TILE], 1, dtype=tl.int8), mask=real)


# lengths and table strides vary with the active width: unspecialised (common.WIDTH_STRIDES says why)
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "full_len_q", "full_len_k", "stride_table", "stride_b"])
def block_ranges_kernel(
    RANGES, QPOS, KPOS, QDOC, KDOC, CUQ, CUK, QROWS, KROWS, QMAP, KMAP,
    seqlen_q, seqlen_k, full_len_q, full_len_k, stride_table, stride_b,
    FWD_Q: tl.constexpr, FWD_K: tl.constexpr, BWD_Q: tl.constexpr, BWD_K: tl.constexpr, CHUNK: tl.constexpr,
    Q_POS_IS_INDEX: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, HAS_DOC: tl.constexpr, VARLEN: tl.constexpr,
    Q_MAP: tl.constexpr, K_MAP: tl.constexpr,
):
    row = tl.program_id(0)
    b = tl.program_id(1)
    table = tl.program_id(2)  # 0: forward/dQ table, 1: dK/dV table, 2: query row map, 3: key row map
    q_start, q_len, q_base = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len, k_base = seq_bounds(CUK, b, seqlen_k, VARLEN)
    qpos, qdoc = QPOS + q_base, QDOC + q_base
    kpos, kdoc = KPOS + k_base, KDOC + k_base
    out = RANGES + table * stride_table + b * stride_b + row * 4
    if table == 0:
        if row < tl.cdiv(seqlen_q, FWD_Q):
            _table_row(out, row, qpos, kpos, qdoc, kdoc, q_len, k_len, tl.cdiv(seqlen_k, FWD_K),
                       FWD_Q, FWD_K, False, CHUNK, Q_POS_IS_INDEX, KV_POS_IS_INDEX, HAS_DOC)
    elif table == 1:
        if row < tl.cdiv(seqlen_k, BWD_K):
            _table_row(out, row, qpos, kpos, qdoc, kdoc, q_len, k_len, tl.cdiv(seqlen_q, BWD_Q),
                       BWD_Q, BWD_K, True, CHUNK, Q_POS_IS_INDEX, KV_POS_IS_INDEX, HAS_DOC)
    elif table == 2:
        if Q_MAP:
            if row == 0:
                _row_map(QMAP + b.to(tl.int64) * full_len_q, QROWS + q_base, qpos, q_len, full_len_q,
                         Q_POS_IS_INDEX, 1024)
    else:
        if K_MAP:
            if row == 0:
                _row_map(KMAP + b.to(tl.int64) * full_len_k, KROWS + k_base, kpos, k_len, full_len_k,
                         KV_POS_IS_INDEX, 1024)


def block_ranges(
    q_pos: torch.Tensor | None, kv_pos: torch.Tensor | None, q_doc: torch.Tensor | None,
    kv_doc: torch.Tensor | None, cu_q: torch.Tensor | None, cu_k: torch.Tensor | None,
    batch: int, seqlen_q: int, seqlen_k: int, fwd_tiles: tuple[int, int], bwd_tiles: tuple[int, int],
    device: torch.device, q_rows: torch.Tensor | None = None, kv_rows: torch.Tensor | None = None,
    full_len_q: int = 0, full_len_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """int32 tables of (lo, a, b, hi): (batch, query blocks, 4) for `fwd_tiles` = (block_q, block_k) and
    (batch, key blocks, 4) for `bwd_tiles`; and the int8 row maps (batch, full_len) of `q_rows` / `kv_rows`
    (None where not given; one shared map when they are the same tensor). Positions None = 0…S−1;
    positions/doc ids are contiguous (B, S) or packed (T,) with cu_q / cu_k (varlen); seqlen_q / seqlen_k
    are the (maximum) lengths."""
    rows_fwd = triton.cdiv(seqlen_q, fwd_tiles[0])
    rows_bwd = triton.cdiv(seqlen_k, bwd_tiles[1])
    n_rows = max(rows_fwd, rows_bwd)
    ranges = torch.empty(2, batch, n_rows, 4, dtype=torch.int32, device=device)
    q_map = torch.empty(batch, full_len_q, dtype=torch.int8, device=device) if q_rows is not None else None
    kv_map = None
    if kv_rows is not None:
        same = kv_rows is q_rows and full_len_k == full_len_q
        kv_map = q_map if same else torch.empty(batch, full_len_k, dtype=torch.int8, device=device)
    dummy = ranges
    has_doc = q_doc is not None
    build_k_map = kv_map is not None and kv_map is not q_map
    block_ranges_kernel[(n_rows, batch, 4 if q_map is not None or build_k_map else 2)](
        ranges, *(x if x is not None else dummy for x in (q_pos, kv_pos, q_doc, kv_doc, cu_q, cu_k, q_rows, kv_rows,
                                                            q_map, kv_map)),
        seqlen_q, seqlen_k, full_len_q, full_len_k, ranges.stride(0), ranges.stride(1),
        FWD_Q=fwd_tiles[0], FWD_K=fwd_tiles[1], BWD_Q=bwd_tiles[0], BWD_K=bwd_tiles[1], CHUNK=16,
        Q_POS_IS_INDEX=q_pos is None, KV_POS_IS_INDEX=kv_pos is None, HAS_DOC=has_doc, VARLEN=cu_q is not None,
        Q_MAP=q_map is not None, K_MAP=build_k_map, num_warps=4,
    )
    return ranges[0], ranges[1], q_map, kv_map
