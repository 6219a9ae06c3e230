"""ChatWidget driven through its controls in Python (set the text, click the buttons, move the sliders), checked
against Engine.generate_batch and the rendered conversation; tool calls from a scripted model; stop and clear."""
import html
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx

import pytest
import torch

from nanochat_nb.chat_widget import ChatWidget
from nanochat_nb.engine import Engine
from tests.test_chat_cli import save_byte_tokenizer, save_tiny_model
from tests.conftest import REPO
from tests.test_chat_web import NeverEnds
from tests.test_engine import ScriptedModel, tiny_gpt


@pytest.fixture(scope="module")
def tok():
    from nanochat_nb.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(["hello world"] * 4), 265)


class TextOnly:
    "A tiny GPT restricted to byte tokens and <|assistant_end|>: no tool tokens, so its answer is plain text."
    def __init__(self, model, tok):
        self.model, self.config, self.rotary_seq_len = model, model.config, model.rotary_seq_len
        self.allowed = [*range(256), tok.encode_special("<|assistant_end|>")]
    def get_device(self):
        return self.model.get_device()
    def forward(self, ids, kv_cache=None, last_only=False):
        logits = self.model.forward(ids, kv_cache=kv_cache, last_only=last_only)
        masked = torch.full_like(logits, float("-inf"))
        masked[..., self.allowed] = logits[..., self.allowed]
        return masked


def turn(tok, role, text):
    sp = tok.encode_special
    if role == "user":
        return [sp("<|user_start|>"), *tok.encode(text), sp("<|user_end|>")]
    return [sp("<|assistant_start|>"), *tok.encode(text), sp("<|assistant_end|>")]


def reference(model, tok, prompt, **kw):
    results, _ = Engine(model, tok).generate_batch(prompt, **kw)
    return tok.decode(results[0][len(prompt):])


def answer_text(w):
    return "".join(p["text"] for p in w.messages[-1]["content"])


def test_controls_drive_the_conversation(tok):
    model = TextOnly(tiny_gpt(seed=2), tok)
    w = ChatWidget(model, tok, max_tokens=30, seed=9)
    w.temperature.value, w.top_k.value = 1.0, 20
    w.text.value = "Why is the sky blue?"
    w.send_button.click()
    w.wait()
    bos, start = tok.get_bos_token_id(), tok.encode_special("<|assistant_start|>")
    first_prompt = [bos, *turn(tok, "user", "Why is the sky blue?"), start]
    first = reference(model, tok, first_prompt, max_tokens=30, temperature=1.0, top_k=20, seed=9)
    assert answer_text(w) == first and w.text.value == ""
    assert html.escape("Why is the sky blue?") in w.conversation.value and html.escape(first) in w.conversation.value
    # the second turn sees the first: its prompt is the whole conversation; greedy this time
    w.temperature.value = 0.0
    w.text.value = "And why is grass green?"
    w.send_button.click()
    w.wait()
    second_prompt = [bos, *turn(tok, "user", "Why is the sky blue?"), *turn(tok, "assistant", first),
                     *turn(tok, "user", "And why is grass green?"), start]
    assert answer_text(w) == reference(model, tok, second_prompt, max_tokens=30, temperature=0.0, top_k=20, seed=9)
    assert [m["role"] for m in w.messages] == ["user", "assistant", "user", "assistant"]
    assert w.conversation.value.count('class="user"') == 2 and w.conversation.value.count('class="assistant"') == 2
    # an empty text box sends nothing; Clear starts over
    w.text.value = "   "
    w.send_button.click()
    assert len(w.messages) == 4 and not w.busy
    w.clear_button.click()
    assert w.messages == [] and 'class="user"' not in w.conversation.value


def test_tool_calls_and_outputs_are_shown_apart(tok):
    sp = tok.encode_special
    # the model writes <|python_start|>1+2<|python_end|>; the Engine forces <|output_start|>3<|output_end|>; then it ends
    script = {sp("<|assistant_start|>"): sp("<|python_start|>"), sp("<|python_start|>"): ord("1"), ord("1"): ord("+"),
              ord("+"): ord("2"), ord("2"): sp("<|python_end|>"), sp("<|output_end|>"): ord("!"),
              ord("!"): sp("<|assistant_end|>")}
    w = ChatWidget(ScriptedModel(script, sequence_len=256), tok, max_tokens=20, seed=0)
    w.text.value = "what is 1+2?"
    w.send_button.click()
    w.wait()
    assert w.messages[-1]["content"] == [{"type": "python", "text": "1+2"}, {"type": "python_output", "text": "3"},
                                         {"type": "text", "text": "!"}]
    page = w.conversation.value
    assert 'class="tool-call"' in page and "tool call: calculator" in page and 'class="tool-output"' in page
    assert page.index("1+2</div>") < page.index("3</div>") < page.index("!</div>")
    # the next prompt carries the tool call and its output as the special tokens the model was trained on
    tokens = w.prompt_tokens()
    expected_tail = [sp("<|assistant_start|>"), sp("<|python_start|>"), *tok.encode("1+2"), sp("<|python_end|>"),
                     sp("<|output_start|>"), *tok.encode("3"), sp("<|output_end|>"), *tok.encode("!"),
                     sp("<|assistant_end|>")]
    assert tokens[-len(expected_tail) - 1:-1] == expected_tail


def test_stop_ends_the_answer_and_keeps_what_was_written(tok):
    slow = NeverEnds(tiny_gpt(seed=4), tok)
    w = ChatWidget(slow, tok, max_tokens=4096, seed=1, temperature=1.0)
    w.send("go on forever")
    assert w.busy and w.send_button.disabled and not w.stop_button.disabled
    w.send("ignored while busy")
    deadline = time.time() + 60
    while not w.messages[-1]["content"]:
        assert time.time() < deadline, "no text was streamed"
        time.sleep(0.01)
    w.stop_button.click()
    assert not w.busy and not w.send_button.disabled and w.stop_button.disabled
    assert slow.forward_calls < 4096 and answer_text(w)
    assert [m["role"] for m in w.messages] == ["user", "assistant"]


def test_loads_a_checkpoint(base_dir, tok):
    save_byte_tokenizer(base_dir)
    model = save_tiny_model(base_dir, "chatsft_checkpoints", "d2", 3, seed=8)
    # (seeded: this answer holds no tool tokens, so its parts joined are the decoded answer)
    w = ChatWidget(device="cpu", max_tokens=16, seed=2)  # source="sft", the largest tag, the last step
    w.send("hello")
    w.wait()
    from nanochat_nb.tokenizer import get_tokenizer
    t = get_tokenizer()
    prompt = [t.get_bos_token_id(), *turn(t, "user", "hello"), t.encode_special("<|assistant_start|>")]
    assert answer_text(w) == reference(model, t, prompt, max_tokens=16, temperature=0.6, top_k=50, seed=2)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        ChatWidget(model)
    with pytest.raises(FileNotFoundError, match="Train one first"):
        ChatWidget(source="rl", device="cpu")


# ---------------------------------------------------------------- rendered in JupyterLab, driven in headless Chromium

LAB_CELL = '''
import logging; logging.disable(logging.INFO)  # no tokenizer-training log above the widget
import torch
from nanochat_nb.chat_widget import ChatWidget
from nanochat_nb.tokenizer import RustBPETokenizer
from tests.test_engine import tiny_gpt
from tests.test_web_ui import Paced
tok = RustBPETokenizer.train_from_iterator(iter(["hello world"] * 4), 265)
ChatWidget(Paced(tiny_gpt(seed=1), tok, delay=0.01), tok, seed=3)
'''


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver")
def test_widget_in_jupyterlab(tmp_path):
    import nbformat
    from selenium.webdriver.common.by import By
    from tests.test_chat_web import free_port
    from tests.test_web_ui import LENGTH, Paced, chromium, wait_for
    from nanochat_nb.tokenizer import RustBPETokenizer
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LAB_CELL.strip())])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "chat.ipynb")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "OMP_NUM_THREADS": "1",
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}  # no user kernelspec: python3 is this environment's
    lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                            "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}",
                            f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", "--LabApp.expose_app_in_browser=True",
                            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root"],
                           env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    d = chromium()
    d.set_window_size(1200, 1100)
    try:
        def up():
            assert lab.poll() is None, lab.stdout.read()
            try:
                return httpx.get(url + "/api/status").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(up, "JupyterLab to start", timeout=120)
        d.get(url + "/lab/tree/chat.ipynb")
        kernel_idle = """const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
            return !!k && k.status === 'idle';"""
        wait_for(lambda: d.execute_script(kernel_idle), "the kernel", timeout=120)
        d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        box = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".widget-textarea textarea"), "the widget", 120)[0]
        box.send_keys("hello")
        send = [b for b in d.find_elements(By.CSS_SELECTOR, "button.widget-button") if "Send" in b.text][0]
        wait_for(lambda: send.is_enabled(), "the Send button")
        send.click()
        # read in one script: each redraw replaces the conversation's elements
        texts = lambda css: d.execute_script(f"return Array.from(document.querySelectorAll('.nanochat-conversation "
                                             f"{css}')).map(e => e.innerText).join('|')")
        answer = lambda: texts(".assistant")
        wait_for(lambda: len(answer()) == LENGTH, "the streamed answer", timeout=120)
        idle = "return !document.querySelector('.jp-OutputArea').innerText.includes('writing...')"
        wait_for(lambda: send.is_enabled() and d.execute_script(idle), "the end of the answer")
        d.save_screenshot(str(tmp_path / "widget_in_jupyterlab.png"))
        print(f"\nscreenshot: {tmp_path / 'widget_in_jupyterlab.png'}")
        user = texts(".user")
        # the answer in the page is the Engine's for the widget's seed (same model, same tokenizer, same dtype)
        tok = RustBPETokenizer.train_from_iterator(iter(["hello world"] * 4), 265)
        model = Paced(tiny_gpt(seed=1), tok, delay=0.0)
        prompt = [tok.get_bos_token_id(), *turn(tok, "user", "hello"), tok.encode_special("<|assistant_start|>")]
        assert (user, answer()) == ("hello", reference(model, tok, prompt, max_tokens=512, temperature=0.6, top_k=50,
                                                       seed=3))
    finally:
        d.quit()
        for k in httpx.get(url + "/api/kernels").json() if lab.poll() is None else []:
            httpx.delete(f"{url}/api/kernels/{k['id']}")
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGTERM)
        lab.communicate(timeout=60)
