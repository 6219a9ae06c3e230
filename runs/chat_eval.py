"""Thin runner: python runs/chat_eval.py -i sft [flags] (same as python -m nanochat_nb.chat_eval; works under torchrun)."""
from nanochat_nb.chat_eval import main

main()
