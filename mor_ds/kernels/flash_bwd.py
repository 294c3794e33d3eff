"""Backward kernels (FlashAttention-2 style, recomputing P from the saved log-sum-exp).

- `attention_bwd_dq_kernel` (runs first): one program = one query block of one (sequence, query head); it
  also computes Δ_i = Σ_d O_id·dO_id for its rows and stores it for the next kernel.
- `attention_bwd_dkdv_kernel`: one program = one key block of one (sequence, KV head); it loops over the
  GROUP query heads that share it (GQA) and their query blocks, so dK/dV are summed in registers (no atomics).
With s = q·k, p = exp2(s·qk_scale − lse): dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ), dQ = scale·dS K,
dK = scale·dSᵀ Q (scale = 1/√D).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mor_ds.kernels.common import (
    PAD_POS, WIDTH_STRIDES, key_positions, key_side, load_docs, load_row_tile, memory_rows, query_block_setup,
    query_positions, query_program, seq_bounds, visible, zero_fill_program, zero_inactive_rows,
)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, kp, kd,
    q_base, do_base, lse_base, delta_base, qpos, qdoc, qrows, q_start, q_len, stride_qs, stride_dos,
    blk_lo, blk_hi, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, HAS_DOC: tl.constexpr,
    Q_GATHER: tl.constexpr, Q_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for blk in range(blk_lo, blk_hi):
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        rows = memory_rows(qrows, q_start, offs_m, m_valid, Q_GATHER)
        if MASKED:
            qt = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=m_valid[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        else:
            qt = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None])
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :])
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        st = tl.dot(k, qt)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASKED:
            qp = query_positions(qpos, offs_m, m_valid, Q_POS_IS_INDEX)
            if HAS_DOC:
                qd = load_docs(qdoc, offs_m, m_valid, -2)
            else:
                qd = qp
            pt = tl.where(visible(qp, kp, qd, kd, HAS_DOC, True), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _dkdv_group_tiles(
    dk, dv, k, v, kp, kd,
    q_ptr, do_ptr, lse_ptr, delta_ptr, stride_qh, stride_doh, stride_stat_h, qpos, qdoc, qrows, q_start, q_len,
    stride_qs, stride_dos, lo, a, b_end, hi, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DOC: tl.constexpr,
    Q_GATHER: tl.constexpr, Q_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
):
    """The GROUP query heads × query blocks [lo, hi) (head-major) as one
    software-pipelined loop (at small k a key block sees only a few query blocks: separate short loops per head
    and run would each pay the pipeline's fill and drain). The mask is applied outside the full run [a, b)."""
    offs_d = tl.arange(0, HEAD_DIM)
    n_blk = hi - lo
    for it in range(GROUP * n_blk):
        g = it // n_blk
        blk = lo + it - g * n_blk
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        rows = memory_rows(qrows, q_start, offs_m, m_valid, Q_GATHER)
        qt = tl.load(q_ptr + g * stride_qh + rows[None, :] * stride_qs + offs_d[:, None], mask=m_valid[None, :],
                     other=0.0)
        do = tl.load(do_ptr + g * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                     mask=m_valid[:, None], other=0.0)
        lse = tl.load(lse_ptr + g * stride_stat_h + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(delta_ptr + g * stride_stat_h + offs_m, mask=m_valid, other=0.0)
        qp = query_positions(qpos, offs_m, m_valid, Q_POS_IS_INDEX)
        if HAS_DOC:
            qd = load_docs(qdoc, offs_m, m_valid, -2)
        else:
            qd = qp
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        st = tl.dot(k, qt)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        hidden = (visible(qp, kp, qd, kd, HAS_DOC, True) == 0) & ((blk < a) | (blk >= b_end))
        pt = tl.where(hidden, 0.0, pt)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit(do_not_specialize=["num_kv_heads", "seqlen_q", "seqlen_k", "full_len_k", *WIDTH_STRIDES])
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, QROWS, KROWS, CUQ, CUK, RANGES, KMAP,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    stride_stat_b, stride_stat_h, stride_ranges_b,
    num_kv_heads, seqlen_q, seqlen_k, full_len_k,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    Q_POS_IS_INDEX: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
    ZERO_SPAN: tl.constexpr, SINGLE_LOOP: tl.constexpr,
):
    kblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    b64 = b.to(tl.int64)
    dk_ptr = DK + b64 * stride_dkb + kvh * stride_dkh
    dv_ptr = DV + b64 * stride_dvb + kvh * stride_dvh
    if ZERO_SPAN > 0:  # programs past the key blocks zero the dK/dV rows of inactive tokens
        n_blocks = tl.cdiv(seqlen_k, BLOCK_N)
        if kblk >= n_blocks:
            row_map = KMAP + b64 * full_len_k
            zero_inactive_rows(dk_ptr, stride_dks, row_map, kblk - n_blocks, full_len_k, ZERO_SPAN, 64, HEAD_DIM)
            zero_inactive_rows(dv_ptr, stride_dvs, row_map, kblk - n_blocks, full_len_k, ZERO_SPAN, 64, HEAD_DIM)
            return
    q_start, q_len, q_base = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len, k_base = seq_bounds(CUK, b, seqlen_k, VARLEN)

    offs_n = kblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < k_len
    k_rows = memory_rows(KROWS + k_base, k_start, offs_n, n_valid, KV_GATHER)
    k = load_row_tile(K + b64 * stride_kb + kvh * stride_kh, k_rows, n_valid, stride_ks, HEAD_DIM)
    v = load_row_tile(V + b64 * stride_vb + kvh * stride_vh, k_rows, n_valid, stride_vs, HEAD_DIM)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kp = key_positions(KPOS + k_base, offs_n, n_valid, KV_POS_IS_INDEX)
    if HAS_DOC:
        kd = load_docs(KDOC + k_base, offs_n, n_valid, -1)
    else:
        kd = kp

    rng = RANGES + b64 * stride_ranges_b + kblk * 4
    lo = tl.load(rng)
    a = tl.load(rng + 1)
    b_end = tl.load(rng + 2)
    hi = tl.load(rng + 3)

    qpos = QPOS + q_base
    qdoc = QDOC + q_base
    qrows = QROWS + q_base
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if SINGLE_LOOP:
        h0 = kvh * GROUP
        dk, dv = _dkdv_group_tiles(
            dk, dv, k, v, kp, kd, Q + b64 * stride_qb + h0 * stride_qh, DO + b64 * stride_dob + h0 * stride_doh,
            LSE + b64 * stride_stat_b + h0 * stride_stat_h + q_start,
            DELTA + b64 * stride_stat_b + h0 * stride_stat_h + q_start, stride_qh, stride_doh, stride_stat_h,
            qpos, qdoc, qrows, q_start, q_len, stride_qs, stride_dos, lo, a, b_end, hi, qk_scale,
            GROUP, BLOCK_M, HEAD_DIM, HAS_DOC, Q_GATHER, Q_POS_IS_INDEX, UPCAST)
    else:
        for g in range(GROUP):
            h = kvh * GROUP + g
            q_ptr = Q + b64 * stride_qb + h * stride_qh
            do_ptr = DO + b64 * stride_dob + h * stride_doh
            lse_ptr = LSE + b64 * stride_stat_b + h * stride_stat_h + q_start
            delta_ptr = DELTA + b64 * stride_stat_b + h * stride_stat_h + q_start
            dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_ptr, do_ptr, lse_ptr, delta_ptr, qpos, qdoc, qrows,
                                 q_start, q_len, stride_qs, stride_dos, lo, a, qk_scale,
                                 BLOCK_M, HEAD_DIM, True, HAS_DOC, Q_GATHER, Q_POS_IS_INDEX, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_ptr, do_ptr, lse_ptr, delta_ptr, qpos, qdoc, qrows,
                                 q_start, q_len, stride_qs, stride_dos, a, b_end, qk_scale,
                                 BLOCK_M, HEAD_DIM, False, HAS_DOC, Q_GATHER, Q_POS_IS_INDEX, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_ptr, do_ptr, lse_ptr, delta_ptr, qpos, qdoc, qrows,
                                 q_start, q_len, stride_qs, stride_dos, b_end, hi, qk_scale,
                                 BLOCK_M, HEAD_DIM, True, HAS_DOC, Q_GATHER, Q_POS_IS_INDEX, UPCAST)
    n_store = store_rows(n_valid, kp, KV_GATHER)
    tl.store(dk_ptr + k_rows[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_store[:, None])
    tl.store(dv_ptr + k_rows[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_store[:, None])


@triton.jit
def store_rows(n_valid, kp, KV_GATHER: tl.constexpr):
    """Key rows whose gradients are written: a padded slot's row index is a placeholder, never written through."""
    if KV_GATHER:
        n_store = n_valid & (kp < PAD_POS)
    else:
        n_store = n_valid
    return n_store


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, qp, qd,
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
            k = tl.load(k_ptr + rows[:, None] * stride_ks + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            vt = tl.load(v_ptr + rows[None, :] * stride_vs + offs_d[:, None], mask=n_valid[None, :], other=0.0)
        else:
            k = tl.load(k_ptr + rows[:, None] * stride_ks + offs_d[None, :])
            vt = tl.load(v_ptr + rows[None, :] * stride_vs + offs_d[:, None])
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            kp = key_positions(kpos, offs_n, n_valid, KV_POS_IS_INDEX)
            if HAS_DOC:
                kd = load_docs(kdoc, offs_n, n_valid, -1)
            else:
                kd = kp
            p = tl.where(visible(qp, kp, qd, kd, HAS_DOC, False) == 0, 0.0, p)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["num_q_heads", "seqlen_q", "seqlen_k", "full_len_q", *WIDTH_STRIDES])
def attention_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, QROWS, KROWS, CUQ, CUK, RANGES, QMAP,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
    stride_stat_b, stride_stat_h, stride_ranges_b,
    num_q_heads, seqlen_q, seqlen_k, full_len_q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    Q_POS_IS_INDEX: tl.constexpr, KV_POS_IS_INDEX: tl.constexpr, UPCAST: tl.constexpr,
    ZERO_SPAN: tl.constexpr,
):
    qblk, b, h, b64 = query_program(num_q_heads)
    dq_ptr = DQ + b64 * stride_dqb + h * stride_dqh
    if zero_fill_program(dq_ptr, stride_dqs, QMAP + b64 * full_len_q, qblk, seqlen_q, full_len_q,
                         BLOCK_M, ZERO_SPAN, HEAD_DIM):
        return
    q_start, offs_m, m_valid, m_store, q_rows, qp, qd, k_start, k_len, k_base, lo, a, b_end, hi = \
        query_block_setup(qblk, b, QPOS, QDOC, QROWS, CUQ, CUK, RANGES, stride_ranges_b, seqlen_q, seqlen_k,
                          BLOCK_M, HAS_DOC, VARLEN, Q_GATHER, Q_POS_IS_INDEX)
    q = load_row_tile(Q + b64 * stride_qb + h * stride_qh, q_rows, m_valid, stride_qs, HEAD_DIM)
    do = load_row_tile(DO + b64 * stride_dob + h * stride_doh, q_rows, m_valid, stride_dos, HEAD_DIM)
    o = load_row_tile(O + b64 * stride_ob + h * stride_oh, q_rows, m_valid, stride_os, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # Δ_i = Σ_d O_id·dO_id
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_stat = b64 * stride_stat_b + h * stride_stat_h + q_start + offs_m
    tl.store(DELTA + row_stat, delta, mask=m_valid)
    lse = tl.load(LSE + row_stat, mask=m_valid, other=float("inf"))

    k_ptr, v_ptr, kpos, kdoc, krows = key_side(K, V, KPOS, KDOC, KROWS, b64, h // GROUP, k_base,
                                               stride_kb, stride_kh, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # masked, full (no mask code), masked runs
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, lo, a, qk_scale,
                   BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, a, b_end, qk_scale,
                   BLOCK_N, HEAD_DIM, False, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_ptr, v_ptr, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, b_end, hi, qk_scale,
                   BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, KV_POS_IS_INDEX, UPCAST)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(dq_ptr + q_rows[:, None] * stride_dqs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_store[:, None])
