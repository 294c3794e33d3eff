"""Active-token attention on Triton: public API and autograd.

Two layouts, one set of kernels:
- dense: q (B, Hq, Sq, D), k/v (B, Hkv, Skv, D) with positions (B, S) — the `mor_ds.attention` contract.
  Optional fused gather/scatter: with `q_rows` (B, Kq) the kernel reads query row i from row q_rows[b, i]
  of a full-length q and writes the output (and dQ) back to that row of a full-length result; `kv_rows`
  likewise for keys/values (dK, dV). Positions then default to the row indices (= original positions).
  Padded slots (position PAD_POS) may carry any in-range row index: nothing is written through them.
- varlen (packed, token-choice without padding): q (Tq, Hq, D), k/v (Tk, Hkv, D), sequence b owns rows
  cu_seqlens[b] … cu_seqlens[b+1]−1; positions are packed (T,) original positions.
Key j is visible to query i iff kv_pos[j] <= q_pos[i] (same document when doc ids are given). Queries at
PAD_POS see nothing: their output is 0 and they pass no gradient.
Any strides are accepted as long as the head dimension is contiguous (the model's transposed views are
used in place; the output has q's memory layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from mor_ds.kernels.block_ranges import block_ranges
from mor_ds.kernels.flash_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from mor_ds.kernels.flash_fwd import attention_fwd_kernel
from mor_ds.patches import interpreter_active

LOG2_E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
ZERO_SPAN = 512  # full-length rows per zero-fill program


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelConfigs:
    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig  # same tile shape as fwd (they share the block table), own warps/stages
    # fused scatter: extra programs of each kernel zero the rows of inactive tokens in the full-length output
    # and gradients (False: a memset of the whole tensor before the kernel)
    fused_zero_fill: bool = True
    # dK/dV: the GROUP query heads × query blocks as one pipelined loop (False: a loop per head and run)
    dkdv_single_loop: bool = True

    def __post_init__(self) -> None:
        if (self.dq.block_m, self.dq.block_n) != (self.fwd.block_m, self.fwd.block_n):
            raise ValueError(f"KernelConfigs: dq tiles {self.dq} must have the forward's block shape {self.fwd}")


# Tiles chosen on an H100 (triton 3.6) with `mor-ds bench attention --sweep --sweep-dims 64 128` (360M shape,
# S=2048; benchmarks/attention_h100_2026-11-25.md): D=64 forward/dQ at 64x64 (0.85-0.92x the fwd+bwd time of 128x64),
# D=128 dK/dV at 32x128, 8 warps (0.72-0.89x of 64x64, 8 warps; 32x64 at 4 warps measured 0.71-0.82x but
# spills 40 bytes to local memory). None spills (`python -m mor_ds.kernels.aot`).
_GPU_CONFIGS = {
    64: KernelConfigs(TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3)),
    128: KernelConfigs(TileConfig(128, 64, 8, 3), TileConfig(32, 128, 8, 3), TileConfig(128, 64, 8, 3)),
}
# Interpreter (CPU tests): small, unequal tiles so that short sequences still span many blocks.
_INTERPRETER_CONFIGS = KernelConfigs(TileConfig(32, 16, 1, 1), TileConfig(16, 32, 1, 1), TileConfig(32, 16, 1, 1))


def default_configs(head_dim: int, device: torch.device) -> KernelConfigs:
    if device.type != "cuda":
        return _INTERPRETER_CONFIGS
    return _GPU_CONFIGS[64] if head_dim <= 64 else _GPU_CONFIGS[128]


@dataclass
class _Layout:
    """Everything but q/k/v that the kernels need. Positions / doc ids / row indices: contiguous (B, S) or
    packed (T,), any integer dtype, read in place; positions None = 0…S−1 (no tensor read)."""

    batch: int
    seqlen_q: int  # active query rows per sequence (varlen: the maximum)
    seqlen_k: int
    q_pos: Tensor | None
    kv_pos: Tensor | None
    q_doc: Tensor | None
    kv_doc: Tensor | None
    q_rows: Tensor | None
    kv_rows: Tensor | None
    cu_q: Tensor | None
    cu_k: Tensor | None
    full_len_q: int = 0  # rows of the full-length q / k, v that q_rows / kv_rows index
    full_len_k: int = 0
    ranges_fwd: Tensor | None = None  # (B, query blocks, 4), filled by the forward, reused by dQ
    ranges_bwd: Tensor | None = None  # (B, key blocks, 4) for dK/dV
    q_map: Tensor | None = None  # (B, full_len_q) int8: 1 where an active query writes (fused zero-fill only)
    kv_map: Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    def strides(self, x: Tensor) -> tuple[int, int, int]:
        """(batch, head, row) strides of a (B, H, S, D) or packed (T, H, D) tensor."""
        return (0, x.stride(1), x.stride(0)) if self.varlen else (x.stride(0), x.stride(1), x.stride(2))

    def new_row_stats(self, q: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """fp32 per-query-row buffer (LSE, Δ): (B, Hq, Sq) or (Hq, Tq), and its (batch, head) strides."""
        heads = q.shape[1]
        if self.varlen:
            stats = torch.empty(heads, q.shape[0], device=q.device, dtype=torch.float32)
            return stats, (0, stats.stride(0))
        stats = torch.empty(self.batch, heads, self.seqlen_q, device=q.device, dtype=torch.float32)
        return stats, (stats.stride(0), stats.stride(1))

    def index_args(self, dummy: Tensor) -> tuple:
        """Pointer arguments shared by every kernel (absent ones point at `dummy`; the kernels never read them)."""
        return tuple(x if x is not None else dummy for x in (
            self.q_pos, self.kv_pos, self.q_doc, self.kv_doc, self.q_rows, self.kv_rows, self.cu_q, self.cu_k))

    def flags(self) -> dict:
        return dict(HAS_DOC=self.q_doc is not None, VARLEN=self.varlen,
                    Q_GATHER=self.q_rows is not None, KV_GATHER=self.kv_rows is not None,
                    Q_POS_IS_INDEX=self.q_pos is None, KV_POS_IS_INDEX=self.kv_pos is None)

    def build_ranges(self, cfg: KernelConfigs, device: torch.device) -> None:
        fused = cfg.fused_zero_fill
        self.ranges_fwd, self.ranges_bwd, self.q_map, self.kv_map = block_ranges(
            self.q_pos, self.kv_pos, self.q_doc, self.kv_doc, self.cu_q, self.cu_k, self.batch, self.seqlen_q,
            self.seqlen_k, (cfg.fwd.block_m, cfg.fwd.block_n), (cfg.dkdv.block_m, cfg.dkdv.block_n), device,
            self.q_rows if fused else None, self.kv_rows if fused else None, self.full_len_q, self.full_len_k)

    def zero_programs(self, keys: bool) -> int:
        """Extra programs per (sequence, head) that zero inactive rows of the query (or key) side's results."""
        row_map, full_len = (self.kv_map, self.full_len_k) if keys else (self.q_map, self.full_len_q)
        return triton.cdiv(full_len, ZERO_SPAN) if row_map is not None else 0


def _forward(q: Tensor, k: Tensor, v: Tensor, lay: _Layout, sm_scale: float, cfg: KernelConfigs,
             upcast: bool) -> tuple[Tensor, Tensor]:
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    lay.build_ranges(cfg, q.device)
    zero_progs = lay.zero_programs(keys=False)
    out = torch.zeros_like(q) if lay.q_rows is not None and not zero_progs else torch.empty_like(q)
    lse, stat_strides = lay.new_row_stats(q)
    tile = cfg.fwd
    grid = (triton.cdiv(lay.seqlen_q, tile.block_m) + zero_progs, lay.batch * heads_q)
    attention_fwd_kernel[grid](
        q, k, v, out, lse, *lay.index_args(lse), lay.ranges_fwd, _or(lay.q_map, lse),
        sm_scale * LOG2_E,
        *lay.strides(q), *lay.strides(k), *lay.strides(v), *lay.strides(out),
        *stat_strides, lay.ranges_fwd.stride(0),
        heads_q, lay.seqlen_q, lay.seqlen_k, lay.full_len_q,
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        UPCAST=upcast, ZERO_SPAN=ZERO_SPAN if zero_progs else 0, **lay.flags(),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out, lse


def _or(x: Tensor | None, dummy: Tensor) -> Tensor:
    return x if x is not None else dummy


def _zeros_like_all(*tensors: Tensor) -> list[Tensor]:
    """Zero-filled tensors shaped like `tensors` from one allocation (one memset instead of several)."""
    if not tensors:
        return []
    flat = torch.zeros(sum(t.numel() for t in tensors), device=tensors[0].device, dtype=tensors[0].dtype)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, lay: _Layout,
              sm_scale: float, cfg: KernelConfigs, upcast: bool) -> tuple[Tensor, Tensor, Tensor]:
    heads_q, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    if do.stride(-1) != 1:
        do = do.contiguous()
    flags = lay.flags()
    delta, stat_strides = lay.new_row_stats(q)
    # gathered rows: every row not listed gets a zero gradient (a memset unless the kernels' programs do it)
    zero_q, zero_kv = lay.zero_programs(keys=False), lay.zero_programs(keys=True)
    scatter_q, scatter_kv = lay.q_rows is not None and not zero_q, lay.kv_rows is not None and not zero_kv
    zeros = _zeros_like_all(*([q] if scatter_q else []), *([k, v] if scatter_kv else []))
    dq = zeros.pop(0) if scatter_q else torch.empty_like(q)
    dk, dv = (zeros[0], zeros[1]) if scatter_kv else (torch.empty_like(k), torch.empty_like(v))
    index_args = lay.index_args(lse)
    common = (*lay.strides(q), *lay.strides(k), *lay.strides(v))

    tile = cfg.dq  # first: it also writes Δ for the dK/dV kernel
    attention_bwd_dq_kernel[(triton.cdiv(lay.seqlen_q, tile.block_m) + zero_q, lay.batch * heads_q)](
        q, k, v, out, do, dq, lse, delta, *index_args, lay.ranges_fwd, _or(lay.q_map, lse),
        sm_scale * LOG2_E, sm_scale,
        *common, *lay.strides(out), *lay.strides(do), *lay.strides(dq),
        *stat_strides, lay.ranges_fwd.stride(0),
        heads_q, lay.seqlen_q, lay.seqlen_k, lay.full_len_q,
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        UPCAST=upcast, ZERO_SPAN=ZERO_SPAN if zero_q else 0, **flags,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    tile = cfg.dkdv
    attention_bwd_dkdv_kernel[(triton.cdiv(lay.seqlen_k, tile.block_n) + zero_kv, lay.batch * heads_kv)](
        q, k, v, do, dk, dv, lse, delta, *index_args, lay.ranges_bwd, _or(lay.kv_map, lse),
        sm_scale * LOG2_E, sm_scale,
        *common, *lay.strides(do), *lay.strides(dk), *lay.strides(dv),
        *stat_strides, lay.ranges_bwd.stride(0),
        heads_kv, lay.seqlen_q, lay.seqlen_k, lay.full_len_k,
        GROUP=heads_q // heads_kv, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        UPCAST=upcast, ZERO_SPAN=ZERO_SPAN if zero_kv else 0, SINGLE_LOOP=cfg.dkdv_single_loop, **flags,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return dq, dk, dv


class _ActiveAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lay: _Layout, sm_scale: float, cfg: KernelConfigs) -> Tensor:
        upcast = interpreter_active() and q.dtype == torch.bfloat16  # the interpreter's bf16 math is wrong
        out, lse = _forward(q, k, v, lay, sm_scale, cfg, upcast)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lay, ctx.sm_scale, ctx.cfg, ctx.upcast = lay, sm_scale, cfg, upcast
        return out

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.lay, ctx.sm_scale, ctx.cfg, ctx.upcast)
        return dq, dk, dv, None, None, None


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int) -> None:
    if q.dim() != rank or k.dim() != rank or v.dim() != rank:
        raise ValueError(f"active_attention: q, k, v must be {rank}-D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"active_attention: q, k, v need one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"active_attention: head dim must be one of {HEAD_DIMS} and equal for q, k, v; "
                         f"got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"active_attention: query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]}, {v.shape[1]})")
    if q.device.type != "cuda" and not interpreter_active():
        raise RuntimeError("active_attention: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _index_rows(x: Tensor | None, batch: int, length: int, device: torch.device, name: str) -> Tensor | None:
    """(B, S) integer tensor, contiguous, on `device` (read in place by the kernels: no dtype conversion)."""
    if x is None:
        return None
    if tuple(x.shape) != (batch, length):
        raise ValueError(f"active_attention: {name} must have shape ({batch}, {length}), got {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise ValueError(f"active_attention: {name} must be an integer tensor, got {x.dtype}")
    return x.to(device).contiguous()


def active_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
    q_rows: Tensor | None = None, kv_rows: Tensor | None = None,
    sm_scale: float | None = None, configs: KernelConfigs | None = None,
) -> Tensor:
    """Attention over original positions, dense layout (see the module docstring).

    q (B, Hq, Sq, D); k, v (B, Hkv, Skv, D); q_pos (B, Kq), kv_pos (B, Kk): original positions (None: the
    row indices, or 0…S−1), any integer dtype; q_doc / kv_doc: document ids (both or neither). q_rows (B, Kq) /
    kv_rows (B, Kk): fused gather — the active rows of full-length q / k, v; the result then has q's full shape, zero in
    rows not listed (padded slots: position PAD_POS, any in-range row). Returns (B, Hq, Sq, D) in q's dtype
    and memory layout.
    """
    _check_qkv(q, k, v, 4)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if (q_doc is None) != (kv_doc is None):
        raise ValueError("active_attention: give both q_doc and kv_doc or neither")
    batch, device = q.shape[0], q.device
    kq = q_rows.shape[1] if q_rows is not None else q.shape[2]
    kk = kv_rows.shape[1] if kv_rows is not None else k.shape[2]
    q_rows = _index_rows(q_rows, batch, kq, device, "q_rows")
    kv_rows = _index_rows(kv_rows, batch, kk, device, "kv_rows")
    q_pos = _index_rows(q_pos, batch, kq, device, "q_pos") if q_pos is not None else q_rows
    kv_pos = _index_rows(kv_pos, batch, kk, device, "kv_pos") if kv_pos is not None else kv_rows
    lay = _Layout(batch, kq, kk, q_pos, kv_pos, _index_rows(q_doc, batch, kq, device, "q_doc"),
                  _index_rows(kv_doc, batch, kk, device, "kv_doc"), q_rows, kv_rows, None, None,
                  full_len_q=q.shape[2], full_len_k=k.shape[2])
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _ActiveAttention.apply(q, k, v, lay, scale, configs or default_configs(q.shape[-1], device))


def active_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, *,
    cu_seqlens_q: Tensor, cu_seqlens_kv: Tensor, max_seqlen_q: int, max_seqlen_kv: int,
    q_pos: Tensor, kv_pos: Tensor, q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
    sm_scale: float | None = None, configs: KernelConfigs | None = None,
) -> Tensor:
    """Packed varlen layout: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b owns rows cu_seqlens[b]…cu_seqlens[b+1]−1.

    cu_seqlens_*: (B+1,) int32 offsets (cu[0] = 0); max_seqlen_*: the longest sequence (sets the grid, no
    device sync); q_pos (Tq,), kv_pos (Tk,): original positions; q_doc / kv_doc: (T,) document ids.
    """
    _check_qkv(q, k, v, 3)
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if (q_doc is None) != (kv_doc is None):
        raise ValueError("active_attention_varlen: give both q_doc and kv_doc or neither")
    if cu_seqlens_q.shape != cu_seqlens_kv.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("active_attention_varlen: cu_seqlens_q and cu_seqlens_kv must both be (B+1,)")
    device = q.device

    def packed(x: Tensor | None, rows: int, name: str) -> Tensor | None:
        if x is None:
            return None
        if tuple(x.shape) != (rows,):
            raise ValueError(f"active_attention_varlen: {name} must have shape ({rows},), got {tuple(x.shape)}")
        return x.to(device).contiguous()

    lay = _Layout(
        cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_kv,
        packed(q_pos, q.shape[0], "q_pos"), packed(kv_pos, k.shape[0], "kv_pos"),
        packed(q_doc, q.shape[0], "q_doc"), packed(kv_doc, k.shape[0], "kv_doc"), None, None,
        cu_seqlens_q.to(device=device, dtype=torch.int32), cu_seqlens_kv.to(device=device, dtype=torch.int32),
    )
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _ActiveAttention.apply(q, k, v, lay, scale, configs or default_configs(q.shape[-1], device))
