"""torch SDPA backend: FlashAttention's causal kernel when positions are the identity, else a boolean mask."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mor_ds.attention.reference import default_positions, visibility_mask


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if q_pos is None and kv_pos is None and q_doc is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    batch = q.shape[0]
    if q_pos is None:
        q_pos = default_positions(batch, q.shape[2], q.device)
    if kv_pos is None:
        kv_pos = default_positions(batch, k.shape[2], q.device)
    mask = visibility_mask(q_pos, kv_pos, q_doc, kv_doc)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
