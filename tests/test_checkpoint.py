"""checkpoint_manager: round trip of a real GPT through save -> load_model, legacy-checkpoint patching, atomic files,
find_last_step / find_largest_model, and clear errors when there is nothing to load."""
import json
import os

import pytest
import torch

from nanochat_nb import checkpoint_manager as cm
from nanochat_nb.checkpoint_manager import (find_largest_model, find_last_step, load_checkpoint, load_model,
                                            load_optimizer_state, save_checkpoint)


@pytest.fixture
def tiny(base_dir):
    "A tiny tokenizer in base_dir and a freshly initialised GPT of matching vocab."
    from tests.base_train_worker import make_tokenizer
    from nanochat_nb.gpt import GPT, config_for_depth
    tok = make_tokenizer(str(base_dir))
    config = config_for_depth(2, head_dim=64, max_seq_len=32, vocab_size=tok.get_vocab_size(), window_pattern="L")
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    return model, tok


def _save(model, base_dir, step, tag="d2", source_dir="base_checkpoints", optimizer=None, meta_extra=None):
    from dataclasses import asdict
    d = os.path.join(base_dir, source_dir, tag)
    meta = {"step": step, "model_config": asdict(model.config), **(meta_extra or {})}
    save_checkpoint(d, step, model.state_dict(), optimizer.state_dict() if optimizer else None, meta)
    return d


def test_round_trip_base_and_sft(tiny, base_dir):
    model, tok = tiny
    opt = model.setup_optimizer()
    x = torch.randint(0, tok.get_vocab_size(), (2, 16))
    model(x, x).backward(); opt.step(); model.zero_grad(set_to_none=True)
    _save(model, base_dir, 7, optimizer=opt)
    _save(model, base_dir, 3, tag="d2", source_dir="chatsft_checkpoints")
    loaded, tok2, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 7 and not loaded.training and tok2.get_vocab_size() == tok.get_vocab_size()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k].float(), sd2[k].float()) for k in sd)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # optimizer shard round trip, and a fresh optimizer accepts it
    state = load_optimizer_state("base", "cpu", rank=0)
    opt2 = loaded.setup_optimizer(); opt2.load_state_dict(state)
    assert load_optimizer_state("sft", "cpu", rank=0) is None  # saved without an optimizer
    sft, _, sft_meta = load_model("sft", "cpu", "train", model_tag="d2", step=3)
    assert sft.training and sft_meta["step"] == 3


def test_compiled_prefix_and_legacy_patching(tiny, base_dir):
    "Old checkpoints: keys with torch.compile's _orig_mod. prefix, no window_pattern, no resid/x0 lambdas."
    model, tok = tiny
    d = os.path.join(base_dir, "base_checkpoints", "d2")
    from dataclasses import asdict
    cfg = asdict(model.config); cfg.pop("window_pattern")
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    save_checkpoint(d, 1, sd, None, {"step": 1, "model_config": cfg})
    loaded, _, meta = load_model("base", "cpu", "eval", model_tag="d2", step=1)
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas.float(), torch.ones(2)) and torch.equal(loaded.x0_lambdas.float(), torch.zeros(2))


def test_vocab_mismatch_is_clear(tiny, base_dir):
    model, tok = tiny
    from dataclasses import asdict
    d = os.path.join(base_dir, "base_checkpoints", "d2")
    cfg = asdict(model.config)
    # one token fewer pads to the same embedding rows, so the weights load and the vocab check must catch it
    save_checkpoint(d, 1, model.state_dict(), None, {"step": 1, "model_config": {**cfg, "vocab_size": cfg["vocab_size"] - 1}})
    with pytest.raises(AssertionError, match="Tokenizer vocab size"):
        load_model("base", "cpu", "eval")


def test_no_checkpoint_errors_name_the_directory(base_dir):
    with pytest.raises(FileNotFoundError, match=r"base_checkpoints.*base_train"):
        load_model("base", "cpu", "eval")
    os.makedirs(base_dir / "base_checkpoints" / "d4")
    with pytest.raises(FileNotFoundError, match=r"d4.*base_train"):
        load_model("base", "cpu", "eval")
    with pytest.raises(ValueError, match="base, sft, rl"):
        load_model("mid", "cpu", "eval")


def test_find_last_step_integer_max_and_strict_names(tmp_path):
    for name in ["model_000999.pt", "model_001000.pt", "model_12345678.pt", "model_best.pt", "model_002000.pt.tmp",
                 "model_003000_copy.pt", "optim_900000_rank0.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert find_last_step(str(tmp_path)) == 12345678


def test_find_largest_model(tmp_path):
    for tag in ["d8", "d26", "d3x", "foo"]:
        (tmp_path / tag).mkdir()
    assert find_largest_model(str(tmp_path)) == "d26"
    other = tmp_path / "other"; other.mkdir()
    (other / "old").mkdir(); (other / "new").mkdir()
    os.utime(other / "old", (1, 1))
    assert find_largest_model(str(other)) == "new"


def test_files_are_written_atomically(tmp_path, monkeypatch):
    "A crash while writing leaves neither a partial file nor a temporary file behind."
    def boom(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(cm.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(str(tmp_path), 1, {"w": torch.ones(1)}, None, {"step": 1})
    assert os.listdir(tmp_path) == []


def test_rng_state_round_trip(tmp_path):
    cm.save_rng_state(str(tmp_path), 3, rank=1)
    a = torch.rand(4)
    torch.manual_seed(999)
    assert cm.load_rng_state(str(tmp_path), 3, rank=1)
    assert torch.equal(torch.rand(4), a)
