"""Helpers for the pretraining tests: a tiny synthetic corpus, a tiny tokenizer, and a torchrun worker.

As a script (under torchrun) it runs `nanochat_nb.base_train.main(argv)` and rank 0 writes the returned results as
JSON to $RESULTS_JSON, so the test can compare multi-process runs with single-process ones number for number.
"""
import json
import os
import random
import sys

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point number "
         "group problem fact river mountain city garden window table letter story song market road school house "
         "teacher doctor farmer baker sailor painter").split()
ADJS = "big small old new good bad long short red blue green quiet loud happy sad bright dark warm cold".split()
VERBS = "sees finds makes takes gives knows likes builds paints opens reads writes carries follows".split()


def make_documents(n_docs, seed, min_sentences=3, max_sentences=12):
    "Deterministic synthetic documents with learnable structure ('the <adj> <noun> <verb> a <noun>.')."
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(min_sentences, max_sentences)):
            s = f"The {rng.choice(ADJS)} {rng.choice(WORDS)} {rng.choice(VERBS)} a {rng.choice(WORDS)}"
            if rng.random() < 0.3:
                s += f" with {rng.randint(0, 99)} {rng.choice(WORDS)}s"
            sentences.append(s + ".")
        docs.append(" ".join(sentences))
    return docs


def write_shard(path, docs, row_group_size):
    "Write `docs` as a parquet shard with a `text` column and the given row-group size."
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size)


def make_corpus(base_dir, n_train_docs=1600, n_val_docs=256, row_group_size=64, seed=0, train_docs=None, val_docs=None):
    "Two train shards + the val shard (shard_06542) under base_dir/base_data_climbmix."
    data_dir = os.path.join(base_dir, "base_data_climbmix")
    train_docs = train_docs if train_docs is not None else make_documents(n_train_docs, seed)
    val_docs = val_docs if val_docs is not None else make_documents(n_val_docs, seed + 1)
    half = len(train_docs) // 2
    write_shard(os.path.join(data_dir, "shard_00000.parquet"), train_docs[:half], row_group_size)
    write_shard(os.path.join(data_dir, "shard_00001.parquet"), train_docs[half:], row_group_size)
    write_shard(os.path.join(data_dir, "shard_06542.parquet"), val_docs, row_group_size)
    return data_dir


def make_tokenizer(base_dir, vocab_size=320, seed=0):
    "Train a tiny RustBPE tokenizer on synthetic text; save it and token_bytes.pt under base_dir/tokenizer."
    import torch
    from nanochat_nb.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.train_from_iterator(iter(make_documents(400, seed + 7)), vocab_size)
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tokenizer_dir)
    special_ids = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    token_bytes = [0 if i in special_ids else len(tokenizer.enc.decode_single_token_bytes(i))
                   for i in range(tokenizer.get_vocab_size())]
    torch.save(torch.tensor(token_bytes, dtype=torch.int32), os.path.join(tokenizer_dir, "token_bytes.pt"))
    return tokenizer


TINY_ARGS = ["--depth=2", "--max-seq-len=64", "--head-dim=64", "--window-pattern=L", "--device-batch-size=4",
             "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=2"]


if __name__ == "__main__":
    from nanochat_nb.base_train import main
    results = main(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0 and os.environ.get("RESULTS_JSON"):
        with open(os.environ["RESULTS_JSON"], "w") as f:
            json.dump(results, f)
