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


TRAINING_COMMANDS = ("train", "uptrain")  # stop signals end a step with a checkpoint (mor_ds.train.early_signals)


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
    command = _subcommand(argv)
    training = command in TRAINING_COMMANDS
    previous_handlers: dict = {}
    if training:
        from mor_ds.train import early_signals

        previous_handlers = early_signals.install()  # before build_parser's imports, which take seconds
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mor-ds {command}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not training:
            print(f"mor-ds {command}: interrupted", file=sys.stderr)
        elif early_signals.is_main_process():  # a second Ctrl-C: the first one stops after the step, saving
            print(f"mor-ds {command}: stopped at once by a second Ctrl-C, without saving; the same command "
                  f"continues from the last complete checkpoint", file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT (mor_ds.train.faults.EXIT_INTERRUPTED)
    finally:
        if training:
            early_signals.restore(previous_handlers)  # an in-process caller (tests) gets its own handlers back


if __name__ == "__main__":
    sys.exit(main())
