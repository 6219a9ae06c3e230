"""RL step speed: rollout tokens/s and the time split between sampling (Engine) and the training pass.

Runs chat_rl's own step (rollout_batch, train_on_example, the optimizer step) on a small random GPT with a stand-in
tokenizer and task (no checkpoint or data needed); the reward is a hash of the answer, so advantages are non-zero.
Usage: python bench/rl.py [--depth 4] [--device cpu] [--examples 2] [--num-samples 8] [--device-batch-size 8]
                          [--max-new-tokens 64] [--prompt-len 64] [--steps 3]
"""
import argparse
import time
import zlib

import torch

from nanochat_nb.chat_rl import rollout_batch, scale_initial_lrs, train_on_example
from nanochat_nb.common import COMPUTE_DTYPE
from nanochat_nb.engine import Engine
from nanochat_nb.gpt import GPT, config_for_depth
from nanochat_nb.train_loop import optimizer_step, set_schedules

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class BenchTokenizer:
    "Bytes plus the specials at the top of the vocab; a prompt is a fixed random token list."
    def __init__(self, vocab_size, prompt): self.vocab_size, self.prompt = vocab_size, prompt
    def encode_special(self, s): return self.vocab_size - len(SPECIALS) + SPECIALS.index(s)
    def get_bos_token_id(self): return self.encode_special("<|bos|>")
    def encode(self, s, prepend=None): return list(s.encode())
    def decode(self, ids): return bytes(t % 256 for t in ids).decode(errors="replace")
    def render_for_completion(self, conversation): return list(self.prompt)


class BenchTask:
    "Questions without content; reward 1 for half of all answers (by a hash of the text)."
    def __len__(self): return 10**6
    def __getitem__(self, i): return {"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": ""}]}
    def reward(self, conversation, text): return float(zlib.crc32(text.encode()) % 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=2, help="questions per step (one rank)")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--device-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = config_for_depth(args.depth, aspect_ratio=64, head_dim=64, vocab_size=args.vocab_size,
                              max_seq_len=max(512, args.prompt_len + args.max_new_tokens))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # the output layers start at zero: give the samples some variety
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tok = BenchTokenizer(args.vocab_size, torch.randint(0, 256, (args.prompt_len,)).tolist())
    engine, task = Engine(model, tok), BenchTask()
    optimizer = model.setup_optimizer()
    scale_initial_lrs(optimizer, 0.05)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    c = model.config
    print(f"model: depth {c.n_layer}, width {c.n_embd}, vocab {c.vocab_size}; device {device}, dtype {COMPUTE_DTYPE}; "
          f"threads {torch.get_num_threads()}; {args.examples} questions x {args.num_samples} samples per step, "
          f"prompt {args.prompt_len}, at most {args.max_new_tokens} new tokens")
    totals = {"sample": 0.0, "train": 0.0, "optim": 0.0, "generated": 0, "trained": 0}
    for step in range(args.steps + 1):
        measured = step > 0
        for e in range(args.examples):
            sync(); t0 = time.perf_counter()
            seqs, inputs, targets, rewards, adv = rollout_batch(engine, tok, task, step * args.examples + e, step, device,
                                                                args.num_samples, args.device_batch_size,
                                                                args.max_new_tokens, 1.0, 50)
            sync(); t1 = time.perf_counter()
            model.train()
            train_on_example(model, inputs, targets, adv, args.device_batch_size, args.examples)
            sync(); t2 = time.perf_counter()
            if measured:
                totals["sample"] += t1 - t0; totals["train"] += t2 - t1
                totals["generated"] += sum(len(s) - args.prompt_len for s in seqs)
                totals["trained"] += int((targets >= 0).sum())
        sync(); t0 = time.perf_counter()
        set_schedules(optimizer, 1.0 - step / (args.steps + 1))
        optimizer_step(model, optimizer)
        sync()
        if measured: totals["optim"] += time.perf_counter() - t0
    total = totals["sample"] + totals["train"] + totals["optim"]
    print(f"{'rollouts (Engine, KV cache)':<30} {totals['generated'] / totals['sample']:10.1f} generated tok/s   "
          f"{totals['sample']:.3f}s  ({100 * totals['sample'] / total:.1f}% of the step)")
    print(f"{'training passes (fwd + bwd)':<30} {totals['trained'] / totals['train']:10.1f} trained tok/s     "
          f"{totals['train']:.3f}s  ({100 * totals['train'] / total:.1f}%)")
    print(f"{'optimizer step':<30} {'':>10}                       {totals['optim']:.3f}s  "
          f"({100 * totals['optim'] / total:.1f}%)")
    print(f"sampling / training time ratio: {totals['sample'] / totals['train']:.1f}x over {args.steps} steps "
          f"({totals['generated']} tokens generated, {totals['trained']} trained)")


if __name__ == "__main__":
    main()
