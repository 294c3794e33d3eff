"""`mor-ds` entry point: each subcommand lives in `mor_ds.commands.<name>` with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mor_ds.config import ConfigError

# one module per subcommand; each defines register(subparsers) which sets `func(args) -> int`
COMMANDS: tuple[str, ...] = ("plan", "train", "eval", "export", "demo", "bench", "import_hf", "uptrain", "generate", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-ds", description="Mixture-of-Recursions pretraining on PyTorch + DeepSpeed")
    # the `deepspeed` launcher puts --local_rank=N before the subcommand (it also sets LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", dest="top_local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mor_ds.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mor-ds {args.command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
