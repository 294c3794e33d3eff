"""The LM head and its cross-entropy, with a path that never materialises the full (B·S, V) logits.

`model.fused_loss` picks how `LMHead` computes the loss when labels are given:
  plain    logits = h Wᵀ for every token, then F.cross_entropy (B·S × V logits in the model dtype, an fp32 copy and
           its gradient: ~20 GB transient at micro-batch 16, S = 2048, V = 49152)
  chunked  `ChunkedLinearCrossEntropy`: the tokens are processed `model.loss_chunk_size` at a time; each chunk's
           logits live only while its loss and its gradients (w.r.t. h and W) are computed, during the forward
           pass (the Liger-Kernel recipe), so backward only scales the stored gradients by the incoming one.
           Same FLOPs as `plain` (one forward and two gradient matmuls per chunk), fp32 softmax, fp32 accumulation
           of the W gradient across chunks. Pure PyTorch: runs on CPU and CUDA.
  liger    Liger-Kernel's fused linear cross-entropy (Triton; CUDA only, needs `liger-kernel`)
  auto     chunked on CUDA, plain elsewhere

`LMHead` is an `nn.Linear` (state-dict key `lm_head.weight`, tied to the embedding as before) whose `forward`
also takes the labels: the loss is computed inside the module's call, so ZeRO-3's parameter gathering hooks
(which fire around `lm_head(...)`) hold the full weight while the chunks read it.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FusedLoss = Literal["auto", "plain", "chunked", "liger"]
IGNORE_INDEX = -100


def resolve_fused_loss(mode: str, device: torch.device) -> str:
    """The implementation `mode` runs on `device` (auto → chunked on CUDA, plain elsewhere)."""
    if mode == "auto":
        return "chunked" if device.type == "cuda" else "plain"
    if mode == "liger" and device.type != "cuda":
        raise RuntimeError("model.fused_loss=liger: Liger-Kernel's fused linear cross-entropy runs on CUDA only; "
                           "use chunked (pure PyTorch) on this device")
    return mode


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def plain_linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Reference: full logits in the compute dtype, cross-entropy in (at least) fp32, mean over labels != -100."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.to(_at_least_fp32(logits.dtype)), labels, ignore_index=IGNORE_INDEX)


def softmax_xent(z: Tensor, labels: Tensor) -> Tensor:
    """Per-row cross-entropy of logits z (n, V), computed in at least fp32."""
    logits = z.to(_at_least_fp32(z.dtype))
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, labels[:, None]).squeeze(1)


def softmax_xent_grad(z: Tensor, labels: Tensor, row_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of z (n, V) and its gradient row_weight·(softmax(z) − onehot(labels)) in z's dtype.

    Written as plain element-wise math and reductions so that torch.compile fuses it into a pass or two over the
    chunk's logits (read in the compute dtype, fp32 inside) instead of the ~8 full-size fp32 passes of eager mode."""
    logits = z.to(_at_least_fp32(z.dtype))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.arange(z.shape[1], device=z.device) == labels[:, None]
    grad = ((logits - lse[:, None]).exp() - onehot.to(logits.dtype)) * row_weight[:, None]
    return lse - target, grad.to(z.dtype)


@functools.cache
def _compiled_softmax_xent_grad():
    """softmax_xent_grad under torch.compile (built on first CUDA use; one graph per chunk length)."""
    return torch.compile(softmax_xent_grad)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid tokens of CE(h Wᵀ, labels), with h: (N, d), W: (V, d), labels: (N,) (−100 = ignored).

    Per chunk of rows c: z = h_c Wᵀ (compute dtype, like nn.Linear), p = softmax(z.float()),
    ∂loss/∂z = (p − onehot(y))·[y ≠ −100] / n_valid, ∂h_c = ∂z W, ∂W += ∂zᵀ h_c (accumulated in fp32).
    On CUDA the softmax/gradient math of a chunk is one compiled function (`softmax_xent_grad`).
    n_valid stays a tensor (no host sync); no valid label gives NaN, as F.cross_entropy does.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_grad = needs_h or needs_w
        valid = labels != IGNORE_INDEX
        acc_dtype = _at_least_fp32(h.dtype)
        n_valid = valid.sum().to(acc_dtype)
        safe_labels = labels.masked_fill(~valid, 0)
        total = torch.zeros((), device=h.device, dtype=acc_dtype)
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.zeros_like(weight, dtype=_at_least_fp32(weight.dtype)) if needs_w else None
        row_weight = valid.to(acc_dtype) / n_valid  # ∂mean/∂(row loss): 1/n_valid, 0 for ignored rows
        chunk_grad = _compiled_softmax_xent_grad() if h.is_cuda else softmax_xent_grad
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = F.linear(h[rows], weight)  # the compute dtype nn.Linear would use (autocast included)
            if not needs_grad:
                total += (softmax_xent(z, safe_labels[rows]) * valid[rows]).sum()
                continue
            row_loss, grad_z = chunk_grad(z, safe_labels[rows], row_weight[rows])
            total += (row_loss * valid[rows]).sum()
            if grad_h is not None:
                grad_h[rows] = grad_z @ weight.to(z.dtype)
            if grad_w is not None:
                grad_w += grad_z.t() @ h[rows].to(z.dtype)
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None


def chunked_linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """h: (..., d), labels: (...) → scalar mean CE over labels != −100; equal to `plain_linear_cross_entropy`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    return ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk_size)


def liger_linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        raise RuntimeError(f"model.fused_loss=liger: liger-kernel is not importable ({exc}); "
                           f"`pip install liger-kernel` or use model.fused_loss=chunked") from None
    return liger_fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX)


class LMHead(nn.Linear):
    """Output projection d → V (no bias). `head(h)` gives logits; `head(h, labels)` gives the mean CE loss
    through the configured implementation (see the module docstring)."""

    def __init__(self, hidden_size: int, vocab_size: int, fused_loss: str = "auto", chunk_size: int = 4096):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.fused_loss, self.chunk_size = fused_loss, chunk_size

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            return super().forward(h)
        mode = resolve_fused_loss(self.fused_loss, h.device)
        if mode == "chunked":
            return chunked_linear_cross_entropy(h, self.weight, labels, self.chunk_size)
        if mode == "liger":
            return liger_linear_cross_entropy(h, self.weight, labels)
        return plain_linear_cross_entropy(h.flatten(0, -2), self.weight, labels.flatten())
