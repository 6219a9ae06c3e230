"""Tests of nanochat_nb.flash_attention: the SDPA fallback against a naive per-position attention, sliding windows,
GQA, the KV-cache call, gradients, input errors and the backend override (seed: tests/test_attention_fallback.py)."""
import math

import pytest
import torch

import nanochat_nb.flash_attention as fa
from nanochat_nb.flash_attention import flash_attn, flash_attn_func, flash_attn_with_kvcache


def set_impl(impl):
    "Force a backend as the original's tests do: set the override and recompute USE_FA3."
    fa._override_impl = impl
    fa.USE_FA3 = fa._resolve_use_fa3()


@pytest.fixture(autouse=True)
def restore_impl():
    yield
    set_impl(None)


def naive_attention(q, k, v, window=-1, offset=0):
    """Independent reference in fp64: query r sits at absolute position offset + r and sees keys j with
    pos - window <= j <= pos (window -1 = unlimited); GQA by repeating KV heads."""
    B, Tq, H, D = q.shape
    rep = H // k.size(2)
    k = k.double().repeat_interleave(rep, dim=2)
    v = v.double().repeat_interleave(rep, dim=2)
    q = q.double()
    rows = []
    for r in range(Tq):
        pos = offset + r
        lo = 0 if window < 0 else max(0, pos - window)
        att = torch.einsum("bhd,bjhd->bhj", q[:, r], k[:, lo:pos + 1]) / math.sqrt(D)
        rows.append(torch.einsum("bhj,bjhd->bhd", att.softmax(-1), v[:, lo:pos + 1]))
    return torch.stack(rows, 1)


def rand_qkv(B, T, H, Hkv, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g, dtype=dtype), torch.randn(B, T, Hkv, D, generator=g, dtype=dtype),
            torch.randn(B, T, Hkv, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("window", [-1, 64, 37, 36, 7, 1, 0])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_flash_attn_func_matches_naive(window, heads):
    H, Hkv = heads
    q, k, v = rand_qkv(2, 37, H, Hkv, 16, seed=window + 10)
    y = flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert y.shape == q.shape
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_semantics_left_plus_one_keys():
    "A window of w lets each query see exactly w+1 keys (itself included): probe with equal scores and one-hot values."
    T, w = 10, 3
    q = torch.zeros(1, T, 1, T)
    k = torch.zeros(1, T, 1, T)
    v = torch.eye(T).view(1, T, 1, T)
    y = flash_attn_func(q, k, v, causal=True, window_size=(w, 0))[0, :, 0]
    visible = y > 0
    assert visible.sum(1).tolist() == [min(i + 1, w + 1) for i in range(T)]
    for i in range(T):  # uniform over the visible keys
        torch.testing.assert_close(y[i][visible[i]], torch.full((int(visible[i].sum()),), 1 / visible[i].sum().item()))


def test_sdpa_branches_are_used_as_specified(monkeypatch):
    "Full-context training takes the mask-free is_causal path; windows build an explicit mask; decode uses no mask."
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is not None, is_causal, k.size(2)))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    monkeypatch.setattr(fa.F, "scaled_dot_product_attention", spy)
    q, k, v = rand_qkv(1, 16, 2, 2, 8)
    flash_attn_func(q, k, v, causal=True, window_size=(16, 0))
    flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))
    flash_attn_func(q, k, v, causal=True, window_size=(4, 0))
    fa._sdpa_attention(q[:, -1:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), (4, 0), False)
    assert calls == [(False, True, 16), (False, True, 16), (True, False, 16), (False, False, 5)]


@pytest.mark.parametrize("window", [-1, 8, 3])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_kvcache_prefill_then_decode_equals_full(window, heads):
    H, Hkv = heads
    T, D, cap = 30, 8, 40
    q, k, v = rand_qkv(2, T, H, Hkv, D, seed=3)
    ref = naive_attention(q, k, v, window)
    k_cache, v_cache = torch.zeros(2, cap, Hkv, D), torch.zeros(2, cap, Hkv, D)
    seqlens = torch.zeros(2, dtype=torch.int32)
    outs = [flash_attn.flash_attn_with_kvcache(q[:, :12], k_cache, v_cache, k=k[:, :12], v=v[:, :12],
                                              cache_seqlens=seqlens, causal=True, window_size=(window, 0))]
    assert seqlens.tolist() == [0, 0]  # the attention call never advances the cache
    seqlens += 12
    for t in range(12, T):
        outs.append(flash_attn.flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k=k[:, t:t + 1], v=v[:, t:t + 1],
                                                      cache_seqlens=seqlens, causal=True, window_size=(window, 0)))
        seqlens += 1
    torch.testing.assert_close(torch.cat(outs, 1).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[:, :T], k)  # written in place
    assert (k_cache[:, T:] == 0).all() and (v_cache[:, T:] == 0).all()


def test_kvcache_chunk_after_cached_prefix_uses_offset_mask():
    "A multi-token chunk appended to a non-empty cache: queries sit at the end of the keys (row offset Tk - Tq)."
    T, w = 20, 4
    q, k, v = rand_qkv(1, T, 4, 2, 8, seed=5)
    k_cache, v_cache = torch.zeros(1, T, 2, 8), torch.zeros(1, T, 2, 8)
    k_cache[:, :13], v_cache[:, :13] = k[:, :13], v[:, :13]
    seqlens = torch.full((1,), 13, dtype=torch.int32)
    y = flash_attn_with_kvcache(q[:, 13:], k_cache, v_cache, k=k[:, 13:], v=v[:, 13:], cache_seqlens=seqlens,
                                causal=True, window_size=(w, 0))
    torch.testing.assert_close(y.double(), naive_attention(q[:, 13:], k, v, w, offset=13), atol=1e-5, rtol=1e-5)


def test_decode_respects_window_smaller_than_visible_keys():
    "Regression from the seed's tests: a single-token decode with window 8 and 33 visible keys must use only 9."
    q, k, v = rand_qkv(1, 33, 2, 2, 16, seed=7)
    k_cache, v_cache = torch.zeros(1, 64, 2, 16), torch.zeros(1, 64, 2, 16)
    k_cache[:, :32], v_cache[:, :32] = k[:, :32], v[:, :32]
    y = flash_attn_with_kvcache(q[:, 32:], k_cache, v_cache, k=k[:, 32:], v=v[:, 32:],
                                cache_seqlens=torch.full((1,), 32, dtype=torch.int32), causal=True, window_size=(8, 0))
    torch.testing.assert_close(y.double(), naive_attention(q, k, v, 8)[:, 32:], atol=1e-5, rtol=1e-5)
    y_full = flash_attn_with_kvcache(q[:, 32:], k_cache, v_cache, cache_seqlens=torch.full((1,), 33, dtype=torch.int32),
                                     causal=True, window_size=(-1, 0))
    assert not torch.allclose(y, y_full)  # the window really changed the answer


def test_gradients_match_naive():
    q, k, v = rand_qkv(1, 24, 4, 2, 8, seed=9, dtype=torch.float64)
    for t in (q, k, v): t.requires_grad_()
    y = flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(naive_attention(q2, k2, v2, 5), (q2, k2, v2), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


def test_bf16_inputs_stay_bf16_and_close():
    q, k, v = rand_qkv(2, 32, 4, 4, 16, seed=11)
    yb = flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, window_size=(9, 0))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), naive_attention(q, k, v, 9), atol=3e-2, rtol=3e-2)


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand_qkv(1, 8, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="causal"):
        flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_func(q[0], k[0], v[0], causal=True)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_attn_func(torch.randn(1, 8, 3, 8), k, v, causal=True)
    with pytest.raises(ValueError, match="same shape"):
        flash_attn_func(q, k, v[:, :4], causal=True)
    k_cache, v_cache = torch.zeros(1, 10, 2, 8), torch.zeros(1, 10, 2, 8)
    seq = torch.full((1,), 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="overflow"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=seq, causal=True)
    with pytest.raises(ValueError, match="both k and v"):
        flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k=k[:, :1], cache_seqlens=seq, causal=True)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q[:, :1], k_cache, v_cache, k=k[:, :1], v=v[:, :1], causal=True)


def test_override_mechanism():
    set_impl("sdpa")
    assert fa.USE_FA3 is False
    set_impl(None)
    assert fa.USE_FA3 == (fa.HAS_FA3 and fa.COMPUTE_DTYPE == torch.bfloat16)
    if not fa.HAS_FA3:
        with pytest.raises(AssertionError, match="not available"):
            set_impl("fa3")
    else:
        set_impl("fa3")
        assert fa.USE_FA3 is True
    with pytest.raises(ValueError, match="'fa3', 'sdpa' or None"):
        set_impl("triton")


def test_no_fa3_on_cpu_only_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert fa._load_flash_attention_3() is None and fa.HAS_FA3 is False and fa.USE_FA3 is False
