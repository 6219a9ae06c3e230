"""runs/miniseries.sh and runs/scaling_laws.sh on a tiny CPU sweep (depth 1, a few steps): well-formed CSV rows whose
parameter counts match the model and whose token totals use the logged batch size; a finished run is skipped on
rerun. runs/train_log_stats.py on its own: fields from base_train's real output lines, clear errors."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.base_train_worker import make_corpus, make_tokenizer
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "runs"))
import train_log_stats  # noqa: E402

TINY = ("--max-seq-len=64 --head-dim=64 --window-pattern=L --core-metric-every=-1 --warmup-steps=2 "
        "--total-batch-size=256 --eval-every=1000 --eval-tokens=1024")


def run_script(script, base_dir, *args, **env):
    venv_bin = os.path.dirname(sys.executable)
    full_env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "VIRTUAL_ENV": os.path.dirname(venv_bin),
                "PATH": venv_bin + os.pathsep + os.environ["PATH"], "NPROC_PER_NODE": "1", "WANDB_RUN": "dummy",
                "DEVICE_BATCH_SIZE": "4", "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run(["bash", os.path.join(REPO, "runs", script), *args], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def reference_model(base_dir, tag):
    "The model base_train saved for `tag`, rebuilt on the meta device from its checkpoint's config."
    from nanochat_nb.gpt import GPT, GPTConfig
    ckpt = os.path.join(base_dir, "base_checkpoints", tag)
    meta = json.load(open(os.path.join(ckpt, sorted(f for f in os.listdir(ckpt) if f.startswith("meta_"))[-1])))
    with torch.device("meta"):
        return GPT(GPTConfig(**meta["model_config"])), meta


def test_tiny_sweeps_write_correct_rows_and_resume(base_dir):
    make_tokenizer(str(base_dir)); make_corpus(str(base_dir))
    # miniseries: horizon from the tokens:params ratio (tiny here, so a few steps)
    out = run_script("miniseries.sh", base_dir, "tiny", SKIP_SETUP="1", DEPTHS="1",
                     EXTRA_ARGS=TINY + " --target-param-data-ratio=0.02")
    rows = list(csv.DictReader(open(base_dir / "tiny_miniseries_results" / "results.csv")))
    assert len(rows) == 1
    r = rows[0]
    model, meta = reference_model(base_dir, "tiny_miniseries_d1")
    scaling = sum(p.numel() for p in model.transformer.h.parameters()) + model.lm_head.weight.numel()
    assert int(r["depth"]) == 1 and int(r["model_dim"]) == model.config.n_embd
    assert int(r["num_params"]) == sum(p.numel() for p in model.parameters())
    assert int(r["num_scaling_params"]) == scaling
    assert int(r["num_iterations"]) == meta["step"] == int(0.02 * scaling) // 256
    assert int(r["tokens_trained"]) == int(r["num_iterations"]) * 256  # the logged batch, not 524,288
    assert float(r["param_data_ratio"]) == pytest.approx(int(r["tokens_trained"]) / scaling, abs=0.005)
    assert 0 < float(r["val_bpb"]) < 20 and r["core_score"] == "" and int(r["train_time_sec"]) >= 0
    assert os.path.exists(base_dir / "tiny_miniseries_results" / "tiny_miniseries_d1_train.log")
    # rerun: the finished depth is skipped, the CSV unchanged
    out = run_script("miniseries.sh", base_dir, "tiny", SKIP_SETUP="1", DEPTHS="1", EXTRA_ARGS=TINY)
    assert "d=1: already in" in out
    assert list(csv.DictReader(open(base_dir / "tiny_miniseries_results" / "results.csv"))) == rows
    # scaling laws: horizon from a FLOPs budget
    run_script("scaling_laws.sh", base_dir, "tiny", FLOPS_BUDGETS="1e10", DEPTHS="1", EVAL_TOKENS="1024", EXTRA_ARGS=TINY)
    rows = list(csv.DictReader(open(base_dir / "scaling_laws_results_tiny" / "results.csv")))
    assert len(rows) == 1
    r = rows[0]
    model, meta = reference_model(base_dir, "scaling_1e10_d1")
    assert r["flops_budget"] == "1e10" and r["depth"] == "1"
    assert int(r["params_total"]) == sum(p.numel() for p in model.parameters())
    assert int(r["params_transformer"]) == sum(p.numel() for p in model.transformer.h.parameters())
    assert int(r["params_lm_head"]) == model.lm_head.weight.numel()
    assert int(r["params_wte"]) == model.transformer.wte.weight.numel()
    assert sum(int(r[k]) for k in ["params_wte", "params_value_embeds", "params_lm_head", "params_transformer",
                                   "params_scalars"]) == int(r["params_total"])
    assert int(r["num_iterations"]) == meta["step"] == round(1e10 / (model.estimate_flops() * 256))
    assert int(r["tokens_trained"]) == int(r["num_iterations"]) * 256


LOG = """Vocab size: 320
Model config:
{
  "sequence_len": 64,
  "n_embd": 128,
  "n_layer": 2
}
Parameter counts:
wte                     : 40,960
value_embeds            : 40,960
lm_head                 : 40,960
transformer_matrices    : 393,240
scalars                 : 30
total                   : 516,150
Calculated number of iterations: 1,200
Total batch size 524,288 => gradient accumulation steps: 1
Step 00000 | Validation bpb: 4.690964
Step 01200 | Validation bpb: 0.912345
Step 01200 | CORE metric: 0.2219
"""


def test_train_log_stats_fields():
    s = train_log_stats.stats(LOG)
    assert s["model_dim"] == "128" and s["params_total"] == "516150" and s["params_scalars"] == "30"
    assert s["num_scaling_params"] == str(393240 + 40960)
    assert s["tokens_trained"] == str(1200 * 524288)
    assert s["param_data_ratio"] == f"{1200 * 524288 / (393240 + 40960):.2f}"
    assert s["val_bpb"] == "0.912345" and s["core_score"] == "0.2219"  # the last values logged
    # a resumed run appends a second attempt to the same log: its values win
    s = train_log_stats.stats(LOG + "Calculated number of iterations: 1,300\nStep 01300 | Validation bpb: 0.9\n")
    assert s["num_iterations"] == "1300" and s["val_bpb"] == "0.9"
    assert "core_score" in train_log_stats.stats(LOG) and "core_score" not in train_log_stats.stats(LOG.replace("CORE", "X"))


def test_train_log_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'Total batch size N => ...' line"):
        train_log_stats.stats(LOG.replace("Total batch size", "Batch"))
    with pytest.raises(ValueError, match="no 'total ...: N"):
        train_log_stats.stats("Calculated number of iterations: 3\n")
    log = tmp_path / "t.log"
    log.write_text(LOG)
    run = lambda *a: subprocess.run([sys.executable, os.path.join(REPO, "runs", "train_log_stats.py"), str(log), *a],
                                    capture_output=True, text=True)
    p = run("depth_of_field")
    assert p.returncode != 0 and "unknown field(s) ['depth_of_field']" in p.stderr
    p = run("num_params", "tokens_trained", "core_score")
    assert p.returncode == 0 and p.stdout.strip() == f"516150,{1200 * 524288},0.2219"
