"""One-pass AdamW over flat fp32 master weights: bf16 (or fp32) gradient in, bf16 weight out (Triton).

DeepSpeed's ZeRO-1/2 bf16 step walks the partition five times (flatten the bf16 gradients, cast them to a new fp32
tensor, multiply by the clip coefficient, AdamW over the fp32 master weight and both moments, copy fp32 → bf16):
~56 bytes of memory traffic per parameter. This kernel reads the gradient once, applies the clip coefficient,
updates the fp32 master weight θ and the moments m, v in place and writes the bf16 weight the model runs with:
2 + 3 × (4 + 4) + 2 = 28 bytes per parameter (30 with an fp32 gradient).

The update is torch.optim.AdamW's, step t (t = 1 at the first step), decoupled weight decay λ, learning rate η:

    g  = grad / c                     c = DeepSpeed's clip coefficient max((‖g‖ / s + 1e-6) / clip, 1) · s
    θ ← θ · (1 − η·λ)                                                    (s = loss scale, 1 with bf16)
    m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²
    θ ← θ − η / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

with IEEE division and square root (`div_rn`, `sqrt_rn`), so fp32 results agree with torch's to an ulp or so. The
global norm ‖g‖ is read from device memory by every program (never `.item()`): no host sync. The bias corrections
are computed on the host in float64 from the step count, as torch's (non-capturable) AdamW does.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 4096  # elements per program: 16 per thread at 8 warps, ~100 KB of traffic per program
NUM_WARPS = 8


@triton.jit
def _adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, norm_ptr, n_elements,
                  decay_factor, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt,
                  clip_grad, loss_scale, CLIP: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements

    if CLIP:  # DeepSpeed's unscale_and_clip_grads, fp32 like its tensor math; an invalid (-1) norm clips to zero
        norm = tl.load(norm_ptr).to(tl.float32)
        norm = tl.where(norm < 0, float("inf"), norm)
        coef = tl.maximum(tl.div_rn(tl.div_rn(norm, loss_scale) + 1e-6, clip_grad), 1.0) * loss_scale
    else:
        coef = loss_scale * 1.0
    inv_coef = tl.div_rn(1.0, coef)

    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * inv_coef
    theta = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)

    theta = theta * decay_factor
    # torch.lerp's two-sided form (exact at both ends of the weight)
    if one_minus_beta1 < 0.5:
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - one_minus_beta1)
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    theta = theta - step_size * tl.div_rn(m, denom)

    tl.store(master_ptr + offsets, theta, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    if BF16_BITS:  # out is bf16 viewed as int16: round to nearest even on the bits (finite values)
        bits = theta.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + offsets, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offsets, theta.to(out_ptr.dtype.element_ty), mask=mask)


def adamw_step_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                out: torch.Tensor, *, step: int, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float, grad_norm: torch.Tensor | None = None, clip_grad: float = 0.0,
                loss_scale: float = 1.0, block_size: int = BLOCK_SIZE, num_warps: int = NUM_WARPS) -> None:
    """One AdamW step (step count `step` ≥ 1, already incremented) over flat contiguous tensors, in place.

    `master`, `exp_avg`, `exp_avg_sq`: fp32; `grad`: bf16/fp16/fp32; `out`: receives θ in its dtype (bf16).
    The gradient is divided by DeepSpeed's clip coefficient from `grad_norm` (a device scalar, the global norm
    of the loss-scaled gradients) when `clip_grad` > 0, else by `loss_scale`. `block_size` elements per program
    (a power of 2) and `num_warps` only change the speed.
    """
    n = master.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t.numel() != n or not t.is_contiguous() or t.device != master.device:
            raise ValueError(f"adamw_step_: {name} must be contiguous on {master.device} with {n} elements, "
                             f"got {tuple(t.shape)} on {t.device}")
    if not (master.dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.float32) or not master.is_contiguous():
        raise ValueError("adamw_step_: master weights and moments must be contiguous fp32")
    if step < 1:
        raise ValueError(f"adamw_step_: step={step} must be >= 1")
    clip = clip_grad > 0.0
    if clip and grad_norm is None:
        raise ValueError("adamw_step_: clip_grad > 0 needs grad_norm")
    beta1, beta2 = betas
    if n == 0:
        return
    # the Triton interpreter's fp32 -> bf16 conversion truncates instead of rounding to nearest even: round by hand
    bf16_bits = out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    grid = (triton.cdiv(n, block_size),)
    _adamw_kernel[grid](
        master, grad, exp_avg, exp_avg_sq, out.view(torch.int16) if bf16_bits else out,
        grad_norm if clip else master, n,
        1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        lr / (1.0 - beta1**step), math.sqrt(1.0 - beta2**step), float(clip_grad), float(loss_scale),
        CLIP=clip, BF16_BITS=bf16_bits, BLOCK=block_size, num_warps=num_warps)
