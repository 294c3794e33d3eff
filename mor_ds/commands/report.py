"""`mor-ds report RUN_DIR… | --sweep SWEEP_DIR [--out DIR]`: report.md, report.json and PNG plots comparing runs.

    mor-ds report --sweep runs/sweeps/isoflop-360m          # every arm of a sweep, grouped by budget
    mor-ds report runs/a runs/b --out report/               # any run directories, grouped by their own budgets

One table row per run (parameters, FLOPs, tokens, losses, wall time, tokens/s, MFU, peak memory; validation loss
from `mor-ds eval`'s eval.json when present), plots of validation loss against training FLOPs, training loss against
tokens, depth fractions, router weights and aux losses. Runs that are missing or unfinished are named.
Exit codes: 0 written (also with missing runs); 2 unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="markdown table and plots comparing runs or a sweep's arms",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories of `mor-ds train`")
    p.add_argument("--sweep", metavar="SWEEP_DIR", help="a sweep's output directory (holds sweep.json)")
    p.add_argument("--out", help="output directory (default: SWEEP_DIR/report, else ./report)")
    p.add_argument("--title", help="report title (default: the sweep's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mor_ds.report import ReportError, load_run, load_sweep_runs, write_report

    if bool(args.runs) == bool(args.sweep):
        print("mor-ds report: give run directories or --sweep SWEEP_DIR (not both)", file=sys.stderr)
        return 2
    try:
        if args.sweep:
            name, runs = load_sweep_runs(args.sweep)
            out = Path(args.out or Path(args.sweep) / "report")
        else:
            name, runs = "mor-ds report", [load_run(d) for d in args.runs]
            out = Path(args.out or "report")
        report = write_report(runs, out, title=args.title or name)
    except ReportError as exc:
        print(f"mor-ds report: {exc}", file=sys.stderr)
        return 2
    for budget, rows in report.groups:
        for row in rows:
            val = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
            print(f"{budget} | {row['arm']}: {row['status']}, {row['steps']} steps, train loss "
                  f"{row['train_loss']:.4f}, val loss {val}")
    for row in report.missing:
        print(f"{row['budget'] or '-'} | {row['arm']}: missing ({row['why']})")
    print(f"wrote {out}/report.md, report.json and {len(report.figures)} plots")
    return 0
