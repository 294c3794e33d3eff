"""`mor-ds bench <name>`: dispatch to the benchmark modules listed in `mor_ds.bench.BENCHMARKS`."""

from __future__ import annotations

import argparse
import importlib

from mor_ds.bench import BENCHMARKS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (GPU): " + ", ".join(BENCHMARKS))
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        module = importlib.import_module(f"mor_ds.bench.{name}")
        bench_parser = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_arguments(bench_parser)
        bench_parser.set_defaults(func=module.run)
