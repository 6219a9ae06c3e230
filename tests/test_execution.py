"""The execution sandbox: results, limits, and a list of escape attempts that must fail (and be reported)."""
import os
import socket
import threading
import time

import pytest

from nanochat_nb.execution import ExecutionResult, execute_code, reliability_guard, _child_script


def test_happy_path_and_repr():
    r = execute_code("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint(add(2, 3))")
    assert r.success and r.stdout == "5\n" and r.error is None and not r.timeout and not r.memory_exceeded
    assert repr(r) == "ExecutionResult(success=True, stdout='5\\n')"


def test_exception_is_captured_with_last_line_as_error():
    r = execute_code("print('before')\nraise ValueError('bad value')")
    assert not r.success and r.error == "ValueError: bad value"
    assert r.stdout == "before\n" and "Traceback" in r.stderr and '"<llm>"' in r.stderr


def test_syntax_error_is_a_failure():
    r = execute_code("def f(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")


def test_tricky_string_content_cannot_break_out():
    code = 'x = """\'\'\' \\" \\\\ {} {{}} \'\'\'"""\nprint(len(x))\ny = "\\n".join(["a", "b"])\nprint(repr(y))'
    r = execute_code(code)
    assert r.success, r
    ns = {}
    exec(code.replace("print(len(x))", "out1 = len(x)").replace("print(repr(y))", "out2 = repr(y)"), ns)
    assert r.stdout == f"{ns['out1']}\n{ns['out2']}\n"


def test_fresh_globals_and_own_empty_directory():
    assert execute_code("secret = 42").success
    r = execute_code("print(secret)")
    assert not r.success and r.error.startswith("NameError")
    r = execute_code("import os\nprint(os.listdir('.'))\nprint(__name__)")
    assert r.success and r.stdout == "[]\n__main__\n"


def test_writes_land_in_a_temporary_directory_that_is_removed(tmp_path, monkeypatch):
    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    host_cwd = os.getcwd()
    r = execute_code("open('out_marker.txt', 'w').write('data')\nprint(open('out_marker.txt').read())")
    assert r.success and r.stdout == "data\n"
    assert list(scratch.iterdir()) == [], "the sandbox directory must be deleted after the run"
    assert not os.path.exists(os.path.join(host_cwd, "out_marker.txt"))


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    r = execute_code("import os\nprint(sorted(os.environ))")
    assert r.success and "NANOCHAT_SECRET_TOKEN" not in r.stdout and "hunter2" not in r.stdout


def test_stdin_is_closed():
    r = execute_code("x = input()")
    assert not r.success and r.error.startswith("EOFError")


# ---- escape attempts: each must fail inside the sandbox, and leave the host untouched ----

@pytest.mark.parametrize("how", [
    "import os\nos.remove({p!r})",
    "import os\nos.unlink({p!r})",
    "import shutil\nshutil.rmtree({d!r})",
    "import os\nos.rmdir({d!r})",
    "import os\nos.rename({p!r}, {p!r} + '.moved')",
    "import shutil\nshutil.move({p!r}, {p!r} + '.moved')",
    "import pathlib\npathlib.Path({p!r}).unlink()",
    "import os\nos.chmod({p!r}, 0)",
    "import os\nos.truncate({p!r}, 0)",
])
def test_deleting_or_damaging_files_is_stopped(tmp_path, how):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    canary = victim_dir / "canary.txt"
    canary.write_text("alive")
    mode = canary.stat().st_mode
    r = execute_code(how.format(p=str(canary), d=str(victim_dir)))
    assert not r.success and "NoneType" in r.error, r
    assert canary.read_text() == "alive" and canary.stat().st_mode == mode


@pytest.mark.parametrize("how", [
    "import os\nos.system('touch {m}')",
    "import os\nos.popen('touch {m}')",
    "import subprocess\nsubprocess.run(['touch', '{m}'])",
    "import subprocess\nsubprocess.Popen(['touch', '{m}'])",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{m}'])",
    "import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{m}'], {{}})",
    "import os\nos.spawnv(os.P_WAIT, '/usr/bin/touch', ['touch', '{m}'])",
    "import _posixsubprocess",
    "import ctypes\nctypes.CDLL(None).system(b'touch {m}')",
])
def test_running_commands_is_stopped(tmp_path, how):
    marker = tmp_path / "ran_a_command"
    r = execute_code(how.format(m=marker))
    assert not r.success, r
    assert ("NoneType" in r.error) or ("disabled in the nanochat execution sandbox" in r.error), r.error
    assert not marker.exists()


@pytest.mark.parametrize("how", [
    "import os\npid = os.fork()\nprint('forked', pid)",
    "import os\nos.forkpty()",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import pty\npty.fork()",
])
def test_forking_is_stopped(how):
    r = execute_code(how)
    assert not r.success and "forked" not in r.stdout, r


def test_network_is_stopped():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()
    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = server.accept(); accepted.append(conn)
            except OSError:
                pass
    t = threading.Thread(target=accept_loop, daemon=True); t.start()
    try:
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
            f"import http.client\nhttp.client.HTTPConnection('127.0.0.1', {port}, timeout=2).request('GET', '/')",
            f"import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
            "import ssl",
        ]
        for code in attempts:
            r = execute_code(code)
            assert not r.success and "disabled in the nanochat execution sandbox" in r.error, (code, r)
        time.sleep(0.3)
    finally:
        stop.set(); t.join(); server.close()
    assert accepted == [], "a sandboxed process reached the test's server"


def test_huge_allocation_is_stopped_and_reported():
    for code in ["x = bytearray(1 << 34)", "x = [0] * (1 << 33)", "x = 'a' * (1 << 33)"]:
        r = execute_code(code, maximum_memory_bytes=256 * 1024 * 1024)
        assert not r.success and r.memory_exceeded and r.error.startswith("Memory limit exceeded"), (code, r)


def test_memory_below_the_limit_is_fine():
    r = execute_code("x = bytearray(32 * 1024 * 1024)\nprint(len(x))")
    assert r.success and r.stdout == f"{32 * 1024 * 1024}\n"


def test_infinite_loop_and_sleep_are_killed_at_the_deadline():
    for code in ["while True:\n    pass", "import time\ntime.sleep(1000)"]:
        t0 = time.monotonic()
        r = execute_code(code, timeout=1.0)
        elapsed = time.monotonic() - t0
        assert r.timeout and not r.success and "timed out" in r.error, r
        assert elapsed < 15, f"the sandbox took {elapsed:.1f}s to stop a 1s-timeout run"


def test_partial_output_before_timeout_is_kept():
    r = execute_code("import sys, time\nprint('started'); sys.stdout.flush()\ntime.sleep(100)", timeout=1.0)
    assert r.timeout and r.stdout == "started\n"


def test_output_flood_is_capped():
    r = execute_code("while True:\n    print('x' * 100000)", timeout=10.0, maximum_output_bytes=1 << 20)
    assert not r.success and not r.timeout and r.error == f"Output limit exceeded ({1 << 20} bytes)"
    assert len(r.stdout) <= 1 << 20


def test_exit_attempts_count_as_failures():
    for code in ["import sys\nsys.exit(0)", "raise SystemExit", "exit()", "quit()", "import os\nos._exit(0)",
                 "import os\nos.kill(os.getpid(), 9)"]:
        r = execute_code(code + "\nprint('tests skipped')")
        assert not r.success and "tests skipped" not in r.stdout, (code, r)


def test_no_memory_limit_is_allowed():
    # appendix B item 14: the original crashed on Linux when maximum_memory_bytes was None
    r = execute_code("print(sum(range(100)))", maximum_memory_bytes=None, maximum_output_bytes=None)
    assert r.success and r.stdout == "4950\n"


def test_guard_source_is_self_contained():
    script = _child_script("pass", None, None)
    compile(script, "<child>", "exec")
    assert script.count("def reliability_guard") == 1


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="code must be a str"):
        execute_code(None)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        execute_code("pass", timeout=-1)


def test_standard_library_used_by_humaneval_works():
    mods = "math typing re hashlib itertools collections functools heapq string fractions decimal datetime random statistics json bisect copy operator"
    code = f"import {', '.join(mods.split())}\nprint(hashlib.md5(b'a').hexdigest(), math.gcd(12, 18), statistics.mean([1, 2]))"
    r = execute_code(code)
    assert r.success and r.stdout == "0cc175b9c0f1b6a831c399e269772661 6 1.5\n", r


def test_a_humaneval_style_program():
    program = (
        "from typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n\n"
        "check(has_close_elements)\n")
    assert execute_code(program).success
    wrong = program.replace("< threshold", "> threshold")
    r = execute_code(wrong)
    assert not r.success and r.error == "AssertionError"
