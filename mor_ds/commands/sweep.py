"""`mor-ds sweep SWEEP.yaml [--dry-run [--json]]`: compute-matched arms -> resolved configs -> one sbatch job each.

    mor-ds sweep slurm/sweeps/isoflop-360m.yaml --dry-run    # table of arms + the rendered job scripts
    mor-ds sweep slurm/sweeps/isoflop-360m.yaml --dry-run --json   # the arms as JSON, for scripts
    mor-ds sweep slurm/sweeps/isoflop-360m.yaml              # submit (re-run: only arms not yet submitted)
    mor-ds sweep slurm/sweeps/isoflop-360m.yaml --resubmit mor-360m-nr3   # forget an arm's job, submit it again
    mor-ds sweep slurm/sweeps/repro-135m.yaml --write-only   # arms' configs and scripts on disk, no Slurm needed:
        mor-ds train --config OUTPUT_DIR/ARM/config.yaml --run-dir OUTPUT_DIR/ARM    (then mor-ds report --sweep)
    mor-ds sweep status slurm/sweeps/isoflop-360m.yaml   # each arm's job id, Slurm state, last step, loss, ETA

Exit codes: 0 done; 1 an sbatch failed (the arms submitted so far are recorded); 2 bad sweep file or config.
"""

from __future__ import annotations

import argparse
import json
import sys

from mor_ds.sweep import (SweepError, load_sweep, render_eval, render_train, status, status_table, submit, table,
                          to_json, write_arms)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="compute-matched sweep: one Slurm job per arm, same FLOPs or tokens",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="+", metavar="[status] SWEEP",
                   help="sweep YAML (see slurm/sweeps/ and docs/slurm.md); `status SWEEP` lists its arms' jobs and "
                        "progress")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the arms and their job scripts; submit nothing")
    mode.add_argument("--write-only", action="store_true",
                      help="write sweep.json and every arm's config.yaml, plan.json and job scripts; submit nothing")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the arms as JSON (name, source config, overrides, FLOPs, tokens, "
                        "steps, nodes x GPUs) instead of the table and scripts; with status: one JSON object per arm")
    p.add_argument("--resubmit", action="append", default=[], metavar="ARM",
                   help="submit ARM again even if the state file records it (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    words = args.sweep
    show_status = len(words) == 2 and words[0] == "status"
    if len(words) != 1 and not show_status:
        print(f"mor-ds sweep: expected SWEEP or status SWEEP, got {' '.join(words)}", file=sys.stderr)
        return 2
    if args.json and not (args.dry_run or show_status):
        print("mor-ds sweep: --json needs --dry-run (it prints the arms instead of submitting them)", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(words[-1])
    except SweepError as exc:
        print(f"mor-ds sweep: {exc}", file=sys.stderr)
        return 2
    if show_status:
        rows = status(sweep)
        print("\n".join(json.dumps(r) for r in rows) if args.json else status_table(sweep, rows))
        return 0
    if args.json:
        print(json.dumps(to_json(sweep), indent=2))
        return 0
    print(table(sweep), flush=True)
    if args.dry_run:
        for arm in sweep.arms:
            print(f"\n# ===== {sweep.arm_dir(arm)}/train.sbatch =====")
            print(render_train(sweep, arm), end="")
            if sweep.eval_args is not None:
                print(f"\n# ===== {sweep.arm_dir(arm)}/eval.sbatch (--dependency=afterok:<train job>) =====")
                print(render_eval(sweep, arm), end="")
        print(f"\ndry run: nothing written, nothing submitted ({len(sweep.arms)} arms)")
        return 0
    if args.write_only:
        for arm_dir in write_arms(sweep):
            print(f"wrote {arm_dir}/config.yaml", flush=True)
        print(f"{len(sweep.arms)} arms written, nothing submitted; train each with `mor-ds train --config "
              f"{sweep.output_dir}/ARM/config.yaml --run-dir {sweep.output_dir}/ARM`")
        return 0
    try:
        state = submit(sweep, resubmit=tuple(args.resubmit), echo=lambda line: print(line, flush=True))
    except SweepError as exc:
        print(f"mor-ds sweep: {exc}", file=sys.stderr)
        return 1
    print(f"{len(state.arms)}/{len(sweep.arms)} arms submitted; state in {state.path}; W&B group {sweep.name}")
    return 0
