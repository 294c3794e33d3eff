"""The one attention entry point. Backends: reference (plain PyTorch, the oracle), sdpa, triton.

`attention(q, k, v, q_pos=…, kv_pos=…, q_doc=…, kv_doc=…, backend=…)`: positions are original token
positions, so causality (key visible iff kv_pos <= q_pos, same document when ids are given) and RoPE
never depend on how active tokens were compacted. See `reference.py` for shapes and padding.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
from torch import Tensor

from mor_ds.attention.reference import PAD_POS, reference_attention
from mor_ds.attention.sdpa import sdpa_attention
from mor_ds.choices import AttentionBackend

__all__ = ["PAD_POS", "attention", "resolve_backend", "BACKENDS"]

AttentionFn = Callable[..., Tensor]
BACKENDS: dict[AttentionBackend, AttentionFn] = {AttentionBackend.REFERENCE: reference_attention,
                                                 AttentionBackend.SDPA: sdpa_attention}


@torch.compiler.disable
def _triton_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """Runs eagerly inside a torch.compile'd block (a graph break): Inductor re-compiles user Triton kernels it
    traces and, with Triton 3.6 on an H100, failed on ours (tl.dot accumulator type assertion)."""
    from mor_ds.attention.triton import triton_attention  # imported on first use: compiles nothing before

    return triton_attention(q, k, v, **kwargs)


if importlib.util.find_spec("triton") is not None:
    BACKENDS[AttentionBackend.TRITON] = _triton_attention


def resolve_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto`: the fastest correct backend for the device. CPU: reference. CUDA: triton when installed: it
    sends dense causal attention to SDPA's flash kernel and runs the active-token cases (which SDPA can only
    do with a dense mask) faster than SDPA in every measured case on an H100 (BENCHMARKS.md); else sdpa."""
    if name != AttentionBackend.AUTO:
        return name
    if device.type != "cuda":
        return AttentionBackend.REFERENCE
    return AttentionBackend.TRITON if AttentionBackend.TRITON in BACKENDS else AttentionBackend.SDPA


def attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    q_pos: Tensor | None = None, kv_pos: Tensor | None = None,
    q_doc: Tensor | None = None, kv_doc: Tensor | None = None,
    backend: str = AttentionBackend.AUTO,
) -> Tensor:
    backend = resolve_backend(backend, q.device)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available (have: {', '.join(BACKENDS)})")
    return BACKENDS[backend](q, k, v, q_pos=q_pos, kv_pos=kv_pos, q_doc=q_doc, kv_doc=kv_doc)
