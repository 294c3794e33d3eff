"""Assemble a training run from a Config: data, model, engine, budget, callbacks, resume; then train.

Called by `mor-ds train` (one process per GPU, after `distributed.init_distributed`) and by the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mor_ds import distributed
from mor_ds.config import Config, from_saved
from mor_ds.flops import plan_budget
from mor_ds.models import build_model
from mor_ds.provenance import append_start, start_record
from mor_ds.train.callbacks import (CheckpointCallback, EvalCallback, LossCurve, MetricsLogger, NonFiniteGuard,
                                    ShardAudit, SignalHandler, Throughput, WandbLogger)
from mor_ds.train.checkpoint_dir import (CheckpointManager, CheckpointRef, checkpoint_meta, complete_checkpoints,
                                         newest_first, resolve_checkpoint, universal_checkpoint)
from mor_ds.train.data import build_data, resolve_data_config
from mor_ds.train.faults import EXIT_CONFIG, EXIT_OK, FaultPlan, TrainingAborted
from mor_ds.train.loop import Trainer
from mor_ds.train.optim import build_optimizer, param_groups
from mor_ds.train.resume import check_resume
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


def _finished_message(run_dir: Path, step: int, plan) -> str:
    key = plan.budget.split("=")[0]
    example = {"train.max_steps": f"train.max_steps={2 * step}"}.get(key, f"{key}=<more>")
    return (f"{run_dir} already finished: its checkpoint is at step {step} and the budget ({plan.budget}) is "
            f"{plan.steps} steps; nothing to train. To train further, raise the budget (e.g. --set {example}); "
            f"to start over, use a new --run-dir")


def build_trainer(cfg: Config, run_dir: str | Path, env: distributed.DistEnv, device: torch.device,
                  resume: str = "auto", console: bool = True,
                  init_weights: Callable[[torch.nn.Module], None] | None = None,
                  allow_changes: bool = False) -> Trainer | None:
    """The run's Trainer, or None when its checkpoint already reached the budget (the reason is logged). The caller
    holds the run directory (hold_run_dir).

    Nothing is written to `run_dir` before the config, the data and the checkpoint to resume from have been
    checked: a run that fails to start leaves no trace, and a refused resume leaves the run dir as it was."""
    run_dir = Path(run_dir).absolute()
    cfg = resolve_data_config(cfg, env)  # absolute paths, data.mode decided: what config.yaml records
    faults = FaultPlan.from_env()
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, env,
                                before_commit=lambda step: faults.in_save(step, env.is_main))
    ref = resume_target(resume, manager)
    plan = plan_budget(cfg)
    changes: dict = {}
    saved_world = env.world_size
    if ref is not None:
        meta = checkpoint_meta(ref)
        saved_world = meta.get("world_size", env.world_size)
        saved = resolve_data_config(from_saved(meta["config"]), env).to_dict()  # as the run read it
        changes, notices = check_resume(saved, cfg.to_dict(), str(ref.path), allow_changes)
        for line in notices:
            _log(env, line)
        if meta["step"] >= plan.steps:
            _log(env, _finished_message(run_dir, meta["step"], plan))
            return None
    if faults.active:
        _log(env, f"fault injection active: {faults}")

    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    data = build_data(cfg, env)
    model = build_model(cfg.model, cfg.router)
    if init_weights is not None:  # e.g. uptraining from a vanilla model; a resumed checkpoint overrides it
        init_weights(model)
    model = model.to(device)
    num_params = model.num_params()  # before ZeRO-3 partitions the parameters
    groups = param_groups(model, cfg.optim)
    load = ref
    if saved_world != env.world_size and cfg.train.zero_stage > 0:  # ZeRO shards are per rank: re-shard them
        load = universal_checkpoint(ref, env.is_main)
        _log(env, f"{ref.path} was saved by {saved_world} process(es): resuming it on {env.world_size} from its "
                  f"universal form {load.path}")
    engine = distributed.build_engine(model, cfg, env, groups, lambda g: build_optimizer(g, cfg.optim, device),
                                      load_universal=load is not ref)
    trainer = Trainer(
        cfg=cfg, run_dir=run_dir, env=env, device=device, engine=engine, train_loader=data.train,
        make_val_batches=data.make_val_batches, total_steps=plan.steps, flops_per_token=plan.flops_per_token,
        callbacks=[NonFiniteGuard(), SignalHandler(), ShardAudit(data.train_shards), Throughput(),
                   EvalCallback(), MetricsLogger(console), WandbLogger(), LossCurve(), CheckpointCallback(manager)],
        eos_id=data.tokenizer.eos_id if cfg.model.document_mask else None, faults=faults, num_params=num_params)
    if ref is not None:
        trainer.load_client_state(engine.load(load.root, load.tag), str(ref.path))
        _log(env, f"resumed from {ref.path} at step {trainer.state.step}")
    trainer.provenance = start_record(step=trainer.state.step, world_size=env.world_size, data=data.provenance,
                                      resumed_from=str(ref.path) if ref else None, changes=changes)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / CONFIG_FILE
        if ref is None or not config_file.exists():  # a run's config.yaml describes how it started: never rewritten
            config_file.write_text(cfg.to_yaml())
        append_start(run_dir, trainer.provenance)
    m = cfg.model
    _log(env, f"{cfg.name or 'run'}: {m.family} d={m.hidden_size} L={m.num_layers} Nr={m.num_recursions}, "
              f"{num_params / 1e6:.2f}M params | data: {data.description} | {env.world_size} process(es), "
              f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}, grad accumulation "
              f"{engine.gradient_accumulation_steps} | budget {plan.budget}: {plan.steps} steps, "
              f"{plan.tokens:.3g} tokens, {plan.flops:.3g} FLOPs ({plan.convention})")
    return trainer


def train(cfg: Config, run_dir: str | Path, env: distributed.DistEnv, device: torch.device,
          resume: str = "auto", console: bool = True,
          init_weights: Callable[[torch.nn.Module], None] | None = None, allow_changes: bool = False) -> int:
    """Train (or resume) `cfg` into `run_dir`, holding its lock throughout; returns the exit code (see
    mor_ds.train.faults). `init_weights(model)` runs on the freshly built model before the engine wraps it;
    `allow_changes` resumes even when settings other than the safe ones (mor_ds.train.resume) changed. A run dir
    this call created is removed again when the run fails to start (it would hold nothing but the lock)."""
    lock = hold_run_dir(Path(run_dir), env)
    started = False
    try:
        trainer = build_trainer(cfg, run_dir, env, device, resume, console, init_weights, allow_changes)
        if trainer is None:
            return EXIT_OK
        started = True
        code = trainer.fit()
    finally:
        if lock is not None:
            lock.release(remove_new_dir=not started)
    if trainer.exit_message:
        _log(env, trainer.exit_message)
    return code
