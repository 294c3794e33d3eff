"""Triton backend of the attention entry point: `mor_ds.kernels.active_attention` on the dense contract.

Same semantics as `reference.py`, except that a query row that sees no key (a padded slot at PAD_POS)
returns 0 instead of an average over all keys; both are the "finite garbage that callers discard".
All tokens at identity positions without documents (vanilla layers, prelude/coda) is plain causal
attention: on CUDA that case goes to SDPA's FlashAttention kernel, which is faster there (BENCHMARKS.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mor_ds.kernels import active_attention


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
) -> Tensor:
    if q.is_cuda and q_pos is None and kv_pos is None and q_doc is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return active_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_doc=q_doc, kv_doc=kv_doc)
