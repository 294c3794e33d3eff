"""Every change mor-ds makes to a library's own code, in one place.

Each patch is a named `Patch`: what it replaces, why, and the library versions it was written against. Before a
patch is applied its check compares the installed version with those; on another version the library's own code
stays and a `PatchWarning` says so (once per patch), or, where a config key asked for the patch explicitly
(`optim.fused_step=true`), the run is refused with a ConfigError naming the key.

    deepspeed-no-shm-op       DeepSpeed never builds its shared-memory comm op            (`disable_shm_op`)
    zero-grad-checks          ZeRO-1/2 NaN/Inf check and global norm in multi-tensor kernels (`fuse_zero_grad_checks`)
    fused-zero-step           ZeRO-1/2 bf16 optimizer step in one Triton pass (opt-in: `optim.fused_step`)
    triton-interpreter-index  the Triton interpreter's run-time loop bounds under NumPy >= 2.4 (`patch_interpreter`)
    dynamo-recompile-limit    Dynamo's process-wide recompile limit raised for the decode tick's glue
                              (`raise_recompile_limit`)
    universal-load-repair     what DeepSpeed's universal checkpoint load leaves wrong, put right after it
                              (`repair_universal_load`; a repair, so applied on every version)

This module and `mor_ds.distributed` are the only modules of mor_ds that import DeepSpeed (tests/test_patches.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


class PatchWarning(UserWarning):
    """A patch was not applied because the installed library is not a version it follows."""


@dataclass(frozen=True)
class Patch:
    name: str
    library: str  # distribution name
    follows: str  # version specifier of the releases the patch was written against and checked on
    replaces: str  # the library code it changes
    why: str

    def installed(self) -> str | None:
        try:
            return importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            return None

    def mismatch(self) -> str | None:
        """Why the installed library is not one this patch follows (None when it is)."""
        version = self.installed()
        try:
            ok = version is not None and Version(version) in SpecifierSet(self.follows)
        except InvalidVersion:
            ok = False
        if ok:
            return None
        return f"follows {self.library}{self.follows}, {self.library} {version} is installed"

    def check(self, fallback: str) -> bool:
        """Whether the patch may be applied; if not, warn once what runs instead (`fallback`)."""
        reason = self.mismatch()
        if reason is None:
            return True
        if self.name not in _warned:
            _warned.add(self.name)
            warnings.warn(f"mor-ds patch {self.name} {reason}: {fallback}", PatchWarning, stacklevel=3)
        return False


_warned: set[str] = set()

DEEPSPEED_NO_SHM_OP = Patch(
    "deepspeed-no-shm-op", "deepspeed", "==0.19.8", "deepspeed.comm.torch.build_shm_op",
    "the shared-memory comm op JIT-compiles with g++ for ~27 s and makes processes abort at exit now and then "
    "(SIGABRT in 3 of 18 CPU runs); gloo and NCCL need no shared-memory op")
ZERO_GRAD_CHECKS = Patch(
    "zero-grad-checks", "deepspeed", "==0.19.8",
    "DeepSpeedZeroOptimizer.has_overflow_partitioned_grads_serial and .get_grad_norm_direct",
    "DeepSpeed tests each gradient tensor for NaN/Inf and takes its norm one tensor at a time: ~4,500 kernel "
    "launches per optimizer step at vanilla-360m, most of the step's time on a GPU")
FUSED_ZERO_STEP = Patch(
    "fused-zero-step", "deepspeed", "==0.19.8", "DeepSpeedZeroOptimizer.step (ZeRO-1/2, bf16, no offload)",
    "flatten + fp32 cast + clip + AdamW + bf16 copy as one Triton pass over the partition instead of five")
TRITON_INTERPRETER_INDEX = Patch(
    "triton-interpreter-index", "triton", "==3.6.*", "triton.runtime.interpreter._patch_lang_tensor",
    "the interpreter converts 1-element arrays with int(array), a TypeError since NumPy 2.4 ('only "
    "0-dimensional arrays can be converted'): every loop with run-time bounds failed under TRITON_INTERPRET=1")
DYNAMO_RECOMPILE_LIMIT = Patch(
    "dynamo-recompile-limit", "torch", ">=2.11,<2.14", "torch._dynamo.config.recompile_limit",
    "each compiled tick-glue function compiles once per pattern of sizes 1 and of equal sizes over the occupancy "
    "buckets; past Dynamo's default of 8 it would silently run eagerly")
UNIVERSAL_LOAD_REPAIR = Patch(
    "universal-load-repair", "deepspeed", "==0.19.8",
    "the state DeepSpeedEngine.load_checkpoint leaves under checkpoint.load_universal",
    "the universal load restores parameters but no buffers (router thresholds and counters, the balancing bias), "
    "gives every ZeRO-3 optimizer group the first group's settings (weight decay on the norm gains) and one Adam "
    "step tensor shared by all groups, which then advances once per group and step (a wrong bias correction)")
PATCHES = (DEEPSPEED_NO_SHM_OP, ZERO_GRAD_CHECKS, FUSED_ZERO_STEP, TRITON_INTERPRETER_INDEX, DYNAMO_RECOMPILE_LIMIT,
           UNIVERSAL_LOAD_REPAIR)


# --------------------------------------------------------------------------------------------
# deepspeed-no-shm-op


def disable_shm_op() -> bool:
    """Make DeepSpeed's process-group start skip its shared-memory op; returns whether it did."""
    if not DEEPSPEED_NO_SHM_OP.check("DeepSpeed builds its shared-memory op"):
        return False
    # `import deepspeed.comm.torch as m` would give the torch package (a re-exported name), hence importlib
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return True


# --------------------------------------------------------------------------------------------
# zero-grad-checks


def fuse_zero_grad_checks(optimizer: Any) -> bool:
    """ZeRO-1/2: check gradients for NaN/Inf and take their global norm with multi-tensor kernels.

    DeepSpeed's `DeepSpeedZeroOptimizer.step()` tests each gradient tensor for NaN/Inf on its own (`has_inf_or_nan`:
    amax, amin, two isfinite, ... ~13 kernels a tensor) and then takes the global norm one tensor at a time (an fp64
    copy and a norm each). At the ~290 tensors of vanilla-360m that is ~4,500 kernels the host launches one by one
    at every optimizer step, most of engine.step()'s time on a GPU whatever the model size. `torch._foreach_norm`
    does each pass in a few multi-tensor launches, with the same answers: per-tensor L2 norms accumulated in
    DeepSpeed's norm dtype (fp64, where no finite bf16/fp32 gradient overflows), so a tensor's norm is non-finite
    exactly when one of its elements is, and the global norm is the same sum of squared per-tensor norms,
    all-reduced over the data-parallel group and masked to -1 when non-finite as DeepSpeed does. Everything else
    (overflow all-reduce, skipping the step, clipping, checkpoints) stays DeepSpeed's.

    Returns whether `optimizer` was changed: not for ZeRO-0/3 optimizers, nor with model parallelism (DeepSpeed
    then counts only some tensors per rank; mor_ds never passes an mpu), nor on a DeepSpeed other than the one
    whose NaN/Inf masking and fp64 norm dtype this follows (ZERO_GRAD_CHECKS).
    """
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.model_parallel_group is not None:
        return False
    if not ZERO_GRAD_CHECKS.check("DeepSpeed's per-tensor NaN/Inf checks and norm"):
        return False
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    serial_norm = optimizer.get_grad_norm_direct

    def norms(grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(torch._foreach_norm(grads, 2, dtype=get_norm_dtype()))

    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        grads = [g for i in range(len(optimizer.bit16_groups)) for g in optimizer.averaged_gradients[i]
                 if g is not None]
        if not grads:
            return torch.zeros(1, dtype=torch.bool, device=optimizer.device)
        return norms(grads).isfinite().all().logical_not().reshape(1)

    def get_grad_norm_direct(gradients: list[torch.Tensor], params: list[torch.Tensor],
                             norm_type: float = 2) -> torch.Tensor:
        if float(norm_type) != 2.0:
            return serial_norm(gradients, params, norm_type)
        unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
        grads = [g for g, _ in zip(unpadded, params)]  # DeepSpeed pairs gradients with params the same way
        if grads:
            total = norms(grads).pow(2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


# --------------------------------------------------------------------------------------------
# fused-zero-step
#
# DeepSpeed's `DeepSpeedZeroOptimizer.step()` (0.19.8), per parameter group i of a rank, without optimizer offload:
# flatten the bf16 gradients of its partition, cast them to a new fp32 tensor, hand it to the client optimizer as
# the fp32 partition's `.grad`, multiply it by the clip coefficient, run the optimizer (torch's fused AdamW), copy
# the fp32 partition into the bf16 one, and finally all-gather the bf16 partitions over the data-parallel group.
# `install_fused_zero_step` replaces that step on one optimizer instance by the same flow with the middle part done
# in one kernel (`mor_ds.kernels.fused_adamw`): flatten (a bf16 copy; a ZeRO-2 fp32 accumulation buffer is already
# flat and is read in place) → clip + AdamW + bf16 write-back in one pass. The overflow check, global norm
# (zero-grad-checks), loss scaler, skipped-step handling, gradient release, timers and the all-gather are
# DeepSpeed's, called as its own step calls them.
#
# The moments live where torch AdamW keeps them — `optimizer.state[fp32 partition]` with `step`, `exp_avg`,
# `exp_avg_sq`, created the way torch creates them (the step count a float32 scalar on the device when the group
# is `fused`/`capturable`, on the CPU otherwise) — so DeepSpeed's checkpoints, `load_checkpoint` and a run that
# turns the fused step off resume from each other. The step count is tracked on the host as well: a device step
# tensor is read back (one sync) only when it was replaced since the last step, i.e. after a checkpoint load.
#
# Covered: `DeepSpeedZeroOptimizer` (ZeRO-1/2) in bf16 without optimizer offload, ZenFlow, torch autocast, MoE
# groups or Muon, with a plain `torch.optim.AdamW` client optimizer (amsgrad, maximize, differentiable off, float
# learning rates), on CUDA (or anywhere under TRITON_INTERPRET=1, for the CPU tests). Anything else keeps
# DeepSpeed's step; a group whose options change to unsupported ones falls back for that step.


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
    return FUSED_ZERO_STEP.mismatch()


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
    """`optim.fused_step`: auto = on for CUDA where supported (else DeepSpeed's step; loudly on another DeepSpeed
    version), true = on or a ConfigError naming the key, false = DeepSpeed's step. Returns whether it is installed."""
    from mor_ds.config import ConfigError

    if setting is False or (setting == "auto" and device.type != "cuda"):
        return False
    reason = unsupported_reason(optimizer)
    if reason is None:
        return install_fused_zero_step(optimizer)
    if setting is True:
        raise ConfigError(f"optim.fused_step=true: the fused ZeRO-1/2 step {reason}; set optim.fused_step=auto")
    FUSED_ZERO_STEP.check("DeepSpeed's own optimizer step")  # silent on the DeepSpeed it follows
    return False


class FusedZeroStep:
    """`DeepSpeedZeroOptimizer.step` for the covered case (see above); bound to one optimizer."""

    def __init__(self, optimizer: Any):
        from mor_ds.kernels.fused_adamw import adamw_step_  # Triton: imported only where the fused step runs

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


# --------------------------------------------------------------------------------------------
# triton-interpreter-index


def interpreter_active() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> bool:
    """Re-register the interpreter tensors' `__index__` with an explicit `.item()` (no effect on compiled GPU
    kernels); idempotent. Returns whether the patch is in place."""
    if not TRITON_INTERPRETER_INDEX.check("the interpreter's own __index__ (loops with run-time bounds may fail)"):
        return False
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_mor_ds_patched", False):
        return True

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0].item()))

    patched._mor_ds_patched = True
    interpreter._patch_lang_tensor = patched
    return True


# --------------------------------------------------------------------------------------------
# dynamo-recompile-limit


def raise_recompile_limit(limit: int) -> bool:
    """Dynamo's recompile limit (process-wide, per compiled function) at least `limit`; returns whether it is."""
    if not DYNAMO_RECOMPILE_LIMIT.check("Dynamo's default recompile limit stays"):
        return False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return True


# --------------------------------------------------------------------------------------------
# universal-load-repair


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (the optimizer itself for ZeRO-0)."""
    return getattr(optimizer, "optimizer", optimizer)


def repair_universal_load(optimizer: Any, module: torch.nn.Module, group_settings: list[dict[str, Any]],
                          checkpoint_dir: Path) -> None:
    """After a universal load of `checkpoint_dir` (the original step directory, not its universal form): each
    optimizer group gets back its settings as the run built them (`group_settings`; the lr is set every step
    anyway), each Adam state its own step count, and the module its buffers, as a load on the saving world size
    leaves them. Every part only restores what a plain load restores, so on an unchecked DeepSpeed version the
    repair still runs, with a warning that it was not checked there."""
    UNIVERSAL_LOAD_REPAIR.check("the repair is applied all the same (it only restores what a plain load restores)")
    base = base_optimizer(optimizer)
    for group, settings in zip(base.param_groups, group_settings):
        group.update(settings)
    # torch keeps step counts on the parameter's device for fused / capturable AdamW, else on the CPU
    on_device = base.defaults.get("fused") or base.defaults.get("capturable")
    for param, state in base.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32, copy=True)
    # every rank's model-states file holds all buffers (ZeRO-3 partitions parameters only); mmap reads just those
    saved = torch.load(sorted(checkpoint_dir.glob("*model_states.pt"))[0], map_location="cpu", weights_only=False,
                       mmap=True)
    buffers = dict(module.named_buffers())
    for name in saved.get("buffer_names", []):
        buffers[name].data.copy_(saved["module"][name])


__all__ = [
    "DEEPSPEED_NO_SHM_OP", "DYNAMO_RECOMPILE_LIMIT", "FUSED_ZERO_STEP", "PATCHES", "TRITON_INTERPRETER_INDEX",
    "UNIVERSAL_LOAD_REPAIR", "ZERO_GRAD_CHECKS", "FusedZeroStep", "Patch", "PatchWarning", "apply_fused_step",
    "base_optimizer", "disable_shm_op", "fuse_zero_grad_checks", "install_fused_zero_step", "interpreter_active",
    "patch_interpreter", "raise_recompile_limit", "repair_universal_load", "unsupported_reason",
]
