"""Plain-PyTorch attention over original positions: the oracle for every backend.

Shapes: q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D) with Hq a multiple of Hkv (GQA).
Key j is visible to query i iff kv_pos[b, j] <= q_pos[b, i] (causal by original position) and, when
document ids are given, q_doc[b, i] == kv_doc[b, j]. Positions None mean 0..S−1.
Padded slots: keys at PAD_POS are never visible to real queries. A query row that sees no key at all
(only ever a padded slot) returns finite garbage that callers discard.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PAD_POS = 1 << 30  # position of padded slots: later than every real token


def visibility_mask(q_pos: Tensor, kv_pos: Tensor, q_doc: Tensor | None = None, kv_doc: Tensor | None = None) -> Tensor:
    """(B, 1, Sq, Skv) bool: which keys each query may attend to. Rows with nothing visible see all."""
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]
    if q_doc is not None:
        mask = mask & (kv_doc[:, None, :] == q_doc[:, :, None])
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]


def default_positions(batch: int, length: int, device: torch.device) -> Tensor:
    return torch.arange(length, device=device).expand(batch, length)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
) -> Tensor:
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_pos is None:
        q_pos = default_positions(batch, q_len, q.device)
    if kv_pos is None:
        kv_pos = default_positions(batch, kv_len, q.device)
    groups = q_heads // kv_heads
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation for bf16/fp16, fp64 stays fp64
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~visibility_mask(q_pos, kv_pos, q_doc, kv_doc), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)
