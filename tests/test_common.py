"""Tests of nanochat_nb.common: dtype override, dist info, locked atomic downloads against a local HTTP server."""
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from nanochat_nb import common
from tests.conftest import REPO


def test_dtype_override_parsing():
    assert common.parse_dtype_override("bfloat16") is torch.bfloat16
    assert common.parse_dtype_override("float16") is torch.float16
    assert common.parse_dtype_override("float32") is torch.float32
    for bad in ("bf16", "fp32", "Float32", "int8"):
        with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
            common.parse_dtype_override(bad)


@pytest.mark.parametrize("value,expected", [("float32", "torch.float32"), ("bfloat16", "torch.bfloat16"), ("float16", "torch.float16")])
def test_dtype_env_override_at_import(value, expected):
    code = "from nanochat_nb.common import COMPUTE_DTYPE, COMPUTE_DTYPE_REASON; print(COMPUTE_DTYPE, '|', COMPUTE_DTYPE_REASON)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "NANOCHAT_DTYPE": value},
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(expected) and "NANOCHAT_DTYPE" in out


def test_unknown_dtype_env_fails_clearly():
    proc = subprocess.run([sys.executable, "-c", "import nanochat_nb.common"], env={**os.environ, "NANOCHAT_DTYPE": "fp8"},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "NANOCHAT_DTYPE='fp8' is not a known compute dtype" in proc.stderr


def test_auto_dtype_follows_cpu_capability():
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DTYPE"}
    out = subprocess.run([sys.executable, "-c", "from nanochat_nb.common import COMPUTE_DTYPE as d, cpu_has_native_bf16 as f; print(d, f())"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    expected = "torch.bfloat16" if out[1] == "True" else "torch.float32"
    assert out[0] == expected


def test_dist_info_without_torchrun(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert common.get_dist_info() == (False, 0, 0, 1)
    assert not common.is_ddp_requested()
    monkeypatch.setenv("RANK", "1")  # a partial torchrun environment is not DDP
    assert common.get_dist_info() == (False, 0, 0, 1)


def test_dist_init_under_torchrun_gloo(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from nanochat_nb.common import compute_init, compute_cleanup, get_dist_info\n"
        "ddp, rank, local_rank, world, device = compute_init('cpu')\n"
        "t = torch.tensor([rank + 1.0]); dist.all_reduce(t)\n"
        "print(f'rank={rank} world={world} sum={t.item()} info={get_dist_info()}')\n"
        "compute_cleanup()\n")
    from tests.conftest import run_torchrun
    out = run_torchrun([str(script)]).stdout
    assert "rank=0 world=2 sum=3.0 info=(True, 0, 0, 2)" in out and "rank=1 world=2 sum=3.0 info=(True, 1, 1, 2)" in out


class _Server:
    "A local HTTP server that counts GETs per path; /slow/* responds slowly, /flaky/* fails once, /truncated/* lies about its length."
    def __init__(self, files):
        self.files, self.hits, self.lock = files, {}, threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_GET(self):
                with outer.lock:
                    outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                    n = outer.hits[self.path]
                name = self.path.rsplit("/", 1)[-1]
                if name not in outer.files or (self.path.startswith("/flaky/") and n == 1):
                    self.send_error(404 if name not in outer.files else 503); return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) * (2 if self.path.startswith("/truncated/") else 1)))
                self.end_headers()
                if self.path.startswith("/slow/"):
                    time.sleep(1.0)
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown(); self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({"data.bin": os.urandom(200_000), "small.txt": b"hello"})
    yield s
    s.close()


def test_download_once_across_two_processes(server, base_dir):
    code = ("import sys; from nanochat_nb.common import download_file_with_lock as d; "
            "print(d(sys.argv[1], 'shared/data.bin'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{server.url}/slow/data.bin"], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    path = base_dir / "shared" / "data.bin"
    assert outs == [str(path)] * 2
    assert server.hits["/slow/data.bin"] == 1
    assert path.read_bytes() == server.files["data.bin"]
    assert sorted(os.listdir(path.parent)) == ["data.bin", "data.bin.lock"]


def test_download_postprocess_and_cache(server, base_dir):
    seen = []
    p = common.download_file_with_lock(f"{server.url}/small.txt", "small.txt", postprocess_fn=seen.append)
    assert open(p, "rb").read() == b"hello" and seen == [p]
    common.download_file_with_lock(f"{server.url}/small.txt", "small.txt", postprocess_fn=seen.append)
    assert server.hits["/small.txt"] == 1 and len(seen) == 1   # second call finds the file, no download, no postprocess


def test_download_retries_then_succeeds(server, base_dir):
    p = common.download_file_with_lock(f"{server.url}/flaky/small.txt", "flaky.txt", backoff=0.01)
    assert open(p, "rb").read() == b"hello" and server.hits["/flaky/small.txt"] == 2


def test_download_failure_is_clear_and_leaves_nothing(server, base_dir):
    with pytest.raises(RuntimeError, match=r"Could not download .*missing\.bin.* after 2 attempts"):
        common.download_file_with_lock(f"{server.url}/missing.bin", "missing.bin", retries=2, backoff=0.01)
    assert not (base_dir / "missing.bin").exists()
    assert [f for f in os.listdir(base_dir) if not f.endswith(".lock")] == []


def test_truncated_download_leaves_no_partial_file(server, base_dir):
    with pytest.raises(RuntimeError, match="after 2 attempts"):
        common.download_file_with_lock(f"{server.url}/truncated/data.bin", "trunc.bin", retries=2, backoff=0.01, timeout=5)
    assert [f for f in os.listdir(base_dir) if not f.endswith(".lock")] == []


def test_unreachable_host_fails_clearly(base_dir):
    with pytest.raises(RuntimeError, match="Could not download"):
        common.download_file_with_lock("http://127.0.0.1:9/nothing", "nothing.bin", retries=1)


def test_peak_flops_table_order():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.get_peak_flops("NVIDIA H200 NVL") == 836e12
    assert common.get_peak_flops("NVIDIA L40S") == 362e12
    assert common.get_peak_flops("NVIDIA L4") == 121e12
    assert common.get_peak_flops("AMD Instinct MI300X") == 1.3074e15
    assert common.get_peak_flops("Mystery Accelerator") == float("inf")


def test_cpu_peak_is_measured_once_and_cached(base_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(common, "measure_matmul_flops", lambda dtype: calls.append(dtype) or 1.5e11)
    assert common.get_peak_flops("cpu") == 1.5e11
    assert common.get_peak_flops("cpu") == 1.5e11
    assert len(calls) == 1 and (base_dir / "cpu_peak_flops.json").exists()


def test_wandb_offline_run_logs_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = common.get_wandb_run("offline-test", project="nanochat-test", config={"depth": 2})
    assert not isinstance(run, common.DummyWandb)
    run.log({"loss": 1.25})
    run.finish()
    assert any(p.name.startswith("offline-run") for p in (tmp_path / "wandb").iterdir())


def test_keep_freed_memory_stops_the_page_faults():
    "In a fresh process, allocating and freeing a 64 MB tensor faults its pages in every time; after"
    " keep_freed_memory() it reuses them. NANOCHAT_MALLOC=0 and a set MALLOC_TRIM_THRESHOLD_ leave malloc alone."
    code = r"""
import os, resource, sys, torch
from nanochat_nb.common import keep_freed_memory
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.empty(16 << 20); t.fill_(1.0); del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
before = faults()
print(keep_freed_memory()); faults()  # the first allocation after the change still faults its pages in once
print(before, faults())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("NANOCHAT_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith("malloc keeps freed memory"), out
    before, after = map(int, out[1].split())
    assert before > 10 * 16_000 and after < 1000, (before, after)  # 16,384 pages per 64 MB allocation
    for extra, says in (({"NANOCHAT_MALLOC": "0"}, "NANOCHAT_MALLOC=0"), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_*_")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True).stdout.split("\n")
        assert says in out[0] and int(out[1].split()[1]) > 10 * 16_000, out
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "NANOCHAT_MALLOC": "yes"}, capture_output=True, text=True)
    assert bad.returncode != 0 and "NANOCHAT_MALLOC='yes' is not understood" in bad.stderr
