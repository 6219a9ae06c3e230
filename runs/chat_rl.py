"""Thin runner: `python runs/chat_rl.py --run=x ...` == `python -m nanochat_nb.chat_rl --run=x ...` (also under torchrun)."""
from nanochat_nb.chat_rl import main

main()
