"""Tokenizer training time and encoding throughput, for both trainers (rustbpe and HF `tokenizers`).

    python bench/tokenizer.py [--chars 4000000] [--vocab-size 4096] [--encode-chars 4000000] [--threads 8]

Corpus: the Python standard library sources cut into 4,000-char documents (real text every machine has, no network).
Prints, per trainer: training time for N characters; encode throughput in MB/s of UTF-8 text with one thread (a loop
of `encode(str)`) and batched (`encode(list, num_threads)`); the compression (bytes/token); and the ratios
rustbpe/hf and batched/one-thread. Both trainers end as a tiktoken Encoding, so their encode speed should match;
HF's own `encode_batch` is timed as a reference.
"""
import argparse
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import logging

logging.getLogger("rustbpe").setLevel(logging.WARNING)  # rustbpe logs every 1% of merges at INFO


def stdlib_docs(max_chars, doc_chars=4000, skip_chars=0):
    "4000-char documents from the stdlib sources, after skipping `skip_chars` (so train and encode texts differ)."
    root = sysconfig.get_paths()["stdlib"]
    docs, seen = [], 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        if "site-packages" in dirpath or "test" in dirpath.split(os.sep): continue
        for name in sorted(filenames):
            if not name.endswith(".py"): continue
            text = open(os.path.join(dirpath, name), encoding="utf-8", errors="replace").read()
            for i in range(0, len(text), doc_chars):
                doc = text[i:i + doc_chars]
                seen += len(doc)
                if seen <= skip_chars: continue
                docs.append(doc)
                if seen - skip_chars >= max_chars: return docs
    return docs


def best_of(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars", type=int, default=4_000_000, help="training characters")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--encode-chars", type=int, default=4_000_000, help="characters to encode (held out)")
    parser.add_argument("--threads", type=int, default=8, help="num_threads of the batched encode")
    args = parser.parse_args()
    from nanochat_nb.tokenizer import HuggingFaceTokenizer, RustBPETokenizer

    train_docs = stdlib_docs(args.chars)
    test_docs = stdlib_docs(args.encode_chars, skip_chars=args.chars)
    n_train = sum(map(len, train_docs))
    mb = sum(len(d.encode("utf-8")) for d in test_docs) / 1e6
    print(f"CPU threads available: {os.cpu_count()}; train {n_train:,} chars ({len(train_docs)} docs), "
          f"encode {mb:.2f} MB ({len(test_docs)} docs), vocab {args.vocab_size}")

    rows = {}
    for trainer in ("rustbpe", "hf"):
        t0 = time.perf_counter()
        if trainer == "rustbpe":
            tok = RustBPETokenizer.train_from_iterator(iter(train_docs), args.vocab_size)
        else:
            hf = HuggingFaceTokenizer.train_from_iterator(iter(train_docs), args.vocab_size, show_progress=False)
            tok = RustBPETokenizer(hf.to_tiktoken(), "<|bos|>")
        train_s = time.perf_counter() - t0
        single = best_of(lambda: [tok.encode(d) for d in test_docs])
        batched = best_of(lambda: tok.encode(test_docs, num_threads=args.threads))
        n_tokens = sum(map(len, tok.encode(test_docs)))
        rows[trainer] = dict(train_s=train_s, single=mb / single, batched=mb / batched, bpt=mb * 1e6 / n_tokens)
        if trainer == "hf":
            rows["hf"]["native"] = mb / best_of(lambda: hf.tokenizer.encode_batch(test_docs, add_special_tokens=False))

    print(f"\n{'trainer':<9} {'train s':>8} {'chars/s':>10} {'1-thread MB/s':>14} {'batched MB/s':>13} {'bytes/token':>12}")
    for name, r in rows.items():
        print(f"{name:<9} {r['train_s']:>8.2f} {n_train / r['train_s'] / 1e6:>9.2f}M {r['single']:>14.2f} "
              f"{r['batched']:>13.2f} {r['bpt']:>12.3f}")
    rb, hf_ = rows["rustbpe"], rows["hf"]
    print(f"\nHF tokenizers' own encode_batch: {hf_['native']:.2f} MB/s "
          f"(tiktoken batched is {hf_['batched'] / hf_['native']:.2f}x that)")
    print(f"training time hf / rustbpe: {hf_['train_s'] / rb['train_s']:.2f}x")
    print(f"batched / 1-thread encode (threads={args.threads}): rustbpe {rb['batched'] / rb['single']:.2f}x, "
          f"hf {hf_['batched'] / hf_['single']:.2f}x")
    print(f"compression rustbpe / hf: {rb['bpt'] / hf_['bpt']:.4f}")


if __name__ == "__main__":
    main()
