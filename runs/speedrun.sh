#!/usr/bin/env bash
# The "speedrun": train a GPT-2 grade chat model (d24) on one 8×H100 node, as the original's runs/speedrun.sh:
# report reset, data, tokenizer, d24 base model, base evaluation, identity conversations, SFT, chat evaluation,
# report card. RL on GSM8K is an opt-in stage (WITH_RL=1), as it is commented out in the original.
#
#   bash runs/speedrun.sh                              # wandb off
#   WANDB_RUN=speedrun bash runs/speedrun.sh           # log to wandb (run `wandb login` first)
#   NPROC_PER_NODE=4 bash runs/speedrun.sh             # fewer GPUs: gradient accumulation keeps the same batch
#   WITH_RL=1 bash runs/speedrun.sh                    # also RL on GSM8K and its chat evaluation
#
# On a GPU node, install the CUDA build of torch==2.13.0 into the environment first (runs/setup_env.sh only installs
# torch when none is importable).
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
mkdir -p "$NANOCHAT_BASE_DIR"
. runs/setup_env.sh
WANDB_RUN="${WANDB_RUN:-dummy}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"

WITH_RL="${WITH_RL:-0}"

# report: start a fresh report card (header: git, hardware, software, cost, bloat)
python -m nanochat_nb.report reset

# -----------------------------------------------------------------------------
# Tokenizer: ~2B characters (8 shards of ~250M chars) for the tokenizer, ~170 shards in the background for pretraining
python -m nanochat_nb.dataset -n 8
python -m nanochat_nb.dataset -n 170 &
DATASET_DOWNLOAD_PID=$!
python -m nanochat_nb.tok_train
python -m nanochat_nb.tok_eval

# -----------------------------------------------------------------------------
# Base model (pretraining): d24, slightly over-trained (tokens:params 8 instead of the compute-optimal 10.5) to beat
# GPT-2's CORE score; device batch 16 × 2048 × 8 GPUs × 4 accumulation steps = 1M-token batches; FP8 matmuls.
echo "Waiting for dataset download to complete..."
wait $DATASET_DOWNLOAD_PID
torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.base_train -- --depth=24 --target-param-data-ratio=8 --device-batch-size=16 --fp8 --run=$WANDB_RUN
# evaluate the model: CORE metric, bpb on train/val, samples
torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.base_eval -- --device-batch-size=16

# -----------------------------------------------------------------------------
# SFT: the identity conversations teach the model who it is (the other tasks download on first use)
curl -L -o "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl
torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.chat_sft -- --device-batch-size=16 --run=$WANDB_RUN
torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.chat_eval -- -i sft

# chat with the model over CLI or the web UI:
# python -m nanochat_nb.chat_cli -p "Why is the sky blue?"
# python -m nanochat_nb.chat_web

# -----------------------------------------------------------------------------
# RL on GSM8K (opt-in)
if [ "$WITH_RL" = "1" ]; then
  torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.chat_rl -- --run=$WANDB_RUN
  torchrun --standalone --nproc_per_node=$NPROC_PER_NODE -m nanochat_nb.chat_eval -- -i rl -a GSM8K
fi

# -----------------------------------------------------------------------------
python -m nanochat_nb.report generate
