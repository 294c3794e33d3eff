"""Pieces shared by the active-token attention kernels: where a sequence's rows live, and its positions.

Every kernel sees one "sequence" b as `length` logical rows i = 0…length−1:
- memory row of i: `start + i` (dense or packed varlen layout) or `rows[b, i]` (fused gather: row i is
  row rows[b, i] of a full-length tensor, and results are scattered back to that row);
- original position of i: `pos[base + i]` with base = b·length (dense, positions (B, S) contiguous) or the
  sequence's start (varlen), read in its own integer dtype; or simply i (POS_IS_INDEX: positions 0…S−1);
- document id likewise.
Visibility of key j to query i: kpos[j] <= qpos[i] (and same document). Queries at PAD_POS (padded slots)
see nothing: their output is 0 and they pass no gradient. Out-of-range rows load sentinels that make
them invisible, so the masked code path needs no separate bounds test.
"""

from __future__ import annotations

import triton
import triton.language as tl

PAD_POS = tl.constexpr(1 << 30)  # = mor_ds.attention.reference.PAD_POS (kernels import no torch-side code)
INT32_MAX = tl.constexpr(2**31 - 1)  # position of out-of-range keys: after every query
# Integer arguments that change with the active width from one call to the next (the row-statistics and
# block-table strides): unspecialised, like the lengths. Triton otherwise compiles a new kernel variant
# whenever such a value changes its divisibility by 16 or becomes 1, i.e. ~1 s of JIT in the middle of
# training steps as token-choice widths vary.
WIDTH_STRIDES = ("stride_stat_b", "stride_stat_h", "stride_ranges_b")


@triton.jit
def seq_bounds(cu_ptr, b, fixed_len, VARLEN: tl.constexpr):
    """(start row, length, base of the per-row index arrays) of sequence b."""
    if VARLEN:
        start = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - start
        base = start.to(tl.int64)
    else:
        start = b * 0
        length = fixed_len + b * 0
        base = b.to(tl.int64) * fixed_len
    return start, length, base


@triton.jit
def memory_rows(rows_ptr, start, offs, valid, GATHER: tl.constexpr):
    """Memory row (int64) of logical rows `offs`; rows_ptr already points at this sequence's index row."""
    if GATHER:
        r = tl.load(rows_ptr + offs, mask=valid, other=0).to(tl.int64)
    else:
        r = (start + offs).to(tl.int64)
    return r


@triton.jit
def load_positions(pos_ptr, offs, valid, other: tl.constexpr, POS_IS_INDEX: tl.constexpr):
    """int32 positions of logical rows `offs` (any shape); `other` where out of range."""
    if POS_IS_INDEX:
        p = tl.where(valid, offs, other)
    else:
        p = tl.load(pos_ptr + offs, mask=valid, other=other).to(tl.int32)
    return p


@triton.jit
def query_positions(pos_ptr, offs, valid, POS_IS_INDEX: tl.constexpr):
    """Positions of query rows; out-of-range and padded rows get −1: no key is at or before it."""
    p = load_positions(pos_ptr, offs, valid, -1, POS_IS_INDEX)
    return tl.where(p >= PAD_POS, -1, p)


@triton.jit
def key_positions(pos_ptr, offs, valid, POS_IS_INDEX: tl.constexpr):
    """Positions of key rows; out-of-range rows get INT32_MAX: after every query."""
    return load_positions(pos_ptr, offs, valid, INT32_MAX, POS_IS_INDEX)


@triton.jit
def load_docs(doc_ptr, offs, valid, other: tl.constexpr):
    return tl.load(doc_ptr + offs, mask=valid, other=other).to(tl.int32)


@triton.jit
def visible(qp, kp, qd, kd, HAS_DOC: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
    """(M, N) visibility; KEYS_ON_ROWS gives the transposed (N, M) tile used by the dK/dV kernel."""
    if KEYS_ON_ROWS:
        vis = kp[:, None] <= qp[None, :]
        if HAS_DOC:
            vis = vis & (kd[:, None] == qd[None, :])
    else:
        vis = kp[None, :] <= qp[:, None]
        if HAS_DOC:
            vis = vis & (kd[None, :] == qd[:, None])
    return vis


@triton.jit
def zero_inactive_rows(ptr, stride_s, row_map, chunk, full_len,
                       SPAN: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fused scatter: write zeros into the rows [chunk·SPAN, (chunk+1)·SPAN) of one (sequence, head) of a
    full-length result whose `row_map` entry is 0 (rows no active slot writes). The kernels run this in extra
    programs of their own launch, so the zero-fill overlaps the attention math instead of a memset before it."""
    offs_d = tl.arange(0, HEAD_DIM)
    zeros = tl.zeros([TILE, HEAD_DIM], dtype=ptr.dtype.element_ty)
    for t in range(0, SPAN, TILE):
        rows = chunk * SPAN + t + tl.arange(0, TILE)
        in_range = rows < full_len
        inactive = tl.load(row_map + rows, mask=in_range, other=1) == 0
        tl.store(ptr + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :], zeros, mask=inactive[:, None])


@triton.jit
def query_program(num_q_heads):
    """(query block, sequence b, query head h, b as int64) of this program of a query-major kernel."""
    bh = tl.program_id(1)
    b = bh // num_q_heads
    return tl.program_id(0), b, bh % num_q_heads, b.to(tl.int64)


@triton.jit
def zero_fill_program(ptr, stride_s, row_map, blk, n_rows, full_len,
                      BLOCK: tl.constexpr, ZERO_SPAN: tl.constexpr, HEAD_DIM: tl.constexpr):
    """With the fused scatter (ZERO_SPAN > 0) the programs past the last row block zero the rows of a
    full-length result that no active row writes (`zero_inactive_rows`); returns whether this program is one of
    them, i.e. has nothing else to do."""
    done = False
    if ZERO_SPAN > 0:
        n_blocks = tl.cdiv(n_rows, BLOCK)
        done = blk >= n_blocks
        if done:
            zero_inactive_rows(ptr, stride_s, row_map, blk - n_blocks, full_len, ZERO_SPAN, 64, HEAD_DIM)
    return done


@triton.jit
def load_row_tile(ptr, rows, valid, stride_s, HEAD_DIM: tl.constexpr):
    """(len(rows), HEAD_DIM) tile of one (sequence, head) at memory rows `rows`; zeros where not `valid`."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_s + offs_d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def key_side(K, V, KPOS, KDOC, KROWS, b64, kvh, k_base, stride_kb, stride_kh, stride_vb, stride_vh):
    """What a query block's key loop reads: K and V of KV head `kvh` of sequence b, and the sequence's key
    positions, document ids and memory rows."""
    return (K + b64 * stride_kb + kvh * stride_kh, V + b64 * stride_vb + kvh * stride_vh,
            KPOS + k_base, KDOC + k_base, KROWS + k_base)


@triton.jit
def query_block_setup(
    qblk, b, QPOS, QDOC, QROWS, CUQ, CUK, RANGES, stride_ranges_b, seqlen_q, seqlen_k,
    BLOCK_M: tl.constexpr, HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr,
    Q_POS_IS_INDEX: tl.constexpr,
):
    """Shared prologue of the query-major kernels (forward, dQ) for query block `qblk` of sequence b: its rows,
    memory rows, positions, document ids, the key sequence's bounds and the block's (lo, a, b, hi) range."""
    q_start, q_len, q_base = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len, k_base = seq_bounds(CUK, b, seqlen_k, VARLEN)
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q_rows = memory_rows(QROWS + q_base, q_start, offs_m, m_valid, Q_GATHER)
    qp = query_positions(QPOS + q_base, offs_m, m_valid, Q_POS_IS_INDEX)
    if HAS_DOC:
        qd = load_docs(QDOC + q_base, offs_m, m_valid, -2)
    else:
        qd = qp
    if Q_GATHER:  # a padded slot's row index is a placeholder: never write through it
        m_store = m_valid & (qp >= 0)
    else:
        m_store = m_valid
    rng = RANGES + b.to(tl.int64) * stride_ranges_b + qblk * 4
    return (q_start, offs_m, m_valid, m_store, q_rows, qp, qd, k_start, k_len, k_base,
            tl.load(rng), tl.load(rng + 1), tl.load(rng + 2), tl.load(rng + 3))
