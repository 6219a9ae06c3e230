"""Tests of nanochat_nb.optim: Polar Express, AdamW vs torch.optim.AdamW, Muon vs a naive float64 reference,
cautious weight decay, compile fallback, state-dict round trips, and 2-process torchrun (gloo) == single process."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from nanochat_nb import optim
from nanochat_nb.optim import MuonAdamW, DistMuonAdamW, zeropower_via_polar_express, polar_express_coeffs
from tests.conftest import REPO, run_torchrun
from tests import dist_optim_worker as W


def adamw_group(params, lr=0.1, betas=(0.8, 0.95), eps=1e-10, wd=0.0):
    return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=eps, weight_decay=wd)


def muon_group(params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, wd=0.0):
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, ns_steps=ns_steps, beta2=beta2, weight_decay=wd)


# ---------------------------------------------------------------------------------------------------------------------
# Polar Express

@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64)])
def test_polar_express_is_near_orthogonal_and_points_like_svd_polar_factor(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape, dtype=torch.float32)
    X = zeropower_via_polar_express(G, 5)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    sv = torch.linalg.svdvals(X)
    cos = (X * polar).sum() / (X.norm() * polar.norm())
    if shape[0] != shape[1]:
        # rectangular Gaussian matrices are well conditioned: every singular value lands near one
        assert 0.7 < sv.min() and sv.max() < 1.25, (sv.min(), sv.max())
        assert cos > 0.99
    else:
        # square ones have singular values near zero, which five iterations cannot lift all the way; the bulk is near one
        assert sv.max() < 1.25 and (sv > 0.7).float().mean() > 0.9
        assert cos > 0.97
    # the polynomial never changes the singular vectors: X = U f(S) Vᵀ with f applied per singular value
    f = U.T @ X @ Vh.T
    assert torch.allclose(f, torch.diag(torch.diagonal(f)), atol=1e-3)


def test_polar_express_scalar_map_matches_coefficients():
    "Each iteration maps a singular value s to a s + b s^3 + c s^5: check on a diagonal matrix (a known closed form)."
    s = torch.tensor([1e-3, 0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    X = zeropower_via_polar_express(torch.diag(s), 5)
    expected = s / (s.norm() * optim.POLAR_NORM_SAFETY + 1e-6)
    for a, b, c in polar_express_coeffs:
        expected = a * expected + b * expected ** 3 + c * expected ** 5
    assert torch.allclose(torch.diagonal(X), expected, rtol=1e-10)
    assert torch.allclose(X, torch.diag(torch.diagonal(X)))


def test_polar_express_stack_is_per_matrix():
    torch.manual_seed(1)
    G = torch.randn(3, 24, 40)
    X = zeropower_via_polar_express(G, 5)
    for i in range(3):
        assert torch.allclose(X[i], zeropower_via_polar_express(G[i], 5), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# AdamW

def test_adamw_groups_match_torch_adamw_over_several_steps():
    torch.manual_seed(0)
    ref_params = [torch.randn(8, 5), torch.randn(3), torch.randn(40, 7)]
    ours = [p.clone().requires_grad_() for p in ref_params]
    ref = [p.clone().requires_grad_() for p in ref_params]
    opt = MuonAdamW([adamw_group(ours[:2], lr=0.05, betas=(0.8, 0.96), wd=0.01),
                     adamw_group(ours[2:], lr=0.2, betas=(0.96, 0.95), eps=1e-8, wd=0.1)])
    torch_opt = torch.optim.AdamW([dict(params=ref[:2], lr=0.05, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
                                   dict(params=ref[2:], lr=0.2, betas=(0.96, 0.95), eps=1e-8, weight_decay=0.1)])
    for step in range(5):
        grads = [torch.randn_like(p) for p in ref_params]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 3:  # a schedule changes lr between steps; both must follow
            opt.param_groups[0]["lr"] = torch_opt.param_groups[0]["lr"] = 0.01
        opt.step(); torch_opt.step()
        for p, q in zip(ours, ref):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()
    state = opt.state[ours[0]]
    assert state["step"] == 5 and torch.allclose(state["exp_avg"], torch_opt.state[ref[0]]["exp_avg"], atol=1e-6)


def test_adamw_skips_params_without_grad():
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = MuonAdamW([adamw_group([a, b], wd=0.5)])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and len(opt.state[b]) == 0 and not torch.equal(a, torch.ones(3))


def test_adamw_bf16_param_math_in_fp32():
    "A bf16 parameter is updated by fp32 math and rounded once (fix 5): equal to fp32 AdamW rounded to bf16."
    torch.manual_seed(0)
    p32 = torch.randn(64, 16)
    pb = p32.to(torch.bfloat16).requires_grad_()
    ref = pb.detach().float().requires_grad_()
    g = torch.randn(64, 16).to(torch.bfloat16)
    opt = MuonAdamW([adamw_group([pb], lr=1e-3, betas=(0.8, 0.995), wd=0.001)])
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001)
    pb.grad, ref.grad = g, g.float()
    opt.step(); torch_opt.step()
    assert pb.dtype == torch.bfloat16 and opt.state[pb]["exp_avg"].dtype == torch.bfloat16
    diff = (pb.float() - ref.detach().to(torch.bfloat16).float()).abs()
    ulp = ref.detach().abs() * 2 ** -7
    assert (diff <= ulp + 1e-12).all()
    # the moments are stored in bf16 too: the fp32 moments rounded once
    assert torch.equal(opt.state[pb]["exp_avg"], torch_opt.state[ref]["exp_avg"].to(torch.bfloat16))
    v_ref = torch_opt.state[ref]["exp_avg_sq"]
    assert ((opt.state[pb]["exp_avg_sq"].float() - v_ref).abs() <= v_ref * 2 ** -7).all()


# ---------------------------------------------------------------------------------------------------------------------
# Muon

def naive_muon(params, grads_per_step, lr, momentum, beta2, wd, ns_steps=5):
    "Independent float64 reference from the fact sheet formulas, one matrix at a time with explicit loops."
    Ps = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in Ps]
    rows, cols = Ps[0].shape
    sbufs = [torch.zeros(rows if rows >= cols else cols, dtype=torch.float64) for _ in Ps]
    eff_lr = lr * math.sqrt(max(1.0, rows / cols))
    for grads in grads_per_step:
        for i, (P, g) in enumerate(zip(Ps, grads)):
            g = g.double()
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * bufs[i]
            X = u / (torch.linalg.norm(u) * optim.POLAR_NORM_SAFETY + 1e-6)
            for a, b, c in polar_express_coeffs[:ns_steps]:  # in the wide form; XᵀX vs XXᵀ are the same polynomial
                A = X @ X.T
                X = a * X + (b * A + c * A @ A) @ X
            O = X
            per = (O ** 2).mean(dim=1) if rows >= cols else (O ** 2).mean(dim=0)
            sbufs[i] = beta2 * sbufs[i] + (1 - beta2) * per
            s = 1 / torch.sqrt(torch.clamp(sbufs[i], min=1e-10))
            Os = O * s[:, None] if rows >= cols else O * s[None, :]
            Os = Os * (torch.linalg.norm(O) / torch.clamp(torch.linalg.norm(Os), min=1e-10))
            mask = (Os * P >= 0).double()
            Ps[i] = P - eff_lr * Os - eff_lr * wd * P * mask
    return Ps


@pytest.mark.parametrize("shape,K", [((16, 24), 3), ((40, 12), 2), ((20, 20), 1)])
def test_muon_matches_naive_float64_reference(shape, K):
    torch.manual_seed(0)
    init = [torch.randn(*shape) for _ in range(K)]
    grads_per_step = [[torch.randn(*shape) for _ in range(K)] for _ in range(4)]
    params = [p.clone().requires_grad_() for p in init]
    opt = MuonAdamW([muon_group(params, lr=0.05, momentum=0.9, beta2=0.8, wd=0.3)])
    for grads in grads_per_step:
        for p, g in zip(params, grads): p.grad = g.clone()
        opt.step()
    ref = naive_muon(init, grads_per_step, lr=0.05, momentum=0.9, beta2=0.8, wd=0.3)
    for p, r in zip(params, ref):
        assert torch.allclose(p.double(), r, atol=2e-5), (p.double() - r).abs().max()
    state = opt.state[params[0]]
    assert state["momentum_buffer"].shape == (K, *shape)
    rows, cols = shape
    assert state["second_momentum_buffer"].shape == ((K, rows, 1) if rows >= cols else (K, 1, cols))


def test_muon_bf16_compute_dtype_runs_polar_express_in_bf16():
    "With COMPUTE_DTYPE=bf16 (subprocess: decided at import) the iteration runs in bf16, the fp32 params stay fp32,"
    " and the step still follows the float64 reference to bf16 accuracy."
    code = r"""
import torch
from nanochat_nb import optim
from tests.test_optim import naive_muon, muon_group
assert optim.polar_dtype() is torch.bfloat16
torch.manual_seed(0)
init = [torch.randn(16, 24) for _ in range(2)]
grads = [[torch.randn(16, 24) for _ in range(2)] for _ in range(3)]
ps = [p.clone().requires_grad_() for p in init]
opt = optim.MuonAdamW([muon_group(ps, lr=0.05, momentum=0.9, beta2=0.8, wd=0.3)])
for gs in grads:
    for p, g in zip(ps, gs): p.grad = g.clone()
    opt.step()
ref = naive_muon(init, grads, lr=0.05, momentum=0.9, beta2=0.8, wd=0.3)
# relative error of the total displacement: the bf16 Polar Express alone is ~5% off the exact iteration (8-bit
# mantissa, coefficients up to 22; the original always runs it in bf16), so ~10% here, but never fp32-small
err = max(((p.double() - a.double()) - (r - a.double())).norm().item() / (r - a.double()).norm().item()
          for p, a, r in zip(ps, init, ref))
assert ps[0].dtype == torch.float32 and opt.state[ps[0]]["momentum_buffer"].dtype == torch.float32
assert 1e-3 < err < 0.15, err
print("OK", err)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NANOCHAT_DTYPE": "bfloat16"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    print(proc.stdout)


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    torch.manual_seed(3)
    W0, G = torch.randn(24, 16), torch.randn(24, 16)
    lr, wd = 0.1, 0.5
    finals = {}
    for this_wd in (0.0, wd):
        p = W0.clone().requires_grad_()
        opt = MuonAdamW([muon_group([p], lr=lr, wd=this_wd)])
        p.grad = G.clone()
        opt.step()
        finals[this_wd] = p.detach()
    eff_lr = lr * math.sqrt(24 / 16)
    O = (W0 - finals[0.0]) / eff_lr  # the update itself (no decay)
    differ = (O * W0) < 0
    assert 0.2 < differ.float().mean() < 0.8
    # where update and weight differ in sign: no decay at all
    assert torch.allclose(finals[wd][differ], finals[0.0][differ], atol=1e-6)
    # elsewhere: exactly the decoupled decay lr * wd * W
    assert torch.allclose((finals[0.0] - finals[wd])[~differ], (eff_lr * wd * W0)[~differ], atol=1e-5)


def test_muon_hyperparameters_are_read_every_step():
    torch.manual_seed(0)
    init, G = torch.randn(8, 8), torch.randn(8, 8)
    p, q = init.clone().requires_grad_(), init.clone().requires_grad_()
    opt_a, opt_b = MuonAdamW([muon_group([p], lr=0.02)]), MuonAdamW([muon_group([q], lr=0.02)])
    p.grad, q.grad = G.clone(), G.clone()
    opt_a.param_groups[0]["lr"] = 0.04
    opt_a.step(); opt_b.step()
    assert torch.allclose(init - p.detach(), 2 * (init - q.detach()), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, compile fallback

def test_bad_param_groups_fail_clearly():
    x = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="kind="):
        MuonAdamW([dict(params=[x], lr=0.1)])
    with pytest.raises(ValueError, match="kind='lion'"):
        MuonAdamW([dict(kind="lion", params=[x], lr=0.1)])
    with pytest.raises(ValueError, match="missing momentum"):
        MuonAdamW([dict(kind="muon", params=[x], lr=0.1, ns_steps=5, beta2=0.9, weight_decay=0.0)])
    with pytest.raises(ValueError, match="one group per shape"):
        MuonAdamW([muon_group([x, torch.zeros(4, 5, requires_grad=True)])])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([muon_group([torch.zeros(4, requires_grad=True)])])
    with pytest.raises(ValueError, match="ns_steps=7"):
        MuonAdamW([muon_group([x], ns_steps=7)])
    with pytest.raises(RuntimeError, match="process group"):
        DistMuonAdamW([muon_group([x])])
    y = torch.zeros(4, 4, requires_grad=True)
    opt = MuonAdamW([muon_group([x, y])])
    with pytest.raises(ValueError, match="2-D"):  # a rejected group is not left behind in the optimizer
        opt.add_param_group(muon_group([torch.zeros(4, requires_grad=True)]))
    assert len(opt.param_groups) == 1
    x.grad = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


def test_bad_compile_setting(monkeypatch):
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "maybe")
    with pytest.raises(ValueError, match="NANOCHAT_OPTIM_COMPILE"):
        optim._compile_mode()
    with pytest.raises(ValueError, match="NANOCHAT_OPTIM_COMPILE"):  # even where an explicit choice would decide
        optim.optimizer_step_compiles("cpu", True)


def test_optimizer_step_compiles_rule(monkeypatch):
    "auto (unset): CUDA only; 1 / 0: always / never; an explicit True/False beats the variable."
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    assert [optim.optimizer_step_compiles(d) for d in ("cuda", "cpu", "mps")] == [True, False, False]
    for mode, expect in (("1", True), ("0", False), ("auto", False)):
        monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", mode)
        assert optim.optimizer_step_compiles("cpu") is expect
        assert optim.optimizer_step_compiles("cpu", not expect) is (not expect)


def test_compile_step_argument_overrides_the_environment(monkeypatch):
    "With torch.compile replaced by a recorder: compile_step=True compiles both kernels under auto on a CPU, and"
    " compile_step=False compiles nothing under NANOCHAT_OPTIM_COMPILE=1; the numbers are the eager ones either way."
    compiled = []
    def recording_compile(fn, **kwargs):
        compiled.append(fn.__name__)
        return fn
    monkeypatch.setattr(torch, "compile", recording_compile)
    torch.manual_seed(0)
    init, grads = [torch.randn(6, 4), torch.randn(8, 8)], [torch.randn(6, 4), torch.randn(8, 8)]
    finals = []
    for env, compile_step, expect in (("auto", True, ["adamw_step_fused", "muon_step_fused"]), ("1", False, []),
                                      ("0", None, [])):
        monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", env)
        monkeypatch.setattr(optim, "_adamw_kernel", optim._MaybeCompiled(optim.adamw_step_fused))
        monkeypatch.setattr(optim, "_muon_kernel", optim._MaybeCompiled(optim.muon_step_fused))
        compiled.clear()
        ps = [p.clone().requires_grad_() for p in init]
        opt = MuonAdamW([adamw_group([ps[0]]), muon_group([ps[1]])], compile_step=compile_step)
        for p, g in zip(ps, grads): p.grad = g.clone()
        opt.step()
        assert sorted(compiled) == expect, (env, compile_step, compiled)
        finals.append([p.detach() for p in ps])
    for a, b in zip(finals[0], finals[1]): assert torch.equal(a, b)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    "If torch.compile fails, the step warns once and runs eagerly with the same result."
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "1")
    monkeypatch.setattr(optim, "_adamw_kernel", optim._MaybeCompiled(optim.adamw_step_fused))
    monkeypatch.setattr(optim, "_muon_kernel", optim._MaybeCompiled(optim.muon_step_fused))
    torch.manual_seed(0)
    init = [torch.randn(6, 4), torch.randn(8, 8)]
    grads = [torch.randn(6, 4), torch.randn(8, 8)]
    results = []
    for expect_warning in (True, False):
        ps = [p.clone().requires_grad_() for p in init]
        opt = MuonAdamW([adamw_group([ps[0]]), muon_group([ps[1]])])
        for p, g in zip(ps, grads): p.grad = g.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert any("running the optimizer step eagerly" in str(w.message) for w in caught) == expect_warning
        results.append([p.detach() for p in ps])
    assert optim._adamw_kernel.failed and optim._muon_kernel.failed
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "0")
    ps = [p.clone().requires_grad_() for p in init]
    opt = MuonAdamW([adamw_group([ps[0]]), muon_group([ps[1]])])
    for p, g in zip(ps, grads): p.grad = g.clone()
    opt.step()
    for a, b in zip(results[0], ps): assert torch.equal(a, b)


def test_compiled_step_matches_eager_without_recompiling():
    "torch.compile on this CPU (subprocess, compiling takes a while): same numbers as eager, and a schedule changing lr,"
    " momentum and weight decay every step compiles no new graph (the 0-D CPU tensor trick)."
    code = r"""
import os, torch
from torch._dynamo.utils import counters
from nanochat_nb import optim
torch.manual_seed(0)
init, grads = [torch.randn(12, 8), torch.randn(16, 8)], [[torch.randn(12, 8), torch.randn(16, 8)] for _ in range(4)]
finals = []
for mode in ("0", "1"):
    os.environ["NANOCHAT_OPTIM_COMPILE"] = mode
    ps = [p.clone().requires_grad_() for p in init]
    opt = optim.MuonAdamW([dict(kind="adamw", params=[ps[0]], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1),
                           dict(kind="muon", params=[ps[1]], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2)])
    for i, gs in enumerate(grads):
        for p, g in zip(ps, gs): p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] *= 0.9
            group["weight_decay"] *= 0.8
            if group["kind"] == "muon": group["momentum"] = 0.85 + 0.03 * i
        opt.step()
        if i == 0: graphs_after_first = counters["stats"]["unique_graphs"]
    finals.append(ps)
assert not optim._muon_kernel.failed and not optim._adamw_kernel.failed
assert graphs_after_first == 2 and counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
for a, b in zip(*finals):
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NANOCHAT_DTYPE": "float32"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------------
# State dict round trip (single process)

def test_state_dict_round_trip_continues_identically(tmp_path):
    params, opt = W.build(MuonAdamW)
    W.train(opt, params, 3, 0, 6)
    path = tmp_path / "optim_000003_rank0.pt"
    torch.save(opt.state_dict(), path)
    snapshot = {k: v.detach().clone() for k, v in params.items()}
    W.train(opt, params, 6, 3, 6)
    params2, opt2 = W.build(MuonAdamW, seed=7)
    with torch.no_grad():
        for k in params2: params2[k].copy_(snapshot[k])
    opt2.load_state_dict(torch.load(path))
    W.train(opt2, params2, 6, 3, 6)
    for k in params:
        assert torch.equal(params[k], params2[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# Distributed: 2 processes (gloo) == 1 process on the same total batch

def single_process_reference(steps):
    params, opt = W.build(MuonAdamW)
    W.train(opt, params, steps, 0, steps)
    return params


@pytest.mark.parametrize("fallback", [False, True], ids=["native", "fallback"])
def test_two_process_run_matches_single_process(tmp_path, fallback):
    args = ["tests/dist_optim_worker.py", str(tmp_path), "--steps", "6", "--resume-at", "3"] + (["--fallback"] if fallback else [])
    run_torchrun(args, nproc=2)
    ref = single_process_reference(6)
    r0, r1 = (torch.load(tmp_path / f"result_rank{r}.pt") for r in (0, 1))
    for k in ref:
        assert torch.equal(r0["final"][k], r1["final"][k]), f"ranks disagree on {k}"
        assert torch.allclose(r0["final"][k], ref[k].detach(), rtol=1e-4, atol=1e-5), \
            (k, (r0["final"][k] - ref[k].detach()).abs().max())
        for r in (r0, r1):  # resuming from each rank's own shard continues bit for bit
            assert torch.equal(r["resumed"][k], r["final"][k]), f"resume differs on {k}"
    assert any(v is False for v in r0["fallback_used"].values()) == fallback
    # the state is sharded: each rank holds half of wte's rows and 2 slots (ceil(3 / 2)) of the 3 wide matrices
    s0, s1 = (torch.load(tmp_path / f"optim_rank{r}.pt")["state"] for r in (0, 1))
    p_index = {name: i for i, name in enumerate(["lm_head", "wte", "gates", "lam", "sq0", "attn0", "attn1", "attn2", "fc0", "fc1"])}
    assert s0[p_index["wte"]]["exp_avg"].shape == (32, W.C)                # 64 rows / 2 ranks
    assert s0[p_index["lm_head"]]["exp_avg"].shape == (33, 32)             # odd rows: replicated
    assert s0[p_index["attn0"]]["momentum_buffer"].shape == (2, W.C, 2 * W.C)  # ceil(3 / 2) matrices per rank
    assert not torch.equal(s0[p_index["wte"]]["exp_avg"], s1[p_index["wte"]]["exp_avg"])
    # loading a 2-rank shard into a single process fails with a clear message instead of silently misbehaving
    params, opt = W.build(MuonAdamW)
    opt.load_state_dict(torch.load(tmp_path / "optim_rank0.pt"))
    with pytest.raises(RuntimeError, match="different world size"):
        W.train(opt, params, 1, 0, 1)
