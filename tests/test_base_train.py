"""Pretraining end to end on a tiny model (depth 2, seq 64): the loss goes down, kill-and-resume replays the same
losses, two torchrun ranks equal one process with gradient accumulation, and a two-"node" c10d rendezvous run equals
them too. Each test trains on a synthetic corpus and a tiny tokenizer written into its own tmp base dir."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.base_train_worker import TINY_ARGS, make_corpus, make_documents, make_tokenizer
from tests.conftest import REPO, run_torchrun

WORKER = os.path.join(REPO, "tests", "base_train_worker.py")


def _with_base_dir(path, fn):
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(path)
    try:
        return fn()
    finally:
        if old is None: os.environ.pop("NANOCHAT_BASE_DIR")
        else: os.environ["NANOCHAT_BASE_DIR"] = old


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    "A base dir with a corpus, a tokenizer and the cached CPU peak (built once per module, copied per test)."
    d = tmp_path_factory.mktemp("template")
    def build():
        from nanochat_nb.common import get_peak_flops
        make_tokenizer(str(d))
        make_corpus(str(d))
        get_peak_flops("cpu")
    _with_base_dir(d, build)
    return d


@pytest.fixture
def train_dir(base_dir, template):
    shutil.copytree(template, base_dir, dirs_exist_ok=True)
    return base_dir


def test_tiny_run_lowers_loss(train_dir):
    from nanochat_nb.base_train import main
    # LRs are scaled by sqrt(512 / 2^19) = 1/32 for this tiny batch; raise them so 30 steps learn something
    r = main(TINY_ARGS + ["--total-batch-size=512", "--num-iterations=30", "--eval-every=15", "--eval-tokens=2048",
                          "--matrix-lr=0.6", "--embedding-lr=3", "--unembedding-lr=0.2", "--warmup-steps=3"])
    losses = [r["train_losses"][i] for i in range(30)]
    assert r["grad_accum_steps"] == 2 and r["num_iterations"] == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    bpb = r["val_bpbs"]
    assert sorted(bpb) == [0, 15, 30] and bpb[30] < bpb[15] < bpb[0], bpb
    assert r["val_bpb"] == r["min_val_bpb"] == bpb[30]
    ckpt = os.path.join(train_dir, "base_checkpoints", "d2")
    assert sorted(os.listdir(ckpt)) == ["meta_000030.json", "model_000030.pt", "optim_000030_rank0.pt", "rng_000030_rank0.pt"]
    meta = json.load(open(os.path.join(ckpt, "meta_000030.json")))
    assert meta["step"] == 30 and meta["total_batch_size"] == 512 and meta["user_config"]["depth"] == 2
    assert meta["model_config"]["n_embd"] == 128 and meta["model_config"]["n_head"] == 2
    assert set(meta["loop_state"]) >= {"min_val_bpb", "smooth_train_loss", "total_training_time"}
    assert {"pq_idx", "rg_idx", "epoch"} <= set(meta["dataloader_state_dict"])


def test_kill_and_resume_gives_identical_losses(train_dir):
    from nanochat_nb.base_train import main
    args = TINY_ARGS + ["--total-batch-size=512", "--num-iterations=10", "--eval-every=5", "--eval-tokens=1024",
                        "--save-every=4"]
    full = main(args)
    # the "killed" run: everything after step 4 of the first run is thrown away, then we resume from step 4
    resumed = main(args + ["--resume-from-step=4"])
    assert sorted(resumed["train_losses"]) == list(range(4, 10))
    for step in range(4, 10):
        assert resumed["train_losses"][step] == full["train_losses"][step], step
    assert resumed["val_bpb"] == full["val_bpb"]


def test_first_run_that_measures_the_cpu_peak_trains_the_same_model(train_dir):
    "The peak is measured on a base dir's first run, after seeding: it must not move the RNG the model is built from."
    from nanochat_nb.base_train import main
    args = TINY_ARGS + ["--total-batch-size=256", "--num-iterations=2", "--eval-every=-1"]
    os.remove(os.path.join(train_dir, "cpu_peak_flops.json"))
    first = main(args)  # measures the peak and caches it
    assert os.path.exists(os.path.join(train_dir, "cpu_peak_flops.json"))
    second = main(args)  # reads the cache
    assert first["train_losses"] == second["train_losses"]


def test_resume_from_missing_step_is_clear(train_dir):
    from nanochat_nb.base_train import main
    with pytest.raises(FileNotFoundError, match="Steps saved in"):
        main(TINY_ARGS + ["--total-batch-size=256", "--num-iterations=2", "--resume-from-step=7"])


def test_indivisible_batch_is_clear(train_dir):
    from nanochat_nb.base_train import main
    with pytest.raises(ValueError, match="must be divisible by device_batch_size"):
        main(TINY_ARGS + ["--total-batch-size=300", "--num-iterations=2", "--eval-every=-1"])


def test_compile_decision_forced_both_ways_and_auto_by_run_length(monkeypatch):
    from nanochat_nb import base_train
    from nanochat_nb.base_train import CPU_COMPILE_MODEL, decide_compile
    shape = dict(grad_accum_steps=2, flops_per_fwdbwd=1e11, peak_flops=1e11, num_params=10_000_000, n_layer=4,
                 dtype=torch.bfloat16)
    assert decide_compile("1", "cpu", 1, **shape) == (True, True, "forced by --compile=1")
    assert decide_compile("0", "cuda", 10**6, **shape) == (False, False, "forced by --compile=0")
    assert decide_compile("auto", "cuda", 1, **shape)[:2] == (True, True)
    assert decide_compile("auto", "mps", 10**6, **shape)[:2] == (False, False)
    # as measured (issue 17), a compiled model saves nothing on a CPU in either dtype: auto compiles the optimizer
    # step of a long enough run only; forcing still forces both
    for dtype in (torch.bfloat16, torch.float32):
        use_model, use_optim, why = decide_compile("auto", "cpu", 10**9, **{**shape, "dtype": dtype, "flops_per_fwdbwd": 1e13})
        name = str(dtype).removeprefix("torch.")
        assert (use_model, use_optim) == (False, True) and f"in {name}" in why and "model (~" in why and "saves nothing" in why
    # the break-even logic, with a CPU whose compiled model saved 10%: compile cost / (eager s x saved fraction)
    monkeypatch.setitem(CPU_COMPILE_MODEL, "bfloat16", {**CPU_COMPILE_MODEL["bfloat16"], "model_saving": 0.10})
    c = base_train.CPU_COMPILE_MODEL["bfloat16"]
    model_be = (c["model_cost_s"] + 4 * c["model_cost_per_layer_s"]) / (2 * 1e11 / (1e11 * c["eager_mfu"]) * c["model_saving"])
    optim_be = c["optim_cost_s"] / (10_000_000 * c["optim_eager_s_per_param"] * c["optim_saving"])
    assert optim_be < model_be  # the optimizer step is the cheaper bet
    for n, expected in [(int(optim_be) - 1, (False, False)), (int(optim_be) + 2, (False, True)),
                        (int(model_be) - 1, (False, True)), (int(model_be) + 2, (True, True))]:
        use_model, use_optim, why = decide_compile("auto", "cpu", n, **shape)
        assert (use_model, use_optim) == expected, (n, why)
        assert f"this run has {n} steps" in why and "pays after" in why
    # a bigger model (more FLOPs per step) reaches the model's break-even sooner
    assert decide_compile("auto", "cpu", int(model_be) - 1, **{**shape, "flops_per_fwdbwd": 1e13})[0]
    assert decide_compile("1", "cpu", 1, **{**shape, "dtype": torch.float32})[:2] == (True, True)


def test_apply_compile_sets_only_what_was_decided(monkeypatch):
    "The decision goes to the optimizer (os.environ is never written); a user's NANOCHAT_OPTIM_COMPILE=0/1 wins."
    from nanochat_nb.base_train import apply_compile
    from nanochat_nb.optim import MuonAdamW
    model = torch.nn.Linear(2, 2)
    opt = MuonAdamW([dict(kind="adamw", params=list(model.parameters()), lr=0.1, betas=(0.8, 0.95), eps=1e-10,
                          weight_decay=0.0)])
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE", raising=False)
    same, line = apply_compile(model, opt, False, False, "cpu")
    assert same is model and line == "model off, optimizer step off" and opt.compile_step is False
    same, line = apply_compile(model, opt, False, True, "cpu")
    assert same is model and line == "model off, optimizer step on" and opt.compile_step is True
    assert "NANOCHAT_OPTIM_COMPILE" not in os.environ
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "0")  # the user's setting wins, and the line says so
    compiled, line = apply_compile(model, opt, True, True, "cpu")
    assert compiled is not model and line == "model on, optimizer step off, as NANOCHAT_OPTIM_COMPILE=0 says"
    assert opt.compile_step is None and os.environ["NANOCHAT_OPTIM_COMPILE"] == "0"
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "auto")  # 'auto' leaves it to the decision
    assert apply_compile(model, opt, False, True, "cpu")[1] == "model off, optimizer step on"
    monkeypatch.delenv("NANOCHAT_OPTIM_COMPILE")
    assert apply_compile(model, opt, False, False, "cuda")[1] == "model off, optimizer step on"  # CUDA: as the original
    monkeypatch.setenv("NANOCHAT_OPTIM_COMPILE", "sometimes")  # a typo fails before any training
    with pytest.raises(ValueError, match="NANOCHAT_OPTIM_COMPILE='sometimes'"):
        apply_compile(model, opt, False, True, "cpu")


def test_cli_entry_point_bf16(train_dir):
    "`python -m nanochat_nb.base_train` in bf16 (the CPU default here): runs, logs per step and to wandb (offline), samples, saves."
    env = {**os.environ, "NANOCHAT_DTYPE": "bfloat16", "WANDB_MODE": "offline", "WANDB_DIR": str(train_dir),
           "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "nanochat_nb.base_train", *TINY_ARGS, "--total-batch-size=256",
                           "--num-iterations=3", "--eval-every=3", "--eval-tokens=512", "--sample-every=3",
                           "--run=test_run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [d for d in os.listdir(os.path.join(train_dir, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 1  # wandb logged offline
    assert "COMPUTE_DTYPE: torch.bfloat16" in proc.stdout and "step 00002/00003" in proc.stdout
    assert "Validation bpb" in proc.stdout and "The capital of France is" in proc.stdout
    # 3 steps of a tiny model never win either compile back
    assert "torch.compile: model off, optimizer step off (auto on CPU in bfloat16: the model (~" in proc.stdout
    assert os.path.exists(os.path.join(train_dir, "base_checkpoints", "d2", "model_000003.pt"))



def test_compiled_and_eager_training_agree_in_fp32(train_dir):
    """Inductor-compiled model and optimizer step (what --compile=1 does on a CPU) against eager: 20 steps at a fixed
    seed in fp32 give the same loss curve and val bpb to 2e-3, while a 5% change of one LR moves it by more.
    (The curves are not bit-equal: at init the scale-invariant lambdas get gradients of pure rounding noise, ~1e-11,
    which Adam turns into steps of its full size; compiled kernels round differently.)"""
    def run(*extra, tag):
        out = os.path.join(train_dir, f"{tag}.json")
        env = {**os.environ, "NANOCHAT_DTYPE": "float32", "RESULTS_JSON": out}
        env.pop("NANOCHAT_OPTIM_COMPILE", None)
        proc = subprocess.run([sys.executable, WORKER, *TINY_ARGS, "--total-batch-size=512", "--num-iterations=20",
                               "--eval-every=20", "--eval-tokens=2048", "--embedding-lr=3", "--unembedding-lr=0.2",
                               f"--model-tag={tag}", *extra], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.load(open(out))
        return proc.stdout, [r["train_losses"][str(i)] for i in range(20)], r["val_bpb"]
    _, eager, eager_bpb = run("--compile=0", "--matrix-lr=0.6", tag="eager")
    out, compiled, compiled_bpb = run("--compile=1", "--matrix-lr=0.6", tag="compiled")
    _, nudged, nudged_bpb = run("--compile=0", "--matrix-lr=0.63", tag="nudged")
    assert "torch.compile: model on, optimizer step on (forced by --compile=1)" in out
    assert eager[-1] < eager[0] - 2  # it learns: the comparison is over a real curve
    gap = max(abs(a - b) for a, b in zip(eager, compiled))
    assert gap < 2e-3 and abs(compiled_bpb - eager_bpb) < 2e-3, (gap, eager, compiled)
    assert max(abs(a - b) for a, b in zip(eager, nudged)) > 2e-3  # the tolerance is tighter than a 5% LR change

# ---------------------------------------------------------------------------------------------------------------
# Distributed: two ranks vs one process with gradient accumulation. Rank r reads row groups r, r+2, ... while one
# process reads them all in order; to make both see the same rows we use documents longer than a row, sorted by token
# length (so best-fit packing takes them first-in-first-out, one document per row), and row groups of exactly one
# micro-batch (4 rows). Then rank r's step-s batch is row group 2s+r, exactly the single process's micro-step r.

@pytest.fixture(scope="module")
def dist_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_template")
    def build():
        from nanochat_nb.common import get_peak_flops
        tok = make_tokenizer(str(d))
        bos = tok.get_bos_token_id()
        def sorted_docs(n, seed):
            docs = make_documents(n, seed, min_sentences=6, max_sentences=10)
            lens = [len(ids) for ids in tok.encode(docs, prepend=bos)]
            assert min(lens) > 65, min(lens)  # every document is longer than a row (T + 1)
            return [doc for _, doc in sorted(zip(lens, docs), key=lambda t: t[0])]
        # each rank buffers 1000 documents: enough that no rank wraps around to a second epoch
        make_corpus(str(d), train_docs=sorted_docs(2400, 0), val_docs=sorted_docs(2100, 1), row_group_size=4)
        get_peak_flops("cpu")
    _with_base_dir(d, build)
    return d

DIST_ARGS = TINY_ARGS + ["--total-batch-size=512", "--num-iterations=4", "--eval-every=100", "--eval-tokens=2048"]


def _read(base_dir):
    "(losses, val bpb, final model state_dict) of a run in base_dir."
    r = json.load(open(os.path.join(base_dir, "results.json")))
    sd = torch.load(os.path.join(base_dir, "base_checkpoints", "d2", "model_000004.pt"), map_location="cpu")
    return [r["train_losses"][str(i)] for i in range(4)], r["val_bpb"], sd


@pytest.fixture(scope="module")
def single_process_reference(dist_template, tmp_path_factory):
    "Losses, val bpb and final weights of the one-process run (gradient accumulation 2)."
    d = tmp_path_factory.mktemp("single")
    shutil.copytree(dist_template, d, dirs_exist_ok=True)
    proc = subprocess.run([sys.executable, WORKER, *DIST_ARGS], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(d), "RESULTS_JSON": str(d / "results.json")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient accumulation steps: 2" in proc.stdout
    return _read(d)


def _assert_matches(result, reference):
    """Same weights after 4 steps and the same val bpb. (The logged loss is the last micro-batch's: rank 0 logs the loss
    of row group 2s, the single process that of row group 2s+1, so the losses are compared only for going down.)"""
    losses, bpb, sd = result
    _, ref_bpb, ref_sd = reference
    assert losses[-1] < losses[0]
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k].float(), ref_sd[k].float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert bpb == pytest.approx(ref_bpb, rel=1e-5)


def test_two_ranks_match_gradient_accumulation(dist_template, base_dir, single_process_reference):
    shutil.copytree(dist_template, base_dir, dirs_exist_ok=True)
    out = base_dir / "results.json"
    proc = run_torchrun([WORKER, *DIST_ARGS], nproc=2, env={"NANOCHAT_BASE_DIR": str(base_dir), "RESULTS_JSON": str(out)})
    assert "gradient accumulation steps: 1" in proc.stdout and "Distributed world size: 2" in proc.stdout + proc.stderr
    _assert_matches(_read(base_dir), single_process_reference)
    ckpt = base_dir / "base_checkpoints" / "d2"
    assert (ckpt / "optim_000004_rank0.pt").exists() and (ckpt / "optim_000004_rank1.pt").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous(dist_template, base_dir, single_process_reference):
    "Two torchrun launchers (one process each) meet through a c10d rendezvous on 127.0.0.1, as two nodes would."
    shutil.copytree(dist_template, base_dir, dirs_exist_ok=True)
    out = base_dir / "results.json"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(base_dir), "RESULTS_JSON": str(out)}
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nanochat_test",
               f"--rdzv-conf=is_host={1 if node == 0 else 0}", "--local-addr=127.0.0.1", WORKER, *DIST_ARGS]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "Distributed world size: 2" in "".join(so + se for so, se in outs)
    _assert_matches(_read(base_dir), single_process_reference)


def test_fp16_gradscaler_path(train_dir):
    "NANOCHAT_DTYPE=float16 turns on the GradScaler; the run trains and its scaler state goes into the checkpoint."
    # measuring the fp16 matmul peak of a CPU takes minutes (fp16 is emulated): seed common's cache with a stand-in
    from nanochat_nb import common
    cache = os.path.join(train_dir, "cpu_peak_flops.json")
    table = json.load(open(cache))
    table[f"{common.cpu_model_name()}|{torch.float16}|threads={torch.get_num_threads()}"] = 1e11
    json.dump(table, open(cache, "w"))
    env = {**os.environ, "NANOCHAT_DTYPE": "float16"}
    proc = subprocess.run([sys.executable, "-m", "nanochat_nb.base_train", *TINY_ARGS, "--total-batch-size=256",
                           "--num-iterations=2", "--eval-every=-1"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GradScaler enabled for fp16 training" in proc.stdout
    meta = json.load(open(os.path.join(train_dir, "base_checkpoints", "d2", "meta_000002.json")))
    assert meta["loop_state"]["grad_scaler"]["scale"] > 0
