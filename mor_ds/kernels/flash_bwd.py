"""Backward kernels (FlashAttention-2 style, recomputing P from the saved log-sum-exp).

- `attention_bwd_delta_kernel`: Δ_i = Σ_d O_id·dO_id per query row.
- `attention_bwd_dkdv_kernel`: one program = one key block of one (sequence, KV head); it loops over the
  GROUP query heads that share it (GQA) and their query blocks, so dK/dV are summed in registers (no atomics).
- `attention_bwd_dq_kernel`: one program = one query block of one (sequence, query head).
With s = q·k, p = exp2(s·qk_scale − lse): dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − Δ), dQ = scale·dS K,
dK = scale·dSᵀ Q (scale = 1/√D).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mor_ds.kernels.common import key_positions, memory_rows, query_positions, seq_bounds, visible


@triton.jit
def attention_bwd_delta_kernel(
    O, DO, DELTA, QROWS, CUQ,
    stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
    stride_delta_b, stride_delta_h, stride_qrows_b,
    num_q_heads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr,
):
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    b64 = b.to(tl.int64)
    q_start, q_len = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < q_len
    rows = memory_rows(QROWS + b64 * stride_qrows_b, q_start, offs_m, m_valid, Q_GATHER)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=m_valid[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=m_valid[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * stride_delta_b + h * stride_delta_h + q_start + offs_m, tl.sum(o * do, 1), mask=m_valid)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, kp, kd,
    q_base, do_base, lse_base, delta_base, qpos, qdoc, qrows, q_start, q_len, stride_qs, stride_dos,
    blk_lo, blk_hi, qk_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, HAS_DOC: tl.constexpr, Q_GATHER: tl.constexpr, UPCAST: tl.constexpr,
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
            qp = query_positions(qpos, offs_m, m_valid)
            if HAS_DOC:
                qd = tl.load(qdoc + offs_m, mask=m_valid, other=-2)
            else:
                qd = qp
            pt = tl.where(visible(qp, kp, qd, kd, HAS_DOC, True), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, QROWS, KROWS, CUQ, CUK, RANGES,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    stride_lse_b, stride_lse_h, stride_qpos_b, stride_kpos_b, stride_qrows_b, stride_krows_b, stride_ranges_b,
    num_kv_heads, seqlen_q, seqlen_k,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    b64 = b.to(tl.int64)
    q_start, q_len = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len = seq_bounds(CUK, b, seqlen_k, VARLEN)

    offs_n = kblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < k_len
    k_rows = memory_rows(KROWS + b64 * stride_krows_b, k_start, offs_n, n_valid, KV_GATHER)
    k = tl.load(K + b64 * stride_kb + kvh * stride_kh + k_rows[:, None] * stride_ks + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + k_rows[:, None] * stride_vs + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kp = key_positions(KPOS + b64 * stride_kpos_b + k_start, offs_n, n_valid)
    if HAS_DOC:
        kd = tl.load(KDOC + b64 * stride_kpos_b + k_start + offs_n, mask=n_valid, other=-1)
    else:
        kd = kp

    rng = RANGES + b64 * stride_ranges_b + kblk * 4
    lo = tl.load(rng)
    a = tl.load(rng + 1)
    b_end = tl.load(rng + 2)
    hi = tl.load(rng + 3)

    qpos = QPOS + b64 * stride_qpos_b + q_start
    qdoc = QDOC + b64 * stride_qpos_b + q_start
    qrows = QROWS + b64 * stride_qrows_b
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + b64 * stride_dob + h * stride_doh
        lse_base = LSE + b64 * stride_lse_b + h * stride_lse_h + q_start
        delta_base = DELTA + b64 * stride_lse_b + h * stride_lse_h + q_start
        dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base, qpos, qdoc, qrows,
                             q_start, q_len, stride_qs, stride_dos, lo, a, qk_scale,
                             BLOCK_M, HEAD_DIM, True, HAS_DOC, Q_GATHER, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base, qpos, qdoc, qrows,
                             q_start, q_len, stride_qs, stride_dos, a, b_end, qk_scale,
                             BLOCK_M, HEAD_DIM, False, HAS_DOC, Q_GATHER, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, kp, kd, q_base, do_base, lse_base, delta_base, qpos, qdoc, qrows,
                             q_start, q_len, stride_qs, stride_dos, b_end, hi, qk_scale,
                             BLOCK_M, HEAD_DIM, True, HAS_DOC, Q_GATHER, UPCAST)
    if KV_GATHER:  # a padded slot's row index is a placeholder: never write through it
        n_store = n_valid & (kp < 1073741824)
    else:
        n_store = n_valid
    tl.store(DK + b64 * stride_dkb + kvh * stride_dkh + k_rows[:, None] * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=n_store[:, None])
    tl.store(DV + b64 * stride_dvb + kvh * stride_dvh + k_rows[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_store[:, None])


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, qp, qd,
    k_base, v_base, kpos, kdoc, krows, k_start, k_len, stride_ks, stride_vs,
    blk_lo, blk_hi, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, HAS_DOC: tl.constexpr, KV_GATHER: tl.constexpr, UPCAST: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for blk in range(blk_lo, blk_hi):
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < k_len
        rows = memory_rows(krows, k_start, offs_n, n_valid, KV_GATHER)
        if MASKED:
            k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            vt = tl.load(v_base + rows[None, :] * stride_vs + offs_d[:, None], mask=n_valid[None, :], other=0.0)
        else:
            k = tl.load(k_base + rows[:, None] * stride_ks + offs_d[None, :])
            vt = tl.load(v_base + rows[None, :] * stride_vs + offs_d[:, None])
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            kp = key_positions(kpos, offs_n, n_valid)
            if HAS_DOC:
                kd = tl.load(kdoc + offs_n, mask=n_valid, other=-1)
            else:
                kd = kp
            p = tl.where(visible(qp, kp, qd, kd, HAS_DOC, False), p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, QPOS, KPOS, QDOC, KDOC, QROWS, KROWS, CUQ, CUK, RANGES,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
    stride_lse_b, stride_lse_h, stride_qpos_b, stride_kpos_b, stride_qrows_b, stride_krows_b, stride_ranges_b,
    num_q_heads, seqlen_q, seqlen_k,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DOC: tl.constexpr, VARLEN: tl.constexpr, Q_GATHER: tl.constexpr, KV_GATHER: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    b64 = b.to(tl.int64)
    kvh = h // GROUP
    q_start, q_len = seq_bounds(CUQ, b, seqlen_q, VARLEN)
    k_start, k_len = seq_bounds(CUK, b, seqlen_k, VARLEN)

    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < q_len
    q_rows = memory_rows(QROWS + b64 * stride_qrows_b, q_start, offs_m, m_valid, Q_GATHER)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + q_rows[:, None] * stride_dos + offs_d[None, :],
                 mask=m_valid[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_stat = b64 * stride_lse_b + h * stride_lse_h + q_start + offs_m
    lse = tl.load(LSE + row_stat, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + row_stat, mask=m_valid, other=0.0)
    qp = query_positions(QPOS + b64 * stride_qpos_b + q_start, offs_m, m_valid)
    if HAS_DOC:
        qd = tl.load(QDOC + b64 * stride_qpos_b + q_start + offs_m, mask=m_valid, other=-2)
    else:
        qd = qp

    rng = RANGES + b64 * stride_ranges_b + qblk * 4
    lo = tl.load(rng)
    a = tl.load(rng + 1)
    b_end = tl.load(rng + 2)
    hi = tl.load(rng + 3)

    kpos = KPOS + b64 * stride_kpos_b + k_start
    kdoc = KDOC + b64 * stride_kpos_b + k_start
    krows = KROWS + b64 * stride_krows_b
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_base, v_base, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, lo, a, qk_scale, BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_base, v_base, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, a, b_end, qk_scale, BLOCK_N, HEAD_DIM, False, HAS_DOC, KV_GATHER, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, qp, qd, k_base, v_base, kpos, kdoc, krows, k_start, k_len,
                   stride_ks, stride_vs, b_end, hi, qk_scale, BLOCK_N, HEAD_DIM, True, HAS_DOC, KV_GATHER, UPCAST)
    if Q_GATHER:
        m_store = m_valid & (qp >= 0)
    else:
        m_store = m_valid
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + q_rows[:, None] * stride_dqs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_store[:, None])
