"""ChatWidget driven through its controls in Python (set the text, click the buttons, move the sliders), checked
against Engine.generate_batch and the rendered conversation; tool calls from a scripted model; stop and clear."""
import html
import time

import pytest
import torch

from nanochat_nb.chat_widget import ChatWidget
from nanochat_nb.engine import Engine
from tests.test_chat_cli import save_byte_tokenizer, save_tiny_model
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
    def forward(self, ids, kv_cache=None):
        logits = self.model.forward(ids, kv_cache=kv_cache)
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
