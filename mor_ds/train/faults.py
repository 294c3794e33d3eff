"""Fault handling: exit codes, the CUDA OOM message, and debug fault injection.

Fault injection is for testing the recovery paths on the real stack. It is read from the environment, never
from the config, so a resumed run does not re-inject: MOR_DS_INJECT_FAULTS="nan_loss@3,kill_in_save@6"
  nan_loss@S      rank 0 multiplies its loss of optimizer step S (1-based) by NaN before backward
  nan_weight@S    rank 0 sets one of its model weights to NaN after optimizer step S
  kill_in_save@S  rank 0 SIGKILLs itself after the DeepSpeed files of step S are written, before the commit
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, fields

import torch

from mor_ds.config import Config

FAULT_ENV = "MOR_DS_INJECT_FAULTS"

# process exit codes of `mor-ds train`
EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_NONFINITE = 3  # train.max_bad_steps NaN/Inf steps in a row; a checkpoint was saved
EXIT_OOM = 4
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (disk full, permissions); the previous one is kept
EXIT_PEER_LOST = 6  # a collective failed: a peer rank, its node or the network died; resume from the last checkpoint
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGUSR1 after saving; requeue and `--resume auto`
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (after saving, unless it was pressed twice)


class TrainingAborted(RuntimeError):
    """`every_rank`: each rank reports it (the failure may have taken rank 0 with it), not just rank 0."""

    def __init__(self, message: str, exit_code: int, every_rank: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.every_rank = every_rank


@dataclass(frozen=True)
class FaultPlan:
    nan_loss: frozenset[int] = field(default_factory=frozenset)
    nan_weight: frozenset[int] = field(default_factory=frozenset)
    kill_in_save: frozenset[int] = field(default_factory=frozenset)
    interrupt: frozenset[int] = field(default_factory=frozenset)
    interrupt_in_save: frozenset[int] = field(default_factory=frozenset)

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultPlan:
        text = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        kinds: dict[str, set[int]] = {f.name: set() for f in fields(cls)}
        for item in filter(None, (s.strip() for s in text.split(","))):
            kind, _, step = item.partition("@")
            if kind not in kinds or not step.isdigit():
                raise ValueError(f"{FAULT_ENV}={text!r}: bad entry {item!r} (expected "
                                 f"{', '.join(k + '@STEP' for k in kinds)})")
            kinds[kind].add(int(step))
        return cls(**{kind: frozenset(steps) for kind, steps in kinds.items()})

    def after_step(self, step: int, is_main: bool) -> None:
        if is_main and step in self.interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to this (main) thread before kill returns

    def in_save(self, step: int, is_main: bool) -> None:
        """Between the DeepSpeed files of step `step` and the commit that makes them `latest`."""
        if is_main and step in self.interrupt_in_save:
            os.kill(os.getpid(), signal.SIGINT)
        if is_main and step in self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_weights(self, step: int, is_main: bool, model: torch.nn.Module) -> None:
        """nan_weight@S: one element of rank 0's first weight (its ZeRO-3 partition) becomes NaN."""
        if is_main and step in self.nan_weight:
            weight = next(model.parameters())
            with torch.no_grad():
                getattr(weight, "ds_tensor", weight).view(-1)[0] = float("nan")


def oom_message(cfg: Config, world_size: int) -> str:
    """Names the knobs that cut memory and the planner's estimate for this config."""
    from mor_ds.flops import estimate_memory

    t = cfg.train
    gib = 2**30
    try:
        est = estimate_memory(cfg, gpus=world_size)
        estimate = (f"planner estimate per GPU: {est['total'] / gib:.1f} GiB without / "
                    f"{est['total_checkpointed'] / gib:.1f} GiB with activation checkpointing "
                    f"(weights {est['weights'] / gib:.1f}, grads {est['gradients'] / gib:.1f}, optimizer "
                    f"{est['optimizer'] / gib:.1f}, activations {est['activations'] / gib:.1f} GiB)")
    except Exception as exc:  # the message must survive a planner failure
        estimate = f"planner estimate unavailable ({exc})"
    return (f"CUDA out of memory at train.micro_batch_size={t.micro_batch_size}, train.zero_stage={t.zero_stage}, "
            f"train.activation_checkpointing={str(t.activation_checkpointing).lower()}, "
            f"train.offload_optimizer={str(t.offload_optimizer).lower()}; {estimate}. Lower "
            f"train.micro_batch_size (gradient accumulation keeps the global batch), raise train.zero_stage, or set "
            f"train.activation_checkpointing=true / train.offload_optimizer=true (`mor-ds plan` sizes a config).")


def peer_lost_message(detail: str, when: str, timeout_s: float) -> str:
    """What every surviving rank reports when a collective lost a peer (`detail`: the backend's words)."""
    return (f"lost contact with the other ranks {when} ({detail}): a rank, its node or the network failed, or "
            f"stalled past train.collective_timeout_s={timeout_s:g}; the steps since the last complete checkpoint "
            f"are lost, --resume auto (a requeued job) continues from it (exit code {EXIT_PEER_LOST})")
