"""ui.html in a real browser: headless Debian Chromium driven by Selenium against chat_web serving a tiny model.
Sends a message and watches it stream, regenerates, uses a slash command, edits and resends (the console line must
not shift what gets cut), stops a generation, shows a server error, starts new conversations; keeps a screenshot."""
import json
import os
import shutil
import tempfile
import time

import httpx
import pytest
import torch

from nanochat_nb.chat_web import BackgroundServer, Worker, create_app
from tests.test_engine import tiny_gpt

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
LENGTH = 40  # letters per answer


class Paced:
    "A tiny GPT that writes only the letters a-z, one token every `delay` seconds, and ends after LENGTH of them."
    def __init__(self, model, tok, delay=0.02):
        self.model, self.config, self.rotary_seq_len, self.delay = model, model.config, model.rotary_seq_len, delay
        self.letters = list(range(ord("a"), ord("z") + 1))
        self.end = tok.encode_special("<|assistant_end|>")
        self.steps = 0
    def get_device(self):
        return self.model.get_device()
    def forward(self, ids, kv_cache=None, last_only=False):
        self.steps = 0 if ids.size(1) > 1 else self.steps + 1  # a prompt (prefill) starts a new answer
        logits = self.model.forward(ids, kv_cache=kv_cache, last_only=last_only)
        allowed = [self.end] if self.steps >= LENGTH else self.letters
        masked = torch.full_like(logits, float("-inf"))
        masked[..., allowed] = logits[..., allowed]
        time.sleep(self.delay)
        return masked


class Recorder:
    "ASGI wrapper that keeps the JSON body of every POST /chat/completions, to see what the page sent."
    def __init__(self, app):
        self.app, self.bodies = app, []
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/chat/completions":
            return await self.app(scope, receive, send)
        chunks = []
        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message
        return await self.app(scope, recording_receive, send)


def chromium():
    "Headless Debian Chromium under Selenium, with a fresh profile (removed when the driver quits)."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1000,800"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    quit = driver.quit
    def quit_and_clean():
        quit()
        shutil.rmtree(profile, ignore_errors=True)
    driver.quit = quit_and_clean
    return driver


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


def wait_for(predicate, what, timeout=60):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_chat_page_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.action_chains import ActionChains
    from nanochat_nb.tokenizer import RustBPETokenizer
    tok = RustBPETokenizer.train_from_iterator(iter(["hello world"] * 4), 265)
    app = Recorder(create_app([Worker(0, Paced(tiny_gpt(seed=1), tok), tok)], model_id="tiny"))
    d = browser
    find = lambda css: d.find_elements(By.CSS_SELECTOR, css)
    done = lambda: not find(".message.streaming")
    texts = lambda: [(e.get_attribute("class").replace("message ", ""), e.text) for e in find("#messages .message")]
    box = lambda: d.find_element(By.ID, "input")

    def send(text):
        box().send_keys(text, Keys.ENTER)

    def answer():
        wait_for(done, "the answer to finish")
        return texts()[-1][1]

    with BackgroundServer(app) as url:
        d.get(url + "/")
        assert d.title == "nanochat" and box().get_attribute("placeholder") == "Ask anything"
        health = wait_for(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-health"), "the health check")
        assert health == "ready" and not d.find_element(By.ID, "error").is_displayed()

        # 1. send with Enter: the user bubble, then the answer streams in piece by piece
        send("hello")
        seen = set()
        while True:
            streaming = find(".message.streaming")
            if not streaming:
                break
            try:
                seen.add(streaming[0].text)
            except Exception:  # the bubble was replaced by the final message in between
                break
        first = answer()
        partial = {s for s in seen if s and s != "···" and s != first}
        assert len(partial) >= 2 and all(first.startswith(s) for s in partial), seen
        assert len(first) == LENGTH and first.isalpha()
        assert texts() == [("user", "hello"), ("assistant", first)]
        assert app.bodies[-1] == {"messages": [{"role": "user", "content": "hello"}], "temperature": 0.8,
                                  "top_k": 50, "max_tokens": 512}

        # 2. click the answer: it is regenerated (a new random seed, a new answer)
        find(".message.assistant")[0].click()
        second = answer()
        assert texts() == [("user", "hello"), ("assistant", second)] and second != first
        assert app.bodies[-1]["messages"] == [{"role": "user", "content": "hello"}]

        # 3. slash commands answer in the page and change what is sent next; Shift+Enter is a newline
        send("/temperature 0.3")
        send("/topk 7")
        assert texts()[-1] == ("console", "/topk 7\nTop-k set to 7")
        box().send_keys("again", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "two lines", Keys.ENTER)
        third = answer()
        assert app.bodies[-1]["temperature"] == 0.3 and app.bodies[-1]["top_k"] == 7
        assert [m["content"] for m in app.bodies[-1]["messages"]] == ["hello", second, "again\ntwo lines"]
        assert [role for role, _ in texts()] == ["user", "assistant", "console", "console", "user", "assistant"]

        # 4. click the second user message (after the console lines): edit and resend cuts exactly there
        find(".message.user")[1].click()
        assert box().get_property("value") == "again\ntwo lines"
        assert [role for role, _ in texts()] == ["user", "assistant", "console", "console"]
        box().clear()
        send("edited")
        answer()
        assert [m["content"] for m in app.bodies[-1]["messages"]] == ["hello", second, "edited"]
        send("/help")
        assert "/temperature <0..2>" in texts()[-1][1]
        d.save_screenshot(str(tmp_path / "web_ui.png"))
        print(f"\nscreenshot: {tmp_path / 'web_ui.png'}")

        # 5. the send button stops a running answer; the server gets its worker back
        send("stop me")
        wait_for(lambda: len("".join(e.text for e in find(".message.streaming"))) > 3, "some streamed text")
        d.find_element(By.ID, "send").click()
        wait_for(done, "the stop")
        cut = texts()[-1]
        assert cut[0] == "assistant" and 0 < len(cut[1]) < LENGTH
        wait_for(lambda: httpx.get(url + "/health").json()["available_workers"] == 1, "the worker back")

        # 6. a request the server refuses shows its message in the error box
        d.execute_script("document.getElementById('input').value = 'x'.repeat(8001)")
        send("")
        error = d.find_element(By.ID, "error")
        wait_for(error.is_displayed, "the error box")
        assert "8000 characters per message" in error.text

        # 7. new conversation: the + button, Ctrl+Shift+N and /clear
        d.find_element(By.ID, "new-chat").click()
        assert texts() == [] and not error.is_displayed()
        send("hi")
        answer()
        ActionChains(d).key_down(Keys.CONTROL).key_down(Keys.SHIFT).send_keys("n").key_up(Keys.SHIFT) \
            .key_up(Keys.CONTROL).perform()
        assert texts() == []
        send("hi")
        answer()
        send("/clear")
        assert texts() == []

    # 8. with no server behind the page, the health check on load says so
    d.get("file://" + os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat_nb", "ui.html"))
    assert wait_for(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-health"), "the check") == "failed"
    error = d.find_element(By.ID, "error")
    assert error.is_displayed() and "not running" in error.text
