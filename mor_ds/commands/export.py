"""`mor-ds export`: consolidate a (ZeRO-sharded) training checkpoint into one safetensors file."""

from __future__ import annotations

import argparse
import sys

from mor_ds.interop.hf_export import add_hf_export_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="checkpoint → single safetensors state dict (+ config metadata)",
                              description="Consolidate ZeRO shards (DeepSpeed's zero_to_fp32) into one fp32 "
                                          "safetensors file that mor_ds.weights.load_model() reads.")
    p.add_argument("--checkpoint", required=True,
                   help="a run dir, its checkpoints/ dir (latest complete checkpoint) or a step_* directory")
    p.add_argument("--out", required=True, help="output .safetensors file (--format hf: a directory)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "hf"),
                   help="hf: a transformers directory (vanilla: LlamaForCausalLM; recursive/MoR: trust_remote_code)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_hf_export_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mor_ds.outputs import OutputError, check_output

    try:
        check_output(args.out, suffix=".safetensors" if args.format == "safetensors" else None, force=args.force)
    except OutputError as exc:
        print(f"mor-ds export: {exc}", file=sys.stderr)
        return 2
    if args.format == "hf":
        from mor_ds.interop.hf_export import hf_export_main

        return hf_export_main(args)
    from mor_ds.weights import export_checkpoint
    from mor_ds.train.checkpoint_dir import CheckpointError

    try:
        meta = export_checkpoint(args.checkpoint, args.out)
    except CheckpointError as exc:
        print(f"mor-ds export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {meta['source']} (step {meta['step']}) → {args.out}")
    return 0
