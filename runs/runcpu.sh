#!/usr/bin/env bash
# nanochat on a CPU, the whole life of a model, offline: corpus, tokenizer, base model, base evaluation (bpb, samples,
# CORE on the offline bundle), chat task data, SFT, chat evaluation, a short RL run, its evaluation and the report card.
# Ends by printing how to talk to the model (CLI, web server, notebook cell).
#
#   bash runs/runcpu.sh                          # artifacts in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
#   NANOCHAT_BASE_DIR=/tmp/nc bash runs/runcpu.sh
#   WANDB_RUN=cpu bash runs/runcpu.sh            # also log to wandb (offline unless you are logged in)
#
# Idempotent: every stage is skipped when its output exists, and the training stages resume from their last
# checkpoint when interrupted (base every SAVE_EVERY steps, SFT every SFT_SAVE_EVERY, RL every RL_SAVE_EVERY).
# Knobs (environment): DEPTH, NUM_ITERATIONS, SAVE_EVERY, VOCAB_SIZE, CORE_MAX_PER_TASK, SFT_ITERATIONS,
# RL_STEPS, EVAL_MAX_PROBLEMS.
#
# Differences from the original runs/runcpu.sh (d6, seq 512, 5000 steps: ~30 min on an M3 Max, then SFT): every
# dataset is built offline from packages (pip/npm/Debian) instead of downloaded; the tokenizer vocabulary is smaller;
# the model and every stage are sized for a 2-core CPU; RL and the report are included.
set -euo pipefail
cd "$(dirname "$0")/.."
. runs/setup_env.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export NANOCHAT_TASK_DATA="${NANOCHAT_TASK_DATA:-offline}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"
DEPTH="${DEPTH:-4}"
NUM_ITERATIONS="${NUM_ITERATIONS:-400}"
SAVE_EVERY="${SAVE_EVERY:-100}"
VOCAB_SIZE="${VOCAB_SIZE:-8192}"
CORE_MAX_PER_TASK="${CORE_MAX_PER_TASK:-32}"
SFT_ITERATIONS="${SFT_ITERATIONS:-300}"
SFT_SAVE_EVERY="${SFT_SAVE_EVERY:-50}"
RL_STEPS="${RL_STEPS:-12}"
RL_SAVE_EVERY="${RL_SAVE_EVERY:-4}"
EVAL_MAX_PROBLEMS="${EVAL_MAX_PROBLEMS:-64}"
MODEL_TAG="cpu_d${DEPTH}"
echo "=== runcpu: artifacts in $NANOCHAT_BASE_DIR"
SECONDS=0
stage() { echo; echo "=== [$1/11] $2 ($(date +%H:%M:%S), ${SECONDS}s so far)"; }
evaluated() {  # true when $1/chat_eval.json holds the evaluation of the last checkpoint in $1
  python -c "
import json, os, sys
from nanochat_nb.checkpoint_manager import find_last_step
p = os.path.join('$1', 'chat_eval.json')
sys.exit(0 if os.path.exists(p) and json.load(open(p)).get('step') == find_last_step('$1') else 1)" 2>/dev/null
}
last_step() {  # the last checkpoint step in a directory, -1 if none
  python -c "
from nanochat_nb.checkpoint_manager import find_last_step
try: print(find_last_step('$1'))
except (FileNotFoundError, AssertionError): print(-1)"
}

# -----------------------------------------------------------------------------
# 0. The report card: a fresh header once; later runs keep the sections of the stages they skip
if [ ! -f "$NANOCHAT_BASE_DIR/report/header.md" ]; then python -m nanochat_nb.report reset; fi

# -----------------------------------------------------------------------------
stage 1 "pretraining corpus (offline: English prose from pip/npm/Debian packages + Python source, checked against the evaluation sets)"
if ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet >/dev/null 2>&1; then
  echo "found $(ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet | wc -l) shards, skipping"
else
  python -m nanochat_nb.dataset --offline
fi

# -----------------------------------------------------------------------------
stage 2 "tokenizer (vocab $VOCAB_SIZE)"
if [ -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
  echo "found, skipping"
else
  python -m nanochat_nb.tok_train --vocab-size="$VOCAB_SIZE"
  python -m nanochat_nb.tok_eval
fi

# -----------------------------------------------------------------------------
# d4 (width 256, 4 heads of 64), full-context attention (sliding windows only pay off with FA3), 256-token context,
# 16 rows x 256 = 4096 tokens per step; val bpb every 100 steps, samples every 200.
stage 3 "base model: d$DEPTH for $NUM_ITERATIONS steps"
CKPT_DIR="$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG"
LAST=$(last_step "$CKPT_DIR")
if [ "$LAST" -ge "$NUM_ITERATIONS" ]; then
  echo "$CKPT_DIR already has step $LAST, skipping"
else
  RESUME=()
  if [ "$LAST" -gt 0 ]; then echo "resuming from step $LAST"; RESUME=(--resume-from-step="$LAST"); fi
  python -m nanochat_nb.base_train \
    --depth="$DEPTH" --head-dim=64 --window-pattern=L --max-seq-len=256 \
    --device-batch-size=16 --total-batch-size=4096 --num-iterations="$NUM_ITERATIONS" --warmup-steps=20 \
    --eval-every=100 --eval-tokens=131072 --core-metric-every=-1 --sample-every=200 --save-every="$SAVE_EVERY" \
    --model-tag="$MODEL_TAG" --run="$WANDB_RUN" "${RESUME[@]}"
fi

# -----------------------------------------------------------------------------
# bpb on train and val (the same 131072 validation tokens base_train evaluates), samples, and CORE on the offline
# bundle (rebuilt from pip packages; its scores are labelled offline) with a few examples per task.
stage 4 "base model evaluation: bpb, samples, CORE (offline bundle, $CORE_MAX_PER_TASK per task)"
if [ -f "$NANOCHAT_BASE_DIR/report/base-model-evaluation.md" ]; then
  echo "already evaluated, skipping"
else
  if [ ! -d "$NANOCHAT_BASE_DIR/eval_bundle_offline" ]; then python -m nanochat_nb.base_eval --build-offline-bundle; fi
  python -m nanochat_nb.base_eval --model-tag="$MODEL_TAG" --eval=core,bpb,sample --max-per-task="$CORE_MAX_PER_TASK" \
    --device-batch-size=16 --split-tokens=131072
fi

# -----------------------------------------------------------------------------
stage 5 "chat task data (offline stand-ins in the Hub's schema; see nbs/13_task_data)"
if [ -f "$NANOCHAT_BASE_DIR/task_data/offline/words_alpha.txt" ]; then
  echo "found, skipping"
else
  python -m nanochat_nb.task_data --offline
fi

# -----------------------------------------------------------------------------
# SFT inherits the context (256), batch (16 rows) and total batch (4096 tokens) from the base model.
stage 6 "SFT: $SFT_ITERATIONS steps on the chat mixture"
SFT_DIR="$NANOCHAT_BASE_DIR/chatsft_checkpoints/$MODEL_TAG"
LAST=$(last_step "$SFT_DIR")
if [ "$LAST" -ge "$SFT_ITERATIONS" ]; then
  echo "$SFT_DIR already has step $LAST, skipping"
else
  RESUME=()
  if [ "$LAST" -gt 0 ]; then echo "resuming from step $LAST"; RESUME=(--resume-from-step="$LAST"); fi
  python -m nanochat_nb.chat_sft --model-tag="$MODEL_TAG" --num-iterations="$SFT_ITERATIONS" --eval-every=100 \
    --eval-tokens=65536 --chatcore-every=-1 --save-every="$SFT_SAVE_EVERY" --run="$WANDB_RUN" "${RESUME[@]}"
fi

# -----------------------------------------------------------------------------
CHAT_EVAL=(-a "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee" -x "$EVAL_MAX_PROBLEMS" -m 192 -b 16 -g "$MODEL_TAG")
stage 7 "chat evaluation of the SFT model ($EVAL_MAX_PROBLEMS problems per task)"
if evaluated "$SFT_DIR"; then echo "found $SFT_DIR/chat_eval.json for the last step, skipping"; else python -m nanochat_nb.chat_eval -i sft "${CHAT_EVAL[@]}"; fi

# -----------------------------------------------------------------------------
# A short RL run on the GSM8K-format training set: 4 questions x 4 samples per step, 128 new tokens.
stage 8 "RL: $RL_STEPS steps on GSM8K-style problems"
RL_DIR="$NANOCHAT_BASE_DIR/chatrl_checkpoints/$MODEL_TAG"
LAST=$(last_step "$RL_DIR")
if [ "$LAST" -ge $((RL_STEPS - 1)) ]; then  # RL names a checkpoint by the index of its last step (the original's)
  echo "$RL_DIR already has step $LAST, skipping"
else
  python -m nanochat_nb.chat_rl --model-tag="$MODEL_TAG" --num-steps="$RL_STEPS" --examples-per-step=4 --num-samples=4 \
    --device-batch-size=4 --max-new-tokens=128 --eval-every=-1 --save-every="$RL_SAVE_EVERY" --run="$WANDB_RUN" --resume
fi

# -----------------------------------------------------------------------------
stage 9 "chat evaluation of the RL model"
if evaluated "$RL_DIR"; then echo "found $RL_DIR/chat_eval.json for the last step, skipping"; else python -m nanochat_nb.chat_eval -i rl "${CHAT_EVAL[@]}"; fi

# -----------------------------------------------------------------------------
stage 10 "report card"
python -m nanochat_nb.report generate

# -----------------------------------------------------------------------------
stage 11 "done in $((SECONDS / 60))m$((SECONDS % 60))s"
python - <<PY
import json, os
for src, d in [("SFT", "$SFT_DIR"), ("RL", "$RL_DIR")]:
    p = os.path.join(d, "chat_eval.json")
    if os.path.exists(p):
        r = json.load(open(p))
        print(f"{src}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.get("results", r.get("accuracies", {})).items()))
PY
cat <<EOF
The report card: $NANOCHAT_BASE_DIR/report/report.md (copied to ./report.md)
Talk to the model:
  python -m nanochat_nb.chat_cli -i sft -g $MODEL_TAG                 # in the terminal (-i rl for the RL model)
  python -m nanochat_nb.chat_web -i sft -g $MODEL_TAG                 # in the browser, http://localhost:8000
  jupyter lab nbs/17b_chat.ipynb                                      # in a notebook cell (ChatWidget)
EOF
