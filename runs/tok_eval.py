"""Compare the trained tokenizer's compression with GPT-2 and GPT-4: `python runs/tok_eval.py`."""
from nanochat_nb.tok_eval import main

main()
