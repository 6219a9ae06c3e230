"""Tests of nanochat_nb.report: section formatting, reset/generate round trip, the summary table, figures, ranks, CLI."""
import datetime
import os
import re
import subprocess
import sys

import pytest

import nanochat_nb.report as report_mod
from nanochat_nb.report import (EXPECTED_SECTIONS, DummyReport, Report, get_bloat_info, get_report, render_section,
                                slugify)
from tests.conftest import REPO


class Clock:
    "A settable now_str() so sections get known timestamps."
    def __init__(self, t="2026-01-01 10:00:00"):
        self.t = datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S")
    def __call__(self):
        return self.t.strftime("%Y-%m-%d %H:%M:%S")
    def advance(self, **kw):
        self.t += datetime.timedelta(**kw)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(report_mod, "now_str", c)
    return c


def headings(text):
    return re.findall(r"^## (.+)$", text, flags=re.M)


def table_rows(text):
    "{metric: [base, sft, rl]} from the summary table."
    rows = {}
    for line in text[text.index("| Metric"):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_log_formatting_rules(tmp_path, clock):
    r = Report(str(tmp_path))
    path = r.log("Base model training", [
        {"depth": 20, "lr": 0.02, "iters": 21400, "small": 9999, "neg": -20000, "flag": True, "none": None, "s": "x: y"},
        None, {}, "",                       # falsy items are skipped
        "### A table\n| a | b |\n",         # strings verbatim
        "no newline",                       # gets one, so the next bullet starts its own line
        {"last": 1.0},
    ])
    assert os.path.basename(path) == "base-model-training.md"
    assert open(path).read() == (
        "## Base model training\ntimestamp: 2026-01-01 10:00:00\n\n"
        "- depth: 20\n- lr: 0.0200\n- iters: 21,400\n- small: 9999\n- neg: -20000\n- flag: True\n- none: None\n- s: x: y\n"
        "### A table\n| a | b |\nno newline\n- last: 1.0000\n\n")
    # logging again overwrites
    r.log("Base model training", [{"depth": 4}])
    assert open(path).read().endswith("\n\n- depth: 4\n\n")


def test_log_rejects_non_dict_items_and_warns_on_unknown_sections(tmp_path, capsys):
    r = Report(str(tmp_path))
    with pytest.raises(TypeError, match="must be a str or a dict"):
        r.log("Chat SFT", [[1, 2, 3]])
    r.log("SFT", [{"a": 1}])  # the original's name for the SFT section: generate would drop it, so log says so
    assert "'SFT' (sft.md) is not one of" in capsys.readouterr().err


def test_expected_sections_order_and_slugs():
    assert [slugify(s) for s in EXPECTED_SECTIONS] == [
        "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss", "base-model-evaluation",
        "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]


def test_reset_generate_round_trip(base_dir, tmp_path, monkeypatch, clock, capsys):
    monkeypatch.chdir(tmp_path)
    r = get_report()
    assert isinstance(r, Report) and r.report_dir == os.path.join(str(base_dir), "report")
    # leftovers of an earlier run are removed by reset
    r.log("Chat RL", [{"old": 1}])
    r.log_curves("Chat RL", {"reward": ([0, 1], [0.1, 0.2])})
    clock.advance(days=1)
    r.reset()
    assert sorted(os.listdir(r.report_dir)) == ["header.md"]
    # stages log out of order; base-model-loss, chat-rl and chat-evaluation-rl are missing
    clock.advance(minutes=30)
    r.log("Chat SFT", [{"num_iterations": 700}, {"Minimum validation bpb": 0.51234}])
    clock.advance(minutes=5)
    r.log("Chat evaluation sft", [{"source": "sft", "task_name": "ARC-Easy|MMLU"},
                                  {"ARC-Easy": 0.3612, "ARC-Challenge": 0.2901, "MMLU": 0.3123, "GSM8K": 0.0455,
                                   "HumanEval": 0.0671, "SpellingBee": 0.9805},
                                  {"ChatCORE metric": 0.2219}])
    clock.advance(minutes=1)
    r.log("Tokenizer training", [{"vocab_size": 32768}])
    r.log("Tokenizer evaluation", ["### Comparison with GPT-2\n"])
    r.log("Base model training", [{"depth": 20}])
    r.log("Base model evaluation", [{"model": "base_model (step 21400)", "CORE metric": 0.2219},
                                    {"sample 0": "The CORE of the sun: hot"}])
    clock.advance(hours=2, minutes=7, seconds=59)
    r.log("Chat evaluation rl", [{"GSM8K": 0.0788, "MMLU": 0.99}])  # only GSM8K counts for RL
    capsys.readouterr()
    out_file = r.generate()
    printed = capsys.readouterr().out
    text = open(out_file).read()
    # header first, then the sections in the fixed order, then the summary
    assert text.startswith("# nanochat training report")
    assert headings(text) == ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training",
                              "Base model evaluation", "Chat SFT", "Chat evaluation sft", "Chat evaluation rl", "Summary"]
    assert "- num_iterations: 700\n- Minimum validation bpb: 0.5123" in text
    for missing in ("base-model-loss.md", "chat-rl.md"):
        assert f"Warning: {os.path.join(r.report_dir, missing)} does not exist, skipping" in printed
    rows = table_rows(text)
    assert list(rows) == ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "SpellingBee", "ChatCORE"]
    assert rows["CORE"] == ["0.2219", "-", "-"]
    assert rows["GSM8K"] == ["-", "0.0455", "0.0788"]
    assert rows["MMLU"] == ["-", "0.3123", "-"]
    assert rows["ChatCORE"] == ["-", "0.2219", "-"]
    # the bloat block is repeated in the summary, and the wall clock runs from "Run started" to the last section
    summary = text[text.index("## Summary"):]
    assert "- Characters:" in summary and "- Tokens (approx):" in summary
    assert text.rstrip().endswith("Total wall clock time: 2h43m")
    # the copy in the current directory
    assert open(tmp_path / "report.md").read() == text


def test_generate_without_header_or_sections(tmp_path, capsys):
    r = Report(str(tmp_path / "report"))
    r.generate(copy_to=None)
    text = open(tmp_path / "report" / "report.md").read()
    assert "reset" in capsys.readouterr().out  # the warning says how to get a header
    assert "[bloat data missing]" in text and text.rstrip().endswith("Total wall clock time: unknown")
    assert table_rows(text) == {}
    assert not (tmp_path / "report.md").exists()


def test_reset_header_fields(base_dir, clock):
    r = get_report()
    header_file = r.reset()
    header = open(header_file).read()
    for field in ["# nanochat training report", "Generated: 2026-01-01 10:00:00", "### Git Information", "- Branch: ",
                  "- Commit: ", "- Message: ", "### Hardware", "- Platform: ", "- CPUs: ", "- Memory: ", "- GPUs: ",
                  "### Software", "- Python: ", "- PyTorch: ", "### Bloat", "- Characters: ", "- Lines: ", "- Files: ",
                  "- Tokens (approx): ", "- Dependencies (settings.ini requirements): "]:
        assert field in header, field
    assert header.endswith("Run started: 2026-01-01 10:00:00\n\n---\n\n")
    m = re.search(r"- Files: ([\d,]+)", header)
    assert int(m.group(1).replace(",", "")) > 10  # this project's own files were found
    assert ("- GPUs: None available" in header) != report_mod.torch.cuda.is_available()


def git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_bloat_counts_git_tracked_files_and_notebook_sources(tmp_path):
    root = tmp_path
    (root / "nanochat_nb").mkdir(); (root / "nbs").mkdir(); (root / "docs").mkdir()
    (root / "nanochat_nb" / "m.py").write_text("a = 1\nb = 2\nc = 3\n")
    (root / "nanochat_nb" / "untracked.py").write_text("x" * 1000 + "\n")
    (root / "docs" / "outside.md").write_text("not a counted folder\n")
    (root / "nbs" / "n.ipynb").write_text('{"cells": [{"source": ["# Title\\n", "text"]}, {"source": ["x = 1"]}]}')
    (root / "settings.ini").write_text("[DEFAULT]\nrequirements = torch==2.13.0 numpy\ndev_requirements = pytest\n")
    git(root, "init", "-q")
    git(root, "add", "nanochat_nb/m.py", "nbs/n.ipynb", "docs/outside.md", "settings.ini")
    git(root, "commit", "-q", "-m", "init")
    nb_text = "# Title\ntext\n\nx = 1"
    assert get_bloat_info(str(root)) == {"chars": 18 + len(nb_text), "lines": 3 + 4, "files": 2,
                                         "tokens": (18 + len(nb_text)) // 4, "dependencies": 2}
    info = report_mod.get_git_info(str(root))
    assert info["dirty"] is True and info["message"] == "init" and len(info["commit"]) >= 7


def test_bloat_of_an_installed_package_counts_only_the_package(tmp_path):
    # site-packages: no git, no nbs/, and a `tests` folder that belongs to some other distribution
    (tmp_path / "nanochat_nb").mkdir(); (tmp_path / "tests").mkdir()
    (tmp_path / "nanochat_nb" / "m.py").write_text("a = 1\n")
    (tmp_path / "tests" / "other.py").write_text("someone else's\n")
    assert get_bloat_info(str(tmp_path))["files"] == 1 and get_bloat_info(str(tmp_path))["chars"] == 6


def test_figures_written_and_linked(base_dir, tmp_path, monkeypatch):
    from matplotlib.image import imread
    monkeypatch.chdir(tmp_path)
    r = get_report()
    r.reset()
    r.log("Base model training", [{"depth": 4}])
    steps = list(range(30))
    png = r.log_curves("Base model training", {"train loss": (steps, [5.0 / (s + 1) for s in steps]),
                                               "val bpb": {0: 2.0, 10: 1.6, 29: 1.4}})
    assert png == os.path.join(r.report_dir, "base-model-training.curves.png")
    img = imread(png)
    assert img.shape[:2] == (350, 1000)  # two panels of 5 x 3.5 inches at 100 dpi
    assert r.log_curves("Chat SFT", {"train loss": {}}) is None  # nothing to draw, nothing written
    # a figure drawn before its section is logged is linked all the same
    from matplotlib.figure import Figure
    fig = Figure(figsize=(2, 2)); fig.subplots().plot([0, 1], [1, 0])
    r.log_figure("Chat RL", "reward", fig)
    r.log("Chat RL", [{"num_steps": 3}])
    text = open(r.generate()).read()
    base_sec = text[text.index("## Base model training"):text.index("## Chat RL")]
    assert "![curves](base-model-training.curves.png)" in base_sec
    assert "![reward](chat-rl.reward.png)" in text[text.index("## Chat RL"):text.index("## Summary")]
    # the copy in the current directory links the same files where they are
    copy = open(tmp_path / "report.md").read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", copy)
    assert len(links) == 2 and all(os.path.isfile(p) for p in links)
    # reset removes the figures with the sections
    r.reset()
    assert not any(f.endswith(".png") for f in os.listdir(r.report_dir))


def test_curves_bad_input():
    with pytest.raises(ValueError, match="'loss': 3 steps but 2 values"):
        report_mod.plot_curves({"loss": ([0, 1, 2], [1.0, 2.0])})
    with pytest.raises(TypeError, match="'loss': give"):
        report_mod.plot_curves({"loss": 3.0})


def test_other_ranks_get_a_no_op_report(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1"); monkeypatch.setenv("LOCAL_RANK", "1"); monkeypatch.setenv("WORLD_SIZE", "2")
    r = get_report()
    assert isinstance(r, DummyReport)
    r.reset(); r.log("Chat SFT", [{"a": 1}]); r.log_curves("Chat SFT", {"loss": ([0], [1.0])}); r.generate()
    assert not (base_dir / "report").exists()
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("LOCAL_RANK", "0")
    assert isinstance(get_report(), Report)


def test_cli_reset_generate(base_dir, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": REPO}
    run = lambda *a: subprocess.run([sys.executable, "-m", "nanochat_nb.report", *a], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=120)
    p = run("reset")
    assert p.returncode == 0, p.stderr
    assert (base_dir / "report" / "header.md").exists()
    Report(str(base_dir / "report")).log("Base model evaluation", [{"CORE metric": 0.25}])
    p = run()  # generate is the default
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "report.md").read_text()
    assert text == (base_dir / "report" / "report.md").read_text()
    assert "## Base model evaluation" in text and table_rows(text)["CORE"] == ["0.2500", "-", "-"]
    assert "tokenizer-training.md does not exist, skipping" in p.stdout
    with pytest.raises(SystemExit):
        report_mod.main(["bogus"])


def test_tokenizer_stages_log_their_sections(base_dir):
    from tests.test_tokenizer import VOCAB, write_shards
    from nanochat_nb.tok_train import main as tok_train
    write_shards(base_dir)
    tok_train(["--max-chars", "3000", "--vocab-size", str(VOCAB)])
    text = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert text.startswith("## Tokenizer training\ntimestamp: ")
    for line in ["- max_chars: 3000", "- doc_cap: 10,000", f"- vocab_size: {VOCAB}", "- num_special_tokens: 9",
                 "- token_bytes_min: 1", "- train_time: "]:
        assert line in text, line
