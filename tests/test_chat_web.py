"""chat_web against real clients on loopback: the official `openai` SDK and plain HTTP, a tiny random GPT served by
uvicorn in a thread. The answers are gibberish; seeds, limits, errors, streaming, disconnects and the pool are real.
The reference for every answer is Engine.generate_batch with the same seed."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile

import httpx
import openai
import pytest
import torch

from nanochat_nb.chat_web import BackgroundServer, Worker, create_app, prompt_budget
from nanochat_nb.engine import Engine
from tests.conftest import REPO
from tests.test_chat_cli import save_byte_tokenizer, save_tiny_model
from tests.test_engine import ScriptedModel, tiny_gpt

HI = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def tok():
    from nanochat_nb.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(["hello world, why is the sky blue?"] * 4), 265)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt(seed=3)


class NeverEnds:
    "A model whose answers never end on their own (<|assistant_end|> and <|bos|> banned); counts its forward calls."
    def __init__(self, model, tok):
        self.model, self.config, self.rotary_seq_len = model, model.config, model.rotary_seq_len
        self.banned = [tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()]
        self.forward_calls = 0
    def get_device(self):
        return self.model.get_device()
    def forward(self, ids, kv_cache=None, last_only=False):
        self.forward_calls += 1
        logits = self.model.forward(ids, kv_cache=kv_cache, last_only=last_only)
        logits[..., self.banned] = float("-inf")
        return logits


def prompt_of(tok, text):
    sp = tok.encode_special
    return [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]


def reference(model, tok, prompt, n=1, **kw):
    "(texts, token lists) of Engine.generate_batch: the answer every surface must give for the same seed."
    results, _ = Engine(model, tok).generate_batch(prompt, num_samples=n, **kw)
    rows = [r[len(prompt):] for r in results]
    return [tok.decode(r) for r in rows], rows


def sse(lines):
    "The JSON payloads of `data: ` lines (the OpenAI [DONE] sentinel kept as the string)."
    return [l[6:] if l == "data: [DONE]" else json.loads(l[6:]) for l in lines if l.startswith("data: ")]


def serve(*workers, **kw):
    return BackgroundServer(create_app(list(workers), model_id="tiny", **kw))


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def ask(c, **kw):
    "c.chat.completions.create, with our extension top_k sent the SDK's way (extra_body)."
    if "top_k" in kw:
        kw["extra_body"] = {"top_k": kw.pop("top_k")}
    return c.chat.completions.create(**{"model": "tiny", **kw})


# ---------------------------------------------------------------- answers, seeds, n, stop, usage

def test_openai_sdk_matches_generate_batch(tok, model):
    prompt = prompt_of(tok, HI[0]["content"])
    kw = dict(max_tokens=30, temperature=1.0, top_k=20, seed=11)
    texts, rows = reference(model, tok, prompt, n=3, **kw)
    reasons = ["length" if len(r) == 30 else "stop" for r in rows]
    with serve(Worker(0, model, tok)) as url:
        c = client(url)
        r = ask(c, messages=HI, n=3, **kw)
        assert [ch.message.content for ch in r.choices] == texts
        assert [ch.finish_reason for ch in r.choices] == reasons and r.object == "chat.completion"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), sum(map(len, rows)))
        # streaming: the same text per choice, one finish_reason each, the usage chunk, then [DONE]
        got, finish, usage = [""] * 3, [None] * 3, None
        for chunk in ask(c, messages=HI, n=3, stream=True,
                                               stream_options={"include_usage": True}, **kw):
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage:
                usage = chunk.usage
            for ch in chunk.choices:
                got[ch.index] += ch.delta.content or ""
                if ch.finish_reason:
                    assert finish[ch.index] is None
                    finish[ch.index] = ch.finish_reason
        assert got == texts and finish == reasons and usage.completion_tokens == sum(map(len, rows))
        # max_completion_tokens wins over max_tokens; a different seed gives a different answer
        r = ask(c, messages=HI, max_completion_tokens=5, **kw)
        assert r.choices[0].message.content == reference(model, tok, prompt, **{**kw, "max_tokens": 5})[0][0]
        other = ask(c, messages=HI, **{**kw, "seed": 12}).choices[0].message.content
        assert other == reference(model, tok, prompt, **{**kw, "seed": 12})[0][0] and other != texts[0]
        # the raw stream ends with data: [DONE]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": HI, "stream": True, **kw}) as resp:
            events = sse(resp.iter_lines())
        assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_stop_sequences_cut_the_answer(tok, model):
    prompt = prompt_of(tok, HI[0]["content"])
    kw = dict(max_tokens=40, temperature=1.0, top_k=50, seed=5)
    text = reference(model, tok, prompt, **kw)[0][0]
    # a two-character printable piece from the middle of the answer, and its first occurrence
    at = next(i for i in range(4, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    stop = text[at:at + 2]
    expected = text[:text.find(stop)]
    with serve(Worker(0, model, tok)) as url:
        c = client(url)
        r = ask(c, messages=HI, stop=[stop, "\x00never"], **kw)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
        streamed = "".join(ch.choices[0].delta.content or "" for ch in
                           ask(c, messages=HI, stop=stop, stream=True, **kw) if ch.choices)
        assert streamed == expected


def test_original_api_streams_the_cli_answer(tok, model, base_dir):
    # the CLI, the original endpoint and generate_batch agree for one seed: chat_cli always samples with seed 42
    from nanochat_nb.chat_cli import main as chat_cli
    from nanochat_nb.checkpoint_manager import load_model
    save_byte_tokenizer(base_dir)
    save_tiny_model(base_dir, "base_checkpoints", "d2", 1, seed=7)
    loaded, tok2, _ = load_model("base", "cpu", phase="eval")
    text = "Why is the sky blue?"
    prompt = prompt_of(tok2, text)
    texts, rows = reference(loaded, tok2, prompt, max_tokens=256, temperature=0.6, top_k=50, seed=42)
    conversation = chat_cli(["-i", "base", "-p", text, "--device-type", "cpu"])  # -t 0.6 -k 50, 256 tokens
    reply = conversation[len(prompt):]
    end, bos = tok2.encode_special("<|assistant_end|>"), tok2.get_bos_token_id()
    assert reply[:len(rows[0])] == rows[0] and reply[len(rows[0]):] in ([end], [bos, end])  # the CLI closes the turn
    with serve(Worker(0, loaded, tok2)) as url:
        body = {"messages": [{"role": "user", "content": text}], "temperature": 0.6, "top_k": 50, "max_tokens": 256,
                "seed": 42}
        with httpx.stream("POST", f"{url}/chat/completions", json=body) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse(resp.iter_lines())
    assert events[-1] == {"done": True} and all(e["gpu"] == 0 for e in events[:-1])
    tokens = [e["token"] for e in events[:-1]]
    assert "".join(tokens) == texts[0] and len(tokens) > 1
    # only the last piece may end in U+FFFD (an answer that stops inside a character)
    assert not any(t.endswith("\ufffd") for t in tokens[:-1])


def test_a_character_split_over_tokens_streams_whole(tok):
    sp = tok.encode_special
    chain = [sp("<|assistant_start|>"), *"é😀".encode("utf-8"), sp("<|assistant_end|>")]
    script = dict(zip(chain, chain[1:]))  # each byte of é and 😀 is its own token
    with serve(Worker(0, ScriptedModel(script, sequence_len=512), tok)) as url:
        r = httpx.post(f"{url}/chat/completions", json={"messages": HI, "temperature": 0})
        assert sse(r.text.splitlines()) == [{"token": "é", "gpu": 0}, {"token": "😀", "gpu": 0}, {"done": True}]
        r = ask(client(url), messages=HI, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == ("é😀", "stop", 6)


def test_system_message_and_context_cut(tok, model):
    kw = dict(max_tokens=8, temperature=1.0, top_k=50, seed=3)
    folded = reference(model, tok, prompt_of(tok, "Be brief.\n\nHi"), **kw)[0][0]
    # a conversation longer than the context keeps the newest tokens: the end of the last (huge) message
    long_text = "".join(chr(97 + i % 26) for i in range(8000))
    budget = prompt_budget(model.config.sequence_len, 8)
    sp = tok.encode_special
    turn = [sp("<|user_start|>"), *tok.encode(long_text), sp("<|user_end|>")]
    cut = [tok.get_bos_token_id(), *turn[-(budget - 2):], sp("<|assistant_start|>")]
    with serve(Worker(0, model, tok)) as url:
        c = client(url)
        r = ask(c, messages=[{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}], **kw)
        assert r.choices[0].message.content == folded
        msgs = [{"role": "user", "content": "old " * 100}, {"role": "assistant", "content": "x"},
                {"role": "user", "content": long_text}]
        r = ask(c, messages=msgs, **kw)
        assert r.usage.prompt_tokens == len(cut) == budget
        assert r.choices[0].message.content == reference(model, tok, cut, **kw)[0][0]


# ---------------------------------------------------------------- bad requests: 4xx, the limit named, never 5xx

HI_BODY = {"messages": HI}
BAD = [  # (body, status, words the message must contain)
    (b"{not json", 400, "not valid JSON"), (b"\xff\xfe", 400, "not valid JSON"), ([1, 2], 400, "must be a JSON object"),
    ({}, 400, "'messages' is required"), ({"messages": "hi"}, 400, "messages must be a list"),
    ({"messages": []}, 400, "At least one message"), ({"messages": [3]}, 400, "messages[0] must be an object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role must be 'user', 'assistant' or 'system'"),
    ({"messages": [{"role": "user"}]}, 400, "must be a string"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "empty content"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "must be a string"),
    ({"messages": [{"role": "system", "content": "s"}]}, 400, "followed by a user message"),
    ({"messages": [*HI, {"role": "system", "content": "s"}]}, 400, "Only the first message may be a system"),
    ({"messages": HI * 501}, 400, "500 messages per request"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "8000 characters per message"),
    ({"messages": [{"role": "user", "content": "x" * 8000}] * 5}, 400, "32000 characters in total"),
    ({**HI_BODY, "temperature": -0.1}, 400, "temperature must be between 0.0 and 2.0"),
    ({**HI_BODY, "temperature": 2.01}, 400, "temperature must be between 0.0 and 2.0"),
    ({**HI_BODY, "temperature": "warm"}, 400, "temperature must be a number"),
    ({**HI_BODY, "top_k": 201}, 400, "top_k must be between 0 and 200"),
    ({**HI_BODY, "top_k": -1}, 400, "top_k must be between 0 and 200"),
    ({**HI_BODY, "top_k": 2.5}, 400, "top_k must be an integer"),
    ({**HI_BODY, "max_tokens": 0}, 400, "max_tokens must be between 1 and 4096"),
    ({**HI_BODY, "max_tokens": 4097}, 400, "max_tokens must be between 1 and 4096"),
    ({**HI_BODY, "max_tokens": True}, 400, "max_tokens must be an integer"),
    ({**HI_BODY, "seed": "s"}, 400, "seed must be an integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature must be between"),
    (b"x" * 1_000_001, 413, "request body is too large"),
]
BAD_OPENAI = [
    ({**HI_BODY, "n": 0}, 400, "n must be between 1 and 8"), ({**HI_BODY, "n": 9}, 400, "n must be between 1 and 8"),
    ({**HI_BODY, "top_p": 0.5}, 400, "top_p=0.5 is not supported"), ({**HI_BODY, "stop": ["a"] * 5}, 400, "at most 4"),
    ({**HI_BODY, "stop": [""]}, 400, "non-empty strings"), ({**HI_BODY, "stream": "yes"}, 400, "stream must be true or false"),
    ({**HI_BODY, "max_completion_tokens": 5000}, 400, "max_completion_tokens must be between 1 and 4096"),
    ({**HI_BODY, "presence_penalty": 1}, 400, "presence_penalty=1 is not supported"),
    ({**HI_BODY, "logprobs": True}, 400, "logprobs=true is not supported"),
    ({**HI_BODY, "response_format": {"type": "json_object"}}, 400, "response_format"),
]


def post(url, path, body):
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    return httpx.post(url + path, json=body)


def test_bad_requests_are_4xx_with_a_clear_message(tok, model):
    with serve(Worker(0, model, tok)) as url:
        for body, status, words in BAD:
            r = post(url, "/chat/completions", body)
            assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), (body, r.text)
            assert words in r.json()["detail"], (words, r.text)
        for body, status, words in BAD + BAD_OPENAI:
            r = post(url, "/v1/chat/completions", body)
            assert r.status_code == status, (str(body)[:80], r.text)
            err = r.json()["error"]
            assert words in err["message"] and err["type"] == "invalid_request_error", (words, err)
        # the parameter is named where there is one
        assert post(url, "/v1/chat/completions", {**HI_BODY, "top_k": 999}).json()["error"]["param"] == "top_k"
        # unknown paths and methods: OpenAI-style JSON under /v1 as well
        assert httpx.get(f"{url}/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
        assert httpx.get(f"{url}/v1/models/other").status_code == 404
        # the openai SDK turns them into its typed errors, with our message
        c = client(url)
        with pytest.raises(openai.BadRequestError, match="temperature must be between 0.0 and 2.0"):
            ask(c, messages=HI, temperature=3)
        with pytest.raises(openai.BadRequestError, match="top_p=0.1 is not supported"):
            ask(c, messages=HI, top_p=0.1)
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("gpt-4")
        # and the server is still fine
        assert httpx.get(f"{url}/health").json()["available_workers"] == 1


def test_pages_models_health_stats(tok, model):
    with serve(Worker(0, model, tok)) as url:
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/chat/completions" in page.text and "Ask anything" in page.text
        logo = httpx.get(url + "/logo.svg")
        assert logo.headers["content-type"] == "image/svg+xml" and logo.text.lstrip().startswith("<svg")
        assert [m.id for m in client(url).models.list()] == ["tiny"]
        assert client(url).models.retrieve("tiny").id == "tiny"
        stats = httpx.get(url + "/stats").json()
        assert (stats["total_workers"], stats["available_workers"], stats["busy_workers"]) == (1, 1, 0)
        assert stats["workers"][0]["device"] == "cpu"
        assert httpx.options(url + "/chat/completions", headers={"Origin": "http://x", "Access-Control-Request-Method":
                                                                 "POST"}).headers["access-control-allow-origin"]


# ---------------------------------------------------------------- the pool: health during a stream, disconnects, load

def wait_until(predicate, what, timeout=60):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_health_during_a_stream_and_a_disconnect_frees_the_worker(tok, model):
    slow = NeverEnds(model, tok)
    with serve(Worker(0, slow, tok)) as url:
        body = {"messages": HI, "max_tokens": 4096, "temperature": 1.0, "seed": 1}
        for path in ["/chat/completions", "/v1/chat/completions"]:
            slow.forward_calls = 0
            with httpx.stream("POST", url + path, json={**body, "stream": True}) as resp:
                lines = resp.iter_lines()
                first = [next(lines) for _ in range(4)]
                health = httpx.get(url + "/health").json()  # answered while the answer streams
                assert health["status"] == "ok" and health["available_workers"] == 0
                more = [next(lines) for _ in range(4)]  # and the stream goes on afterwards
                assert len(sse(first + more)) >= 4
            # leaving the `with` closed the connection: the generation stops and the worker comes back
            wait_until(lambda: httpx.get(url + "/stats").json()["available_workers"] == 1, "the worker")
            assert slow.forward_calls < 4096, "the generation ran on after the client left"
        # a non-streaming request whose client gives up waiting frees its worker too
        slow.forward_calls = 0
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        wait_until(lambda: httpx.get(url + "/stats").json()["available_workers"] == 1, "the worker")
        assert 0 < slow.forward_calls < 4096, "the generation ran on after the client left"
        # the freed worker serves the next request in full
        r = ask(client(url), messages=HI, max_tokens=20, seed=1)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20


def test_concurrent_streams_complete_and_return_every_worker(tok, model):
    workers = [Worker(0, model, tok), Worker(1, copy.deepcopy(model), tok)]
    kw = dict(max_tokens=24, temperature=1.0, top_k=50)
    prompt = prompt_of(tok, HI[0]["content"])
    results, errors = {}, []

    def original(seed):
        with httpx.stream("POST", url + "/chat/completions", json={"messages": HI, "seed": seed, **kw}, timeout=120) as r:
            events = sse(r.iter_lines())
        assert events[-1] == {"done": True}
        return "".join(e["token"] for e in events[:-1]), {e["gpu"] for e in events[:-1]}

    def sdk(seed):
        stream = ask(client(url), messages=HI, seed=seed, stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices), set()

    def leaver(seed):  # reads a little and goes away
        with httpx.stream("POST", url + "/chat/completions", json={"messages": HI, "seed": seed, **kw}) as r:
            next(r.iter_lines())
        return None, set()

    def run(i, kind):
        try:
            for round_ in range(2):
                seed = 100 + 10 * i + round_
                results[seed] = kind(seed)
        except Exception as e:  # collected, so a failure is reported instead of hanging the join
            errors.append(repr(e))

    with serve(*workers) as url:
        kinds = [original, original, sdk, sdk, leaver, original]
        threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(kinds)]
        for t in threads: t.start()
        for t in threads: t.join(timeout=300)
        assert not errors, errors
        assert len(results) == 12
        for seed, (text, used) in results.items():
            assert used <= {0, 1}
            if text is not None:
                assert text == reference(model, tok, prompt, seed=seed, **kw)[0][0], seed
        wait_until(lambda: httpx.get(url + "/stats").json()["available_workers"] == 2, "both workers")
        stats = httpx.get(url + "/stats").json()
        assert sum(w["requests"] for w in stats["workers"]) == 12 and stats["busy_workers"] == 0
        assert all(w["requests"] > 0 for w in stats["workers"]), "six clients at once: both workers served"


# ---------------------------------------------------------------- the command line and the package data

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_checkpoint(base_dir):
    save_byte_tokenizer(base_dir)
    save_tiny_model(base_dir, "base_checkpoints", "d2", 1, seed=7)
    port = free_port()
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "nanochat_nb.chat_web", "-i", "base", "-p", str(port), "--host",
                             "127.0.0.1", "--device-type", "cpu", "-m", "7"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health").json()["ready"]
            except httpx.TransportError:
                return False
        wait_until(up, "the server to start", timeout=120)
        r = client(url).chat.completions.create(model="x", messages=HI, seed=1)
        assert r.model == "nanochat-base" and r.usage.completion_tokens <= 7  # -m sets the default max_tokens
        assert "data: {\"done\": true}" in httpx.post(url + "/chat/completions", json=HI_BODY).text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Serving nanochat-base" in out and "request: [{\"role\": \"user\"" in out


def test_cli_flags_and_missing_checkpoint(base_dir, capsys):
    from nanochat_nb.chat_web import main
    for argv, message in [(["-n", "2", "--device-type", "cpu"], "more than 1 only on CUDA"),
                          (["-t", "3"], "--temperature must be between 0.0 and 2.0"),
                          (["-m", "0"], "--max-tokens must be between 1 and 4096"),
                          (["-i", "chat"], "invalid choice: 'chat'")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="there is no 'sft' checkpoint to serve"):
        main(["--device-type", "cpu"])


def test_a_normal_install_ships_the_page(tmp_path):
    "A wheel (what `pip install .` installs) holds ui.html and logo.svg next to the modules."
    src = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "nanochat_nb"), src / "nanochat_nb",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for f in ["setup.py", "settings.ini", "README.md"]:
        shutil.copy(os.path.join(REPO, f), src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanochat_nb/ui.html" in names and "nanochat_nb/logo.svg" in names and "nanochat_nb/chat_web.py" in names
    with zipfile.ZipFile(wheel) as z:
        assert z.read("nanochat_nb/ui.html") == open(os.path.join(REPO, "nanochat_nb", "ui.html"), "rb").read()
