#!/usr/bin/env bash
# nanochat on a CPU, start to finish in about 15 minutes on 2 cores: build an offline corpus, train a tokenizer,
# pretrain a small base model, report its validation bits per byte and print samples.
#
#   bash runs/runcpu.sh                          # artifacts in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)
#   NANOCHAT_BASE_DIR=/tmp/nc bash runs/runcpu.sh
#   WANDB_RUN=cpu bash runs/runcpu.sh            # also log to wandb (offline unless you are logged in)
#
# Idempotent: each stage is skipped when its output exists; an interrupted pretraining run resumes from its last
# checkpoint (saved every SAVE_EVERY steps). Knobs (environment): DEPTH, NUM_ITERATIONS, SAVE_EVERY, VOCAB_SIZE.
#
# Differences from the original runs/runcpu.sh (d6, seq 512, 5000 steps: ~30 min on an M3 Max): the corpus is built
# offline from text that ships in Python packages instead of downloading ClimbMix; the tokenizer has a smaller
# vocabulary; the model and run are sized for ~10 minutes of pretraining on 2 cores. The CORE eval and SFT stages
# need downloads and are left to the GPU runner.
set -euo pipefail
cd "$(dirname "$0")/.."
. runs/setup_env.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
WANDB_RUN="${WANDB_RUN:-dummy}"
DEPTH="${DEPTH:-4}"
NUM_ITERATIONS="${NUM_ITERATIONS:-400}"
SAVE_EVERY="${SAVE_EVERY:-100}"
VOCAB_SIZE="${VOCAB_SIZE:-8192}"
MODEL_TAG="cpu_d${DEPTH}"
echo "=== runcpu: artifacts in $NANOCHAT_BASE_DIR"
SECONDS=0

# -----------------------------------------------------------------------------
# 1. Pretraining corpus (offline: English prose from pip/npm/Debian packages + the Python stdlib source, checked
#    against the evaluation sets and shuffled into parquet shards)
if ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet >/dev/null 2>&1; then
  echo "=== [1/4] corpus: found $(ls "$NANOCHAT_BASE_DIR"/base_data_climbmix/*.parquet | wc -l) shards, skipping"
else
  echo "=== [1/4] corpus: building the offline corpus"
  python -m nanochat_nb.dataset --offline
fi

# -----------------------------------------------------------------------------
# 2. Tokenizer
if [ -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
  echo "=== [2/4] tokenizer: found, skipping"
else
  echo "=== [2/4] tokenizer: training (vocab $VOCAB_SIZE)"
  python -m nanochat_nb.tok_train --vocab-size="$VOCAB_SIZE"
  python -m nanochat_nb.tok_eval
fi

# -----------------------------------------------------------------------------
# 3. Base model: d4 (width 256, 4 heads of 64), full-context attention (sliding windows only pay off with FA3),
#    256-token context, 16 rows x 256 = 4096 tokens per step; val bpb every 100 steps, samples every 200.
CKPT_DIR="$NANOCHAT_BASE_DIR/base_checkpoints/$MODEL_TAG"
LAST_STEP=$(python -c "
from nanochat_nb.checkpoint_manager import find_last_step
try: print(find_last_step('$CKPT_DIR'))
except FileNotFoundError: print(-1)")
if [ "$LAST_STEP" -ge "$NUM_ITERATIONS" ]; then
  echo "=== [3/4] base model: $CKPT_DIR already has step $LAST_STEP, skipping training"
else
  RESUME=()
  if [ "$LAST_STEP" -gt 0 ]; then echo "=== [3/4] base model: resuming from step $LAST_STEP"; RESUME=(--resume-from-step="$LAST_STEP"); fi
  echo "=== [3/4] base model: pretraining d$DEPTH for $NUM_ITERATIONS steps"
  python -m nanochat_nb.base_train \
    --depth="$DEPTH" --head-dim=64 --window-pattern=L --max-seq-len=256 \
    --device-batch-size=16 --total-batch-size=4096 --num-iterations="$NUM_ITERATIONS" --warmup-steps=20 \
    --eval-every=100 --eval-tokens=131072 --core-metric-every=-1 --sample-every=200 --save-every="$SAVE_EVERY" \
    --model-tag="$MODEL_TAG" --run="$WANDB_RUN" "${RESUME[@]}"
fi

# -----------------------------------------------------------------------------
# 4. Evaluate: bits per byte on train and val (the same 131072 validation tokens base_train evaluates), and samples (the CORE tasks need the eval bundle download, so they are
#    left out here; add --eval=core,bpb,sample and --max-per-task=16 where the bundle is available)
echo "=== [4/4] base model evaluation: bpb + samples"
python -m nanochat_nb.base_eval --model-tag="$MODEL_TAG" --eval=bpb,sample --device-batch-size=16 --split-tokens=131072

python - <<PY
import json, os
from nanochat_nb.checkpoint_manager import find_last_step
d = "$CKPT_DIR"; step = find_last_step(d)
meta = json.load(open(os.path.join(d, f"meta_{step:06d}.json")))
print(f"=== done in {$SECONDS // 60}m{$SECONDS % 60:02d}s: {d} step {step}, validation bpb {meta['val_bpb']:.4f}")
PY
echo "Load it with: from nanochat_nb.checkpoint_manager import load_model; load_model('base', 'cpu', 'eval', model_tag='$MODEL_TAG')"
