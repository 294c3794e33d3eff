"""What a run carries across restarts besides the model and optimizer: counters and RNG states."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (a skipped NaN/Inf step counts: its batch is consumed)
    tokens: int = 0  # training tokens consumed
    flops: float = 0.0  # training FLOPs so far, under train.flops_convention
    skipped_steps: int = 0  # NaN/Inf steps skipped over the whole run
    # wall seconds of the training loop (steps and their callbacks: eval, logging, checkpoints) summed over resumed
    # segments; start-up is not counted, nor the steps an interrupted segment took after its last checkpoint
    elapsed_s: float = 0.0
    bad_steps_in_a_row: int = 0
    wandb_run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) this process's CUDA generator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
