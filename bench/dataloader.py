"""Throughput of the BOS best-fit pretraining loader (tokens/s), against tokenization alone, and its crop fraction
against greedy-crop on the same documents.

    python bench/dataloader.py [--B 32] [--T 512] [--batches 40] [--max-chars 4000000] [--vocab-size 4096]

Builds a small offline corpus (Python stdlib code + language reference, no network) in a temporary base dir, trains
a small BPE tokenizer on it (nanochat_nb.tokenizer.RustBPETokenizer if present, else the same rustbpe + tiktoken
recipe inline), then times the loader. Defaults are runcpu.sh's batch shape (B=32, T=512).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_tokenizer(texts, vocab_size):
    try:
        from nanochat_nb.tokenizer import RustBPETokenizer
        return RustBPETokenizer.train_from_iterator(iter(texts), vocab_size), "nanochat_nb.tokenizer.RustBPETokenizer"
    except ImportError:
        pass
    import rustbpe, tiktoken
    SPLIT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
    t = rustbpe.Tokenizer()
    t.train_from_iterator(iter(texts), vocab_size - 9, pattern=SPLIT)
    ranks = {bytes(k): v for k, v in t.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name="bench", pat_str=t.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={"<|bos|>": len(ranks)})

    class Tok:  # the two methods the loader uses, as RustBPETokenizer defines them
        def get_bos_token_id(self): return enc.encode_single_token("<|bos|>")
        def encode(self, text, prepend=None, num_threads=8):
            ids = enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend is not None:
                for row in ids: row.insert(0, prepend)
            return ids
    return Tok(), "inline rustbpe + tiktoken (nanochat_nb.tokenizer not available)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--max-chars", type=int, default=4_000_000)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=4, help="tokenizer_threads")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    os.environ["NANOCHAT_BASE_DIR"] = tmp.name
    import logging
    import torch
    logging.getLogger("rustbpe").setLevel(logging.WARNING)
    from nanochat_nb.dataset import build_offline_corpus, parquets_iter_batched
    from nanochat_nb.dataloader import _fill_row, tokenizing_distributed_data_loader_with_state_bos_bestfit as L

    t0 = time.perf_counter()
    s = build_offline_corpus(sources=["stdlib_docs", "stdlib_code"], max_chars=args.max_chars, val_chars=200_000,
                             shard_chars=1_000_000)
    print(f"corpus: {s['total_docs']:,} docs, {s['total_chars']:,} chars, {s['train_shards']} train shards "
          f"({time.perf_counter() - t0:.1f}s to build)")
    texts = [t for rg in parquets_iter_batched("train") for t in rg]
    t0 = time.perf_counter()
    tok, which = make_tokenizer(texts[:2000], args.vocab_size)
    print(f"tokenizer: {which}, vocab {args.vocab_size} ({time.perf_counter() - t0:.1f}s to train)")

    B, T, n = args.B, args.T, args.batches
    loader = L(tok, B, T, "train", tokenizer_threads=args.threads, device="cpu")
    next(loader)  # fill the 1000-document buffer once
    t0 = time.perf_counter()
    for _ in range(n): next(loader)
    dt = time.perf_counter() - t0
    loader_tps = n * B * T / dt
    print(f"loader (B={B}, T={T}): {n} batches in {dt:.2f}s -> {loader_tps:,.0f} tokens/s ({n / dt:.1f} batches/s)")

    # tokenization alone, on as many documents as the loader consumed (it also tokenizes the tokens it crops)
    docs = texts[:3000]
    t0 = time.perf_counter()
    ids = tok.encode(docs, prepend=tok.get_bos_token_id(), num_threads=args.threads)
    dt_tok = time.perf_counter() - t0
    tok_tps = sum(map(len, ids)) / dt_tok
    print(f"tokenization alone: {tok_tps:,.0f} tokens/s; loader / tokenize = {loader_tps / tok_tps:.2f}")

    # crop fraction: best fit (the loader's row filler) vs greedy-crop, on the same documents
    cap = T + 1
    used = total = pos = 0
    for d in ids:
        total += len(d); k = min(len(d), cap - pos); used += k; pos += k
        if pos == cap: pos = 0
    greedy = 1 - used / total
    it, buf, refs, row, cropped, taken = iter(ids), [], [], torch.empty(cap, dtype=torch.long), 0, 0
    def refill():
        while len(buf) < 1000: buf.append(next(it)); refs.append(None)
    try:
        while True:
            c = _fill_row(buf, refs, row, cap, refill); cropped += c; taken += cap + c
    except StopIteration:
        pass
    print(f"tokens cropped at T={T}: greedy-crop {greedy:.1%}, best-fit {cropped / taken:.1%} "
          f"(ratio {cropped / taken / greedy:.2f})")


if __name__ == "__main__":
    main()
