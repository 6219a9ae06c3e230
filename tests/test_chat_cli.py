"""chat_cli: -p against tiny checkpoints saved in a tmp base dir (source/tag/step selection), an interactive session,
and the clear message when there is no checkpoint."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from tests.conftest import REPO

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def save_byte_tokenizer(base_dir):
    "Train the smallest possible tokenizer (256 byte tokens + the 9 specials = vocab 265) and save it where tok_train does."
    from nanochat_nb.tokenizer import RustBPETokenizer
    tok = RustBPETokenizer.train_from_iterator(iter(["hello world, why is the sky blue?"] * 4), 265)
    assert tok.get_vocab_size() == 265
    tok.save(os.path.join(base_dir, "tokenizer"))


def save_tiny_model(base_dir, source_dir, tag, step, seed):
    "A random depth-2 GPT saved in the original checkpoint layout; returns the model."
    from nanochat_nb.checkpoint_manager import save_checkpoint
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=512, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    save_checkpoint(os.path.join(base_dir, source_dir, tag), step, model.state_dict(), None,
                    {"step": step, "model_config": asdict(config)})
    return model.eval()


def expected_reply(model, prompt_text):
    "What chat_cli must print for one -p turn at temperature 0: the Engine's greedy reply, decoded token by token."
    from nanochat_nb.engine import Engine
    from nanochat_nb.tokenizer import get_tokenizer
    tok = get_tokenizer()
    sp = tok.encode_special
    conv = [tok.get_bos_token_id(), sp("<|user_start|>"), *tok.encode(prompt_text), sp("<|user_end|>"),
            sp("<|assistant_start|>")]
    reply = [c[0] for c, _ in Engine(model, tok).generate(conv, num_samples=1, max_tokens=256, temperature=0.0, top_k=50)]
    return "".join(tok.decode([t]) for t in reply), conv, reply


def run_cli(args, base_dir, timeout=180):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "nanochat_nb.chat_cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


def test_no_checkpoint_gives_a_clear_message(base_dir):
    proc = run_cli(["-p", "hello", "--device-type", "cpu"], base_dir)
    assert proc.returncode == 1
    assert "there is no 'sft' checkpoint to chat with" in proc.stderr
    assert "chatsft_checkpoints" in proc.stderr and "Train one first" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flags_are_rejected_by_argparse(capsys):
    from nanochat_nb.chat_cli import main
    for argv, message in [(["-i", "nonsense", "-p", "hi"], "invalid choice: 'nonsense'"),
                          (["-t", "-1", "-p", "hi"], "--temperature must be >= 0"),
                          (["--device-type", "tpu"], "invalid choice: 'tpu'")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_prompt_mode_loads_source_tag_and_step(base_dir, capsys):
    from nanochat_nb.chat_cli import main
    save_byte_tokenizer(base_dir)
    model_a = save_tiny_model(base_dir, "base_checkpoints", "d2", 5, seed=1)
    model_b = save_tiny_model(base_dir, "base_checkpoints", "d2", 10, seed=2)
    model_c = save_tiny_model(base_dir, "chatsft_checkpoints", "mytag", 3, seed=3)
    replies = {name: expected_reply(m, "Why is the sky blue?")[0] for name, m in
               [("a", model_a), ("b", model_b), ("c", model_c)]}
    assert len(set(replies.values())) == 3, "the three models must answer differently for this test to mean anything"
    cases = [(["-i", "base", "-s", "5"], "a"), (["-i", "base"], "b"),  # no -s: the last step
             (["-i", "sft", "-g", "mytag"], "c")]
    for extra, name in cases:
        main([*extra, "-p", "Why is the sky blue?", "-t", "0", "--device-type", "cpu"])
        out = capsys.readouterr().out
        assert "\nAssistant: " + replies[name] + "\n" in out, (extra, name)
    # a step that was not saved: a clear message that lists the steps there are
    with pytest.raises(SystemExit) as e:
        main(["-i", "base", "-s", "99", "-p", "hi", "--device-type", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "no 'base' checkpoint to chat with" in err and "[5, 10]" in err
    # `python -m nanochat_nb.chat_cli` works, with the default source (sft) and its only tag
    proc = run_cli(["-p", "Why is the sky blue?", "-t", "0", "--device-type", "cpu"], base_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NanoChat Interactive Mode" in proc.stdout
    assert "\nAssistant: " + replies["c"] + "\n" in proc.stdout


def test_interactive_session(base_dir, monkeypatch, capsys):
    from nanochat_nb.chat_cli import main
    save_byte_tokenizer(base_dir)
    model = save_tiny_model(base_dir, "chatrl_checkpoints", "d2", 1, seed=4)
    text, conv, reply = expected_reply(model, "hi")
    lines = iter(["", "hi", "clear", "hi", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    conversation = main(["-i", "rl", "-t", "0", "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert out.count("\nAssistant: " + text + "\n") == 2 and "Conversation cleared." in out and "Goodbye!" in out
    # after "clear" the conversation restarted: it holds exactly one turn, closed with <|assistant_end|>
    from nanochat_nb.tokenizer import get_tokenizer
    end = get_tokenizer().encode_special("<|assistant_end|>")
    assert conversation == conv + reply + ([] if reply[-1] == end else [end])


def test_eof_ends_the_session(base_dir, monkeypatch, capsys):
    from nanochat_nb.chat_cli import main
    save_byte_tokenizer(base_dir)
    save_tiny_model(base_dir, "chatsft_checkpoints", "d2", 1, seed=5)
    def eof(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", eof)
    conversation = main(["--device-type", "cpu"])
    assert "Goodbye!" in capsys.readouterr().out and len(conversation) == 1


def test_runner_script_exists_and_forwards():
    src = open(os.path.join(REPO, "runs", "chat_cli.py")).read()
    assert "from nanochat_nb.chat_cli import main" in src and "main()" in src
