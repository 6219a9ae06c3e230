#!/usr/bin/env bash
# The "miniseries": pretrain one base model per depth at the compute-optimal tokens:params ratio and collect
# depth, size, tokens, val bpb and CORE in one CSV, as the original's runs/miniseries.sh.
#
#   bash runs/miniseries.sh [series_name]          # default series name: today's date, e.g. jan11
#   SKIP_SETUP=1 bash runs/miniseries.sh jan11     # data and tokenizer are already there
#
# Results: $NANOCHAT_BASE_DIR/<series>_miniseries_results/results.csv, one row per depth, plus <tag>_train.log.
# Resumable: a depth that already has a row is skipped; an interrupted depth resumes from its last checkpoint
# (SAVE_EVERY=N saves one every N steps; the default -1, as the original, saves only at the end, so an interrupted
# run starts over). A failed depth is reported and the sweep goes on; rerun the script to retry it.
#
# Knobs (environment): DEPTHS ("12 14 16 18 20 22 24 26"), NPROC_PER_NODE (8), WANDB_RUN (<series>_miniseries;
# "dummy" = off), DEVICE_BATCH_SIZE (default by depth: 8 from d28, 16 from d20, else 32), SAVE_EVERY (-1),
# EXTRA_ARGS (appended to base_train's flags, so they override the defaults), NUM_SHARDS (1000).
#
# Fixed against the original: the parameter counts come from the "Parameter counts:" block base_train prints (the
# original grepped a "Number of parameters:" line that is never printed, so both columns came out empty);
# tokens_trained is iterations x the logged "Total batch size" (the original assumed 524,288); model_dim is the
# printed n_embd; train_time_sec is the wall clock of the base_train command; a missing CORE score is left empty.
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export PYTHONUNBUFFERED=1  # live progress through tee
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
. runs/setup_env.sh

if [ -z "${SKIP_SETUP:-}" ]; then
    # pretraining data (the deepest models need many shards; the loader stops with a clear error if they run out)
    python -m nanochat_nb.dataset -n "${NUM_SHARDS:-1000}"
    # one tokenizer for the whole series: never retrain it under a half-finished series
    if [ ! -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; then
        python -m nanochat_nb.tok_train --max-chars=2000000000 --vocab-size=32768
    fi
fi

SERIES_NAME="${1:-${SERIES_NAME:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}}"
DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-${SERIES_NAME}_miniseries}"
SAVE_EVERY="${SAVE_EVERY:--1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES_NAME}_miniseries_results"
mkdir -p "$RESULTS_DIR"
RESULTS_FILE="$RESULTS_DIR/results.csv"
if [ ! -f "$RESULTS_FILE" ]; then
    echo "depth,model_dim,num_params,num_scaling_params,num_iterations,tokens_trained,param_data_ratio,val_bpb,core_score,train_time_sec" > "$RESULTS_FILE"
fi

# one process needs no torchrun (and starts faster without it)
if [ "$NPROC_PER_NODE" = 1 ]; then LAUNCH=(python -m nanochat_nb.base_train)
else LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m nanochat_nb.base_train --); fi

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $1"; }
# the largest step with a model_<step>.pt in a checkpoint folder, or nothing
last_step() { ls "$1"/model_*.pt 2>/dev/null | sed -E 's/.*model_0*([0-9]+)\.pt$/\1/' | sort -n | tail -1 || true; }

log "=============================================="
log "${SERIES_NAME} Miniseries Training"
log "=============================================="

FAILED=""
for d in $DEPTHS; do
    if grep -q "^${d}," "$RESULTS_FILE"; then
        log "d=$d: already in $RESULTS_FILE, skipping"
        continue
    fi
    log "Training d=$d..."
    TAG="${SERIES_NAME}_miniseries_d${d}"
    LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
    if [ -n "${DEVICE_BATCH_SIZE:-}" ]; then DBS="$DEVICE_BATCH_SIZE"
    elif [ "$d" -ge 28 ]; then DBS=8
    elif [ "$d" -ge 20 ]; then DBS=16
    else DBS=32; fi
    RESUME_ARG=""
    STEP=$(last_step "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG")
    if [ -n "$STEP" ]; then
        log "  resuming d=$d from its checkpoint at step $STEP"
        RESUME_ARG="--resume-from-step=$STEP"
    fi
    RUN_NAME=$([ "$WANDB_RUN" = dummy ] && echo dummy || echo "${WANDB_RUN}_d${d}")  # dummy stays off
    START_TIME=$(date +%s)
    # shellcheck disable=SC2086  # RESUME_ARG and EXTRA_ARGS are lists of flags
    if ! "${LAUNCH[@]}" \
            --depth="$d" --run="$RUN_NAME" --model-tag="$TAG" \
            --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every="$SAVE_EVERY" \
            --device-batch-size="$DBS" $RESUME_ARG $EXTRA_ARGS 2>&1 | tee -a "$LOG_FILE"; then
        log "  d=$d FAILED (see $LOG_FILE); rerun the script to retry it"
        FAILED="$FAILED $d"
        continue
    fi
    TRAIN_TIME=$(( $(date +%s) - START_TIME ))
    ROW=$(python runs/train_log_stats.py "$LOG_FILE" model_dim num_params num_scaling_params num_iterations \
          tokens_trained param_data_ratio val_bpb core_score)
    IFS=, read -r MODEL_DIM NUM_PARAMS NUM_SCALING_PARAMS NUM_ITERS TOKENS_TRAINED PARAM_DATA_RATIO VAL_BPB CORE_SCORE <<< "$ROW"
    log "  d=$d: params=$NUM_PARAMS, scaling=$NUM_SCALING_PARAMS, tokens=$TOKENS_TRAINED, ratio=$PARAM_DATA_RATIO, bpb=$VAL_BPB, CORE=$CORE_SCORE, time=${TRAIN_TIME}s"
    echo "$d,$ROW,$TRAIN_TIME" >> "$RESULTS_FILE"
done

log "=============================================="
log "${SERIES_NAME} Miniseries Complete!"
log "=============================================="
log "Results saved to: $RESULTS_FILE"
echo ""
echo "Results:"
column -t -s',' "$RESULTS_FILE" 2>/dev/null || cat "$RESULTS_FILE"
if [ -n "$FAILED" ]; then
    log "failed depths:$FAILED (rerun to retry)"
    exit 1
fi
