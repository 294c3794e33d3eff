#!/usr/bin/env bash
# Single-node data-parallel scaling check: the same `mor-ds train` on 1 and on G GPUs, same micro-batch and
# global batch (so per-GPU work and the loss curve are comparable), one JSON line per run in $OUT/scaling.jsonl.
#   OUT=/tmp/out GPUS=2 STEPS=20 DATA=shards/ TOKENIZER=tok.model bash slurm/scaling-check.sh "vanilla-360m 2" "mor-360m-nr2 3" …
# Each argument: "<preset> <zero stage> [extra --set key=value …]". GPU_COUNTS (default "1 $GPUS") picks the runs, e.g.
# GPU_COUNTS=1 CUDA_VISIBLE_DEVICES=1 for one-GPU references of other arms side by side on a second GPU.
set -uo pipefail
GPUS=${GPUS:-2}; GPU_COUNTS=${GPU_COUNTS:-"1 $GPUS"}; STEPS=${STEPS:-20}; MB=${MB:-16}; OUT=${OUT:-runs/scaling}; SEQ=${SEQ:-2048}; RUN_TIMEOUT=${RUN_TIMEOUT:-600}
VAL_SHARDS=${VAL_SHARDS:-4}; EVAL_WINDOWS=${EVAL_WINDOWS:-64}  # every run evaluates the same EVAL_WINDOWS held-out windows at the end
mkdir -p "$OUT/runs"
# shellcheck source=slurm/check-train.sh
source "$(dirname "$0")/check-train.sh"
for arm in "$@"; do
  read -r preset zero extra <<<"$arm"
  for g in $GPU_COUNTS; do
    dir="$OUT/runs/$preset-z$zero-g$g"
    rm -rf "$dir"
    # shellcheck disable=SC2086
    check_train "$preset" "$zero" "$g" "$dir" none --set train.eval_interval=1000000 \
      --set train.eval_batches=$((EVAL_WINDOWS / (MB * g))) --set checkpoint.interval=1000000 ${extra:-}
    python3 - "$dir" "$preset" "$zero" "$g" "$?" >>"$OUT/scaling.jsonl" <<'PY'
import json, statistics, sys
from pathlib import Path
from mor_ds.train.callbacks.metrics import read_metrics
run, preset, zero, gpus, rc = sys.argv[1:]
recs = read_metrics(Path(run) / "metrics.jsonl") if (Path(run) / "metrics.jsonl").exists() else []
steady = recs[len(recs) // 3:] or recs
med = lambda k: statistics.median(r[k] for r in steady) if steady and k in steady[0] else None
print(json.dumps({"preset": preset, "zero": int(zero), "gpus": int(gpus), "rc": int(rc), "steps": len(recs),
                  "tokens_per_s_per_gpu": med("perf/tokens_per_s") and med("perf/tokens_per_s") / int(gpus),
                  "mfu": med("perf/mfu"), "peak_mem_gib": max((r.get("perf/peak_mem_gib", 0) for r in recs), default=None),
                  "val_loss": next((r["val/loss"] for r in reversed(recs) if "val/loss" in r), None),
                  "losses": [round(r["loss"], 4) for r in recs]}))
PY
  done
done
