"""Which tiles of the (query block × key block) grid an attention kernel must visit, and which need a mask.

For each "row" block (a query block for the forward and dQ kernels, a key block for the dK/dV kernel) one
program scans the blocks of the other side and writes four block indices (lo, a, b, hi):
- blocks outside [lo, hi) hold no visible (query, key) pair: skipped;
- blocks in [a, b) are *full*: every pair visible, every row real: processed without a mask;
- the rest of [lo, hi) is processed with the mask.
This holds for any positions (sorted or not). For MoR's sorted original positions it gives the usual causal
structure: full blocks up to the diagonal band, masked blocks on it, nothing after it; with document ids
also nothing before the document's first block. Queries at PAD_POS count as absent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mor_ds.kernels.common import seq_bounds


@triton.jit
def _query_block_stats(pos_ptr, doc_ptr, offs, length, HAS_DOC: tl.constexpr):
    """min/max position and document over real query rows, and whether every row is real."""
    valid = offs < length
    pos = tl.load(pos_ptr + offs, mask=valid, other=1073741824)
    real = valid & (pos < 1073741824)
    pmin = tl.min(tl.where(real, pos, 2147483647), 0)
    pmax = tl.max(tl.where(real, pos, -1), 0)
    complete = tl.min(real.to(tl.int32), 0) == 1
    if HAS_DOC:
        doc = tl.load(doc_ptr + offs, mask=valid, other=0)
        dmin = tl.min(tl.where(real, doc, 2147483647), 0)
        dmax = tl.max(tl.where(real, doc, -2147483647), 0)
    else:
        dmin = pmin * 0
        dmax = pmin * 0
    return pmin, pmax, dmin, dmax, complete


@triton.jit
def _key_block_stats(pos_ptr, doc_ptr, offs, length, HAS_DOC: tl.constexpr):
    """min position over real keys (PAD_POS keys are never visible), max over all in-range keys."""
    valid = offs < length
    pos = tl.load(pos_ptr + offs, mask=valid, other=1073741824)
    real = valid & (pos < 1073741824)
    pmin = tl.min(tl.where(real, pos, 2147483647), 0)
    pmax = tl.max(tl.where(valid, pos, 2147483647), 0)
    complete = tl.min(real.to(tl.int32), 0) == 1
    if HAS_DOC:
        doc = tl.load(doc_ptr + offs, mask=valid, other=0)
        dmin = tl.min(tl.where(real, doc, 2147483647), 0)
        dmax = tl.max(tl.where(real, doc, -2147483647), 0)
    else:
        dmin = pmin * 0
        dmax = pmin * 0
    return pmin, pmax, dmin, dmax, complete


@triton.jit
def _block_ranges_kernel(
    RANGES, QPOS, KPOS, QDOC, KDOC, CUQ, CUK,
    stride_qpos_b, stride_kpos_b, stride_ranges_b,
    seqlen_q, seqlen_k, n_cols,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    ROWS_ARE_KEYS: tl.constexpr, HAS_DOC: tl.constexpr, VARLEN: tl.constexpr,
):
    row = tl.program_id(0)
    b = tl.program_id(1)
    q_start, q_len = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len = seq_bounds(CUK, b, seqlen_k, VARLEN)
    qpos = QPOS + b * stride_qpos_b + q_start
    kpos = KPOS + b * stride_kpos_b + k_start
    qdoc = QDOC + b * stride_qpos_b + q_start
    kdoc = KDOC + b * stride_kpos_b + k_start
    if ROWS_ARE_KEYS:
        r_min, r_max, r_dmin, r_dmax, r_complete = _key_block_stats(
            kpos, kdoc, row * BLOCK_K + tl.arange(0, BLOCK_K), k_len, HAS_DOC)
    else:
        r_min, r_max, r_dmin, r_dmax, r_complete = _query_block_stats(
            qpos, qdoc, row * BLOCK_Q + tl.arange(0, BLOCK_Q), q_len, HAS_DOC)
    lo = n_cols + row * 0
    hi = row * 0
    a = row * 0 - 1
    b_end = row * 0 - 1
    for col in range(0, n_cols):
        if ROWS_ARE_KEYS:
            c_min, c_max, c_dmin, c_dmax, c_complete = _query_block_stats(
                qpos, qdoc, col * BLOCK_Q + tl.arange(0, BLOCK_Q), q_len, HAS_DOC)
            kmin, kmax, kdmin, kdmax = r_min, r_max, r_dmin, r_dmax
            qmin, qmax, qdmin, qdmax = c_min, c_max, c_dmin, c_dmax
        else:
            c_min, c_max, c_dmin, c_dmax, c_complete = _key_block_stats(
                kpos, kdoc, col * BLOCK_K + tl.arange(0, BLOCK_K), k_len, HAS_DOC)
            qmin, qmax, qdmin, qdmax = r_min, r_max, r_dmin, r_dmax
            kmin, kmax, kdmin, kdmax = c_min, c_max, c_dmin, c_dmax
        relevant = kmin <= qmax
        full = r_complete & c_complete & (kmax <= qmin)
        if HAS_DOC:
            relevant = relevant & (kdmin <= qdmax) & (qdmin <= kdmax)
            full = full & (qdmin == qdmax) & (kdmin == kdmax) & (qdmin == kdmin)
        lo = tl.where(relevant & (lo == n_cols), col, lo)
        hi = tl.where(relevant, col + 1, hi)
        a = tl.where(full & (a < 0), col, a)
        b_end = tl.where((a >= 0) & (b_end < 0) & (full == 0), col, b_end)
    lo = tl.where(hi == 0, 0, lo)
    no_full = a < 0
    a = tl.where(no_full, lo, a)
    b_end = tl.where(b_end < 0, tl.where(no_full, lo, hi), b_end)
    out = RANGES + b * stride_ranges_b + row * 4
    tl.store(out, lo)
    tl.store(out + 1, a)
    tl.store(out + 2, b_end)
    tl.store(out + 3, hi)


def block_ranges(
    q_pos: torch.Tensor, kv_pos: torch.Tensor, q_doc: torch.Tensor | None, kv_doc: torch.Tensor | None,
    cu_q: torch.Tensor | None, cu_k: torch.Tensor | None, batch: int, seqlen_q: int, seqlen_k: int,
    block_q: int, block_k: int, rows_are_keys: bool,
) -> torch.Tensor:
    """int32 (batch, n_row_blocks, 4) table of (lo, a, b, hi); see the module docstring.

    Positions/doc ids: int32, (B, S) dense (stride_b = S) or (total,) packed with cu_q / cu_k (varlen).
    seqlen_q / seqlen_k: the (maximum) lengths that set the block grids.
    """
    n_qb, n_kb = triton.cdiv(seqlen_q, block_q), triton.cdiv(seqlen_k, block_k)
    n_rows, n_cols = (n_kb, n_qb) if rows_are_keys else (n_qb, n_kb)
    ranges = torch.empty(batch, n_rows, 4, dtype=torch.int32, device=q_pos.device)
    varlen = cu_q is not None
    has_doc = q_doc is not None
    _block_ranges_kernel[(n_rows, batch)](
        ranges, q_pos, kv_pos, q_doc if has_doc else q_pos, kv_doc if has_doc else kv_pos,
        cu_q if varlen else q_pos, cu_k if varlen else kv_pos,
        0 if varlen else q_pos.stride(0), 0 if varlen else kv_pos.stride(0), ranges.stride(0),
        seqlen_q, seqlen_k, n_cols,
        BLOCK_Q=block_q, BLOCK_K=block_k, ROWS_ARE_KEYS=rows_are_keys, HAS_DOC=has_doc, VARLEN=varlen,
        num_warps=1,
    )
    return ranges
