"""Chat with a nanochat model in the terminal: `python runs/chat_cli.py [-i sft|rl|base] [-p "prompt"] ...`."""
from nanochat_nb.chat_cli import main

main()
