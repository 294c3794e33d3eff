"""The training loop. One optimizer step = forward → loss → backward → step over the accumulation micro-batches;
everything else (logging, eval, checkpoints, signals, fault counting) lives in callbacks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from mor_ds import distributed
from mor_ds.config import Config
from mor_ds.train.callbacks.base import Callback
from mor_ds.train.faults import (EXIT_CONFIG, EXIT_OK, EXIT_OOM, EXIT_PEER_LOST, FaultPlan, TrainingAborted,
                                 oom_message, peer_lost_message)
from mor_ds.train.schedules import lr_at
from mor_ds.train.state import TrainState, rng_state, set_rng_state


@dataclass
class StepResult:
    """One optimizer step, as seen by this rank. Tensors are detached and stay on the device (no host sync)."""

    loss: Tensor  # LM cross-entropy, mean over this rank's micro-batches
    aux_losses: dict[str, Tensor]  # router losses (coefficients applied), mean over micro-batches
    stats: dict[str, Tensor]  # model stats (depth fractions, router weights), mean over micro-batches
    applied: bool  # False: NaN/Inf gradients, DeepSpeed skipped the update
    lr: float
    data_wait_s: float  # time spent waiting for batches
    step_time_s: float = 0.0  # wall time of the whole step (set by the loop; callbacks' time excluded)


def split_batch(batch: Tensor, device: torch.device, eos_id: int | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, S+1) token windows → inputs, next-token labels, and document ids when eos_id is given
    (a document ends with its EOS token, so the EOS belongs to the document it closes)."""
    if device.type == "cuda" and not batch.is_pinned():
        batch = batch.pin_memory()  # page-locked, so the copy below is asynchronous (no host sync in the step)
    batch = batch.to(device, non_blocking=True)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    doc_ids = None
    if eos_id is not None:
        is_eos = (inputs == eos_id).long()
        doc_ids = is_eos.cumsum(dim=1) - is_eos
    return inputs, labels, doc_ids


@dataclass
class Trainer:
    cfg: Config
    run_dir: Path
    env: distributed.DistEnv
    device: torch.device
    engine: distributed.TrainEngine
    train_loader: Any  # iterable of (B, S+1) int64 windows with state_dict() / load_state_dict()
    make_val_batches: Callable[[], Iterable[Tensor]] | None  # a fresh pass over held-out windows, or None
    total_steps: int
    flops_per_token: float  # train.flops_convention: the budget's currency
    callbacks: list[Callback]
    num_params: int = 0  # unique parameters of the model (counted before ZeRO-3 partitioning)
    eos_id: int | None = None  # set when model.document_mask: document ids from EOS positions
    faults: FaultPlan = field(default_factory=FaultPlan)
    state: TrainState = field(default_factory=TrainState)
    record: dict[str, Any] = field(default_factory=dict)  # metrics of the current step, filled by callbacks
    provenance: dict[str, Any] = field(default_factory=dict)  # this start's record (mor_ds.provenance)
    exit_code: int | None = None
    exit_message: str = ""
    _batches: Iterator[Tensor] | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_len

    @property
    def stopping(self) -> bool:
        return self.exit_code is not None

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps

    def is_log_step(self) -> bool:
        step = self.state.step
        return step == 1 or step % self.cfg.train.log_interval == 0 or self.finished or self.stopping

    def request_stop(self, exit_code: int, message: str) -> None:
        if self.exit_code is None:
            self.exit_code, self.exit_message = exit_code, message

    # ---------------------------------------------------------------------------------------
    # the step

    def _next_batch(self) -> Tensor:
        if self._batches is None:
            self._batches = iter(self.train_loader)
        return next(self._batches)

    def train_step(self) -> StepResult:
        engine, gas = self.engine, self.engine.gradient_accumulation_steps
        lr = lr_at(self.state.step, self.total_steps, self.cfg.optim)
        engine.set_lr(lr)
        inject_nan = self.is_main and (self.state.step + 1) in self.faults.nan_loss
        loss_sum = torch.zeros((), device=self.device)
        aux_sum: dict[str, Tensor] = {}
        stats_sum: dict[str, Tensor] = {}
        data_wait = 0.0
        for micro in range(gas):
            start = time.perf_counter()
            inputs, labels, doc_ids = split_batch(self._next_batch(), self.device, self.eos_id)
            data_wait += time.perf_counter() - start
            out = engine(inputs, labels=labels, doc_ids=doc_ids)
            if inject_nan and micro == 0:
                out.loss = out.loss * float("nan")
            engine.backward(out.total_loss)
            engine.step()  # the optimizer runs at the accumulation boundary
            loss_sum += out.loss.detach().float()
            for name, value in out.aux_losses.items():
                aux_sum[name] = aux_sum.get(name, 0.0) + value.detach().float()
            for name, value in out.stats.items():
                stats_sum[name] = stats_sum.get(name, 0.0) + value.detach().float()
        return StepResult(loss=loss_sum / gas, aux_losses={k: v / gas for k, v in aux_sum.items()},
                          stats={k: v / gas for k, v in stats_sum.items()}, applied=engine.step_applied(),
                          lr=lr, data_wait_s=data_wait)

    # ---------------------------------------------------------------------------------------
    # the run

    def fit(self) -> int:
        """Train until the budget is spent or a callback stops the run; returns the process exit code."""
        try:
            for callback in self.callbacks:
                callback.on_train_start(self)
            resumed_elapsed, fit_start = self.state.elapsed_s, time.perf_counter()
            while not self.finished and not self.stopping:
                start = time.perf_counter()
                try:
                    result = self.train_step()
                except RuntimeError as exc:
                    if distributed.is_cuda_oom(exc):
                        raise TrainingAborted(oom_message(self.cfg, self.env.world_size), EXIT_OOM) from exc
                    raise
                result.step_time_s = time.perf_counter() - start
                self.state.step += 1
                self.faults.poison_weights(self.state.step, self.is_main, self.model)
                self.faults.after_step(self.state.step, self.is_main)
                self.state.tokens += self.tokens_per_step
                self.state.flops += self.flops_per_token * self.tokens_per_step
                self.state.elapsed_s = resumed_elapsed + time.perf_counter() - fit_start
                if result.applied:  # balancing bias / causal thresholds from statistics summed over ranks
                    self.model.update_router_state(distributed.all_reduce_sum)
                self.record = {}
                for callback in self.callbacks:
                    callback.on_step_end(self, result)
            if self.exit_code is None:
                self.exit_code = EXIT_OK
        except TrainingAborted as exc:
            self.exit_code, self.exit_message = exc.exit_code, str(exc)
            raise
        except BaseException as exc:
            lost = distributed.peer_failure(exc)
            if lost is not None:
                self.exit_code = EXIT_PEER_LOST
                self.exit_message = peer_lost_message(lost, f"after step {self.state.step}",
                                                      self.cfg.train.collective_timeout_s)
                raise TrainingAborted(self.exit_message, EXIT_PEER_LOST, every_rank=True) from exc
            self.exit_code = 1 if self.exit_code is None else self.exit_code  # W&B marks the run failed
            raise
        finally:
            self._close_batches()
            for callback in self.callbacks:
                callback.on_train_end(self)
        return self.exit_code

    def _close_batches(self) -> None:
        """Stop the loader's iterator (and its prefetch thread)."""
        close = getattr(self._batches, "close", None)  # a generator: runs the loader's cleanup
        if close is not None:
            close()
        self._batches = None

    # ---------------------------------------------------------------------------------------
    # what a checkpoint carries besides model and optimizer

    def client_state(self) -> dict[str, Any]:
        """Collective: gathers every rank's loader and RNG state (DeepSpeed stores rank 0's client state)."""
        per_rank = distributed.all_gather_object({"loader": self.train_loader.state_dict(), "rng": rng_state()})
        return {"mor_ds": {"state": self.state.to_dict(), "world_size": self.env.world_size, "ranks": per_rank,
                           "config": self.cfg.to_dict()}}

    def load_client_state(self, client_state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint's client state, also one saved by another number of processes: the loader
        re-shards its position over this world size (no sample skipped or seen twice), rank r continues the saved
        rank r's RNG streams (a rank the saved run did not have, rank r mod its world size's: all ranks start from
        the same seed)."""
        saved = client_state.get("mor_ds")
        if saved is None:
            raise TrainingAborted(f"checkpoint {source}: not written by mor-ds train (no client state)", EXIT_CONFIG)
        ranks = saved["ranks"]
        self.state = TrainState.from_dict(saved["state"])
        self.train_loader.load_state_dicts([r["loader"] for r in ranks])
        self._close_batches()  # the next batch comes from the restored position
        set_rng_state(ranks[self.env.rank % len(ranks)]["rng"])
