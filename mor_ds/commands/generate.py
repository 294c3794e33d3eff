"""`mor-ds generate`: sample continuations from a trained model with the KV-cached depth-wise batching engine.

    mor-ds generate --checkpoint runs/mor3/model.safetensors --prompt "The tide" --max-new-tokens 64
    mor-ds generate --checkpoint runs/mor3 --prompt-ids 12,7,99 --temperature 0.8 --top-p 0.9

--checkpoint: an export (`mor-ds export`), a run/checkpoint directory of `mor-ds train`, or a directory
holding `config.yaml` + `model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mor_ds.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text from a checkpoint (KV cache, depth-wise batching)")
    p.add_argument("--checkpoint", required=True,
                   help="export file, run/checkpoint dir, or dir with config.yaml + model.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt as comma-separated token ids (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the checkpoint config's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the tokenizer's end-of-sequence id")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-batch", type=int, default=64, help="sequences in flight (engine slots)")
    p.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def load_for_inference(path: str, device: torch.device):
    """(model, Config) from any checkpoint form `mor-ds generate` accepts."""
    from mor_ds.weights import load_model
    from mor_ds.config import load_config
    from mor_ds.models import build_model

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"checkpoint {path}: not found")
    if root.is_dir() and (root / "config.yaml").is_file() and (root / "model.safetensors").is_file():
        from safetensors.torch import load_model as load_safetensors

        cfg = load_config(str(root / "config.yaml"))
        model = build_model(cfg.model, cfg.router)
        load_safetensors(model, str(root / "model.safetensors"), strict=True)
        return model.to(device).eval(), cfg
    return load_model(root, device)


def run(args: argparse.Namespace) -> int:
    from mor_ds.inference import Engine, Request, SamplingParams

    def fail(msg: str) -> int:
        print(f"mor-ds generate: {msg}", file=sys.stderr)
        return 2

    if not args.prompt and not args.prompt_ids:
        return fail("give at least one --prompt or --prompt-ids")
    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    try:
        sampling = SamplingParams(args.temperature, args.top_p)
    except ValueError as exc:
        return fail(str(exc))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        model, cfg = load_for_inference(args.checkpoint, device)
    except (OSError, ValueError, ConfigError, RuntimeError) as exc:
        return fail(f"cannot load {args.checkpoint}: {exc}")
    model = model.to(dtype)

    tokenizer = None
    prompts: list[list[int]] = []
    for text in args.prompt_ids:
        try:
            ids = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            return fail(f"--prompt-ids {text!r}: expected comma-separated integers")
        if not ids or min(ids) < 0 or max(ids) >= cfg.model.vocab_size:
            return fail(f"--prompt-ids {text!r}: ids must be in 0..{cfg.model.vocab_size - 1}")
        prompts.append(ids)
    if args.prompt or not args.no_stop:
        try:
            from mor_ds.interop.tokenizer import checkpoint_tokenizer

            tokenizer = checkpoint_tokenizer(cfg, args.tokenizer)
        except Exception as exc:
            if args.prompt:
                return fail(f"tokenizer: {exc}")
    if args.prompt:
        prompts += tokenizer.encode_batch(args.prompt)
    if any(not p for p in prompts):
        return fail("a prompt encodes to no tokens")
    stop = None if args.no_stop or tokenizer is None else tokenizer.eos_id

    longest = max(len(p) for p in prompts)
    context = cfg.train.seq_len
    if longest + args.max_new_tokens > context:
        print(f"mor-ds generate: warning: the longest prompt ({longest} tokens) + --max-new-tokens "
              f"{args.max_new_tokens} = {longest + args.max_new_tokens} tokens exceeds the model's context of "
              f"{context} (train.seq_len): positions past {context} were never trained", file=sys.stderr)
    engine = Engine(model, max_slots=min(args.max_batch, len(prompts)), max_len=longest + args.max_new_tokens,
                    cuda_graph=args.cuda_graph, seed=args.seed)
    requests = [Request(p, args.max_new_tokens, sampling, stop) for p in prompts]
    start = time.perf_counter()
    engine.run(requests)
    elapsed = time.perf_counter() - start
    for number, req in enumerate(requests, 1):
        text = tokenizer.decode(req.output) if tokenizer is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": req.prompt, "output_ids": req.output, "text": text,
                              "finish_reason": req.finish_reason}))
            continue
        prompt = tokenizer.decode(req.prompt) if tokenizer is not None else " ".join(map(str, req.prompt))
        print(f"=== {number}/{len(requests)} prompt ({len(req.prompt)} tokens) ===\n{prompt}\n"
              f"=== {number}/{len(requests)} output ({len(req.output)} tokens, {req.finish_reason}) ===\n"
              + (text if text is not None else " ".join(map(str, req.output))) + "\n", flush=True)
    depth = engine.stats.depth_fractions()
    print(f"# {engine.stats.tokens} tokens in {elapsed:.2f} s ({engine.stats.tokens / elapsed:.1f} tokens/s)"
          + (f", recursion depth distribution {depth}" if depth else ""), file=sys.stderr)
    return 0
