#!/usr/bin/env bash
# Checkpoint round trip on G GPUs: train STEPS steps saving at STEPS/2 and at the end (run A), resume a second run
# (B) from A's half-way checkpoint on the same G, export A's last checkpoint with `mor-ds export`, and evaluate the
# export with `mor-ds eval` on the windows A's own final evaluation used. One JSON line in $OUT/resume.jsonl:
# per-step losses of A and B after the resume point, their largest difference, A's sharded val loss and the export's.
#   OUT=/tmp/out GPUS=2 STEPS=20 DATA=shards/ TOKENIZER=tok.model bash slurm/resume-check.sh mor-360m-nr3 3 [--set …]
set -uo pipefail
preset=$1; zero=$2; shift 2
GPUS=${GPUS:-2}; STEPS=${STEPS:-20}; MB=${MB:-16}; OUT=${OUT:-runs/resume}; SEQ=${SEQ:-2048}
EVAL_BATCHES=${EVAL_BATCHES:-2}; VAL_SHARDS=${VAL_SHARDS:-4}; RUN_TIMEOUT=${RUN_TIMEOUT:-600}
half=$((STEPS / 2)); root="$OUT/resume-$preset-z$zero-g$GPUS"
rm -rf "$root"; mkdir -p "$root"
# shellcheck source=slurm/check-train.sh
source "$(dirname "$0")/check-train.sh"
train() {  # train RUN_DIR RESUME [--set …]
  check_train "$preset" "$zero" "$GPUS" "$1" "$2" --set train.eval_interval="$STEPS" \
    --set train.eval_batches="$EVAL_BATCHES" --set checkpoint.interval="$half" --set checkpoint.keep_last=2 "${@:3}"
}
train "$root/A" none "$@"; rc_a=$?
train "$root/B" "$root/A/checkpoints/$(printf 'step_%08d' "$half")" "$@"; rc_b=$?
timeout "$RUN_TIMEOUT" python3 -m mor_ds.cli export --checkpoint "$root/A" --out "$root/A.safetensors" >"$root/export.log" 2>&1
rc_export=$?
timeout "$RUN_TIMEOUT" python3 -m mor_ds.cli eval --checkpoint "$root/A.safetensors" --data "$DATA" --val-shards "$VAL_SHARDS" \
  --batches $((EVAL_BATCHES * GPUS)) --json "$root/eval.json" >"$root/eval.log" 2>&1
rc_eval=$?
python3 - "$root" "$preset" "$zero" "$GPUS" "$half" "$rc_a" "$rc_b" "$rc_export" "$rc_eval" >>"$OUT/resume.jsonl" <<'PY'
import json, sys
from pathlib import Path
from mor_ds.train.callbacks.metrics import read_metrics
root, preset, zero, gpus, half, *rcs = sys.argv[1:]
root, half = Path(root), int(half)
def records(run):
    path = root / run / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []
a, b = records("A"), records("B")
after_a = {r["step"]: r["loss"] for r in a if r["step"] > half}
after_b = {r["step"]: r["loss"] for r in b if r["step"] > half}
common = sorted(after_a.keys() & after_b.keys())
val = lambda recs: next((r["val/loss"] for r in reversed(recs) if "val/loss" in r), None)
eval_path = root / "eval.json"
export_val = json.loads(eval_path.read_text())["val/loss"] if eval_path.exists() else None
print(json.dumps({"preset": preset, "zero": int(zero), "gpus": int(gpus), "resume_from": half,
                  "rc": dict(zip(("A", "B", "export", "eval"), map(int, rcs))),
                  "first_step_of_B": min(after_b, default=None), "steps_compared": len(common),
                  "max_abs_loss_diff": max((abs(after_a[s] - after_b[s]) for s in common), default=None),
                  "losses_A": [round(after_a[s], 5) for s in common], "losses_B": [round(after_b[s], 5) for s in common],
                  "val_loss_A": val(a), "val_loss_B": val(b), "val_loss_export": export_val}))
PY
