"""Process-group discovery and the DeepSpeed engine. With `mor_ds.patches` (what mor-ds changes in DeepSpeed's
own code), the only module of mor_ds that imports DeepSpeed.

Launchers: `torchrun` / `deepspeed` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (the `deepspeed`
launcher also passes `--local_rank`); Slurm's `srun` sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
SLURM_NODELIST. `discover()` maps either onto one `DistEnv`, and `init_distributed()` exports it as the standard
variables so DeepSpeed never falls back to MPI discovery. One process per GPU; gloo on CPU, nccl on CUDA.

`build_engine()` wraps a plain single-device model into a `TrainEngine`: a small facade over DeepSpeed's engine
(forward, backward, step, learning rate, grad norm, checkpoint save/load) so the training loop and its
callbacks never touch DeepSpeed directly.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from collections import Counter
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from mor_ds import patches

if TYPE_CHECKING:
    from mor_ds.config import Config

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
DEFAULT_MASTER_PORT = 29500
_exported: dict[str, str | None] = {}  # launch variables init_distributed set, with their previous values


class DistributedError(RuntimeError):
    """The launch environment is inconsistent (message names the variable)."""


# --------------------------------------------------------------------------------------------
# rank / world discovery


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list (`node[01-04]` → `node01`), expanded by `scontrol show hostnames`."""
    if not any(c in nodelist for c in "[],"):
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        detail = (getattr(exc, "stderr", None) or "").strip().splitlines()
        raise DistributedError(f"SLURM_NODELIST={nodelist!r}: cannot expand it with `scontrol show hostnames` "
                               f"({detail[-1] if detail else exc.__class__.__name__}); set MASTER_ADDR") from None
    if not out:
        raise DistributedError(f"SLURM_NODELIST={nodelist!r}: `scontrol show hostnames` printed no host")
    return out[0]


def free_port() -> int:
    """An unused TCP port on the loopback interface (single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def discover(environ: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Rank, world size, local rank and master address from torchrun/deepspeed variables or SLURM_*."""
    env = os.environ if environ is None else environ
    rank, world = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    local_rank = _int_var(env, "LOCAL_RANK")
    if rank is None and world is None and _int_var(env, "SLURM_PROCID") is not None:
        rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
        local_rank = _int_var(env, "SLURM_LOCALID")
        if world is None:
            raise DistributedError("SLURM_PROCID is set but SLURM_NTASKS is not (launch with srun -n N)")
    if (rank is None) != (world is None):
        raise DistributedError(f"RANK={env.get('RANK')!r} and WORLD_SIZE={env.get('WORLD_SIZE')!r}: "
                               "set both or neither")
    if rank is None:
        rank, world = 0, 1
    if local_rank is None:
        local_rank = local_rank_arg if local_rank_arg is not None and local_rank_arg >= 0 else 0
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is not in [0, world size {world})")

    master_addr = env.get("MASTER_ADDR") or ""
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        master_addr = slurm_master_addr(nodelist) if nodelist and world > 1 else "127.0.0.1"
    port = _int_var(env, "MASTER_PORT")
    if port is None:
        job_id = _int_var(env, "SLURM_JOB_ID")
        if world == 1:
            port = free_port()  # a lone process must not collide with another lone run on the host
        elif job_id is not None:
            port = 15000 + job_id % 20000  # every task of the job derives the same port
        else:
            port = DEFAULT_MASTER_PORT
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, master_addr=master_addr, master_port=port)


# --------------------------------------------------------------------------------------------
# process group


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _deepspeed():
    """Import DeepSpeed with the CPU traps handled (see docs/training.md)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed 0.19 calls the collectives torch 2.13 renamed; each call site warns once per process (rank)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                            r"(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    patches.disable_shm_op()
    return deepspeed


def init_distributed(env: DistEnv, collective_timeout_s: float | None = None) -> torch.device:
    """Export `env` as the standard variables and start the process group (nccl on CUDA, gloo on CPU).

    `collective_timeout_s` (`train.collective_timeout_s`; None: torch's default, 30 min): a collective that waits
    longer on a peer raises (gloo) or aborts the process (NCCL's watchdog), so the survivors of a dead rank or node
    stop instead of hanging until the job's time limit."""
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                       ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
        _exported.setdefault(key, os.environ.get(key))
        os.environ[key] = str(value)
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed = _deepspeed()
    if not dist.is_initialized():
        timeout = {} if collective_timeout_s is None else {"timeout": timedelta(seconds=collective_timeout_s)}
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, **timeout)
        if device.type == "cuda":
            # NCCL creates a communicator (and its device buffers) at the first collective. DeepSpeed binds the
            # device, so that happens here, only for world size > 1; a lone GPU process would otherwise create it
            # at its first checkpoint barrier, with the model's memory taken (1.7B on one H100: "Failed to CUDA
            # calloc async 4 bytes" at the final save). One barrier now makes every world size create it first.
            barrier()
    return device


def shutdown() -> None:
    """Always called at exit: a live process group at interpreter shutdown can abort the process. Restores the
    launch variables init_distributed exported (an in-process run, e.g. the demo, leaves no trace)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _exported.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _exported.clear()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


_GLOO_SOURCE = re.compile(r"^\[[^\]]*gloo/[^\]]*\]\s*")  # "[…/gloo/transport/tcp/pair.cc:553] " before gloo's text


def peer_failure(exc: BaseException) -> str | None:
    """What a collective said when a peer was lost (a rank or its node died, the network broke, the collective
    timed out), as one line; None for any other error. gloo raises plain RuntimeErrors from its transport; NCCL
    and the c10d store raise torch.distributed.DistError subclasses."""
    message = str(exc).strip()
    if not (isinstance(exc, dist.DistError) or isinstance(exc, RuntimeError) and _GLOO_SOURCE.match(message)):
        return None
    first = _GLOO_SOURCE.sub("", message.splitlines()[0] if message else type(exc).__name__)
    return first.split(" This is typically caused by")[0]  # gloo's advice to read the peers' logs


def barrier() -> None:
    if is_initialized():
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over data-parallel ranks (the callable passed to `model.update_router_state`)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    all_reduce_sum(tensor)
    if is_initialized():
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# model wrapping: activation checkpointing, torch.compile


CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each unique decoder block (`model.layers[i]`) in backward instead of storing its activations.

    Uses torch's non-reentrant checkpoint wrapper: the wrapped block is still called through `__call__`, so
    ZeRO-3's parameter-fetch hooks fire again during recomputation, and `state_dict()` keys keep their names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def fetch_blocks_whole(model: nn.Module) -> int:
    """ZeRO-3: gather a decoder block's parameters with one all-gather at its pre-forward hook (DeepSpeed "z3 leaf
    modules") instead of one fetch per sub-module. A 360M block is ~10M parameters in ~12 sub-modules whose
    separate Python hooks and small collectives cost more than the compute they overlap with at these sizes
    (benchmarks/multi-gpu_2xh100_2026-11-25.md). Only blocks that run once per forward: DeepSpeed reduces a leaf
    module's gradients at its backward hook, which a shared block (recursion) would fire Nr times. Returns how
    many."""
    from deepspeed.utils import set_z3_leaf_module

    uses = Counter(layer_id for layer_id, _ in model.plan.unrolled)
    once = [model.layers[i] for i, n in uses.items() if n == 1]
    for block in once:
        set_z3_leaf_module(block, True)
    return len(once)


def resolve_compile(setting: str | bool, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA (fused RMSNorm / RoPE / SwiGLU / casts: 107k → 129k tokens/s at 360M
    on an H100, benchmarks/training_h100_2026-11-25.md) and stays eager on CPU, where Inductor takes minutes for a
    speed nobody needs."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each unique block in place (dynamic shapes: MoR blocks see a varying number of tokens)."""
    for block in model.layers:
        block.compile(dynamic=True)


def clean_param_name(name: str) -> str:
    """Parameter names as the plain model spells them (without activation-checkpoint wrapper prefixes)."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


# --------------------------------------------------------------------------------------------
# DeepSpeed config


def ds_config_path(cfg: Config) -> Path:
    if cfg.train.ds_config:
        return Path(cfg.train.ds_config).expanduser()
    stage = cfg.train.zero_stage
    return DS_CONFIG_DIR / (f"zero{stage}-offload.json" if cfg.train.offload_optimizer else f"zero{stage}.json")


_FP32_NAMES = ("fp32", "float32", "float", "torch.float32")  # DeepSpeed's DtypeEnum spellings of torch.float32


def fp32_grad_accumulation(precision: str, zero_stage: int, offload_optimizer: bool, accumulation_steps: int) -> bool:
    """Whether micro-batch gradients are summed in fp32 by default (build_ds_config says why; the planner's
    memory estimate counts 4-byte gradients then)."""
    return precision == "bf16" and zero_stage in (2, 3) and not offload_optimizer and accumulation_steps > 1


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The JSON template for the chosen ZeRO stage, filled from `cfg` (batch sizes, precision, clipping).

    Gradient accumulation dtype: DeepSpeed sums the micro-batch gradients in the model dtype unless
    `data_types.grad_accum_dtype` says otherwise, i.e. in bf16, where each of the `gradient_accumulation_steps`
    additions rounds the running sum to 8 bits of mantissa (0.4% relative error at 8 micro-batches, 0.7% at 32;
    tests/test_train.py). With bf16, ZeRO-2/3, no optimizer offload and more than one micro-batch per step, it is
    set to fp32 here unless the template sets it: a compact fp32 gradient partition (4 instead of 2 bytes per
    parameter / world size), the optimizer and checkpoints unchanged. Not for ZeRO-1: there DeepSpeed 0.19.8 swaps
    in its BF16_Optimizer, which adds the cumulative gradient again at every micro-batch (a ~gas/2 times too
    large gradient), so that combination is refused. Not with offload (untested here; the fp32 partition would
    stay on the GPU). Micro-batch gradients are still reduced over ranks in bf16 (`communication_data_type`).
    """
    from mor_ds.config import ConfigError

    t, o = cfg.train, cfg.optim
    path = ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.ds_config: DeepSpeed config {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON ({exc})") from None
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
                          f"train.micro_batch_size × world size = {t.micro_batch_size} × {world_size}")
    accumulation_steps = t.global_batch_size // per_step
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = accumulation_steps
    ds["gradient_clipping"] = o.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16", "check_grad_overflow": True}
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    if t.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {
            **ds["zero_optimization"].get("offload_optimizer", {}), "device": "cpu"}
    ds["steps_per_print"] = 2**31 - 1  # mor_ds's callbacks log; keep DeepSpeed quiet
    ds["wall_clock_breakdown"] = False
    if t.zero_stage == 0 and t.precision == "fp32":
        raise ConfigError("train.zero_stage=0: with precision fp32 DeepSpeed applies non-finite gradients; "
                          "use ZeRO stage 1-3 or bf16 so NaN/Inf steps are skipped")
    accum_dtype = ds.get("data_types", {}).get("grad_accum_dtype")
    if accum_dtype is None and fp32_grad_accumulation(t.precision, t.zero_stage, t.offload_optimizer,
                                                      accumulation_steps):
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
    if (t.precision == "bf16" and t.zero_stage == 1 and not t.offload_optimizer
            and str(accum_dtype).lower() in _FP32_NAMES):
        raise ConfigError(f"train.ds_config: {path}: data_types.grad_accum_dtype=fp32 with ZeRO-1 and bf16 "
                          "makes DeepSpeed use its BF16_Optimizer, which over-counts accumulated gradients; "
                          "use train.zero_stage=2 (fp32 accumulation by default) or drop the key")
    return ds


# --------------------------------------------------------------------------------------------
# the engine facade


class TrainEngine:
    """What the training loop needs from DeepSpeed, and nothing else."""

    def __init__(self, ds_engine: Any, ds_config: dict[str, Any]):
        self._ds = ds_engine
        self.ds_config = ds_config
        # each optimizer group's settings as built (weight decay, betas, eps): a universal load must not change them
        self._group_settings = [{k: v for k, v in group.items() if k != "params"}
                                for group in patches.base_optimizer(ds_engine.optimizer).param_groups]

    @property
    def module(self) -> nn.Module:
        return self._ds.module

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._ds.gradient_accumulation_steps()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ds(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self._ds.training

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)  # scales by 1/gradient_accumulation_steps

    def step(self) -> None:
        """Micro-step bookkeeping; the optimizer runs at the accumulation boundary (skipped on NaN/Inf grads)."""
        self._ds.step()

    def step_applied(self) -> bool:
        """False when the last boundary step was skipped because the gradients were not finite."""
        return bool(self._ds.was_step_applied())

    def grad_norm(self) -> float | None:
        """Global gradient norm before clipping of the last optimizer step (inf when it was skipped)."""
        norm = self._ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def weights_finite(self) -> bool:
        """Collective: no NaN/Inf in any rank's model weights (ZeRO-3: each rank's partitions). The weights are
        the master copy's cast after every applied step, so a non-finite master shows here too."""
        tensors = [getattr(p, "ds_tensor", p) for p in self._ds.module.parameters()]
        local = torch.stack([t.isfinite().all() for t in tensors if t.numel()]).all() if tensors else torch.tensor(True)
        flag = local.to(device=self._ds.device, dtype=torch.int32).reshape(1)
        return bool(all_reduce_min(flag).item())

    def set_lr(self, lr: float) -> None:
        for group in self._ds.optimizer.param_groups:
            group["lr"] = lr

    def save(self, save_dir: str | os.PathLike, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shards; returns after all ranks are done (DeepSpeed barriers). A rank
        whose write fails (disk full) still meets the others in save_checkpoint's closing barrier, the only
        collective after the writes, then raises; the caller agrees on the outcome."""
        try:
            self._ds.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError):
            barrier()
            raise

    def load(self, load_dir: str | os.PathLike, tag: str) -> dict[str, Any]:
        """Collective. A checkpoint that does not fit this model or engine is a one-line CheckpointError."""
        from mor_ds.train.checkpoint_dir import CheckpointError

        path = Path(load_dir) / tag
        try:
            loaded, client_state = self._ds.load_checkpoint(str(load_dir), tag=tag)
        except (RuntimeError, KeyError, ValueError, AssertionError, OSError, EOFError) as exc:
            raise CheckpointError(f"checkpoint {path}: cannot be loaded into this run ({load_failure(exc)})") from None
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it")
        if self._ds.load_universal_checkpoint():
            patches.repair_universal_load(self._ds.optimizer, self._ds.module, self._group_settings, path)
        return client_state


def convert_to_universal(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, log_file: Path) -> None:
    """DeepSpeed's `ds_to_universal` on one checkpoint: every parameter's fp32 weight, Adam moments and step as
    whole tensors under `out_dir/zero/`, loadable at any world size by an engine built with `load_universal`.
    Serial and in this process (no process pool forked from a process with a live process group); DeepSpeed's
    console output goes to `log_file`."""
    _deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with open(log_file, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ds_to_universal.main(args)


def load_failure(exc: BaseException) -> str:
    """The gist of a failed state-dict load in one line: torch lists every mismatched tensor on its own line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    details = [line for line in lines[1:] if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    if details:
        first = details[0] if len(details[0]) <= 200 else details[0][:200] + "…"
        more = f"; and {len(details) - 1} more" if len(details) > 1 else ""
        return f"{first}{more}; was it saved with another model.* shape or family?"
    return f"{type(exc).__name__}: {lines[0][:200]}"


def build_engine(model: nn.Module, cfg: Config, env: DistEnv,
                 param_groups: list[dict[str, Any]], optimizer_factory: Callable[[list[dict[str, Any]]], Any],
                 load_universal: bool = False) -> TrainEngine:
    """`deepspeed.initialize` on `model` (activation checkpointing / compile applied first, as configured).

    `optimizer_factory(param_groups)` builds the client optimizer; with optimizer offload DeepSpeed builds its own
    CPU AdamW from the config instead (same hyper-parameters, same groups). `load_universal`: the engine's
    `load` reads checkpoints in DeepSpeed's universal layout (`convert_to_universal`), whatever world size and
    ZeRO partitioning saved them.
    """
    deepspeed = _deepspeed()
    if cfg.train.zero_stage == 3 and cfg.train.zero3_block_fetch:
        fetch_blocks_whole(model)
    if resolve_compile(cfg.train.compile, device_for(env)):
        compile_blocks(model)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    ds_config = build_ds_config(cfg, env.world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    if cfg.train.offload_optimizer:
        o = cfg.optim
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                              "weight_decay": o.weight_decay}}
        optimizer = None
    else:
        optimizer = optimizer_factory(param_groups)
    ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups, optimizer=optimizer,
                                         config=ds_config, dist_init_required=False)
    patches.fuse_zero_grad_checks(ds_engine.optimizer)
    patches.apply_fused_step(ds_engine.optimizer, cfg.optim.fused_step, device_for(env))
    return TrainEngine(ds_engine, ds_config)


def consolidate_checkpoint(checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict from a (possibly ZeRO-sharded) checkpoint, via DeepSpeed's zero_to_fp32."""
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints a banner and a progress bar for every load (eval, export, generate): kept out of the
    # user's output, and shown only if the consolidation fails
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise
    return {clean_param_name(k): v for k, v in state.items()}


def is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


__all__ = [
    "DistEnv", "DistributedError", "TrainEngine", "all_gather_object", "all_reduce_max", "all_reduce_mean",
    "all_reduce_min", "all_reduce_sum", "apply_activation_checkpointing", "barrier", "broadcast_object",
    "build_ds_config", "build_engine", "clean_param_name", "compile_blocks", "consolidate_checkpoint",
    "convert_to_universal", "device_for", "discover", "fetch_blocks_whole", "fp32_grad_accumulation",
    "init_distributed", "is_cuda_oom", "peer_failure", "resolve_compile", "shutdown", "slurm_master_addr",
]
