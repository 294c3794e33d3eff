#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md on one GPU machine, through the path a user takes:
# wheels → `mor-data collect` (the machine's installed Python packages' sources and docs) → `mor-data train-tokenizer`
# → `mor-data prepare` → `mor-ds sweep --dry-run` / `--write-only` → `mor-ds train` per arm → `mor-ds eval` →
# `mor-ds report`. Every stage skips what is already on disk, so each call picks up where the last one stopped.
#
#   bash slurm/repro-study.sh setup                 # install the wheels in .whl/ (if any), corpus, tokenizer, shards,
#                                                   # the sweep's arm configs
#   bash slurm/repro-study.sh train ARM [ARM ...]   # setup if needed, then per arm: train (resuming from the arm's
#                                                   # checkpoint), eval, and the report of every arm so far
#   bash slurm/repro-study.sh report                # only the report
#   bash slurm/repro-study.sh --tiny train ARM ...  # repro-tiny.yaml: tiny presets on CPU, a few MB of text
#   PARALLEL=1 bash slurm/repro-study.sh train A B  # a multi-GPU host: the arms side by side, one GPU each
#
# Training stops with a checkpoint (SIGTERM, exit 75) DEADLINE_S seconds after this script started (default 480),
# so a call stays within its time limit; the same command later resumes the arm. Small outputs (logs, the arms'
# metrics.jsonl / config.yaml / plan.json / eval.json, the report and its plots) are copied to OUT (default
# STUDY/out). Environment: OUT, DEADLINE_S, PYTHON (default python3), SWEEP (default by mode), WORKERS, PARALLEL, WORKDIR
# (where the sweep's relative paths, runs/study*/, live: default the repository root).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "${WORKDIR:-$REPO}" || exit 1
START=$SECONDS
tiny=0
if [ "${1:-}" = "--tiny" ]; then tiny=1; shift; fi
stage=${1:?usage: repro-study.sh [--tiny] setup | train ARM [ARM ...] | report}; shift
PY=${PYTHON:-python3}
if [ $tiny = 1 ]; then
  STUDY=runs/study-tiny; SWEEP=${SWEEP:-$REPO/slurm/sweeps/repro-tiny.yaml}; VOCAB=4096; SAMPLE_MB=4; MAX_MB=6
  SHARD_TOKENS=65536; export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  STUDY=runs/study; SWEEP=${SWEEP:-$REPO/slurm/sweeps/repro-135m.yaml}; VOCAB=49152; SAMPLE_MB=100; MAX_MB=0
  SHARD_TOKENS=2097152
fi
# the shards, tokenizer and corpus the sweep file's data.* keys point at
DATA=$STUDY/data
OUT=${OUT:-$STUDY/out}; DEADLINE_S=${DEADLINE_S:-480}
WORKERS=${WORKERS:-$(( $(nproc) > 16 ? 15 : ($(nproc) > 1 ? $(nproc) - 1 : 1) ))}
EXT=.py,.pyi,.md,.rst,.txt,.h,.hpp,.cuh,.c,.cc,.cpp,.cu
mkdir -p "$OUT" "$DATA"
log() { echo "[repro-study +$((SECONDS - START))s] $*" | tee -a "$OUT/study.log"; }
fail() { log "FAILED: $*"; exit 1; }

site_roots() {  # the interpreter's own site-packages, before .whl's target or this repo join the path
  PYTHONPATH= "$PY" -c "import os, site; print('\n'.join(p for p in site.getsitepackages() if os.path.isdir(p)))"
}

install_wheels() {  # .whl's wheels, where this Python lacks part of the stack (the GPU image: see tools/)
  export PYTHONPATH=$REPO
  if ! "$PY" -c "import deepspeed, datasets, sentencepiece, zstandard" 2>/dev/null && [ -d "$REPO/.whl" ]; then
    local stamp; stamp=/tmp/site/.mor-ds-wheels-$(ls "$REPO/.whl" | sha256sum | cut -c1-16)
    if [ ! -f "$stamp" ]; then
      log "installing $(ls "$REPO"/.whl/*.whl | wc -l) wheels from .whl into /tmp/site"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl >>"$OUT/setup.log" 2>&1 || fail "pip install of .whl (see $OUT/setup.log)"
      touch "$stamp"
    fi
    export PYTHONPATH=/tmp/site:$REPO
  fi
  "$PY" - >"$OUT/env.txt" 2>&1 <<'PY' || fail "the stack does not import (see $OUT/env.txt)"
import platform, torch
from importlib.metadata import version
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("deepspeed", "datasets", "sentencepiece", "zstandard", "tokenizers", "pyarrow", "pandas", "fsspec",
             "matplotlib", "triton"):
    try:
        __import__(name)
        print(name, version(name))
    except Exception as exc:  # every missing piece is listed before the study fails on it
        print(name, "MISSING:", type(exc).__name__, exc)
        raise SystemExit(1) if name in ("deepspeed", "datasets", "sentencepiece", "zstandard") else None
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/env.txt"
  log "environment: $(head -1 "$OUT/env.txt")"
}

setup() {
  install_wheels
  if [ ! -f "$DATA/corpus.jsonl.zst" ]; then
    mapfile -t roots < <(site_roots)
    log "collecting $EXT files under ${roots[*]}"
    "$PY" -m data_pipeline.cli collect "${roots[@]}" --out "$DATA/corpus.jsonl.zst" --ext "$EXT" --max-mb "$MAX_MB" \
      --stats "$DATA/corpus-stats.json" >>"$OUT/setup.log" 2>&1 || fail "mor-data collect (see $OUT/setup.log)"
  fi
  if [ -f "$DATA/corpus-stats.json" ]; then cp "$DATA/corpus-stats.json" "$OUT/"; fi
  if [ ! -f "$DATA/tokenizer.model" ]; then
    log "training a $VOCAB-piece SentencePiece BPE tokenizer on the first $SAMPLE_MB MB"
    # a fixed thread count: SentencePiece's merges depend on it, and every call must rebuild the same tokenizer
    "$PY" -m data_pipeline.cli train-tokenizer --source "$DATA/corpus.jsonl.zst" --vocab-size "$VOCAB" \
      --sample-mb "$SAMPLE_MB" --threads 8 --out "$DATA/tokenizer" >>"$OUT/setup.log" 2>&1 \
      || fail "mor-data train-tokenizer (see $OUT/setup.log)"
  fi
  if [ ! -f "$DATA/shards/index.json" ]; then
    log "tokenizing into $SHARD_TOKENS-token shards with $WORKERS workers"
    "$PY" -m data_pipeline.cli prepare --source "$DATA/corpus.jsonl.zst" --tokenizer "$DATA/tokenizer.model" \
      --out "$DATA/shards" --workers "$WORKERS" --shard-tokens "$SHARD_TOKENS" --max-chars 1000000 --no-progress \
      >>"$OUT/setup.log" 2>&1 || fail "mor-data prepare (see $OUT/setup.log)"
  fi
  "$PY" - "$DATA" >"$OUT/data.txt" <<'PY'
import hashlib, json, sys
from pathlib import Path
data = Path(sys.argv[1])
index = json.loads((data / "shards" / "index.json").read_text())
fingerprint = hashlib.sha256("".join(s["sha256"] for s in index["shards"]).encode()).hexdigest()
print(f"corpus {data / 'corpus.jsonl.zst'}: {(data / 'corpus.jsonl.zst').stat().st_size / 1e6:.1f} MB compressed")
print(f"tokenizer sha256 {index['tokenizer']['hash']} (vocab {index['vocab_size']})")
print(f"shards: {len(index['shards'])} x {index['shard_tokens']:,} tokens, {index['totals']['tokens']:,} tokens, "
      f"{index['totals']['docs']:,} documents; shard checksums sha256 {fingerprint}")
PY
  log "data: $(tail -1 "$OUT/data.txt")"
  "$PY" -m mor_ds.cli sweep "$SWEEP" --dry-run >"$OUT/sweep-dry-run.txt" 2>&1 || fail "mor-ds sweep --dry-run ($OUT/sweep-dry-run.txt)"
  "$PY" -m mor_ds.cli sweep "$SWEEP" --write-only >>"$OUT/setup.log" 2>&1 || fail "mor-ds sweep --write-only"
  sed -n '1,/^(est/p' "$OUT/sweep-dry-run.txt" | tee -a "$OUT/study.log"
}

sweep_dir() { "$PY" -c "import sys; from mor_ds.sweep import load_sweep; print(load_sweep(sys.argv[1]).output_dir)" "$SWEEP"; }

evaluated() {  # true when the arm's eval.json is of its last planned step
  "$PY" - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
done = (run / "eval.json").is_file() and (run / "plan.json").is_file() and \
    json.loads((run / "eval.json").read_text()).get("step") == json.loads((run / "plan.json").read_text())["steps"]
sys.exit(0 if done else 1)
PY
}

copy_arm() {  # the arm's small files, in a layout `mor-ds report --sweep OUT/runs` reads
  mkdir -p "$OUT/runs/$1"
  cp "$SWEEP_DIR/sweep.json" "$OUT/runs/"
  for f in config.yaml plan.json metrics.jsonl eval.json fewshot.json; do
    if [ -f "$SWEEP_DIR/$1/$f" ]; then cp "$SWEEP_DIR/$1/$f" "$OUT/runs/$1/"; fi
  done
}

report() {  # of every arm so far; their small files go to OUT too, so each call's OUT is the whole study
  local arm
  for arm in "$SWEEP_DIR"/*/; do
    if [ -f "$arm/config.yaml" ]; then copy_arm "$(basename "$arm")"; fi
  done
  "$PY" -m mor_ds.cli report --sweep "$SWEEP_DIR" --out "$OUT/report" >"$OUT/report.log" 2>&1 \
    || fail "mor-ds report (see $OUT/report.log)"
  log "report: $(tail -1 "$OUT/report.log")"
}

train_arm() {
  local arm=$1 dir=$SWEEP_DIR/$1 left rc
  [ -f "$dir/config.yaml" ] || fail "no arm $arm in $SWEEP (arms: $(ls "$SWEEP_DIR" | tr '\n' ' '))"
  if ! evaluated "$dir"; then
    left=$((DEADLINE_S - (SECONDS - START)))
    if [ "$left" -lt 90 ]; then log "$arm: ${left}s left before the deadline, not started"; return 0; fi
    log "$arm: training (resume auto) for at most ${left}s"
    timeout --preserve-status -s TERM -k 120 "$left" "$PY" -m mor_ds.cli train --config "$dir/config.yaml" --run-dir "$dir" \
      >>"$OUT/$arm.train.log" 2>&1
    rc=$?
    copy_arm "$arm"
    case $rc in
      0) log "$arm: trained: $(grep -v '^\[mor-ds\]' "$OUT/$arm.train.log" | grep '^step' | tail -1)" ;;
      75) log "$arm: stopped at the deadline with a checkpoint (step $(tail -1 "$dir/metrics.jsonl" | grep -o '"step": [0-9]*' | grep -o '[0-9]*$')); run the same command again to resume"; return 0 ;;
      *) fail "$arm: mor-ds train exited $rc (see $OUT/$arm.train.log)" ;;
    esac
    log "$arm: evaluating on every held-out window"
    "$PY" -m mor_ds.cli eval --checkpoint "$dir" --batches 0 >>"$OUT/$arm.eval.log" 2>&1 || fail "$arm: mor-ds eval (see $OUT/$arm.eval.log)"
    log "$arm: $(grep '^val loss' "$OUT/$arm.eval.log" | tail -1)"
  else
    log "$arm: already trained and evaluated"
  fi
  copy_arm "$arm"
}

train_parallel() {  # one arm per visible GPU at a time, each arm's processes on its own GPU (--tiny on CPU: 2)
  local gpus slots arms=("$@") start i status=0 pids
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  slots=$gpus
  if [ "$gpus" = 0 ]; then [ $tiny = 1 ] && slots=2 || fail "PARALLEL=1: no GPU visible"; fi
  for ((start = 0; start < ${#arms[@]}; start += slots)); do
    pids=()
    for ((i = 0; i < slots && start + i < ${#arms[@]}; i++)); do
      (if [ "$gpus" -gt 0 ]; then export CUDA_VISIBLE_DEVICES=$i; log "${arms[start + i]}: on GPU $i"; fi
       train_arm "${arms[start + i]}") &
      pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || status=1; done
  done
  report
  [ $status = 0 ] || fail "an arm failed (see $OUT/study.log)"
}

case $stage in
  setup) setup ;;
  train)
    [ $# -ge 1 ] || fail "train: name the arms (see $SWEEP)"
    setup
    SWEEP_DIR=$(sweep_dir)
    if [ "${PARALLEL:-0}" = 1 ]; then train_parallel "$@"
    else for arm in "$@"; do train_arm "$arm"; report; done; fi ;;
  report) install_wheels; SWEEP_DIR=$(sweep_dir); report ;;
  *) fail "unknown stage $stage (setup | train ARM ... | report)" ;;
esac
log "done in $((SECONDS - START))s"
