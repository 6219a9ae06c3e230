"""Thin runner: `python runs/base_train.py --depth=4 ...` == `python -m nanochat_nb.base_train --depth=4 ...`."""
from nanochat_nb.base_train import main

main()
