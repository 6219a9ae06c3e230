"""Tests of nanochat_nb.dataloader: BOS best-fit packing against a naive reference, invariants, crop vs greedy,
exact resume, two ranks (real torchrun), pinning logic, and errors."""
import json
import logging
import os
import random
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat_nb.dataloader import (_document_batches, _fill_row, _is_cuda, collect_dataloader_state,
                                    tokenizing_distributed_data_loader_bos_bestfit,
                                    tokenizing_distributed_data_loader_with_state_bos_bestfit as loader_with_state)
from nanochat_nb.dataset import MAX_SHARD, get_data_dir, index_to_filename
from tests.conftest import REPO, run_torchrun

BOS = 256


class ByteTokenizer:
    "Stand-in with the RustBPETokenizer interface the loader uses: bytes are tokens 0..255, BOS = 256."
    def get_bos_token_id(self): return BOS
    def encode(self, text, prepend=None, num_threads=None):
        if isinstance(text, str): return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))
        return [self.encode(t, prepend) for t in text]


TOK = ByteTokenizer()


def random_doc(rng, tag):
    n = int(rng.lognormvariate(3.5, 1.0))
    return f"<{tag}>" + "".join(rng.choice("abcdefgh ") for _ in range(n))


def make_shards(data_dir, n_train=3, docs_per_file=60, rg=8, empty_every=11, seed=0):
    "Train shards + val shard; documents are unique (tagged) with a long-tailed length; every k-th one is empty."
    rng = random.Random(seed)
    os.makedirs(data_dir, exist_ok=True)
    names = [index_to_filename(i) for i in range(n_train)] + [index_to_filename(MAX_SHARD)]
    all_docs = {}
    for fi, name in enumerate(names):
        docs = ["" if empty_every and j % empty_every == 3 else (" \n " if empty_every and j % empty_every == 7
                else random_doc(rng, f"f{fi}d{j}")) for j in range(docs_per_file)]
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, name), row_group_size=rg)
        all_docs[name] = docs
    return all_docs


@pytest.fixture
def shards(base_dir):
    return make_shards(get_data_dir())


def take(loader, n):
    "Clone n batches (the loader reuses its buffers) and round-trip each state through JSON like a checkpoint."
    out = []
    for _ in range(n):
        x, y, s = next(loader)
        out.append((x.clone(), y.clone(), json.loads(json.dumps(s))))
    return out


# ----------------------------------------------------------------------------------------------------------------
# an independent, naive reference of the fact sheet's algorithm (world size 1)

def naive_reference_batches(all_docs, B, T, tokenizer_batch_size, buffer_size, n_batches):
    names = sorted(all_docs)[:-1]  # train = all but the last file
    def chunks():
        while True:
            for name in names:
                docs = all_docs[name]
                table = pq.ParquetFile(os.path.join(get_data_dir(), name))
                starts = [0]
                for g in range(table.num_row_groups): starts.append(starts[-1] + table.metadata.row_group(g).num_rows)
                for g in range(table.num_row_groups):
                    rg_docs = docs[starts[g]:starts[g + 1]]
                    for i in range(0, len(rg_docs), tokenizer_batch_size):
                        yield [TOK.encode(d, prepend=BOS) for d in rg_docs[i:i + tokenizer_batch_size] if d.strip()]
    stream, buf, batches = chunks(), [], []
    for _ in range(n_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buf) < buffer_size: buf.extend(next(stream))
                remaining = T + 1 - len(row)
                fitting = [(len(d), -i) for i, d in enumerate(buf) if len(d) <= remaining]
                if fitting:
                    i = -max(fitting)[1]       # largest; ties -> earliest
                    row += buf.pop(i)
                else:
                    i = min(range(len(buf)), key=lambda k: (len(buf[k]), k))  # shortest; ties -> earliest
                    row += buf.pop(i)[:remaining]
            rows.append(row)
        t = torch.tensor(rows)
        batches.append((t[:, :-1], t[:, 1:]))
    return batches


@pytest.mark.parametrize("B,T,tbs,buffer_size", [(4, 32, 5, 16), (2, 100, 128, 50), (3, 17, 3, 1)])
def test_matches_naive_reference(shards, B, T, tbs, buffer_size):
    ref = naive_reference_batches(shards, B, T, tbs, buffer_size, 25)
    got = take(loader_with_state(TOK, B, T, "train", tokenizer_batch_size=tbs, device="cpu", buffer_size=buffer_size), 25)
    for (rx, ry), (x, y, _) in zip(ref, got):
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_packing_invariants(shards):
    docs = {d.encode() for v in shards.values() for d in v if d.strip()}
    for x, y, _ in take(loader_with_state(TOK, 4, 64, "train", device="cpu", buffer_size=20), 30):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == BOS).all()                    # every row starts with BOS
        assert torch.equal(x[:, 1:], y[:, :-1])          # targets are inputs shifted by one
        assert ((x >= 0) & (x <= BOS)).all() and ((y >= 0) & (y <= BOS)).all()  # no padding / ignore ids
        for r in range(4):
            full = x[r].tolist() + [y[r, -1].item()]
            segs = bytes(t if t < 256 else 0 for t in full).split(b"\0")[1:]
            for i, s in enumerate(segs):  # each BOS-delimited piece is a real document or a prefix of one
                assert (s or i == len(segs) - 1) and any(d.startswith(s) for d in docs), s  # only a final crop can be BOS alone


def test_empty_documents_skipped(shards):
    stream = _document_batches("train", None, tokenizer_batch_size=4)
    for _ in range(40):
        texts, rows, (pq_idx, rg_idx, epoch, end) = next(stream)
        assert all(t.strip() for t in texts) and len(texts) == len(rows)
        assert all(r % 11 not in (3, 7) for r in [rg_idx * 8 + r for r in rows])


def test_val_split_reads_only_val_shard(shards):
    x, y, s = next(loader_with_state(TOK, 2, 16, "val", device="cpu", buffer_size=4))
    assert s["pq_idx"] == 0 and bytes(x[0, 1:5].tolist()) == b"<f3d"


def test_bestfit_crops_less_than_greedy(shards):
    rng = random.Random(3)
    docs = [TOK.encode(random_doc(rng, str(i)), prepend=BOS) for i in range(4000)]
    cap = 129
    # naive greedy-crop: documents in order, the one that does not fit is cropped to fill the row
    used = total = pos = 0
    for d in docs[:3000]:
        total += len(d); n = min(len(d), cap - pos); used += n; pos += n
        if pos == cap: pos = 0
    greedy = 1 - used / total
    # best-fit through the loader's own row filler, on the same documents
    it, buf, refs, row, cropped, taken = iter(docs), [], [], torch.empty(cap, dtype=torch.long), 0, 0
    def refill():
        while len(buf) < 100: buf.append(next(it)); refs.append(None)
    while taken < total:
        c = _fill_row(buf, refs, row, cap, refill)
        cropped += c; taken += cap + c
        assert row[0] == BOS
    bestfit = cropped / taken
    assert bestfit < greedy * 0.8, (bestfit, greedy)


def test_fill_row_picks_largest_fit_then_crops_shortest():
    docs = [[BOS] + [1] * (n - 1) for n in (6, 3, 10, 4, 10)]
    buf, refs, row = [list(d) for d in docs], list("abcde"), torch.full((12,), -1)
    assert _fill_row(buf, refs, row, 12, lambda: None) == 1
    assert row.tolist() == docs[2] + [BOS, 1] and refs == ["a", "d", "e"]  # first of the two 10s; 'b' cropped 3 -> 2


# ----------------------------------------------------------------------------------------------------------------
# exact resume

@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_resume_continues_identical_stream(shards, k):
    kw = dict(B=3, T=40, split="train", device="cpu", buffer_size=12, tokenizer_batch_size=5)
    full = take(loader_with_state(TOK, **kw), k + 10)
    resumed = take(loader_with_state(TOK, resume_state_dict=full[k - 1][2], **kw), 10)
    for (xa, ya, sa), (xb, yb, sb) in zip(full[k:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb
    # and a resumed run can itself be resumed
    again = take(loader_with_state(TOK, resume_state_dict=resumed[4][2], **kw), 3)
    for (xa, _, _), (xb, _, _) in zip(full[k + 5:], again): assert torch.equal(xa, xb)


def test_resume_across_epochs(shards):
    kw = dict(B=4, T=64, split="train", device="cpu", buffer_size=30, tokenizer_batch_size=8)
    full = take(loader_with_state(TOK, **kw), 60)
    epochs = [s["epoch"] for _, _, s in full]
    assert epochs[-1] >= 3
    k = epochs.index(2)  # resume right at the first batch of epoch 2
    resumed = take(loader_with_state(TOK, resume_state_dict=full[k][2], **kw), 59 - k)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[k + 1:], resumed))


def test_state_is_small_and_keeps_original_keys(shards):
    _, _, s = next(loader_with_state(TOK, 2, 32, "train", device="cpu", buffer_size=50))
    assert {"pq_idx", "rg_idx", "epoch"} <= set(s) and s["epoch"] == 1
    assert sum(len(rows) for *_, rows in s["buffer"]) >= 50 - 2 * 33
    assert len(json.dumps(s)) < 2000


def test_original_format_state_resumes_approximately(shards, caplog):
    kw = dict(B=2, T=32, split="train", device="cpu", buffer_size=4, tokenizer_batch_size=8)
    full = take(loader_with_state(TOK, **kw), 6)
    s = full[-1][2]
    old = {k: s[k] for k in ("pq_idx", "rg_idx", "epoch")}
    with caplog.at_level(logging.WARNING):
        x, _, s2 = next(loader_with_state(TOK, resume_state_dict=old, **kw))
    assert "approximately" in caplog.text
    # the original's rule: skip to the next row-group stride of the same file
    assert (s2["pq_idx"], s2["rg_idx"]) >= (old["pq_idx"], old["rg_idx"] + 1)
    # a state of another tokenizer batch size is not applied exactly either
    with caplog.at_level(logging.WARNING):
        next(loader_with_state(TOK, resume_state_dict=s, **{**kw, "tokenizer_batch_size": 4}))


def test_state_of_other_world_size_is_approximate(shards, monkeypatch):
    kw = dict(B=2, T=32, split="train", device="cpu", buffer_size=4, tokenizer_batch_size=8)
    s = take(loader_with_state(TOK, **kw), 3)[-1][2]
    monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("LOCAL_RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "2")
    x, _, s2 = next(loader_with_state(TOK, resume_state_dict=s, **kw))
    assert s2["rank"] == 1 and s2["world_size"] == 2 and s2["rg_idx"] % 2 == 1


def test_without_state_variant_yields_same_batches(shards):
    kw = dict(device="cpu", buffer_size=10)
    a = tokenizing_distributed_data_loader_bos_bestfit(TOK, 2, 24, "train", **kw)
    b = loader_with_state(TOK, 2, 24, "train", **kw)
    for _ in range(5):
        xa, ya = next(a); xb, yb, _ = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_collect_state_single_process_is_identity():
    s = {"pq_idx": 0, "rg_idx": 1, "epoch": 1}
    assert collect_dataloader_state(s) is s


# ----------------------------------------------------------------------------------------------------------------
# two ranks, real torchrun (gloo)

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {here!r})
    from nanochat_nb.common import compute_init, compute_cleanup
    from nanochat_nb.dataloader import (_document_batches, collect_dataloader_state,
                                        tokenizing_distributed_data_loader_with_state_bos_bestfit as L)
    from test_dataloader import TOK
    ddp, rank, _, world, device = compute_init("cpu")
    # one epoch of the document stream: which documents does this rank see?
    seen, stream = [], _document_batches("train", None, 4)
    while True:
        texts, rows, (p, g, epoch, end) = next(stream)
        if epoch > 1: break
        seen += texts
    kw = dict(B=2, T=32, split="train", device="cpu", buffer_size=8, tokenizer_batch_size=4)
    loader = L(TOK, **kw)
    batches = [next(loader) for _ in range(3)]
    assert collect_dataloader_state(None) is None
    state = collect_dataloader_state(batches[-1][2])
    assert collect_dataloader_state(state) is state  # already collected (e.g. a save right after resume)
    cont = [next(loader)[0].clone() for _ in range(4)]
    resumed = L(TOK, resume_state_dict=json.loads(json.dumps(state)), **kw)
    exact = all(torch.equal(next(resumed)[0], c) for c in cont)
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
        json.dump(dict(seen=seen, exact=exact, per_rank=len(state["per_rank"]), rank_in_state=batches[-1][2]["rank"]), f)
    compute_cleanup()
""")


def test_two_ranks_see_disjoint_documents_and_resume_exactly(shards, tmp_path, base_dir):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(repo=REPO, here=os.path.dirname(__file__), out=str(tmp_path)))
    run_torchrun([str(script)], nproc=2, env={"NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DTYPE": "float32"}, timeout=240)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["seen"] and r1["seen"] and not set(r0["seen"]) & set(r1["seen"])
    train_docs = {d for name, v in shards.items() if name != index_to_filename(MAX_SHARD) for d in v if d.strip()}
    assert set(r0["seen"]) | set(r1["seen"]) == train_docs          # together: every train document once
    assert r0["exact"] and r1["exact"] and r0["per_rank"] == r1["per_rank"] == 2
    assert (r0["rank_in_state"], r1["rank_in_state"]) == (0, 1)


# ----------------------------------------------------------------------------------------------------------------
# device handling and errors

def test_pinning_decision_accepts_device_objects():
    # appendix B item 5: base_train passes torch.device("cuda"), which the original's `device == "cuda"` missed
    assert _is_cuda("cuda") and _is_cuda("cuda:1") and _is_cuda(torch.device("cuda")) and _is_cuda(torch.device("cuda", 0))
    assert not _is_cuda("cpu") and not _is_cuda(torch.device("cpu")) and not _is_cuda("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu(shards):
    kw = dict(B=2, T=32, split="train", buffer_size=8)
    for (xc, yc, _), (xg, yg, _) in zip(take(loader_with_state(TOK, device="cpu", **kw), 3),
                                        take(loader_with_state(TOK, device=torch.device("cuda"), **kw), 3)):
        assert xg.is_cuda and torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


def test_no_data_error_says_how_to_get_data(base_dir):
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat_nb.dataset -n 8.*--offline"):
        next(tokenizing_distributed_data_loader_bos_bestfit(TOK, 2, 8, "train", device="cpu"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_shard_is_named(shards, damage):
    bad = os.path.join(get_data_dir(), "shard_00001.parquet")
    if damage == "truncate":
        with open(bad, "r+b") as f: f.truncate(os.path.getsize(bad) - 50)
    else:
        open(bad, "wb").write(os.urandom(3000))
    with pytest.raises(RuntimeError, match=r"shard_00001\.parquet is corrupt"):
        take(loader_with_state(TOK, 4, 64, "train", device="cpu", buffer_size=40), 30)


def test_all_empty_documents_is_an_error(base_dir):
    d = get_data_dir()
    os.makedirs(d)
    for name in (index_to_filename(0), index_to_filename(MAX_SHARD)):
        pq.write_table(pa.table({"text": ["", "  ", None]}), os.path.join(d, name))
    with pytest.raises(RuntimeError, match="no non-empty documents"):
        next(loader_with_state(TOK, 2, 8, "train", device="cpu"))


def test_bad_arguments(shards):
    with pytest.raises(AssertionError, match="split must be"):
        next(loader_with_state(TOK, 2, 8, "test", device="cpu"))
    with pytest.raises(ValueError, match="B and T must be positive"):
        next(loader_with_state(TOK, 0, 8, "train", device="cpu"))
