# Sourced by scaling-check.sh and resume-check.sh: one short `mor-ds train` run launched as a torchrun job.
#   check_train PRESET ZERO NPROC RUN_DIR RESUME [--set key=value …]  (log: RUN_DIR.log, exit code: the run's)
# Micro-batch MB per process and global batch MB × GPUS, so every process count does the same work per GPU and sees
# the same data order; STEPS steps of SEQ tokens; prepared shards DATA (VAL_SHARDS held out) and TOKENIZER; W&B off;
# one metrics line per step. TORCHRUN (default torchrun; e.g. "python3 -m torch.distributed.run") and RUN_TIMEOUT.
check_train() {
  local preset=$1 zero=$2 nproc=$3 run=$4 resume=$5; shift 5
  # shellcheck disable=SC2086
  timeout "$RUN_TIMEOUT" ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$nproc" -m mor_ds.cli train \
    --config "$preset" --run-dir "$run" --resume "$resume" --quiet --set train.zero_stage="$zero" \
    --set train.micro_batch_size="$MB" --set train.global_batch_size=$((MB * GPUS)) --set train.seq_len="$SEQ" \
    --set train.max_steps="$STEPS" --set train.log_interval=1 --set data.val_shards="$VAL_SHARDS" \
    --set wandb.enabled=false --set data.source=prepared --set data.mode=prepared --set data.prepared_dir="$DATA" \
    --set data.tokenizer="$TOKENIZER" "$@" >"$run.log" 2>&1
}
