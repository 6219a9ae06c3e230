"""evaluate_bpb against closed forms (a uniform model, a real GPT whose head outputs zeros), and its cross-rank
reduction under torchrun (two ranks on halves of the batches == one process on all of them)."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_nb.loss_eval import evaluate_bpb
from tests.conftest import REPO, run_torchrun


class UniformLM(nn.Module):
    def __init__(self, V):
        super().__init__(); self.V = V; self.p = nn.Parameter(torch.zeros(()))
    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = torch.zeros(*idx.shape, self.V) + self.p
        return F.cross_entropy(logits.view(-1, self.V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)


def batches(V, n, B=3, T=10, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, V, (B, T), generator=g)
        y = torch.randint(0, V, (B, T), generator=g)
        if ignore: y[0, :2] = -1
        out.append((x, y))
    return out


def closed_form(bs, token_bytes, V):
    "Uniform model: each counted target costs ln V nats."
    n, nbytes = 0, 0
    for _, y in bs:
        b = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
        n += (b > 0).sum().item(); nbytes += b.sum().item()
    return n * math.log(V) / (math.log(2) * nbytes)


def test_uniform_model_closed_form():
    V = 50
    token_bytes = torch.randint(1, 6, (V,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    token_bytes[-3:] = 0  # three special tokens
    bs = batches(V, 4)
    assert evaluate_bpb(UniformLM(V), bs, 4, token_bytes) == pytest.approx(closed_form(bs, token_bytes, V), rel=1e-6)
    # uses exactly `steps` batches
    assert evaluate_bpb(UniformLM(V), bs, 1, token_bytes) == pytest.approx(closed_form(bs[:1], token_bytes, V), rel=1e-6)
    with pytest.raises(ValueError, match="ran out"):
        evaluate_bpb(UniformLM(V), bs, 5, token_bytes)


def test_all_specials_is_inf():
    V = 8
    tb = torch.zeros(V, dtype=torch.int32)
    assert evaluate_bpb(UniformLM(V), batches(V, 1), 1, tb) == float("inf")


def test_real_gpt_with_zero_head_is_uniform():
    "A GPT whose lm_head is zero outputs equal logits (softcap keeps 0 at 0): bpb = log2(V)·n/bytes exactly."
    from nanochat_nb.gpt import GPT, config_for_depth
    V = 70
    torch.manual_seed(0)
    model = GPT(config_for_depth(2, head_dim=64, max_seq_len=16, vocab_size=V, window_pattern="L"))
    model.init_weights()
    with torch.no_grad(): model.lm_head.weight.zero_()
    token_bytes = torch.randint(1, 4, (V,), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    bs = batches(V, 2, B=2, T=16)
    assert evaluate_bpb(model, bs, 2, token_bytes) == pytest.approx(closed_form(bs, token_bytes, V), rel=1e-5)


def test_trained_beats_uniform():
    "Sanity in the other direction: a model that knows the next token scores far below the uniform bpb."
    V = 16
    class Oracle(nn.Module):
        def __init__(self): super().__init__(); self.p = nn.Parameter(torch.zeros(()))
        def forward(self, idx, targets, loss_reduction="mean"):
            logits = torch.full((*idx.shape, V), -20.0); logits.scatter_(-1, targets.clamp(min=0).unsqueeze(-1), 20.0)
            return F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction=loss_reduction)
    tb = torch.ones(V, dtype=torch.int32)
    assert evaluate_bpb(Oracle(), batches(V, 2), 2, tb) < 1e-6 < math.log2(V)


WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from nanochat_nb.common import compute_init, compute_cleanup
from nanochat_nb.loss_eval import evaluate_bpb
from tests.test_loss_eval import UniformLM, batches
ddp, rank, _, world, device = compute_init("cpu")
V = 50
tb = torch.arange(V, dtype=torch.int32) % 4  # ids divisible by 4 are "special"
all_batches = batches(V, 4)
bpb = evaluate_bpb(UniformLM(V), all_batches[rank::world], 4 // world, tb)
if rank == 0: json.dump({"bpb": bpb}, open(os.environ["OUT"], "w"))
compute_cleanup()
"""


def test_two_ranks_reduce_to_the_single_process_value(tmp_path):
    import json
    script = tmp_path / "w.py"; script.write_text(WORKER)
    out = tmp_path / "out.json"
    run_torchrun([str(script)], nproc=2, env={"OUT": str(out), "REPO": REPO})
    V = 50
    tb = torch.arange(V, dtype=torch.int32) % 4
    single = evaluate_bpb(UniformLM(V), batches(V, 4), 4, tb)
    assert json.load(open(out))["bpb"] == pytest.approx(single, rel=1e-6)
    assert single == pytest.approx(closed_form(batches(V, 4), tb, V), rel=1e-6)
