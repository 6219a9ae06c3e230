"""Shared helpers for tests/test_chat_eval.py, and a torchrun worker that runs chat evaluations on 1 or 2 ranks.

Usage (under torchrun): python -m torch.distributed.run --nproc_per_node=2 tests/chat_eval_worker.py OUT.json
with NANOCHAT_BASE_DIR holding tiny task data (write_tiny_eval_data), the byte tokenizer and an sft checkpoint.
Rank 0 writes the accuracies to OUT.json.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch

ARC_EASY_ROWS = [
    {"id": f"e{i}", "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key}
    for i, (q, texts, labels, key) in enumerate([
        ("Which is a mammal?", ["shark", "whale", "trout"], ["A", "B", "C"], "B"),
        ("What melts ice?", ["heat", "cold", "dark", "salt water at -50C"], ["A", "B", "C", "D"], "A"),
        ("Pick two.", ["1", "2", "3", "4"], ["1", "2", "3", "4"], "2"),
        ("Which planet is closest to the Sun in our solar system?", ["Venus", "Mercury", "Mars", "Earth"], ["A", "B", "C", "D"], "B"),
        ("Sky colour?", ["blue", "green", "red", "black", "white"], ["A", "B", "C", "D", "E"], "A"),
        ("A plant makes food by?", ["photosynthesis", "digestion", "respiration"], ["A", "B", "C"], "A"),
        ("Water boils at sea level at which temperature in degrees Celsius, approximately?", ["50", "100", "150", "200"], ["1", "2", "3", "4"], "2"),
        ("Which is a gas at room temperature?", ["iron", "oxygen", "gold", "salt"], ["A", "B", "C", "D"], "B"),
        ("Ice is?", ["solid", "liquid", "gas"], ["A", "B", "C"], "A"),
    ])]
ARC_CHALLENGE_ROWS = [dict(r, id="c" + r["id"]) for r in ARC_EASY_ROWS[::-1][:5]]
MMLU_ROWS = [{"question": q, "subject": "elementary_mathematics", "choices": c, "answer": a} for q, c, a in [
    ("2+2?", ["3", "4", "5", "6"], 1), ("3*3?", ["9", "6", "3", "0"], 0), ("10-7?", ["1", "2", "4", "3"], 3),
    ("Half of 8?", ["2", "3", "4", "5"], 2), ("1+0?", ["0", "1", "2", "3"], 1)]]
GSM8K_ANSWERS = [18, 3, 18, 7, 18, 5, 18]
GSM8K_ROWS = [{"question": f"Problem {i}: how many?", "answer": f"It is {a} = <<{a}*1={a}>>{a}.\n#### {a}"}
              for i, a in enumerate(GSM8K_ANSWERS)]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n",
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"},
    {"task_id": "HumanEval/1", "prompt": "def one() -> int:\n    \"\"\"One.\"\"\"\n",
     "canonical_solution": "    return 1\n", "test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "one"},
]
WORDS = ["strawberry", "kayak", "mississippi", "book", "banana"]


def write_tiny_eval_data(base_dir):
    "Hub-schema offline splits of every chat-eval task and a word list under `base_dir` (NANOCHAT_BASE_DIR must be it)."
    from nanochat_nb.task_data import write_offline_split
    write_offline_split("allenai/ai2_arc", "ARC-Easy", "test", ARC_EASY_ROWS, "t", "t")
    write_offline_split("allenai/ai2_arc", "ARC-Challenge", "test", ARC_CHALLENGE_ROWS, "t", "t")
    write_offline_split("cais/mmlu", "all", "test", MMLU_ROWS, "t", "t")
    write_offline_split("openai/gsm8k", "main", "test", GSM8K_ROWS, "t", "t")
    write_offline_split("openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, "t", "t")
    root = os.path.join(str(base_dir), "task_data", "offline")
    with open(os.path.join(root, "words_alpha.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")


class ScriptedLM:
    """A stand-in for GPT that the real Engine can drive: whatever the prompt, its greedy continuation is `script`
    (token ids) followed by <|assistant_end|>. It keeps the KV cache's position like GPT does."""
    def __init__(self, tokenizer, text):
        self.vocab_size = tokenizer.get_vocab_size()
        self.script = tokenizer.encode(text) + [tokenizer.encode_special("<|assistant_end|>")]
        self.config = SimpleNamespace(n_kv_head=1, n_head=1, n_embd=2, n_layer=1, sequence_len=1024)
        self.prompt_len = None

    def get_device(self): return torch.device("cpu")

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        if pos == 0: self.prompt_len = T
        if kv_cache is not None: kv_cache.advance(T)
        generated = pos + T - self.prompt_len  # tokens generated so far
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(generated, len(self.script) - 1)]] = 10.0
        return logits[:, -1:] if last_only else logits
    __call__ = forward


def evaluate_all():
    "The accuracies the two-rank run must reproduce: a random GPT on the categorical tasks, ScriptedLM on the generative."
    from nanochat_nb.chat_eval import run_chat_eval
    from nanochat_nb.checkpoint_manager import load_model
    from nanochat_nb.engine import Engine
    model, tok, _ = load_model("sft", "cpu", phase="eval")
    engine = Engine(model, tok)
    out = {name: run_chat_eval(name, model, tok, engine, batch_size=2) for name in ("ARC-Easy", "MMLU")}
    gsm = ScriptedLM(tok, "It is 18.\n#### 18")
    out["GSM8K"] = run_chat_eval("GSM8K", gsm, tok, Engine(gsm, tok), num_samples=2, max_new_tokens=32)
    bee = ScriptedLM(tok, "#### 1")
    out["SpellingBee"] = run_chat_eval("SpellingBee", bee, tok, Engine(bee, tok), max_new_tokens=8, max_problems=25)
    return out


def run(out_path):
    from nanochat_nb.common import compute_init, compute_cleanup
    _, rank, _, world_size, _ = compute_init("cpu")
    try:
        out = evaluate_all()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({**out, "world_size": world_size}, f)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run(sys.argv[1])
