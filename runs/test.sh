#!/usr/bin/env bash
# Every test: each notebook's inline tests (nbdev_test), then the package tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
. runs/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled} MPLBACKEND=${MPLBACKEND:-Agg}
echo "=== notebooks: nbdev_test"
nbdev_test --n_workers 2 --timing
echo "=== package tests: pytest"
python -m pytest -q tests "$@"
