"""`mor-ds` entry point: each subcommand lives in `mor_ds.commands.<name>` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mor_ds.config import ConfigError

# one module per subcommand; each defines register(subparsers) which sets `func(args) -> int`
COMMANDS: tuple[str, ...] = ("plan", "train", "eval", "export", "demo", "bench", "import_hf", "uptrain", "generate",
                             "sweep", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-ds",
                                     description="Mixture-of-Recursions pretraining on PyTorch + DeepSpeed")
    # the `deepspeed` launcher puts --local_rank=N before the subcommand (it also sets LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", dest="top_local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mor_ds.commands.{name}").register(sub)
    return parser


TRAINING_COMMANDS = ("train", "uptrain")  # they keep SIGTERM/SIGUSR1 for a checkpoint (mor_ds.train.early_signals)


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand in `argv` without parsing (the parser imports every command, torch included)."""
    args = iter(argv)
    for arg in args:
        if arg in ("--local_rank", "--local-rank"):
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _subcommand(argv) in TRAINING_COMMANDS:
        from mor_ds.train import early_signals

        early_signals.install()  # before build_parser's imports, which take seconds
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mor-ds {args.command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
