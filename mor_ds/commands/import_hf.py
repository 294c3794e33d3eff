"""`mor-ds import-hf PATH --out FILE`: a local Hugging Face Llama checkpoint → a mor-ds export of our vanilla model.

    mor-ds import-hf ~/models/SmolLM-135M --out runs/smollm/model.safetensors
    mor-ds eval --checkpoint runs/smollm/model.safetensors --tasks paper
    mor-ds uptrain --from runs/smollm/model.safetensors --config mor-135m-nr3 --run-dir runs/smollm-mor3

The export holds the model config (vanilla, shapes from config.json; data.tokenizer = the checkpoint's tokenizer
file) and the fp32 weights; logits equal the Hugging Face model's. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import-hf", help="local Hugging Face Llama checkpoint → mor-ds vanilla export",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="local directory with config.json, weights (safetensors/bin) and a tokenizer")
    p.add_argument("--out", required=True, help="output .safetensors file (mor-ds export format)")
    p.add_argument("--config", default=None,
                   help="preset or YAML whose non-model sections (data, optim, train…) the export carries")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of --config (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mor_ds.config import load_config
    from mor_ds.outputs import OutputError, check_output
    from mor_ds.interop import InteropError, import_hf, write_export

    try:
        check_output(args.out, suffix=".safetensors", force=args.force)
    except OutputError as exc:
        print(f"mor-ds import-hf: {exc}", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, args.overrides) if args.config else None
        model, cfg = import_hf(args.path, base)
    except InteropError as exc:
        print(f"mor-ds {exc}", file=sys.stderr)
        return 2
    write_export(model, cfg, args.out, source=str(args.path))
    m = cfg.model
    print(f"imported {args.path}: vanilla d={m.hidden_size} L={m.num_layers} heads={m.num_heads}/{m.num_kv_heads} "
          f"vocab={m.vocab_size}, {model.num_params() / 1e6:.2f}M params → {args.out}"
          + ("" if cfg.data.tokenizer else " (no tokenizer file found: set data.tokenizer before training/eval)"))
    return 0
