"""Weights & Biases logging from rank 0: project/group/name from the config, the resolved config logged, and
the same run id resumed after a restart (it travels in the checkpoint).

wandb.mode "auto": online when an API key is configured (WANDB_API_KEY or a `wandb login` netrc entry),
otherwise offline — the run is written under RUN_DIR/wandb/ and uploaded later with `wandb sync`. An explicit
WANDB_MODE in the environment wins over "auto".
"""

from __future__ import annotations

import netrc
import os
import secrets
import sys
from pathlib import Path

from mor_ds.config import WandbConfig
from mor_ds.train.callbacks.base import Callback


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: WandbConfig) -> str:
    if not cfg.enabled:
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    env_mode = os.environ.get("WANDB_MODE", "")
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if _has_api_key() else "offline"


class WandbLogger(Callback):
    def __init__(self) -> None:
        self.run = None

    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg.wandb
        mode = resolve_mode(cfg)
        if not trainer.is_main or mode == "disabled" or trainer.stopping:  # stopping: no step will be logged
            return
        import wandb

        state = trainer.state
        run_id = state.wandb_run_id or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        state.wandb_run_id = run_id
        self.run = wandb.init(project=cfg.project, group=cfg.group or None, name=cfg.name or trainer.cfg.name or None,
                              id=run_id, resume="allow", config=trainer.cfg.to_dict(), dir=str(Path(trainer.run_dir)),
                              mode=mode)
        self.run.config.update({"num_params": trainer.num_params, "total_steps": trainer.total_steps,
                                "world_size": trainer.env.world_size}, allow_val_change=True)

    def _call(self, what: str, fn) -> None:
        """W&B must never cost a checkpoint: Slurm signals every process of a job, wandb's service included, and
        a dead service makes the next call raise. Warn once and go on without W&B."""
        try:
            fn()
        except Exception as exc:
            print(f"[mor-ds] W&B {what} failed ({exc.__class__.__name__}: {exc}); continuing without W&B",
                  file=sys.stderr)
            self.run = None

    def on_step_end(self, trainer, result) -> None:
        if self.run is not None and trainer.record:
            record = {k: v for k, v in trainer.record.items() if k != "step" and v is not None}
            self._call("log", lambda: self.run.log(record, step=trainer.state.step))

    def on_train_end(self, trainer) -> None:
        if self.run is not None:
            run = self.run

            def finish() -> None:
                run.summary["exit_code"] = trainer.exit_code
                run.finish(exit_code=trainer.exit_code or 0)

            self._call("finish", finish)
            self.run = None
