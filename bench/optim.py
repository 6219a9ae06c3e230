"""Benchmark of the MuonAdamW step: milliseconds per step and per million parameters.

Measures, in one run, on a GPT-shaped parameter set (embeddings in COMPUTE_DTYPE, fp32 matrices, groups as
GPT.setup_optimizer builds them):
  1. one process, eager kernels (the default on CPU);
  2. one process, torch.compile'd kernels (the default on CUDA), plus the compile time;
  3. two processes under torchrun (gloo on CPU, NCCL on GPUs), eager, same total parameter set,
and prints the ratios compiled/eager and 2-process/1-process. Every process runs --threads CPU threads (default 1),
so the 2-process run uses twice the cores, as a second GPU would be; on a shared machine use fewer threads than
cores, or the timings measure oversubscription.

    python bench/optim.py [--depth 2] [--width 256] [--vocab 8192] [--steps 10] [--threads 1] [--no-compile] [--no-dist]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def gpt_like_groups(depth, C, V, device, dtype):
    "Parameters and param groups shaped like nanochat's GPT (wte/lm_head/value-embeds-free, scalars, block matrices)."
    g = torch.Generator(device="cpu").manual_seed(0)
    def P(*shape, dt=torch.float32, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt).requires_grad_()
    lm_head, wte = P(V, C), P(V, C, dt=dtype)
    resid, x0 = P(depth, scale=1.0), P(depth, scale=0.1)
    mats = {}
    for _ in range(depth):
        for shape in [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]:
            mats.setdefault(shape, []).append(P(*shape))
    s = (C / 768) ** -0.5
    adam = lambda ps, lr, betas, wd: dict(kind="adamw", params=ps, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
    groups = [adam([lm_head], 0.004 * s, (0.8, 0.96), 0.01), adam([wte], 0.2 * s, (0.8, 0.995), 0.001),
              adam([resid], 0.005, (0.8, 0.95), 0.05), adam([x0], 0.5, (0.96, 0.95), 0.0)]
    groups += [dict(kind="muon", params=mats[shape], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.2)
               for shape in sorted(mats)]
    return groups


def time_steps(opt, steps, sync):
    "Median wall time of `steps` optimizer steps after 2 warmup steps (gradients refilled before each, untimed)."
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    times = []
    for i in range(steps + 2):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(args, compile_mode, dist_world=1):
    os.environ["NANOCHAT_OPTIM_COMPILE"] = compile_mode
    from nanochat_nb import optim
    from nanochat_nb.common import COMPUTE_DTYPE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    groups = gpt_like_groups(args.depth, args.width, args.vocab, device, COMPUTE_DTYPE)
    nparams = sum(p.numel() for g in groups for p in g["params"])
    opt_cls = optim.DistMuonAdamW if dist_world > 1 else optim.MuonAdamW
    opt = opt_cls(groups)
    t0 = time.perf_counter()
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.zeros_like(p)
    opt.step()  # first step: state allocation (+ compilation)
    sync()
    first = time.perf_counter() - t0
    step = time_steps(opt, args.steps, sync)
    failed = optim._adamw_kernel.failed or optim._muon_kernel.failed
    return dict(nparams=nparams, step_s=step, first_s=first, compile_failed=failed, device=device,
                dtype=str(COMPUTE_DTYPE))


def worker(args):
    from nanochat_nb.common import compute_init, compute_cleanup
    ddp, rank, _, world, _ = compute_init("cuda" if torch.cuda.is_available() else "cpu")
    res = measure(args, "0", dist_world=world)
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    compute_cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    ap.add_argument("--no-dist", action="store_true", help="skip the 2-process torchrun measurement")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    torch.manual_seed(0)
    eager = measure(args, "0")
    M = eager["nparams"] / 1e6
    print(f"device={eager['device']} threads={torch.get_num_threads()} compute dtype={eager['dtype']} "
          f"depth={args.depth} width={args.width} vocab={args.vocab}: {M:.2f}M parameters")
    print(f"1 process, eager:    {eager['step_s'] * 1e3:8.1f} ms/step  {eager['step_s'] * 1e3 / M:7.2f} ms per M params")
    if not args.no_compile:
        comp = measure(args, "1")
        if comp["compile_failed"]:
            print("1 process, compiled: torch.compile failed here; the optimizer ran eagerly")
        else:
            print(f"1 process, compiled: {comp['step_s'] * 1e3:8.1f} ms/step  {comp['step_s'] * 1e3 / M:7.2f} ms per M params"
                  f"  (first step incl. compile {comp['first_s']:.1f} s)")
            print(f"  compiled / eager step time = {comp['step_s'] / eager['step_s']:.2f}x")
    if not args.no_dist:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.abspath(__file__),
               "--worker", f"--depth={args.depth}", f"--width={args.width}", f"--vocab={args.vocab}", f"--steps={args.steps}",
               f"--threads={args.threads}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print("2 processes: torchrun failed:\n" + proc.stderr[-2000:])
        else:
            d = json.loads(lines[0][7:])
            print(f"2 processes, eager:  {d['step_s'] * 1e3:8.1f} ms/step  {d['step_s'] * 1e3 / M:7.2f} ms per M params "
                  f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each)")
            print(f"  2-process / 1-process step time = {d['step_s'] / eager['step_s']:.2f}x")


if __name__ == "__main__":
    main()
