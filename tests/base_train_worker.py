"""Helpers for the pretraining tests: the tiny corpus and tokenizer (from nanochat_nb.tiny_corpus), TINY_ARGS, and a
torchrun worker.

As a script (under torchrun) it runs `nanochat_nb.base_train.main(argv)` and rank 0 writes the returned results as
JSON to $RESULTS_JSON, so the test can compare multi-process runs with single-process ones number for number.
"""
import json
import os
import sys

from nanochat_nb.tiny_corpus import make_corpus, make_documents, make_tokenizer  # noqa: F401  (re-exported for the tests)


TINY_ARGS = ["--depth=2", "--max-seq-len=64", "--head-dim=64", "--window-pattern=L", "--device-batch-size=4",
             "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=2"]


if __name__ == "__main__":
    from nanochat_nb.base_train import main
    results = main(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0 and os.environ.get("RESULTS_JSON"):
        with open(os.environ["RESULTS_JSON"], "w") as f:
            json.dump(results, f)
