"""Train the tokenizer on the pretraining shards: `python runs/tok_train.py [--max-chars N] [--doc-cap N] [--vocab-size N] [--trainer rustbpe|hf]`."""
from nanochat_nb.tok_train import main

main()
