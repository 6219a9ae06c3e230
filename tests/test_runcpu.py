"""runs/runcpu.sh's stage logic on a tiny, pre-built base dir: the stages whose outputs exist are skipped, SFT and RL
run and are evaluated, the report is generated; a second run with longer SFT/RL resumes both from their last
checkpoints and re-evaluates them; a third run skips everything."""
import json
import os
import subprocess

import torch

from nanochat_nb.task_data import write_offline_split
from tests.conftest import REPO
from tests.test_chat_cli import save_byte_tokenizer
from tests.test_chat_sft import _save_base
from tests.test_tasks import ARC_ROWS, GSM8K_REAL, HUMANEVAL_ROWS, MMLU_ROWS, SMOLTALK_ROWS


def _prepare(base):
    save_byte_tokenizer(str(base))
    from nanochat_nb.tokenizer import get_tokenizer, compute_token_bytes
    torch.save(compute_token_bytes(get_tokenizer()), os.path.join(base, "tokenizer", "token_bytes.pt"))
    _save_base(str(base), tag="cpu_d2", step=400)  # stage 3 is done: its last step is NUM_ITERATIONS
    os.makedirs(os.path.join(base, "base_data_climbmix")); open(os.path.join(base, "base_data_climbmix", "shard_00000.parquet"), "w").close()
    for subset in ("ARC-Easy", "ARC-Challenge"): write_offline_split("allenai/ai2_arc", subset, "test", ARC_ROWS, "t", "t")
    write_offline_split("cais/mmlu", "all", "test", MMLU_ROWS * 3, "t", "t")
    write_offline_split("cais/mmlu", "all", "auxiliary_train", MMLU_ROWS * 3, "t", "t")
    write_offline_split("openai/gsm8k", "main", "test", GSM8K_REAL, "t", "t")
    write_offline_split("openai/gsm8k", "main", "train", GSM8K_REAL * 4, "t", "t")
    write_offline_split("openai/openai_humaneval", "openai_humaneval", "test", HUMANEVAL_ROWS, "t", "t")
    for split in ("train", "test"): write_offline_split("HuggingFaceTB/smol-smoltalk", "default", split, SMOLTALK_ROWS * 3, "t", "t")
    root = os.path.join(base, "task_data", "offline")
    with open(os.path.join(root, "identity_conversations.jsonl"), "w") as f:
        f.write(json.dumps([{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "nanochat_nb"}]) + "\n")
    with open(os.path.join(root, "words_alpha.txt"), "w") as f: f.write("apple\nkayak\nbook\n")  # stage 5's marker
    from nanochat_nb.report import get_report
    get_report().reset()  # as runcpu's first run would; a later run keeps the sections
    with open(os.path.join(base, "report", "base-model-evaluation.md"), "w") as f: f.write("## Base model evaluation\n- CORE metric: 0.01\n")


def _runcpu(base, **knobs):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "DEPTH": "2", "EVAL_MAX_PROBLEMS": "2", "OMP_NUM_THREADS": "1",
           **{k: str(v) for k, v in knobs.items()}}
    proc = subprocess.run(["bash", "runs/runcpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_runcpu_skips_finished_stages_and_resumes(base_dir, tmp_path):
    _prepare(base_dir)
    out = _runcpu(base_dir, SFT_ITERATIONS=2, SFT_SAVE_EVERY=1, RL_STEPS=1, RL_SAVE_EVERY=1)
    for marker in ("found 1 shards, skipping", "=== [2/11] tokenizer", "already has step 400, skipping",
                   "already evaluated, skipping", "=== [5/11] chat task data"):
        assert marker in out, marker
    sft, rl = (os.path.join(base_dir, d, "cpu_d2") for d in ("chatsft_checkpoints", "chatrl_checkpoints"))
    assert json.load(open(os.path.join(sft, "chat_eval.json")))["step"] == 2
    assert json.load(open(os.path.join(rl, "chat_eval.json")))["step"] == 0  # RL checkpoints carry the last step's index
    report = open(os.path.join(base_dir, "report", "report.md")).read()
    assert "## Chat SFT" in report and "## Chat RL" in report and "| Metric" in report
    assert "python -m nanochat_nb.chat_cli -i sft -g cpu_d2" in out
    # longer SFT and RL: both resume from their last checkpoints, and the stale evaluations are redone
    out = _runcpu(base_dir, SFT_ITERATIONS=4, SFT_SAVE_EVERY=2, RL_STEPS=2, RL_SAVE_EVERY=1)
    assert "resuming from step 2" in out
    assert "Resuming" in out or "resuming" in out.split("=== [8/11]")[1]
    assert json.load(open(os.path.join(sft, "chat_eval.json")))["step"] == 4
    assert json.load(open(os.path.join(rl, "chat_eval.json")))["step"] == 1
    # nothing left to do
    out = _runcpu(base_dir, SFT_ITERATIONS=4, SFT_SAVE_EVERY=2, RL_STEPS=2, RL_SAVE_EVERY=1)
    assert "already has step 4, skipping" in out and "already has step 1, skipping" in out
    assert out.count("for the last step, skipping") == 2
