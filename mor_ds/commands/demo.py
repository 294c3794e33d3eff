"""`mor-ds demo` (what `make demo` runs): the whole product in a couple of minutes on a CPU.

prepare the embedded corpus (SentencePiece + shards) → train tiny-mor with DeepSpeed (one process, ZeRO-2)
→ checkpoint → export → eval → summary and RUN_DIR/loss_curve.png. Re-running resumes the same run dir.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_PRESET = "tiny-mor"
DEMO_STEPS = 150  # ~1.5 min of training on 2 idle CPU cores (tiny-mor: ~7k tokens/s, 4096 tokens/step)
EXPORT_FILE = "model.safetensors"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="prepare data, train a tiny MoR on CPU, checkpoint, eval, plot",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--config", default=DEMO_PRESET, help=f"preset or YAML (default {DEMO_PRESET})")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help=f"optimizer steps (default {DEMO_STEPS})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mor_ds import distributed
    from mor_ds.weights import export_checkpoint
    from mor_ds.commands.eval import evaluate_checkpoint
    from mor_ds.config import load_config
    from mor_ds.train.callbacks.metrics import METRICS_FILE, read_metrics
    from mor_ds.train.faults import EXIT_OK
    from mor_ds.train.plot import PLOT_FILE
    from mor_ds.train.run import train

    overrides = [f"train.max_steps={args.steps}", *args.overrides]
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir)
    env = distributed.discover({})  # one process, whatever launched us
    started = time.perf_counter()
    print(f"== 1/4 data + training: {cfg.name} on the embedded corpus (DeepSpeed ZeRO-{cfg.train.zero_stage}, "
          f"{distributed.device_for(env).type}) → {run_dir}", flush=True)
    device = distributed.init_distributed(env)
    try:
        code = train(cfg, run_dir, env, device, resume="auto")
    finally:
        distributed.shutdown()
    if code != EXIT_OK:
        return code
    trained = time.perf_counter() - started

    print("== 2/4 export: ZeRO checkpoint → safetensors", flush=True)
    export_checkpoint(run_dir, run_dir / EXPORT_FILE)
    print("== 3/4 eval: the exported model on the held-out shard", flush=True)
    result = evaluate_checkpoint(str(run_dir / EXPORT_FILE))
    print("== 4/4 summary", flush=True)
    records = read_metrics(run_dir / METRICS_FILE)  # the trainer drew RUN_DIR/loss_curve.png
    first, last = records[0], records[-1]
    print(f"  steps {last['step']} | tokens {last['tokens']:,} | train loss {first['loss']:.3f} → {last['loss']:.3f}\n"
          f"  val loss {result['val/loss']:.3f} (ppl {result['val/ppl']:.1f}) on {result['val/tokens']:,} held-out "
          f"tokens | wall {trained:.0f} s for data + training\n"
          f"  {run_dir}/: config.yaml, {METRICS_FILE}, checkpoints/, {EXPORT_FILE}, {PLOT_FILE}, wandb/ "
          f"(offline: `wandb sync {run_dir}/wandb/offline-run-*`)", flush=True)
    return 0
