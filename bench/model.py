"""Forward+backward throughput of the GPT on this CPU, fp32 vs bf16, plain vs chunked loss, and MFU against the
measured matmul peak.

    python bench/model.py                       # depths 4 and 6, sequence 512, both dtypes, both losses
    python bench/model.py --depths 4 --steps 5 --window-pattern L --losses chunked

The loss variants (`plain`: the (B*T, V) fp32 logits and F.cross_entropy; `chunked`: gpt.softcap_cross_entropy) run
in the same process on the same model and take turns step by step, so a busy moment on a shared machine hits both.

COMPUTE_DTYPE is fixed when nanochat_nb.common is imported, so each dtype runs in its own subprocess with
NANOCHAT_DTYPE set. Peak FLOP/s is this CPU's matmul peak in that dtype, measured afresh here
(common.get_cpu_peak_flops(cache=False)): a cached peak measured while the machine was busy would be too low. FLOPs per token are GPT.estimate_flops() at the benchmark's sequence length (6N + attention).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    import torch
    from tqdm import tqdm
    from nanochat_nb.common import COMPUTE_DTYPE, get_cpu_peak_flops
    from nanochat_nb.gpt import build_model_meta
    peak = get_cpu_peak_flops(cache=False)
    results = []
    for depth in args.depths:
        torch.manual_seed(0)
        model = build_model_meta(depth, max_seq_len=args.seq_len, vocab_size=args.vocab_size, window_pattern=args.window_pattern)
        model.to_empty(device="cpu")
        model.init_weights()
        flops_per_token = model.estimate_flops()
        x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
        y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))

        def step(loss_kind):
            model.chunked_loss = {"plain": "0", "chunked": "1"}[loss_kind]
            loss = model(x, targets=y)
            loss.backward()
            model.zero_grad(set_to_none=True)
        for loss_kind in args.losses:
            step(loss_kind)  # warm-up
        times = {k: [] for k in args.losses}
        for _ in tqdm(range(args.steps), desc=f"{str(COMPUTE_DTYPE).split('.')[-1]} d{depth}", file=sys.stderr, leave=False):
            for loss_kind in args.losses:
                t0 = time.perf_counter()
                step(loss_kind)
                times[loss_kind].append(time.perf_counter() - t0)
        for loss_kind in args.losses:
            dt = sorted(times[loss_kind])[len(times[loss_kind]) // 2]  # median: the machine is shared
            tok_s = args.batch_size * args.seq_len / dt
            results.append(dict(depth=depth, n_embd=model.config.n_embd, dtype=str(COMPUTE_DTYPE).split(".")[-1],
                                loss=loss_kind, tok_s=tok_s, step_s=dt, flops_per_token=flops_per_token,
                                achieved=tok_s * flops_per_token, peak=peak, mfu=tok_s * flops_per_token / peak))
        del model
    print("RESULTS " + json.dumps(results))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2, help="rows per forward+backward")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", type=str, default="SSSL")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (after one warm-up step)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--losses", nargs="+", default=["plain", "chunked"], choices=["plain", "chunked"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch
    print(f"GPT forward+backward on CPU: {torch.get_num_threads()} threads, T={args.seq_len}, batch {args.batch_size}, "
          f"V={args.vocab_size}, window pattern {args.window_pattern}, median of {args.steps} steps")
    rows = []
    for dtype in args.dtypes:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--depths", *map(str, args.depths),
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--vocab-size", str(args.vocab_size),
               "--window-pattern", args.window_pattern, "--steps", str(args.steps), "--losses", *args.losses]
        env = {**os.environ, "NANOCHAT_DTYPE": dtype, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"benchmark worker for {dtype} failed (exit {proc.returncode}); see the messages above")
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1]
        rows += json.loads(line[len("RESULTS "):])

    print(f"\n{'depth':>5} {'n_embd':>6} {'dtype':>9} {'loss':>8} {'step s':>7} {'tokens/s':>9} {'GFLOP/tok':>9} "
          f"{'achieved GFLOP/s':>16} {'peak GFLOP/s':>12} {'MFU':>6}")
    for r in rows:
        print(f"{r['depth']:>5} {r['n_embd']:>6} {r['dtype']:>9} {r['loss']:>8} {r['step_s']:>7.3f} {r['tok_s']:>9.1f} "
              f"{r['flops_per_token'] / 1e9:>9.3f} {r['achieved'] / 1e9:>16.1f} {r['peak'] / 1e9:>12.1f} {100 * r['mfu']:>5.1f}%")
    by = {(r["depth"], r["dtype"], r["loss"]): r for r in rows}
    print()
    for d in args.depths:
        for loss_kind in args.losses:
            if "float32" in args.dtypes and "bfloat16" in args.dtypes:
                a, b = by[(d, "float32", loss_kind)], by[(d, "bfloat16", loss_kind)]
                print(f"d{d} {loss_kind}: bf16/fp32 tokens/s ratio {b['tok_s'] / a['tok_s']:.2f}x; "
                      f"peak ratio {b['peak'] / a['peak']:.2f}x; MFU fp32 {100 * a['mfu']:.1f}% vs bf16 {100 * b['mfu']:.1f}%")
        if len(args.losses) == 2:
            for dtype in args.dtypes:
                a, b = by[(d, dtype, "plain")], by[(d, dtype, "chunked")]
                print(f"d{d} {dtype}: chunked/plain loss tokens/s ratio {b['tok_s'] / a['tok_s']:.2f}x")
            if "float32" in args.dtypes and "bfloat16" in args.dtypes:
                a, b = by[(d, "float32", "plain")], by[(d, "bfloat16", "chunked")]
                print(f"d{d}: bf16 chunked / fp32 plain tokens/s ratio {b['tok_s'] / a['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
