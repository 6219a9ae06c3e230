"""chat_rl: the policy-gradient loss against a direct computation, the batch of a rollout with a calculator call,
reproducible rollout seeds, a toy task whose reward RL visibly raises, two gloo ranks against one process, pass@k of
a scripted model against its closed form, resume equal to an uninterrupted run, and the missing-SFT message."""
import contextlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from tests.conftest import REPO, run_torchrun
from tests.test_chat_cli import save_byte_tokenizer, save_tiny_model

TOY_ANSWER = "7"


def _conv(question, answer):
    from nanochat_nb.tasks import gsm8k_parts
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": gsm8k_parts(answer)}]}


def write_gsm8k(train_rows, test_rows):
    from nanochat_nb.task_data import write_offline_split
    write_offline_split("openai/gsm8k", "main", "train", train_rows, "test", "test")
    write_offline_split("openai/gsm8k", "main", "test", test_rows, "test", "test")


def toy_rows(n, prefix="q"):
    "GSM8K-schema rows whose answer is always the same one-digit number."
    return [{"question": f"{prefix}{i}", "answer": f"#### {TOY_ANSWER}"} for i in range(n)]


def brief_sft(model, tok, steps=60, seed=0):
    "Teach the answer format `#### <digit>` with a uniformly random digit, so RL starts near reward 0.1."
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = [tok.render_conversation(_conv(f"q{rng.randrange(100)}", f"#### {rng.randrange(10)}")) for _ in range(16)]
        L = max(len(ids) for ids, _ in rows)
        x = torch.tensor([ids[:-1] + [0] * (L - len(ids)) for ids, _ in rows])
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (L - len(ids)) for ids, mask in rows])
        model(x, y).backward()
        opt.step(); opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    "A base dir with the byte tokenizer, a toy GSM8K and a briefly fine-tuned depth-2 model as the SFT checkpoint."
    from nanochat_nb.checkpoint_manager import save_checkpoint
    d = tmp_path_factory.mktemp("rl_prepared")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(d)
    try:
        save_byte_tokenizer(str(d))
        from nanochat_nb.tokenizer import get_tokenizer
        write_gsm8k(toy_rows(96), toy_rows(4, prefix="t"))
        model = save_tiny_model(str(d), "chatsft_checkpoints", "d2", 0, seed=0)
        brief_sft(model, get_tokenizer())
        save_checkpoint(str(d / "chatsft_checkpoints" / "d2"), 1, model.state_dict(), None,
                        {"step": 1, "model_config": asdict(model.config)})
    finally:
        if old is None: os.environ.pop("NANOCHAT_BASE_DIR", None)
        else: os.environ["NANOCHAT_BASE_DIR"] = old
    return d


@pytest.fixture
def rl_base(prepared, base_dir):
    shutil.copytree(prepared, base_dir, dirs_exist_ok=True)
    return base_dir


def run_main(argv):
    "chat_rl.main in this process; returns (result, stdout)."
    from nanochat_nb.chat_rl import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(["--device-type=cpu", *argv])
    return result, out.getvalue()


SMALL = ["--device-batch-size=8", "--max-new-tokens=8", "--eval-examples=4"]


def tiny_random_gpt(seed=0, vocab=40):
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L"))
    m.to_empty(device="cpu"); m.init_weights()
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.1)  # the zero-initialised output layers too
    return m


# --- the loss ---------------------------------------------------------------------------------------------------
def test_loss_advantages_and_normalisation_match_a_direct_computation():
    from nanochat_nb.chat_rl import make_batch, train_on_example
    model = tiny_random_gpt()
    g = torch.Generator().manual_seed(1)
    examples_per_rank, B = 2, 3  # 2 questions of 6 samples each, 3 rows per pass -> 2 passes per question
    questions = []
    for q in range(examples_per_rank):
        seqs, masks, rewards = [], [], []
        for b in range(6):
            n = int(torch.randint(2, 9, (1,), generator=g))
            seqs.append([1, 2, 3] + torch.randint(4, 40, (n,), generator=g).tolist())
            masks.append([0, 0, 0] + [int(m) for m in (torch.rand(n, generator=g) > 0.2)])
            rewards.append(float(torch.rand(1, generator=g) > 0.5))
        questions.append((seqs, masks, rewards))
    # the direct computation: every (row, position) whose next token was sampled, its log-probability weighted by
    # the row's reward minus the question's mean reward, each pass divided by its count of such positions
    expected_objective = 0.0
    for seqs, masks, rewards in questions:
        mean_r = sum(rewards) / len(rewards)
        for p in range(2):
            terms = []
            for b in range(p * B, (p + 1) * B):
                logprobs = torch.log_softmax(model(torch.tensor([seqs[b][:-1]])).float()[0], dim=-1)
                for t in range(len(seqs[b]) - 1):
                    if masks[b][t + 1] == 1:
                        terms.append(logprobs[t, seqs[b][t + 1]] * (rewards[b] - mean_r))
            expected_objective = expected_objective + sum(terms) / (max(len(terms), 1) * 2 * examples_per_rank)
    (-expected_objective).backward()  # the loss is minus the objective
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total_loss = 0.0
    for seqs, masks, rewards in questions:
        inputs, targets, r, adv = make_batch(seqs, masks, rewards, pad_token=0)
        assert torch.allclose(adv, torch.tensor(rewards) - sum(rewards) / len(rewards))
        total_loss += sum(l.item() for l in train_on_example(model, inputs, targets, adv, B, examples_per_rank))
    assert abs(total_loss - (-expected_objective.item())) < 1e-5
    assert expected_grads and all(torch.allclose(p.grad, expected_grads[n], atol=1e-6)
                                  for n, p in model.named_parameters() if n in expected_grads)
    # a pass whose rows have nothing to train on contributes zero, divided by 1 (no nan)
    inputs, targets, _, adv = make_batch([[1, 2, 3]] * 3, [[0, 0, 0]] * 3, [1.0, 0.0, 0.0], pad_token=0)
    assert train_on_example(model, inputs, targets, adv, 3, 1)[0].item() == 0.0
    with pytest.raises(ValueError, match="device-batch-size"):
        train_on_example(model, inputs, targets, adv, 2, 1)


# --- a scripted stand-in for the model, to drive the real Engine -----------------------------------------------
class ScriptedModel(torch.nn.Module):
    "Row i emits `scripts_for(prompt)[i]` token by token with certainty, whatever it is fed."
    def __init__(self, scripts_for, vocab_size=265):
        super().__init__()
        from nanochat_nb.gpt import GPTConfig
        self.scripts_for = scripts_for
        self.config = GPTConfig(sequence_len=1024, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=4)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
    def get_device(self): return self.anchor.device
    def forward(self, ids, kv_cache=None, last_only=False):
        B, T = ids.shape
        if T > 1:
            self.scripts, self.pos = self.scripts_for(ids[0].tolist()), 0
            nxt = [self.scripts[0][0]]  # the Engine samples every row's first token from the prompt's logits
        else:
            self.pos += 1
            nxt = [s[min(self.pos, len(s) - 1)] for s in self.scripts]
        logits = torch.full((len(nxt), T, self.config.vocab_size), -1e4)
        logits[torch.arange(len(nxt)), -1, torch.tensor(nxt)] = 1e4
        return logits[:, -1:] if last_only else logits


def test_batch_of_a_rollout_with_a_calculator_call(base_dir):
    from nanochat_nb.chat_rl import rollout_batch
    from nanochat_nb.engine import Engine
    from nanochat_nb.tasks import GSM8K
    from nanochat_nb.tokenizer import get_tokenizer
    save_byte_tokenizer(str(base_dir))
    robe = {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
            "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3"}
    write_gsm8k([robe], [robe])
    tok = get_tokenizer()
    sp, enc = tok.encode_special, tok.encode
    end = sp("<|assistant_end|>")
    call = [sp("<|python_start|>"), *enc("2+1"), sp("<|python_end|>")]
    placeholder = enc("?")
    rows = [enc("It is ") + call + placeholder * 3 + enc(" so #### 3") + [end],  # the calculator fills the 3 '?'
            enc("I think #### 4") + [end],                                      # wrong
            enc("I") + [end],                                                   # stops at once
            enc("I#### 3") + [end]]                                             # right, short
    engine = Engine(ScriptedModel(lambda prompt: rows), tok)
    task = GSM8K("main", "train")
    seqs, inputs, targets, rewards, advantages = rollout_batch(engine, tok, task, 0, step=0, device="cpu", num_samples=4,
                                                               device_batch_size=4, max_new_tokens=64)
    prompt = tok.render_for_completion(task[0])
    P = len(prompt)
    forced = [sp("<|output_start|>"), *enc("3"), sp("<|output_end|>")]  # str(eval("2+1")) == "3"
    generated = [enc("It is ") + call + forced + enc(" so #### 3"), enc("I think #### 4"), enc("I"), enc("I#### 3")]
    assert seqs == [prompt + g for g in generated]  # the forced output is in, the end token is not
    assert rewards.tolist() == [1.0, 0.0, 0.0, 1.0] and advantages.tolist() == [0.5, -0.5, -0.5, 0.5]
    L = max(len(s) for s in seqs)
    assert inputs.shape == targets.shape == (4, L - 1)
    forced_at = set(range(P + len(enc("It is ")) + len(call), P + len(enc("It is ")) + len(call) + len(forced)))
    for b, seq in enumerate(seqs):
        padded = seq + [end] * (L - len(seq))
        assert inputs[b].tolist() == padded[:-1]  # right padding with <|assistant_end|>
        for t in range(L - 1):
            trained = P <= t + 1 < len(seq) and not (b == 0 and t + 1 in forced_at)
            assert targets[b, t].item() == (padded[t + 1] if trained else -1), (b, t)
    # the tool call itself is trained, its output is not
    call_start = P + len(enc("It is "))
    assert targets[0, call_start - 1:call_start - 1 + len(call)].tolist() == call
    assert (targets[0, min(forced_at) - 1:max(forced_at)] == -1).all()


# --- seeds --------------------------------------------------------------------------------------------------
def test_rollout_seeds_are_reproducible_and_differ_across_steps(base_dir):
    from nanochat_nb.chat_rl import sample_rollouts
    from nanochat_nb.engine import Engine
    from nanochat_nb.tasks import GSM8K
    from nanochat_nb.tokenizer import get_tokenizer
    save_byte_tokenizer(str(base_dir))
    write_gsm8k(toy_rows(8), toy_rows(1))
    tok, task = get_tokenizer(), GSM8K("main", "train")
    model = save_tiny_model(str(base_dir), "chatsft_checkpoints", "d2", 0, seed=5)  # random: every sample differs
    seeds = []
    class Recording(Engine):
        def generate_batch(self, tokens, num_samples=1, **kw):
            seeds.append(kw["seed"]); return super().generate_batch(tokens, num_samples, **kw)
    engine = Recording(model, tok)
    kw = dict(num_samples=6, device_batch_size=3, max_new_tokens=12)
    a = sample_rollouts(engine, tok, task, 3, 0, **kw)
    b = sample_rollouts(engine, tok, task, 3, 0, **kw)
    c = sample_rollouts(engine, tok, task, 3, 1, **kw)
    assert seeds[:2] == [hash((0, 3, 0)) & 0x7FFFFFFF, hash((0, 3, 1)) & 0x7FFFFFFF] and seeds[:2] == seeds[2:4]
    assert seeds[4:] == [hash((1, 3, 0)) & 0x7FFFFFFF, hash((1, 3, 1)) & 0x7FFFFFFF]
    assert a[0] == b[0] and a[1] == b[1]  # same step, same question: the same samples
    assert a[0] != c[0]                   # the next step draws new ones
    assert a[0][:3] != a[0][3:]           # and the two generate_batch calls of one question differ
    assert len(a[0]) == 6 and all(s[:a[3]] == tok.render_for_completion(task[3]) for s in a[0])
    # a different PYTHONHASHSEED gives the same seeds (ints hash to themselves)
    code = "print(hash((0, 3, 1)) & 0x7FFFFFFF)"
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": s}, capture_output=True,
                           text=True).stdout.strip() for s in ("1", "2")}
    assert outs == {str(seeds[1])}


# --- learning ---------------------------------------------------------------------------------------------------
def test_mean_reward_rises_on_a_learnable_task(rl_base):
    # 96 questions whose answer is always 7, from a model that answers a uniformly random digit: 24 steps, default LRs
    result, out = run_main([*SMALL, "--num-samples=8", "--examples-per-step=4", "--eval-every=12", "--save-every=-1",
                            "--resume"])
    assert "--resume: no RL checkpoint" in out and "Calculated number of steps: 24" in out
    rewards = [result["curves"]["reward"][s] for s in range(24)]
    start, end = rewards[0], sum(rewards[-4:]) / 4  # step 0 measures the SFT model itself
    assert start < 0.35 and end > start + 0.5, str(rewards)
    assert set(result["curves"]["pass@1"]) == {0, 12} and re.search(r"Step 12 \| Pass@1: [\d.]+, Pass@2", out)
    d = result["checkpoint_dir"]
    assert d == os.path.join(str(rl_base), "chatrl_checkpoints", "d2")
    assert sorted(os.listdir(d)) == ["meta_000023.json", "model_000023.pt", "optim_000023_rank0.pt"]  # only the last step
    from nanochat_nb.checkpoint_manager import load_model
    model, _, meta = load_model("rl", "cpu", phase="eval")  # the RL checkpoint loads like any other
    assert meta["model_config"]["n_layer"] == 2 and meta["step"] == 23 and meta["world_size"] == 1
    try:
        import nanochat_nb.report  # written by another chapter; chat_rl reports only when it is there
    except ImportError:
        return
    text = (rl_base / "report" / "chat-rl.md").read_text()
    assert "examples_per_step" in text and "Final mean reward" in text
    assert (rl_base / "report" / "chat-rl.curves.png").exists()


# --- two ranks ----------------------------------------------------------------------------------------------------
def _numbers(out, pattern):
    return [tuple(float(x) for x in m) for m in re.findall(pattern, out)]


def test_two_ranks_give_the_same_update_as_one_process(prepared, tmp_path, monkeypatch):
    dirs = {}
    for name in ("two", "one"):  # "one" last: this process then runs in it
        d = dirs[name] = tmp_path / name
        shutil.copytree(prepared, d)
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
        write_gsm8k([{"question": f"q{i}", "answer": f"#### {i + 3}"} for i in range(4)], toy_rows(4, prefix="t"))
    # 2 questions per step (1 per rank), 16 samples each in 2 passes of 8: 2 steps, pass@k at both
    flags = [*SMALL, "--num-samples=16", "--examples-per-step=2", "--eval-every=1", "--init-lr-frac=0.5"]
    proc = run_torchrun(["-m", "nanochat_nb.chat_rl", "--device-type=cpu", *flags],
                        env={"NANOCHAT_BASE_DIR": str(dirs["two"]), "NANOCHAT_DTYPE": "float32"})
    _, out = run_main(flags)
    reward_re = r"Step (\d+)/2 \| Average reward: ([\d.]+) \| Average sequence length: ([\d.]+)"
    passk_re = r"Step (\d) \| Pass@1: ([\d.]+), Pass@2: ([\d.]+)"
    one_r, two_r = _numbers(out, reward_re), _numbers(proc.stdout, reward_re)
    assert len(one_r) == 2 and len(two_r) == 2
    assert all(abs(x - y) < 1e-6 for a, b in zip(one_r, two_r) for x, y in zip(a, b))
    assert _numbers(out, passk_re) == _numbers(proc.stdout, passk_re) and len(_numbers(out, passk_re)) == 2
    assert 0 < sum(r[1] for r in one_r) < 2, "some but not all samples must be right for the update to mean anything"
    one, two = (torch.load(dirs[n] / "chatrl_checkpoints" / "d2" / "model_000001.pt") for n in ("one", "two"))
    sft = torch.load(prepared / "chatsft_checkpoints" / "d2" / "model_000001.pt")  # the starting point
    assert any(not torch.allclose(one[k], sft[k]) for k in one), "the two steps must have changed the model"
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-4), k
    assert (dirs["two"] / "chatrl_checkpoints" / "d2" / "optim_000001_rank1.pt").exists()


# --- pass@k -------------------------------------------------------------------------------------------------------
def test_pass_at_k_of_a_scripted_model_equals_its_closed_form(base_dir):
    from nanochat_nb.chat_rl import pass_at_k, run_gsm8k_eval
    from nanochat_nb.engine import Engine
    from nanochat_nb.tasks import GSM8K
    from nanochat_nb.tokenizer import get_tokenizer
    save_byte_tokenizer(str(base_dir))
    first_right = [0, 1, 3, None, 2, 0, None]  # problem p: samples before first_right[p] are wrong, the rest right
    write_gsm8k(toy_rows(1), [{"question": f"problem {p}", "answer": f"#### {p}"} for p in range(len(first_right))])
    tok, task = get_tokenizer(), GSM8K("main", "test")
    end = tok.encode_special("<|assistant_end|>")
    def scripts_for(prompt):
        p = int(re.search(r"problem (\d+)", tok.decode(prompt)).group(1))
        right = lambda j: first_right[p] is not None and j >= first_right[p]
        return [tok.encode(f"#### {p if right(j) else p + 1}") + [end] for j in range(4)]
    engine = Engine(ScriptedModel(scripts_for), tok)
    problem_of = lambda idx: int(re.search(r"problem (\d+)", task[idx]["messages"][0]["content"]).group(1))
    for max_examples in (None, 5):
        records = list(run_gsm8k_eval(task, tok, engine, max_examples=max_examples, num_samples=4, temperature=1.0))
        # ranks stride over the problems: together they cover the same ones, each once
        strided = [list(run_gsm8k_eval(task, tok, engine, r, 3, max_examples, num_samples=4)) for r in range(3)]
        assert sorted(rec["idx"] for s in strided for rec in s) == [rec["idx"] for rec in records]
        probs = [problem_of(rec["idx"]) for rec in records]
        assert len(probs) == (max_examples or len(first_right))
        closed = [sum(first_right[p] is not None and first_right[p] < k for p in probs) / len(probs) for k in range(1, 5)]
        assert pass_at_k(records, 4) == pytest.approx(closed)
    with pytest.raises(ValueError, match="zero test problems"):
        pass_at_k([], 4)


# --- resume ---------------------------------------------------------------------------------------------------------
def test_resume_continues_where_it_stopped(rl_base):
    write_gsm8k(toy_rows(6), toy_rows(2, prefix="t"))
    flags = [*SMALL, "--num-samples=8", "--examples-per-step=2", "--eval-every=2", "--save-every=1",
             "--init-lr-frac=0.5"]
    full, _ = run_main(flags)  # 3 steps; checkpoints after steps 1 and 2
    d = full["checkpoint_dir"]
    assert sorted(os.listdir(d)) == sorted(f"{k}_{s:06d}{e}" for s in (1, 2)
                                           for k, e in (("meta", ".json"), ("model", ".pt"), ("optim", "_rank0.pt")))
    final_model = torch.load(os.path.join(d, "model_000002.pt"))
    final_optim = torch.load(os.path.join(d, "optim_000002_rank0.pt"))
    for f in ("meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"):  # interrupted before the last save
        os.remove(os.path.join(d, f))
    resumed, out = run_main([*flags, "--resume"])
    assert "step 1: continuing at step 2 of 3" in out and resumed["start_step"] == 2
    assert re.findall(r"Step (\d+)/3 \| Average", out) == ["2"]  # only the missing step ran
    assert resumed["curves"] == full["curves"]  # the curves of the first run came back with the checkpoint
    model = torch.load(os.path.join(d, "model_000002.pt"))
    assert all(torch.equal(model[k], final_model[k]) for k in final_model)
    optim = torch.load(os.path.join(d, "optim_000002_rank0.pt"))
    assert all(torch.equal(a, b) for sa, sb in zip(optim["state"].values(), final_optim["state"].values())
               for a, b in zip(sa.values(), sb.values()) if torch.is_tensor(a))
    _, out = run_main([*flags, "--resume", "--num-samples=16"])
    assert "nothing left to train" in out and "Average reward" not in out
    assert "flags differ from the checkpoint's (saved, now): {'num_samples': (8, 16)}" in out
    # without --resume an existing run is not continued silently
    _, out = run_main([*flags, "--eval-every=-1", "--save-every=-1"])
    assert "already holds RL checkpoints (last step 2); starting over" in out


def _tensors_equal(a, b):
    "Bit-exact equality of two (nested) checkpoint objects: tensors by torch.equal, everything else by ==."
    if torch.is_tensor(a): return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_two_rank_resume_equals_an_uninterrupted_run(rl_base):
    import json
    # 8 questions, 1 per rank and step: 4 steps, checkpoints after steps 1, 2 and 3
    write_gsm8k(toy_rows(8), toy_rows(4, prefix="t"))
    flags = ["-m", "nanochat_nb.chat_rl", "--device-type=cpu", *SMALL, "--num-samples=8", "--examples-per-step=2",
             "--eval-every=2", "--save-every=1", "--init-lr-frac=0.5"]
    env = {"NANOCHAT_BASE_DIR": str(rl_base), "NANOCHAT_DTYPE": "float32"}
    full = run_torchrun(flags, env=env).stdout
    d = rl_base / "chatrl_checkpoints" / "d2"
    files = lambda s: [f"model_{s:06d}.pt", f"meta_{s:06d}.json", f"optim_{s:06d}_rank0.pt", f"optim_{s:06d}_rank1.pt"]
    final = {f: (json.load(open(d / f)) if f.endswith(".json") else torch.load(d / f)) for f in files(3)}
    for f in files(2) + files(3):  # as if both ranks died right after the save of step 1
        os.remove(d / f)
    resumed = run_torchrun([*flags, "--resume"], env=env).stdout
    assert "step 1: continuing at step 2 of 4" in resumed
    # the steps the resumed run took print the same losses, rewards and pass@k, to the last digit printed
    step_lines = lambda out: [re.sub(r" \| sampling: .*", "", l) for l in out.splitlines()  # timings differ
                              if re.match(r"Step [23](/4 \| (Example|Average)| \| Pass@)", l)]
    lines = step_lines(resumed)
    print("\n".join(lines))
    assert len(lines) == 5 and lines == step_lines(full)  # pass@k at step 2, then a loss and a reward line per step
    assert not re.search(r"Step [01]/4", resumed)
    # the checkpoint of the last step, on both ranks: the same bits
    for f in files(3):
        got = json.load(open(d / f)) if f.endswith(".json") else torch.load(d / f)
        if f.startswith("meta"):
            assert got["loop_state"] == final[f]["loop_state"]  # reward, sequence length, pass@1 of all 4 steps
            assert sorted(int(s) for s in got["loop_state"]["reward"]) == [0, 1, 2, 3]
        else:
            assert _tensors_equal(got, final[f]), f
    sft = torch.load(rl_base / "chatsft_checkpoints" / "d2" / "model_000001.pt")
    assert any(not torch.equal(final["model_000003.pt"][k], sft[k]) for k in sft), "RL must have changed the model"

def test_resume_refuses_a_different_world_size(rl_base):
    import json
    write_gsm8k(toy_rows(4), toy_rows(1))
    result, _ = run_main([*SMALL, "--num-samples=8", "--examples-per-step=2", "--eval-every=-1"])
    d = result["checkpoint_dir"]
    meta_path = os.path.join(d, "meta_000001.json")
    meta = json.load(open(meta_path)); meta["world_size"] = 8; json.dump(meta, open(meta_path, "w"))
    with pytest.raises(SystemExit, match="saved by 8 ranks, this run has 1"):
        run_main([*SMALL, "--num-samples=8", "--examples-per-step=2", "--resume"])
    os.remove(os.path.join(d, "optim_000001_rank0.pt"))  # e.g. a checkpoint of the original nanochat
    with pytest.raises(SystemExit, match="no optimizer state"):
        run_main([*SMALL, "--num-samples=8", "--examples-per-step=2", "--resume"])


# --- bad input ------------------------------------------------------------------------------------------------------
def test_missing_sft_checkpoint_names_the_command_that_makes_one(base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.run([sys.executable, "runs/chat_rl.py", "--device-type=cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "python -m nanochat_nb.chat_sft" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit, match="must be a multiple of --device-batch-size=8"):
        run_main(["--num-samples=12"])
