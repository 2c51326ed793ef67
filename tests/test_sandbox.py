"""The sandbox survives hostile programs, in bounded time, and fails closed.

Hostile programs that only need wall-clock time run together in one parallel
batch (module fixture); each test then checks one of them.
"""

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from bebop_jax.tasks import SandboxUnavailable, execute, execute_many
from bebop_jax.tasks import sandbox as sandbox_mod

pytestmark = pytest.mark.slow

SECRET_DIR = tempfile.mkdtemp(prefix="bebop_test_secret_")
SECRET_FILE = os.path.join(SECRET_DIR, "secret.txt")
ESCAPE_FILE = os.path.join(SECRET_DIR, "escaped.txt")
with open(SECRET_FILE, "w") as _f:
    _f.write("top secret")
os.chmod(SECRET_DIR, 0o755)
os.chmod(SECRET_FILE, 0o644)  # readable by anyone on the host: only the sandbox may stop it

PROBE = """
import os
results = []
for path in {paths!r}:
    try:
        open(path).read()
        results.append("READ " + path)
    except OSError as e:
        results.append("noread " + path)
for path in {writes!r}:
    try:
        open(path, "w").write("x")
        results.append("WROTE " + path)
    except OSError as e:
        results.append("nowrite " + path)
print("\\n".join(results))
"""

HOSTILE = {
    "infinite_loop": ("while True:\n    pass\n", 1.0),
    "sleep": ("import time\ntime.sleep(60)\n", 1.0),
    "memory_bomb": ("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n", 5.0),
    "huge_alloc": ("x = bytearray(8 * 1024**3)\n", 5.0),
    "huge_output": ("while True:\n    print('y' * 10000)\n", 5.0),
    "self_kill": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", 5.0),
    "kill_everyone": ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n"
                      "except OSError:\n    pass\nprint('still here')\n", 5.0),
    "daemon_child": ("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n"
                     "print('parent done', flush=True)\n", 5.0),
    "big_file": ("open('big', 'wb').write(b'x' * (64 << 20))\n", 5.0),
    "fill_workdir": ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n"
                     "    i += 1\n", 5.0),
    "outside": (PROBE.format(
        paths=[SECRET_FILE, "/etc/passwd", "/etc/shadow", "/root/.bashrc",
               os.path.abspath(__file__), "/proc/1/environ"],
        writes=[ESCAPE_FILE, "/escaped", "/usr/escaped", "/sandbox/escaped", "/tmp/escaped",
                "/dev/shm/escaped"]), 5.0),
    "env": ("import os, json\nprint(json.dumps(dict(os.environ)))\n", 5.0),
}


def _pids_of(uids):
    """Processes owned by any of ``uids`` right now."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _wait_no_processes(results, limit_s=3.0):
    """Wait until no process runs as a uid these sandboxed runs used; return leftovers."""
    uids = {r.sandbox_uid for r in results}
    assert None not in uids and all(u >= sandbox_mod.SANDBOX_ID_BASE for u in uids)
    deadline = time.monotonic() + limit_s
    while _pids_of(uids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _pids_of(uids)


def teardown_module():
    shutil.rmtree(SECRET_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile():
    os.environ["BEBOP_TEST_SECRET_TOKEN"] = "hunter2"
    try:
        return _run_hostile()
    finally:
        del os.environ["BEBOP_TEST_SECRET_TOKEN"]


def _run_hostile():
    names = list(HOSTILE)
    # The directories this process's sandbox makes (other xdist workers make theirs in the same /tmp).
    made, mkdtemp = [], tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(mkdtemp(*args, **kwargs))
        return made[-1]

    tempfile.mkdtemp = recording_mkdtemp
    try:
        return _run_hostile_batch(names, made)
    finally:
        tempfile.mkdtemp = mkdtemp


def _run_hostile_batch(names, made):
    start = time.monotonic()
    # Different timeouts per program: run them as parallel single executes.
    out = {}

    def run(name):
        t0 = time.monotonic()
        res = execute(HOSTILE[name][0], HOSTILE[name][1])
        out[name] = (res, time.monotonic() - t0)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    total = time.monotonic() - start
    assert len(made) >= len(names), made  # one program directory per execute at least
    return {"results": out, "total_s": total, "new_tmp": {p for p in made if os.path.exists(p)}}


def test_ok_program_gets_stdin_and_stdout():
    res = execute("import sys\nprint(sys.stdin.read().upper())\n", 5.0, stdin="abc\n")
    assert res.ok and res.reason == "ok" and res.returncode == 0
    assert res.stdout == "ABC\n\n"


def test_failing_program_reports_error():
    res = execute("assert 1 == 2, 'mismatch'\n", 5.0)
    assert not res.ok and res.returncode == 1
    assert "AssertionError: mismatch" in res.reason


def test_whole_batch_finished_in_bounded_time(hostile):
    assert len(hostile["results"]) == len(HOSTILE)
    assert hostile["total_s"] < 20.0, hostile["total_s"]
    assert _wait_no_processes([r for r, _ in hostile["results"].values()]) == []


def test_infinite_loop_times_out(hostile):
    res, took = hostile["results"]["infinite_loop"]
    assert not res.ok and res.timed_out and "timeout" in res.reason
    assert 0.9 < took < 4.0


def test_sleep_times_out(hostile):
    res, took = hostile["results"]["sleep"]
    assert not res.ok and res.timed_out
    assert took < 4.0


def test_memory_bomb_hits_memory_limit(hostile):
    for name in ("memory_bomb", "huge_alloc"):
        res, took = hostile["results"][name]
        assert not res.ok and "memory limit" in res.reason, (name, res)
        assert not res.timed_out


def test_huge_output_is_capped_and_killed(hostile):
    res, took = hostile["results"]["huge_output"]
    assert not res.ok and res.output_limited and "output limit" in res.reason
    assert len(res.stdout.encode()) <= 1 << 20
    assert took < 4.0


def test_code_that_kills_its_interpreter(hostile):
    res, _ = hostile["results"]["self_kill"]
    assert not res.ok and "SIGKILL" in res.reason
    res, _ = hostile["results"]["kill_everyone"]
    assert res.ok and res.stdout == "still here\n"  # kill(-1) reached nothing outside


def test_daemonised_child_does_not_hang_the_caller(hostile):
    res, took = hostile["results"]["daemon_child"]
    assert res.ok and res.stdout == "parent done\n"
    assert took < 3.0


def test_file_size_and_workdir_limits(hostile):
    res, _ = hostile["results"]["big_file"]
    assert not res.ok and "File too large" in res.reason
    res, _ = hostile["results"]["fill_workdir"]
    assert not res.ok and "No space left on device" in res.reason


def test_cannot_read_or_write_outside_its_directory(hostile):
    res, _ = hostile["results"]["outside"]
    assert res.ok, res
    lines = res.stdout.split()
    assert "READ" not in lines and "WROTE" not in lines, res.stdout
    assert not os.path.exists(ESCAPE_FILE)
    with open(SECRET_FILE) as f:
        assert f.read() == "top secret"


def test_environment_is_cleared(hostile):
    import json

    res, _ = hostile["results"]["env"]
    env = json.loads(res.stdout)
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}, env
    assert "BEBOP_TEST_SECRET_TOKEN" not in res.stdout and env["HOME"] == "/work"


def test_temporary_directories_are_removed(hostile):
    assert hostile["new_tmp"] == set()


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = ("import socket\ntry:\n"
               f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               "    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e.errno)\n"
               "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
               "    print('CONNECTED')\nexcept OSError as e:\n    print('blocked', e.errno)\n")
    res = execute(program, 5.0)
    assert res.ok and res.stdout.count("blocked") == 2, res
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_process_count_is_limited_and_forks_die_with_the_sandbox():
    program = ("import os, time\nn = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n"
               "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n"
               "        os._exit(0)\n    n += 1\nprint(n, flush=True)\n")
    res = execute(program, 5.0, max_processes=16)
    assert res.ok, res
    assert 1 <= int(res.stdout) < 16  # the sandbox's own python counts too
    assert _wait_no_processes([res]) == []


def test_fork_bomb_is_contained_and_does_not_starve_neighbours():
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n")
    neighbour = ("import os, time\ntime.sleep(0.3)\npids = []\nfor _ in range(8):\n"
                 "    pid = os.fork()\n    if pid == 0:\n        time.sleep(0.2)\n"
                 "        os._exit(0)\n    pids.append(pid)\nfor p in pids:\n"
                 "    os.waitpid(p, 0)\nprint('forked fine')\n")
    t0 = time.monotonic()
    bomb_res, ok_res = execute_many([bomb, neighbour], 1.5, max_workers=2)
    assert time.monotonic() - t0 < 6.0
    assert not bomb_res.ok and bomb_res.timed_out
    assert ok_res.ok and ok_res.stdout == "forked fine\n", ok_res
    assert bomb_res.sandbox_uid != ok_res.sandbox_uid
    assert _wait_no_processes([bomb_res, ok_res]) == []


def test_cpu_time_limit():
    res = execute("while True:\n    pass\n", 15.0, cpu_s=1)
    assert not res.ok and "cpu time limit" in res.reason and not res.timed_out


def test_execute_many_runs_in_parallel_and_keeps_order():
    programs = [f"import time\ntime.sleep(0.6)\nprint({i})\n" for i in range(4)]
    t0 = time.monotonic()
    results = execute_many(programs, 5.0, max_workers=4)
    took = time.monotonic() - t0
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert took < 2.0, took  # serial would take >= 2.4 s


def test_fails_closed_without_bubblewrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="bwrap"):
        execute("print(1)\n")


def test_bad_arguments_and_unencodable_text():
    with pytest.raises(ValueError, match="timeout_s"):
        execute("print(1)", 0)
    with pytest.raises(ValueError, match="memory_mb"):
        execute("print(1)", 1.0, memory_mb=4)
    with pytest.raises(ValueError, match="program"):
        execute(b"print(1)")
    with pytest.raises(ValueError, match="stdins"):
        execute_many(["print(1)"], stdins=["", ""])
    res = execute("print('\ud800')\n", 2.0)
    assert not res.ok and "unicode" in res.reason
