"""chat_sft: the BOS best-fit-with-padding loader (whole conversations, BOS padding, rank striding, epochs, exact
resume, the upstream-590 case), inheritance from the base checkpoint, the optimizer warm start (and its refusal across
world sizes), an end-to-end run that learns and saves, exact resume of an interrupted run, and 2 ranks under torchrun."""
import json
import os
import random
from dataclasses import asdict

import pytest
import torch

from nanochat_nb import chat_sft
from nanochat_nb.chat_sft import sft_data_generator
from nanochat_nb.task_data import write_offline_split
from tests.conftest import run_torchrun
from tests.test_chat_cli import save_byte_tokenizer


def _byte_tok():
    from nanochat_nb.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(["hello"] * 4), 265)


def _conv(u, a): return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def test_loader_packs_whole_conversations_and_pads_with_bos():
    tok = _byte_tok()
    rng = random.Random(0)
    convs = [_conv("q" * rng.randint(1, 12), "a" * rng.randint(1, 20)) for _ in range(60)]
    rendered = [tok.render_conversation(c)[0] for c in convs]
    T, B = 64, 3
    gen = sft_data_generator(tok, convs, batch_size=B, max_seq_len=T, buffer_size=10)
    bos = tok.get_bos_token_id()
    seen = []
    for _ in range(6):
        x, y, state = next(gen)
        assert x.shape == (B, T) and x.dtype == torch.int32 and y.dtype == torch.int64
        for r in range(B):
            row = x[r].tolist() + [y[r, -1].item() if y[r, -1] >= 0 else bos]
            # split the row at BOS: every piece is one whole rendered conversation (nothing cropped), or padding
            starts = [i for i, t in enumerate(row) if t == bos]
            pieces = [row[s:e] for s, e in zip(starts, starts[1:] + [len(row)])]
            content = [p for p in pieces if len(p) > 1]
            for p in content:
                assert p in rendered
                seen.append(rendered.index(p))
            pad_start = sum(len(p) for p in content)
            assert all(t == bos for t in row[pad_start:])
            if pad_start < T + 1: assert (y[r, pad_start - 1:] == -1).all()  # no target on (or predicting) padding
            assert (y[r] != -1).any()
    assert len(seen) >= 30  # rows really are packed with several conversations


def naive_sft_batches(tok, convs, B, T, rank=0, world=1, buffer_size=100, num_batches=5):
    "An independent, plain-list re-implementation of the packing rules of fact sheet 14.1 (+ the crop/skip fix)."
    cap, bos, out = T + 1, tok.get_bos_token_id(), []
    cursor, buf = rank, []
    def take():
        nonlocal cursor
        while True:
            ids, mask = tok.render_conversation(convs[cursor], max_tokens=10**9)
            cursor = (cursor + world) % len(convs)
            ids, mask = ids[:cap], mask[:cap]
            if 1 in mask[1:]: return ids, mask
    for _ in range(num_batches):
        xs, ys = [], []
        for _ in range(B):
            row, rmask = [], []
            while True:
                while len(buf) < buffer_size: buf.append(take())
                fits = [i for i, (ids, _) in enumerate(buf) if len(ids) <= cap - len(row)]
                if not fits: break
                best = fits[0]
                for i in fits:
                    if len(buf[i][0]) > len(buf[best][0]): best = i
                ids, mask = buf.pop(best)
                row, rmask = row + ids, rmask + mask
            n = len(row)
            row, rmask = row + [bos] * (cap - n), rmask + [0] * (cap - n)
            y = [t if m else -1 for t, m in zip(row[1:], rmask[1:])]
            if n < cap: y[n - 1:] = [-1] * (cap - n)
            xs.append(row[:-1]); ys.append(y)
        out.append((xs, ys))
    return out


@pytest.mark.parametrize("rank,world,buffer_size", [(0, 1, 100), (1, 2, 7), (0, 3, 1)])
def test_loader_equals_a_naive_implementation(rank, world, buffer_size):
    tok = _byte_tok()
    rng = random.Random(rank + world)
    convs = [_conv("q" * rng.randint(1, 30), "a" * rng.choice([1, 5, 20, 80])) for _ in range(120)]  # some oversized
    convs += [_conv("q" * 90, "a")] * 5  # nothing to learn within a row: skipped
    rng.shuffle(convs)
    gen = sft_data_generator(tok, convs, batch_size=3, max_seq_len=48, rank=rank, world_size=world, buffer_size=buffer_size)
    for xs, ys in naive_sft_batches(tok, convs, 3, 48, rank, world, buffer_size, num_batches=8):
        x, y, _ = next(gen)
        assert x.tolist() == xs and y.tolist() == ys


def test_loader_targets_follow_the_mask():
    tok = _byte_tok()
    conv = _conv("hello", "world")
    ids, mask = tok.render_conversation(conv)
    x, y, _ = next(sft_data_generator(tok, [conv], batch_size=1, max_seq_len=len(ids) - 1, buffer_size=1))
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def test_loader_never_deadlocks_on_long_conversations():
    "Upstream issue 590: at short context, conversations longer than a row filled the buffer and every target was -1."
    tok = _byte_tok()
    convs = [_conv("q", "a" * 300) for _ in range(150)] + [_conv("q" * 300, "a") for _ in range(50)] + [_conv("q", "a")]
    random.Random(0).shuffle(convs)
    gen = sft_data_generator(tok, convs, batch_size=2, max_seq_len=32, buffer_size=100)
    for _ in range(20):
        x, y, state = next(gen)
        assert (y != -1).sum(dim=1).min() > 0  # every row, so every batch, trains on something
    assert state["cropped"] > 0 and state["skipped"] > 0


def test_loader_rank_striding_epochs_and_resume():
    tok = _byte_tok()
    convs = [_conv(f"q{i}", "a" * (i % 7 + 1)) for i in range(40)]
    # ranks read disjoint, complementary slices
    firsts = []
    for rank in range(2):
        gen = sft_data_generator(tok, convs, batch_size=1, max_seq_len=200, rank=rank, world_size=2, buffer_size=4)
        x, _, st = next(gen)
        firsts.append(st["cursor"] % 2)
        text = tok.decode(x[0].tolist())
        assert all(f"q{i}<" in text.replace("<|user_end|>", "<") for i in range(rank, 8, 2) if f"q{i}<" in text.replace("<|user_end|>", "<"))
    assert firsts == [0, 1]
    # epochs count, consumption passes the dataset size after one pass
    gen = sft_data_generator(tok, convs, batch_size=2, max_seq_len=200, buffer_size=5)
    states = [next(gen)[2] for _ in range(12)]
    assert states[-1]["epoch"] >= 2 and any(s["consumed"] >= len(convs) for s in states)
    # resume from a state gives the identical stream
    gen = sft_data_generator(tok, convs, batch_size=2, max_seq_len=100, buffer_size=5)
    batches = [next(gen) for _ in range(6)]
    resumed = sft_data_generator(tok, convs, batch_size=2, max_seq_len=100, buffer_size=5, state=batches[2][2])
    for want in batches[3:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="empty"):
        next(sft_data_generator(tok, [], batch_size=1, max_seq_len=8))


def test_lr_schedule_and_momentum():
    f = chat_sft.get_lr_multiplier
    assert [f(p) for p in (0.0, 0.5)] == [1.0, 1.0] and f(1.0) == 0.0 and abs(f(0.75) - 0.5) < 1e-12
    assert abs(f(0.75, final_lr_frac=0.2) - 0.6) < 1e-12 and abs(f(0.05, warmup_ratio=0.1) - 0.5) < 1e-6
    assert chat_sft.get_muon_momentum(0) == 0.85 and chat_sft.get_muon_momentum(300) == 0.95
    assert abs(chat_sft.get_muon_momentum(150) - 0.90) < 1e-12


# --- end to end on a tiny base model ------------------------------------------------------------------------------
def _save_base(base_dir, world_size=1, tag="d2", step=5):
    "A tiny base checkpoint with meta as base_train writes it and an optimizer shard per rank after one real step."
    from nanochat_nb.checkpoint_manager import save_checkpoint
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    with torch.device("meta"): model = GPT(config)
    model.to_empty(device="cpu"); model.init_weights()
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    x = torch.randint(0, 256, (2, 32)); model(x, x).backward(); opt.step(); model.zero_grad()
    user_config = {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02, "depth": 2}
    d = os.path.join(base_dir, "base_checkpoints", tag)
    for rank in range(world_size):
        save_checkpoint(d, step, model.state_dict(), opt.state_dict(),
                        {"step": step, "model_config": asdict(config), "user_config": user_config, "max_seq_len": 64,
                         "device_batch_size": 2, "total_batch_size": 128}, rank=rank)
    return model


@pytest.fixture
def sft_env(base_dir):
    save_byte_tokenizer(str(base_dir))
    from nanochat_nb.tokenizer import get_tokenizer, compute_token_bytes
    torch.save(compute_token_bytes(get_tokenizer()), os.path.join(base_dir, "tokenizer", "token_bytes.pt"))
    _save_base(str(base_dir))
    rng = random.Random(0)
    talk = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}], "source": "t"}
            for w in ("sky", "blue", "tree", "cat", "dog", "sun", "moon", "hi")]
    write_offline_split("HuggingFaceTB/smol-smoltalk", "default", "train", talk * 5, "t", "t")
    write_offline_split("HuggingFaceTB/smol-smoltalk", "default", "test", talk[:4], "t", "t")
    mmlu = [{"question": f"{a}+{b}?", "subject": "math", "choices": [str(a + b + k) for k in range(4)], "answer": 0}
            for a, b in [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(20)]]
    write_offline_split("cais/mmlu", "all", "auxiliary_train", mmlu, "t", "t")
    write_offline_split("cais/mmlu", "all", "test", mmlu[:5], "t", "t")
    gsm = [{"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
           for a, b in [(rng.randint(0, 50), rng.randint(0, 50)) for _ in range(20)]]
    write_offline_split("openai/gsm8k", "main", "train", gsm, "t", "t")
    write_offline_split("openai/gsm8k", "main", "test", gsm[:5], "t", "t")
    root = os.path.join(base_dir, "task_data", "offline")
    with open(os.path.join(root, "words_alpha.txt"), "w") as f: f.write("apple\nbanana\ncat\n")
    with open(os.path.join(root, "identity_conversations.jsonl"), "w") as f:
        f.write(json.dumps([{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "nanochat_nb"}]) + "\n")
    return base_dir


FLAGS = ["--eval-tokens=256", "--chatcore-every=-1", "--mmlu-epochs=1", "--gsm8k-epochs=1"]


def test_sft_inherits_learns_and_saves(sft_env, capsys):
    out = chat_sft.main(["--num-iterations=12", "--eval-every=6", "--matrix-lr=0.03", "--init-lr-frac=1.0", *FLAGS])
    log = capsys.readouterr().out
    assert "max_seq_len: 64 (inherited from base)" in log and "device_batch_size: 2 (inherited from base)" in log
    assert "matrix_lr: 0.03 (overridden; base had 0.02)" in log and "embedding_lr: 0.3 (inherited from base)" in log
    assert "optimizer warm-started" in log
    # base_train's rule: 12 steps of a tiny model win neither compile back
    assert "torch.compile: model off, optimizer step off (auto on CPU in" in log and "this run has 12 steps" in log
    assert out["step"] == 12 and sorted(out["val_bpbs"]) == [0, 6, 12] and out["grad_accum_steps"] == 1
    losses = [out["train_losses"][k] for k in sorted(out["train_losses"])]
    assert max(losses[-3:]) < 0.7 * losses[0]  # it learns the mixture (val bpb is a different mix: no claim on it here)
    d = os.path.join(sft_env, "chatsft_checkpoints", "d2")
    meta = json.load(open(os.path.join(d, "meta_000012.json")))
    assert meta["user_config"]["max_seq_len"] == 64 and meta["base_checkpoint"] == {"tag": "d2", "step": 5}
    from nanochat_nb.checkpoint_manager import load_model
    model, _, _ = load_model("sft", "cpu", phase="eval")
    assert model.config.n_layer == 2


def test_sft_resume_is_exact(sft_env):
    args = ["--num-iterations=8", "--eval-every=-1", "--save-every=4", *FLAGS]
    first = chat_sft.main(args)
    d = os.path.join(sft_env, "chatsft_checkpoints", "d2")
    full = torch.load(os.path.join(d, "model_000008.pt"))
    os.remove(os.path.join(d, "model_000008.pt"))
    out = chat_sft.main(args + ["--resume-from-step=4"])
    assert out["step"] == 8 and out["train_losses"] == first["train_losses"]  # the identical loss sequence, 1..8
    resumed = torch.load(os.path.join(d, "model_000008.pt"))
    for k in full: assert torch.equal(full[k], resumed[k]), k


def test_warm_start_refuses_mismatched_world_size(tmp_path):
    model = _save_base(str(tmp_path), world_size=2)
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    before = [g["lr"] for g in opt.param_groups]
    d = os.path.join(tmp_path, "base_checkpoints", "d2")
    msg = chat_sft.warm_start_optimizer(opt, d, 5, rank=0, world_size=1, device="cpu")
    assert "starts FRESH" in msg and "2 shard(s)" in msg and len(opt.state) == 0
    msg = chat_sft.warm_start_optimizer(opt, d, 5, rank=0, world_size=2, device="cpu")
    assert "warm-started" in msg and len(opt.state) > 0 and [g["lr"] for g in opt.param_groups] == before


def test_sft_two_ranks_under_torchrun(sft_env):
    proc = run_torchrun(["-m", "nanochat_nb.chat_sft", "--num-iterations=3", "--eval-every=3", "--total-batch-size=256",
                         *FLAGS], nproc=2, env={"NANOCHAT_BASE_DIR": str(sft_env)})
    assert "starts FRESH" in proc.stdout  # the base optimizer was saved by one rank
    assert os.path.exists(os.path.join(sft_env, "chatsft_checkpoints", "d2", "model_000003.pt"))
    assert "Validation bpb" in proc.stdout


def test_two_ranks_equal_one_process_accumulating(sft_env):
    "2 gloo ranks x 1 micro-batch == one process accumulating the same two per-rank micro-batches."
    steps = 2
    run_torchrun(["-m", "nanochat_nb.chat_sft", f"--num-iterations={steps}", "--eval-every=-1", "--total-batch-size=256",
                  "--load-optimizer=0", *FLAGS], nproc=2, env={"NANOCHAT_BASE_DIR": str(sft_env)})
    ddp = torch.load(os.path.join(sft_env, "chatsft_checkpoints", "d2", f"model_{steps:06d}.pt"))
    from nanochat_nb.checkpoint_manager import load_model
    from nanochat_nb.tokenizer import get_tokenizer
    model, tok, _ = load_model("base", "cpu", phase="train")
    opt = model.setup_optimizer(unembedding_lr=0.004, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.0)
    for g in opt.param_groups: g["lr"] *= 0.8; g["initial_lr"] = g["lr"]
    mix = chat_sft.build_train_mixture(1, 1)
    loaders = [sft_data_generator(tok, mix, 2, 64, rank=r, world_size=2) for r in range(2)]
    for step in range(steps):
        for loader in loaders:
            x, y, _ = next(loader)
            (model(x, y) / 2).backward()
        chat_sft.set_schedules(opt, chat_sft.get_lr_multiplier(step / steps), muon_momentum=chat_sft.get_muon_momentum(step))
        opt.step(); model.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=2e-5, rtol=1e-4), k


WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "red", "sky", "tree", "fish", "bird", "milk", "rain",
         "moon", "star", "leaf", "ship", "door", "lamp", "ring", "bell", "rose", "wolf", "bear", "frog", "goat", "duck", "lion",
         "kite", "cake", "salt", "corn", "rice", "soup", "boat", "road", "hill", "lake", "wind", "snow", "fire", "gold", "iron",
         "sand", "rock", "wood", "silk", "wool"]


def test_sft_teaches_spelling_measured_by_chat_eval(sft_env, monkeypatch):
    "A real behaviour check: after SFT on SimpleSpelling over 50 words the model spells them (chance is ~0)."
    from nanochat_nb import tasks as T
    from nanochat_nb.chat_eval import run_generative_eval
    from nanochat_nb.checkpoint_manager import load_model
    from nanochat_nb.engine import Engine
    with open(os.path.join(sft_env, "task_data", "offline", "words_alpha.txt"), "w") as f: f.write("\n".join(WORDS) + "\n")
    model, tok, _ = load_model("base", "cpu", phase="eval")
    task = T.SimpleSpelling(size=50, split="test")
    before = run_generative_eval(task, tok, model, Engine(model, tok), 1, 24, 0.0, 50)
    monkeypatch.setattr(chat_sft, "build_train_mixture", lambda *a: T.TaskMixture([T.SimpleSpelling(size=5000)]))
    chat_sft.main(["--num-iterations=300", "--eval-every=-1", "--init-lr-frac=1.0", *FLAGS])
    model, tok, _ = load_model("sft", "cpu", phase="eval")
    after = run_generative_eval(task, tok, model, Engine(model, tok), 1, 24, 0.0, 50)
    assert before == 0.0 and after >= 0.6, (before, after)


def test_sft_runs_chatcore_and_logs_the_report(sft_env):
    "ChatCORE during SFT: the six tasks through chat_eval with the limits, the centred mean, all in the meta and report."
    from tests.test_tasks import ARC_ROWS, HUMANEVAL_ROWS
    for subset in ("ARC-Easy", "ARC-Challenge"): write_offline_split("allenai/ai2_arc", subset, "test", ARC_ROWS, "t", "t")
    write_offline_split("openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, "t", "t")
    from nanochat_nb.report import get_report
    get_report().reset()
    out = chat_sft.main([*FLAGS, "--num-iterations=2", "--eval-every=-1", "--chatcore-every=2", "--chatcore-max-cat=2",
                         "--chatcore-max-sample=1"])  # after FLAGS, which turn ChatCORE off
    cc = out["chatcore"]
    assert set(cc) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE", "ChatCORE_cat"}
    from nanochat_nb.chat_eval import chatcore
    assert (cc["ChatCORE"], cc["ChatCORE_cat"]) == chatcore({k: v for k, v in cc.items() if not k.startswith("ChatCORE")})
    meta = json.load(open(os.path.join(sft_env, "chatsft_checkpoints", "d2", "meta_000002.json")))
    assert meta["chatcore"] == cc
    section = open(os.path.join(sft_env, "report", "chat-sft.md")).read()
    assert "ChatCORE" in section and "Number of iterations: 2" in section
