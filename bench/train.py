"""Pretraining throughput and quality on this CPU: fp32 vs bf16, eager vs torch.compile, plain vs chunked loss,
side by side.

Each configuration runs `nanochat_nb.base_train.main` in its own subprocess (COMPUTE_DTYPE is fixed at import, so the
dtype is chosen with NANOCHAT_DTYPE per process) on the same data, model, seed and number of steps, and reports
  tok/s   steady-state tokens per second: total batch / median step time over every step but the first (which
          includes compilation; the median resists the next few warm-up steps and other processes stealing the CPU)
  MFU     model FLOPs utilisation against this CPU's *measured* matmul peak in that dtype (measured once up front,
          best of 3 s, with common.measure_matmul_flops)
  step0 s the first step's time (compilation, when compiled)
  RSS MB  the subprocess's peak resident memory
  val bpb bits per byte on the validation shard after the fixed number of steps (same tokens for every config)

A configuration is `dtype-mode[-loss][-optN][-malloc0]`: dtype fp32|bf16, mode eager|compile (--compile=0|1), loss
plain|chunked (NANOCHAT_CHUNKED_LOSS=0|1; default: the model's choice, chunked on a CPU), optN the optimizer step
compiled or not (NANOCHAT_OPTIM_COMPILE=N; default: base_train's choice, compiled with --compile=1 on a CPU), malloc0
glibc's malloc as it comes (NANOCHAT_MALLOC=0; default: common.keep_freed_memory, which the original does not do).
Each configuration compiles into an inductor cache of its own, fresh in this bench run, so its step0 is a cold start;
a `-warm` suffix runs the same configuration again on the cache its first run left, as a user's second run would
(e.g. `--configs orig-fp32,orig-fp32-warm`).
Two aliases stand for the original's code paths on a CPU: `orig-fp32` = fp32-compile-plain-opt1-malloc0 (its
default: fp32, compiled model and optimizer, full logits, malloc untouched) and `orig-bf16` =
bf16-compile-plain-opt1-malloc0 (the same forced to bf16).
Quality (final loss, val bpb) over a few dozen steps at this tiny batch is chaotic: right after warm-up the loss
spikes, and runs that differ only in rounding (eager chunked vs eager plain loss, both fp32) end up to 0.6 nats apart.
Compare tok/s, step0 and RSS across configs; compare quality only between repeated runs or in the fixed-seed tests
(tests/test_base_train.py: compiled vs eager in fp32 agree to 2e-3 where training is stable).
On a CPU without native bf16 (no AVX512-BF16/AMX: bf16 matmul can be ~80x slower than fp32) the bf16 configs are
skipped, with a note, unless --force-bf16.
The synthetic corpus uses a large random lexicon so that the tokenizer reaches --vocab-size (default 32768, where
the head dominates a small model, as in a real run).

Usage: python bench/train.py [--steps 60] [--depth 4] [--configs orig-fp32,orig-bf16,bf16-eager,bf16-compile]
       [--base-dir DIR]  (a base dir that already has a corpus and tokenizer, e.g. after runs/runcpu.sh;
                          default: a temporary one with a synthetic corpus and tokenizer)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CHILD = r"""
import json, os, sys
from nanochat_nb.base_train import main
r = main(sys.argv[1:])
json.dump(r, open(os.environ["RESULTS_JSON"], "w"))
"""


ALIASES = {"orig-fp32": "fp32-compile-plain-opt1-malloc0", "orig-bf16": "bf16-compile-plain-opt1-malloc0"}


def prepare_base_dir(base_dir, vocab_size):
    "Synthetic corpus + tokenizer of `vocab_size` in base_dir, unless it already has them."
    from nanochat_nb.tiny_corpus import lexicon_documents, make_corpus, make_tokenizer
    if not os.path.exists(os.path.join(base_dir, "tokenizer", "token_bytes.pt")):
        os.environ["NANOCHAT_BASE_DIR"] = base_dir
        train_docs = lexicon_documents(6000, 0)
        make_corpus(base_dir, train_docs=train_docs, val_docs=lexicon_documents(400, 1))
        make_tokenizer(base_dir, vocab_size=vocab_size, docs=train_docs)


def run_config(name, base_dir, train_args, peaks):
    cold_name = name.removesuffix("-warm")
    dtype, mode, *extra = ALIASES.get(cold_name, cold_name).split("-")
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "NANOCHAT_DTYPE": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
    for e in extra:
        if e in ("plain", "chunked"):
            env["NANOCHAT_CHUNKED_LOSS"] = "0" if e == "plain" else "1"
        elif e in ("opt0", "opt1"):
            env["NANOCHAT_OPTIM_COMPILE"] = e[-1]
        elif e == "malloc0":
            env["NANOCHAT_MALLOC"] = "0"
        else:
            sys.exit(f"bench/train.py: unknown part {e!r} in config {name!r}; see --help")
    # one inductor cache per configuration (not the user's default, which earlier runs may have warmed)
    cache_dir = os.path.join(base_dir, f"inductor_cache_{cold_name}")
    if name != cold_name and not os.path.isdir(cache_dir):
        sys.exit(f"bench/train.py: {name} needs {cold_name} to run before it in --configs (it reuses that run's cache)")
    if name == cold_name:
        shutil.rmtree(cache_dir, ignore_errors=True)  # cold, even in a --base-dir an earlier bench run used
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        results_path = f.name
    env["RESULTS_JSON"] = results_path
    args = train_args + [f"--compile={'1' if mode == 'compile' else '0'}", f"--model-tag=bench_{name}"]
    t0 = time.time()
    log_path = os.path.join(base_dir, f"bench_{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # show progress: every 10th step and the validation lines
            log.write(line)
            if line.startswith("Step ") or (line.startswith("step ") and int(line[5:10]) % 10 == 0):
                print(f"  [{name}] {line.rstrip()}", flush=True)
        _, status, rusage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"[{name}] FAILED, see {log_path}:\n" + open(log_path).read()[-3000:])
        return None
    r = json.load(open(results_path)); os.remove(results_path)
    r["peak_flops"] = peaks[dtype]
    # median step time after step 0 (compilation): robust to warm-up steps and other processes stealing the CPU
    times = sorted(t for s, t in r["step_times"].items() if int(s) >= 1)
    median_dt = times[len(times) // 2] if times else float("nan")
    r["tok_per_sec"] = r["total_batch_size"] / median_dt
    r["mfu"] = 100 * r["num_flops_per_token"] * r["tok_per_sec"] / r["peak_flops"]
    r["wall"] = wall
    r["rss_mb"] = rusage.ru_maxrss / 1024
    r["step0"] = r["step_times"]["0"]
    losses = r["train_losses"]
    r["final_loss"] = losses[str(r["num_iterations"] - 1)]
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--configs", type=str, default="orig-fp32,orig-bf16,bf16-eager,bf16-compile")
    p.add_argument("--vocab-size", type=int, default=32768, help="of the synthetic tokenizer (without --base-dir)")
    p.add_argument("--window-pattern", type=str, default="L")
    p.add_argument("--base-dir", type=str, default=None)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--force-bf16", action="store_true", help="run bf16 configs even on a CPU without native bf16")
    a = p.parse_args()
    base_dir = a.base_dir or tempfile.mkdtemp(prefix="nanochat_bench_")
    prepare_base_dir(base_dir, a.vocab_size)
    tokens = a.device_batch_size * a.max_seq_len
    train_args = [f"--depth={a.depth}", "--head-dim=64", f"--window-pattern={a.window_pattern}", f"--max-seq-len={a.max_seq_len}",
                  f"--device-batch-size={a.device_batch_size}", f"--total-batch-size={tokens}",
                  f"--num-iterations={a.steps}", f"--eval-every={a.steps}", f"--eval-tokens={8 * tokens}",
                  "--core-metric-every=-1", "--sample-every=-1", f"--warmup-steps={a.warmup_steps}"]
    import torch
    from nanochat_nb.common import cpu_model_name
    print(f"CPU: {cpu_model_name()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"config: depth {a.depth}, seq {a.max_seq_len}, batch {tokens} tokens/step, {a.steps} steps, seed 42 (compute_init)")
    from nanochat_nb.common import cpu_has_native_bf16, measure_matmul_flops
    native_bf16 = cpu_has_native_bf16()
    configs = a.configs.split(",")
    if not native_bf16 and not a.force_bf16:
        skipped = [n for n in configs if ALIASES.get(n, n).startswith("bf16")]
        if skipped:
            print(f"skipping {', '.join(skipped)}: this CPU has no native bf16 matmul (AVX512-BF16/AMX), where bf16 "
                  f"runs many times slower than fp32; --force-bf16 runs them anyway")
        configs = [n for n in configs if n not in skipped]
    # this CPU's matmul peak per dtype, measured once here (best of 3 s) and shared by all configs; without native
    # bf16 one 2048^3 bf16 matmul alone takes about a minute, so measure that one smaller
    bf16_n = 2048 if native_bf16 else 512
    peaks = {"fp32": measure_matmul_flops(torch.float32, seconds=3),
             "bf16": measure_matmul_flops(torch.bfloat16, n=bf16_n, seconds=3)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          f"(x{peaks['bf16'] / peaks['fp32']:.2f})")
    rows = {}
    for name in configs:
        print(f"running {name} ...", flush=True)
        rows[name] = run_config(name, base_dir, train_args, peaks)
    print()
    print(f"{'config':<24} {'tok/s':>9} {'MFU %':>7} {'step0 s':>8} {'RSS MB':>7} {'final loss':>11} {'val bpb':>9} {'wall s':>7}")
    for name, r in rows.items():
        label = name if name not in ALIASES else f"{name} ({ALIASES[name]})"
        if r is None: print(f"{label:<24} failed"); continue
        print(f"{label:<24} {r['tok_per_sec']:>9.0f} {r['mfu']:>7.2f} {r['step0']:>8.1f} {r['rss_mb']:>7.0f} "
              f"{r['final_loss']:>11.4f} {r['val_bpb']:>9.4f} {r['wall']:>7.1f}")
    print()
    names = [n for n, r in rows.items() if r is not None]
    for den in [n for n in ("orig-fp32", "orig-bf16") if n in names] or names[:1]:
        for num in names:
            if num != den:
                q = rows[num]["val_bpb"] - rows[den]["val_bpb"]
                print(f"{num} vs {den}: speed x{rows[num]['tok_per_sec'] / rows[den]['tok_per_sec']:.2f}, "
                      f"peak RSS x{rows[num]['rss_mb'] / rows[den]['rss_mb']:.2f}, val bpb {q:+.4f}")
    print("(MFU is against the measured peak of each dtype, so it compares utilisation, not speed)")
    print(f"logs: {base_dir}/bench_<config>.log")


if __name__ == "__main__":
    main()
