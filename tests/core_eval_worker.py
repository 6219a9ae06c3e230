"""Shared helpers for tests/test_core_eval.py, and a torchrun worker that evaluates CORE tasks on 1 or 2 ranks.

Usage (under torchrun): python -m torch.distributed.run --nproc_per_node=2 tests/core_eval_worker.py OUT.json BUNDLE_DIR
Rank 0 writes the accuracies of three scripted tasks (one per type) and the evaluate_core result to OUT.json.
"""
import json
import os
import random
import sys

import torch

V = 257  # 256 bytes + BOS


class CharTokenizer:
    "Byte-level tokenizer with nanochat's calling convention; id 256 is <|bos|>."
    bos = 256
    def get_bos_token_id(self): return self.bos
    def get_vocab_size(self): return V
    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list): return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        if prepend is not None: ids = [self.bos if prepend == "<|bos|>" else prepend] + ids
        if append is not None: ids = ids + [append]
        return ids
    __call__ = encode
    def decode(self, ids): return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BigramLM(torch.nn.Module):
    "Scripted model: the logits at position t are table[ids[t]]."
    def __init__(self, table): super().__init__(); self.register_buffer("table", table.float())
    def forward(self, idx, targets=None, loss_reduction='mean'):
        logits = self.table[idx]
        if targets is None: return logits
        return torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def random_bigram(seed=0):
    "A bigram model with random preferences over a small alphabet (so accuracies are neither 0 nor 1)."
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(V, V, generator=g) * 0.1
    letters = [ord(c) for c in "abcd "]
    table[:, letters] += torch.randn(V, len(letters), generator=g) * 3
    table[ord(":"), ord(" ")] += 10.0  # LM items: after the delimiter "\nA: " it writes " a", so continuation "a" is right
    table[ord(" "), ord("a")] += 10.0
    return BigramLM(table)


def random_words(rng, n, alphabet="abcd"):
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(n))


def scripted_tasks(n=23, seed=0):
    "{type: (task_meta, data)} with random items of each type (n is odd on purpose: ranks get unequal shares)."
    rng = random.Random(seed)
    mc = [{"query": random_words(rng, 3), "choices": [random_words(rng, 2) for _ in range(4)], "gold": rng.randrange(4)} for _ in range(n)]
    sc = []
    for _ in range(n):
        cont = random_words(rng, 2)
        sc.append({"context_options": [random_words(rng, 2) for _ in range(2)], "continuation": cont, "gold": rng.randrange(2)})
    lm = [{"context": random_words(rng, 3), "continuation": rng.choice(["a", "b", "d", "aa", " ab"]).strip()} for _ in range(n)]
    return {
        "multiple_choice": ({"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}, mc),
        "schema": ({"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "}, sc),
        "language_modeling": ({"task_type": "language_modeling", "num_fewshot": 3, "continuation_delimiter": "\nA: "}, lm),
    }


def write_bundle(root, tasks, offline=False):
    "Write core.yaml, eval_meta_data.csv and eval_data/<label>.jsonl from {label: (type, shots, delim, baseline, items)}."
    import yaml
    os.makedirs(os.path.join(root, "eval_data"), exist_ok=True)
    icl = []
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\n")
        for label, (tt, shots, delim, baseline, items) in tasks.items():
            f.write(f"{label},{baseline}\n")
            with open(os.path.join(root, "eval_data", f"{label}.jsonl"), "w") as g:
                g.writelines(json.dumps(it) + "\n" for it in items)
            icl.append({"label": label, "dataset_uri": f"{label}.jsonl", "num_fewshot": [shots], "icl_task_type": tt,
                        "continuation_delimiter": delim})
    with open(os.path.join(root, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": icl}, f)
    if offline:
        with open(os.path.join(root, "offline_bundle.json"), "w") as f:
            json.dump({"offline": True}, f)


def scripted_bundle(root, offline=False):
    "A 3-task bundle made of scripted_tasks(), baselines 25 / 50 / 0."
    tasks = scripted_tasks(n=17, seed=1)
    baselines = {"multiple_choice": 25, "schema": 50, "language_modeling": 0}
    write_bundle(root, {f"t_{k}": (k, meta["num_fewshot"], meta["continuation_delimiter"], baselines[k], data)
                        for k, (meta, data) in tasks.items()}, offline=offline)


def run(out_path, bundle_dir):
    from nanochat_nb.base_eval import evaluate_core
    from nanochat_nb.common import compute_cleanup, compute_init
    from nanochat_nb.core_eval import evaluate_task
    ddp, rank, local_rank, world_size, device = compute_init("cpu")
    model, tok = random_bigram(), CharTokenizer()
    out = {"world_size": world_size}
    for k, (meta, data) in scripted_tasks().items():
        out[k] = evaluate_task(model, tok, data, device, meta)
    core = evaluate_core(model, tok, device, max_per_task=-1, eval_bundle_dir=bundle_dir)
    out["core"] = {k: core[k] for k in ("results", "centered_results", "core_metric")}
    if rank == 0:
        with open(out_path, "w") as f: json.dump(out, f)
    compute_cleanup()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run(sys.argv[1], sys.argv[2])
