"""The one Llama-style decoder block used by every family: pre-norm RMSNorm, RoPE, GQA attention, SwiGLU.

A block runs on any subset of a sequence's tokens: it takes their original positions (for RoPE and
causality) and optional document ids, so MoR can hand it the compacted active tokens of a recursion step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor_ds.attention import attention
from mor_ds.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, 1, S, head_dim/2) at the given (original) positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves (Llama / Hugging Face convention). x: (B, H, S, D); the result keeps x's dtype (under
    autocast q/k come out of the projections in bf16 while cos/sin follow the fp32 parameters)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_rows(pos: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE factors for rows (tokens of many sequences) at original positions pos (N,): (cos, signed sin), each
    (N, 1, D), the layout the inference kernels read; `apply_rope_rows` with them equals `apply_rope` bit for bit."""
    cos, sin = rope_cos_sin(pos[:, None], head_dim, theta, dtype)
    cos, sin = cos[:, 0], sin[:, 0]  # (N, 1, D/2)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def apply_rope_rows(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """x (N, H, D) rotated with `rope_rows` factors: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * rope[0] + torch.cat((x[..., half:], x[..., :half]), -1) * rope[1]


@dataclass
class TokenView:
    """Where a block's tokens sit in the original sequence.

    pos: (B, S') original positions (RoPE angle and causal order); None = 0..S'−1 (all tokens, dense).
    doc: (B, S') document ids when attention is kept inside documents, else None.
    ascending: the rows are real tokens in increasing position, no padding, no documents (expert-choice top-k).
        Among such a set, "earlier position" is "earlier row", so self-attention over it is plain causal attention
        on the compact tensors (FlashAttention's causal kernel is exact there); RoPE still uses `pos`.
    """

    pos: Tensor | None
    doc: Tensor | None
    rope: tuple[Tensor, Tensor]
    ascending: bool = False


@dataclass
class KV:
    """Keys/values of one layer's tokens (after RoPE), reused by later recursions under KV sharing."""

    k: Tensor
    v: Tensor
    view: TokenView


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.backend = cfg.attention_backend

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, view: TokenView, shared_kv: KV | None = None) -> tuple[Tensor, KV]:
        """shared_kv given: attend to those keys/values (recursive KV sharing) and skip the K/V projections."""
        cos, sin = view.rope
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        if shared_kv is None:
            k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
            kv = KV(k, self._heads(self.v_proj(x), self.num_kv_heads), view)
        else:
            kv = shared_kv
        if shared_kv is None and view.ascending:  # causal by row index == causal by original position
            out = attention(q, kv.k, kv.v, backend=self.backend)
        else:
            out = attention(q, kv.k, kv.v, q_pos=view.pos, kv_pos=kv.view.pos, q_doc=view.doc, kv_doc=kv.view.doc,
                            backend=self.backend)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1)), kv


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, view: TokenView, shared_kv: KV | None = None) -> tuple[Tensor, KV]:
        attn_out, kv = self.attn(self.attn_norm(x), view, shared_kv)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), kv
