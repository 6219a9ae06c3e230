"""Worker for tests/test_optim.py: K steps of DistMuonAdamW under a 2-process CPU torchrun (gloo).

Each rank sees half of a fixed batch; the optimizer must average the gradients itself, so the parameters after K steps
must equal those of a single-process MuonAdamW on the whole batch. Midway every rank saves its optimizer shard; a fresh
optimizer loads it and the continuation must equal the uninterrupted run bit for bit.

Usage: torchrun --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR [--steps K] [--resume-at K1] [--fallback]
Also imported by the test for the shared toy problem (make_params, make_groups, make_batch, loss_fn).
"""
import argparse
import os
import sys

import torch

C = 16


def make_params(seed=0):
    "A small MLP-like parameter set: names -> fp32 tensors (requires_grad)."
    g = torch.Generator().manual_seed(seed)
    def P(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()
    return {
        "wte": P(64, C),          # AdamW, >= 1024 elements, rows divisible by 2 -> reduce-scatter + sharded state
        "lm_head": P(33, 32),          # AdamW, >= 1024 elements but 33 rows -> all-reduce path (odd rows)
        "gates": P(4, scale=0.1),  # AdamW scalars (all-reduce)
        "lam": P(1, scale=0.1),
        "attn0": P(C, 2 * C), "attn1": P(C, 2 * C), "attn2": P(C, 2 * C),  # Muon, wide, K=3 (padded to 4)
        "fc0": P(4 * C, C), "fc1": P(4 * C, C),                             # Muon, tall (lr x2), K=2
        "sq0": P(C, C),                                                     # Muon, square, K=1 (rank 1 owns none)
    }


def make_groups(params):
    "Param groups shaped like GPT.setup_optimizer's (AdamW groups first, then Muon groups by ascending shape)."
    p = params
    # eps is 1e-3 here (1e-10 in nanochat): Muon and eps-free Adam are blind to the scale of the gradient, so only a
    # large eps lets the test see a rank-summed instead of rank-averaged gradient. The lrs stay small next to eps: near
    # g = 0 an Adam update moves by lr/eps per unit of gradient, which would magnify fp32 rounding of the grads
    adam = lambda ps, lr, betas, wd: dict(kind="adamw", params=ps, lr=lr, betas=betas, eps=1e-3, weight_decay=wd)
    muon = lambda ps: dict(kind="muon", params=ps, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2)
    return [adam([p["lm_head"]], 0.004, (0.8, 0.96), 0.01),
            adam([p["wte"]], 0.02, (0.8, 0.995), 0.001),
            adam([p["gates"]], 0.005, (0.8, 0.95), 0.05),
            adam([p["lam"]], 0.2, (0.96, 0.95), 0.0),
            muon([p["sq0"]]), muon([p["attn0"], p["attn1"], p["attn2"]]), muon([p["fc0"], p["fc1"]])]


def make_batch(step, B=32):
    "The full batch of step `step`: token ids (B,) and regression targets (B, 32)."
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 64, (B,), generator=g), torch.randn(B, 32, generator=g)


def loss_fn(p, idx, y):
    "Mean squared error of a small residual MLP; the mean over the batch makes rank-local means average to the global one."
    x = p["wte"][idx]
    x = x + torch.relu(x @ p["attn0"]) @ p["attn1"].T * (1 + p["lam"])
    x = x + torch.relu(x @ p["fc0"].T) @ p["fc1"] * p["gates"].sum()
    x = x @ p["sq0"] + x @ p["attn2"] @ p["attn2"].T
    out = torch.cat([x, x], dim=-1)[:, :32] @ p["lm_head"][:32].T + p["lm_head"][32, :].sum()
    return ((out - y) ** 2).mean()


def set_schedule(opt, step, total):
    "A warmdown on lr and Muon weight decay, as base_train applies before each step."
    frac = 1 - 0.5 * step / total
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * frac
        if group["kind"] == "muon":
            group["weight_decay"] = 0.2 * frac


def train(opt, params, steps, start, total, rank=0, world=1):
    for step in range(start, steps):
        idx, y = make_batch(step)
        n = idx.shape[0] // world
        loss = loss_fn(params, idx[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
        loss.backward()
        set_schedule(opt, step, total)
        opt.step()
        opt.zero_grad(set_to_none=True)


def build(opt_cls, seed=0):
    params = make_params(seed)
    opt = opt_cls(make_groups(params))
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return params, opt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--resume-at", type=int, default=3)
    ap.add_argument("--fallback", action="store_true", help="force the all_reduce/all_gather-list fallbacks")
    args = ap.parse_args()
    if args.fallback:
        os.environ["NANOCHAT_OPTIM_COMM_FALLBACK"] = "1"
    import torch.distributed as dist
    from nanochat_nb.common import compute_init
    from nanochat_nb import optim
    ddp, rank, local_rank, world, device = compute_init("cpu")
    assert ddp and world == 2, "run under torchrun --nproc_per_node=2"
    params, opt = build(optim.DistMuonAdamW)
    train(opt, params, args.resume_at, 0, args.steps, rank, world)
    shard = os.path.join(args.out_dir, f"optim_rank{rank}.pt")
    torch.save(opt.state_dict(), shard)
    snapshot = {k: v.detach().clone() for k, v in params.items()}
    train(opt, params, args.steps, args.resume_at, args.steps, rank, world)
    # resume: fresh parameters from the snapshot, fresh optimizer, load this rank's shard
    params2, opt2 = build(optim.DistMuonAdamW, seed=123)
    with torch.no_grad():
        for k in params2: params2[k].copy_(snapshot[k])
    opt2.load_state_dict(torch.load(shard))
    train(opt2, params2, args.steps, args.resume_at, args.steps, rank, world)
    torch.save({"final": {k: v.detach() for k, v in params.items()},
                "resumed": {k: v.detach() for k, v in params2.items()},
                "fallback_used": {str(k): v for k, v in optim._native_ok.items()}},
               os.path.join(args.out_dir, f"result_rank{rank}.pt"))
    # Leave without tearing gloo down: in about 1 run in 20 on the 2-core dev box a rank died at teardown with
    # "terminate called without an active exception" (a gloo thread destroyed while joinable), even after a barrier.
    # Everything is written and every collective has completed; the barrier keeps ranks from leaving mid-collective.
    dist.barrier()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
