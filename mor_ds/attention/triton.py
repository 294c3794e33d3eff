"""Triton backend of the attention entry point: `mor_ds.kernels.active_attention` on the dense contract.

Same semantics as `reference.py`, except that a query row that sees no key (a padded slot at PAD_POS)
returns 0 instead of an average over all keys; both are the "finite garbage that callers discard".
"""

from __future__ import annotations

from torch import Tensor

from mor_ds.kernels import active_attention


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
) -> Tensor:
    return active_attention(q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_doc=q_doc, kv_doc=kv_doc)
