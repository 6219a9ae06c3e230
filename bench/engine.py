"""Generation speed: naive GPT.generate (no KV cache) vs the Engine (KV cache) with 1 and 8 samples.

Prints tokens/s for each and the ratios. A small random GPT (no checkpoint needed); special tokens are given ids the
model cannot sample, so every run generates exactly --max-tokens columns.
Usage: python bench/engine.py [--depth 4] [--prompt-len 64] [--max-tokens 64] [--samples 8] [--repeats 5]
"""
import argparse
import time

import torch

from nanochat_nb.common import COMPUTE_DTYPE
from nanochat_nb.engine import Engine
from nanochat_nb.gpt import GPT, config_for_depth


class BenchTokenizer:
    "Specials live outside the vocab, so generation never stops early."
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    def encode_special(self, s): return 10**9 + self.SPECIALS.index(s)
    def get_bos_token_id(self): return self.encode_special("<|bos|>")
    def encode(self, s, prepend=None): return list(s.encode())
    def decode(self, ids): return bytes(t for t in ids if t < 256).decode(errors="replace")


def build(depth, vocab_size, seq_len):
    config = config_for_depth(depth, aspect_ratio=64, head_dim=64, max_seq_len=seq_len, vocab_size=vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def best_times(fns, repeats):
    "Best wall time of each function; the functions take turns in every round, so a noisy moment hits all of them."
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter(); fn(); best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.depth, args.vocab_size, seq_len=max(512, args.prompt_len + args.max_tokens))
    tok = BenchTokenizer()
    engine = Engine(model, tok)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,)).tolist()
    n = args.max_tokens
    c = model.config
    print(f"model: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head}, vocab {c.vocab_size}; dtype {COMPUTE_DTYPE}; "
          f"threads {torch.get_num_threads()}; prompt {args.prompt_len} tokens, {n} new tokens, best of {args.repeats}")

    def naive():
        out = list(model.generate(prompt, max_tokens=n, temperature=1.0, top_k=50))
        assert len(out) == n
    def engine_run(samples):
        def run():
            cols = list(engine.generate(prompt, num_samples=samples, max_tokens=n, temperature=1.0, top_k=50))
            assert len(cols) == n and len(cols[0][0]) == samples
        return run

    naive(); engine_run(args.samples)()  # warm-up
    t_naive, t_one, t_many = best_times([naive, engine_run(1), engine_run(args.samples)], args.repeats)
    tps_naive, tps_one, tps_many = n / t_naive, n / t_one, args.samples * n / t_many
    print(f"{'naive GPT.generate (1 sample)':<36} {tps_naive:9.1f} tok/s   ({t_naive:.3f}s)")
    print(f"{'Engine, KV cache, 1 sample':<36} {tps_one:9.1f} tok/s   ({t_one:.3f}s)")
    print(f"{f'Engine, KV cache, {args.samples} samples':<36} {tps_many:9.1f} tok/s   ({t_many:.3f}s, all samples)")
    print(f"speed-up Engine(1) / naive:            {tps_one / tps_naive:6.2f}x")
    print(f"throughput Engine({args.samples}) / Engine(1):        {tps_many / tps_one:6.2f}x")
    print(f"throughput Engine({args.samples}) / naive:            {tps_many / tps_naive:6.2f}x")


if __name__ == "__main__":
    main()
