"""Weights & Biases logging from rank 0: project/group/name from the config, the resolved config and this start's
provenance logged, one W&B run per run directory.

The run id is kept in RUN_DIR/wandb/run-id (and in the checkpoint). A restart continues that run rewound to the
checkpoint's step (wandb's `resume_from="ID?_step=N"`), so the steps logged between the checkpoint and a crash are
replaced by the resumed run's, not logged twice. Offline, each start writes its own offline-run-* directory (wandb's
layout) with the same id, the later ones carrying the rewind point; `wandb sync RUN_DIR/wandb/offline-run-*`
uploads them in order. Rewinding is a W&B server feature an account may not have: when an online init with
`resume_from` fails, the run is resumed plainly (W&B then keeps the steps it had) with a warning.

wandb.mode "auto": online when an API key is configured (WANDB_API_KEY or a `wandb login` netrc entry),
otherwise offline — the run is written under RUN_DIR/wandb/ and uploaded later with `wandb sync`. An explicit
WANDB_MODE in the environment wins over "auto".
"""

from __future__ import annotations

import logging
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


RUN_ID_FILE = "run-id"  # under RUN_DIR/wandb/


def run_id_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "wandb" / RUN_ID_FILE


class WandbLogger(Callback):
    def __init__(self) -> None:
        self.run = None
        self.started = False  # wandb's service runs (also after a failed call left self.run None)

    def on_train_start(self, trainer) -> None:
        cfg = trainer.cfg.wandb
        mode = resolve_mode(cfg)
        if not trainer.is_main or mode == "disabled" or trainer.stopping:  # stopping: no step will be logged
            return
        import wandb

        # a dead service (see _close_service) makes asyncio warn about the socket once per write as well
        logging.getLogger("asyncio").addFilter(lambda record: "socket.send() raised" not in record.getMessage())
        state = trainer.state
        id_file = run_id_path(trainer.run_dir)
        known = id_file.read_text().strip() if id_file.is_file() else state.wandb_run_id
        run_id = known or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        state.wandb_run_id = run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        common = dict(project=cfg.project, group=cfg.group or None, name=cfg.name or trainer.cfg.name or None,
                      config=trainer.cfg.to_dict(), dir=str(Path(trainer.run_dir)), mode=mode)
        self.started = True
        if not known:
            self.run = wandb.init(id=run_id, **common)
        else:
            try:  # the same run, its history rewound to the checkpoint
                self.run = wandb.init(resume_from=f"{run_id}?_step={state.step}", **common)
            except Exception as exc:  # e.g. an account without rewind
                print(f"[mor-ds] W&B could not rewind run {run_id} to step {state.step} ({exc.__class__.__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); resuming it without a rewind: steps "
                      f"after {state.step} logged before the restart stay in its history", file=sys.stderr)
                self.run = wandb.init(id=run_id, resume="allow", **common)
        # values that differ from start to start
        self.run.config.update({"provenance": trainer.provenance, "num_params": trainer.num_params,
                                "total_steps": trainer.total_steps, "world_size": trainer.env.world_size},
                               allow_val_change=True)

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
        if not self.started:
            return
        if self.run is not None:
            run = self.run

            def finish() -> None:
                run.summary["exit_code"] = trainer.exit_code
                run.finish(exit_code=trainer.exit_code or 0)

            self._call("finish", finish)
            self.run = None
        _close_service()
        self.started = False


def _close_service() -> None:
    """Wait for wandb's service to write everything, now rather than in wandb's exit hook: a service that died
    with the job (Slurm signals every process) then costs one line here instead of a 30-line traceback after the
    run's last line (wandb unregisters its hook before the teardown can fail)."""
    import wandb

    try:
        wandb.teardown()
    except Exception as exc:  # the service is gone: nothing left to tell it
        print(f"[mor-ds] W&B service already stopped ({exc.__class__.__name__}: {exc}); the records it had not "
              f"written yet are lost", file=sys.stderr)
