"""The one sandbox that runs model-written code: ``execute`` and ``execute_many``.

Code written by a model is untrusted. Each program runs in its own process tree
inside bubblewrap (``bwrap``) with:

- a wall-clock timeout; on expiry the whole sandbox is killed (SIGKILL to the
  outer ``bwrap``; ``--die-with-parent`` and the private PID namespace take every
  process inside down with it, forked or daemonised ones included);
- rlimits set by ``prlimit`` before the program starts: CPU seconds, address
  space (memory), file size, open files, no core dumps, and a process count;
- when the caller is root, a drop to an otherwise unused uid/gid (``setpriv``,
  no capabilities, ``no_new_privs``). The process limit only binds a non-root
  uid, and each concurrently running sandbox gets its own uid (a slot held by a
  file lock), so a fork bomb in one program cannot starve its neighbours;
- no network (own network namespace), no IPC/UTS sharing, a new session (no
  terminal);
- a minimal read-only view of the filesystem: ``/usr`` and the library dirs, the
  Python installation, the program itself under ``/sandbox``; nothing else of the
  host (no ``/etc``, ``/home``, ``/root``, ``/tmp``, repository or data);
- an empty, size-capped tmpfs as working directory (``/work``, also ``HOME`` and
  ``TMPDIR``) that vanishes with the sandbox; the host-side temporary directory
  holding the program and its stdin is removed afterwards;
- a cleared environment (only ``PATH``, ``HOME``, ``TMPDIR``, ``LANG``);
- stdout/stderr read with a byte cap; a program that writes more is killed.

If bubblewrap (or ``prlimit``/``setpriv``) is missing or the sandbox does not
work on this machine, ``execute`` raises ``SandboxUnavailable``: it never falls
back to running code unsandboxed.

The interpreter is this process's Python, started with ``-I -S -B`` (isolated:
no site-packages, no ``PYTHON*`` variables, no bytecode writes), so programs get
the standard library only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

# Sandboxed programs run as uid/gid SANDBOX_ID_BASE + slot (root callers only).
SANDBOX_ID_BASE = 200_000
NUM_ID_SLOTS = 1024
_SANDBOX_PATH = "/usr/bin:/bin"


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here (bwrap missing or broken); code was not run."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed run.

    ``ok`` is True only if the program exited with status 0 within every limit.
    ``reason`` says why not otherwise ("timeout ...", "memory limit ...", "exit
    status 1: AssertionError", ...). ``stdout``/``stderr`` hold at most
    ``max_output_bytes`` bytes each, decoded as UTF-8 with replacement.
    """

    ok: bool
    stdout: str
    stderr: str
    reason: str
    returncode: int | None = None
    timed_out: bool = False
    output_limited: bool = False
    duration_s: float = 0.0
    sandbox_uid: int | None = None  # the uid the program ran as (root callers only)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run; validated so a typo fails before any launch."""

    timeout_s: float = 5.0          # wall clock
    memory_mb: int = 512            # RLIMIT_AS of every process in the sandbox
    cpu_s: int | None = None        # RLIMIT_CPU per process; None: ceil(timeout_s)
    file_mb: int = 16               # RLIMIT_FSIZE: largest file a program may write
    workdir_mb: int = 32            # size of the tmpfs working directory
    max_processes: int = 32         # RLIMIT_NPROC of the sandbox uid
    max_open_files: int = 64        # RLIMIT_NOFILE
    max_output_bytes: int = 1 << 20  # per stream; more kills the program

    def __post_init__(self):
        def check(ok: bool, field: str, why: str):
            if not ok:
                raise ValueError(f"SandboxLimits.{field}: {why}, got {getattr(self, field)!r}")

        check(isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s)
              and self.timeout_s > 0, "timeout_s", "must be a finite number > 0")
        for field in ("memory_mb", "file_mb", "workdir_mb", "max_processes",
                      "max_open_files", "max_output_bytes"):
            value = getattr(self, field)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  field, "must be an int >= 1")
        check(self.memory_mb >= 32, "memory_mb", "must be >= 32 (Python itself needs ~20 MB)")
        check(self.max_open_files >= 8, "max_open_files", "must be >= 8")
        check(self.cpu_s is None or (isinstance(self.cpu_s, int) and self.cpu_s >= 1),
              "cpu_s", "must be None or an int >= 1")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))


# ----------------------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class _Tools:
    bwrap: str
    prlimit: str
    setpriv: str | None  # None when not root: no uid drop possible
    python: str
    python_roots: tuple[str, ...]  # dirs outside /usr to bind read-only for Python


_tools_lock = threading.Lock()
_tools_cache: dict[tuple, _Tools] = {}
_probe_ok: set[tuple] = set()


def _under_usr(path: str) -> bool:
    return path == "/usr" or path.startswith("/usr/")


def _find_tools() -> _Tools:
    """Locate bwrap, prlimit, setpriv and the interpreter; raise if any is missing."""
    key = (os.environ.get("PATH", ""), sys.executable, os.geteuid())
    with _tools_lock:
        if key in _tools_cache:
            return _tools_cache[key]
    found = {}
    for name in ("bwrap", "prlimit", "setpriv"):
        path = shutil.which(name)
        if path is None:
            hint = " (Debian/Ubuntu: apt-get install bubblewrap)" if name == "bwrap" else ""
            raise SandboxUnavailable(
                f"cannot run model-written code: '{name}' not found on PATH{hint}; "
                "refusing to run it unsandboxed")
        found[name] = os.path.realpath(path)
    for name in ("prlimit", "setpriv"):
        if not (_under_usr(found[name]) or found[name].startswith(("/bin/", "/sbin/"))):
            raise SandboxUnavailable(f"'{name}' at {found[name]} is outside /usr, /bin, /sbin "
                                     "and would not be visible inside the sandbox")
    python = os.path.realpath(sys.executable)
    roots = []
    for root in {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python))}:
        if not _under_usr(root) and root != "/":
            roots.append(root)
    tools = _Tools(bwrap=found["bwrap"], prlimit=found["prlimit"],
                   setpriv=found["setpriv"] if os.geteuid() == 0 else None,
                   python=python, python_roots=tuple(sorted(roots)))
    with _tools_lock:
        _tools_cache[key] = tools
    return tools


# ----------------------------------------------------------------------------- uid slots


class _IdSlot:
    """Holds one sandbox uid for the duration of a run (flock, shared across processes)."""

    def __init__(self):
        lock_dir = os.path.join(tempfile.gettempdir(), "bebop_jax_sandbox_slots")
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self._fd = None
        start = (os.getpid() * 7919 + threading.get_ident()) % NUM_ID_SLOTS
        for i in range(NUM_ID_SLOTS):
            slot = (start + i) % NUM_ID_SLOTS
            fd = os.open(os.path.join(lock_dir, f"{slot}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._fd, self.id = fd, SANDBOX_ID_BASE + slot
            return
        fd = os.open(os.path.join(lock_dir, f"{start}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # all slots busy: wait for one
        self._fd, self.id = fd, SANDBOX_ID_BASE + start

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


# ----------------------------------------------------------------------------- command


def _command(tools: _Tools, prog_dir: str, limits: SandboxLimits, sandbox_id: int | None):
    cmd = [tools.bwrap, "--die-with-parent", "--new-session",
           "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
           "--unshare-cgroup-try"]
    if sandbox_id is None:
        cmd += ["--unshare-user"]
    cmd += ["--clearenv", "--setenv", "PATH", _SANDBOX_PATH, "--setenv", "HOME", "/work",
            "--setenv", "TMPDIR", "/work", "--setenv", "LANG", "C.UTF-8"]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    made = set()
    for root in tools.python_roots:
        parts = root.strip("/").split("/")
        for i in range(1, len(parts)):  # parent dirs traversable by the sandbox uid
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", root, root]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", prog_dir, "/sandbox",
            "--perms", "1777", "--size", str(limits.workdir_mb << 20), "--tmpfs", "/work",
            "--chdir", "/work"]
    if sandbox_id is not None:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        nproc = limits.max_processes
    else:
        nproc = _count_processes_of(os.getuid()) + limits.max_processes
    cpu = limits.cpu_seconds
    cmd += ["--", tools.prlimit, f"--as={limits.memory_mb << 20}", f"--cpu={cpu}:{cpu + 1}",
            f"--fsize={limits.file_mb << 20}", f"--nofile={limits.max_open_files}",
            f"--nproc={nproc}", "--core=0"]
    if sandbox_id is not None:
        cmd += [tools.setpriv, f"--reuid={sandbox_id}", f"--regid={sandbox_id}",
                "--clear-groups", "--no-new-privs", "--pdeathsig=KILL"]
    cmd += [tools.python, "-I", "-S", "-B", "-X", "utf8", "/sandbox/main.py"]
    return cmd


# ----------------------------------------------------------------------------- running


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(returncode: int, stderr: str, limits: SandboxLimits) -> str:
    tail = [line for line in stderr.strip().splitlines() if line.strip()]
    last = tail[-1].strip()[:200] if tail else ""
    if stderr.startswith(("bwrap:", "prlimit:", "setpriv:")):
        return f"sandbox setup failed: {last}"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return f"memory limit exceeded ({limits.memory_mb} MB): {last}"
    if returncode > 128 and returncode - 128 < signal.NSIG:
        sig = returncode - 128
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        if sig == signal.SIGXCPU:
            return f"cpu time limit exceeded ({limits.cpu_seconds} s)"
        if sig == signal.SIGXFSZ:
            return f"file size limit exceeded ({limits.file_mb} MB)"
        return f"killed by signal {name}" + (f": {last}" if last else "")
    return f"exit status {returncode}" + (f": {last}" if last else "")


def _run(program: str, stdin: str, limits: SandboxLimits, tools: _Tools) -> ExecResult:
    start = time.monotonic()
    try:
        program_bytes = program.encode("utf-8")
        stdin_bytes = stdin.encode("utf-8")
    except UnicodeEncodeError as e:
        return ExecResult(False, "", "", f"not runnable: text is not valid unicode ({e.reason})")
    prog_dir = tempfile.mkdtemp(prefix="bebop_sbx_")
    slot = _IdSlot() if tools.setpriv is not None else None
    try:
        os.chmod(prog_dir, 0o755)
        with open(os.path.join(prog_dir, "main.py"), "wb") as f:
            f.write(program_bytes)
        stdin_path = os.path.join(prog_dir, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin_bytes)
        os.chmod(os.path.join(prog_dir, "main.py"), 0o444)
        os.chmod(stdin_path, 0o400)
        cmd = _command(tools, prog_dir, limits, slot.id if slot else None)
        try:
            with open(stdin_path, "rb") as stdin_file:
                proc = subprocess.Popen(cmd, stdin=stdin_file, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0,
                                        start_new_session=True,
                                        env={"PATH": _SANDBOX_PATH, "LANG": "C.UTF-8"})
        except OSError as e:  # e.g. the host is out of processes: the program did not run
            return ExecResult(False, "", "", f"could not start the sandbox: {e}",
                              duration_s=time.monotonic() - start)
        try:
            out, err, timed_out, limited = _collect(proc, start + limits.timeout_s,
                                                    limits.max_output_bytes)
            if timed_out or limited:
                _kill(proc)
            try:
                proc.wait(timeout=max(0.0, start + limits.timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
                proc.wait()
        finally:
            if proc.poll() is None:
                _kill(proc)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        if slot is not None:
            slot.release()
        shutil.rmtree(prog_dir, ignore_errors=True)
    duration = time.monotonic() - start
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    rc = proc.returncode
    if timed_out:
        reason = f"timeout: wall-clock limit of {limits.timeout_s:g} s exceeded"
    elif limited:
        reason = f"output limit exceeded: more than {limits.max_output_bytes} bytes"
    elif rc == 0:
        reason = "ok"
    else:
        reason = _classify(rc, stderr, limits)
    return ExecResult(ok=(rc == 0 and not timed_out and not limited), stdout=stdout,
                      stderr=stderr, reason=reason, returncode=rc, timed_out=timed_out,
                      output_limited=limited, duration_s=duration,
                      sandbox_uid=slot.id if slot is not None else None)


def _collect(proc: subprocess.Popen, deadline: float, cap: int):
    """Read stdout/stderr until EOF, the deadline, or more than ``cap`` bytes on one stream."""
    bufs = {"out": bytearray(), "err": bytearray()}
    timed_out = limited = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        while sel.get_map() and not limited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                room = cap - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    limited = True
    return bytes(bufs["out"]), bytes(bufs["err"]), timed_out, limited


def _ensure_working(tools: _Tools) -> None:
    """Run a trivial program once per tool set; raise SandboxUnavailable if it fails."""
    key = dataclasses.astuple(tools)
    with _tools_lock:
        if key in _probe_ok:
            return
    res = _run("import sys\nprint(sys.version_info[0])\n", "", SandboxLimits(timeout_s=20.0),
               tools)
    if not (res.ok and res.stdout.strip() == "3"):
        raise SandboxUnavailable(
            f"sandbox self-test failed ({res.reason}); stderr: {res.stderr.strip()[:500]!r}. "
            "Refusing to run model-written code unsandboxed.")
    with _tools_lock:
        _probe_ok.add(key)


def execute(program: str, timeout_s: float = 5.0, *, stdin: str = "", memory_mb: int = 512,
            cpu_s: int | None = None, file_mb: int = 16, workdir_mb: int = 32,
            max_processes: int = 32, max_open_files: int = 64,
            max_output_bytes: int = 1 << 20) -> ExecResult:
    """Run Python source ``program`` in the sandbox and return its ``ExecResult``.

    Never raises for anything the program does (loops, bombs, crashes, junk
    text); raises ``ValueError`` for bad arguments and ``SandboxUnavailable`` if
    the sandbox cannot run on this machine.
    """
    if not isinstance(program, str):
        raise ValueError(f"program: must be a str, got {type(program).__name__}")
    if not isinstance(stdin, str):
        raise ValueError(f"stdin: must be a str, got {type(stdin).__name__}")
    limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s,
                           file_mb=file_mb, workdir_mb=workdir_mb, max_processes=max_processes,
                           max_open_files=max_open_files, max_output_bytes=max_output_bytes)
    tools = _find_tools()
    _ensure_working(tools)
    return _run(program, stdin, limits, tools)


def execute_many(programs: Sequence[str], timeout_s: float = 5.0, *,
                 stdins: Sequence[str] | None = None, max_workers: int | None = None,
                 **limits) -> list[ExecResult]:
    """``execute`` each program, up to ``max_workers`` at once (default: CPU count).

    Results come back in input order. ``limits`` are ``execute``'s keyword limits.
    """
    programs = list(programs)
    if stdins is None:
        stdins = [""] * len(programs)
    stdins = list(stdins)
    if len(stdins) != len(programs):
        raise ValueError(f"stdins: must have one entry per program ({len(programs)}), "
                         f"got {len(stdins)}")
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers: must be None or an int >= 1, got {max_workers!r}")
    if not programs:
        return []
    # Validate once, up front, before launching anything.
    SandboxLimits(timeout_s=timeout_s, **limits)
    _ensure_working(_find_tools())
    workers = min(max_workers or os.cpu_count() or 1, len(programs))
    if workers == 1:
        return [execute(p, timeout_s, stdin=s, **limits) for p, s in zip(programs, stdins)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(execute, p, timeout_s, stdin=s, **limits)
                   for p, s in zip(programs, stdins)]
        return [f.result() for f in futures]
