"""`mor-ds eval`: validation loss and perplexity of a checkpoint or an export, in one process.

The result also goes to RUN_DIR/eval.json (few-shot: RUN_DIR/fewshot.json) when the checkpoint belongs to a run
directory and no --json is given, so `mor-ds report` finds it next to the run's metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from mor_ds.evaluation.harness import add_fewshot_args

EVAL_FILE = "eval.json"
FEWSHOT_FILE = "fewshot.json"
DEFAULT_BATCHES = 100


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="validation loss / perplexity of a checkpoint",
                              description="Loss and perplexity on held-out windows: by default the run's own "
                                          "validation shards (data.val_shards of its prepared data).")
    p.add_argument("--checkpoint", required=True, help="an export (.safetensors), a run dir or a checkpoint dir")
    p.add_argument("--data", help="prepared shard directory to evaluate on (default: the run's data)")
    p.add_argument("--val-shards", type=int, help="held-out shards at the end of --data (default: the run's)")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                   help=f"batches of train.micro_batch_size windows (default {DEFAULT_BATCHES}; 0 = every window "
                        f"of the validation split)")
    p.add_argument("--json", dest="json_out",
                   help=f"write the result to this JSON file (default: RUN_DIR/{EVAL_FILE}, with --tasks "
                        f"RUN_DIR/{FEWSHOT_FILE}, when the checkpoint is in a run directory)")
    add_fewshot_args(p, json_flag=False)  # --tasks …: few-shot accuracy through lm-eval; --routing applies to both
    p.set_defaults(func=run)


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The `mor-ds train` run directory a checkpoint path belongs to (the run dir itself, its checkpoints/ or a
    step_* directory in it, or an export file inside it), or None."""
    path = Path(checkpoint).resolve()
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    if path.is_file() and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def checkpoint_position(checkpoint: str | Path) -> dict[str, Any]:
    """Optimizer step and training tokens of the weights `load_model` reads from this path."""
    from mor_ds.weights import read_export_metadata
    from mor_ds.train.checkpoint_dir import checkpoint_meta, resolve_checkpoint

    path = Path(checkpoint)
    if path.is_file():
        meta = read_export_metadata(path)
        return {"step": int(meta["step"]) if meta.get("step") else None,
                "tokens": int(meta["tokens"]) if meta.get("tokens") else None}
    meta = checkpoint_meta(resolve_checkpoint(path))
    return {"step": meta["step"], "tokens": meta.get("tokens")}


def held_out_fingerprint(loader) -> str:
    """SHA-256 naming the held-out windows: the validation shards' checksums, the tokenizer and the window length.
    Two evaluations with the same fingerprint and window count scored the same tokens."""
    if hasattr(loader, "loaders"):  # a mixture: each source's held-out shards and its weight
        parts = [loader.seq_len, [[held_out_fingerprint(one), float(w)] for one, w in zip(loader.loaders,
                                                                                            loader.weights)]]
    else:
        parts = [loader.index.tokenizer_hash, loader.seq_len, [s.sha256 for s in loader.shards]]
        if loader.split_note:  # held out by windows of a shard, not whole shards: which windows
            parts.append([loader.first_windows.tolist(), loader.shard_windows.tolist()])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class Progress:
    """A progress line on stderr every `interval` seconds while batches are evaluated (batch jobs see it too)."""

    def __init__(self, label: str, tokens_per_batch: int, interval: float = 10.0) -> None:
        self.label, self.tokens_per_batch, self.interval = label, tokens_per_batch, interval
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (total - done)
        print(f"{self.label}: {done}/{total} batches ({done * self.tokens_per_batch:,} tokens), {elapsed:.0f} s"
              + (f", ~{left:.0f} s left" if done < total else ""), file=sys.stderr, flush=True)


def evaluate_checkpoint(checkpoint: str, data: str | None = None, val_shards: int | None = None,
                        batches: int = 0, routing: str = "causal",
                        progress_interval: float | None = None) -> dict[str, Any]:
    """Validation loss of a checkpoint: {"checkpoint", "step", "tokens", "data", "val_shards", "seq_len", "held_out",
    "routing", "val/loss", "val/ppl", "val/batches", "val/tokens", "val/batches_available"} (MoR: also
    "val/depth_frac/r"); routing "both" (expert-choice MoR) adds "val/loss_topk" and "val/ppl_topk".
    `batches` 0 = the whole validation split. `progress_interval`: seconds between progress lines on stderr."""
    import dataclasses

    import torch

    from mor_ds import distributed
    from mor_ds.weights import load_model
    from mor_ds.config import ConfigError
    from mor_ds.train.callbacks.evaluate import evaluate
    from mor_ds.train.data import resolve_data, shard_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(checkpoint, device)
    data_cfg = cfg.data
    if data is not None:  # instead of what the run read (one shard set or a mixture)
        data_cfg = dataclasses.replace(data_cfg, prepared_dir=data, mode="prepared", sources=[])
    if val_shards is not None:
        data_cfg = dataclasses.replace(data_cfg, val_shards=val_shards)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)
    shard_dir, tokenizer = resolve_data(cfg, env)
    if not shard_dir and not cfg.data.sources:
        raise ConfigError("data.prepared_dir: the run streamed its data and has no prepared validation shards; "
                          "pass --data")
    routed = cfg.model.family == "mor" and cfg.router.type == "expert_choice"
    routings = ("causal", "topk") if routing == "both" else (routing,)
    if not routed:
        routings = ("causal",)  # routing only changes expert-choice MoR
    eos_id = tokenizer.eos_id if cfg.model.document_mask else None
    loader = shard_loader(cfg, env, shard_dir, tokenizer, "val")
    count = min(batches, loader.num_batches) if batches else loader.num_batches
    result: dict[str, Any] = {"routing": "+".join(routings)}
    for r in routings:
        progress = (Progress(f"eval ({r} routing)" if routed else "eval", loader.tokens_per_batch, progress_interval)
                    if progress_interval is not None else None)
        out = evaluate(model, shard_loader(cfg, env, shard_dir, tokenizer, "val"), count, device, eos_id,
                       routing=r, progress=progress)
        suffix = "" if r == routings[0] else f"_{r}"
        result.update({f"{k}{suffix}": v for k, v in out.items() if k != "val/batches" or not suffix})
    result["val/tokens"] = result["val/batches"] * loader.tokens_per_batch
    result["val/batches_available"] = loader.num_batches
    read = [{"name": x.name, "path": x.path, "weight": x.weight} for x in cfg.data.sources] or shard_dir
    return {"checkpoint": checkpoint, **checkpoint_position(checkpoint), "data": read,
            "val_shards": data_cfg.val_shards, "seq_len": cfg.train.seq_len, "held_out": held_out_fingerprint(loader),
            **result}


def run(args: argparse.Namespace) -> int:
    if args.json_out is None:
        run_dir = run_dir_of(args.checkpoint)
        if run_dir is not None:
            args.json_out = str(run_dir / (FEWSHOT_FILE if args.tasks else EVAL_FILE))
    if args.tasks:
        from mor_ds.evaluation.harness import fewshot_main

        return fewshot_main(args)
    from data_pipeline.errors import DataError
    from mor_ds.train.checkpoint_dir import CheckpointError

    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.val_shards, args.batches, args.routing,
                                     progress_interval=10.0)
    except (CheckpointError, DataError) as exc:
        print(f"mor-ds eval: {exc}", file=sys.stderr)
        return 2
    routings = result["routing"].split("+")
    losses = " | ".join(f"val loss {result['val/loss' + s]:.4f} | ppl {result['val/ppl' + s]:.2f}"
                        + (f" ({r} routing)" if len(routings) > 1 else "")
                        for r, s in zip(routings, ["", *(f"_{r}" for r in routings[1:])]))
    bounded = result["val/batches"] < result["val/batches_available"]
    print(f"{losses} | {result['val/batches']} batches, {result['val/tokens']:,} tokens"
          + (f" (of {result['val/batches_available']}; --batches 0 for all)" if bounded else "")
          + f" | {result['data']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {args.json_out}")
    return 0
