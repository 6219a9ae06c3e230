"""Inference speed with the KV cache, as later nanochat's infer_bench: prefill and decode FLOPs, KV-cache bytes per
token, time to first token (TTFT), time per output token (TPOT) and tokens/s for batch sizes 1, 8, 32, plus the
Engine (sampling, tool state machine) at 1 and 8 samples.

Five modes, side by side:
  fp32    the original's CPU configuration, in a subprocess: the model in fp32 throughout (NANOCHAT_DTYPE=float32),
          weights used as they are, the soft-cap as the out-of-place tanh and a prefill that computes the logits of
          every prompt position (this project now soft-caps in place through a sigmoid and asks for the last only)
  cast    compute dtype, fp32 masters cast to it on every forward (this project before issue 17)
  held    compute dtype, weights held in it while generating, none packed (gpt.inference_weights, PACK_MIN_NUMEL off)
  packed  held, and on a CPU the large ones re-laid out for oneDNN (gpt.packed_weight)
  mixed   packed, and on a CPU a product of a few rows by a small weight done with its fp32 master where this CPU
          measured that faster (gpt.fp32_product_rows): what Engine does now
`cast`, `held`, `packed` and `mixed` run in one process on the same model, with malloc as compute_init sets it on a CPU
(common.keep_freed_memory; the fp32 process leaves malloc as it is), and take turns, repeat by repeat, so a busy moment
on a shared machine hits all of them; every figure is the median over --repeats. Where the compute dtype is fp32
(a CPU without fast bf16), `cast` and `held` do the same thing and differ only by noise.

Usage: python bench/infer.py [--depth 4] [--vocab-size 32768] [--prompt-len 128] [--new-tokens 32]
       [--batch-sizes 1 8 32] [--repeats 3] [--modes fp32 cast held packed mixed] [--device cpu|cuda]
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class BenchTokenizer:
    "Specials live outside the vocab, so the Engine never stops early."
    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
    def encode_special(self, s): return 10**9 + self.SPECIALS.index(s)
    def get_bos_token_id(self): return self.encode_special("<|bos|>")
    def encode(self, s, prepend=None): return list(s.encode())
    def decode(self, ids): return bytes(t for t in ids if t < 256).decode(errors="replace")


def worker(args, modes):
    import torch
    import nanochat_nb.engine as engine_mod
    from nanochat_nb.common import COMPUTE_DTYPE
    from nanochat_nb.engine import Engine, KVCache
    import nanochat_nb.gpt as G
    from nanochat_nb.gpt import GPT, config_for_depth
    device = torch.device(args.device)
    if device.type == "cpu" and "fp32" not in modes:  # as compute_init does in chat_cli / chat_web; not the original
        from nanochat_nb.common import keep_freed_memory
        print(keep_freed_memory(), file=sys.stderr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    seq_len = max(512, args.prompt_len + args.new_tokens)
    config = config_for_depth(args.depth, max_seq_len=seq_len, vocab_size=args.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.eval()
    c = model.config
    P, N = args.prompt_len, args.new_tokens
    real_hold, real_pack_min, real_probe = engine_mod.inference_weights, G.PACK_MIN_NUMEL, G.FP32_PROBE_ROWS
    if "fp32" in modes:  # the original's forward (fp32 runs alone, in its own process)
        G.softcap_logits = lambda logits, softcap: softcap * torch.tanh(logits / softcap)
        plain_forward = model.forward
        def original_forward(idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
            logits = plain_forward(idx, targets, kv_cache, loss_reduction)
            return logits[:, -1:] if last_only else logits
        model.forward = original_forward

    @contextlib.contextmanager
    def weights(mode):
        "The block runs with `mode`'s weights; the Engine's own hold is switched off (this one is the outermost)."
        G.PACK_MIN_NUMEL = real_pack_min if mode in ("packed", "mixed") else float("inf")
        G.FP32_PROBE_ROWS = real_probe if mode == "mixed" else ()
        engine_mod.inference_weights = lambda m: contextlib.nullcontext()
        try:
            with real_hold(model) if mode in ("held", "packed", "mixed") else contextlib.nullcontext():
                yield
        finally:
            G.PACK_MIN_NUMEL, G.FP32_PROBE_ROWS, engine_mod.inference_weights = real_pack_min, real_probe, real_hold

    @torch.inference_mode()
    def run(B):
        "Prefill B prompts of P tokens, then greedy-decode N tokens: (ttft_s, decode_s)."
        cache = KVCache(batch_size=B, num_heads=c.n_kv_head, seq_len=P + N, head_dim=c.n_embd // c.n_head,
                        num_layers=c.n_layer, device=device, dtype=COMPUTE_DTYPE)
        prompt = torch.randint(0, c.vocab_size, (B, P), device=device)
        sync(); t0 = time.perf_counter()
        ids = model(prompt, kv_cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        sync(); t1 = time.perf_counter()
        for _ in range(N - 1):
            ids = model(ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(); t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / max(N - 1, 1)

    tok = BenchTokenizer()
    prompt_list = torch.randint(0, c.vocab_size, (P,)).tolist()

    def run_engine(mode, samples):
        with weights(mode):
            t0 = time.perf_counter()
            cols = list(Engine(model, tok).generate(prompt_list, num_samples=samples, max_tokens=N, temperature=1.0, top_k=50))
            assert len(cols) == N
            return samples * N / (time.perf_counter() - t0)

    results = {m: {} for m in modes}
    for B in args.batch_sizes:  # warm-up
        for m in modes:
            with weights(m):
                run(B)
    for r in range(args.repeats):
        for B in args.batch_sizes:
            for m in modes:
                with weights(m):
                    ttft, tpot = run(B)
                results[m].setdefault(B, []).append((ttft, tpot))
        for m in modes:
            for s in args.engine_samples:
                results[m].setdefault(f"engine{s}", []).append(run_engine(m, s))
    dtype = str(COMPUTE_DTYPE).split(".")[-1]
    out = []
    for m in modes:
        for B in args.batch_sizes:
            ttft = statistics.median(t for t, _ in results[m][B])
            tpot = statistics.median(t for _, t in results[m][B])
            out.append(dict(mode=m, dtype=dtype, batch=B, ttft=ttft, tpot=tpot, tok_s=B / tpot, prefill_tok_s=B * P / ttft))
        for s in args.engine_samples:
            out.append(dict(mode=m, dtype=dtype, engine=s, tok_s=statistics.median(results[m][f"engine{s}"])))
    est = dict(decode_flops=model.estimate_decode_flops(P + N // 2), prefill_flops=model.estimate_prefill_flops(P),
               kv_bytes_per_token=model.kv_bytes_per_token(), kv_bytes_read=model.kv_bytes_read_per_decode_step(P + N // 2),
               n_embd=c.n_embd, n_layer=c.n_layer)
    print("RESULTS " + json.dumps(dict(rows=out, est=est)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--engine-samples", type=int, nargs="*", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["fp32", "cast", "held", "packed", "mixed"],
                   choices=["fp32", "cast", "held", "packed", "mixed"])
    p.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        return worker(args, args.worker.split(","))
    from nanochat_nb.common import cpu_model_name
    print(f"{cpu_model_name() if args.device == 'cpu' else torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | load average {os.getloadavg()[0]:.1f}")
    print(f"d{args.depth}, V={args.vocab_size}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"greedy; median of {args.repeats}")
    groups = [["fp32"]] if "fp32" in args.modes else []
    if [m for m in args.modes if m != "fp32"]:
        groups.append([m for m in args.modes if m != "fp32"])
    rows, est = [], {}
    for g in groups:
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if g == ["fp32"]:
            env["NANOCHAT_DTYPE"] = "float32"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", ",".join(g)] + [a for a in sys.argv[1:]]
        cmd += ["--device", args.device]
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"benchmark worker for {g} failed (exit {proc.returncode}); see the messages above")
        r = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")][-1][len("RESULTS "):])
        rows += r["rows"]
        est[g[0]] = r["est"]
    e = next(iter(est.values()))
    print(f"decode: {e['decode_flops'] / 1e6:.1f} MFLOP/token at context {args.prompt_len + args.new_tokens // 2}; "
          f"prefill of {args.prompt_len} tokens: {e['prefill_flops'] / 1e9:.2f} GFLOP")
    for g, v in est.items():
        print(f"KV cache ({'fp32' if g == 'fp32' else 'compute dtype'}): {v['kv_bytes_per_token'] / 1024:.1f} KiB/token, "
              f"{v['kv_bytes_read'] / 2**20:.2f} MiB read per decode step and sequence")
    print(f"\n{'mode':<6} {'dtype':<9} {'batch':>5} {'TTFT ms':>9} {'prefill tok/s':>13} {'TPOT ms':>8} {'tok/s':>8} {'decode GFLOP/s':>14}")
    by = {}
    for r in rows:
        if "batch" in r:
            by[(r["mode"], r["batch"])] = r
            print(f"{r['mode']:<6} {r['dtype']:<9} {r['batch']:>5} {1e3 * r['ttft']:>9.1f} {r['prefill_tok_s']:>13.0f} "
                  f"{1e3 * r['tpot']:>8.2f} {r['tok_s']:>8.0f} {r['tok_s'] * e['decode_flops'] / 1e9:>14.2f}")
    print(f"\n{'mode':<6} {'Engine samples':>14} {'tok/s':>8}   (top-k 50 sampling, the tool state machine)")
    for r in rows:
        if "engine" in r:
            by[(r["mode"], f"engine{r['engine']}")] = r
            print(f"{r['mode']:<6} {r['engine']:>14} {r['tok_s']:>8.0f}")
    print()
    keys = [*args.batch_sizes, *[f"engine{s}" for s in args.engine_samples]]
    for num, den in [("mixed", "fp32"), ("mixed", "packed"), ("packed", "held"), ("held", "cast"), ("held", "fp32")]:
        if any((num, k) in by and (den, k) in by for k in keys):
            ratios = ", ".join(f"{'batch ' + str(k) if isinstance(k, int) else k}: x{by[(num, k)]['tok_s'] / by[(den, k)]['tok_s']:.2f}"
                               for k in keys if (num, k) in by and (den, k) in by)
            print(f"decode tok/s {num} / {den}: {ratios}")


if __name__ == "__main__":
    main()
