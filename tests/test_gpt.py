"""Tests of nanochat_nb.gpt and nanochat_nb.fp8: shapes and state_dict names, closed-form and reference parameter
counts and FLOPs, init statistics, KV-cache decoding equal to the full forward (windows, GQA), the loss, generation,
optimizer groups, learning, and fp8 (arithmetic on CPU and the fallback). Run in fp32 (conftest)."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat_nb.common import COMPUTE_DTYPE
from nanochat_nb.gpt import (GPT, softcap_logits, GPTConfig, Linear, apply_rotary_emb, build_model_meta, config_for_depth, has_ve, norm,
                             softcap_cross_entropy)
from nanochat_nb import fp8
from tests.conftest import REPO


class KVCache:
    "Minimal cache with the engine's KVCache interface (fact sheet 11.1), independent of nanochat_nb.engine."
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device="cpu", dtype=COMPUTE_DTYPE):
        self.n_layers = num_layers
        self.k_cache = torch.zeros(num_layers, batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.prev_embedding = None

    def get_pos(self): return int(self.cache_seqlens[0])
    def get_layer_cache(self, i): return self.k_cache[i], self.v_cache[i]
    def advance(self, n): self.cache_seqlens += n


def make_model(seed=0, **kw):
    cfg = GPTConfig(**{**dict(sequence_len=64, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64), **kw})
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def perturb_scalars(model):
    "Give smear, backout and the lambdas non-trivial values so the cache path must get all of them right."
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
        model.backout_lambda.fill_(0.3)
        model.smear_gate.weight.normal_(0, 0.5)
        model.x0_lambdas.add_(0.3)
        for block in model.transformer.h:  # zero-init projections would hide attention/MLP bugs
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.05)


def decode_logits(model, idx, n_prefill):
    c = model.config
    cache = KVCache(idx.size(0), c.n_kv_head, idx.size(1) + 3, c.n_embd // c.n_head, c.n_layer)
    outs = [model(idx[:, :n_prefill], kv_cache=cache)]
    assert cache.get_pos() == n_prefill
    for t in range(n_prefill, idx.size(1)):
        outs.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == idx.size(1)
    return torch.cat(outs, 1)


# ---------------------------------------------------------------- config, shapes, state_dict

def test_config_defaults_and_depth_mapping():
    assert GPTConfig() == GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                                    window_pattern="SSSL")
    table = {4: (256, 2), 6: (384, 3), 8: (512, 4), 10: (640, 5), 12: (768, 6), 16: (1024, 8), 20: (1280, 10),
             24: (1536, 12), 25: (1664, 13), 26: (1664, 13), 32: (2048, 16)}
    for d, (C, H) in table.items():
        cfg = config_for_depth(d)
        assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (d, C, H, H)
    cfg = config_for_depth(3, aspect_ratio=32, head_dim=64, max_seq_len=256, vocab_size=1000, window_pattern="L")
    assert (cfg.n_embd, cfg.n_head, cfg.sequence_len, cfg.vocab_size, cfg.window_pattern) == (128, 2, 256, 1000, "L")
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(0)


def test_state_dict_names_and_shapes_match_nanochat():
    model = make_model(vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)  # Vp = 128, head_dim 16, kv 32
    expected = {"transformer.wte.weight": (128, 64), "lm_head.weight": (128, 64), "resid_lambdas": (2,),
                "x0_lambdas": (2,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,),
                "value_embeds.1.weight": (128, 32), "transformer.h.1.attn.ve_gate.weight": (2, 12)}
    for i in range(2):
        p = f"transformer.h.{i}."
        expected.update({p + "attn.c_q.weight": (64, 64), p + "attn.c_k.weight": (32, 64), p + "attn.c_v.weight": (32, 64),
                         p + "attn.c_proj.weight": (64, 64), p + "mlp.c_fc.weight": (256, 64), p + "mlp.c_proj.weight": (64, 256)})
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert "cos" not in sd and "sin" not in sd
    assert all(isinstance(m, Linear) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def test_checkpoint_round_trip_into_meta_model():
    a = make_model(seed=1)
    perturb_scalars(a)
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.device("meta"):
        b = GPT(a.config)
    b.load_state_dict(sd, strict=True, assign=True)
    b.cos, b.sin = b._precompute_rotary_embeddings(b.rotary_seq_len, 16, device="cpu")  # as checkpoint loading does
    idx = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(a(idx), b(idx), atol=0, rtol=0)


def test_window_sizes_and_ve_layers():
    m = build_model_meta(12)
    assert m.window_sizes == [(512, 0)] * 3 + [(2048, 0)] + [(512, 0)] * 3 + [(2048, 0)] + [(512, 0)] * 3 + [(2048, 0)]
    assert build_model_meta(5, window_pattern="L").window_sizes == [(2048, 0)] * 5
    assert build_model_meta(3, window_pattern="sls").window_sizes == [(512, 0), (2048, 0), (2048, 0)]  # last forced L
    for T, short in [(2048, 512), (512, 128), (1000, 256), (64, 128), (1024, 256), (2049, 640)]:
        assert build_model_meta(2, max_seq_len=T, window_pattern="S").window_sizes[0] == (short, 0)
    assert sorted(m.value_embeds.keys(), key=int) == ["1", "3", "5", "7", "9", "11"]
    assert [i for i in range(13) if has_ve(i, 13)] == list(range(0, 13, 2))
    assert [b.attn.ve_gate is not None for b in m.transformer.h] == [has_ve(i, 12) for i in range(12)]


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="window_pattern"):
        GPT(GPTConfig(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, vocab_size=64, window_pattern="SLX"))
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        with torch.device("meta"): GPT(GPTConfig(n_head=6, n_kv_head=4))
    with pytest.raises(ValueError, match="n_head"):
        with torch.device("meta"): GPT(GPTConfig(n_embd=100, n_head=6))
    with pytest.raises(ValueError, match="24"):
        with torch.device("meta"): GPT(GPTConfig(n_embd=16, n_head=1, n_kv_head=1))
    model = make_model()
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(AssertionError, match="rotary"):
        model(torch.zeros(1, 641, dtype=torch.long))


# ---------------------------------------------------------------- counts and flops

# FLOPs/token as printed in the fact sheet (appendix A, and 5.9 where it gives 4 significant digits)
APPENDIX_A = {4: (36_700_242, 11_534_384, "8.02e7"), 8: (125_829_354, 41_943_232, "2.96e8"),
              12: (286_261_730, 110_100_912, "7.597e8"), 16: (536_871_738, 234_881_792, "1.59e9"),
              20: (896_533_746, 435_160_240, "2.886e9"), 24: (1_384_122_122, 729_810_624, "4.775e9"),
              26: (1_681_786_938, 918_423_532, "5.991e9"), 32: (2_818_575_450, 1_677_724_672, "1.08e10")}


@pytest.mark.parametrize("depth", sorted(APPENDIX_A))
def test_reference_counts_and_flops(depth):
    total, scaling, flops = APPENDIX_A[depth]
    m = build_model_meta(depth)
    n = m.num_scaling_params()
    assert n["total"] == total
    assert n["transformer_matrices"] + n["lm_head"] == scaling
    assert n["total"] == sum(p.numel() for p in m.parameters())
    decimals = len(flops.split("e")[0].split(".")[1])  # compare at the fact sheet's precision
    assert float(f"{m.estimate_flops():.{decimals}e}") == float(flops)


def test_counts_and_flops_closed_form_small_config():
    V, Vp, C, L, H, Hkv, T = 100, 128, 64, 3, 4, 2, 512
    D = C // H
    m = GPT.__new__(GPT)  # build on meta
    with torch.device("meta"):
        m = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=L, n_head=H, n_kv_head=Hkv, n_embd=C, window_pattern="SL"))
    n_ve = (L + 1) // 2  # layers 0 and 2
    per_layer = C * H * D + 2 * C * Hkv * D + C * C + 8 * C * C
    matrices = L * per_layer + n_ve * 12 * Hkv
    expected = {"wte": Vp * C, "value_embeds": n_ve * Vp * Hkv * D, "lm_head": Vp * C, "transformer_matrices": matrices,
                "scalars": 2 * L + 24 + 2}
    expected["total"] = sum(expected.values())
    assert m.num_scaling_params() == expected
    windows = [128, 512, 512]  # S, L, and the last layer forced to L
    assert [w for w, _ in m.window_sizes] == windows
    expected_flops = 6 * (matrices + Vp * C + 24) + sum(12 * H * D * min(w, T) for w in windows)
    assert m.estimate_flops() == expected_flops


def test_inference_estimates_closed_form():
    with torch.device("meta"):
        m = GPT(GPTConfig(sequence_len=512, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL"))
    H, D, Hkv = 4, 16, 2
    n_matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    for ctx in (1, 50, 128, 129, 600):
        keys = [min(ctx, 128), min(ctx, 512), min(ctx, 512)]
        assert m.estimate_decode_flops(ctx) == 2 * n_matmul + sum(4 * H * D * k for k in keys)
        assert m.kv_bytes_read_per_decode_step(ctx, torch.bfloat16) == sum(2 * Hkv * D * 2 * k for k in keys)
    for T in (1, 100, 128, 300, 512):
        assert m.estimate_prefill_flops(T) == sum(m.estimate_decode_flops(c) for c in range(1, T + 1))
    assert m.kv_bytes_per_token(torch.float32) == 3 * 2 * Hkv * D * 4
    assert m.kv_bytes_per_token() == 3 * 2 * Hkv * D * torch.empty(0, dtype=COMPUTE_DTYPE).element_size()


# ---------------------------------------------------------------- init

def test_init_statistics():
    C, L = 256, 4
    m = make_model(vocab_size=2048, n_layer=L, n_head=4, n_kv_head=4, n_embd=C)
    s = math.sqrt(3) / math.sqrt(C)
    wte = m.transformer.wte.weight.float()
    assert abs(wte.mean()) < 0.01 and abs(wte.std() - 0.8) < 0.01
    assert abs(m.lm_head.weight.std() - 0.001) < 2e-5
    for b in m.transformer.h:
        for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight):
            assert w.abs().max() <= s and abs(w.std() - 1 / math.sqrt(C)) < 0.005  # uniform(-s, s) has std 1/sqrt(C)
        assert b.mlp.c_fc.weight.abs().max() <= 0.4 * s and abs(b.mlp.c_fc.weight.std() - 0.4 / math.sqrt(C)) < 0.002
        assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
        if b.attn.ve_gate is not None:
            assert 0 <= b.attn.ve_gate.weight.min() and b.attn.ve_gate.weight.max() <= 0.02
    for ve in m.value_embeds.values():
        assert ve.weight.float().abs().max() <= s and abs(ve.weight.float().std() - 1 / math.sqrt(C)) < 0.005
    idx = torch.arange(L, dtype=torch.float32)
    torch.testing.assert_close(m.resid_lambdas.data, 1.15 - 0.10 * idx / (L - 1))
    torch.testing.assert_close(m.x0_lambdas.data, 0.20 - 0.15 * idx / (L - 1))
    assert m.smear_lambda.item() == 0.0 and abs(m.backout_lambda.item() - 0.2) < 1e-7  # fix 1: initialised
    assert 0 <= m.smear_gate.weight.min() and m.smear_gate.weight.max() <= 0.02 and m.smear_gate.weight.std() > 0
    assert m.transformer.wte.weight.dtype == COMPUTE_DTYPE and m.lm_head.weight.dtype == torch.float32
    assert all(ve.weight.dtype == COMPUTE_DTYPE for ve in m.value_embeds.values())
    assert m.cos.device.type == "cpu" and m.cos.dtype == COMPUTE_DTYPE and m.cos.shape == (1, 640, 1, 32)
    one_layer = make_model(n_layer=1)
    assert one_layer.resid_lambdas.item() == pytest.approx(1.15) and one_layer.x0_lambdas.item() == pytest.approx(0.2)


def test_init_is_deterministic_and_overwrites_garbage():
    a, b = make_model(seed=3), make_model(seed=3)
    with torch.no_grad():
        b.smear_lambda.fill_(float("nan")); b.backout_lambda.fill_(1e30)
    torch.manual_seed(3)
    b.init_weights()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# ---------------------------------------------------------------- components

def test_rotary_split_halves_convention_and_relative_positions():
    D = 8
    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    theta = torch.tensor([0.3, 0.1, 0.02, 0.001], dtype=torch.float64)
    y = apply_rotary_emb(x, theta.cos().view(1, 1, 1, -1), theta.sin().view(1, 1, 1, -1))
    x1, x2 = x[..., :4], x[..., 4:]
    torch.testing.assert_close(y[..., :4], x1 * theta.cos() + x2 * theta.sin())  # rotation by -theta, split halves
    torch.testing.assert_close(y[..., 4:], -x1 * theta.sin() + x2 * theta.cos())
    m = make_model(n_embd=64, n_head=4)
    cos, sin = m._precompute_rotary_embeddings(20, 16, device="cpu")
    inv_freq = 1.0 / (100000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(cos[0, 5, 0].float(), torch.cos(5 * inv_freq).to(COMPUTE_DTYPE).float())
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dot = lambda a, b: (apply_rotary_emb(q, cos[:, a:a + 1], sin[:, a:a + 1]) * apply_rotary_emb(k, cos[:, b:b + 1], sin[:, b:b + 1])).sum()
    torch.testing.assert_close(dot(9, 4), dot(15, 10), atol=1e-5, rtol=1e-5)


def test_linear_casts_weight_to_activation_dtype_and_norm():
    lin = Linear(8, 3, bias=False)
    x = torch.randn(2, 8)
    assert lin(x.bfloat16()).dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin(x), x @ lin.weight.t())
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt())


def reference_forward(model, idx):
    "An independent, loop-based restatement of fact sheet 5.5-5.7 (fp32), used to check GPT.forward."
    c = model.config
    B, T = idx.shape
    H, Hkv, D = c.n_head, c.n_kv_head, c.n_embd // c.n_head
    rms = lambda t: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)
    W = lambda lin: lin.weight.float()
    x = rms(model.transformer.wte.weight.float()[idx])
    e = x.clone()
    for t in range(1, T):
        g = model.smear_lambda.float() * torch.sigmoid(e[:, t, :24] @ W(model.smear_gate).t())
        x[:, t] = e[:, t] + g * e[:, t - 1]
    x0 = x
    pos = torch.arange(T, dtype=torch.float32)
    inv_freq = 1.0 / (100000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.outer(pos, inv_freq)[None, :, None]

    def rope(t):
        t1, t2 = t[..., :D // 2], t[..., D // 2:]
        return torch.cat([t1 * ang.cos() + t2 * ang.sin(), -t1 * ang.sin() + t2 * ang.cos()], -1)
    for i, block in enumerate(model.transformer.h):
        a = block.attn
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        h = rms(x)
        q = (h @ W(a.c_q).t()).view(B, T, H, D)
        k = (h @ W(a.c_k).t()).view(B, T, Hkv, D)
        v = (h @ W(a.c_v).t()).view(B, T, Hkv, D)
        if a.ve_gate is not None:
            ve = model.value_embeds[str(i)].weight.float()[idx].view(B, T, Hkv, D)
            v = v + 3 * torch.sigmoid(h[..., :12] @ W(a.ve_gate).t()).unsqueeze(-1) * ve
        q, k = rms(rope(q)) * 1.2, rms(rope(k)) * 1.2
        k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
        w = model.window_sizes[i][0]
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        ti, si = torch.arange(T)[:, None], torch.arange(T)[None]
        att = att.masked_fill(~((si <= ti) & ((ti - si) <= w)), float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, -1)
        x = x + y @ W(a.c_proj).t()
        x = x + F.relu(rms(x) @ W(block.mlp.c_fc).t()).square() @ W(block.mlp.c_proj).t()
        if i == c.n_layer // 2:
            x_backout = x
    x = rms(x - model.backout_lambda * x_backout)
    logits = (x @ W(model.lm_head).t())[..., :c.vocab_size]
    return 15 * torch.tanh(logits / 15)


@pytest.mark.parametrize("pattern,windows", [("L", None), ("SL", [(5, 0), (64, 0), (64, 0)])])
def test_forward_matches_loop_reference(pattern, windows):
    model = make_model(seed=4, window_pattern=pattern)
    perturb_scalars(model)
    if windows:
        model.window_sizes = windows  # small windows at a small T
    idx = torch.randint(0, 100, (2, 23))
    torch.testing.assert_close(model(idx), reference_forward(model, idx), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("pattern,windows", [("L", None), ("SL", [(5, 0), (64, 0), (64, 0)])])
def test_last_only_is_the_last_column_of_the_loop_reference(pattern, windows):
    model = make_model(seed=6, window_pattern=pattern)
    perturb_scalars(model)
    if windows:
        model.window_sizes = windows
    idx = torch.randint(0, 100, (3, 17))
    with torch.no_grad():  # the in-place sigmoid soft-cap, against the reference's tanh
        last = model(idx, last_only=True)
        full = model(idx)
    assert last.shape == (3, 1, 100)
    torch.testing.assert_close(last, reference_forward(model, idx)[:, -1:], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(full, reference_forward(model, idx), atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, targets=idx, last_only=True)


def test_softcap_logits_in_place_without_autograd_equals_tanh():
    z = torch.randn(5, 300, dtype=torch.float64) * 30
    ref = 15 * torch.tanh(z / 15)
    out = z.clone()
    with torch.no_grad():
        res = softcap_logits(out, 15)
    assert res.data_ptr() == out.data_ptr()  # in place: no (B, T, V) temporaries
    torch.testing.assert_close(res, ref, atol=1e-12, rtol=1e-12)
    zg = z.clone().requires_grad_()
    res = softcap_logits(zg, 15)
    assert res.data_ptr() != zg.data_ptr() and torch.equal(res, ref)  # with autograd: the tanh expression itself
    res.sum().backward()
    torch.testing.assert_close(zg.grad, 1 - torch.tanh(z / 15) ** 2)


def test_loss_mean_none_and_ignore_index():
    model = make_model(seed=5)
    perturb_scalars(model)
    idx = torch.randint(0, 100, (2, 12))
    tgt = torch.randint(0, 100, (2, 12))
    tgt[0, :5] = -1
    logits = model(idx)
    assert logits.shape == (2, 12, 100) and logits.dtype == torch.float32 and logits.abs().max() <= 15
    logp = logits.log_softmax(-1)
    keep = tgt != -1
    nll = -logp[keep].gather(-1, tgt[keep].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model(idx, targets=tgt), nll.mean())
    per_tok = model(idx, targets=tgt, loss_reduction="none")
    assert per_tok.shape == (24,) and (per_tok.view(2, 12)[0, :5] == 0).all()
    torch.testing.assert_close(per_tok[keep.view(-1)], nll)
    torch.testing.assert_close(model(idx, targets=tgt, loss_reduction="sum"), nll.sum())


# ---------------------------------------------------------------- the chunked head + soft-cap + cross-entropy

def reference_softcap_ce(x, weight, targets, V, reduction, softcap=15):
    "Independent restatement: full logits, tanh soft-cap, log-softmax, pick the target, drop ignored rows."
    s = softcap * torch.tanh((x.float() @ weight.float().t())[:, :V] / softcap)
    nll = -(s - s.logsumexp(-1, keepdim=True)).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    nll = torch.where(targets == -1, 0.0, nll)
    return {"none": nll, "sum": nll.sum(), "mean": nll.sum() / (targets != -1).sum()}[reduction]


def loss_and_grads(fn, x, w, upstream):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w)
    (loss * upstream[:loss.numel()].view(loss.shape)).sum().backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 45, 1000])
def test_chunked_loss_equals_plain_fp32(reduction, chunk_rows):
    g = torch.Generator().manual_seed(0)
    N, C, V, Vpad = 45, 24, 300, 320
    x, w = torch.randn(N, C, generator=g), torch.randn(Vpad, C, generator=g) * 0.6  # logits up to ~10: the cap matters
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -1
    upstream = torch.rand(N, generator=g) + 0.5
    got = loss_and_grads(lambda x, w: softcap_cross_entropy(x, w, t, V, reduction=reduction, chunk_rows=chunk_rows), x, w, upstream)
    ref = loss_and_grads(lambda x, w: reference_softcap_ce(x, w, t, V, reduction), x, w, upstream)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (got[2][V:] == 0).all() and (got[1][::4] == 0).all()  # padded rows, ignored targets: no gradient
    with torch.no_grad():  # the forward-only path (evaluation)
        torch.testing.assert_close(softcap_cross_entropy(x, w, t, V, reduction=reduction, chunk_rows=chunk_rows), ref[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_loss_bf16_within_rounding_of_plain(reduction):
    "In bf16 both paths round; against an fp32 reference on the same bf16 inputs the chunked error is no larger."
    g = torch.Generator().manual_seed(1)
    N, C, V = 64, 32, 512
    x, w = torch.randn(N, C, generator=g).bfloat16(), torch.randn(V, C, generator=g) * 0.4
    t = torch.randint(0, V, (N,), generator=g)
    t[:9] = -1
    upstream = torch.rand(N, generator=g) + 0.5
    def plain(x, w):
        logits = F.linear(x, w.to(x.dtype)).float()
        return F.cross_entropy(15 * torch.tanh(logits / 15), t, ignore_index=-1, reduction=reduction)
    chunked = loss_and_grads(lambda x, w: softcap_cross_entropy(x, w, t, V, reduction=reduction, chunk_rows=10), x, w, upstream)
    plain_ = loss_and_grads(plain, x, w, upstream)
    exact = loss_and_grads(lambda x, w: reference_softcap_ce(x, w, t, V, reduction), x.float(), w.bfloat16().float(), upstream)
    assert chunked[1].dtype == torch.bfloat16 and chunked[2].dtype == torch.float32
    for c, p, e in zip(chunked, plain_, exact):
        err_c, err_p = (c.float() - e).abs().max().item(), (p.float() - e).abs().max().item()
        assert err_c <= 2 * err_p + 1e-2 * e.abs().max().item(), (err_c, err_p)


def test_model_chunked_loss_matches_plain_path_and_modes():
    model = make_model(seed=8)
    perturb_scalars(model)
    idx = torch.randint(0, 100, (3, 20))
    tgt = torch.where(torch.rand(3, 20) < 0.2, -1, torch.randint(0, 100, (3, 20)))
    for reduction in ["mean", "sum", "none"]:
        res = []
        for mode in ["0", "13"]:  # plain; 13 rows per chunk (60 rows: an uneven last chunk)
            model.chunked_loss = mode
            model.zero_grad(set_to_none=True)
            loss = model(idx, targets=tgt, loss_reduction=reduction)
            (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
            res.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    model.chunked_loss = None
    assert model.loss_chunk_rows("cpu") == 2**22 // 100 and model.loss_chunk_rows("cuda") == 0  # auto
    model.chunked_loss = "1"
    assert model.loss_chunk_rows("cuda") == 2**22 // 100
    model.chunked_loss = "sometimes"
    with pytest.raises(ValueError, match="NANOCHAT_CHUNKED_LOSS"):
        model(idx, targets=tgt)
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(torch.randn(2, 4), torch.randn(8, 4), torch.zeros(2, dtype=torch.long), 8, reduction="avg")


def test_chunked_loss_never_holds_the_full_logits(monkeypatch):
    """Record every tensor the loss creates (a dispatch mode): the plain path makes (N, V) ones, the chunked path holds
    at most one group of dlogits (DLOGITS_GROUP_NUMEL values, whole chunks: 8 here), or one chunk without gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    Largest.largest = max(Largest.largest, o.numel())
            return out
    import nanochat_nb.gpt as G
    N, C, V = 1024, 16, 1024
    monkeypatch.setattr(G, "DLOGITS_GROUP_NUMEL", 8 * 16 * V + 5)  # not a whole number of chunks: rounds down to 8
    x, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (N,))
    sizes = {}
    for name, fn in [("plain", lambda: F.cross_entropy(15 * torch.tanh(F.linear(x, w) / 15), t)),
                     ("chunked", lambda: softcap_cross_entropy(x, w, t, V, chunk_rows=16)),
                     ("chunked, no grad", lambda: softcap_cross_entropy(x.detach(), w.detach(), t, V, chunk_rows=16))]:
        Largest.largest = 0
        with Largest():
            loss = fn()
            if loss.requires_grad: loss.backward()
        sizes[name] = Largest.largest
    assert sizes["plain"] >= N * V and sizes["chunked"] == 8 * 16 * V < N * V, sizes
    assert sizes["chunked, no grad"] == 16 * V, sizes


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("n_prefill", [1, 2, 17])
def test_kv_cache_decoding_equals_full_forward_gqa(n_prefill):
    model = make_model(seed=6, n_head=4, n_kv_head=2)
    perturb_scalars(model)
    idx = torch.randint(0, 100, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(decode_logits(model, idx, n_prefill), model(idx), atol=1e-4, rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward_real_sliding_windows():
    "sequence_len 512 gives a real short window of 128; decode well past it with SSL and GQA."
    model = make_model(seed=7, sequence_len=512, n_layer=3, n_head=4, n_kv_head=1, window_pattern="SSL")
    assert model.window_sizes == [(128, 0), (128, 0), (512, 0)]
    perturb_scalars(model)
    idx = torch.randint(0, 100, (2, 170))
    with torch.no_grad():
        full = model(idx)
        inc = decode_logits(model, idx, 100)
    torch.testing.assert_close(inc, full, atol=1e-4, rtol=1e-4)
    # and the window matters: with all layers long the logits after position 128 differ
    model.window_sizes = [(512, 0)] * 3
    with torch.no_grad():
        assert not torch.allclose(model(idx)[:, 140:], full[:, 140:], atol=1e-3)


def test_kv_cache_tiny_windows_gqa():
    model = make_model(seed=8, n_layer=4, n_head=6, n_kv_head=2, n_embd=96)
    model.window_sizes = [(2, 0), (0, 0), (7, 0), (64, 0)]
    perturb_scalars(model)
    idx = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(decode_logits(model, idx, 4), model(idx), atol=1e-4, rtol=1e-4)


def test_kv_cache_smear_uses_prev_embedding():
    model = make_model(seed=9)
    perturb_scalars(model)
    c = model.config
    cache = KVCache(1, c.n_kv_head, 8, c.n_embd // c.n_head, c.n_layer)
    idx = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        model(idx, kv_cache=cache)
        x = norm(model.transformer.wte(idx[:, -1:]).to(COMPUTE_DTYPE))
        torch.testing.assert_close(cache.prev_embedding, x)  # pre-smear normed embedding of the last token
        assert cache.get_pos() == 3


# ---------------------------------------------------------------- generate

def test_generate_greedy_matches_iterated_argmax_and_sampling_is_seeded():
    model = make_model(seed=10)
    perturb_scalars(model)
    prompt = [3, 1, 4, 1, 5]
    out = list(model.generate(prompt, 6, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
    a = list(model.generate(prompt, 8, temperature=1.0, seed=1))
    assert a == list(model.generate(prompt, 8, temperature=1.0, seed=1))
    assert len({tuple(model.generate(prompt, 8, temperature=1.0, seed=s)) for s in range(6)}) > 1
    with torch.no_grad():
        top2 = set(model(torch.tensor([prompt]))[0, -1].topk(2).indices.tolist())
    assert {next(model.generate(prompt, 1, temperature=1.0, top_k=2, seed=s)) for s in range(20)} <= top2
    assert list(model.generate([7], 3, temperature=0.0))  # a one-token prompt works
    with pytest.raises(AssertionError, match="list"):
        next(model.generate(torch.tensor(prompt), 1))


# ---------------------------------------------------------------- optimizer groups

def test_optimizer_param_groups_d12():
    m = build_model_meta(12)
    groups = m.optimizer_param_groups(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1, scalar_lr=0.5)
    adamw, muon = groups[:6], groups[6:]
    assert [g["kind"] for g in adamw] == ["adamw"] * 6 and all(g["kind"] == "muon" for g in muon)
    assert adamw[0]["params"] == [m.lm_head.weight] and adamw[1]["params"] == [m.transformer.wte.weight]
    assert adamw[2]["params"] == list(m.value_embeds.parameters())
    assert adamw[3]["params"] == [m.resid_lambdas] and adamw[4]["params"] == [m.x0_lambdas]
    assert adamw[5]["params"] == [m.smear_gate.weight, m.smear_lambda, m.backout_lambda]
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in adamw] == [
        (0.004, (0.8, 0.96), 1e-10, 0.01), (0.2, (0.8, 0.995), 1e-10, 0.001), (0.1, (0.8, 0.995), 1e-10, 0.01),
        (0.005, (0.8, 0.95), 1e-10, 0.05), (0.5, (0.96, 0.95), 1e-10, 0.0), (0.2, (0.8, 0.95), 1e-10, 0.0)]
    assert [(tuple(g["params"][0].shape), len(g["params"])) for g in muon] == [
        ((6, 12), 6), ((768, 768), 48), ((768, 3072), 12), ((3072, 768), 12)]
    assert all((g["lr"], g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.02, 0.95, 5, 0.9, 0.1) for g in muon)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))


def test_optimizer_param_groups_dmodel_scaling():
    for depth, scale in [(4, 1.732), (24, 0.707), (32, 0.612)]:
        g = build_model_meta(depth).optimizer_param_groups(unembedding_lr=0.008, embedding_lr=0.3, scalar_lr=0.5)
        C = config_for_depth(depth).n_embd
        assert math.isclose((C / 768) ** -0.5, scale, abs_tol=1e-3)
        assert math.isclose(g[0]["lr"], 0.008 * (C / 768) ** -0.5) and math.isclose(g[1]["lr"], 0.3 * (C / 768) ** -0.5)
        assert math.isclose(g[2]["lr"], 0.15 * (C / 768) ** -0.5)
        assert g[3]["lr"] == 0.005 and g[4]["lr"] == 0.5 and g[5]["lr"] == 0.2  # scalars and smear: no dmodel scale


def test_setup_optimizer_builds_muonadamw_and_trains():
    optim = pytest.importorskip("nanochat_nb.optim")
    model = make_model(seed=11, n_embd=64, n_head=4, n_kv_head=4)
    opt = model.setup_optimizer()
    assert isinstance(opt, optim.MuonAdamW) and not isinstance(opt, getattr(optim, "DistMuonAdamW", ()))
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert [g["kind"] for g in opt.param_groups] == [g["kind"] for g in model.optimizer_param_groups()]
    batch = torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_setup_optimizer_uses_dist_class_under_torchrun(monkeypatch):
    optim = pytest.importorskip("nanochat_nb.optim")
    import nanochat_nb.gpt as gpt_mod
    made = []

    class Recorder(torch.optim.Optimizer):
        def __init__(self, groups):
            made.append(self)
            super().__init__(groups, {})
    monkeypatch.setattr(optim, "DistMuonAdamW", Recorder)
    monkeypatch.setattr(gpt_mod, "get_dist_info", lambda: (True, 0, 0, 2))
    opt = make_model(seed=16).setup_optimizer(matrix_lr=0.03)
    assert made == [opt] and opt.param_groups[-1]["initial_lr"] == 0.03


def test_kv_cache_with_the_engine_kvcache():
    engine = pytest.importorskip("nanochat_nb.engine")
    model = make_model(seed=15, n_head=4, n_kv_head=2)
    perturb_scalars(model)
    c = model.config
    idx = torch.randint(0, 100, (2, 20))
    cache = engine.KVCache(batch_size=2, num_heads=c.n_kv_head, seq_len=24, head_dim=c.n_embd // c.n_head,
                           num_layers=c.n_layer, device="cpu", dtype=COMPUTE_DTYPE)
    with torch.no_grad():
        outs = [model(idx[:, :7], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(outs, 1), model(idx), atol=1e-4, rtol=1e-4)
    assert cache.get_pos() == 20


# ---------------------------------------------------------------- learning

def test_tiny_model_overfits_one_batch():
    model = make_model(seed=12, sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(80):
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(64)) < 0.1  # the head starts near zero: loss ~ ln V
    assert losses[-1] < 0.3, losses[-10:]
    assert all(p.grad is not None for p in model.parameters())  # every parameter receives gradient


def test_bf16_compute_dtype_path_in_subprocess():
    "Under NANOCHAT_DTYPE=bfloat16: embeddings and rotary in bf16, fp32 masters and logits, KV decoding ~ full forward."
    code = r"""
import torch
from nanochat_nb.common import COMPUTE_DTYPE
from tests.test_gpt import make_model, perturb_scalars, decode_logits
assert COMPUTE_DTYPE == torch.bfloat16
m = make_model(seed=2, sequence_len=256, window_pattern="SL")
perturb_scalars(m)
assert m.transformer.wte.weight.dtype == torch.bfloat16 and m.cos.dtype == torch.bfloat16
assert m.lm_head.weight.dtype == torch.float32 and m.transformer.h[0].attn.c_q.weight.dtype == torch.float32
idx = torch.randint(0, 100, (2, 24))
full = m(idx)
assert full.dtype == torch.float32
with torch.no_grad():
    inc = decode_logits(m, idx, 3)
err = (inc - full).abs().max().item()
assert err < 0.15, err
loss = m(idx, targets=idx)
loss.backward()
assert torch.isfinite(loss) and m.transformer.h[0].attn.c_q.weight.grad.dtype == torch.float32
print("ok", err)
"""
    env = {**os.environ, "NANOCHAT_DTYPE": "bfloat16"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- fp8

def test_fp8_refused_on_cpu_and_training_goes_on():
    model = make_model(seed=13, n_embd=128, n_head=2, n_kv_head=2)
    enabled, reason = fp8.maybe_enable_fp8(model)
    assert enabled is False and "CUDA" in reason and "cpu" in reason
    assert not any(isinstance(m, fp8.Float8Linear) for m in model.modules())
    loss = model(torch.randint(0, 100, (2, 8)), targets=torch.randint(0, 100, (2, 8)))
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="tensorwise"):
        fp8.maybe_enable_fp8(model, recipe="rowwise")
    ok, why = fp8.fp8_supported("cpu")
    assert not ok and "CUDA" in why


def test_fp8_quantisation():
    x = torch.randn(100, 50) * 7
    q, inv = fp8._to_fp8(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().max().item() == 448.0
    assert ((q.float() * inv - x).abs() <= x.abs() * 2 ** -4 + 2 ** -10 * inv).all()
    q5, inv5 = fp8._to_fp8(x, torch.float8_e5m2)
    assert q5.float().abs().max().item() == 57344.0
    z, zinv = fp8._to_fp8(torch.zeros(4), torch.float8_e4m3fn)
    assert torch.isfinite(zinv) and (z.float() == 0).all()
    c = fp8._to_col_major(torch.randn(4, 6))
    assert c.stride() == (1, 4)


def test_fp8_matmul_forward_backward_against_dequantised_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 64, generator=g, requires_grad=True)
    w = torch.randn(32, 64, generator=g, requires_grad=True)
    go = torch.randn(16, 32, generator=g)
    y = fp8._Float8Matmul.apply(a, w)
    y.backward(go)
    dq = lambda t, dt: (lambda q, i: q.float() * i)(*fp8._to_fp8(t.detach(), dt))
    aq, wq, gq = dq(a, torch.float8_e4m3fn), dq(w, torch.float8_e4m3fn), dq(go, torch.float8_e5m2)
    torch.testing.assert_close(y, aq @ wq.t(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a.grad, gq @ wq, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(w.grad, gq.t() @ aq, atol=1e-3, rtol=1e-3)
    assert w.grad.dtype == torch.float32
    exact = a.detach() @ w.detach().t()
    assert ((y - exact).norm() / exact.norm()) < 0.1  # fp8 is a close approximation of the real product


def test_fp8_conversion_filter_state_dict_and_disable():
    model = make_model(seed=14, vocab_size=500, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        ref = model(idx)
    fp8.convert_to_float8_training(model, config=fp8.Float8LinearConfig.from_recipe_name("tensorwise"),
                                   module_filter_fn=fp8.fp8_module_filter)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, fp8.Float8Linear))
    expected = sorted([f"transformer.h.{i}.{s}" for i in range(2) for s in
                       ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"])
    assert converted == expected  # ve_gate (12->2) and smear_gate (24->1) stay
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same names, shared storage
    with torch.no_grad():
        out = model(idx)
    assert ((out - ref).norm() / ref.norm()) < 0.1 and not torch.equal(out, ref)
    with fp8.disable_fp8(model):
        assert not any(isinstance(m, fp8.Float8Linear) for m in model.modules())
        assert model.lm_head.weight.data_ptr() == keys["lm_head.weight"]
        with torch.no_grad():
            torch.testing.assert_close(model(idx), ref, atol=0, rtol=0)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, fp8.Float8Linear)) == expected
    loss = model(idx, targets=idx)
    loss.backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()
    filt = fp8.fp8_module_filter
    assert filt(torch.nn.Linear(128, 128), "x") and not filt(torch.nn.Linear(120, 128), "x")
    assert not filt(torch.nn.Linear(112, 512), "x") and not filt(torch.nn.Embedding(128, 128), "x")


def test_compiled_graph_capture_trains_like_eager():
    """torch.compile's graph capture + autograd (backend aot_eager: no code generation, so no rounding differences)
    must give the eager loss and gradients exactly: anything our model does that breaks under tracing (buffers baked in
    as constants, trace-time casts, in-place surprises, stale state across calls) shows up here."""
    eager = make_model(seed=3, window_pattern="SL")
    perturb_scalars(eager)
    compiled_src = make_model(seed=3, window_pattern="SL")
    compiled_src.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_src, backend="aot_eager", dynamic=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # a second call catches state captured at the first trace
        idx = torch.randint(0, 100, (2, 32), generator=g)
        targets = torch.randint(0, 100, (2, 32), generator=g)
        loss_e, loss_c = eager(idx, targets), compiled(idx, targets)
        loss_e.backward(); loss_c.backward()
        assert torch.equal(loss_e, loss_c)
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_src.parameters()):
            assert (p_e.grad is None) == (p_c.grad is None), name
            if p_e.grad is not None:
                torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-6, atol=1e-7, msg=name)
        with torch.no_grad():  # an optimizer-like in-place update between calls
            for p_e, p_c in zip(eager.parameters(), compiled_src.parameters()):
                if p_e.grad is not None:
                    p_e -= 0.1 * p_e.grad; p_c -= 0.1 * p_c.grad
                    p_e.grad = None; p_c.grad = None
