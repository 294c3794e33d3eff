"""Fused elementwise work of a decoder block on rows (Triton, CUDA), fewer kernels and bytes per layer pass:

- `rope_write_kv`: RoPE of the query and key heads of a fused [q; k; v] projection, the query returned, key
  and value written to their paged-cache slots — one kernel instead of four for RoPE (cat, two products,
  sum) and two index copies.
- `silu_mul`: SiLU(gate) · up of a fused [gate; up] projection — one kernel instead of two.
Both compute in fp32 and round once. `rope_write_kv_torch` / `silu_mul_torch` are the PyTorch versions
(the oracles; what runs off CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mor_ds.inference.paged_attention import triton

if triton is not None:
    import triton.language as tl

    # Flat's alignment is not specialised on: a slice of a phase's (J, N) slot plan may start anywhere, and
    # a second compiled variant would only cost a compile in the middle of serving
    @triton.jit(do_not_specialize_on_alignment=["Flat"])
    def _rope_write_kv_kernel(QKV, Cos, Sin, Flat, Q, K, V, stride_n, stride_h, stride_c, stride_qn, stride_qh,
                              stride_ks, stride_kh, HQ: tl.constexpr, HKV: tl.constexpr, HEADS_PAD: tl.constexpr,
                              HEAD_DIM: tl.constexpr):
        """One program per row: every head of the row's [q; k; v] (padded to HEADS_PAD), rotated as
        x·cos + rotate_half(x)·sin (the sign folded into sin) for q and k; v as is."""
        n = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        rot = (d + HEAD_DIM // 2) % HEAD_DIM
        present = (h < HQ + 2 * HKV)[:, None]
        row = QKV + n * stride_n + h[:, None] * stride_h
        x = tl.load(row + d[None, :], mask=present, other=0.0).to(tl.float32)
        x_rot = tl.load(row + rot[None, :], mask=present, other=0.0).to(tl.float32)
        cos = tl.load(Cos + n * stride_c + d).to(tl.float32)
        sin = tl.load(Sin + n * stride_c + d).to(tl.float32)
        is_v = (h >= HQ + HKV)[:, None]
        out = tl.where(is_v, x, x * cos[None, :] + x_rot * sin[None, :])
        tl.store(Q + n * stride_qn + h[:, None] * stride_qh + d[None, :], out.to(Q.dtype.element_ty),
                 mask=(h < HQ)[:, None])
        slot = tl.load(Flat + n).to(tl.int64)
        kh = tl.maximum(h - HQ, 0)
        tl.store(K + slot * stride_ks + kh[:, None] * stride_kh + d[None, :], out.to(K.dtype.element_ty),
                 mask=((h >= HQ) & (h < HQ + HKV))[:, None])
        vh = tl.maximum(h - HQ - HKV, 0)
        tl.store(V + slot * stride_ks + vh[:, None] * stride_kh + d[None, :], out.to(V.dtype.element_ty),
                 mask=is_v & present)

    @triton.jit
    def _silu_mul_kernel(GU, Out, stride_n, stride_on, WIDTH, BLOCK: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < WIDTH
        gate = tl.load(GU + n * stride_n + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(GU + n * stride_n + WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Out + n * stride_on + cols, (gate / (1.0 + tl.exp(-gate)) * up).to(Out.dtype.element_ty),
                 mask=inside)


def rope_write_kv_torch(qkv: Tensor, rope: tuple[Tensor, Tensor], num_heads: int, k_slots: Tensor,
                        v_slots: Tensor, flat: Tensor) -> Tensor:
    """qkv (N, Hq + 2·Hkv, D); rope = (cos, signed sin), each (N, 1, D); k_slots / v_slots (slots, Hkv, D)
    the cache viewed by flat slot; flat (N,) each row's slot. Returns q (N, Hq, D) after RoPE."""
    hkv = (qkv.shape[1] - num_heads) // 2
    half = qkv.shape[-1] // 2
    qk = qkv[:, :num_heads + hkv]
    qk = qk * rope[0] + torch.cat((qk[..., half:], qk[..., :half]), -1) * rope[1]
    k_slots.index_copy_(0, flat, qk[:, num_heads:].to(k_slots.dtype))
    v_slots.index_copy_(0, flat, qkv[:, num_heads + hkv:].to(v_slots.dtype))
    return qk[:, :num_heads]


def rope_write_kv_triton(qkv: Tensor, rope: tuple[Tensor, Tensor], num_heads: int, k_slots: Tensor,
                         v_slots: Tensor, flat: Tensor) -> Tensor:
    n, heads, head_dim = qkv.shape
    cos, sin = rope
    assert qkv.stride(2) == 1 and cos.stride(2) == 1 and sin.stride() == cos.stride(), "head_dim must be contiguous"
    assert k_slots.stride() == v_slots.stride() and k_slots.stride(2) == 1 and flat.stride(0) == 1
    q = torch.empty(n, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kv_kernel[(n,)](
        qkv, cos, sin, flat, q, k_slots, v_slots, qkv.stride(0), qkv.stride(1), cos.stride(0), q.stride(0),
        q.stride(1), k_slots.stride(0), k_slots.stride(1), HQ=num_heads, HKV=(heads - num_heads) // 2,
        HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=head_dim)
    return q


def silu_mul_torch(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_triton(gate_up: Tensor, block: int = 1024) -> Tensor:
    n, width = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.stride(1) == 1
    out = torch.empty(n, width, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(n, triton.cdiv(width, block))](gate_up, out, gate_up.stride(0), out.stride(0), width,
                                                      BLOCK=block)
    return out
