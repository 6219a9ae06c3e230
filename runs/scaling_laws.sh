#!/usr/bin/env bash
# Scaling laws sweep: pretrain a grid of (FLOPs budget x depth) base models, as the original's runs/scaling_laws.sh.
# For each budget the depth with the lowest val bpb marks the compute-optimal model; across budgets these trace the
# optimal tokens:params ratio.
#
#   bash runs/scaling_laws.sh [label]                                 # default label: jan26
#   FLOPS_BUDGETS="1e18 1e19" DEPTHS="10 14 18" bash runs/scaling_laws.sh may2
#
# Results: $NANOCHAT_BASE_DIR/scaling_laws_results_<label>/results.csv, one row per (budget, depth), plus each run's
# <tag>_train.log. Resumable: a (budget, depth) pair that already has a row is skipped, an interrupted run resumes
# from its last checkpoint (SAVE_EVERY=N to save one every N steps; by default only the final one is saved), and a
# failed run is reported while the sweep goes on. Needs the data and the tokenizer (runs/miniseries.sh's setup, or
# speedrun.sh's first stages).
#
# Knobs (environment): FLOPS_BUDGETS ("1e18 2.15e18 4.64e18 1e19"), DEPTHS ("10 12 14 16 18 20"), NPROC_PER_NODE
# (8), WANDB_RUN (scaling_<label>; "dummy" = off), EVAL_TOKENS (100 x 524,288 for a precise final val bpb),
# DEVICE_BATCH_SIZE (default by depth: 8 from d28, 16 from d20, else 32), SAVE_EVERY, EXTRA_ARGS (appended to
# base_train's flags, so they override the defaults).
#
# Fixed against the original: tokens_trained is iterations x the logged "Total batch size" (the original assumed
# 524,288 tokens per step, wrong for the automatic batch sizes); model_dim is the printed n_embd; train_time_sec is the
# wall clock of the base_train command; a missing CORE score is left empty rather than written as 0.
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export PYTHONUNBUFFERED=1  # live progress through tee
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
. runs/setup_env.sh

LABEL="${1:-${LABEL:-jan26}}"
FLOPS_BUDGETS="${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19}"
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
WANDB_RUN="${WANDB_RUN:-scaling_${LABEL}}"
EVAL_TOKENS="${EVAL_TOKENS:-$((100 * 524288))}"
SAVE_EVERY="${SAVE_EVERY:--1}"
EXTRA_ARGS="${EXTRA_ARGS:-}"

RESULTS_DIR="$NANOCHAT_BASE_DIR/scaling_laws_results_${LABEL}"
mkdir -p "$RESULTS_DIR"
RESULTS_FILE="$RESULTS_DIR/results.csv"
if [ ! -f "$RESULTS_FILE" ]; then
    echo "flops_budget,depth,model_dim,params_wte,params_value_embeds,params_lm_head,params_transformer,params_scalars,params_total,num_iterations,tokens_trained,val_bpb,core_score,train_time_sec" > "$RESULTS_FILE"
fi

# one process needs no torchrun (and starts faster without it)
if [ "$NPROC_PER_NODE" = 1 ]; then LAUNCH=(python -m nanochat_nb.base_train)
else LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" -m nanochat_nb.base_train --); fi

log() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $1"; }
last_step() { ls "$1"/model_*.pt 2>/dev/null | sed -E 's/.*model_0*([0-9]+)\.pt$/\1/' | sort -n | tail -1 || true; }

log "=============================================="
log "Scaling laws sweep ${LABEL}: budgets ${FLOPS_BUDGETS}; depths ${DEPTHS}"
log "=============================================="

FAILED=""
for flops in $FLOPS_BUDGETS; do
    for d in $DEPTHS; do
        if grep -q "^${flops},${d}," "$RESULTS_FILE"; then
            log "flops=$flops d=$d: already in $RESULTS_FILE, skipping"
            continue
        fi
        log "Training flops=$flops d=$d..."
        TAG="scaling_${flops}_d${d}"
        LOG_FILE="$RESULTS_DIR/${TAG}_train.log"
        if [ -n "${DEVICE_BATCH_SIZE:-}" ]; then DBS="$DEVICE_BATCH_SIZE"
        elif [ "$d" -ge 28 ]; then DBS=8
        elif [ "$d" -ge 20 ]; then DBS=16
        else DBS=32; fi
        RESUME_ARG=""
        STEP=$(last_step "$NANOCHAT_BASE_DIR/base_checkpoints/$TAG")
        if [ -n "$STEP" ]; then
            log "  resuming from its checkpoint at step $STEP"
            RESUME_ARG="--resume-from-step=$STEP"
        fi
        RUN_NAME=$([ "$WANDB_RUN" = dummy ] && echo dummy || echo "${WANDB_RUN}_scaling_${flops}_d${d}")  # dummy stays off
        START_TIME=$(date +%s)
        # shellcheck disable=SC2086  # RESUME_ARG and EXTRA_ARGS are lists of flags
        if ! "${LAUNCH[@]}" \
                --depth="$d" --target-flops="$flops" --target-param-data-ratio=-1 \
                --run="$RUN_NAME" --model-tag="$TAG" --eval-tokens="$EVAL_TOKENS" \
                --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every="$SAVE_EVERY" \
                --device-batch-size="$DBS" $RESUME_ARG $EXTRA_ARGS 2>&1 | tee -a "$LOG_FILE"; then
            log "  flops=$flops d=$d FAILED (see $LOG_FILE); rerun the script to retry it"
            FAILED="$FAILED ${flops}/d${d}"
            continue
        fi
        TRAIN_TIME=$(( $(date +%s) - START_TIME ))
        ROW=$(python runs/train_log_stats.py "$LOG_FILE" model_dim params_wte params_value_embeds params_lm_head \
              params_transformer_matrices params_scalars params_total num_iterations tokens_trained val_bpb core_score)
        log "  flops=$flops d=$d: $ROW, time=${TRAIN_TIME}s"
        echo "$flops,$d,$ROW,$TRAIN_TIME" >> "$RESULTS_FILE"
    done
done

log "Results saved to: $RESULTS_FILE"
column -t -s',' "$RESULTS_FILE" 2>/dev/null || cat "$RESULTS_FILE"
if [ -n "$FAILED" ]; then
    log "failed runs:$FAILED (rerun to retry)"
    exit 1
fi
