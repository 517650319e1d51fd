#!/usr/bin/env python3
"""agent-exec: a job runner for AI agents, in one stdlib-only Python file.

An agent calls ``agent-exec run -- make test`` and gets a ``job_id`` back at
once; later it asks ``status``, ``tail``, ``wait`` or ``kill``.  Every answer is
exactly one JSON object on stdout.  The job keeps running after the caller is
gone, under a detached supervisor (this same file, re-executed as the hidden
``_supervise`` subcommand) that owns the workload's output, timeout, final
state and completion events.

What is stable (see ``CONTRACT.md`` and ``README.md``): the command line, the
JSON fields of every response, the layout of a job directory, the states and
the events.  What is not: the ``_supervise`` subcommand, the private helpers
(names starting with ``_``) and the internal files of a job directory that the
README does not list.

The file runs on CPython 3.8+ on Linux and macOS, with nothing but the
standard library, so it can be dropped into any container, or piped in:
``curl -fsSL URL | python3 - run -- make test``.
"""

# ==== Compatibility ==========================================================
#
# Only cheap modules are imported at the top: the read-only commands must cost
# little more than the interpreter's own start-up.  subprocess, threading,
# select, ctypes and friends are imported where they are used.

import json
import os
import sys
import time

try:  # POSIX only; on Windows every command answers unsupported_platform.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore

__version__ = "0.1.0"

_IS_POSIX = os.name == "posix" and fcntl is not None
_IS_LINUX = sys.platform.startswith("linux")


# ==== Constants ==============================================================

SCHEMA_VERSION = "0.1"
PROG = "agent-exec"

STATES = ("running", "exited", "killed", "failed", "unknown")
TERMINAL_STATES = ("exited", "killed", "failed")

DEFAULT_SNAPSHOT_AFTER_MS = 10000
MAX_SNAPSHOT_AFTER_MS = 10000
DEFAULT_TAIL_LINES = 50
DEFAULT_MAX_BYTES = 65536
DEFAULT_WAIT_POLL_MS = 200
DEFAULT_LIST_LIMIT = 50
DEFAULT_NOTIFY_TIMEOUT_MS = 30000
# How long `kill` waits for the job to become terminal before it answers.
KILL_SETTLE_S = 1.0

# The supervisor asks Linux for pipes this large, so that bulk output costs
# few system calls, and reads them in chunks a quarter that size: a chunk of
# short lines grows about fivefold as full.log rows, and the chunk size is
# what bounds the supervisor's memory under a flood.
READ_CHUNK = 256 * 1024
PIPE_SIZE = 1 << 20
# A full.log row carries at most this much text; a longer line is split into
# continuation rows with the same prefix.
FULL_LOG_ROW_MAX = 64 * 1024
# full.log rows are written with writev(2); POSIX guarantees at least 16 pieces
# per call, Linux and macOS take 1024.  More pieces than this are joined first.
_IOV_MAX = 512
# A partial line (no newline yet) is written to full.log after this much quiet.
PARTIAL_FLUSH_S = 0.25
# After the main process ends, read what is already in the pipes, at most this
# much, before the terminal state is written (descendants may write forever).
FINAL_DRAIN_MAX = 64 << 20

# File names inside a job directory.
META = "meta.json"
STATE = "state.json"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
FULL_LOG = "full.log"
EVENT_FILE = "completion_event.json"
CONTROL = "control"  # FIFO: `kill` asks the live supervisor to signal
READY_LOCK = "ready.lock"  # held by the supervisor until the job is ready or over
RESERVE = ".reserve"  # disk space set aside so the terminal state fits on a full disk
RESERVE_BYTES = 256 * 1024

# Job ids are ULIDs: 48 bits of milliseconds, 80 random bits, Crockford base32.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_CHARS = frozenset(_CROCKFORD)
MIN_PREFIX = 4

_SIGNAL_NAMES = ("TERM", "INT", "KILL", "HUP", "QUIT", "USR1", "USR2")
_LOG_LEVELS = {"error": 0, "warn": 1, "warning": 1, "info": 2, "debug": 3, "trace": 3}


# ==== Errors =================================================================


class AgentExecError(Exception):
    """An expected failure: becomes the JSON error envelope in main()."""

    exit_code = 1

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class UsageError(AgentExecError):
    """A bad flag, value or combination: exit 2, usage text on stderr."""

    exit_code = 2

    def __init__(self, message: str, usage: str = "", prog: str = PROG) -> None:
        super().__init__("usage_error", message if prog == PROG else prog + ": " + message)
        self.usage = usage  # the usage text of the (sub)command, for stderr
        self.prog = prog
        self.bare = message


# ==== Small helpers ==========================================================

_log_level = 1


def _log(level: int, message: str) -> None:
    """Log to stderr (never stdout) when the level is enabled."""
    if level <= _log_level:
        name = {0: "error", 1: "warn", 2: "info", 3: "debug"}[level]
        try:
            sys.stderr.write("agent-exec: %s: %s\n" % (name, message))
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _level_from_env() -> int:
    raw = os.environ.get("AGENT_EXEC_LOG")
    if raw is None:
        raw = os.environ.get("RUST_LOG")
    if not raw:
        return 1
    # RUST_LOG may look like "agent_exec=debug,info": take the first level word.
    for token in raw.replace("=", ",").split(","):
        token = token.strip().lower()
        if token in _LOG_LEVELS:
            return _LOG_LEVELS[token]
        if token == "off":
            return 0
    return 1


def _rfc3339(t: float) -> str:
    """RFC 3339 UTC with milliseconds: 2026-03-15T12:00:00.123Z."""
    total_ms = int(t * 1000)
    secs, ms = divmod(total_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + ".%03dZ" % ms


def _now() -> str:
    return _rfc3339(time.time())


def _parse_rfc3339(text: str) -> float:
    """Inverse of _rfc3339 (for durations between stored timestamps)."""
    import calendar

    base, _, frac = text.rstrip("Z").partition(".")
    secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return secs + (int(frac) / 1000.0 if frac else 0.0)


_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}
# Longer than any job should wait, and small enough for every timer API.
MAX_DURATION_MS = 100 * 365 * 86400000
_DIGITS = frozenset("0123456789")
_ENV_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def parse_duration_ms(text: str) -> int:
    """Parse a duration: a bare integer is milliseconds; or 250ms, 5s, 2m, 1h.

    Raises ValueError for negative or malformed values.
    """
    s = str(text).strip().lower()
    unit = ""
    for suffix in ("ms", "s", "m", "h", "d"):
        if s.endswith(suffix):
            unit, s = suffix, s[: -len(suffix)]
            break
    if not s or not all(c in _DIGITS or c == "." for c in s) or s.count(".") > 1 or s == ".":
        raise ValueError("invalid duration %r (use e.g. 500, 250ms, 5s, 2m, 1h)" % text)
    if not unit and "." in s:
        raise ValueError("invalid duration %r: a bare number is whole milliseconds" % text)
    if len(s) > 20:
        raise ValueError("duration %r is too large (at most 100 years)" % text)
    ms = int(s) if not unit else int(round(float(s) * _DURATION_UNITS[unit]))
    if ms > MAX_DURATION_MS:
        raise ValueError("duration %r is too large (at most 100 years)" % text)
    return ms


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """Parse a size: bytes, or a binary suffix (64k, 1M, 1MiB, 2G)."""
    s = str(text).strip().lower()
    i = 0
    while i < len(s) and s[i] in _DIGITS:
        i += 1
    digits, unit = s[:i], s[i:].strip()
    if not digits or unit not in _SIZE_UNITS:
        raise ValueError("invalid size %r (use e.g. 65536, 64k, 1M, 1MiB, 2G)" % text)
    if len(digits) > 30:
        raise ValueError("size %r is too large" % text)
    return int(digits) * _SIZE_UNITS[unit]


def new_ulid(now: "float | None" = None) -> str:
    """A new ULID: 26 Crockford base32 characters that sort by creation time."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        value, r = divmod(value, 32)
        out.append(_CROCKFORD[r])
    return "".join(reversed(out))


def is_job_id(name: str) -> bool:
    """True when ``name`` has the exact shape of a job id (an upper-case ULID)."""
    return len(name) == 26 and name[0] <= "7" and _ULID_CHARS.issuperset(name)


def signal_name(num: int) -> str:
    """SIGTERM for 15, and so on; SIG<n> for numbers without a name."""
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return "SIG%d" % num


def parse_signal(text: str) -> int:
    """TERM, SIGTERM, term or 15 -> 15.  Raises ValueError otherwise."""
    import signal

    s = str(text).strip()
    if s and all(c in _DIGITS for c in s) and len(s) < 6:
        num = int(s)
        if 1 <= num < getattr(signal, "NSIG", 65):
            return num
        raise ValueError("invalid signal number %r" % text)
    name = s.upper()
    if name.startswith("SIG"):
        name = name[3:]
    if name not in _SIGNAL_NAMES:
        raise ValueError(
            "invalid signal %r (use one of %s, with or without SIG, or a number)"
            % (text, ", ".join(_SIGNAL_NAMES))
        )
    return int(getattr(signal, "SIG" + name))


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# ==== Processes ==============================================================
#
# Who is alive, who is whose parent, and how to tell a pid from a recycled
# one.  Linux reads /proc/<pid>/stat; elsewhere (macOS) ps(1) answers.  A
# zombie (state Z, or X) counts as dead everywhere here: it can no longer be
# signalled usefully, and where PID 1 does not reap orphans it stays a zombie
# for good.


def _read_boot_id() -> "str | None":
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> "tuple | None":
    """(state letter, ppid, start time) of a live process, from /proc/<pid>/stat.

    None when there is no such process, or when it is a zombie (Z, X).  The
    start time is field 22 (clock ticks since boot), kept as text: it is an
    identity token, only ever compared.  Linux only.
    """
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2, the command name, may hold spaces and ")": split after its end.
    # fields[0] is then field 3 (the state), so field 22 is fields[19].
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[0].decode(), int(fields[1]), fields[19].decode()


def _ps(args: list, timeout: float) -> bytes:
    """The output of ``ps`` with ``args`` (the fallback where there is no /proc); b"" on error."""
    try:
        import subprocess

        return subprocess.run(
            ["ps"] + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout
        ).stdout
    except Exception:
        return b""


def _proc_start_time(pid: int) -> "str | None":
    """An identity token for a live process: its start time.

    Linux: field 22 of /proc/<pid>/stat (clock ticks since boot).  Elsewhere:
    ``ps -o lstart=``.  None when the process does not exist (or is a zombie,
    which can no longer be signalled usefully anyway).
    """
    if pid is None or pid <= 1:
        return None
    if _IS_LINUX:
        stat = _proc_stat(pid)
        return stat[2] if stat is not None else None
    return _ps(["-o", "lstart=", "-p", str(pid)], 5).strip().decode() or None


def _process_table() -> "dict":
    """pid -> ppid for every live, non-zombie process (best effort)."""
    table = {}
    if _IS_LINUX:
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = _proc_stat(int(name))
                if stat is not None:
                    table[int(name)] = stat[1]
        return table
    out = _ps(["-A", "-o", "pid=", "-o", "ppid=", "-o", "stat="], 10)
    for line in out.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            if not parts[2].startswith("Z"):
                table[int(parts[0])] = int(parts[1])
    return table


def _descendants_of(root_pid: int, exclude: "set | None" = None) -> "list":
    """Live descendants of ``root_pid`` (not itself), in tree order."""
    table = _process_table()
    children = {}  # type: dict
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out = []
    queue = list(children.get(root_pid, ()))
    exclude = exclude or set()
    while queue:
        pid = queue.pop(0)
        if pid in exclude or pid <= 1 or pid == os.getpid():
            continue
        out.append(pid)
        queue.extend(children.get(pid, ()))
    return out


# ==== Job store ==============================================================
#
# A job is a directory <root>/<ULID>/.  meta.json is written once, by `run`,
# and doubles as the job's liveness lock: `run` creates it already holding an
# exclusive flock(2) and hands that lock to the supervisor, which keeps it
# until the terminal state is on disk.  So "is the job still running?" and
# "wait until it is not" are both questions about one lock, which the kernel
# releases at once if the supervisor dies: "running, but the lock is free"
# means the supervisor was lost.  state.json is replaced atomically (temp
# file + rename), never edited in place.


def resolve_root(explicit: "str | None") -> str:
    """--root, else $AGENT_EXEC_ROOT, else $XDG_DATA_HOME/..., else ~/.local/share/..."""
    root = explicit or os.environ.get("AGENT_EXEC_ROOT")
    if not root:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "share"
        )
        root = os.path.join(data, "agent-exec", "jobs")
    return os.path.abspath(os.path.expanduser(root))


def _check_root(root: str) -> None:
    """Refuse a root that another user could tamper with."""
    import stat

    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    except OSError as e:
        raise AgentExecError("io_error", "cannot inspect jobs root %s: %s" % (root, e.strerror))
    if stat.S_ISLNK(st.st_mode):
        raise AgentExecError(
            "insecure_root",
            "jobs root %s is a symlink; point --root at the real directory (%s)"
            % (root, os.path.realpath(root)),
        )
    if not stat.S_ISDIR(st.st_mode):
        raise AgentExecError("insecure_root", "jobs root %s is not a directory" % root)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise AgentExecError(
            "insecure_root",
            "jobs root %s is owned by uid %d, not by you (uid %d); use a root you own"
            % (root, st.st_uid, os.geteuid()),
        )
    if st.st_mode & 0o022:
        raise AgentExecError(
            "insecure_root",
            "jobs root %s is group- or world-writable (mode %o); fix it with: chmod 700 %s"
            % (root, st.st_mode & 0o7777, root),
        )


def _ensure_root(root: str) -> None:
    _check_root(root)
    if os.path.isdir(root):
        return
    try:
        parent = os.path.dirname(root)
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.mkdir(root, 0o700)
        os.chmod(root, 0o700)  # exactly 0700, whatever the umask
    except FileExistsError:
        pass
    except OSError as e:
        raise AgentExecError("io_error", "cannot create jobs root %s: %s" % (root, e.strerror))
    _check_root(root)


def resolve_job(root: str, ident: str) -> str:
    """Map a job id or an unambiguous prefix (>= 4 chars) to the full id.

    Anything that is not shaped like (a prefix of) a ULID names no job, so an
    argument can never become a path outside the root.
    """
    text = str(ident).upper()
    if not (MIN_PREFIX <= len(text) <= 26) or not all(c in _ULID_CHARS for c in text):
        raise AgentExecError("job_not_found", "no job %r" % _short(ident))
    if len(text) == 26:
        if is_job_id(text) and _is_job_dir(os.path.join(root, text)):
            return text
        raise AgentExecError("job_not_found", "no job %s in %s" % (text, root))
    try:
        names = os.listdir(root)
    except OSError:
        names = []
    hits = sorted(n for n in names if n.startswith(text) and is_job_id(n))
    hits = [n for n in hits if _is_job_dir(os.path.join(root, n))]
    if not hits:
        raise AgentExecError("job_not_found", "no job matches %r in %s" % (text, root))
    if len(hits) > 1:
        raise AgentExecError(
            "ambiguous_job_id",
            "prefix %r matches %d jobs (%s); give more characters"
            % (text, len(hits), ", ".join(hits[:5]) + (", ..." if len(hits) > 5 else "")),
        )
    return hits[0]


def _short(value: str, limit: int = 80) -> str:
    value = str(value)
    return value if len(value) <= limit else value[:limit] + "..."


def _is_job_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _write_json_atomic(path: str, obj: dict, durable: bool = False) -> None:
    """Replace ``path`` with ``obj`` so that no reader ever sees a torn file."""
    data = (json.dumps(obj, ensure_ascii=True, sort_keys=False) + "\n").encode()
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_fd(fd: int) -> bytes:
    """The rest of a small file, with plain reads (no file object to build)."""
    data = os.read(fd, 65536)
    more = os.read(fd, 65536) if data else b""  # (a short read is not always the end)
    if not more:
        return data
    chunks = [data, more]
    while more:
        more = os.read(fd, 65536)
        chunks.append(more)
    return b"".join(chunks)


def _read_json(path: str) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        obj = json.loads(_read_fd(fd).decode("utf-8"))
    finally:
        os.close(fd)
    if not isinstance(obj, dict):
        raise ValueError("%s is not a JSON object" % path)
    return obj


def _lock_is_free(fd: int) -> bool:
    """True when no supervisor holds the job's lock (try a shared lock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _wait_lock(path: str, timeout: "float | None") -> bool:
    """Block until nobody holds the lock on ``path`` (a job's meta.json).

    Returns False when ``timeout`` seconds passed first.  This is event
    driven: flock(2) wakes the waiter the moment the supervisor closes the
    lock (or dies), so there is no polling delay.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        free = _lock_is_free(fd)
        if free or (timeout is not None and timeout <= 0):
            return free
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return True
    finally:
        os.close(fd)
    return _LockWatch(path).wait(timeout)


class _LockWatch:
    """A flag that goes up when nobody holds the lock on ``path`` any more.

    A daemon thread parks in a blocking flock(2); when the holder lets go
    (or dies) it takes the lock for an instant, lets it go, and raises the
    flag, and the optional shared ``event``.  If we stop caring first, the
    thread simply dies with the process.
    """

    def __init__(self, path: str, event=None) -> None:
        import threading

        self.path = path
        self.done = threading.Event()
        self.event = event
        threading.Thread(target=self._run, name="agent-exec-lock", daemon=True).start()

    def _run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            fd = None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
            self.done.set()
            if self.event is not None:
                self.event.set()

    def wait(self, timeout: "float | None") -> bool:
        return self.done.wait(timeout)


def load_job(root: str, job_id: str, meta_filter=None) -> "dict | None":
    """Read a job's meta and state, and say what its state truly is.

    Returns {"id", "dir", "meta", "state" (raw state.json or None), "status",
    "failure"}, or None when ``meta_filter(meta)`` is false (list's cwd filter,
    checked before state.json is read).  A state.json that says running while nobody holds the lock
    (or that was written before the last boot) is reported as failed with
    failure.code supervisor_lost: the supervisor died without a word.
    """
    # Plain concatenation: list calls this for every job of the root.
    job_dir = root + "/" + job_id if root != "/" else "/" + job_id
    meta_path = job_dir + "/" + META
    try:
        fd = os.open(meta_path, os.O_RDONLY)
    except FileNotFoundError:
        raise AgentExecError("job_not_found", "job %s has no %s" % (job_id, META))
    except OSError as e:
        raise AgentExecError("io_error", "cannot read %s: %s" % (meta_path, e.strerror))
    try:
        try:
            meta = json.loads(_read_fd(fd).decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            raise AgentExecError("io_error", "cannot read %s: %s" % (meta_path, e))
        if meta_filter is not None and not meta_filter(meta):
            return None
        state, status = _read_state(job_dir)
        failure = state.get("failure") if state else None
        if status == "running" and _lock_is_free(fd):
            # The supervisor writes the terminal state and only then lets go
            # of the lock, so read once more before calling it lost.
            state, status = _read_state(job_dir)
            failure = state.get("failure") if state else None
            if status == "running" or state is None:
                status = "failed"
                failure = _lost_failure(state)
        elif status == "running" and state is not None:
            boot = state.get("boot_id")
            current = _read_boot_id()
            if boot and current and boot != current:
                status = "failed"
                failure = _lost_failure(state, rebooted=True)
    finally:
        os.close(fd)
    return {
        "id": job_id,
        "dir": job_dir,
        "meta": meta,
        "state": state,
        "status": status,
        "failure": failure,
    }


def _read_state(job_dir: str) -> "tuple":
    """(state dict or None, status string)."""
    try:
        state = _read_json(job_dir + "/" + STATE)
    except FileNotFoundError:
        # Created but not started yet: the lock tells whether anyone is on it.
        return None, "running"
    except (OSError, ValueError):
        return None, "unknown"
    job = state.get("job")
    if not isinstance(job, dict) or not all(
        isinstance(state.get(k), (dict, type(None))) for k in ("result", "failure")
    ):
        return None, "unknown"  # not a state.json we wrote: say so, use none of it
    status = job.get("status")
    if status not in STATES:
        status = "unknown"
    return state, status


def _lost_failure(state: "dict | None", rebooted: bool = False) -> dict:
    pid = (state or {}).get("supervisor_pid")
    if rebooted:
        msg = "the machine rebooted while the job was running; its supervisor is gone"
    elif state is None:
        msg = "the job's supervisor exited before the job started"
    else:
        msg = "the job's supervisor (pid %s) is gone and the job's end was not " % pid
        msg += "recorded (the supervisor died, or could not write state.json)"
    return {"code": "supervisor_lost", "message": msg}


def job_paths(job: dict) -> dict:
    return {
        "stdout_log_path": os.path.join(job["dir"], STDOUT_LOG),
        "stderr_log_path": os.path.join(job["dir"], STDERR_LOG),
    }


def job_result_fields(job: dict) -> dict:
    """exit_code / signal / finished_at / duration_ms / failure, when known."""
    state = job["state"] or {}
    result = state.get("result") or {}
    out = {}
    if job["status"] in TERMINAL_STATES:
        for key in ("exit_code", "signal", "duration_ms"):
            if result.get(key) is not None:
                out[key] = result[key]
        if state.get("finished_at"):
            out["finished_at"] = state["finished_at"]
    if job["failure"]:
        out["failure"] = job["failure"]
    return out


def job_started_at(job: dict) -> str:
    state = job["state"] or {}
    return (state.get("job") or {}).get("started_at") or job["meta"].get("created_at") or ""


# ---- Reading the logs -------------------------------------------------------


def tail_bytes(path: str, max_lines: int, max_bytes: int) -> "tuple":
    """The last ``max_lines`` lines, at most ``max_bytes`` bytes, of a file.

    Reads backwards from the end in growing blocks and never before
    ``size - max_bytes``, so the cost depends on what is returned, never on
    the size of the file.  Returns (data, observed_size, truncated).  A final
    line without a newline counts as a line.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b"", 0, False
    try:
        size = os.fstat(fd).st_size
        if max_lines <= 0 or max_bytes <= 0 or size == 0:
            return b"", size, size > 0
        floor = size - min(size, max_bytes)
        buf = b""
        pos = size
        block = 65536
        while pos > floor:
            step = min(block, pos - floor)
            pos -= step
            buf = os.pread(fd, step, pos) + buf
            # Enough once a newline precedes the last max_lines lines.
            if buf.count(b"\n", 0, len(buf) - 1) >= max_lines:
                break
            block = min(block * 2, 1 << 22)
    finally:
        os.close(fd)
    data = _last_lines(buf, max_lines)
    if len(data) < size:
        data = _skip_partial_utf8(data)
    return data, size, len(data) < size


def _last_lines(buf: bytes, n: int) -> bytes:
    """The last n lines of buf (a trailing newline ends the last line)."""
    end = len(buf) - 1 if buf.endswith(b"\n") else len(buf)
    pos = end
    for _ in range(n):
        pos = buf.rfind(b"\n", 0, pos)
        if pos < 0:
            return buf
    return buf[pos + 1 :]


def _skip_partial_utf8(data: bytes) -> bytes:
    """Drop continuation bytes cut off at the start of a slice (at most 3)."""
    i = 0
    while i < 3 and i < len(data) and 0x80 <= data[i] <= 0xBF:
        i += 1
    return data[i:]


def snapshot(job: dict, tail_lines: int, max_bytes: int) -> "tuple":
    """The snapshot object of the contract, and a cursor just past what it saw."""
    out = {}
    truncated = False
    ends = []
    state = job["state"] or {}
    for stream, name in (("stdout", STDOUT_LOG), ("stderr", STDERR_LOG)):
        data, observed, cut = tail_bytes(os.path.join(job["dir"], name), tail_lines, max_bytes)
        text = _decode(data)
        out[stream + "_tail"] = text
        out[stream + "_observed_bytes"] = observed
        out[stream + "_included_bytes"] = len(text.encode("utf-8"))
        truncated = truncated or cut
        ends.append((state.get(stream + "_dropped_bytes") or 0) + observed)
    out["truncated"] = truncated
    out["encoding"] = "utf-8-lossy"
    return out, make_cursor(ends[0], ends[1])


# ---- Cursors and incremental reads -----------------------------------------
#
# A cursor names a position in each stream, counted in bytes from the very
# start of the workload's output, bytes that --max-output dropped included,
# so a cursor stays valid while a capped log is compacted under it.

_CURSOR_PREFIX = "c1."
_HEX = frozenset("0123456789abcdef")
# How often a long-poll looks at the logs for new bytes (the end of the job
# wakes it at once, through the lock).
READ_POLL_S = 0.02


def make_cursor(stdout_pos: int, stderr_pos: int) -> str:
    return "%s%x.%x" % (_CURSOR_PREFIX, stdout_pos, stderr_pos)


def parse_cursor(text: str) -> "tuple":
    """``c1.<hex>.<hex>`` -> (stdout_pos, stderr_pos); ValueError otherwise."""
    s = str(text)
    parts = s[len(_CURSOR_PREFIX) :].split(".") if s.startswith(_CURSOR_PREFIX) else []
    if len(parts) != 2 or not all(p and len(p) <= 16 and set(p) <= _HEX for p in parts):
        raise ValueError("invalid cursor %r (pass back a cursor agent-exec gave you)" % _short(s))
    return int(parts[0], 16), int(parts[1], 16)


def _log_extent(job: dict, stream: str) -> "tuple":
    """(dropped, size): bytes given up by --max-output, bytes in the log now."""
    state = job["state"] or {}
    dropped = state.get(stream + "_dropped_bytes") or 0
    try:
        size = os.stat(os.path.join(job["dir"], stream + ".log")).st_size
    except OSError:
        size = 0
    return dropped, size


def job_cursor(job: dict) -> str:
    """A cursor just past everything the logs hold right now."""
    ends = [sum(_log_extent(job, stream)) for stream in ("stdout", "stderr")]
    return make_cursor(ends[0], ends[1])


def _utf8_cut(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that ends on a character boundary."""
    n = len(data)
    for i in range(1, min(4, n) + 1):
        b = data[n - i]
        if b < 0x80:
            return n  # ASCII: complete
        if b >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if i >= need else n - i
    return n  # only continuation bytes: invalid anyway, keep them


def read_span(job: dict, stream: str, pos: int, max_bytes: int, final: bool) -> "tuple":
    """Bytes of one stream from absolute position ``pos``, at most ``max_bytes``.

    Never ends inside a multi-byte character, unless the job is over and
    the file ends there (``final``).  Returns (data, new_pos, more).
    """
    dropped, _ = _log_extent(job, stream)
    try:
        fd = os.open(os.path.join(job["dir"], stream + ".log"), os.O_RDONLY)
    except OSError:
        return b"", pos, False
    try:
        size = os.fstat(fd).st_size
        off = min(max(0, pos - dropped), size)  # bytes before `dropped` are gone
        data = os.pread(fd, min(max_bytes, size - off), off) if off < size else b""
        end = _utf8_cut(data)
        if end < len(data) and not (final and off + len(data) == size):
            if end == 0:  # one character wider than max_bytes: give it whole
                lead = data[0]
                need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
                char = os.pread(fd, need, off)
                if not all(0x80 <= b <= 0xBF for b in char[1:]):
                    end = 1  # an invalid lead byte: on its own, one U+FFFD
                elif len(char) == need or (final and off + len(char) == size):
                    data, end = char, len(char)  # whole, or all there will ever be
            data = data[:end]
    finally:
        os.close(fd)
    return data, dropped + off + len(data), off + len(data) < size


# ==== Control protocol =======================================================
#
# How a caller talks to a job's live supervisor: through the job's control
# FIFO.  A message is one line of JSON, an object with a "verb", such as
# {"verb": "kill", "signal": 15}; the supervisor keeps a table of verbs, so a
# new request is one entry there.  The line `kill <n>` of earlier versions is
# still read.  A writer sends each message with a single write(2) of at most
# PIPE_BUF bytes, which the kernel never interleaves with another writer's;
# the reader keeps the bytes after the last newline for the next read, so a
# message split across two reads is never taken for two.  Bulk data (stdin
# for a job, say) belongs in a file or FIFO of its own, not in this one.

# A line longer than this is not a message of ours: it is dropped whole.
_CONTROL_LINE_MAX = 64 * 1024
# POSIX guarantees that a pipe write of up to 512 bytes is atomic (Linux and
# macOS: 4096); a control message must fit in one such write.
_CONTROL_MESSAGE_MAX = 512


def _split_control(data: bytes, carry: bytes) -> "tuple":
    """Split bytes read from the control FIFO into messages.

    ``carry`` is what the previous call returned as the unfinished last line.
    Returns (messages, carry, rejected): the dicts of the complete lines, the
    new carry, and a short reason for each line that is not a message (bad
    JSON, no verb, an unknown legacy form, too long).  Empty lines are
    skipped.  A line that grows past _CONTROL_LINE_MAX is dropped: only its
    first _CONTROL_LINE_MAX + 1 bytes are carried, enough to know it is too
    long when its newline comes, so memory stays bounded.  Pure: no I/O.
    """
    lines = (carry + data).split(b"\n")
    carry = lines.pop()[: _CONTROL_LINE_MAX + 1]
    messages = []
    rejected = []
    for line in lines:
        if len(line) > _CONTROL_LINE_MAX:
            rejected.append("a control line of more than %d bytes" % _CONTROL_LINE_MAX)
            continue
        line = line.strip()
        if not line:
            continue
        msg = _parse_control_line(line)
        if isinstance(msg, dict):
            messages.append(msg)
        else:
            rejected.append("%s: %r" % (msg, line[:80]))
    return messages, carry, rejected


def _parse_control_line(line: bytes) -> "dict | str":
    """One stripped, non-empty control line: its message, or why it is none."""
    if line[:1] != b"{":
        parts = line.split()  # the legacy form: `kill <n>`
        if len(parts) == 2 and parts[0] == b"kill" and parts[1].isdigit():
            return {"verb": "kill", "signal": int(parts[1])}
        return "not a control message"
    try:
        msg = json.loads(line.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError too
        return "bad JSON"
    if not isinstance(msg, dict) or not isinstance(msg.get("verb"), str):
        return "no verb"
    return msg


def _send_control(job_dir: str, msg: dict) -> bool:
    """Send one message to the job's live supervisor; False when none reads.

    O_NONBLOCK makes the open fail at once (ENXIO) when no supervisor has the
    FIFO open, and the write fail rather than wait when its buffer is full.
    """
    line = (json.dumps(msg, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
    if len(line) > _CONTROL_MESSAGE_MAX:
        raise ValueError("control message too long (%d bytes)" % len(line))
    try:
        fd = os.open(os.path.join(job_dir, CONTROL), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.write(fd, line) == len(line)
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_control(job_dir: str) -> "int | None":
    """Create the job's control FIFO and open its reading end (None on error)."""
    path = os.path.join(job_dir, CONTROL)
    try:
        os.mkfifo(path, 0o600)
        # O_RDWR keeps a writer open ourselves, so the FIFO never reads as
        # EOF between two messages; O_NONBLOCK so opening never waits.
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except OSError as e:
        _log(1, "cannot create control FIFO: %s" % e)
        return None


# ==== Supervisor =============================================================
#
# The supervisor is the workload's direct parent.  It runs in a session of its
# own, with stdio on /dev/null and no descriptor of the caller.  It drains the
# workload's two pipes continuously into stdout.log, stderr.log and full.log,
# enforces the timeout on the whole process tree, listens on the control FIFO
# for `kill`, reaps every child (on Linux it is a child subreaper, so orphaned
# descendants come back to it), writes the terminal state exactly once, lets
# go of the job lock (waking every waiter), delivers the completion events and
# then lives on only while descendants still hold the pipes or still run.
#
# It is built of parts around one small loop, and the parts talk through plain
# method calls.  What goes into state.json is one shared record, _JobFacts, so
# no part reaches into another's attributes:
#
#   _spawn_workload  fork and exec the workload, as a _ChildSetup prepared first
#   _Capture         the output: logs, --mask, full.log rows, --ready-match
#   _ProcessTree     subreaper, reaping, whole-tree kills
#   _StateWriter     state.json (built by _state_document) and the disk reserve
#   _Notifier        the completion event and its sinks
#   _Timers          named deadlines; the loop sleeps until the first
#   _Supervisor      the loop, its timer and control-verb tables, the end
#
# `run` starts it through _launch_supervisor (at the end of this section).

# Signal numbers, named here because `signal` is imported only where it is
# used (it costs about 0.4 ms of start-up); both are the same on every POSIX.
_SIGKILL = 9  # cannot be caught: what a timeout ends with, and kill_tree repeats
_SIGTERM = 15  # the request to stop that a timeout sends first
# fcntl(2) command to resize a pipe (Linux); fcntl.F_SETPIPE_SZ exists only in 3.10+.
_F_SETPIPE_SZ = 1031
# prctl(2) option: orphaned descendants are re-parented to us, not to PID 1.
_PR_SET_CHILD_SUBREAPER = 36

# --ready-port: how often to try connecting, and how long one attempt may take.
READY_PROBE_S = 0.1
_PROBE_CONNECT_S = 0.2
# A SIGKILL to the tree is sent this many times at most, this far apart, so
# that a process forked meanwhile is caught too.
_KILL_ROUNDS = 20
_KILL_ROUND_S = 0.01
# A terminal state.json write is tried this many times (a disk may be full).
_STATE_WRITE_ATTEMPTS = 20
# One read of the control FIFO; a longer message arrives in two reads.
_CONTROL_READ = 4096
# How often a running notify command is checked on (and output drained).
_NOTIFY_POLL_S = 0.01


# ---- The record -------------------------------------------------------------


class _JobFacts:
    """What is known about the job, as state.json reports it: a plain record.

    The parts fill it in (the process tree the wait status, the capture the
    log error, the loop the kill signal and readiness); _state_document turns
    it into the document.  A default record is a job about which nothing is
    known, which is what the failure path of `run` writes.
    """

    __slots__ = (
        "pid",
        "pid_start",
        "wait_status",
        "rusage",
        "kill_signal",
        "timed_out",
        "ready",
        "ready_at",
        "log_error",
        "started_at",
        "started_mono",
        "ended_mono",
        "supervisor_pid",
        "supervisor_start",
        "boot_id",
    )

    def __init__(self) -> None:
        self.pid = None  # type: int | None  (the workload; also its pgid)
        self.pid_start = None  # type: str | None  (its _proc_start_time token)
        self.wait_status = None  # type: int | None  (raw, from wait4)
        self.rusage = None
        self.kill_signal = None  # type: int | None  (the last signal asked for)
        self.timed_out = False
        # None: no readiness condition; False: not yet; True: ready.
        self.ready = None  # type: bool | None
        self.ready_at = None  # type: str | None
        self.log_error = None  # type: str | None  (the first one only)
        self.started_at = None  # type: str | None
        self.started_mono = 0.0
        self.ended_mono = 0.0
        self.supervisor_pid = None  # type: int | None
        self.supervisor_start = None  # type: str | None
        self.boot_id = None  # type: str | None


# The output counters of state.json, in the order the document lists them.
_OUTPUT_COUNTS = ("stdout_bytes", "stderr_bytes", "stdout_dropped_bytes", "stderr_dropped_bytes")


def _state_document(
    job_id: str,
    state: str,
    facts: "_JobFacts",
    counts: "dict | None" = None,
    failure: "dict | None" = None,
    now: "str | None" = None,
) -> dict:
    """The state.json document of a job in ``state``, from what ``facts`` know.

    Pure but for the clock (``now`` defaults to the current time).  The
    result comes from the wait status once there is one: a signal death names
    its signal, an exit its code, plus the signal asked for when the job was
    killed but exited by itself.  A failed job that never ran lasted 0 ms.
    ``counts`` holds the _OUTPUT_COUNTS (0 when absent).  The supervisor and
    the failure path of `run` (_bare_state) both build their documents here,
    so every state.json has the same keys.
    """
    now = now or _now()
    result = {"exit_code": None, "signal": None, "duration_ms": None}
    finished_at = None
    wait_status = facts.wait_status
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            result["signal"] = signal_name(os.WTERMSIG(wait_status))
        else:
            result["exit_code"] = os.WEXITSTATUS(wait_status)
            if facts.kill_signal is not None:
                result["signal"] = signal_name(facts.kill_signal)
        result["duration_ms"] = int(round((facts.ended_mono - facts.started_mono) * 1000))
        finished_at = now
    elif state == "failed":
        result["duration_ms"] = 0
        finished_at = now
    doc = {
        "schema_version": SCHEMA_VERSION,
        "job": {"id": job_id, "status": state, "started_at": facts.started_at or now},
        "result": result,
        "pid": facts.pid,
        "pgid": facts.pid,
        "pid_start_time": facts.pid_start,
        "supervisor_pid": facts.supervisor_pid,
        "supervisor_start_time": facts.supervisor_start,
        "boot_id": facts.boot_id,
        "finished_at": finished_at,
        "updated_at": now,
        "failure": failure,
        "timed_out": facts.timed_out,
        "log_error": facts.log_error,
    }
    for key in _OUTPUT_COUNTS:
        doc[key] = counts.get(key, 0) if counts else 0
    doc["ready"] = facts.ready
    doc["ready_at"] = facts.ready_at
    if facts.rusage is not None:
        ru = facts.rusage
        rss = ru.ru_maxrss if _IS_LINUX else ru.ru_maxrss // 1024  # macOS counts bytes
        doc["rusage"] = {
            "max_rss_kb": int(rss),
            "user_ms": int(ru.ru_utime * 1000),
            "sys_ms": int(ru.ru_stime * 1000),
        }
    return doc


def _end_state(facts: "_JobFacts") -> str:
    """The terminal state of a job whose main process has been reaped."""
    assert facts.wait_status is not None
    if os.WIFSIGNALED(facts.wait_status) or facts.kill_signal is not None:
        return "killed"
    return "exited"


# ---- Timers -----------------------------------------------------------------


class _Timers:
    """Named deadlines on the monotonic clock; the loop sleeps until the first.

    A name is set at most once: starting it again moves its deadline.
    """

    def __init__(self) -> None:
        self.due = {}  # type: dict  (name -> monotonic time)

    def start(self, name: str, delay_s: float) -> None:
        """Let ``name`` expire ``delay_s`` seconds from now."""
        self.due[name] = time.monotonic() + delay_s

    def start_at(self, name: str, when: float) -> None:
        """Let ``name`` expire at ``when`` (a time.monotonic() value)."""
        self.due[name] = when

    def cancel(self, name: str) -> None:
        """Forget ``name``, set or not."""
        self.due.pop(name, None)

    def poll_ms(self) -> "int | None":
        """The poll(2) timeout until the first deadline; None when nothing is timed."""
        if not self.due:
            return None  # wait for I/O alone
        left = min(self.due.values()) - time.monotonic()
        return int(min(max(left, 0.0), 86400.0) * 1000) + 1  # poll() takes a C int of ms

    def pop_expired(self) -> list:
        """The names whose time has come, earliest first; they are no longer set."""
        now = time.monotonic()
        expired = [(t, n) for n, t in self.due.items() if t <= now]
        if not expired:
            return []
        expired.sort()
        for _t, name in expired:
            del self.due[name]
        return [name for _t, name in expired]


# ---- Starting the workload --------------------------------------------------


class _ChildSetup:
    """Everything the workload's process needs, computed before the fork.

    After the fork the child only makes system calls, then execs or leaves
    by os._exit; so whatever needs Python work (resolving the program,
    listing the signals, and later rlimits or a terminal) is done here.
    """

    __slots__ = ("path", "argv", "env", "cwd", "stdout", "stderr", "default_signals")

    def __init__(self, argv: list, env: dict, cwd: str, stdout: int, stderr: int) -> None:
        import signal

        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.stdout = stdout  # the fds that become 1 and 2 (0 is /dev/null)
        self.stderr = stderr
        try:
            path = _resolve_command(argv[0], cwd, env)  # type: str | None
        except AgentExecError:  # gone since `run` looked: let exec say why
            path = os.path.join(cwd, argv[0]) if "/" in argv[0] else None
        self.path = path
        # Every signal at its default action: Python ignores SIGPIPE and
        # SIGXFSZ, and the caller may have ignored more (nohup: SIGHUP; a
        # script's background job: SIGINT, SIGQUIT), which `kill --signal`
        # must still be able to deliver.
        self.default_signals = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


def _spawn_workload(setup: "_ChildSetup") -> int:
    """Start the workload on /dev/null and the two pipes; return its pid.

    Fork and exec by hand, because importing subprocess is a good part of
    the supervisor's start-up.  The workload gets a session of its own (so
    its process group, pgid == pid, is what timeouts and kills target), the
    job's cwd, and every signal at its default action, none blocked.  Exec
    errors come back through a close-on-exec pipe, as in subprocess: EOF
    means the exec happened.  (posix_spawn was tried: glibc leaves its
    internal signals 32 and 33 ignored in the new program.)  Raises OSError
    (with the exec's errno) or ValueError when the program did not start.
    """
    null = os.open(os.devnull, os.O_RDWR)
    try:
        errpipe_r, errpipe_w = os.pipe()  # both close-on-exec (PEP 446)
    except OSError:
        os.close(null)
        raise
    pid = -1
    try:
        # Ours are close-on-exec already; anything inherited is not.
        inherited = _fds_to_close({errpipe_w})
        pid = os.fork()
        if pid == 0:
            _exec_workload(setup, (null, setup.stdout, setup.stderr), inherited, errpipe_w)
    finally:
        os.close(errpipe_w)
        os.close(null)
        if pid == -1:  # the fork itself failed
            os.close(errpipe_r)
    try:
        report = _read_fd(errpipe_r)
    finally:
        os.close(errpipe_r)
    if report:
        os.waitpid(pid, 0)  # the child that could not exec
        code, _, text = report.partition(b":")
        if code.isdigit() and int(code):
            raise OSError(int(code), os.strerror(int(code)))
        raise ValueError(text.decode("utf-8", "replace") or "exec failed")
    return pid


def _exec_workload(setup: "_ChildSetup", stdio: tuple, inherited: list, errpipe_w: int) -> None:
    """In the forked child: set up the process as ``setup`` says, then exec.

    Never returns: on any failure it writes "errno:" (or "0:message") to
    ``errpipe_w`` and leaves by os._exit(127).
    """
    import signal  # loaded by _ChildSetup already: a dictionary lookup

    report = b"0:exec failed"
    try:
        os.setsid()
        # 0-2 are /dev/null in the supervisor, so these fds are all above 2;
        # should one not be, it is moved up first, or the dup2 below would
        # leave it close-on-exec.
        src = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) if fd < 3 else fd for fd in stdio]
        for target, fd in enumerate(src):
            os.dup2(fd, target)  # dup2 makes 0, 1 and 2 inheritable
        for fd in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
        os.chdir(setup.cwd)
        for sig in setup.default_signals:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):  # a signal the OS keeps for itself
                pass
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if setup.path is None:
            raise FileNotFoundError(2, "not found")
        os.execve(setup.path, setup.argv, setup.env)
    except OSError as e:
        report = b"%d:" % (e.errno or 0)
    except BaseException as e:
        report = b"0:" + ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace")
    finally:
        try:
            os.write(errpipe_w, report[:4096])
        finally:
            os._exit(127)


def _output_pipe() -> "tuple":
    """(read end, write end) of a pipe for one output stream.

    The read end is non-blocking, and on Linux as large as PIPE_SIZE, so
    that bulk output costs few system calls.
    """
    r, w = os.pipe()
    if _IS_LINUX:
        try:
            fcntl.fcntl(r, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default size works too
    os.set_blocking(r, False)
    return r, w


# ---- Output capture ---------------------------------------------------------


class _LogFile:
    """An append-only log that never blocks and, with a cap, stays bounded.

    Write errors (a full disk, EFBIG under RLIMIT_FSIZE, EIO) drop the bytes
    and are reported once through ``on_error``: the workload is never blocked
    and its result never changed by them.  With ``cap`` (--max-output), the
    file is compacted when a write would pass the cap: its newest half is
    copied to a new file that atomically replaces it (so a reader sees the
    old file or the new one, never a torn one), and the bytes given up are
    counted in ``dropped``.  The *end* of the output is what stays.
    """

    def __init__(self, path: str, cap: int, on_error) -> None:
        self.path = path
        self.cap = cap
        self.on_error = on_error
        self.size = 0
        self.dropped = 0
        self.fd = self._open(path, truncate=True)

    def _open(self, path: str, truncate: bool) -> "int | None":
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        try:
            return os.open(path, flags, 0o600)
        except OSError as e:
            self.on_error("cannot open %s: %s" % (path, e.strerror or e))
            return None

    def append(self, data: bytes) -> None:
        if self.fd is None or not data:
            return
        if self.cap and self.size + len(data) > self.cap:
            data = self._compact(data)
        try:
            _write_all(self.fd, data)
            self.size += len(data)
        except OSError as e:
            self._write_failed(e)

    def append_parts(self, parts: list) -> None:
        """Append several pieces with one writev(2), without joining them."""
        if self.fd is None or not parts:
            return
        total = sum(len(p) for p in parts)
        if (self.cap and self.size + total > self.cap) or len(parts) > _IOV_MAX:
            self.append(b"".join(parts))
            return
        try:
            n = os.writev(self.fd, parts)
            if n < total:  # a short write (a disk filling up): the rest the slow way
                _write_all(self.fd, b"".join(parts)[n:])
            self.size += total
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        self.on_error("cannot write %s: %s" % (self.path, e.strerror or e))
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            pass

    def _compact(self, data: bytes) -> bytes:
        cap = self.cap
        if len(data) >= cap:
            kept = b""
            self.dropped += self.size + len(data) - cap
            data = data[len(data) - cap :]
        else:
            keep = min(self.size, cap // 2, cap - len(data))
            try:
                kept = os.pread(self.fd, keep, self.size - keep) if keep else b""
            except OSError:
                kept = b""
            self.dropped += self.size - len(kept)
        tmp = "%s.%d.compact.tmp" % (self.path, os.getpid())
        fd = self._open(tmp, truncate=True)
        if fd is None:
            return data
        try:
            _write_all(fd, kept)
            os.replace(tmp, self.path)
        except OSError as e:
            os.close(fd)
            self.on_error("cannot compact %s: %s" % (self.path, e.strerror or e))
            return data
        os.close(self.fd)
        self.fd = fd
        self.size = len(kept)
        return data


class _Stream:
    """One of the workload's output pipes and where its bytes go."""

    def __init__(self, name: str, fd: int, log: _LogFile) -> None:
        self.name = name
        self.fd = fd
        self.log = log
        self.tag = b" [STDOUT] " if name == "stdout" else b" [STDERR] "
        self.partial = b""  # full.log: text after the last newline
        self.cut = False  # full.log: the last row ended without its newline
        self.partial_at = 0.0  # monotonic time the partial line was last extended
        self.carry = b""  # --mask: a possible start of a secret, held back
        self.ready_buf = b""  # --ready-match: text after the last newline
        self.eof = False
        self.total = 0


class _Capture:
    """The workload's output: two pipes drained into stdout.log, stderr.log and full.log.

    Each read of a pipe (at most READ_CHUNK bytes) goes through emit() once:
    --mask secrets are replaced, the bytes are appended to the stream's log,
    turned into full.log rows in one writev(2), and tested against
    --ready-match.  A partial line (no newline yet) waits, and is written as
    a row of its own after PARTIAL_FLUSH_S of quiet (flush_due() says when).
    What the rest of the supervisor must know comes back through callbacks:
    ``on_dropped()`` when --max-output dropped bytes, ``on_ready()`` when a
    line matched, ``on_log_error(message)`` when a log could not be written
    or a pipe not read.
    """

    def __init__(self, job_dir: str, cfg: dict, on_dropped, on_ready, on_log_error) -> None:
        self.job_dir = job_dir
        self.cap = cfg.get("max_output") or 0
        self.full_path = cfg.get("log_path") or os.path.join(job_dir, FULL_LOG)
        self.secrets = sorted(
            (s.encode("utf-8", "surrogateescape") for s in cfg.get("secrets") or () if s),
            key=len,
            reverse=True,
        )
        self.ready_re = None  # cleared once the job is ready
        if cfg.get("ready_match"):
            import re

            self.ready_re = re.compile(cfg["ready_match"], re.M)
        self.on_dropped = on_dropped
        self.on_ready = on_ready
        self.on_log_error = on_log_error
        self.logs = ()  # type: tuple  (stdout.log, stderr.log), once opened
        self.full = None  # type: _LogFile | None
        self.streams = []  # type: list  (stdout, stderr), once attached

    def open_logs(self) -> None:
        """Create (truncate) the three logs, before the workload starts."""
        cap = self.cap
        out_log = _LogFile(os.path.join(self.job_dir, STDOUT_LOG), cap, self.on_log_error)
        err_log = _LogFile(os.path.join(self.job_dir, STDERR_LOG), cap, self.on_log_error)
        self.logs = (out_log, err_log)
        # full.log carries both streams plus a prefix per row.
        self.full = _LogFile(self.full_path, 3 * cap, self.on_log_error)

    def attach(self, out_r: int, err_r: int) -> None:
        """Start capturing from the read ends of the workload's two pipes."""
        out_log, err_log = self.logs
        self.streams = [_Stream("stdout", out_r, out_log), _Stream("stderr", err_r, err_log)]

    def counts(self) -> dict:
        """The _OUTPUT_COUNTS of state.json, as they stand."""
        if not self.streams:
            return {}
        out, err = self.streams
        return {
            "stdout_bytes": out.total,
            "stderr_bytes": err.total,
            "stdout_dropped_bytes": out.log.dropped,
            "stderr_dropped_bytes": err.log.dropped,
        }

    def all_eof(self) -> bool:
        """True once both pipes have been read to their end."""
        return all(s.eof for s in self.streams)

    def stop_ready_matching(self) -> None:
        """The job is ready (or its port answered): stop testing lines."""
        self.ready_re = None

    def read(self, s: _Stream) -> bool:
        """Read what one pipe has; False at EOF (the pipe is then closed)."""
        try:
            data = os.read(s.fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError as e:
            self.on_log_error("read error on %s: %s" % (s.name, e.strerror))
            data = b""
        if not data:
            s.eof = True
            self.emit(s, b"", final=True)
            os.close(s.fd)
            return False
        self.emit(s, data)
        return True

    def final_drain(self) -> None:
        """After the main process ended: take what is already in the pipes."""
        self.drain_available()
        for s in self.streams:
            if not s.eof:
                self.flush_partial(s)

    def drain_available(self) -> None:
        """Read what the pipes hold right now, without blocking (bounded)."""
        budget = FINAL_DRAIN_MAX
        for s in self.streams:
            while not s.eof and budget > 0:
                try:
                    data = os.read(s.fd, READ_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:
                    # Keep the fd registered: the loop sees EOF and closes it.
                    break
                budget -= len(data)
                self.emit(s, data)

    def emit(self, s: _Stream, data: bytes, final: bool = False) -> None:
        """Write a chunk of one stream to its log and to full.log."""
        if self.secrets:
            data = self._redact(s, data, final)
        if data:
            s.total += len(data)
            dropped = s.log.dropped
            s.log.append(data)
            if s.log.dropped != dropped:
                self.on_dropped()
        rows = _full_log_rows(s, data, final)
        if rows and self.full is not None:
            self.full.append_parts(rows)
        if s.partial:
            s.partial_at = time.monotonic()
        # Last: whoever wakes on readiness must find the ready line in the log.
        if self.ready_re is not None:
            self._check_ready_output(s, data, final)

    def _check_ready_output(self, s: _Stream, data: bytes, final: bool) -> None:
        """--ready-match: test each complete line (the last one at EOF)."""
        buf = s.ready_buf + data
        cut = len(buf) if final else buf.rfind(b"\n") + 1
        if len(buf) - cut > FULL_LOG_ROW_MAX:  # a very long line: test what we have
            cut = len(buf)
        lines, s.ready_buf = buf[:cut], buf[cut:]
        if lines and self.ready_re.search(lines.decode("utf-8", "replace")):
            self.on_ready()

    def _redact(self, s: _Stream, data: bytes, final: bool) -> bytes:
        """Replace every --mask secret in ``data`` with ***, across chunk ends.

        A secret may arrive split between two reads, so it cannot be found
        in either chunk alone.  Hence the carry-over: the longest tail of
        the chunk that is the beginning of some secret (at most the longest
        secret's length less one byte) is held back in ``s.carry`` instead
        of being written, and the next chunk is appended to it before the
        replacing; if the two together do not complete a secret, the held
        bytes are simply written then.  At the end of the stream (``final``)
        nothing is held back.  Secrets are replaced longest first, so one
        that contains another is masked whole.
        """
        data = s.carry + data
        s.carry = b""
        for secret in self.secrets:
            data = data.replace(secret, b"***")
        if not final:
            hold = 0
            for secret in self.secrets:
                for k in range(min(len(secret) - 1, len(data)), hold, -1):
                    if data.endswith(secret[:k]):
                        hold = k
                        break
            if hold:
                data, s.carry = data[:-hold], data[-hold:]
        return data

    def flush_due(self) -> "float | None":
        """When the oldest pending partial line is due in full.log, or None."""
        due = None
        for s in self.streams:
            if s.partial and not s.eof:
                t = s.partial_at + PARTIAL_FLUSH_S
                due = t if due is None else min(due, t)
        return due

    def flush_partials(self, now: "float | None") -> None:
        """Write the partial lines quiet since PARTIAL_FLUSH_S (all, with None)."""
        for s in self.streams:
            if s.partial and (now is None or now - s.partial_at >= PARTIAL_FLUSH_S):
                self.flush_partial(s)

    def flush_partial(self, s: _Stream) -> None:
        """Write out a pending partial line as a full.log row.

        A --mask carry is never flushed here: bytes that may begin a secret
        wait for the bytes that follow them, or for the end of the stream.
        """
        if s.partial:
            row = _timestamp_prefix(s) + s.partial + b"\n"
            s.partial = b""
            s.cut = True
            if self.full is not None:
                self.full.append_parts([row])


def _timestamp_prefix(s: _Stream) -> bytes:
    return _now().encode() + s.tag


def _full_log_rows(s: _Stream, data: bytes, final: bool) -> list:
    """Turn a chunk of one stream into full.log rows, with whole-chunk work.

    Returns the rows as a list of pieces for one writev(2), so that no byte
    of the output is copied to build them: a run of complete lines costs one
    bytes.replace (never a Python step per line), a single line or a
    continuation row is a memoryview into the chunk.  A line longer than
    FULL_LOG_ROW_MAX is split into continuation rows.  Text after the last
    newline waits in ``s.partial`` (written at the next newline, after
    PARTIAL_FLUSH_S of quiet, or at EOF).
    """
    buf = s.partial + data if s.partial else data
    s.partial = b""
    n = len(buf)
    if not n:  # (--mask may hold a whole chunk back)
        return []
    # A newline right after a row that was cut (a continuation row, or a
    # partial line written after quiet) only ends that row.
    pos = 1 if s.cut and buf[:1] == b"\n" else 0
    s.cut = False
    if pos == n:
        return []
    prefix = _timestamp_prefix(s)
    limit = FULL_LOG_ROW_MAX
    view = memoryview(buf)
    parts = []  # type: list
    while pos < n:
        # The longest run of lines from pos on that are each within the limit.
        end = pos
        while end < n:
            nl = buf.rfind(b"\n", end, min(end + limit + 1, n))
            if nl < 0:
                break
            end = nl + 1
        if end > pos:
            if buf.find(b"\n", pos, end - 1) < 0:  # one line: no copy
                text = view[pos : end - 1]  # type: object
            else:
                text = buf[pos : end - 1].replace(b"\n", b"\n" + prefix)
            parts += (prefix, text, b"\n")
            pos = end
        elif n - pos >= limit or final:  # no newline in reach: a continuation row
            take = min(limit, n - pos)
            parts += (prefix, view[pos : pos + take], b"\n")
            pos += take
            s.cut = pos == n
        else:
            s.partial = bytes(view[pos:])
            break
    return parts


# ---- The process tree -------------------------------------------------------


class _ProcessTree:
    """The supervisor's children: the workload, its descendants, the notify command.

    Reaps every child (wait4(-1) also collects the orphans a subreaper
    adopts) and records the workload's end in the facts; kills the whole
    tree.  The notify command, while it runs, is watched here and spared
    by kill_tree().
    """

    def __init__(self, facts: "_JobFacts") -> None:
        self.facts = facts
        self.hook_pid = None  # type: int | None
        self.hook_status = None  # type: int | None

    def become_subreaper(self) -> None:
        """On Linux, adopt orphaned descendants so a whole-tree kill finds them."""
        if not _IS_LINUX:
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except Exception as e:  # best effort: without it, double-forks escape
            _log(3, "prctl(PR_SET_CHILD_SUBREAPER) failed: %s" % e)

    def reap(self) -> bool:
        """Reap every child that has ended; True while any child remains."""
        facts = self.facts
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            except InterruptedError:
                continue
            if pid == 0:
                return True
            if pid == facts.pid and facts.wait_status is None:
                facts.wait_status = status
                facts.rusage = rusage
                facts.ended_mono = time.monotonic()
            elif pid == self.hook_pid:
                self.hook_status = status

    def watch_hook(self, pid: "int | None") -> None:
        """Record the notify command's exit status from now on (None: stop)."""
        self.hook_pid = pid
        self.hook_status = None

    def hook_exit(self) -> "int | None":
        """The watched notify command's wait status, once reaped."""
        return self.hook_status

    def kill_tree(self, sig: int) -> None:
        """Send ``sig`` to the workload's group and to every live descendant.

        Safe against pid reuse: the workload is our child, so its pid (and so
        its process group id) cannot be recycled until we reap it; the other
        targets are found as live descendants of this very process.  A
        SIGKILL is repeated until no descendant is left, for those forked
        meanwhile.
        """
        facts = self.facts
        rounds = _KILL_ROUNDS if sig == _SIGKILL else 1
        for i in range(rounds):
            if facts.pid and facts.wait_status is None:
                try:
                    os.killpg(facts.pid, sig)
                except OSError:
                    pass
            exclude = {self.hook_pid} if self.hook_pid else set()
            targets = _descendants_of(os.getpid(), exclude)
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            if sig != _SIGKILL:
                return
            if not targets and (facts.wait_status is not None or i > 0):
                return
            time.sleep(_KILL_ROUND_S)
            self.reap()


# ---- state.json -------------------------------------------------------------


class _StateWriter:
    """Writes state.json, and keeps the disk space its terminal write needs.

    Every write replaces the file atomically (temp file + rename).  A durable
    (terminal) write is retried; when the disk is full (the workload's own
    output may have filled it), it first gives back the space reserved at
    start-up, so the job's result is still recorded.
    """

    def __init__(self, job_dir: str, job_id: str, facts: "_JobFacts", counts) -> None:
        self.job_dir = job_dir
        self.job_id = job_id
        self.facts = facts
        self.counts = counts  # () -> the _OUTPUT_COUNTS, from _Capture.counts
        self.path = os.path.join(job_dir, STATE)
        self.reserve = None  # type: str | None

    def document(self, state: str, failure: "dict | None" = None) -> dict:
        """The document for ``state``, from the facts as they stand."""
        return _state_document(self.job_id, state, self.facts, self.counts(), failure)

    def write(self, doc: "dict | None" = None, durable: bool = False, quiet: bool = False) -> None:
        """Replace state.json with ``doc`` (default: the running document)."""
        if doc is None:
            doc = self.document("running")
        attempts = _STATE_WRITE_ATTEMPTS if durable else 1
        for i in range(attempts):
            try:
                # Terminal writes are fsynced by publish_terminal, after the
                # waiters are woken; atomicity comes from the rename.
                _write_json_atomic(self.path, doc)
                return
            except OSError as e:
                if durable and self.release_reserve():
                    continue
                if i == attempts - 1:
                    if not quiet:
                        _log(0, "cannot write %s: %s" % (self.path, e))
                    return
                time.sleep(min(0.05 * (i + 1), 0.5))

    def make_reserve(self) -> None:
        """Set some disk aside for the terminal state (see write)."""
        path = os.path.join(self.job_dir, RESERVE)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"\0" * RESERVE_BYTES)  # real blocks, even on tmpfs
            finally:
                os.close(fd)
            self.reserve = path
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass

    def release_reserve(self) -> bool:
        """Delete the reserve; True if there was one to give back."""
        path, self.reserve = self.reserve, None
        if path is None:
            return False
        try:
            os.unlink(path)
        except OSError:
            return False
        return True

    def publish_terminal(self, wake) -> None:
        """After the terminal write: give the reserve back, ``wake()`` the waiters, fsync."""
        # The reserve has served (the terminal state is in place); giving it
        # back now, before anyone wakes, leaves the directory as it stays.
        self.release_reserve()
        wake()
        # Then make the terminal state durable.  Readers already see it (the
        # rename is atomic); the fsyncs, which on a busy disk can take tens
        # of milliseconds, would only delay every waiter if done first.
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            _log(1, "cannot fsync %s: %s" % (self.path, e))
        _fsync_dir(self.job_dir)


# ---- Completion events ------------------------------------------------------


class _Notifier:
    """The completion event (job.finished) and its two sinks, a command and a file.

    Runs once, after the terminal state is written and the waiters are
    woken.  completion_event.json is written before the sinks run (a command
    sink can read it through AGENT_EXEC_EVENT_PATH) and again with their
    results.  A notify command may run for up to its timeout, and meanwhile
    descendants of the job may still write: so the notifier takes ``pump``,
    a callable that reads what the pipes hold (_Capture.drain_available),
    and calls it while it waits.  That is the one coupling between the
    parts: a slow hook never blocks the job's processes on a full pipe.  The
    hook is reaped through the _ProcessTree, like every child.
    """

    def __init__(self, job_dir: str, job_id: str, cfg: dict, tree: "_ProcessTree", pump) -> None:
        self.job_dir = job_dir
        self.job_id = job_id
        self.cfg = cfg
        self.tree = tree
        self.pump = pump

    def deliver(self, doc: dict) -> None:
        """Deliver the event of the terminal state ``doc`` to the sinks asked for."""
        command = self.cfg.get("notify_command")
        nfile = self.cfg.get("notify_file")
        if not command and not nfile:
            return
        event = self._event(doc)
        event_path = os.path.join(self.job_dir, EVENT_FILE)
        payload = json.dumps(event, ensure_ascii=True)
        results = []
        try:
            _write_json_atomic(event_path, dict(event, delivery_results=[]))
        except OSError as e:
            _log(1, "cannot write %s: %s" % (event_path, e))
        if command:
            results.append(self._run_command(command, payload, event_path))
        if nfile:
            results.append(_deliver_file(nfile, payload))
        try:
            _write_json_atomic(event_path, dict(event, delivery_results=results), durable=True)
        except OSError as e:
            _log(1, "cannot write %s: %s" % (event_path, e))

    def _event(self, doc: dict) -> dict:
        result = doc["result"]
        event = {
            "schema_version": SCHEMA_VERSION,
            "event_type": "job.finished",
            "job_id": self.job_id,
            "state": doc["job"]["status"],
            "command": self.cfg["argv"],
            "cwd": self.cfg["cwd"],
            "started_at": doc["job"]["started_at"],
            "finished_at": doc["finished_at"],
            "duration_ms": result["duration_ms"],
            "stdout_log_path": os.path.join(self.job_dir, STDOUT_LOG),
            "stderr_log_path": os.path.join(self.job_dir, STDERR_LOG),
        }
        if result["exit_code"] is not None:
            event["exit_code"] = result["exit_code"]
        if result["signal"] is not None:
            event["signal"] = result["signal"]
        if doc.get("failure"):
            event["failure"] = doc["failure"]
        return event

    def _run_command(self, argv: list, payload: str, event_path: str) -> dict:
        """Run the command sink with the event on stdin; its delivery result."""
        res = {"sink_type": "command", "target": json.dumps(argv), "success": False}
        res["attempted_at"] = _now()
        timeout = (self.cfg.get("notify_timeout_ms") or DEFAULT_NOTIFY_TIMEOUT_MS) / 1000.0
        try:
            proc = self._start_command(argv, event_path)
        except (OSError, ValueError) as e:
            res["error"] = "cannot start notify command: %s" % (getattr(e, "strerror", None) or e)
            return res
        status = self._feed_and_wait(proc, payload, timeout)
        if status is None:
            res["error"] = "notify command timed out after %d ms and was killed" % (timeout * 1000)
            res["timed_out"] = True
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            res["success"] = True
        elif os.WIFSIGNALED(status):
            res["error"] = "notify command killed by %s" % signal_name(os.WTERMSIG(status))
        else:
            res["error"] = "notify command exited with %d" % os.WEXITSTATUS(status)
        return res

    def _start_command(self, argv: list, event_path: str):
        """Start the command sink in a session of its own; the Popen."""
        import subprocess

        env = dict(os.environ)
        env["AGENT_EXEC_EVENT_PATH"] = event_path
        env["AGENT_EXEC_JOB_ID"] = self.job_id
        env["AGENT_EXEC_EVENT_TYPE"] = "job.finished"
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.cfg["cwd"] if os.path.isdir(self.cfg["cwd"]) else "/",
            env=env,
            close_fds=True,
            start_new_session=True,
        )

    def _feed_and_wait(self, proc, payload: str, timeout: float) -> "int | None":
        """Give the hook the event, wait for it; its wait status, None if it timed out.

        We reap the hook ourselves (wait4(-1) also collects the orphans we
        adopt), and keep draining descendants' output while it runs, so a
        slow hook blocks nobody.  One that overstays is killed, with its
        process group, and reaped.
        """
        proc.returncode = 0  # so that Popen never waits for it itself
        tree = self.tree
        tree.watch_hook(proc.pid)
        try:
            try:
                _write_all(proc.stdin.fileno(), payload.encode())
            except OSError as e:  # EPIPE: the hook ignores stdin; judge it by its exit
                _log(2, "notify command stdin: %s" % e)
            proc.stdin.close()
            deadline = time.monotonic() + timeout
            while tree.hook_exit() is None and time.monotonic() < deadline:
                time.sleep(_NOTIFY_POLL_S)
                tree.reap()
                self.pump()
            status = tree.hook_exit()
            if status is None:
                try:
                    os.killpg(proc.pid, _SIGKILL)
                except OSError:
                    pass
                while tree.hook_exit() is None and tree.reap():
                    time.sleep(_NOTIFY_POLL_S)
            return status
        finally:
            tree.watch_hook(None)


def _deliver_file(path: str, payload: str) -> dict:
    res = {"sink_type": "file", "target": path, "success": False, "attempted_at": _now()}
    line = (payload + "\n").encode()
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # One write(2) with O_APPEND: concurrent jobs never interleave
            # inside a line.  A short write is an error, not something to
            # complete with a second write that could land elsewhere.
            n = os.write(fd, line)
        finally:
            os.close(fd)
        if n != len(line):
            res["error"] = "short write to notify file (%d of %d bytes)" % (n, len(line))
        else:
            res["success"] = True
    except OSError as e:
        res["error"] = "cannot append to notify file: %s" % (e.strerror or e)
    return res


# ---- The supervisor ---------------------------------------------------------


class _Supervisor:
    """One job's supervisor: the parts above, the loop, and the end of the job.

    run() starts the workload and serves it until it is over (see _loop);
    fail() records a crash.  Timers and control messages are tables of
    handlers, ``on_timer`` and ``on_control``, so a new deadline or a new
    verb is one entry there.
    """

    def __init__(self, job_dir: str, lock_fd: int, cfg: dict) -> None:
        self.job_dir = job_dir
        self.lock_fd = lock_fd  # type: int | None
        self.cfg = cfg
        self.job_id = os.path.basename(job_dir)
        facts = self.facts = _JobFacts()
        facts.boot_id = _read_boot_id()
        self.capture = _Capture(
            job_dir,
            cfg,
            on_dropped=self._on_dropped,
            on_ready=self._mark_ready,
            on_log_error=self._note_log_error,
        )
        self.ready_port = cfg.get("ready_port") or None
        if self.capture.ready_re is not None or self.ready_port:
            facts.ready = False
        # Lets readers tell our pid from a recycled one.
        facts.supervisor_pid = os.getpid()
        facts.supervisor_start = _proc_start_time(facts.supervisor_pid)
        self.tree = _ProcessTree(facts)
        self.state_writer = _StateWriter(job_dir, self.job_id, facts, self.capture.counts)
        self.notifier = _Notifier(
            job_dir, self.job_id, cfg, self.tree, pump=self.capture.drain_available
        )
        self.timers = _Timers()
        self.on_timer = {
            "timeout": self._on_timeout,
            "kill_after": self._on_kill_after,
            "progress": self._on_progress,
            "probe": self._on_probe,
            "flush": self._on_flush,
        }
        self.on_control = {"kill": self._on_kill}
        self.terminal = False  # the terminal state is written
        self.final_doc = None  # type: dict | None  (that state, for the events)
        self.wake_r = None  # type: int | None  (readable after a SIGCHLD)
        self.control_fd = None  # type: int | None
        self.control_carry = b""  # an unfinished control line
        self.ready_fd = None  # type: int | None  (holds ready.lock until ready)

    # -- start -------------------------------------------------------------

    def run(self, ready_fd: int) -> int:
        """Start the workload, answer `run` on ``ready_fd``, serve the job; the exit code."""
        import signal

        # A full disk or RLIMIT_FSIZE must give EFBIG, not kill us.
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.tree.become_subreaper()
        self.wake_r = _wake_on_sigchld()
        self.control_fd = _open_control(self.job_dir)
        self.state_writer.make_reserve()
        if self.facts.ready is not None:
            self.ready_fd = _open_locked(os.path.join(self.job_dir, READY_LOCK))
        try:
            self._start()
        except Exception as e:  # OSError from exec; ValueError, SubprocessError
            reason = getattr(e, "strerror", None) or e
            msg = "cannot start %s: %s" % (_short(self.cfg["argv"][0]), reason)
            self._write_failed("spawn_failed", msg)
            _send_ready(ready_fd, {"ok": True})
            self._after_terminal()
            return 0
        self.state_writer.write()
        _send_ready(ready_fd, {"ok": True})
        self._loop()
        return 0

    def _start(self) -> None:
        """Open the logs, start the workload on two pipes, set the job's timers."""
        cfg = self.cfg
        facts = self.facts
        self.capture.open_logs()
        out_r, out_w = _output_pipe()
        try:
            err_r, err_w = _output_pipe()
        except BaseException:
            os.close(out_r)
            os.close(out_w)
            raise
        try:
            setup = _ChildSetup(cfg["argv"], cfg["env"], cfg["cwd"], out_w, err_w)
            facts.pid = _spawn_workload(setup)
        except BaseException:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        finally:
            facts.started_mono = time.monotonic()
            facts.started_at = _now()
        os.close(out_w)
        os.close(err_w)
        facts.pid_start = _proc_start_time(facts.pid)
        self.capture.attach(out_r, err_r)
        timeout_ms = cfg.get("timeout_ms") or 0
        if timeout_ms > 0:
            self.timers.start_at("timeout", facts.started_mono + timeout_ms / 1000.0)
        if self.ready_port:
            self.timers.start_at("probe", facts.started_mono)
        progress_ms = cfg.get("progress_every_ms") or 0
        if progress_ms:
            self.timers.start("progress", progress_ms / 1000.0)

    # -- the loop ----------------------------------------------------------

    def _loop(self) -> None:
        """Serve the job until it is over and nothing of it is left.

        Each turn sleeps in poll(2) until a pipe, the SIGCHLD wake-up pipe or
        the control FIFO is readable, or the first timer is due; handles
        what came; runs the handlers of the timers that are due; and, once
        the main process has been reaped, writes the terminal state
        (_finish).  The loop ends when the terminal state is written, both
        pipes are at EOF and no child is left: descendants that still run
        keep their reaper and killer alive.
        """
        import select

        poller = select.poll()
        streams = {}
        for s in self.capture.streams:
            poller.register(s.fd, select.POLLIN)
            streams[s.fd] = s
        poller.register(self.wake_r, select.POLLIN)
        if self.control_fd is not None:
            poller.register(self.control_fd, select.POLLIN)
        timers = self.timers
        while True:
            flush_at = self.capture.flush_due()
            if flush_at is None:
                timers.cancel("flush")
            else:
                timers.start_at("flush", flush_at)
            for fd, _ev in poller.poll(timers.poll_ms()):
                if fd == self.wake_r:
                    _drain_fd(self.wake_r)
                    self.tree.reap()
                elif fd == self.control_fd:
                    self._read_control()
                elif not self.capture.read(streams[fd]):
                    poller.unregister(fd)
            for name in timers.pop_expired():
                self.on_timer[name]()
            if self.facts.wait_status is not None and not self.terminal:
                self._finish()
            if self.terminal and self.capture.all_eof() and not self.tree.reap():
                break
        self.capture.flush_partials(None)

    # -- timers ------------------------------------------------------------

    def _on_timeout(self) -> None:
        """--timeout: TERM the tree, then KILL it after --kill-after."""
        if self.facts.wait_status is not None:
            return  # the main process ended meanwhile: nothing to time out
        self.facts.timed_out = True
        self.facts.kill_signal = _SIGTERM
        self.tree.kill_tree(_SIGTERM)
        kill_after = self.cfg.get("kill_after_ms") or 0
        if kill_after <= 0:
            self.tree.kill_tree(_SIGKILL)
        else:
            self.timers.start("kill_after", kill_after / 1000.0)

    def _on_kill_after(self) -> None:
        """Whatever is left of the tree after a timeout's TERM (even after the end)."""
        self.tree.kill_tree(_SIGKILL)

    def _on_progress(self) -> None:
        """--progress-every: refresh state.json (its updated_at, the counters)."""
        self.state_writer.write(quiet=True)
        self.timers.start("progress", (self.cfg.get("progress_every_ms") or 0) / 1000.0)

    def _on_probe(self) -> None:
        """--ready-port: try to connect; again in READY_PROBE_S until it works."""
        if _probe_port(self.ready_port):
            self._mark_ready()
        else:
            self.timers.start("probe", READY_PROBE_S)

    def _on_flush(self) -> None:
        """A partial line has been quiet for PARTIAL_FLUSH_S: give it its row."""
        self.capture.flush_partials(time.monotonic())

    # -- control messages --------------------------------------------------

    def _read_control(self) -> None:
        """Read the control FIFO and run the handler of each message's verb."""
        try:
            data = os.read(self.control_fd, _CONTROL_READ)
        except OSError:  # BlockingIOError too
            return
        messages, self.control_carry, rejected = _split_control(data, self.control_carry)
        for reason in rejected:
            _log(1, "control FIFO: ignored %s" % reason)
        for msg in messages:
            handler = self.on_control.get(msg["verb"])
            if handler is None:
                _log(1, "control FIFO: unknown verb %r" % msg["verb"])
            else:
                handler(msg)

    def _on_kill(self, msg: dict) -> None:
        """{"verb": "kill", "signal": n}: signal the whole tree, as `kill` asks."""
        sig = msg.get("signal")
        if type(sig) is not int or not 0 < sig < 256:  # not a bool, not an OverflowError
            _log(1, "control FIFO: kill with a bad signal %r" % (sig,))
            return
        if self.facts.wait_status is None and not self.terminal:
            self.facts.kill_signal = sig
        self.tree.kill_tree(sig)

    # -- callbacks from the capture ---------------------------------------

    def _on_dropped(self) -> None:
        """--max-output dropped bytes: readers see the new counts at once."""
        if not self.terminal:
            self.state_writer.write(quiet=True)

    def _note_log_error(self, message: str) -> None:
        """Record the first log error; it never changes the job's result."""
        if self.facts.log_error is None:
            self.facts.log_error = message
            _log(1, message)
            if self.facts.pid is not None and not self.terminal:
                self.state_writer.write(quiet=True)

    def _mark_ready(self) -> None:
        """Record readiness, then wake whoever waits for it."""
        self.facts.ready = True
        self.facts.ready_at = _now()
        self.capture.stop_ready_matching()
        self.timers.cancel("probe")
        if not self.terminal:
            self.state_writer.write(quiet=True)
        self._release_ready()

    def _release_ready(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    # -- the end -----------------------------------------------------------

    def _finish(self) -> None:
        """The main process has been reaped: write the one terminal state, wake the waiters."""
        self.capture.final_drain()
        self.capture.flush_partials(None)
        for name in ("timeout", "progress", "probe"):
            self.timers.cancel(name)  # kill_after stays: it is for the descendants
        doc = self.state_writer.document(_end_state(self.facts))
        self.state_writer.write(doc, durable=True)
        self.final_doc = doc
        self._after_terminal()  # wakes the waiters, then fsyncs

    def _write_failed(self, code: str, message: str) -> None:
        doc = self.state_writer.document("failed", {"code": code, "message": message})
        self.state_writer.write(doc, durable=True)
        self.final_doc = doc

    def fail(self, code: str, message: str) -> None:
        """Record that the job failed (the supervisor crashed), unless it is over already."""
        if not self.terminal:
            self._write_failed(code, message)
            self._after_terminal()

    def _after_terminal(self) -> None:
        """The terminal state is written: wake the waiters, fsync, deliver the events."""
        self.terminal = True
        self.state_writer.publish_terminal(wake=self._wake_waiters)
        try:
            self.notifier.deliver(self.final_doc)
        except Exception as e:  # best effort: a sink never changes the job
            _log(0, "event delivery failed: %s" % e)

    def _wake_waiters(self) -> None:
        # Closing our only copy of the lock wakes every `wait` at once.
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        self._release_ready()  # over without being ready: wake those too


def _wake_on_sigchld() -> int:
    """The read end of a pipe that becomes readable whenever a child ends."""
    import signal

    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    # SIGCHLD must have a Python handler for the wakeup fd to be written;
    # the poll loop does the reaping.
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    return wake_r


def _probe_port(port: int) -> bool:
    """True when something accepts a TCP connection on localhost:port."""
    import socket

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(_PROBE_CONNECT_S)
                sock.connect((host, port))
                return True
        except OSError:
            continue
    return False


def _open_locked(path: str) -> "int | None":
    """Create (or open) ``path`` and hold an exclusive flock on it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError as e:
        _log(1, "cannot lock %s: %s" % (path, e))
        return None


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _send_ready(fd: "int | None", msg: dict) -> None:
    if fd is None:
        return
    try:
        _write_all(fd, (json.dumps(msg) + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def supervise_main(job_dir: str, lock_fd: int, config_fd: int, ready_fd: int) -> int:
    """Body of the supervisor, in a re-executed interpreter or a forked child."""
    try:
        try:
            cfg = json.loads(_read_fd(config_fd).decode("utf-8", "surrogatepass"))
        finally:
            os.close(config_fd)
    except (OSError, ValueError) as e:
        _log(0, "supervisor: bad configuration: %s" % e)
        os.close(ready_fd)
        return 1
    sup = _Supervisor(job_dir, lock_fd, cfg)
    try:
        return sup.run(ready_fd)
    except BaseException as e:  # record, never leave a job "running" silently
        try:
            sup.fail("supervisor_error", "supervisor crashed: %r" % (e,))
        except BaseException:
            pass
        raise


# ---- Launching the supervisor -----------------------------------------------


def _script_path() -> "str | None":
    """The file to re-execute as the supervisor, or None (stdin, zipapp, ...)."""
    path = globals().get("__file__")
    if not path or not path.endswith(".py"):
        return None
    path = os.path.abspath(path)
    return path if os.path.isfile(path) else None


def _fds_to_close(keep: "set") -> "list":
    """Open fds of this process, other than 0-2 and ``keep``."""
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        fds = []
        for name in names:
            if name.isdigit():
                fd = int(name)
                if fd > 2 and fd not in keep:
                    fds.append(fd)
        return fds
    return [fd for fd in range(3, 1024) if fd not in keep]


# The supervisor's interpreter loads this file through the import system rather
# than as a script, so its cached bytecode is used and the supervisor does not
# recompile it; with the bare loader (importlib.util would cost about 10 ms of
# imports).  argv[1] is the file, the rest is main()'s argv.
_SUPERVISOR_BOOT = (
    "import sys,importlib.machinery as im;n='agent_exec_supervisor';"
    "l=im.SourceFileLoader(n,sys.argv[1]);m=type(sys)(n);"
    "m.__file__=sys.argv[1];m.__loader__=l;l.exec_module(m);sys.exit(m.main(sys.argv[2:]))"
)


def _supervisor_argv(script: str, job_dir: str, fds: "tuple") -> list:
    """The command line that re-executes this file as the supervisor."""
    # -I -S: no environment variables, user site or site-packages: the
    # supervisor needs nothing but the standard library.
    argv = [sys.executable, "-I", "-S", "-c", _SUPERVISOR_BOOT, script, "_supervise", job_dir]
    return argv + ["--fds", "%d,%d,%d" % fds]


def _only_thread() -> bool:
    """True when no other thread runs, so a forked child may go on running Python.

    A forked child has only the thread that forked; a lock another thread
    held at the fork (in malloc, in the import system, in logging) stays
    held in it for ever.  So a process with threads may fork only a child
    that execs at once.
    """
    threading = sys.modules.get("threading")
    return threading is None or threading.active_count() == 1


def _launch_supervisor(job_dir: str, lock_fd: int, cfg: dict) -> dict:
    """Start the detached supervisor; return its ready message.

    run --fork--> child: setsid, fork --> grandchild: the supervisor
                  child: _exit(0) at once, reaped here

    The double fork means the supervisor is never our child, so a program
    that calls main() in-process collects no zombie, and the setsid puts it
    in a session of its own, out of reach of the caller's terminal signals.
    The grandchild re-executes this file (``python -I -S agent_exec.py
    _supervise``) when it can; when the code came from stdin it runs the
    supervisor in the forked interpreter, which is safe only while no other
    thread runs (see _only_thread): otherwise this refuses.  Configuration,
    including --env values, travels through a pipe, never through argv.
    """
    script = _script_path()
    in_fork_ok = _only_thread()
    if script is None and not in_fork_ok:
        raise AgentExecError(
            "internal_error",
            "cannot start the supervisor: agent-exec was not loaded from a file it can "
            "re-execute, and running it in a forked child is unsafe while other threads run",
        )
    cfg_r, cfg_w = os.pipe()
    try:
        rdy_r, rdy_w = os.pipe()
    except BaseException:
        os.close(cfg_r)
        os.close(cfg_w)
        raise
    fds = (lock_fd, cfg_r, rdy_w)
    try:
        argv = _supervisor_argv(script, job_dir, fds) if script is not None else None
        inherited = _fds_to_close(set(fds))
        for stream in (sys.stdout, sys.stderr):
            try:  # nothing buffered may be written twice, by parent and child
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        pid = os.fork()
    except BaseException:
        for fd in (cfg_r, cfg_w, rdy_r, rdy_w):
            os.close(fd)
        raise
    if pid == 0:
        _become_supervisor(job_dir, fds, inherited, argv, in_fork_ok)
    os.close(cfg_r)
    os.close(rdy_w)
    return _supervisor_handshake(pid, cfg_w, rdy_r, cfg)


def _become_supervisor(job_dir: str, fds: tuple, inherited: list, argv, in_fork_ok: bool) -> None:
    """In the forked child of `run`: detach, then be the supervisor.  Never returns.

    ``argv`` re-executes this file (None: the code came from stdin); when
    that is impossible the supervisor runs right here, if ``in_fork_ok``.
    """
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)  # the intermediate child: done, our parent reaps it
        _detach_from_caller(inherited)
        if argv is not None:
            _exec_supervisor(argv, fds)  # returns only if the exec failed
        if in_fork_ok:
            # This process is the grandchild, a copy that nothing else uses:
            # setting the global cannot reach the caller's main().  Errors
            # only, as stderr is /dev/null now.
            global _log_level
            _log_level = 0
            code = supervise_main(job_dir, *fds)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _detach_from_caller(inherited: list) -> None:
    """Put stdio on /dev/null, close the caller's other fds, leave its cwd."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    for fd in inherited:
        try:
            os.close(fd)
        except OSError:
            pass
    os.chdir("/")


def _exec_supervisor(argv: list, fds: tuple) -> None:
    """Exec a fresh interpreter as the supervisor, handing it ``fds``; returns on failure."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        os.execv(sys.executable, argv)
    except OSError:
        pass  # the caller supervises in this process instead, if it may
    for fd in fds:
        os.set_inheritable(fd, False)


def _supervisor_handshake(pid: int, cfg_w: int, rdy_r: int, cfg: dict) -> dict:
    """Reap the intermediate child, send the configuration, read the ready message."""
    try:
        try:
            _reap_child(pid)
            _write_all(cfg_w, json.dumps(cfg, ensure_ascii=True).encode())
        except OSError as e:
            _log(1, "cannot hand the job to its supervisor: %s" % e)
        finally:
            os.close(cfg_w)
        raw = _read_fd(rdy_r)
    finally:
        os.close(rdy_r)
    try:
        return json.loads(raw.decode()) if raw.strip() else {}
    except ValueError:
        return {}


def _reap_child(pid: int) -> None:
    """Wait for our child ``pid`` to end (gone already is fine)."""
    try:
        os.waitpid(pid, 0)  # EINTR is retried by Python (PEP 475)
    except ChildProcessError:
        pass


# ==== Commands ===============================================================
#
# Each cmd_<name>(args) returns the response dict (without the envelope keys
# schema_version/ok/type, which main() adds) and never prints.


def _root(args) -> str:
    return resolve_root(getattr(args, "root", None))


def _find_job(args, ident: str) -> "tuple":
    root = _root(args)
    _check_root(root)
    job_id = resolve_job(root, ident)
    return root, job_id


def _parse_env_file(path: str) -> "list":
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AgentExecError(
            "invalid_argument", "cannot read env file %s: %s" % (path, e.strerror or e)
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AgentExecError("invalid_argument", "env file %s is not UTF-8" % path)
    pairs = []
    for num, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("export ") or s.startswith("export\t"):
            s = s[7:].lstrip()
        key, eq, value = s.partition("=")
        key = key.strip()
        if not eq or not _valid_env_key(key):
            raise AgentExecError(
                "invalid_argument",
                "env file %s line %d: expected KEY=VALUE, got %r" % (path, num, _short(line, 40)),
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        pairs.append((key, value))
    return pairs


def _valid_env_key(key: str) -> bool:
    return bool(key) and key[0] not in _DIGITS and all(c in _ENV_KEY_CHARS for c in key)


def _resolve_command(argv0: str, cwd: str, env: dict) -> str:
    """Check the command the way exec will resolve it; return the path."""
    if "/" in argv0:
        path = os.path.join(cwd, argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise AgentExecError(
            "command_not_found", "%s is not an executable file (from %s)" % (argv0, cwd)
        )
    search = env.get("PATH")
    if search is None:
        search = os.defpath
    for d in search.split(os.pathsep):
        d = os.path.join(cwd, d or ".")
        path = os.path.join(d, argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise AgentExecError(
        "command_not_found", "command %r not found on the job's PATH (%s)" % (argv0, search)
    )


def cmd_run(args) -> dict:
    t0 = args._t0
    cmd = list(args.command or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("run needs a command: agent-exec run [options] -- <command> [args...]")
    if args.ready_match is not None:
        _compile_regex(args.ready_match, "--ready-match")
    if args.no_inherit_env and args.inherit_env:
        raise UsageError("--no-inherit-env and --inherit-env conflict")
    notify_command = None
    if args.notify_command is not None:
        try:
            notify_command = json.loads(args.notify_command)
        except ValueError:
            notify_command = None
        if (
            not isinstance(notify_command, list)
            or not notify_command
            or not all(isinstance(a, str) for a in notify_command)
        ):
            raise UsageError("--notify-command must be a non-empty JSON array of strings")
    # The working directory.
    try:
        cwd = os.path.realpath(args.cwd) if args.cwd else os.path.realpath(os.getcwd())
    except OSError as e:
        raise AgentExecError("cwd_not_found", "the current directory is gone: %s" % e.strerror)
    if not os.path.isdir(cwd):
        raise AgentExecError("cwd_not_found", "working directory %s does not exist" % cwd)
    # The environment: inherited (or not), then env files in order, then --env.
    env = {} if args.no_inherit_env else dict(os.environ)
    env_keys = []  # type: list
    for path in args.env_file or ():
        for key, value in _parse_env_file(path):
            env[key] = value
            env_keys.append(key)
    explicit = []
    for item in args.env or ():
        key, _, value = item.partition("=")
        env[key] = value
        env_keys.append(key)
        explicit.append((key, value))
    env_keys = list(dict.fromkeys(env_keys))
    masks = list(dict.fromkeys(args.mask or ()))
    _resolve_command(cmd[0], cwd, env)
    log_path = None
    if args.log:
        log_path = os.path.abspath(args.log)
        parent = os.path.dirname(log_path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise AgentExecError("invalid_argument", "cannot use --log %s: %s" % (log_path, e))
        if os.path.isdir(log_path):
            raise AgentExecError("invalid_argument", "--log %s is a directory" % log_path)
    notify_file = os.path.abspath(args.notify_file) if args.notify_file else None
    # Create the job: directory, then meta.json born locked.
    root = _root(args)
    _ensure_root(root)
    while True:
        job_id = new_ulid()
        job_dir = os.path.join(root, job_id)
        try:
            os.mkdir(job_dir, 0o700)
            os.chmod(job_dir, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise AgentExecError("io_error", "cannot create job directory: %s" % e.strerror)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "job": {"id": job_id},
        "command": cmd,
        "created_at": _now(),
        "root": root,
        "cwd": cwd,
        "env_keys": env_keys,
        "mask": masks,
        "inherit_env": not args.no_inherit_env,
        "timeout_ms": args.timeout,
        "kill_after_ms": args.kill_after,
        "max_output": args.max_output or None,
        "ready_match": args.ready_match,
        "ready_port": args.ready_port,
        "log_path": log_path or os.path.join(job_dir, FULL_LOG),
        "agent_exec_version": __version__,
    }
    if notify_command or notify_file:
        meta["notification"] = {"notify_command": notify_command, "notify_file": notify_file}
    lock_fd = _create_locked_meta(job_dir, meta)
    cfg = {
        "argv": cmd,
        "cwd": cwd,
        "env": env,
        "secrets": [env[k] for k in masks if env.get(k)],
        "timeout_ms": args.timeout,
        "kill_after_ms": args.kill_after,
        "progress_every_ms": args.progress_every,
        "log_path": log_path,
        "notify_command": notify_command,
        "notify_file": notify_file,
        "notify_timeout_ms": args.notify_timeout,
        "max_output": args.max_output,
        "ready_match": args.ready_match,
        "ready_port": args.ready_port,
    }
    try:
        ready = _launch_supervisor(job_dir, lock_fd, cfg)
    finally:
        os.close(lock_fd)  # the supervisor holds its own copy now
    if not ready.get("ok"):
        # The supervisor never came up: no one else will write this job's
        # state, so record the failure here.
        _write_json_atomic(
            os.path.join(job_dir, STATE),
            _bare_state(job_id, "failed", "supervisor_failed", "the supervisor did not start"),
            durable=True,
        )
    t_start = time.monotonic()
    meta_path = os.path.join(job_dir, META)
    snapshot_after = min(args.snapshot_after, MAX_SNAPSHOT_AFTER_MS)
    readiness = bool(args.ready_match or args.ready_port)
    if args.wait:
        _wait_lock(meta_path, None)
    elif snapshot_after > 0:
        # With a readiness condition, answer as soon as the job is ready: the
        # supervisor lets go of ready.lock then (or when the job ends).
        lock = os.path.join(job_dir, READY_LOCK) if readiness else meta_path
        _wait_lock(lock, snapshot_after / 1000.0)
    waited_ms = int(round((time.monotonic() - t_start) * 1000))
    job = load_job(root, job_id)
    out = {"job_id": job_id, "state": job["status"]}
    out.update(job_paths(job))
    out["waited_ms"] = waited_ms
    if explicit:
        masked = set(masks)
        out["env_vars"] = ["%s=%s" % (k, "***" if k in masked else v) for k, v in explicit]
    if snapshot_after > 0 or args.wait:
        snap, out["cursor"] = snapshot(job, args.tail_lines, args.max_bytes)
        if snapshot_after > 0:
            out["snapshot"] = snap
        if args.wait:
            out["final_snapshot"] = snap
    else:
        out["cursor"] = make_cursor(0, 0)  # nothing seen yet
    if readiness:
        out["ready"] = bool((job["state"] or {}).get("ready"))
    out.update(job_result_fields(job))
    out.pop("duration_ms", None)
    out["elapsed_ms"] = int(round((time.monotonic() - t0) * 1000))
    return out


def _bare_state(job_id: str, status: str, code: str, message: str) -> dict:
    return _state_document(job_id, status, _JobFacts(), failure={"code": code, "message": message})


def _create_locked_meta(job_dir: str, meta: dict) -> int:
    """Write meta.json so that it appears already locked; return the lock fd."""
    path = os.path.join(job_dir, META)
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _write_all(fd, (json.dumps(meta, ensure_ascii=True) + "\n").encode())
        os.rename(tmp, path)
    except OSError as e:
        raise AgentExecError("io_error", "cannot write %s: %s" % (path, e.strerror or e))
    return fd


def cmd_status(args) -> dict:
    root, job_id = _find_job(args, args.job_id)
    job = load_job(root, job_id)
    state = job["state"] or {}
    running = job["status"] == "running"
    out = {"job_id": job_id, "state": job["status"], "started_at": job_started_at(job)}
    out.update(job_result_fields(job))
    if state.get("pid") is not None:
        out["pid"] = state["pid"]
    out["log_error"] = state.get("log_error")
    out.update(_dropped(state))
    if running and state.get("updated_at"):
        out["updated_at"] = state["updated_at"]
    # Output so far: sizes and the time of the last write, from the logs
    # themselves, so the supervisor need not rewrite state.json per chunk.
    last = None
    for stream in ("stdout", "stderr"):
        try:  # one stat gives both the size and the time of the last write
            st = os.stat(os.path.join(job["dir"], stream + ".log"))
            size, mtime = st.st_size, st.st_mtime
        except OSError:
            size, mtime = 0, None
        out[stream + "_bytes"] = (state.get(stream + "_dropped_bytes") or 0) + size
        if size:
            last = mtime if last is None else max(last, mtime)
    out["last_output_at"] = _rfc3339(last) if last is not None else None
    if running:
        since = last
        if since is None:
            try:
                since = _parse_rfc3339(out["started_at"])
            except ValueError:
                since = None
        if since is not None:
            out["idle_ms"] = max(0, int((time.time() - since) * 1000))
    if state.get("ready") is not None:
        out["ready"] = bool(state["ready"])
        out["ready_at"] = state.get("ready_at")
    if not running and isinstance(state.get("rusage"), dict):
        out["rusage"] = state["rusage"]
    descendants = _live_descendants(job)
    if descendants is not None:
        out["descendants"] = descendants
    if _IS_LINUX:
        pids = list(descendants or [])
        if running and isinstance(state.get("pid"), int):
            pids.insert(0, state["pid"])
        out["ports"] = _listening_ports(pids)
    return out


def _listening_ports(pids: list) -> list:
    """TCP ports on which any of ``pids`` listens (Linux: /proc/net/tcp{,6})."""
    if not pids:
        return []
    by_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A":  # 0A: LISTEN
                by_inode[cols[9]] = int(cols[1].rsplit(":", 1)[1], 16)
    ports = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                port = by_inode.get(target[8:-1])
                if port is not None:
                    ports.add(port)
    return sorted(ports)


def _live_descendants(job: dict) -> "list | None":
    """Pids still alive in the job's tree, via its live supervisor, or None."""
    state = job["state"] or {}
    sup = state.get("supervisor_pid")
    if not isinstance(sup, int) or sup <= 1:
        return None
    token = state.get("supervisor_start_time")
    if token is None or _proc_start_time(sup) != token:
        return [] if job["status"] in TERMINAL_STATES else None
    main_pid = state.get("pid")
    return [p for p in _descendants_of(sup) if p != main_pid]


def cmd_tail(args) -> dict:
    root, job_id = _find_job(args, args.job_id)
    job = load_job(root, job_id)
    out = {"job_id": job_id, "state": job["status"]}
    snap, out["cursor"] = snapshot(job, args.tail_lines, args.max_bytes)
    out.update(snap)
    out.update(job_paths(job))
    out.update(_dropped(job["state"] or {}))
    return out


def _dropped(state: dict) -> dict:
    """Bytes that --max-output gave up, per stream (0 without a cap)."""
    return {
        "stdout_dropped_bytes": state.get("stdout_dropped_bytes") or 0,
        "stderr_dropped_bytes": state.get("stderr_dropped_bytes") or 0,
    }


def cmd_wait(args) -> dict:
    ids = list(dict.fromkeys(args.job_ids))
    several = len(ids) > 1 or args.any
    if several and (args.match is not None or args.ready or args.cursor is not None):
        raise UsageError("--match, --ready and --cursor take a single job id")
    if args.match is None and (args.cursor is not None or args.stream is not None):
        raise UsageError("--cursor and --stream go with --match")
    root = _root(args)
    _check_root(root)
    job_ids = [resolve_job(root, ident) for ident in ids]
    deadline = time.monotonic() + args.timeout_ms / 1000.0 if args.timeout_ms > 0 else None
    if several:
        return _wait_many(root, job_ids, args.any, deadline)
    job_id = job_ids[0]
    if args.match is not None:
        regex = _compile_regex(args.match, "--match")
        start = args.cursor if args.cursor is not None else (0, 0)
        return _wait_match(root, job_id, regex, args.stream or "both", start, deadline)
    job_dir = os.path.join(root, job_id)
    lock = os.path.join(job_dir, META)
    if args.ready and os.path.exists(os.path.join(job_dir, READY_LOCK)):
        lock = os.path.join(job_dir, READY_LOCK)
    _wait_lock(lock, None if deadline is None else deadline - time.monotonic())
    job = load_job(root, job_id)
    out = {"job_id": job_id, "state": job["status"]}
    out.update(job_result_fields(job))
    ready = (job["state"] or {}).get("ready")
    if args.ready:
        out["ready"] = bool(ready)
    out["timed_out"] = job["status"] == "running" and not (args.ready and ready)
    out["cursor"] = job_cursor(job)
    return out


def _remaining(deadline: "float | None") -> "float | None":
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _wait_many(root: str, job_ids: list, any_: bool, deadline: "float | None") -> dict:
    """Block until every job (or, with --any, the first) is terminal."""
    import threading

    event = threading.Event()
    watches = [_LockWatch(os.path.join(root, j, META), event) for j in job_ids]
    first = None
    while True:
        done = [j for j, w in zip(job_ids, watches) if w.done.is_set()]
        jobs = {j: load_job(root, j) for j in done}
        finished = [j for j in done if jobs[j]["status"] in TERMINAL_STATES]
        if any_ and finished:
            first = finished[0]
            break
        if not any_ and len(finished) == len(job_ids):
            break
        remaining = _remaining(deadline)
        if remaining == 0:
            break
        event.wait(remaining)
        event.clear()
    entries = []
    for j in job_ids:
        job = load_job(root, j)
        entry = {"job_id": j, "state": job["status"]}
        for key in ("exit_code", "signal"):
            value = job_result_fields(job).get(key)
            if value is not None:
                entry[key] = value
        entries.append(entry)
    out = {"jobs": entries}
    if any_:
        out["first_job_id"] = first
        out["timed_out"] = first is None
    else:
        out["timed_out"] = any(e["state"] == "running" for e in entries)
    return out


def _compile_regex(pattern: str, option: str):
    import re

    try:
        return re.compile(pattern, re.M)
    except re.error as e:
        raise UsageError("%s: invalid regular expression %r: %s" % (option, _short(pattern), e))


def _match_line(regex, data: bytes) -> "tuple | None":
    """The first line of ``data`` that ``regex`` matches: (text, end offset).

    One regex search over the whole chunk finds a candidate at C speed; the
    line holding it is then tested on its own, so a match that only exists
    across a line break does not count.
    """
    text = data.decode("utf-8", "surrogateescape")  # round-trips every byte
    m = regex.search(text)
    while m:
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if regex.search(line):
            offset = len(text[: end + 1].encode("utf-8", "surrogateescape"))
            return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), offset
        m = regex.search(text, end + 1)
    return None


def _wait_match(
    root: str, job_id: str, regex, which: str, start: tuple, deadline: "float | None"
) -> dict:
    """wait --match: block until an output line matches, the job ends, or time is up."""
    streams = ["stdout", "stderr"] if which == "both" else [which]
    pos = {"stdout": start[0], "stderr": start[1]}  # start of the unscanned bytes
    pending = {"stdout": b"", "stderr": b""}  # a line still being written
    watch = None
    meta_path = os.path.join(root, job_id, META)
    while True:
        job = load_job(root, job_id)
        terminal = job["status"] in TERMINAL_STATES
        before = _log_sizes(job)  # before reading: see _wait_output
        for stream in streams:
            while True:
                at = pos[stream] + len(pending[stream])
                data, new_pos, more = read_span(job, stream, at, READ_CHUNK, terminal)
                if not data and not (terminal and pending[stream]):
                    break
                if new_pos - len(data) != at:  # bytes dropped by --max-output
                    pos[stream], pending[stream] = new_pos - len(data), b""
                buf = pending[stream] + data
                final = terminal and not more
                cut = len(buf) if final else buf.rfind(b"\n") + 1
                if len(buf) - cut > READ_CHUNK:  # an endless line: test it as it is
                    cut = len(buf)
                hit = _match_line(regex, buf[:cut]) if cut else None
                if hit is not None:
                    line, offset = hit
                    pos[stream] += offset
                    out = {"job_id": job_id, "state": job["status"]}
                    out.update(job_result_fields(job))
                    out["matched"] = True
                    cursor = make_cursor(pos["stdout"], pos["stderr"])
                    out["match"] = {"stream": stream, "line": line, "cursor": cursor}
                    out["timed_out"] = False
                    out["cursor"] = cursor
                    return out
                pos[stream] += cut
                pending[stream] = buf[cut:]
                if not data:
                    break
        remaining = _remaining(deadline)
        if terminal or remaining == 0:
            out = {"job_id": job_id, "state": job["status"]}
            out.update(job_result_fields(job))
            out["matched"] = False
            out["timed_out"] = not terminal
            out["cursor"] = make_cursor(pos["stdout"], pos["stderr"])
            return out
        if watch is None:
            watch = _LockWatch(meta_path)
        _wait_output(job, watch, remaining, before)


def _log_sizes(job: dict) -> list:
    """(size, inode) of stdout.log and stderr.log, to see them change."""
    out = []
    for name in (STDOUT_LOG, STDERR_LOG):
        try:
            st = os.stat(os.path.join(job["dir"], name))
            out.append((st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return out


def _wait_output(job: dict, watch: _LockWatch, remaining: "float | None", before: list) -> None:
    """Sleep until a log differs from ``before``, the job ends (the lock), or time is up.

    ``before`` must be taken before the logs were last read: bytes written
    between that read and this wait then still count as a change.
    """
    deadline = None if remaining is None else time.monotonic() + remaining
    while True:
        step = READ_POLL_S if deadline is None else min(READ_POLL_S, deadline - time.monotonic())
        if step <= 0 or watch.wait(step) or _log_sizes(job) != before:
            return


def cmd_read(args) -> dict:
    root, job_id = _find_job(args, args.job_id)
    out_pos, err_pos = args.cursor if args.cursor is not None else (0, 0)
    deadline = time.monotonic() + args.wait_ms / 1000.0
    watch = None
    while True:
        job = load_job(root, job_id)
        terminal = job["status"] in TERMINAL_STATES
        before = _log_sizes(job)  # before reading: see _wait_output
        out_data, new_out, out_more = read_span(job, "stdout", out_pos, args.max_bytes, terminal)
        err_data, new_err, err_more = read_span(job, "stderr", err_pos, args.max_bytes, terminal)
        remaining = _remaining(deadline)
        if out_data or err_data or terminal or not remaining:
            break
        if watch is None:
            watch = _LockWatch(os.path.join(job["dir"], META))
        _wait_output(job, watch, remaining, before)
    more = out_more or err_more
    return {
        "job_id": job_id,
        "state": job["status"],
        "stdout": _decode(out_data),
        "stderr": _decode(err_data),
        "cursor": make_cursor(new_out, new_err),
        "more": more,
        "eof": terminal and not more,
    }


def cmd_kill(args) -> dict:
    root, job_id = _find_job(args, args.job_id)
    sig = args.signal
    job = load_job(root, job_id)
    sent = _ask_supervisor_to_signal(job, sig)
    if not sent:
        sent = _signal_without_supervisor(job, sig)
    if sent and job["status"] == "running":
        # Give the job a moment to end, so the answer is usually final.
        _wait_lock(os.path.join(job["dir"], META), KILL_SETTLE_S)
        job = load_job(root, job_id)
    out = {"job_id": job_id, "signal": signal_name(sig), "state": job["status"], "sent": sent}
    for key, value in job_result_fields(job).items():
        if key != "signal":  # the job's own end signal is in `status`
            out[key] = value
    return out


def _ask_supervisor_to_signal(job: dict, sig: int) -> bool:
    """Ask the live supervisor, through its control FIFO, to signal the job's tree."""
    state = job["state"] or {}
    if job["status"] != "running":
        # Terminal: only descendants can be alive, and only a live supervisor
        # knows them; skip the FIFO unless it provably still runs.
        sup = state.get("supervisor_pid")
        token = state.get("supervisor_start_time")
        if not isinstance(sup, int) or token is None or _proc_start_time(sup) != token:
            return False
        if not _descendants_of(sup):
            return False
    return _send_control(job["dir"], {"verb": "kill", "signal": sig})


def _signal_without_supervisor(job: dict, sig: int) -> bool:
    """The supervisor is gone: signal the workload's group only if provably ours."""
    state = job["state"] or {}
    pid = state.get("pid")
    token = state.get("pid_start_time")
    if job["status"] in ("exited", "killed") or not isinstance(pid, int) or pid <= 1:
        return False
    if token is None or _proc_start_time(pid) != token:
        return False
    try:
        os.killpg(pid, sig)
        return True
    except OSError:
        try:
            os.kill(pid, sig)
            return True
        except OSError:
            return False


def cmd_list(args) -> dict:
    if args.cwd and args.all:
        raise UsageError("--cwd and --all conflict")
    if args.running and args.state not in (None, "running"):
        raise UsageError("--running and --state %s conflict" % args.state)
    want_state = "running" if args.running else args.state
    root = _root(args)
    out = {"root": root, "jobs": [], "truncated": False, "skipped": 0}
    if not os.path.isdir(root):
        return out
    _check_root(root)
    meta_filter = None
    if not args.all:
        try:
            want_cwd = os.path.realpath(args.cwd or os.getcwd())
        except OSError:
            want_cwd = os.path.abspath(args.cwd or ".")

        def meta_filter(meta: dict) -> bool:
            return meta.get("cwd") == want_cwd

    limit = args.limit
    try:
        # ULIDs sort by creation time: newest first, and stop at limit + 1.
        # Names are checked as they come: a short list never looks at the rest.
        # scandir tells symlinks apart from the directory entry itself.
        with os.scandir(root) as it:
            entries = sorted(((e.name, e) for e in it), reverse=True)
    except OSError as e:
        raise AgentExecError("io_error", "cannot list %s: %s" % (root, e.strerror))
    for name, entry in entries:
        if not is_job_id(name) or _is_symlink(entry):
            continue  # not a job of this root, whatever its name
        try:
            job = load_job(root, name, meta_filter)
        except AgentExecError:
            out["skipped"] += 1
            continue
        if job is None or (want_state and job["status"] != want_state):
            continue
        if limit and len(out["jobs"]) >= limit:
            out["truncated"] = True
            break
        out["jobs"].append(_list_entry(job))
    return out


def _is_symlink(entry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:  # (an lstat, where the listing gives no type, that failed)
        return False


def _list_entry(job: dict) -> dict:
    meta = job["meta"]
    state = job["state"] or {}
    entry = {
        "job_id": job["id"],
        "state": job["status"],
        "started_at": job_started_at(job),
        "command": meta.get("command"),
        "cwd": meta.get("cwd"),
        "ready": state.get("ready"),
    }
    result = job_result_fields(job)
    for key in ("exit_code", "signal", "finished_at", "failure"):
        if key in result:
            entry[key] = result[key]
    if state.get("updated_at"):
        entry["updated_at"] = state["updated_at"]
    return entry


def cmd_delete(args) -> dict:
    root = _root(args)
    _check_root(root)
    # Resolve every id first: a typo deletes nothing.
    job_ids = list(dict.fromkeys(resolve_job(root, ident) for ident in args.job_ids))
    deleted, refused, freed = [], [], 0
    for job_id in job_ids:
        try:
            job = load_job(root, job_id)
        except AgentExecError as e:
            refused.append({"job_id": job_id, "reason": e.message})
            continue
        if job["status"] not in TERMINAL_STATES:
            reason = "the job is %s; stop it first (agent-exec kill %s)" % (job["status"], job_id)
            refused.append({"job_id": job_id, "reason": reason})
            continue
        freed += _remove_job(job["dir"], args.dry_run)
        deleted.append(job_id)
    return {"deleted": deleted, "refused": refused, "freed_bytes": freed, "dry_run": args.dry_run}


def _remove_job(job_dir: str, dry_run: bool) -> int:
    """Delete a job directory (or only measure it); return the bytes it held.

    The directory is first renamed out of the job namespace, so no reader
    ever sees a half-deleted job.
    """
    size = 0
    try:
        for name in os.listdir(job_dir):
            try:
                size += os.lstat(os.path.join(job_dir, name)).st_size
            except OSError:
                pass
    except OSError:
        pass
    if dry_run:
        return size
    import shutil

    parent, name = os.path.split(job_dir)
    doomed = os.path.join(parent, ".deleting-%s-%s" % (name, os.urandom(4).hex()))
    try:
        os.rename(job_dir, doomed)
    except OSError as e:
        raise AgentExecError("io_error", "cannot delete %s: %s" % (job_dir, e.strerror or e))
    shutil.rmtree(doomed, ignore_errors=True)
    return size


def cmd_gc(args) -> dict:
    root = _root(args)
    out = {"deleted": 0, "job_ids": [], "skipped": 0, "freed_bytes": 0, "dry_run": args.dry_run}
    if not os.path.isdir(root):
        return out
    _check_root(root)
    now = time.time()
    try:
        names = sorted((n for n in os.listdir(root) if is_job_id(n)), reverse=True)
    except OSError as e:
        raise AgentExecError("io_error", "cannot list %s: %s" % (root, e.strerror))
    rank = 0  # position among readable jobs, newest first
    for name in names:
        if os.path.islink(os.path.join(root, name)):
            continue
        try:
            job = load_job(root, name)
        except AgentExecError:
            out["skipped"] += 1  # unreadable: never touched
            continue
        rank += 1
        if job["status"] not in TERMINAL_STATES:
            out["skipped"] += 1  # running (or unknown): never touched
            continue
        stamp = (job["state"] or {}).get("finished_at") or job["meta"].get("created_at")
        try:
            age_ms = (now - _parse_rfc3339(stamp)) * 1000
        except (TypeError, ValueError):
            age_ms = 0
        beyond = args.max_jobs is not None and rank > args.max_jobs
        if age_ms >= args.older_than or beyond:
            out["freed_bytes"] += _remove_job(job["dir"], args.dry_run)
            out["job_ids"].append(name)
    out["deleted"] = len(out["job_ids"])
    return out


def cmd_schema(args) -> dict:
    return {
        "schema_format": "json-schema-draft-07",
        "schema": response_schema(),
        "generated_at": _now(),
    }


def cmd_supervise(job_dir: str, fds: str) -> int:
    """The hidden ``_supervise`` subcommand: returns an exit code, prints nothing."""
    lock_fd, cfg_fd, ready_fd = (int(x) for x in fds.split(","))
    for fd in (lock_fd, cfg_fd, ready_fd):
        os.set_inheritable(fd, False)
    return supervise_main(job_dir, lock_fd, cfg_fd, ready_fd)


# ---- The response schema ------------------------------------------------------


def response_schema() -> dict:
    """One draft-07 JSON Schema that every response of every command matches.

    Every response names its command in ``type``, so the top level is a
    oneOf over one definition per type.  Objects stay open (no
    additionalProperties: false) so that a field added later does not break
    an older client's validation.
    """
    S = {"type": "string"}
    I = {"type": "integer", "minimum": 0}
    B = {"type": "boolean"}
    NS = {"type": ["string", "null"]}
    NB = {"type": ["boolean", "null"]}
    ids = {"type": "array", "items": S}
    state = {"enum": list(STATES)}
    failure = {
        "type": ["object", "null"],
        "required": ["code", "message"],
        "properties": {"code": S, "message": S},
    }
    snap_props = {
        "stdout_tail": S,
        "stderr_tail": S,
        "truncated": B,
        "encoding": {"const": "utf-8-lossy"},
        "stdout_observed_bytes": I,
        "stderr_observed_bytes": I,
        "stdout_included_bytes": I,
        "stderr_included_bytes": I,
    }
    snap = {"type": "object", "required": sorted(snap_props), "properties": snap_props}
    result = {
        "exit_code": {"type": "integer"},
        "signal": S,
        "finished_at": S,
        "duration_ms": I,
        "failure": failure,
    }
    dropped = {"stdout_dropped_bytes": I, "stderr_dropped_bytes": I}

    def obj(required: list, props: dict) -> dict:
        return {"type": "object", "required": required, "properties": props}

    def resp(name: str, required: list, *parts: dict) -> dict:
        props = {
            "schema_version": {"const": SCHEMA_VERSION},
            "ok": {"const": True},
            "type": {"const": name},
        }
        for part in parts:
            props.update(part)
        return obj(["schema_version", "ok", "type"] + required, props)

    job_entry = obj(
        ["job_id", "state", "started_at", "command", "cwd"],
        dict(
            result,
            job_id=S,
            state=state,
            started_at=S,
            command=ids,
            cwd=S,
            updated_at=S,
            ready=NB,
        ),
    )
    brief = obj(
        ["job_id", "state"],
        {"job_id": S, "state": state, "exit_code": {"type": "integer"}, "signal": S},
    )
    rusage = obj(["max_rss_kb", "user_ms", "sys_ms"], {"max_rss_kb": I, "user_ms": I, "sys_ms": I})
    defs = {
        "snapshot": snap,
        "error": {
            "type": "object",
            "required": ["schema_version", "ok", "type", "error"],
            "properties": {
                "schema_version": {"const": SCHEMA_VERSION},
                "ok": {"const": False},
                "type": {"const": "error"},
                "error": obj(
                    ["code", "message", "retryable"], {"code": S, "message": S, "retryable": B}
                ),
            },
        },
        "run": resp(
            "run",
            ["job_id", "state", "stdout_log_path", "stderr_log_path", "waited_ms", "elapsed_ms"],
            result,
            {
                "job_id": S,
                "state": state,
                "stdout_log_path": S,
                "stderr_log_path": S,
                "waited_ms": I,
                "elapsed_ms": I,
                "env_vars": ids,
                "snapshot": {"$ref": "#/definitions/snapshot"},
                "final_snapshot": {"$ref": "#/definitions/snapshot"},
                "cursor": S,
                "ready": B,
            },
        ),
        "status": resp(
            "status",
            ["job_id", "state", "started_at"],
            result,
            dropped,
            {
                "job_id": S,
                "state": state,
                "started_at": S,
                "pid": I,
                "updated_at": S,
                "log_error": NS,
                "descendants": {"type": "array", "items": I},
                "stdout_bytes": I,
                "stderr_bytes": I,
                "last_output_at": NS,
                "idle_ms": I,
                "ready": B,
                "ready_at": NS,
                "rusage": rusage,
                "ports": {"type": "array", "items": I},
            },
        ),
        "tail": resp(
            "tail",
            ["job_id", "stdout_log_path", "stderr_log_path"] + snap["required"],
            snap_props,
            dropped,
            {"job_id": S, "state": state, "stdout_log_path": S, "stderr_log_path": S, "cursor": S},
        ),
        "read": resp(
            "read",
            ["job_id", "state", "stdout", "stderr", "cursor", "more", "eof"],
            {
                "job_id": S,
                "state": state,
                "stdout": S,
                "stderr": S,
                "cursor": S,
                "more": B,
                "eof": B,
            },
        ),
        "wait": dict(
            resp(
                "wait",
                ["timed_out"],
                result,
                {
                    "job_id": S,
                    "state": state,
                    "timed_out": B,
                    "cursor": S,
                    "ready": B,
                    "matched": B,
                    "match": obj(
                        ["stream", "line", "cursor"],
                        {"stream": {"enum": ["stdout", "stderr"]}, "line": S, "cursor": S},
                    ),
                    "jobs": {"type": "array", "items": brief},
                    "first_job_id": NS,
                },
            ),
            anyOf=[{"required": ["job_id", "state"]}, {"required": ["jobs"]}],
        ),
        "kill": resp(
            "kill",
            ["job_id", "signal", "state"],
            result,
            {"job_id": S, "signal": S, "state": state, "sent": B},
        ),
        "list": resp(
            "list",
            ["root", "jobs", "truncated", "skipped"],
            {
                "root": S,
                "jobs": {"type": "array", "items": job_entry},
                "truncated": B,
                "skipped": I,
            },
        ),
        "delete": resp(
            "delete",
            ["deleted", "refused", "freed_bytes", "dry_run"],
            {
                "deleted": ids,
                "refused": {
                    "type": "array",
                    "items": obj(["job_id", "reason"], {"job_id": S, "reason": S}),
                },
                "freed_bytes": I,
                "dry_run": B,
            },
        ),
        "gc": resp(
            "gc",
            ["deleted", "job_ids", "skipped", "freed_bytes", "dry_run"],
            {"deleted": I, "job_ids": ids, "skipped": I, "freed_bytes": I, "dry_run": B},
        ),
        "schema": resp(
            "schema",
            ["schema_format", "schema", "generated_at"],
            {
                "schema_format": {"const": "json-schema-draft-07"},
                "schema": {"type": "object"},
                "generated_at": S,
            },
        ),
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "agent-exec response",
        "definitions": defs,
        "oneOf": [
            {"$ref": "#/definitions/%s" % name} for name in sorted(defs) if name != "snapshot"
        ],
    }


# ==== CLI ====================================================================


def _arg_type(parse, what: str):
    """Wrap a parser so argparse reports its ValueError as a usage error."""
    import argparse

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e))

    convert.__name__ = what
    return convert


def _nonneg_int(text: str) -> int:
    s = str(text).strip()
    if not s or not all(c in _DIGITS for c in s) or len(s) > 18:
        raise ValueError("expected a whole number >= 0, got %r" % _short(text))
    return int(s)


def _positive_duration(text: str) -> int:
    ms = parse_duration_ms(text)
    if ms <= 0:
        raise ValueError("expected a duration > 0, got %r" % text)
    return ms


def _port(text: str) -> int:
    port = _nonneg_int(text)
    if not 1 <= port <= 65535:
        raise ValueError("expected a TCP port 1-65535, got %r" % text)
    return port


def _env_pair(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not _valid_env_key(key):
        raise ValueError("expected KEY=VALUE, got %r" % _short(text.partition("=")[0] + "=..."))
    return text


def _env_key(text: str) -> str:
    if not _valid_env_key(text):
        raise ValueError("expected an environment variable name, got %r" % _short(text))
    return text


def build_parser(command: "str | None" = None):
    """The whole CLI, built in one place.

    With ``command``, only that subcommand gets its options (the others are
    listed, so --help still shows every command): building all of them
    costs more than the work of a read-only command.
    """
    import argparse

    def want(name: str) -> bool:
        return command is None or command == name

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse's usage errors take the JSON path
            raise UsageError(message, self.format_usage(), self.prog)

    duration = _arg_type(parse_duration_ms, "duration")
    size = _arg_type(parse_size, "size")
    count = _arg_type(_nonneg_int, "count")
    sig = _arg_type(parse_signal, "signal")
    cursor = _arg_type(parse_cursor, "cursor")

    parser = Parser(
        prog=PROG,
        description="Run commands as detached background jobs and answer in JSON.",
        epilog="Every command prints exactly one JSON object on stdout. "
        "See README.md for the fields.",
    )
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")
    parser.add_argument("--root", metavar="DIR", help="jobs root directory")

    common = Parser(add_help=False)
    common.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help="jobs root")
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="-v info, -vv debug"
    )

    sub = parser.add_subparsers(dest="command_name", metavar="<command>", parser_class=Parser)
    sub.required = True

    def add(name: str, help_text: str):
        parents = [common] if want(name) else []
        return sub.add_parser(name, parents=parents, description=help_text, help=help_text)

    p = add("run", "start a background job")
    if want("run"):
        p.add_argument(
            "--snapshot-after",
            type=duration,
            default=DEFAULT_SNAPSHOT_AFTER_MS,
            metavar="MS",
            help="observe the job this long before answering (max 10000; 0 = at once)",
        )
        p.add_argument(
            "--timeout",
            type=duration,
            default=0,
            metavar="MS",
            help="SIGTERM the job's process group at this deadline (0 = none)",
        )
        p.add_argument(
            "--kill-after",
            type=duration,
            default=0,
            metavar="MS",
            help="SIGKILL this long after the timeout's SIGTERM",
        )
        p.add_argument("--tail-lines", type=count, default=DEFAULT_TAIL_LINES, metavar="N")
        p.add_argument("--max-bytes", type=size, default=DEFAULT_MAX_BYTES, metavar="N")
        p.add_argument("--cwd", metavar="DIR", help="working directory (default: the caller's)")
        p.add_argument(
            "--env", action="append", type=_arg_type(_env_pair, "env"), metavar="KEY=VALUE"
        )
        p.add_argument("--env-file", action="append", metavar="FILE")
        p.add_argument(
            "--no-inherit-env", action="store_true", help="start from an empty environment"
        )
        p.add_argument(
            "--inherit-env", action="store_true", help="inherit the environment (default)"
        )
        p.add_argument(
            "--mask",
            action="append",
            type=_arg_type(_env_key, "key"),
            metavar="KEY",
            help="never show KEY's value in any output or file",
        )
        p.add_argument("--log", metavar="PATH", help="where full.log goes")
        p.add_argument("--progress-every", type=duration, default=0, metavar="MS")
        p.add_argument("--wait", action="store_true", help="block until the job is terminal")
        p.add_argument("--wait-poll-ms", type=duration, default=DEFAULT_WAIT_POLL_MS, metavar="MS")
        p.add_argument("--notify-command", metavar="JSON_ARGV")
        p.add_argument("--notify-file", metavar="PATH")
        p.add_argument(
            "--notify-timeout",
            type=_arg_type(_positive_duration, "duration"),
            default=DEFAULT_NOTIFY_TIMEOUT_MS,
            metavar="MS",
            help="kill a notify command after this long",
        )
        p.add_argument(
            "--ready-match", metavar="REGEX", help="the job is ready when a line matches"
        )
        p.add_argument(
            "--ready-port",
            type=_arg_type(_port, "port"),
            metavar="PORT",
            help="the job is ready when localhost:PORT accepts a connection",
        )
        p.add_argument(
            "--max-output",
            type=size,
            default=0,
            metavar="SIZE",
            help="keep at most SIZE bytes per stream on disk, the newest (0 = no limit)",
        )
        p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    p.set_defaults(func=cmd_run)

    p = add("status", "show a job's state")
    if want("status"):
        p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = add("tail", "show the end of a job's output")
    if want("tail"):
        p.add_argument("--tail-lines", type=count, default=DEFAULT_TAIL_LINES, metavar="N")
        p.add_argument("--max-bytes", type=size, default=DEFAULT_MAX_BYTES, metavar="N")
        p.add_argument("job_id")
    p.set_defaults(func=cmd_tail)

    p = add("wait", "block until a job is terminal (or ready, or prints a match)")
    if want("wait"):
        p.add_argument("--timeout-ms", type=duration, default=0, metavar="MS", help="0 = no limit")
        p.add_argument("--poll-ms", type=duration, default=DEFAULT_WAIT_POLL_MS, metavar="MS")
        p.add_argument("--match", metavar="REGEX", help="return when an output line matches")
        p.add_argument("--stream", choices=("stdout", "stderr", "both"), help="with --match")
        p.add_argument("--cursor", type=cursor, metavar="C", help="with --match: search from C")
        p.add_argument("--any", action="store_true", help="with several ids: the first to end")
        p.add_argument("--ready", action="store_true", help="return when ready or terminal")
        p.add_argument("job_ids", nargs="+", metavar="job_id")
    p.set_defaults(func=cmd_wait)

    p = add("read", "read the output that arrived after a cursor")
    if want("read"):
        p.add_argument("--cursor", type=cursor, metavar="C", help="default: the start")
        p.add_argument("--max-bytes", type=size, default=DEFAULT_MAX_BYTES, metavar="N")
        p.add_argument(
            "--wait-ms",
            type=duration,
            default=0,
            metavar="MS",
            help="block until there is new output, the job ends, or MS pass",
        )
        p.add_argument("job_id")
    p.set_defaults(func=cmd_read)

    p = add("kill", "signal every live process of a job")
    if want("kill"):
        p.add_argument("--signal", type=sig, default=15, metavar="NAME")
        p.add_argument("job_id")
    p.set_defaults(func=cmd_kill)

    p = add("list", "list jobs, newest first")
    if want("list"):
        p.add_argument("--state", choices=STATES)
        p.add_argument(
            "--limit",
            type=count,
            default=DEFAULT_LIST_LIMIT,
            metavar="N",
            help="at most N jobs (0 = all; default %d)" % DEFAULT_LIST_LIMIT,
        )
        p.add_argument("--cwd", metavar="DIR", help="jobs started in DIR (default: here)")
        p.add_argument("--all", action="store_true", help="jobs from every directory")
        p.add_argument("--running", action="store_true", help="same as --state running")
    p.set_defaults(func=cmd_list)

    p = add("delete", "delete finished jobs")
    if want("delete"):
        p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
        p.add_argument("job_ids", nargs="+", metavar="job_id")
    p.set_defaults(func=cmd_delete)

    p = add("gc", "delete old finished jobs")
    if want("gc"):
        p.add_argument(
            "--older-than",
            type=duration,
            default=7 * 86400000,
            metavar="AGE",
            help="finished longer ago than AGE (default 7d; s, m, h, d)",
        )
        p.add_argument("--max-jobs", type=count, metavar="N", help="keep at most the newest N")
        p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    p.set_defaults(func=cmd_gc)

    p = add("schema", "print the JSON Schema of every response")
    p.set_defaults(func=cmd_schema)

    # `_supervise` is not here: main() recognises it before argparse runs,
    # so it stays out of --help and out of the choices that errors list.
    return parser


# ==== Entry point ============================================================


def _emit(obj: dict) -> None:
    data = json.dumps(obj, ensure_ascii=True) + "\n"
    try:
        sys.stdout.write(data)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _envelope_error(code: str, message: str, retryable: bool = False) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "ok": False,
        "type": "error",
        "error": {"code": code, "message": message, "retryable": retryable},
    }


def _refuse_nul(args) -> None:
    """No path, command word or value may hold a NUL byte: the OS cannot take it.

    Job ids are left alone: an id with a NUL simply names no job.
    """
    for name, value in vars(args).items():
        if name in ("job_id", "job_ids"):
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            option = "the command" if name == "command" else "--" + name.replace("_", "-")
            raise AgentExecError("invalid_argument", "%s contains a NUL byte" % option)


def _command_in(argv: list) -> "str | None":
    """The subcommand named in argv (None if there is none)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--root":
            skip = True
        elif arg == "--":
            return None
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: "list | None" = None) -> int:
    """Run one command; print one JSON object; return the exit code."""
    global _log_level
    t0 = time.monotonic()
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    _log_level = _level_from_env()
    if not _IS_POSIX:
        _emit(_envelope_error("unsupported_platform", "agent-exec runs on Linux and macOS only"))
        return 1
    if argv[:1] == ["_supervise"]:
        # The hidden subcommand that runs the detached supervisor.  `run`
        # starts it with exactly these arguments; it prints nothing, and it
        # skips argparse, which it would only pay for at start-up.
        if len(argv) != 4 or argv[2] != "--fds":
            _emit(_envelope_error("usage_error", "_supervise is internal to agent-exec"))
            return 2
        return cmd_supervise(argv[1], argv[3])
    parser = None
    try:
        parser = build_parser(_command_in(argv))
        args = parser.parse_args(argv)
        _refuse_nul(args)
        if args.verbose:
            _log_level = max(_log_level, 1 + min(args.verbose, 2))
        args._t0 = t0
        result = args.func(args)
        out = {"schema_version": SCHEMA_VERSION, "ok": True, "type": args.command_name}
        out.update(result)
        _emit(out)
        return 0
    except UsageError as e:
        try:
            usage = e.usage or (parser.format_usage() if parser is not None else "")
            sys.stderr.write("%s%s: error: %s\n" % (usage, e.prog, e.bare))
        except (OSError, ValueError):
            pass
        _emit(_envelope_error(e.code, e.message))
        return e.exit_code
    except AgentExecError as e:
        _log(2, "%s: %s" % (e.code, e.message))
        _emit(_envelope_error(e.code, e.message, e.retryable))
        return e.exit_code
    except SystemExit as e:  # --help, --version, and the supervisor's exit
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        _emit(_envelope_error("interrupted", "interrupted by the user", retryable=True))
        return 1
    except Exception as e:
        if _log_level >= 3:
            import traceback

            traceback.print_exc(file=sys.stderr)
        else:
            _log(0, "internal error: %r (run with -vv for the traceback)" % (e,))
        _emit(_envelope_error("internal_error", "%s: %s" % (type(e).__name__, e)))
        return 1


def cli() -> None:
    """The command's entry point (the script, ``-m`` and the installed command).

    Everything is said once main() returns, so the interpreter's teardown
    (module cleanup, the garbage collector), a good part of a short command's
    wall time, is skipped with os._exit.  Flush first: os._exit does not.
    Code that wants an exit code back calls main() instead.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # (None when fd 1 or 2 was closed)
        pass
    os._exit(code)


if __name__ == "__main__":
    cli()
