"""The ZeRO-1/2 bf16 optimizer step with the fused AdamW kernel (`mor_ds.train.fused_adamw`), `optim.fused_step`.

DeepSpeed's `DeepSpeedZeroOptimizer.step()` (0.19.8), per parameter group i of a rank, without optimizer offload:
flatten the bf16 gradients of its partition, cast them to a new fp32 tensor, hand it to the client optimizer as
the fp32 partition's `.grad`, multiply it by the clip coefficient, run the optimizer (torch's fused AdamW), copy
the fp32 partition into the bf16 one, and finally all-gather the bf16 partitions over the data-parallel group.
`install_fused_zero_step` replaces that step on one optimizer instance by the same flow with the middle part done
in one kernel: flatten (a bf16 copy; a ZeRO-2 fp32 accumulation buffer is already flat and is read in place) →
clip + AdamW + bf16 write-back in one pass. The overflow check, global norm (`fuse_zero_grad_checks`), loss
scaler, skipped-step handling, gradient release, timers and the all-gather are DeepSpeed's, called as its own
step calls them.

The moments live where torch AdamW keeps them — `optimizer.state[fp32 partition]` with `step`, `exp_avg`,
`exp_avg_sq`, created the way torch creates them (the step count a float32 scalar on the device when the group is
`fused`/`capturable`, on the CPU otherwise) — so DeepSpeed's checkpoints, `load_checkpoint` and a run that turns
the fused step off resume from each other. The step count is tracked on the host as well: a device step tensor
is read back (one sync) only when it was replaced since the last step, i.e. after a checkpoint load.

Covered: `DeepSpeedZeroOptimizer` (ZeRO-1/2) in bf16 without optimizer offload, ZenFlow, torch autocast, MoE
groups or Muon, with a plain `torch.optim.AdamW` client optimizer (amsgrad, maximize, differentiable off, float
learning rates), on CUDA (or anywhere under TRITON_INTERPRET=1, for the CPU tests). Anything else keeps
DeepSpeed's step; a group whose options change to unsupported ones falls back for that step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from mor_ds.kernels.interpreter_compat import interpreter_active


def unsupported_reason(optimizer: Any) -> str | None:
    """Why the fused step cannot replace `optimizer`'s step (None when it can)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return "DeepSpeed's ZeRO-1/2 optimizer is not importable"
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return f"needs DeepSpeed's ZeRO-1/2 optimizer, not {type(optimizer).__name__}"
    if optimizer.cpu_offload:
        return "needs the optimizer on the GPU (no optimizer offload)"
    if optimizer.dtype != torch.bfloat16:
        return f"needs bf16 weights, not {optimizer.dtype}"
    if getattr(optimizer, "zenflow", False) or getattr(optimizer, "torch_autocast_gradscaler", None) is not None:
        return "does not cover ZenFlow or torch autocast"
    if optimizer.has_moe_layers:
        return "does not cover MoE parameter groups"
    client = optimizer.optimizer
    if type(client) is not torch.optim.AdamW:
        return f"needs a plain torch.optim.AdamW client optimizer, not {type(client).__name__}"
    for i, fp32 in enumerate(optimizer.single_partition_of_fp32_groups):
        if client.param_groups[i]["params"] != [fp32] or fp32.dtype != torch.float32:
            return "needs one fp32 master partition per parameter group"
        if fp32.device.type != "cuda" and not interpreter_active():
            return "needs CUDA (or TRITON_INTERPRET=1)"
        reason = _group_reason(client.param_groups[i])
        if reason:
            return reason
    return None


def _group_reason(group: dict[str, Any]) -> str | None:
    for flag in ("amsgrad", "maximize", "differentiable"):
        if group.get(flag):
            return f"does not cover AdamW {flag}=True"
    if torch.is_tensor(group["lr"]) or torch.is_tensor(group["betas"][0]):
        return "needs float lr and betas"
    return None


def install_fused_zero_step(optimizer: Any) -> bool:
    """Replace `optimizer.step` (a DeepSpeed ZeRO-1/2 optimizer) by the fused step; returns whether it did."""
    if unsupported_reason(optimizer) is not None:
        return False
    optimizer.step = FusedZeroStep(optimizer)
    return True


def apply_fused_step(optimizer: Any, setting: Literal["auto", True, False], device: torch.device) -> bool:
    """`optim.fused_step`: auto = on for CUDA where supported (else DeepSpeed's step), true = on or a ConfigError
    naming the key, false = DeepSpeed's step. Returns whether the fused step is installed."""
    from mor_ds.config import ConfigError

    if setting is False or (setting == "auto" and device.type != "cuda"):
        return False
    reason = unsupported_reason(optimizer)
    if reason is not None:
        if setting is True:
            raise ConfigError(f"optim.fused_step=true: the fused ZeRO-1/2 step {reason}; set optim.fused_step=auto")
        return False
    return install_fused_zero_step(optimizer)


class FusedZeroStep:
    """`DeepSpeedZeroOptimizer.step` for the covered case (module docstring); bound to one optimizer."""

    def __init__(self, optimizer: Any):
        from mor_ds.train.fused_adamw import adamw_step_  # Triton: imported only where the fused step runs

        self.kernel = adamw_step_
        self.opt = optimizer
        self.ds_step = type(optimizer).step.__get__(optimizer)  # DeepSpeed's own, for fallback steps
        self._steps: dict[int, tuple[torch.Tensor, int]] = {}  # group -> (its state["step"] tensor, its value)

    def __call__(self, closure: Any = None) -> None:
        from deepspeed import comm as dist
        from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
        from deepspeed.runtime.zero.stage_1_and_2 import (INITIAL_MICRO_STEP_ID, OPTIMIZER_ALLGATHER_TIMER,
                                                          OPTIMIZER_GRADIENTS_TIMER, OPTIMIZER_STEP_TIMER,
                                                          OPTIMIZER_TIMERS)

        opt = self.opt
        if any(_group_reason(g) for g in opt.optimizer.param_groups):
            self._steps.clear()  # torch increments the step tensors in place: re-read them next time
            return self.ds_step(closure)

        # -- DeepSpeed's prologue: overflow check, global norm, loss scaler, skipped step
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
        if not opt.compute_grad_norm:
            opt._global_grad_norm = None
        opt.overflow = False
        if opt.check_grad_overflow:
            opt.check_overflow(partition_gradients=opt.partition_gradients)
        norm = None
        if opt.compute_grad_norm and not opt.overflow:
            norm = opt.scaled_global_norm()
            if opt.check_grad_overflow and is_invalid_grad_norm(norm):  # DeepSpeed's test for bf16
                opt.overflow = True
        prev_scale = opt.loss_scale
        opt._update_scale(opt.overflow)
        if opt.overflow:
            if opt.compute_grad_norm:
                opt._global_grad_norm = float("inf")
            opt.zero_grad(set_to_none=True)
            opt._release_preflattened_grad_buffers()
            for k in opt.averaged_gradients.keys():
                opt.averaged_gradients[k] = None
                opt.all_grad_tensors[k] = None
            for timer in OPTIMIZER_TIMERS:
                opt.timers(timer).start()
                opt.timers(timer).stop()
            return None
        if norm is not None:
            opt._global_grad_norm = norm / prev_scale
            if not torch.is_tensor(norm):
                device = opt.single_partition_of_fp32_groups[0].device
                norm = torch.tensor(float(norm), dtype=torch.float32, device=device)

        # -- per group: flat gradient partition -> one fused clip + AdamW + bf16 write-back
        for i in range(len(opt.bit16_groups)):
            opt.timers(OPTIMIZER_GRADIENTS_TIMER).start()
            partition_id = dist.get_rank(group=opt.real_dp_process_group[i])
            opt.free_grad_in_param_list(opt.params_not_in_partition[i])  # ZeRO-2: grads of other ranks' params
            flat_grad = opt._get_preflattened_grad_partition(i)  # ZeRO-2 fp32 accumulation: already flat
            if flat_grad is None:
                if partition_id == dist.get_world_size(group=opt.real_dp_process_group[i]) - 1:
                    flat_grad = opt.flatten_dense_tensors_aligned(opt.averaged_gradients[i],
                                                                  int(opt.partition_size[i]))
                else:
                    flat_grad = opt.flatten(opt.averaged_gradients[i])
            if flat_grad.numel() != opt.partition_size[i]:
                raise RuntimeError(f"fused ZeRO step: group {i} gradient partition has {flat_grad.numel()} "
                                   f"elements, the partition {opt.partition_size[i]}")
            opt.free_grad_in_param_list(opt.params_in_partition[i])
            opt.timers(OPTIMIZER_GRADIENTS_TIMER).stop()

            opt.timers(OPTIMIZER_STEP_TIMER).start()
            self._adamw(i, flat_grad, opt.parallel_partitioned_bit16_groups[i][partition_id], norm)
            del flat_grad
            opt._release_preflattened_grad_buffers(i)
            opt.averaged_gradients[i] = None
            opt.all_grad_tensors[i] = None
            opt.timers(OPTIMIZER_STEP_TIMER).stop()
        opt._lazy_init_hp_params_optimizer_state()  # as DeepSpeed's _optimizer_step: link the moments to params

        # -- DeepSpeed's epilogue: gather the updated bf16 partitions from every rank
        opt.timers(OPTIMIZER_ALLGATHER_TIMER).start()
        all_gather_dp_groups(groups_flat=opt.bit16_groups_flat,
                             partitioned_param_groups=opt.parallel_partitioned_bit16_groups,
                             dp_process_group=opt.real_dp_process_group,
                             start_alignment_factor=opt.nccl_start_alignment_factor,
                             allgather_bucket_size=opt.allgather_bucket_size)
        opt.timers(OPTIMIZER_ALLGATHER_TIMER).stop()
        for i in range(len(opt.bit16_groups)):
            opt._update_model_bit16_weights(i)
        opt.timers.log(OPTIMIZER_TIMERS)
        return None

    def _adamw(self, i: int, grad: torch.Tensor, bit16: torch.Tensor, norm: torch.Tensor | None) -> None:
        opt = self.opt
        group = opt.optimizer.param_groups[i]
        master = opt.single_partition_of_fp32_groups[i]
        state = opt.optimizer.state[master]
        if not state:  # as torch AdamW's _init_group
            on_device = group.get("fused") or group.get("capturable")
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        step_t = state["step"]
        known = self._steps.get(i)
        step = (known[1] if known is not None and known[0] is step_t else int(step_t.item())) + 1
        step_t.add_(1)
        self._steps[i] = (step_t, step)
        self.kernel(master, grad, state["exp_avg"], state["exp_avg_sq"], bit16, step=step, lr=group["lr"],
                    betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], grad_norm=norm,
                    clip_grad=opt.clip_grad if norm is not None else 0.0, loss_scale=float(opt.loss_scale))
