"""CORE evaluation speed on this CPU: prompt rendering (templates compiled once vs per call, as the original) and
examples per second for each task type with a tiny GPT.

    python bench/core_eval.py                    # defaults: 10-shot prompts, 40 examples per type
    python bench/core_eval.py --examples 20 --shots 0

The model is a randomly initialised GPT (depth --depth, width 64·depth, sequence_len 256) and the tokenizer is a
byte-level stand-in, so the numbers measure the harness (render, tokenize, one forward per example, scoring), not
a trained model. Timings on a shared 2-core machine are noisy; compare ratios within one run.
"""
import argparse
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40, help="examples per task type")
    parser.add_argument("--shots", type=int, default=10, help="few-shot examples per prompt")
    parser.add_argument("--depth", type=int, default=2, help="GPT depth (width 64·depth)")
    parser.add_argument("--renders", type=int, default=2000, help="prompts rendered in the template benchmark")
    args = parser.parse_args()

    import torch
    from jinja2 import Template
    from nanochat_nb import core_eval
    from nanochat_nb.common import COMPUTE_DTYPE
    from nanochat_nb.core_eval import evaluate_task, render_prompts_mc
    from nanochat_nb.gpt import GPT, GPTConfig
    from tests.core_eval_worker import CharTokenizer, random_bigram

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat and big small red blue house tree river stone".split()
    sent = lambda n: " ".join(rng.choice(words) for _ in range(n))

    # 1) rendering: the compiled template vs compiling it on every call (what the original does)
    items = [{"query": sent(12), "choices": [sent(4) for _ in range(4)], "gold": rng.randrange(4)} for _ in range(50)]
    src = core_eval._MC_TEMPLATE  # the compiled one
    template_str = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
    def render_uncached(item, delim, shots):
        t = Template(template_str)
        ctx = {"fewshot_examples": shots, "continuation_delimiter": delim, "item": item}
        return [t.render(choice=c, **ctx) for c in item["choices"]]
    shots = items[:args.shots]
    assert render_uncached(items[-1], " ", shots) == render_prompts_mc(items[-1], " ", shots)  # same text
    n = args.renders // 4
    t0 = time.perf_counter()
    for i in range(n): render_prompts_mc(items[i % 50], " ", shots)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n): render_uncached(items[i % 50], " ", shots)
    t_uncached = time.perf_counter() - t0
    print(f"render 4-choice MC, {args.shots}-shot: compiled once {n / t_cached:,.0f} examples/s | "
          f"compiled per call {n / t_uncached:,.0f} examples/s | speedup x{t_uncached / t_cached:.1f}")

    # 2) end to end per task type
    tok = CharTokenizer()
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=256, vocab_size=257, n_layer=args.depth, n_head=args.depth, n_kv_head=args.depth,
                       n_embd=64 * args.depth, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    E = args.examples
    tasks = {
        "multiple_choice (4 choices)": ({"task_type": "multiple_choice"}, [{"query": sent(12), "choices": [sent(4) for _ in range(4)], "gold": 0} for _ in range(E)]),
        "schema (2 options)": ({"task_type": "schema"}, [{"context_options": [sent(6), sent(6)], "continuation": sent(5), "gold": 0} for _ in range(E)]),
        "language_modeling": ({"task_type": "language_modeling"}, [{"context": sent(12), "continuation": sent(2)} for _ in range(E)]),
    }
    print(f"tiny GPT depth {args.depth} (n_embd {64 * args.depth}), byte tokenizer, {args.shots}-shot prompts, {E} examples per type, "
          f"{torch.get_num_threads()} threads, compute dtype {COMPUTE_DTYPE}")
    bigram = random_bigram()  # a table lookup: what is left is the harness (render, tokenize, batch, score)
    for name, (meta, data) in tasks.items():
        meta = {**meta, "num_fewshot": min(args.shots, E - 1), "continuation_delimiter": " "}
        t0 = time.perf_counter()
        acc = evaluate_task(model, tok, data, "cpu", meta)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate_task(bigram, tok, data, "cpu", meta)
        dh = time.perf_counter() - t0
        print(f"  {name:<28} GPT {E / dt:8.1f} examples/s ({dt / E * 1000:7.1f} ms/example, accuracy {acc:.3f}) | "
              f"harness only (bigram table) {dh / E * 1000:6.1f} ms/example = {dh / dt:.1%} of the GPT time")


if __name__ == "__main__":
    main()
