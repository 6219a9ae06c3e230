"""SFT throughput next to pretraining at the same shapes, the share of padding in SFT rows, and chat_eval speed.

    python bench/sft.py [--depth 4] [--seq 256] [--rows 16] [--steps 6]

Everything is built in a temporary base dir: a small BPE tokenizer, a random model, and Hub-schema task data
(GSM8K-style problems, spelling, MC questions) written as offline stand-ins. Prints tokens/s of a training step on
packed pretraining-like rows (random tokens) and on SFT rows from the real loader, the padding share, and problems/s
of a categorical (MMLU-format) and a generative (SpellingBee) evaluation.
"""
import argparse, os, random, statistics, tempfile, time

os.environ.setdefault("OMP_NUM_THREADS", "1")
p = argparse.ArgumentParser()
p.add_argument("--depth", type=int, default=4)
p.add_argument("--seq", type=int, default=256)
p.add_argument("--rows", type=int, default=16)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--vocab", type=int, default=2048)
args = p.parse_args()
base = tempfile.mkdtemp(prefix="bench_sft_")
os.environ["NANOCHAT_BASE_DIR"] = base
os.environ["NANOCHAT_TASK_DATA"] = "offline"

import torch
from nanochat_nb.common import COMPUTE_DTYPE
from nanochat_nb.tokenizer import RustBPETokenizer
from nanochat_nb.gpt import build_model_meta
from nanochat_nb.task_data import write_offline_split
from nanochat_nb.synthetic import generate_gsm8k_style, generate_identity_conversations
from nanochat_nb import tasks
from nanochat_nb.chat_sft import sft_data_generator
from nanochat_nb.chat_eval import run_categorical_eval, run_generative_eval
from nanochat_nb.engine import Engine

rng = random.Random(0)
words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10))) for _ in range(3000)})
gsm = generate_gsm8k_style(2000, seed=0)
text = [r["question"] + " " + r["answer"] for r in gsm] + [" ".join(words)]
tok = RustBPETokenizer.train_from_iterator(iter(text), args.vocab)
tok.save(os.path.join(base, "tokenizer"))
root = os.path.join(base, "task_data", "offline"); os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "words_alpha.txt"), "w") as f: f.write("\n".join(words) + "\n")
write_offline_split("openai/gsm8k", "main", "train", gsm, "bench", "-")
mmlu = [{"question": f"What is {a} times {b}?", "subject": "bench", "choices": [str(a * b + k) for k in (0, 1, 2, 3)], "answer": 0}
        for a, b in [(rng.randint(2, 99), rng.randint(2, 99)) for _ in range(400)]]
write_offline_split("cais/mmlu", "all", "test", mmlu, "bench", "-")
talk = [{"messages": c, "source": "identity"} for c in generate_identity_conversations(1000)]
mixture = tasks.TaskMixture([tasks.GSM8K("main", "train"), tasks.SimpleSpelling(size=4000), tasks.SpellingBee(size=2000),
                             tasks.CustomJSON(os.path.join(root, "none.jsonl"))] + [tasks.MMLU("all", "test")] * 3)

model = build_model_meta(args.depth, vocab_size=tok.get_vocab_size(), max_seq_len=args.seq, head_dim=64, window_pattern="L")
model.to_empty(device="cpu"); model.init_weights()
opt = model.setup_optimizer()
B, T = args.rows, args.seq

def step(x, y):
    loss = model(x, y); loss.backward(); opt.step(); model.zero_grad(set_to_none=True)

def timed(batches):
    times = []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter(); step(x, y); times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first step warms up

print(f"CPU threads {torch.get_num_threads()} | COMPUTE_DTYPE {COMPUTE_DTYPE} | d{args.depth}, {B} rows x {T} tokens, vocab {tok.get_vocab_size()}")
random_batches = [(torch.randint(0, tok.get_vocab_size(), (B, T), dtype=torch.int32), torch.randint(0, tok.get_vocab_size(), (B, T))) for _ in range(args.steps)]
gen = sft_data_generator(tok, mixture, B, T)
t0 = time.perf_counter(); sft_batches = [next(gen)[:2] for _ in range(args.steps)]; load_s = (time.perf_counter() - t0) / args.steps
pretrain_dt, sft_dt = [], []
for _ in range(2):  # interleave the two, so load changes on the machine hit both
    pretrain_dt.append(timed(random_batches)); sft_dt.append(timed(sft_batches))
pre, sft = min(pretrain_dt), min(sft_dt)
bos = tok.get_bos_token_id()
pad = sum(int(((x == bos).sum() - (x[:, :1] == bos).sum())) for x, _ in sft_batches) / (args.steps * B * T)
trained = sum(int((y != -1).sum()) for _, y in sft_batches) / (args.steps * B * T)
print(f"pretraining-shaped step : {B * T / pre:9,.0f} tok/s  ({pre * 1000:.0f} ms)")
print(f"SFT step (real rows)    : {B * T / sft:9,.0f} tok/s  ({sft * 1000:.0f} ms)   ratio SFT/pretrain {pre / sft:.2f}")
print(f"SFT loader              : {load_s * 1000:9.1f} ms per batch ({B * T / load_s:,.0f} tok/s), {100 * load_s / sft:.1f}% of a step")
print(f"SFT rows: {100 * pad:.1f}% BOS padding (approx.: BOS tokens beyond each row's first), {100 * trained:.1f}% of positions trained")

model.eval()
engine = Engine(model, tok)
n = 200
t0 = time.perf_counter(); run_categorical_eval(tasks.MMLU("all", "test"), tok, model, batch_size=8, max_problems=n); cat_s = time.perf_counter() - t0
bee = tasks.SpellingBee(size=16, split="test")
t0 = time.perf_counter(); run_generative_eval(bee, tok, model, engine, 1, 64, 0.0, 50); gen_s = time.perf_counter() - t0
print(f"chat_eval categorical (MMLU-format, batch 8): {n / cat_s:7.1f} problems/s")
print(f"chat_eval generative  (SpellingBee, 64 new tokens, greedy): {len(bee) / gen_s:7.2f} problems/s")
