"""Forward kernel: flash attention (online softmax, fp32 accumulation) over original positions.

One program = one query block of one (sequence, query head). It visits only the key blocks listed by
`block_ranges` (masked / full / masked runs) and stores O and the row log-sum-exp (base 2) for the backward.
With a fused scatter (ZERO_SPAN > 0), programs past the last query block zero the output rows of inactive tokens.
GQA: query head h reads key/value head h // GROUP. Scores use exp2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mor_ds.kernels.common import (
    WIDTH_STRIDES, key_positions, key_side, load_docs, load_row_tile, memory_rows, query_block_setup,
    query_program, visible, zero_fill_program,
)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, qp, qd,
    k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len, stride_ks, stride_vs,
    blk_lo, blk_hi, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, HAS_DOC: tl.constexpr,
    KV_GATHER: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
):
    """Key blocks [blk_lo, blk_hi); MASKED: apply the visibility mask (runs at either end of the block range)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        rows = memory_rows(krows, k_start, offs_n, n_valid, KV_GATHER)
        if MASKED:
            kt = tl.load(k_ptr + rows[None, :] * stride_ks + offs_d[:, None], mask=n_valid[None, :], other=0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_vs + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        else:
            kt = tl.load(k_ptr + rows[None, :] * stride_ks + offs_d[:, None])
            v = tl.load(v_ptr + rows[:, None] * stride_vs + offs_d[None, :])
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt)
        if MASKED:
            kp = key_positions(kpos, offs_n, n_valid, KV_POS_IS_INDEX)
            if HAS_DOC:
                kd = load_docs(kdoc, offs_n, n_valid, -1)
            else:
                kd = kp
            s = tl.where(visible(qp, kp, qd, kd, HAS_DOC, False) == 0, float("-inf"), s)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["num_q_heads", "seqlen_q", "seqlen_k", "full_len_q", *WIDTH_STRIDES])
def attention_fwd_kernel(
    Q, K, V, O, LSE, QPOS, KPOS, QDOC, KDOC, QROWS, KROWS, CUQ, CUK, RANGES, QMAP,
    qk_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    stride_stat_b, stride_stat_h, stride_ranges_b,
    num_q_heads, seqlen_q, seqlen_k, full_len_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    Q_POS_IS_INDEX: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
    ZERO_SPAN: tl.constexpr,
):
    qblk, b, h, b64 = query_program(num_q_heads)
    o_ptr = O + b64 * stride_ob + h * stride_oh
    if zero_fill_program(o_ptr, stride_os, QMAP + b64 * full_len_q, qblk, seqlen_q, full_len_q,
                         BLOCK_M, ZERO_SPAN, HEAD_DIM):
        return
    q_start, offs_m, m_valid, m_store, q_rows, qp, qd, k_start, k_len, k_base, lo, a, b_end, hi = \
        query_block_setup(qblk, b, QPOS, QDOC, QROWS, CUQ, CUK, RANGES, stride_ranges_b, seqlen_q, seqlen_k,
                          BLOCK_M, HAS_DOC, VARLEN, Q_GATHER, Q_POS_IS_INDEX)
    q = load_row_tile(Q + b64 * stride_qb + h * stride_qh, q_rows, m_valid, stride_qs, HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)

    k_ptr, v_ptr, kpos, kdoc, krows = key_side(K, V, KPOS, KDOC, KROWS, b64, h // GROUP, k_base,
                                               stride_kb, stride_kh, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # masked, full (no mask code), masked runs
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                               stride_ks, stride_vs, lo, a, qk_scale,
                               BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                               stride_ks, stride_vs, a, b_end, qk_scale,
                               BLOCK_N, HEAD_DIM, False, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                               stride_ks, stride_vs, b_end, hi, qk_scale,
                               BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)

    seen = l_i > 0.0  # rows with no visible key (padded queries): output 0, lse +inf (no gradient)
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(l_safe), float("inf"))
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(o_ptr + q_rows[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_store[:, None])
    tl.store(LSE + b64 * stride_stat_b + h * stride_stat_h + q_start + offs_m, lse, mask=m_valid)
