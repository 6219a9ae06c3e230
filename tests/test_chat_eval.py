"""chat_eval: categorical accuracy against a naive one-prompt-at-a-time reference and against a model forced to prefer
one letter (closed form), pass@k with a scripted engine and through the real Engine with a scripted model, ChatCORE
on hand-computed numbers, two gloo ranks equal one, and the CLI end to end (JSON/CSV next to the checkpoint, report)."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat_nb import chat_eval
from nanochat_nb.chat_eval import (TASK_NAMES, CHATCORE_BASELINES, build_eval_task, chatcore, run_categorical_eval,
                                   run_chat_eval, run_generative_eval)
from tests.chat_eval_worker import GSM8K_ANSWERS, ScriptedLM, evaluate_all, write_tiny_eval_data
from tests.conftest import REPO, run_torchrun
from tests.test_chat_cli import save_byte_tokenizer, save_tiny_model


@pytest.fixture
def tok(base_dir, monkeypatch):
    "Tiny offline splits of all six tasks and the byte tokenizer in a fresh base dir."
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "offline")
    write_tiny_eval_data(base_dir)
    save_byte_tokenizer(str(base_dir))
    from nanochat_nb.tokenizer import get_tokenizer
    return get_tokenizer()


def record_predictions(task):
    "Wrap task.evaluate so that the letters/completions it is asked to grade are recorded, in order."
    seen, evaluate = [], task.evaluate
    def recording(conversation, response):
        seen.append((conversation["messages"][0]["content"], response))
        return evaluate(conversation, response)
    task.evaluate = recording
    return seen


def naive_predictions(task, tok, model):
    "One prompt at a time, no padding: the letter with the largest logit after <|assistant_start|>."
    preds = []
    for i in range(len(task)):
        conv = task[i]
        ids = tok.render_for_completion(conv)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letter_ids = [tok.encode(letter)[0] for letter in conv["letters"]]
        preds.append((conv["messages"][0]["content"], conv["letters"][int(logits[letter_ids].argmax())]))
    return preds


# ---------------------------------------------------------------- categorical


def test_categorical_batched_equals_naive_reference(tok, base_dir):
    model = save_tiny_model(str(base_dir), "chatsft_checkpoints", "d2", 1, seed=17)
    for name in ("ARC-Easy", "MMLU"):
        reference = naive_predictions(build_eval_task(name), tok, model)
        assert len({p for _, p in reference}) > 1, "a model that always answers the same letter would prove little"
        prompts = {len(tok.render_for_completion(build_eval_task(name)[i])) for i in range(len(reference))}
        assert len(prompts) > 1, "prompts of different lengths are what exercises the padding"
        expected_acc = sum(build_eval_task(name)[i]["messages"][-1]["content"] == p
                           for i, (_, p) in enumerate(reference)) / len(reference)
        for batch_size in (1, 3, 8, 100):
            task = build_eval_task(name)
            seen = record_predictions(task)
            acc = run_categorical_eval(task, tok, model, batch_size)
            assert seen == reference, (name, batch_size)
            assert acc == expected_acc
        task = build_eval_task(name)
        seen = record_predictions(task)
        run_categorical_eval(task, tok, model, 2, max_problems=3)
        assert seen == reference[:3]


class PrefersLetters:
    """At a <|assistant_start|> input position the logits rank the letters by `order` (first = highest); at every
    other position (prompt text, BOS padding) the ranking is reversed, so reading the wrong position changes answers."""
    def __init__(self, tok, order):
        self.tok, self.start = tok, tok.encode_special("<|assistant_start|>")
        self.scores = torch.zeros(tok.get_vocab_size())
        for rank, letter in enumerate(order):
            self.scores[tok.encode(letter)[0]] = len(order) - rank
    def get_device(self): return torch.device("cpu")
    def __call__(self, idx):
        at_start = (idx == self.start).unsqueeze(-1)
        return torch.where(at_start, self.scores, -self.scores).expand(*idx.shape, -1).clone()


def test_categorical_model_forced_to_prefer_one_letter(tok):
    order = ["B", "A", "C", "D", "E", "2", "3", "1", "4"]
    for name in ("ARC-Easy", "ARC-Challenge", "MMLU"):
        task = build_eval_task(name)
        convs = [task[i] for i in range(len(task))]
        # closed form: the model answers the highest-ranked letter this problem offers
        expected = sum(min(c["letters"], key=order.index) == c["messages"][-1]["content"] for c in convs) / len(convs)
        assert 0 < expected < 1, name
        for batch_size in (1, 4):
            assert run_categorical_eval(task, tok, PrefersLetters(tok, order), batch_size) == expected, (name, batch_size)


def test_letter_that_is_not_one_token_is_refused(tok):
    class TwoTokenLetters:
        def __len__(self): return 1
        def __getitem__(self, i):
            return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "10"}], "letters": ["9", "10"]}
        def evaluate(self, conversation, response): return response == "10"
    with pytest.raises(ValueError, match=r"'10' encodes to 2 tokens"):
        run_categorical_eval(TwoTokenLetters(), tok, PrefersLetters(tok, ["1"]), 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_categorical_eval(build_eval_task("MMLU"), tok, PrefersLetters(tok, ["A"]), 0)
    with pytest.raises(ValueError, match="max_problems must be >= 1"):
        run_categorical_eval(build_eval_task("MMLU"), tok, PrefersLetters(tok, ["A"]), 2, max_problems=0)


# ---------------------------------------------------------------- generative


class ScriptedEngine:
    "An engine whose sample j for the problem 'Problem i' is right iff j in correct[i]; records its kwargs."
    def __init__(self, tok, task, correct):
        self.tok, self.correct, self.calls = tok, correct, []
        self.answers = {task[i]["messages"][0]["content"]: task[i]["messages"][-1]["content"][-1]["text"].split("#### ")[1]
                        for i in range(len(task))}
    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(kwargs)
        question = next(q for q in self.answers if q in self.tok.decode(tokens))
        i = int(question.split()[1].rstrip(":"))
        texts = [f"so\n#### {self.answers[question]}" if j in self.correct.get(i, ()) else "#### -1" for j in range(num_samples)]
        return [tokens + self.tok.encode(t) for t in texts], [[0] * len(tokens) for _ in texts]


def test_generative_pass_at_k_with_a_scripted_engine(tok):
    correct = {0: {0}, 1: {2}, 2: {1, 3}, 4: {3}, 5: {0, 1, 2, 3}}  # problems 3 and 6 are never solved
    n = len(GSM8K_ANSWERS)
    for k in (1, 2, 3, 4):
        task = build_eval_task("GSM8K")
        engine = ScriptedEngine(tok, task, correct)
        expected = sum(any(j < k for j in js) for js in correct.values()) / n
        acc = run_generative_eval(task, tok, PrefersLetters(tok, []), engine, k, 77, 0.7, 9)
        assert acc == pytest.approx(expected), k
        assert engine.calls == [{"max_tokens": 77, "temperature": 0.7, "top_k": 9}] * n
    assert [sum(any(j < k for j in js) for js in correct.values()) for k in (1, 2, 3, 4)] == [2, 3, 4, 5]
    task = build_eval_task("GSM8K")
    engine = ScriptedEngine(tok, task, correct)
    first3 = [int(task[i]["messages"][0]["content"].split()[1].rstrip(":")) for i in range(3)]  # rows are shuffled
    assert run_chat_eval("GSM8K", PrefersLetters(tok, []), tok, engine, num_samples=4, max_problems=3) == \
        pytest.approx(sum(1 for i in first3 if correct.get(i)) / 3)


def test_generative_through_the_real_engine(tok):
    from nanochat_nb.engine import Engine
    model = ScriptedLM(tok, "It is 18.\n#### 18")
    acc = run_chat_eval("GSM8K", model, tok, Engine(model, tok), num_samples=3, max_new_tokens=40)
    assert acc == pytest.approx(GSM8K_ANSWERS.count(18) / len(GSM8K_ANSWERS))
    # cut short by max_new_tokens the answer never appears
    assert run_chat_eval("GSM8K", model, tok, Engine(model, tok), max_new_tokens=5) == 0.0
    # SpellingBee: a model that always says 1 is right exactly when the letter occurs once
    bee = ScriptedLM(tok, "#### 1")
    task = build_eval_task("SpellingBee")
    truth = [task[i]["messages"][-1]["content"][-1]["text"].split("#### ")[1] for i in range(40)]
    expected = truth.count("1") / 40
    assert 0 < expected < 1
    assert run_chat_eval("SpellingBee", bee, tok, Engine(bee, tok), max_new_tokens=8, max_problems=40) == pytest.approx(expected)


def test_humaneval_grades_in_the_sandbox(tok):
    from nanochat_nb.engine import Engine
    task = build_eval_task("HumanEval")
    solutions = {task[i]["entry_point"]: task[i]["messages"][-1]["content"] for i in range(len(task))}
    add = ScriptedLM(tok, "```python\n" + solutions["add"] + "\n```")
    assert run_chat_eval("HumanEval", add, tok, Engine(add, tok), max_new_tokens=400) == pytest.approx(0.5)


# ---------------------------------------------------------------- ChatCORE


def test_chatcore_on_hand_computed_numbers():
    results = {"ARC-Easy": 0.4, "ARC-Challenge": 0.3, "MMLU": 0.55, "GSM8K": 0.1, "HumanEval": 0.05, "SpellingBee": 0.9}
    # centred: (0.4-.25)/.75 = 0.2, (0.3-.25)/.75 = 1/15, (0.55-.25)/.75 = 0.4, then 0.1, 0.05, 0.9 unchanged
    core, core_cat = chatcore(results)
    assert core == pytest.approx((0.2 + 1 / 15 + 0.4 + 0.1 + 0.05 + 0.9) / 6)
    assert core_cat == pytest.approx((0.2 + 1 / 15 + 0.4) / 3)
    assert chatcore(dict(CHATCORE_BASELINES)) == (0.0, 0.0)
    assert chatcore({t: 1.0 for t in TASK_NAMES}) == (1.0, 1.0)
    assert chatcore({t: results[t] for t in ("ARC-Easy", "ARC-Challenge", "MMLU")}) == (None, pytest.approx(core_cat))
    assert chatcore({"GSM8K": 0.1}) == (None, None)
    with pytest.raises(ValueError, match="unknown task"):
        chatcore({**results, "TriviaQA": 0.5})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        chatcore({**results, "MMLU": 55.0})  # a percentage instead of a fraction


# ---------------------------------------------------------------- distributed


def test_two_ranks_equal_one(tok, base_dir, tmp_path):
    save_tiny_model(str(base_dir), "chatsft_checkpoints", "d2", 1, seed=12)
    single = evaluate_all()
    # the all-reduce matters: rank 0's own GSM8K share (problems 0, 2, 4, 6) is not the global accuracy
    task = build_eval_task("GSM8K")
    rank0 = [task[i]["messages"][-1]["content"][-1]["text"].endswith("#### 18") for i in range(0, len(task), 2)]
    assert sum(rank0) / len(rank0) != single["GSM8K"] and 0 < single["GSM8K"] < 1
    out = tmp_path / "two.json"
    run_torchrun(["tests/chat_eval_worker.py", str(out)], nproc=2,
                 env={"NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_TASK_DATA": "offline"})
    got = json.load(open(out))
    assert got.pop("world_size") == 2
    assert got == single


# ---------------------------------------------------------------- CLI


def test_cli_end_to_end_writes_json_csv_and_report(tok, base_dir, capsys):
    from nanochat_nb.chat_eval import main, read_results
    model = save_tiny_model(str(base_dir), "chatsft_checkpoints", "d2", 3, seed=13)
    save_tiny_model(str(base_dir), "chatsft_checkpoints", "d2", 7, seed=14)  # the last step, evaluated by default
    ckpt = os.path.join(str(base_dir), "chatsft_checkpoints", "d2")
    record = main(["-i", "sft", "-s", "3", "-x", "4", "-m", "6", "-b", "3", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert (record["source"], record["model_tag"], record["step"]) == ("sft", "d2", 3)
    assert list(record["results"]) == TASK_NAMES
    # the categorical accuracy is the reference one for the step-3 model (its first 4 problems)
    task = build_eval_task("ARC-Easy")
    ref = naive_predictions(task, tok, model)[:4]
    assert record["results"]["ARC-Easy"] == sum(task[i]["messages"][-1]["content"] == p for i, (_, p) in enumerate(ref)) / 4
    assert record["ChatCORE"] == pytest.approx(chatcore(record["results"])[0])
    assert f"ChatCORE metric: {record['ChatCORE']:.4f}" in out
    assert record["args"]["max_problems"] == 4 and record["args"]["batch_size"] == 3
    saved = read_results(ckpt)
    assert saved == json.loads(json.dumps(record))
    rows = list(csv.DictReader(open(os.path.join(ckpt, "chat_eval.csv"))))
    assert [r["task"] for r in rows] == TASK_NAMES + ["ChatCORE", "ChatCORE_cat"]
    for r in rows[:6]:
        assert float(r["accuracy"]) == pytest.approx(record["results"][r["task"]], abs=1e-6)
        assert (r["source"], r["model_tag"], r["step"]) == ("sft", "d2", "3")
    assert float(rows[6]["accuracy"]) == pytest.approx(record["ChatCORE"], abs=1e-6)
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]
    try:
        import nanochat_nb.report  # noqa: F401  (another chapter; the section is logged once it exists)
    except ImportError:
        pass
    else:
        section = open(os.path.join(str(base_dir), "report", "chat-evaluation-sft.md")).read()
        assert section.startswith("## Chat evaluation sft") and "ChatCORE metric" in section and "- ARC-Easy:" in section
    # a subset of tasks: no ChatCORE; default step = the last
    record = main(["-i", "sft", "-a", "MMLU|GSM8K|MMLU", "-x", "2", "-m", "4", "--device-type", "cpu"])
    assert list(record["results"]) == ["MMLU", "GSM8K"] and record["ChatCORE"] is None and record["step"] == 7
    assert "ChatCORE metric" not in capsys.readouterr().out
    assert read_results(ckpt)["step"] == 7


def test_cli_bad_input(base_dir, capsys):
    from nanochat_nb.chat_eval import main
    for argv, message in [([], "the following arguments are required: -i/--source"),
                          (["-i", "base", "-a", "MMLU|Trivia"], "unknown task(s) ['Trivia']"),
                          (["-i", "sft", "-x", "0"], "-x/--max-problems must be >= 1"),
                          (["-i", "sft", "-n", "0"], "-n/--num-samples must be >= 1"),
                          (["-i", "sft", "-t", "-1"], "-t/--temperature must be >= 0"),
                          (["-i", "sft", "--device-type", "tpu"], "invalid choice: 'tpu'")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    # `python -m` with nothing to evaluate: a message, not a traceback
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.run([sys.executable, "-m", "nanochat_nb.chat_eval", "-i", "rl", "--device-type", "cpu"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no 'rl' checkpoint to evaluate" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ValueError, match="Unknown chat eval task 'gsm8k'"):
        build_eval_task("gsm8k")


def test_runner_script_forwards():
    src = open(os.path.join(REPO, "runs", "chat_eval.py")).read()
    assert "from nanochat_nb.chat_eval import main" in src and "main()" in src
