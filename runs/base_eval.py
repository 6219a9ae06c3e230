"""Thin runner: python runs/base_eval.py [flags] (same as python -m nanochat_nb.base_eval)."""
from nanochat_nb.base_eval import main

main()
