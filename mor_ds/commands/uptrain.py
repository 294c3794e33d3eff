"""`mor-ds uptrain`: initialise a recursive / MoR model from a trained vanilla model, then train it like `mor-ds train`.

    mor-ds uptrain --from runs/vanilla-360m --config mor-360m-nr3 --run-dir runs/mor3-up
    mor-ds uptrain --from ~/models/SmolLM-360M --config mor-360m-nr3 --init select --run-dir runs/mor3-up
    torchrun --nproc_per_node 8 -m mor_ds.cli uptrain --from … --config … --run-dir …   (multi-GPU, as train)

--from: a mor-ds run dir / checkpoint dir / export file of a vanilla model, or a local Hugging Face Llama directory.
Shared layers start as the average (--init average) of the vanilla layers they replace, or one of them (--init select,
--select-step r); unique first/last layers, embeddings, final norm and head are copied; routers start fresh.
The source's shapes must match the target config's (hidden size, heads, FFN, vocabulary…). Resuming (the same
command again) continues from RUN_DIR's checkpoint; the vanilla weights are then no longer read.
"""

from __future__ import annotations

import argparse
import sys

from mor_ds.commands.train import add_config_args, add_resume_args
from mor_ds.uptrain import INIT_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("uptrain", help="initialise a recursive/MoR model from a vanilla one, then train",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True,
                   help="vanilla model: mor-ds run dir / checkpoint / export file, or a local Hugging Face Llama dir")
    add_config_args(p)
    p.add_argument("--run-dir", required=True, help="output directory, as for `mor-ds train`")
    p.add_argument("--init", default="average", choices=INIT_MODES,
                   help="shared layer ← average of the vanilla layers it replaces (default) or one of them")
    p.add_argument("--select-step", type=int, default=0,
                   help="--init select: take the vanilla layer at this recursion step (0 = the lowest)")
    add_resume_args(p)  # auto: continue RUN_DIR if it has a checkpoint, else start from the vanilla weights
    p.add_argument("--quiet", action="store_true", help="no per-step console line")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.errors import DataError
    from mor_ds import distributed
    from mor_ds.config import ConfigError, load_config
    from mor_ds.train.checkpoint_dir import CheckpointError
    from mor_ds.train.faults import EXIT_CONFIG, TrainingAborted
    from mor_ds.train.run import train
    from mor_ds.uptrain import UptrainError, init_from_vanilla, load_vanilla, uptrain_config

    try:
        env = distributed.discover(local_rank_arg=args.local_rank)
    except distributed.DistributedError as exc:
        print(f"mor-ds uptrain: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def fail(message: str, code: int = EXIT_CONFIG) -> int:
        if env.is_main:
            print(f"mor-ds uptrain: {message}", file=sys.stderr, flush=True)
        return code

    try:
        target_cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return fail(f"config error: {exc}")
    try:
        vanilla, source_cfg = load_vanilla(args.source)
    except (CheckpointError, ValueError) as exc:  # not a checkpoint / export / Llama directory
        return fail(f"--from {args.source}: {str(exc).splitlines()[0]}")
    try:
        cfg = uptrain_config(source_cfg, target_cfg)
    except UptrainError as exc:
        return fail(f"--from {args.source}: {str(exc).removeprefix('uptrain: ')}")

    def init_weights(model) -> None:
        plan = init_from_vanilla(model, vanilla, args.init, args.select_step)
        if env.is_main:
            print(f"[mor-ds] uptrain from {args.source}: {plan.describe()}", flush=True)

    device = distributed.init_distributed(env)
    try:
        return train(cfg, args.run_dir, env, device, resume=args.resume, console=not args.quiet,
                     init_weights=init_weights, allow_changes=args.allow_changes)
    except (ConfigError, CheckpointError, UptrainError) as exc:
        return fail(str(exc).removeprefix("uptrain: "))
    except TrainingAborted as exc:
        return fail(str(exc), exc.exit_code)
    except DataError as exc:
        return fail(f"data error: {exc}")
    finally:
        distributed.shutdown()
