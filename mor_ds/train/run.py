"""Assemble a training run from a Config: data, model, engine, budget, callbacks, resume; then train.

Called by `mor-ds train` (one process per GPU, after `distributed.init_distributed`) and by the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mor_ds import distributed
from mor_ds.config import Config
from mor_ds.flops import plan_budget
from mor_ds.models import build_model
from mor_ds.train.callbacks import (CheckpointCallback, EvalCallback, MetricsLogger, NonFiniteGuard, ShardAudit,
                                    SignalHandler, Throughput, WandbLogger)
from mor_ds.train.checkpoint_dir import (CheckpointManager, CheckpointRef, checkpoint_meta, complete_checkpoints,
                                         newest_first, resolve_checkpoint, universal_checkpoint)
from mor_ds.train.data import build_data
from mor_ds.train.faults import EXIT_CONFIG, FaultPlan, TrainingAborted
from mor_ds.train.loop import Trainer
from mor_ds.train.optim import build_optimizer, param_groups
from mor_ds.train.run_lock import RunDirError, RunLock
from mor_ds.train.run_lock import acquire as acquire_run_dir
from mor_ds.train.state import seed_everything

CONFIG_FILE = "config.yaml"


def _log(env: distributed.DistEnv, text: str) -> None:
    if env.is_main:
        print(f"[mor-ds] {text}", flush=True)


def resume_target(resume: str, manager: CheckpointManager) -> CheckpointRef | None:
    """Collective. --resume auto: the run dir's newest intact checkpoint, if any; none: start fresh; else a path
    (a step_* directory as given, a run or checkpoints directory its newest intact checkpoint). Checkpoints whose
    files fail their checksums are named, marked CORRUPT and passed over."""
    if resume == "none":
        if complete_checkpoints(manager.root):
            raise TrainingAborted(f"--resume none: {manager.root} already holds checkpoints; use --resume auto to "
                                  f"continue the run or a new --run-dir", EXIT_CONFIG)
        return None
    if resume == "auto":
        return manager.first_intact(newest_first(manager.root) if manager.is_main else [], fallback=True)
    ref = resolve_checkpoint(resume)
    given = Path(resume).expanduser()
    if given.resolve() == ref.path.resolve():
        return manager.first_intact([ref], fallback=False)
    return manager.first_intact(newest_first(ref.root) if manager.is_main else [], fallback=True)


def hold_run_dir(run_dir: Path, env: distributed.DistEnv) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock (see mor_ds.train.run_lock); every rank raises the same
    one-line RunDirError when it cannot."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = acquire_run_dir(run_dir)
        except RunDirError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirError(error)
    if lock is not None and lock.took_over:
        _log(env, lock.took_over)
    return lock


def build_trainer(cfg: Config, run_dir: str | Path, env: distributed.DistEnv, device: torch.device,
                  resume: str = "auto", console: bool = True,
                  init_weights: Callable[[torch.nn.Module], None] | None = None) -> Trainer:
    """The run, built and resumed; the caller holds the run directory (hold_run_dir)."""
    run_dir = Path(run_dir)
    if env.is_main:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    faults = FaultPlan.from_env()
    if faults.active:
        _log(env, f"fault injection active: {faults}")

    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    data = build_data(cfg, env)
    model = build_model(cfg.model, cfg.router)
    if init_weights is not None:  # e.g. uptraining from a vanilla model; a resumed checkpoint overrides it
        init_weights(model)
    model = model.to(device)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters
    plan = plan_budget(cfg)
    groups = param_groups(model, cfg.optim)
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, env,
                                before_commit=lambda step: faults.in_save(step, env.is_main))
    ref = resume_target(resume, manager)
    load = ref
    saved_world = checkpoint_meta(ref).get("world_size", env.world_size) if ref is not None else env.world_size
    if saved_world != env.world_size and cfg.train.zero_stage > 0:  # ZeRO shards are per rank: re-shard them
        load = universal_checkpoint(ref, env.is_main)
        _log(env, f"{ref.path} was saved by {saved_world} process(es): resuming it on {env.world_size} from its "
                  f"universal form {load.path}")
    engine = distributed.build_engine(model, cfg, env, groups, lambda g: build_optimizer(g, cfg.optim, device),
                                      load_universal=load is not ref)
    trainer = Trainer(
        cfg=cfg, run_dir=run_dir, env=env, device=device, engine=engine, train_loader=data.train,
        make_val_batches=data.make_val_batches, total_steps=plan.steps, flops_per_token=plan.flops_per_token,
        callbacks=[NonFiniteGuard(), SignalHandler(), ShardAudit(data.shard_dir, data.train_shards), Throughput(),
                   EvalCallback(), MetricsLogger(console), WandbLogger(), CheckpointCallback(manager)],
        eos_id=data.tokenizer.eos_id if cfg.model.document_mask else None, faults=faults, num_params=num_params)

    if ref is not None:
        trainer.load_client_state(engine.load(load.root, load.tag), str(ref.path))
        _log(env, f"resumed from {ref.path} at step {trainer.state.step}")
    m = cfg.model
    _log(env, f"{cfg.name or 'run'}: {m.family} d={m.hidden_size} L={m.num_layers} Nr={m.num_recursions}, "
              f"{num_params / 1e6:.2f}M params | data: {data.description} | {env.world_size} process(es), "
              f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, grad accumulation "
              f"{engine.gradient_accumulation_steps} | budget {plan.budget}: {plan.steps} steps, "
              f"{plan.tokens:.3g} tokens, {plan.flops:.3g} FLOPs ({plan.convention})")
    return trainer


def train(cfg: Config, run_dir: str | Path, env: distributed.DistEnv, device: torch.device,
          resume: str = "auto", console: bool = True,
          init_weights: Callable[[torch.nn.Module], None] | None = None) -> int:
    """Train (or resume) `cfg` into `run_dir`, holding its lock throughout; returns the exit code (see
    mor_ds.train.faults). `init_weights(model)` runs on the freshly built model before the engine wraps it."""
    lock = hold_run_dir(Path(run_dir), env)
    try:
        trainer = build_trainer(cfg, run_dir, env, device, resume, console, init_weights)
        code = trainer.fit()
    finally:
        if lock is not None:
            lock.release()
    if trainer.exit_message:
        _log(env, trainer.exit_message)
    return code
