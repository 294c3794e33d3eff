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
