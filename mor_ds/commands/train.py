"""`mor-ds train`: one process per GPU, started by `torchrun`, `deepspeed` or `srun` alike.

    torchrun --nproc_per_node 8 -m mor_ds.cli train --config mor-360m-nr3 --run-dir runs/mor3
    deepspeed --num_gpus 8 --module mor_ds.cli train --config mor-360m-nr3 --run-dir runs/mor3
    srun -n 8 mor-ds train --config mor-360m-nr3 --run-dir runs/mor3      (SLURM_* → rank, world, master)

Exit codes: 0 done; 2 bad config/data/checkpoint; 3 NaN/Inf abort (checkpoint saved); 4 CUDA OOM;
5 a checkpoint could not be saved (the previous one is kept); 6 lost a peer rank, node or the network;
75 stopped by SIGTERM/SIGUSR1 after saving (requeue the job: the same command resumes, --resume auto);
130 stopped by Ctrl-C (after saving; a second Ctrl-C stops at once, without saving).
"""

from __future__ import annotations

import argparse
import socket
import sys

from mor_ds.config import ConfigError, load_config
from mor_ds.train.faults import EXIT_CONFIG, EXIT_PEER_LOST, peer_lost_message


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--config and --set, shared by the commands that build a Config (train, uptrain)."""
    p.add_argument("--config", required=True, help="preset name (e.g. tiny-mor, mor-360m-nr3) or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. train.max_steps=100")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume and --allow-changes, shared by train and uptrain."""
    p.add_argument("--resume", default="auto",
                   help="auto (default): continue from RUN_DIR's latest complete checkpoint if there is one, else "
                        "start; none: start fresh, refused if RUN_DIR already holds checkpoints; or a checkpoint "
                        "path (a run dir, its checkpoints dir or a step_* directory) to continue from")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even though settings other than the budget, logging, checkpointing, W&B and "
                        "memory/speed knobs differ from the checkpoint's (provenance.json records the changes)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train or resume a model with DeepSpeed",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--run-dir", required=True, help="output directory: config.yaml, metrics.jsonl, checkpoints/, "
                                                    "wandb/")
    add_resume_args(p)
    p.add_argument("--quiet", action="store_true", help="no per-step console line (metrics.jsonl / W&B only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.errors import DataError
    from mor_ds import distributed
    from mor_ds.train.checkpoint_dir import CheckpointError
    from mor_ds.train.faults import TrainingAborted
    from mor_ds.train.run import train

    local_rank = args.local_rank if args.local_rank is not None else getattr(args, "top_local_rank", None)
    try:
        env = distributed.discover(local_rank_arg=local_rank)
    except distributed.DistributedError as exc:
        print(f"mor-ds train: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config, args.overrides)
    device = distributed.init_distributed(env, cfg.train.collective_timeout_s)
    try:
        return train(cfg, args.run_dir, env, device, resume=args.resume, console=not args.quiet,
                     allow_changes=args.allow_changes)
    except (ConfigError, CheckpointError) as exc:
        _error(env, str(exc))
        return EXIT_CONFIG
    except TrainingAborted as exc:
        _error(env, str(exc), every_rank=exc.every_rank)
        return exc.exit_code
    except DataError as exc:
        _error(env, f"data error: {exc}")
        return EXIT_CONFIG
    except RuntimeError as exc:  # a peer lost before the training loop (start-up, resume)
        lost = distributed.peer_failure(exc)
        if lost is None:
            raise
        _error(env, peer_lost_message(lost, "while starting", cfg.train.collective_timeout_s), every_rank=True)
        return EXIT_PEER_LOST
    finally:
        distributed.shutdown()


def _error(env, message: str, every_rank: bool = False) -> None:
    """Rank 0 reports; with `every_rank` each rank does, naming itself and its host (rank 0 may be the one lost)."""
    if every_rank:
        print(f"mor-ds train: rank {env.rank} on {socket.gethostname()}: {message}", file=sys.stderr, flush=True)
    elif env.is_main:
        print(f"mor-ds train: {message}", file=sys.stderr, flush=True)
