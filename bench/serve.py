"""Serving speed of chat_web on CPU: time to first token, tokens/s per stream and aggregate tokens/s for 1, 2 and 4
concurrent streaming clients, against the Engine alone.

A random GPT (no checkpoint needed) behind the real server (uvicorn on 127.0.0.1, in a thread of this process) and
real HTTP clients (httpx, one thread each) on the original streaming endpoint. The tokenizer decodes every id to one
character and the model never samples a special token, so every stream is exactly --max-tokens events long.
With one worker (the CPU default) concurrent streams queue: their time to first token includes the wait.
Usage: OMP_NUM_THREADS=1 python bench/serve.py [--depth 4] [--max-tokens 64] [--workers 1] [--concurrency 1,2,4]
"""
import argparse
import copy
import json
import statistics
import threading
import time

import httpx
import torch

from nanochat_nb.chat_web import BackgroundServer, Worker, create_app, render_prompt
from nanochat_nb.engine import Engine
from nanochat_nb.gpt import GPT, config_for_depth


class CharTokenizer:
    "Every id decodes to one letter; the nine specials are the last ids of the vocab."
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    def __init__(self, vocab_size): self.vocab_size, self.first_special = vocab_size, vocab_size - len(self.SPECIALS)
    def encode_special(self, s): return self.first_special + self.SPECIALS.index(s)
    def get_bos_token_id(self): return self.encode_special("<|bos|>")
    def encode(self, s, prepend=None): return [ord(c) % self.first_special for c in s]
    def decode(self, ids): return "".join(chr(97 + t % 26) for t in ids if t < self.first_special)


class NoSpecials(torch.nn.Module):
    "The model with its special tokens banned, so generation never stops early (the same wrapper for every timing)."
    def __init__(self, model, tok):
        super().__init__()  # a Module holding the GPT, so the Engine's inference_weights finds its Linears
        self.model, self.config, self.rotary_seq_len = model, model.config, model.rotary_seq_len
        self.first_special = tok.first_special
    def get_device(self): return self.model.get_device()
    def forward(self, ids, kv_cache=None, last_only=False):
        logits = self.model.forward(ids, kv_cache=kv_cache, last_only=last_only)
        logits[..., self.first_special:] = float("-inf")
        return logits


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


def stream(url, seed, max_tokens, out):
    "One streaming request; appends (time to first token, tokens, seconds from first to last token)."
    body = {"messages": [{"role": "user", "content": "Tell me a story about a robot."}], "max_tokens": max_tokens,
            "seed": seed, "temperature": 1.0}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and "token" in (event := json.loads(line[6:])):
                last = time.perf_counter()
                first = first or last
                n += len(event["token"])
    out.append((first - t0, n, last - first))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="model replicas (the server uses 1 on CPU)")
    parser.add_argument("--concurrency", type=str, default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per concurrency level (the best is kept)")
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = CharTokenizer(args.vocab_size)
    model = NoSpecials(build(args.depth, args.vocab_size, seq_len=512), tok)
    prompt = render_prompt(tok, [{"role": "user", "content": "Tell me a story about a robot."}])

    engine = Engine(model, tok)
    engine_tps = 0.0
    for _ in range(4):  # the Engine alone on the same prompt: the best of 4 (the first one warms up)
        t0 = time.perf_counter()
        n = sum(1 for _ in engine.generate(prompt, max_tokens=args.max_tokens, temperature=1.0, seed=0))
        engine_tps = max(engine_tps, n / (time.perf_counter() - t0))
    print(f"depth {args.depth}, {sum(p.numel() for p in model.model.parameters()) / 1e6:.1f}M params, "
          f"{args.max_tokens} tokens per stream, {args.workers} worker(s), torch threads {torch.get_num_threads()}")
    print(f"Engine alone: {engine_tps:.1f} tok/s")

    workers = [Worker(i, model if i == 0 else copy.deepcopy(model), tok) for i in range(args.workers)]
    app = create_app(workers, model_id="bench")
    print(f"{'streams':>7} | {'TTFT mean':>9} | {'TTFT max':>8} | {'tok/s per stream':>16} | {'aggregate tok/s':>15} | "
          f"{'vs Engine':>9}")
    with BackgroundServer(app) as url:
        stream(url, 0, 8, [])  # warm up the server path
        for c in [int(x) for x in args.concurrency.split(",")]:
            best = None
            for rep in range(args.repeats):
                results = []
                threads = [threading.Thread(target=stream, args=(url, 1000 * rep + i, args.max_tokens, results))
                           for i in range(c)]
                t0 = time.perf_counter()
                for t in threads: t.start()
                for t in threads: t.join()
                wall = time.perf_counter() - t0
                assert len(results) == c and all(n == args.max_tokens for _, n, _ in results), results
                aggregate = sum(n for _, n, _ in results) / wall
                if best is None or aggregate > best[0]:
                    best = (aggregate, results)
            aggregate, results = best
            ttft = [r[0] for r in results]
            per_stream = statistics.mean((n - 1) / dt for _, n, dt in results)
            print(f"{c:>7} | {statistics.mean(ttft) * 1000:>7.0f}ms | {max(ttft) * 1000:>6.0f}ms | {per_stream:>16.1f} | "
                  f"{aggregate:>15.1f} | {aggregate / engine_tps:>8.2f}x")


if __name__ == "__main__":
    main()
