#!/usr/bin/env python3
"""agent-exec: a job runner for AI agents, in one stdlib-only Python file.

An agent calls ``agent-exec run -- make test`` and gets a ``job_id`` back at
once; later it asks ``status``, ``tail``, ``read``, ``wait`` or ``kill``.
Every answer is exactly one JSON object on stdout.  The job keeps running
after the caller is gone, under a detached supervisor (this same file,
re-executed as the hidden ``_supervise`` subcommand) that owns the workload's
output, timeout, final state and completion events.

What is stable (README.md describes it): the command line, the JSON fields of
every response, the layout of a job directory, the states and the events.
What is not: the ``_supervise`` subcommand, the private helpers (names
starting with ``_``) and the internal files of a job directory that the
README does not list.

The file runs on CPython 3.8+ on Linux and macOS, with nothing but the
standard library, so it can be dropped into any container, or piped in:
``curl -fsSL URL | python3 - run -- make test``.

File map (the sections, in order; each banner says what it owns):

    Compatibility        cheap imports, platform flags
    Constants            states, job-directory file names, signals, limits
    Errors               AgentExecError, UsageError, the ERROR_CODES table
    Small helpers        logging, time, durations, sizes, ULIDs, signal names
    Processes            /proc/<pid>/stat, the process table, descendants
    Files and locks      atomic JSON writes, fd reads, the job lock and its watchers
    Job store            the root, _Job, _verdict, the walk over a root's jobs, names and keys
    Logs                 tails, snapshots, cursors, read spans, UTF-8 edges
    Control protocol     caller -> live supervisor messages (framed JSON lines)
    Supervisor           the detached watcher, in parts around a small loop
    Declarations         Opt, Field, @command: one declaration per command
    Commands             per command: its declaration, its handler, its helpers
    Response schema      derived from the declarations
    Terminal screen      the emulator behind `screen`, --plain, the screen checkpoint
    Views for people     --format table: list, status and tail as aligned text
    Front end: CLI       the parser derived from the declarations, dispatch, main
    Front end: MCP       `agent-exec mcp`: the commands as MCP tools over stdio

Rules the file keeps:

- Handlers return dicts and never print; ``dispatch()`` is the one place
  where an outcome becomes the JSON envelope and an exit code.
- Best effort (fsyncs, events, progress writes): log once at warn, and
  never change a job's result.
- Only cheap modules are imported at the top (see Compatibility).

To add a command: declare it with ``@command(...)`` above its handler (its
options, conflicts and response fields), write the handler, add its README
section, add its tests.  The parser, the schema and the tool list follow.
"""

# ==== Compatibility ==========================================================
#
# Only cheap modules are imported at the top: the read-only commands must cost
# little more than the interpreter's own start-up.  subprocess, threading,
# select, ctypes and friends are imported where they are used.  collections
# is already loaded by json (through re), so it costs nothing here.

import collections
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

# The module's own code object, when this file runs as a program: `install`
# from a pipe (curl ... | python3 - install) has no file to copy, but it can
# write this code as the installed bytecode.
_MAIN_CODE = sys._getframe(0).f_code if __name__ == "__main__" else None
_IS_LINUX = sys.platform.startswith("linux")


# ==== Constants ==============================================================
#
# Cross-cutting values only.  A tunable that belongs to one subsystem sits at
# the head of that subsystem's section.

SCHEMA_VERSION = "0.1"
PROG = "agent-exec"

# "created": recorded by `create`, not started yet (`start` starts it).
STATES = ("created", "running", "exited", "killed", "failed", "unknown")
TERMINAL_STATES = ("exited", "killed", "failed")

DEFAULT_SNAPSHOT_AFTER_MS = 10000
MAX_SNAPSHOT_AFTER_MS = 10000
DEFAULT_TAIL_LINES = 50
DEFAULT_MAX_BYTES = 65536
DEFAULT_WAIT_POLL_MS = 200
DEFAULT_LIST_LIMIT = 50
DEFAULT_NOTIFY_TIMEOUT_MS = 30000
DEFAULT_GC_OLDER_THAN_MS = 7 * 86400000
DEFAULT_STDIN_MAX_BYTES = 64 << 20
# run --pty: the terminal's size when --pty-size is not given, and its TERM.
DEFAULT_PTY_SIZE = (80, 24)
PTY_TERM = "xterm-256color"
# How long `kill` waits for the job to become terminal before it answers.
KILL_SETTLE_S = 1.0

# Signal numbers, named here because `signal` is imported only where it is
# used (it costs about 0.4 ms of start-up); both are the same on every POSIX.
_SIGKILL = 9  # cannot be caught: what a timeout ends with, and kill_tree repeats
_SIGTERM = 15  # the request to stop that a timeout sends first
_EIO = 5  # errno (the same on Linux and macOS): a terminal's master after hang-up

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
STDIN_FILE = "stdin"  # run --stdin/--stdin-file: the bytes the workload reads
CONTROL = "control"  # FIFO: `kill`, `send` and `renew` talk to the live supervisor
READY_LOCK = "ready.lock"  # held by the supervisor until the job is ready or over
RESIZE_LOG = "resize.jsonl"  # run --pty: each `send --size`, where in stdout.log it took effect
SCREEN_CACHE = "screen.cache"  # `screen`'s checkpoint: the emulator's state and its log offset
RESERVE = ".reserve"  # disk space set aside so the terminal state fits on a full disk
RESERVE_BYTES = 256 * 1024
ATTEMPTS = "attempts"  # restart: attempts/N/ keeps attempt N's state.json and logs

# Job ids are ULIDs: 48 bits of milliseconds, 80 random bits, Crockford base32.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_CHARS = frozenset(_CROCKFORD)
MIN_PREFIX = 4

_SIGNAL_NAMES = ("TERM", "INT", "KILL", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT", "WINCH")
# Signals that ask a job to do something other than end: `kill` answers at
# once for these instead of waiting for the job to become terminal.
_NON_ENDING_SIGNALS = ("USR1", "USR2", "STOP", "CONT", "WINCH")
_LOG_LEVELS = {"error": 0, "warn": 1, "warning": 1, "info": 2, "debug": 3, "trace": 3}


# ==== Errors =================================================================
#
# Every expected failure is an AgentExecError with a code from ERROR_CODES;
# dispatch() turns it into the JSON envelope.  The schema's enum and the
# README's table are checked against this table by the tests.

# code -> (exit code, retryable, what it means)
ERROR_CODES = {
    # The call: its words, and the job it names.
    "usage_error": (2, False, "a bad flag, value or combination, or no command"),
    "job_not_found": (1, False, "the argument names no job of the root"),
    "ambiguous_job_id": (1, False, "the prefix matches more than one job"),
    "invalid_argument": (1, False, "a well-formed value that cannot be used"),
    # What run checks before it creates anything.
    "cwd_not_found": (1, False, "the working directory (or the current one) does not exist"),
    "command_not_found": (1, False, "run: the command is not an executable on the PATH"),
    "port_in_use": (1, False, "run --port/--ready-port: something already holds that port"),
    "invalid_state": (1, False, "the job is not in a state that allows this"),
    "input_full": (1, True, "send: the job has not read what was sent before; send later"),
    # The root, the machine, and agent-exec itself.
    "io_error": (1, False, "a filesystem operation failed"),
    "insecure_root": (1, False, "the jobs root is a symlink, not a directory, or not private"),
    "unsupported_platform": (1, False, "not Linux or macOS"),
    "internal_error": (1, False, "an unexpected exception (a bug)"),
    "interrupted": (1, True, "the CLI itself was interrupted (Ctrl-C)"),
    "unknown_source_scheme": (1, False, "install-skills --source: not self or local:PATH"),
}

# end_reason of a terminal job: why it ended.  ``exit``: by itself; ``signal``:
# a signal from outside agent-exec; ``kill``: an agent-exec `kill`;
# ``timeout``: its own --timeout; ``spawn_failed``: it never ran;
# ``supervisor_lost``: its supervisor died, so its end is not known.
END_REASONS = ("exit", "signal", "kill", "timeout", "spawn_failed", "supervisor_lost")
# Lifecycle and guards: the lease ran out (run --lease), or a limit ended the
# job (--limit-mem, --limit-cpu, --limit-procs, --max-output-action kill).
END_REASONS += ("lease_expired", "memory_limit", "cpu_limit", "procs_limit", "output_limit")

# failure.code of a failed job (in state.json and every answer about the job)
FAILURE_CODES = {
    "spawn_failed": "the supervisor could not exec the workload",
    "supervisor_lost": "the supervisor died (or the machine rebooted) while the job ran",
    "supervisor_failed": "the supervisor never started",
    "supervisor_error": "the supervisor crashed with an exception, and recorded it",
}
# The end_reason of a failed job, by its failure code: a supervisor that never
# started never ran the job either; one that crashed lost sight of it.
_FAILURE_END_REASONS = {
    "spawn_failed": "spawn_failed",
    "supervisor_failed": "spawn_failed",
    "supervisor_lost": "supervisor_lost",
    "supervisor_error": "supervisor_lost",
}


class AgentExecError(Exception):
    """An expected failure: dispatch() makes it the JSON error envelope."""

    def __init__(
        self, code: str, message: str, retryable: "bool | None" = None, details=None
    ) -> None:
        super().__init__(message)
        exit_code, default_retryable, _meaning = ERROR_CODES[code]
        self.code = code
        self.message = message
        self.exit_code = exit_code
        self.retryable = default_retryable if retryable is None else retryable
        # Extra fields of the error object (port_in_use: the holder's pid, job_id).
        self.details = details


class UsageError(AgentExecError):
    """A bad flag, value or combination: exit 2, usage text on stderr.

    ``usage`` and ``prog`` are set by argparse's errors; a usage error raised
    after parsing (a conflict) gets its command's usage from the CLI front end.
    """

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
    if ms == 0 and float(s) > 0:
        # "0.4ms" must not silently become 0, which means "none" to --timeout.
        raise ValueError("duration %r is shorter than 1 ms, the smallest step" % text)
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


# A terminal's size is COLSxROWS, each at least 1 and at most these (the
# screen emulator keeps a cell for each).
TERM_MAX_COLS, TERM_MAX_ROWS = 2000, 1000


def parse_term_size(text: str) -> "tuple":
    """``COLSxROWS`` (80x24) -> (cols, rows); ValueError otherwise."""
    cols, x, rows = str(text).strip().lower().partition("x")
    if not x or not (cols.isdigit() and rows.isdigit()) or len(cols) > 4 or len(rows) > 4:
        raise ValueError("expected COLSxROWS (like 80x24), got %r" % _short(text))
    if not (0 < int(cols) <= TERM_MAX_COLS and 0 < int(rows) <= TERM_MAX_ROWS):
        raise ValueError(
            "a terminal has 1 to %d columns and 1 to %d rows, got %r"
            % (TERM_MAX_COLS, TERM_MAX_ROWS, _short(text))
        )
    return int(cols), int(rows)


# send --keys: what each named key types, as an xterm in its normal mode sends
# it (the supervisor turns the cursor keys into their application-mode form
# when the program asked for that mode).  Ctrl-a ... ctrl-z are added below.
_KEYS = {
    "enter": b"\r",
    "return": b"\r",
    "tab": b"\t",
    "esc": b"\x1b",
    "escape": b"\x1b",
    "backspace": b"\x7f",
    "space": b" ",
    "comma": b",",
    "up": b"\x1b[A",
    "down": b"\x1b[B",
    "right": b"\x1b[C",
    "left": b"\x1b[D",
    "home": b"\x1b[H",
    "end": b"\x1b[F",
    "insert": b"\x1b[2~",
    "delete": b"\x1b[3~",
    "pgup": b"\x1b[5~",
    "pgdn": b"\x1b[6~",
    "f1": b"\x1bOP",
    "f2": b"\x1bOQ",
    "f3": b"\x1bOR",
    "f4": b"\x1bOS",
    "f5": b"\x1b[15~",
    "f6": b"\x1b[17~",
    "f7": b"\x1b[18~",
    "f8": b"\x1b[19~",
    "f9": b"\x1b[20~",
    "f10": b"\x1b[21~",
    "f11": b"\x1b[23~",
    "f12": b"\x1b[24~",
}
_KEYS.update(("ctrl-%s" % chr(c), bytes([c - 96])) for c in range(ord("a"), ord("z") + 1))
_KEYS.update({"pageup": _KEYS["pgup"], "pagedown": _KEYS["pgdn"], "ctrl-space": b"\x00"})
# A key may be repeated: "down*3".  More than this many at once is a mistake.
_KEY_REPEAT_MAX = 1000


def parse_keys(spec: str) -> bytes:
    """send --keys SPEC -> the bytes typed; ValueError names what is wrong.

    SPEC is a comma-separated list.  Each item is a key name from _KEYS
    (case does not matter), optionally repeated as ``name*N``, or literal
    text in quotes, ``"..."`` or ``'...'``, in which a comma is just a
    comma.  ``enter`` types a carriage return, as a terminal's Enter key
    does.
    """
    text = str(spec)
    out = []
    i = 0
    n = len(text)
    if not text.strip():
        raise ValueError("--keys needs at least one key (like enter or ctrl-c)")
    while i <= n:
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] in "\"'":
            quote = text[i]
            end = text.find(quote, i + 1)
            if end < 0:
                raise ValueError("--keys: text opened with %s at %d is not closed" % (quote, i))
            out.append(text[i + 1 : end].encode("utf-8", "surrogateescape"))
            i = end + 1
            while i < n and text[i] == " ":
                i += 1
            if i < n and text[i] != ",":
                raise ValueError("--keys: expected a comma after the quoted text at %d" % i)
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            item = text[i:end].strip().lower()
            name, star, count = item.partition("*")
            name = name.strip()
            if not item:
                raise ValueError("--keys: an empty item at %d (two commas in a row?)" % i)
            if name not in _KEYS:
                raise ValueError(
                    "--keys: unknown key %r (keys: enter, tab, esc, backspace, up, down, "
                    'left, right, home, end, pgup, pgdn, f1 ... f12, ctrl-a ... ctrl-z, or "text")'
                    % _short(item or text[i:end])
                )
            times = 1
            if star:
                count = count.strip()
                if not count.isdigit() or not 0 < int(count) <= _KEY_REPEAT_MAX:
                    raise ValueError(
                        "--keys: %r: a repeat is *1 to *%d" % (_short(item), _KEY_REPEAT_MAX)
                    )
                times = int(count)
            out.append(_KEYS[name] * times)
            i = end
        i += 1  # past the comma (or the end)
    return b"".join(out)


def _compile(pattern: "str | bytes"):
    import re

    return re.compile(pattern)


class _LazyRegex:
    """A regex compiled on first use (re's import is not free at start-up)."""

    def __init__(self, make):
        self._make = make
        self._re = None

    def __getattr__(self, name):
        if self._re is None:
            self._re = self._make()
        return getattr(self._re, name)


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


def _to_json(obj, **options) -> str:
    """JSON text that every strict parser accepts (serde_json, encoding/json).

    Arguments, paths and environment values that are not UTF-8 reach Python
    as lone surrogates (surrogateescape), and json.dumps would write them as
    "\\udcff" escapes, which strict parsers reject.  Such strings are written
    with U+FFFD in place of each bad byte.  Only what others read goes
    through here: the supervisor's own config keeps the exact bytes, so the
    job still runs with them.
    """
    text = json.dumps(obj, ensure_ascii=True, **options)
    if "\\ud" in text:  # a surrogate escape: a valid pair (an emoji), or a lone one
        text = json.dumps(_clean_surrogates(obj), ensure_ascii=True, **options)
    return text


def _clean_surrogates(obj):
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            pass
        # The bytes that surrogateescape stood for, U+FFFD for any other lone
        # surrogate; then U+FFFD for each byte that is not UTF-8.
        raw = bytearray()
        for ch in obj:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:
                raw.append(code - 0xDC00)
            elif 0xD800 <= code <= 0xDFFF:
                raw += b"\xef\xbf\xbd"
            else:
                raw += ch.encode("utf-8")
        return raw.decode("utf-8", "replace")
    if isinstance(obj, dict):
        return {_clean_surrogates(k): _clean_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_surrogates(v) for v in obj]
    return obj


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
    """(state letter, ppid, start time, pgid) of a live process, from /proc/<pid>/stat.

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
    return fields[0].decode(), int(fields[1]), fields[19].decode(), int(fields[2])


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
    """pid -> (ppid, pgid, start time token or None) for every live, non-zombie
    process (best effort; the token on Linux only)."""
    table = {}
    if _IS_LINUX:
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = _proc_stat(int(name))
                if stat is not None:
                    table[int(name)] = (stat[1], stat[3], stat[2])
        return table
    out = _ps(["-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat="], 10)
    for line in out.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 4 and all(p.isdigit() for p in parts[:3]):
            if not parts[3].startswith("Z"):
                table[int(parts[0])] = (int(parts[1]), int(parts[2]), None)
    return table


def _descendants_of(
    root_pid: int, exclude: "set | None" = None, table: "dict | None" = None
) -> "list":
    """Live descendants of ``root_pid`` (not itself), in tree order.

    ``table`` is a _process_table() to use (several questions, one walk of /proc).
    """
    if table is None:
        table = _process_table()
    children = {}  # type: dict
    for pid, (ppid, _pgid, _start) in table.items():
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


def _listen_table() -> "dict | None":
    """socket inode -> TCP port, for every listening socket (Linux: /proc/net/tcp{,6}).

    None when neither table can be read (not Linux, or /proc hidden).
    """
    by_inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        by_inode = by_inode or {}
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A":  # 0A: LISTEN
                by_inode[cols[9]] = int(cols[1].rsplit(":", 1)[1], 16)
    return by_inode


def _socket_inodes(pid: int) -> list:
    """The inodes of the sockets that ``pid`` has open (Linux; [] if unreadable)."""
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            target = os.readlink(fd_dir + "/" + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.append(target[8:-1])
    return out


def _listening_ports(pids: list) -> list:
    """TCP ports on which any of ``pids`` listens (Linux)."""
    by_inode = _listen_table() if pids else None
    if not by_inode:
        return []
    ports = {by_inode[i] for pid in pids for i in _socket_inodes(pid) if i in by_inode}
    return sorted(ports)


def _port_holders(port: int) -> list:
    """The pids that listen on TCP ``port`` (Linux; [] when it cannot be told)."""
    by_inode = _listen_table()
    inodes = {i for i, p in (by_inode or {}).items() if p == port}
    if not inodes:
        return []
    holders = []
    for name in os.listdir("/proc"):
        if name.isdigit() and inodes.intersection(_socket_inodes(int(name))):
            holders.append(int(name))
    return holders


# ==== Files and locks ========================================================
#
# Every file agent-exec writes for readers is replaced by write-then-rename,
# never edited in place.  A job's meta.json doubles as its liveness lock (see
# the Job store banner); the functions here wait on such locks, either in the
# calling thread or through one shared watcher thread per lock.

# How often a cancellable wait looks at its cancel flag (completion itself
# wakes it at once, through the watcher's event).
_CANCEL_POLL_S = 0.05


def _write_json_atomic(
    path: str, obj: dict, durable: bool = False, keep_locked: bool = False
) -> "int | None":
    """Replace ``path`` with ``obj`` so that no reader ever sees a torn file.

    With ``keep_locked`` the new file is already under an exclusive flock when
    it appears, and the locked fd is returned (the caller owns it): meta.json
    is born that way, so no reader can see the job unlocked before its
    supervisor exists.  On any error nothing is left behind: no temp file, no fd.
    """
    data = (_to_json(obj) + "\n").encode()
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    mode = os.O_RDWR if keep_locked else os.O_WRONLY
    fd = os.open(tmp, mode | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            if keep_locked:
                fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            if not keep_locked:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if keep_locked:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(os.path.dirname(path))
    return fd if keep_locked else None


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
    """Everything left to read on ``fd`` (a small file or a pipe), with plain reads.

    A read shorter than asked is not proof of the end (pipes, FUSE and NFS
    return short reads), so it reads until a read returns nothing.
    """
    data = os.read(fd, 65536)
    more = os.read(fd, 65536) if data else b""
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


def _wait_lock(path: str, timeout: "float | None", cancel=None) -> bool:
    """Block until nobody holds the lock on ``path`` (a job's meta.json).

    Returns False when ``timeout`` seconds passed first, or when ``cancel``
    (a threading.Event) was set.  This is event driven: flock(2) wakes the
    waiter the moment the supervisor closes the lock (or dies), so there is
    no polling delay.  Without a timeout or a cancel flag the calling thread
    itself blocks in flock (Ctrl-C still interrupts it); otherwise the wait
    goes through the lock's shared watcher.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        free = _lock_is_free(fd)
        if free or (timeout is not None and timeout <= 0):
            return free
        if timeout is None and cancel is None:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return True
    finally:
        os.close(fd)
    watch = _LockWatch.acquire(path)
    try:
        return watch.wait(timeout, cancel)
    finally:
        watch.release()


class _LockWatch:
    """A flag that goes up when nobody holds the lock on ``path`` any more.

    A daemon thread parks in a blocking flock(2); when the holder lets go
    (or dies) it takes the lock for an instant, lets it go, and raises the
    flag and every subscribed event.  Watchers are shared: ``acquire(path)``
    gives the one watcher of that lock (starting it if needed) and
    ``release()`` gives it back, so a long-lived process holds at most one
    thread per lock however many waits it runs.  A flock(2) in progress
    cannot be cancelled portably, so a watcher nobody holds any more stays
    parked until the job ends, and is reused by the next wait on that job.
    """

    _by_path = {}  # type: dict
    _guard = None  # a threading.Lock, made on first use

    def __init__(self, path: str) -> None:
        import threading

        self.path = path
        self.done = threading.Event()
        self.events = []  # type: list
        self.users = 0
        threading.Thread(target=self._run, name="agent-exec-lock", daemon=True).start()

    @classmethod
    def acquire(cls, path: str, event=None) -> "_LockWatch":
        """The shared watcher of ``path``; ``event`` is also set when it fires."""
        import threading

        if cls._guard is None:
            cls._guard = threading.Lock()
        with cls._guard:
            watch = cls._by_path.get(path)
            if watch is None:
                watch = cls._by_path[path] = cls(path)
            watch.users += 1
            if event is not None:
                watch.events.append(event)
                if watch.done.is_set():
                    event.set()
        return watch

    def release(self, event=None) -> None:
        with self._guard:
            self.users -= 1
            if event is not None and event in self.events:
                self.events.remove(event)

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
            with self._guard:
                self.done.set()
                if self._by_path.get(self.path) is self:
                    del self._by_path[self.path]
                for event in self.events:
                    event.set()

    def wait(self, timeout: "float | None", cancel=None) -> bool:
        """True once the lock is free; False after ``timeout`` s or on ``cancel``."""
        if cancel is None:
            return self.done.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not cancel.is_set():
            step = _CANCEL_POLL_S if deadline is None else min(_CANCEL_POLL_S, _remaining(deadline))
            if self.done.wait(step):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return self.done.is_set()


def _remaining(deadline: "float | None") -> "float | None":
    return None if deadline is None else max(0.0, deadline - time.monotonic())


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
#
# Words: a job's *state* is the verdict as published ("running", "exited",
# ...); its *record* is the state.json document.


def resolve_root(explicit: "str | None") -> str:
    """The jobs root, as an absolute path, from the first rule that applies.

    --root, else $AGENT_EXEC_ROOT (either made absolute here, once, against
    the current directory), else $XDG_DATA_HOME/agent-exec/jobs, else
    $HOME/.local/share/agent-exec/jobs, else the same below the home
    directory of the passwd entry.  An empty or relative XDG_DATA_HOME or
    HOME is ignored (the XDG spec says so for the one, and "/.local" or a
    path below the current directory is no one's home for the other).
    """
    if explicit == "":
        raise UsageError("--root needs a directory, not an empty string")
    root = explicit or os.environ.get("AGENT_EXEC_ROOT")
    if root:
        try:
            return os.path.abspath(os.path.expanduser(root))
        except OSError as e:  # a relative root, and the current directory is gone
            raise AgentExecError(
                "cwd_not_found",
                "cannot make the jobs root %r absolute: the current directory is gone (%s)"
                % (root, e.strerror),
            )
    return os.path.join(_data_home("the jobs root", "--root DIR"), "agent-exec", "jobs")


def _data_home(what: str, instead: str) -> str:
    """$XDG_DATA_HOME when absolute, else <home>/.local/share (see resolve_root)."""
    data = os.environ.get("XDG_DATA_HOME") or ""
    if os.path.isabs(data):
        return os.path.normpath(data)
    home = _home_dir()
    if home is None:
        raise AgentExecError(
            "invalid_argument",
            "no home directory to put %s in (HOME is unset, empty or relative, and the "
            "passwd entry has none): pass %s" % (what, instead),
        )
    return os.path.join(home, ".local", "share")


def _home_dir() -> "str | None":
    """$HOME when it is an absolute path, else the passwd entry's home, else None."""
    home = os.environ.get("HOME") or ""
    if os.path.isabs(home):
        return home
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, OSError):
        return None
    return home if os.path.isabs(home) else None


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


def _iter_jobs(root: str):
    """The entries of ``root`` that may be jobs, newest first: (name, DirEntry).

    The one walk over a root (list, gc, delete and prefix resolution use it).
    Names that are not job ids are never looked at; symlinks are skipped, so
    an id can never lead outside the root.  ULIDs sort by creation time, and
    the entries are checked only as the caller reaches them, so a short
    listing never stats the rest.
    """
    try:
        with os.scandir(root) as it:
            entries = sorted(((e.name, e) for e in it), reverse=True)
    except OSError as e:
        raise AgentExecError("io_error", "cannot list %s: %s" % (root, e.strerror))
    for name, entry in entries:
        if is_job_id(name) and not _is_symlink(entry):
            yield name, entry


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_symlink(entry) -> bool:
    try:
        return entry.is_symlink()
    except OSError:  # where the listing gives no type, an lstat is made; it failed
        return False


def resolve_job(root: str, ident: str) -> str:
    """Map a job id, an unambiguous prefix (>= 4 chars) or a name to the full id.

    Anything that is not shaped like (a prefix of) a ULID is a name (see
    _resolve_name), found through the root's index, so an argument can never
    become a path outside the root.
    """
    text = str(ident).upper()
    if not _id_like(text):  # not an id: a name (run --name), the newest job with it
        return _resolve_name(root, str(ident))
    if len(text) == 26:
        if is_job_id(text) and _is_job_dir(os.path.join(root, text)):
            return text
        raise AgentExecError("job_not_found", "no job %s in %s" % (text, root))
    try:
        hits = [
            name for name, entry in _iter_jobs(root) if name.startswith(text) and _is_dir(entry)
        ]
    except AgentExecError:  # an unreadable root: it holds no job we can name
        hits = []
    hits.sort()
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


# -- Names and keys: the root's indexes ---------------------------------------------
#
# run --name and run --key are found again through small indexes in the root,
# so that resolving one costs a directory listing and a meta.json or two, not
# a read of every job: <root>/names/<h>/<job id> and <root>/keys/<h>/<job id>
# are empty files, <h> a hash of the name or key (any text becomes a safe file
# name).  The entry is made right after the job directory and before its
# meta.json, so every job with a name or key is in its index; an entry whose
# job directory is gone (deleted, collected) is skipped and removed when met.
# None of these names is a job id, so every walk over the root ignores them.

_INDEX_DIRS = {"name": "names", "key": "keys"}
NAME_MAX = 64
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _id_like(text: str) -> bool:
    """True when ``text`` could name a job as its id or an id prefix.

    resolve_job reads 4 to 26 Crockford characters, case folded, as an id
    or a prefix; a ULID's first character is 0-7, so text that starts with
    another character can never be the prefix of a job id.
    """
    t = text.upper()
    return MIN_PREFIX <= len(t) <= 26 and t[0] <= "7" and _ULID_CHARS.issuperset(t)


def _name_error(name: str) -> "str | None":
    """Why ``name`` cannot be a job name (None when it can)."""
    if not name or len(name) > NAME_MAX:
        return "a job name has 1 to %d characters, got %d" % (NAME_MAX, len(name))
    if not _NAME_CHARS.issuperset(name):
        return "a job name has only letters, digits, '-', '_' and '.', got %r" % _short(name)
    if name[0] == "-":
        return "a job name may not start with '-' (it would read as an option): %r" % name
    if _id_like(name):
        return (
            "%r reads as a job id prefix (4-26 characters of 0-9 A-Z, the first 0-7): "
            "pick a name that no id can start with, e.g. one with a letter first" % name
        )
    return None


def _index_dir(root: str, kind: str, value: str) -> str:
    # zlib, not hashlib: hashlib loads OpenSSL (20-30 ms).  Two values that
    # share a directory are told apart by their meta.json, so 64 bits do.
    import zlib

    data = value.encode("utf-8", "surrogatepass")
    digest = "%08x%08x" % (zlib.crc32(data), zlib.adler32(data))
    return root + "/" + _INDEX_DIRS[kind] + "/" + digest


def _index_job(root: str, job_id: str, spec: dict) -> None:
    """Enter a new job in the name and key indexes (before its meta.json exists)."""
    for kind in _INDEX_DIRS:
        value = spec.get(kind)
        if not value:
            continue
        where = _index_dir(root, kind, value)
        try:
            # makedirs gives its mode to the leaf only: names/ (or keys/)
            # first, private like the root's other directories.
            os.makedirs(os.path.dirname(where), 0o700, exist_ok=True)
            os.makedirs(where, 0o700, exist_ok=True)
            os.close(os.open(where + "/" + job_id, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as e:
            raise AgentExecError("io_error", "cannot index %s %r: %s" % (kind, value, e.strerror))


def _find_indexed(root: str, kind: str, value: str, accept=None) -> "_Job | None":
    """The newest job whose meta.json says ``kind`` is ``value`` (and that
    ``accept`` takes, when given); None when there is none."""
    where = _index_dir(root, kind, value)
    try:
        names = os.listdir(where)
    except OSError:
        return None
    for job_id in sorted(names, reverse=True):
        if not is_job_id(job_id):
            continue
        try:
            job = load_job(root, job_id)
        except AgentExecError:
            if not os.path.lexists(root + "/" + job_id):
                try:  # the job is gone: so is its entry
                    os.unlink(where + "/" + job_id)
                except OSError:
                    pass
            continue  # (or its meta.json is not written yet)
        if job.meta.get(kind) == value and (accept is None or accept(job)):
            return job
    return None


def _resolve_name(root: str, ident: str) -> str:
    """resolve_job for what is not an id: the newest job with that name."""
    if _name_error(ident) is not None:
        raise AgentExecError("job_not_found", "no job %r" % _short(ident))
    job = _find_indexed(root, "name", ident)
    if job is None:
        raise AgentExecError("job_not_found", "no job named %r in %s" % (ident, root))
    return job.id


def resolve_key(root: str, key: str) -> str:
    """status/wait/kill --key KEY: the newest job started with that key, in any state."""
    job = _find_indexed(root, "key", key)
    if job is None:
        raise AgentExecError("job_not_found", "no job with key %r in %s" % (_short(key), root))
    return job.id


# The result fields every answer about a terminal job carries, when known,
# in this order; the schema's RESULT_FIELDS declares the same names.
_RESULT_KEYS = ("exit_code", "signal", "duration_ms")


class _Job:
    """A job as read from disk: meta.json, state.json (its record), and the verdict.

    ``record`` is the state.json document, {} when there is none (or it is
    not ours); ``state`` is the verdict as published ("running", "exited",
    ...); ``failure`` is {code, message} for a failed job, else None.
    """

    __slots__ = ("id", "dir", "meta", "record", "state", "failure")

    def __init__(self, job_id: str, job_dir: str, meta: dict, record, state: str, failure):
        self.id, self.dir, self.meta, self.failure = job_id, job_dir, meta, failure
        self.record = record or {}
        self.state = state

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def path(self, name: str) -> str:
        return self.dir + "/" + name  # concatenation: list builds thousands of these

    def result_fields(self) -> dict:
        """exit_code / signal / duration_ms / finished_at / failure, when known;
        end_reason and success once the job is terminal."""
        out = {}
        if self.state in TERMINAL_STATES:
            result = self.record.get("result") or {}
            for key in _RESULT_KEYS:
                if result.get(key) is not None:
                    out[key] = result[key]
            if self.record.get("finished_at"):
                out["finished_at"] = self.record["finished_at"]
            out["end_reason"] = _end_reason(self.state, self.record, self.failure)
            out["success"] = out["end_reason"] == "exit" and out.get("exit_code") == 0
        if self.failure:
            out["failure"] = self.failure
        return out

    def reload(self) -> "_Job":
        """The same job, read again from disk (its state may have changed)."""
        return load_job(os.path.dirname(self.dir), self.id)

    def head(self) -> dict:
        """What every per-job answer starts with: the id, the state, the result."""
        out = {"job_id": self.id, "state": self.state}
        out.update(self.result_fields())
        return out

    def started_at(self) -> str:
        started = (self.record.get("job") or {}).get("started_at")
        return started or self.meta.get("created_at") or ""

    def log_paths(self) -> dict:
        return {
            "stdout_log_path": os.path.join(self.dir, STDOUT_LOG),
            "stderr_log_path": os.path.join(self.dir, STDERR_LOG),
        }

    def dropped(self) -> dict:
        """Bytes that --max-output gave up, per stream (0 without a cap)."""
        return {
            "stdout_dropped_bytes": self.record.get("stdout_dropped_bytes") or 0,
            "stderr_dropped_bytes": self.record.get("stderr_dropped_bytes") or 0,
        }


def _end_reason(state: str, record: dict, failure: "dict | None") -> str:
    """The end_reason of a terminal job, from its verdict and its state.json.

    A failure decides first (a supervisor found lost overrides whatever the
    record last said); then the supervisor's own word; then, for a record
    written before end_reason existed, what its result shows.
    """
    if failure:
        return _FAILURE_END_REASONS.get(failure.get("code"), "supervisor_lost")
    result = record.get("result") or {}
    if result.get("end_reason") in END_REASONS:
        return result["end_reason"]
    if record.get("timed_out"):
        return "timeout"
    if result.get("exit_code") is None:
        return "signal" if state == "killed" else "supervisor_lost"
    return "kill" if result.get("signal") else "exit"


def load_job(root: str, job_id: str, meta_filter=None) -> "_Job | None":
    """Read a job's meta.json and state.json, and say what its state truly is.

    Returns None when ``meta_filter(meta)`` is false (list's cwd filter,
    checked before state.json is read).  See ``_verdict`` for how the state
    is derived.
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
        record, written = _read_record(job_dir)
        lock_free = False
        if written == "running" and _lock_is_free(fd):
            # The supervisor writes the terminal state and only then lets go
            # of the lock, so read once more before calling it lost.
            lock_free = True
            record, written = _read_record(job_dir)
        boot_id = _read_boot_id() if written == "running" and record is not None else None
    finally:
        os.close(fd)
    state, failure = _verdict(record, written, lock_free, boot_id)
    return _Job(job_id, job_dir, meta, record, state, failure)


def _read_record(job_dir: str) -> "tuple":
    """(state.json as a dict, or None; the state it states)."""
    try:
        record = _read_json(job_dir + "/" + STATE)
    except FileNotFoundError:
        # Created but not started yet: the lock tells whether anyone is on it.
        return None, "running"
    except (OSError, ValueError):
        return None, "unknown"
    job = record.get("job")
    if not isinstance(job, dict) or not all(
        isinstance(record.get(k), (dict, type(None))) for k in ("result", "failure")
    ):
        return None, "unknown"  # not a state.json we wrote: say so, use none of it
    written = job.get("status")
    if written not in STATES:
        written = "unknown"
    return record, written


def _verdict(record: "dict | None", written: str, lock_free: bool, boot_id) -> "tuple":
    """A job's published state and failure, from what its files say: pure.

    ``written`` is the state that state.json states ("running" when there
    is no state.json yet); ``lock_free`` whether nobody held meta.json's
    lock (read again after it was found free); ``boot_id`` the current boot
    (None when unknown or not needed).  A job that says running while
    nobody holds its lock, or that was written before the last boot, is
    failed with failure.code supervisor_lost: its supervisor died without a
    word.
    """
    failure = record.get("failure") if record else None
    if lock_free and (written == "running" or record is None):
        return "failed", _lost_failure(record)
    recorded_boot = record.get("boot_id") if record and written == "running" else None
    if recorded_boot and boot_id and recorded_boot != boot_id:
        return "failed", _lost_failure(record, rebooted=True)
    return written, failure


def _lost_failure(record: "dict | None", rebooted: bool = False) -> dict:
    pid = (record or {}).get("supervisor_pid")
    if rebooted:
        msg = "the machine rebooted while the job was running; its supervisor is gone"
    elif record is None:
        msg = "the job's supervisor exited before the job started"
    else:
        msg = "the job's supervisor (pid %s) is gone and the job's end was not " % pid
        msg += "recorded (the supervisor died, or could not write state.json)"
    return {"code": "supervisor_lost", "message": msg}


def _is_alive(pid, token) -> bool:
    """True when ``pid`` runs and is provably the process recorded with ``token``."""
    return isinstance(pid, int) and pid > 1 and token is not None and _proc_start_time(pid) == token


def _supervisor_alive(job: _Job) -> bool:
    record = job.record
    return _is_alive(record.get("supervisor_pid"), record.get("supervisor_start_time"))


# ==== Logs ===================================================================
#
# Tails, snapshots, cursors and incremental reads of stdout.log and
# stderr.log.  A cursor names a position in each stream, counted in bytes
# from the very start of the workload's output, bytes that --max-output
# dropped included, so a cursor stays valid while a capped log is compacted
# under it.

_STREAMS = ("stdout", "stderr")
_CURSOR_PREFIX = "c1."
_HEX = frozenset("0123456789abcdef")
# How often a long-poll looks at the logs for new bytes (the end of the job
# wakes it at once, through the lock).
READ_POLL_S = 0.02


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


def _utf8_width(lead: int) -> int:
    """How many bytes the UTF-8 sequence that starts with byte ``lead`` takes."""
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _complete_lines(buf: bytes, final: bool, longest: int) -> int:
    """Where the complete lines of ``buf`` end: after its last newline.

    At the end of the stream (``final``) everything counts; and a line
    longer than ``longest`` is taken as it is, so an endless line is still
    looked at.
    """
    cut = len(buf) if final else buf.rfind(b"\n") + 1
    return len(buf) if len(buf) - cut > longest else cut


def take_snapshot(job: _Job, tail_lines: int, max_bytes: int) -> "tuple":
    """(the snapshot object of the answers, a cursor just past what it saw)."""
    out = {}
    truncated = False
    ends = []
    for stream, name in zip(_STREAMS, (STDOUT_LOG, STDERR_LOG)):
        data, observed, cut = tail_bytes(job.path(name), tail_lines, max_bytes)
        text = _decode(data)
        out[stream + "_tail"] = text
        out[stream + "_observed_bytes"] = observed
        out[stream + "_included_bytes"] = len(text.encode("utf-8"))
        truncated = truncated or cut
        ends.append((job.record.get(stream + "_dropped_bytes") or 0) + observed)
    out["truncated"] = truncated
    out["encoding"] = "utf-8-lossy"
    return out, make_cursor(ends[0], ends[1])


def make_cursor(stdout_pos: int, stderr_pos: int) -> str:
    return "%s%x.%x" % (_CURSOR_PREFIX, stdout_pos, stderr_pos)


def parse_cursor(text: str) -> "tuple":
    """``c1.<hex>.<hex>`` -> (stdout_pos, stderr_pos); ValueError otherwise."""
    s = str(text)
    parts = s[len(_CURSOR_PREFIX) :].split(".") if s.startswith(_CURSOR_PREFIX) else []
    if len(parts) != 2 or not all(p and len(p) <= 16 and set(p) <= _HEX for p in parts):
        raise ValueError("invalid cursor %r (pass back a cursor agent-exec gave you)" % _short(s))
    return int(parts[0], 16), int(parts[1], 16)


def _log_stats(job: _Job) -> list:
    """os.stat of stdout.log and stderr.log (None where missing): one stat per log.

    Sizes (for cursors), inodes (to see a compaction) and the time of the
    last write (status) all come from here.
    """
    out = []
    for name in (STDOUT_LOG, STDERR_LOG):
        try:
            out.append(os.stat(job.path(name)))
        except OSError:
            out.append(None)
    return out


def _log_sizes(job: _Job) -> list:
    """(size, inode) of each log, to see them change (see _wait_output)."""
    return [None if st is None else (st.st_size, st.st_ino) for st in _log_stats(job)]


def _attempt_cursor(job: _Job, cursor: "tuple | None") -> "tuple":
    """((stdout_pos, stderr_pos), reset) to read from, for a cursor given by the caller.

    A cursor past the end of a log (more than the bytes written to that
    stream in this attempt, dropped ones counted) came from an earlier
    attempt (before a restart): it reads this attempt from its start, and
    reset says so (the answer's cursor_reset).  No cursor: the start.

    Only after a restart (attempt 2 and up): before one, no cursor can be of
    another attempt, and a log that --max-output has just compacted can look
    shorter than it is until state.json counts the dropped bytes; for the
    same reason a cursor past the end is looked at again with a fresh
    state.json before it is reset.  Otherwise the cursor is read as given
    (past the end: nothing new yet).
    """
    if cursor is None:
        return (0, 0), False
    if _attempt_of(job) < 2 or not _past_logs_end(job, cursor):
        return tuple(cursor), False
    try:
        job = job.reload()
    except AgentExecError:
        return tuple(cursor), False
    if not _past_logs_end(job, cursor):
        return tuple(cursor), False
    return (0, 0), True


def _past_logs_end(job: _Job, cursor: tuple) -> bool:
    dropped = job.dropped()
    for stream, pos, st in zip(_STREAMS, cursor, _log_stats(job)):
        if pos > dropped[stream + "_dropped_bytes"] + (st.st_size if st is not None else 0):
            return True
    return False


def job_cursor(job: _Job) -> str:
    """A cursor just past everything the logs hold right now."""
    dropped = job.dropped()
    ends = [
        dropped[stream + "_dropped_bytes"] + (st.st_size if st is not None else 0)
        for stream, st in zip(_STREAMS, _log_stats(job))
    ]
    return make_cursor(ends[0], ends[1])


def _utf8_cut(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that ends on a character boundary."""
    n = len(data)
    for i in range(1, min(4, n) + 1):
        b = data[n - i]
        if b < 0x80:
            return n  # ASCII: complete
        if b >= 0xC0:  # a lead byte: is its sequence complete?
            return n if i >= _utf8_width(b) else n - i
    return n  # only continuation bytes: invalid anyway, keep them


def read_span(job: _Job, stream: str, pos: int, max_bytes: int, final: bool) -> "tuple":
    """Bytes of one stream from absolute position ``pos``, at most ``max_bytes``.

    Never ends inside a multi-byte character, unless the job is over and
    the file ends there (``final``).  Returns (data, new_pos, more).
    """
    dropped = job.record.get(stream + "_dropped_bytes") or 0
    try:
        fd = os.open(job.path(stream + ".log"), os.O_RDONLY)
    except OSError:
        return b"", pos, False
    try:
        size = os.fstat(fd).st_size
        off = min(max(0, pos - dropped), size)  # bytes before `dropped` are gone
        data = os.pread(fd, min(max_bytes, size - off), off) if off < size else b""
        end = _utf8_cut(data)
        if end < len(data) and not (final and off + len(data) == size):
            if end == 0:  # one character wider than max_bytes: give it whole
                need = _utf8_width(data[0])
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
    return _send_control_line(job_dir, line)


def _send_control_line(job_dir: str, line: bytes) -> bool:
    """One write(2) of one whole line to the control FIFO (see _send_control)."""
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


def _ask_supervisor(job_dir: str, msg: dict, timeout: float) -> "dict | None":
    """Send ``msg`` and wait for the supervisor's answer; None if none came.

    The answer comes through a FIFO of the caller's own in the job
    directory, named in the message as ``reply``: the control FIFO carries
    requests only, and a FIFO of one's own cannot mix two callers' answers.
    """
    import select

    path = os.path.join(job_dir, ".reply-%d-%s" % (os.getpid(), os.urandom(4).hex()))
    try:
        os.mkfifo(path, 0o600)
    except OSError as e:
        raise AgentExecError("io_error", "cannot create %s: %s" % (path, e.strerror or e))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open succeeds
        try:
            if not _send_control(job_dir, dict(msg, reply=path)):
                return None
            data = b""
            deadline = time.monotonic() + timeout
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return None
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk and data:
                    break
                data += chunk
                if not chunk:
                    time.sleep(0.005)  # no writer yet: EOF until it opens
        finally:
            os.close(fd)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    try:
        answer = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _reply(job_dir: str, path: "str | None", answer: dict) -> None:
    """The supervisor's side of _ask_supervisor: one JSON line to ``path``
    (only a reply FIFO in this job's own directory)."""
    if not isinstance(path, str) or os.path.dirname(path) != job_dir:
        return
    if not os.path.basename(path).startswith(".reply-"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: the caller gave up
    except OSError:
        return
    try:
        _write_all(fd, (json.dumps(answer) + "\n").encode())
    except OSError:
        pass
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
# enforces the timeout, the lease and the limits on the whole process tree,
# listens on the control FIFO for `kill`, `send` and `renew`, reaps every
# child (on Linux it is a child subreaper, so orphaned descendants come back
# to it), writes the terminal state exactly once, lets
# go of the job lock (waking every waiter), delivers the completion events and
# then lives on only while descendants still hold the pipes or still run.
#
# It is built of parts around one small loop, and the parts talk through plain
# method calls.  What goes into state.json is one shared record, _JobFacts, so
# no part reaches into another's attributes:
#
#   _spawn_workload  fork and exec the workload, as a _ChildSetup prepared first
#   _Capture         the output: logs, --mask, full.log rows, --ready-match
#   _Input           the job's stdin pipe for `send` (--stdin-open)
#   _ProcessTree     subreaper, reaping, whole-tree kills
#   _StateWriter     state.json (built by _state_document) and the disk reserve
#   _Notifier        the completion event and its sinks
#   _Timers          named deadlines; the loop sleeps until the first
#   _Supervisor      the loop, its timer and control-verb tables, the end
#
# `run` starts it through _launch_supervisor (at the end of this section).

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
        "sent_signals",
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
        "stdin_target",
        # Lifecycle and guards (leases, limits, attempts).
        "end_cause",
        "limit",
        "lease_ms",
        "lease_expires_at",
        "memory_peak",
        "cpu_ms",
        "attempt",
    )

    def __init__(self) -> None:
        self.pid = None  # type: int | None  (the workload; also its pgid)
        self.pid_start = None  # type: str | None  (its _proc_start_time token)
        self.wait_status = None  # type: int | None  (raw, from wait4)
        self.rusage = None
        # The last signal that `kill` or a timeout asked for to end the job;
        # every signal `kill` sent (USR1 too), to tell a kill from a signal.
        self.kill_signal = None  # type: int | None
        self.sent_signals = set()  # type: set
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
        # The job's stdin as /proc/<pid>/fd names it: the --stdin-open pipe
        # ("pipe:[ino]") or the --pty terminal ("/dev/pts/N"); "" otherwise.
        # waiting_for_input looks for a process blocked reading just that.
        self.stdin_target = ""  # type: str
        # The end_reason a lease or a limit chose when it ended the job, and
        # the limit's {name, value, measured}; the lease and the measures.
        self.end_cause = None  # type: str | None
        self.limit = None  # type: dict | None
        self.lease_ms = None  # type: int | None
        self.lease_expires_at = None  # type: str | None
        self.memory_peak = None  # type: int | None  (bytes, the tree's summed RSS)
        self.cpu_ms = None  # type: int | None
        self.attempt = 1


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
    result = {"exit_code": None, "signal": None, "duration_ms": None, "end_reason": None}
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
        result["end_reason"] = _end_reason_of(facts)
        finished_at = now
    elif state == "failed":
        result["duration_ms"] = 0
        result["end_reason"] = _FAILURE_END_REASONS.get((failure or {}).get("code"))
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
        # The control FIFO speaks framed JSON messages (see Control protocol).
        "control_protocol": 1 if facts.supervisor_pid else None,
    }
    for key in _OUTPUT_COUNTS:
        doc[key] = counts.get(key, 0) if counts else 0
    doc["ready"] = facts.ready
    doc["ready_at"] = facts.ready_at
    doc["stdin_target"] = facts.stdin_target
    if facts.rusage is not None:
        ru = facts.rusage
        rss = ru.ru_maxrss if _IS_LINUX else ru.ru_maxrss // 1024  # macOS counts bytes
        doc["rusage"] = {
            "max_rss_kb": int(rss),
            "user_ms": int(ru.ru_utime * 1000),
            "sys_ms": int(ru.ru_stime * 1000),
        }
    # Lifecycle and guards: present only when the job uses them.
    if facts.attempt != 1:
        doc["attempt"] = facts.attempt
    if facts.lease_ms:
        doc["lease_ms"] = facts.lease_ms
        doc["lease_expires_at"] = facts.lease_expires_at
    if facts.memory_peak is not None:
        doc["memory_peak_bytes"] = facts.memory_peak
    if facts.cpu_ms is not None:
        doc["cpu_ms"] = facts.cpu_ms
    if facts.limit is not None:
        doc["limit"] = facts.limit
    return doc


def _end_reason_of(facts: "_JobFacts") -> str:
    """Why a job whose main process has been reaped ended (see END_REASONS)."""
    if facts.end_cause is not None:  # a lease or a limit ended it
        return facts.end_cause
    if facts.timed_out:
        return "timeout"
    if os.WIFSIGNALED(facts.wait_status):
        return "kill" if os.WTERMSIG(facts.wait_status) in facts.sent_signals else "signal"
    return "kill" if facts.kill_signal is not None else "exit"


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

    __slots__ = (
        "path",
        "argv",
        "env",
        "cwd",
        "stdin",
        "stdout",
        "stderr",
        "default_signals",
        "tiocsctty",
        "rlimits",
        "nice",
        "setrlimit",
    )

    def __init__(
        self,
        argv: list,
        env: dict,
        cwd: str,
        stdout: int,
        stderr: int,
        stdin=None,
        pty=False,
        rlimits: "list | None" = None,
        nice: "int | None" = None,
    ) -> None:
        import signal

        # run --pty: fds 0-2 are a terminal's slave side, which the child makes
        # its controlling terminal with this ioctl (the request number, found
        # before the fork); None otherwise.
        self.tiocsctty = None  # type: int | None
        if pty:
            import termios

            self.tiocsctty = termios.TIOCSCTTY
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.stdin = stdin  # what becomes fd 0: a file's path, a pipe's fd, None (/dev/null)
        self.stdout = stdout  # the fds that become 1 and 2
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
        # --limit-files, --limit-procs: (resource, (soft, hard)) pairs, and
        # setrlimit itself, looked up here so the child only calls it.
        self.rlimits = rlimits or []
        self.setrlimit = None
        if self.rlimits:
            import resource

            self.setrlimit = resource.setrlimit
        self.nice = nice  # --nice: the increment for os.nice in the child


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
    # fd 0: the job's stdin file, else /dev/null (read-write, as it always was)
    if isinstance(setup.stdin, int):
        null = os.dup(setup.stdin)  # the --stdin-open pipe (closed below like the others)
    elif setup.stdin:
        null = os.open(setup.stdin, os.O_RDONLY)
    else:
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
        if setup.tiocsctty is not None:
            # A session leader without a controlling terminal takes the one
            # on fd 0: its group becomes the terminal's foreground group, so
            # ctrl-c typed there reaches it as SIGINT.
            fcntl.ioctl(0, setup.tiocsctty, 0)
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
        for res, pair in setup.rlimits:
            setup.setrlimit(res, pair)
        if setup.nice:
            os.nice(setup.nice)
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
        self.pty = None  # type: _Terminal | None  (run --pty: stdout is its master side)
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
            # A terminal's master fails with EIO once no process holds the
            # slave side: that is its end of file, not an error.
            if not (self.pty is not None and e.errno == _EIO):
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
        if self.pty is not None and s.name == "stdout":
            self.pty.watch(data)
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
        cut = _complete_lines(buf, final, FULL_LOG_ROW_MAX)
        lines, s.ready_buf = buf[:cut], buf[cut:]
        if lines:
            text = lines.decode("utf-8", "replace")
            if "\r\n" in text:  # a terminal's line ends: $ must match before them
                text = _CR_LF_RE.sub("\n", text)
            if self.ready_re.search(text):
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


# ---- Input (run --stdin-open) ---------------------------------------------------

# What `send` may have waiting for a workload that does not read, at most.
STDIN_BUFFER_MAX = 1 << 20


class _Input:
    """The workload's stdin pipe, kept open for `send` (run --stdin-open).

    The supervisor holds the writing end, non-blocking: what `send` gives is
    buffered (up to STDIN_BUFFER_MAX) and written as the workload reads, so
    neither `send` nor the loop ever blocks on a workload that does not read.
    """

    def __init__(self, terminal_fd: "int | None" = None) -> None:
        if terminal_fd is None:
            self.read_fd, self.fd = os.pipe()  # both close-on-exec; the child dup2s read_fd
        else:  # run --pty: typing is writing to the terminal's master side
            self.read_fd, self.fd = None, os.dup(terminal_fd)
        os.set_blocking(self.fd, False)
        self.buffer = bytearray()
        self.eof = False  # close once the buffer is written
        self.closed = False
        self.lost = 0  # bytes given up when a write failed
        self.lost_why = ""

    def after_spawn(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def accept(self, data: bytes, eof: bool) -> dict:
        if self.closed or self.eof:
            return {"ok": False, "code": "invalid_state", "message": "the job's stdin is closed"}
        if len(self.buffer) + len(data) > STDIN_BUFFER_MAX:
            return {
                "ok": False,
                "code": "input_full",
                "message": "the job has not read %d bytes sent earlier; %d more do not fit "
                "(at most %d wait): send again later"
                % (len(self.buffer), len(data), STDIN_BUFFER_MAX),
            }
        self.buffer += data
        self.eof = eof
        lost = self.lost
        self.write()
        if self.lost > lost:
            return {
                "ok": False,
                "code": "invalid_state",
                "message": "the job's stdin is closed (%s): %d bytes were not delivered"
                % (self.lost_why, self.lost - lost),
            }
        return {"ok": True, "accepted_bytes": len(data), "buffered_bytes": len(self.buffer)}

    def wants_write(self) -> bool:
        return not self.closed and bool(self.buffer)

    def write(self) -> None:
        """Write what the pipe takes now; close it once asked and all is written."""
        while self.buffer and not self.closed:
            try:
                n = os.write(self.fd, self.buffer)
            except BlockingIOError:
                return
            except OSError as e:  # EPIPE: the workload closed its stdin; EIO: hung up
                self.lost += len(self.buffer)
                self.lost_why = e.strerror or str(e)
                self.buffer.clear()
                self.close()
                return
            del self.buffer[:n]
        if self.eof and not self.buffer:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


# ---- The terminal (run --pty) -------------------------------------------------

# The cursor keys and Home/End as a terminal sends them in the application
# mode a program asks for with ESC [ ? 1 h (less, vim and curses programs do).
_APP_CURSOR_KEYS = tuple((b"\x1b[" + k, b"\x1bO" + k) for k in (b"A", b"B", b"C", b"D", b"H", b"F"))


# CSI ? Pm h / CSI ? Pm l: a program sets or resets private modes.
_PRIVATE_MODE_RE = _LazyRegex(lambda: _compile(b"\x1b\\[\\?([0-9;]*)([hl])"))


class _Terminal:
    """The pseudo-terminal of a run --pty job.

    Its master side is read as the job's stdout (by _Capture) and written
    by `send` (through _Input); the slave side becomes the workload's
    controlling terminal and is closed here once the workload has it, so
    that reading the master fails with EIO when the last process holding
    the terminal is gone: the terminal's EOF.  The size is set on the
    master; the kernel then sends SIGWINCH to the foreground group.
    """

    def __init__(self, job_dir: str, cols: int, rows: int) -> None:
        self.job_dir = job_dir
        self.master, self.slave = os.openpty()  # both close-on-exec (PEP 446)
        try:
            # Our own copy of the master for resizing: the capture closes its
            # fd at the terminal's EOF, and its number may then be reused.
            self.ctl = os.dup(self.master)
            self.cols, self.rows = cols, rows
            self.set_size(cols, rows)
            os.set_blocking(self.master, False)
        except BaseException:
            os.close(self.master)
            os.close(self.slave)
            raise
        # Whether the program asked for application cursor keys (DECCKM):
        # `send --keys up` must then type ESC O A rather than ESC [ A.
        self.app_cursor = False
        self.mode_carry = b""  # a mode sequence cut by the end of a read

    def slave_name(self) -> "str | None":
        """The slave's name as /proc/<pid>/fd shows it; None when it has none
        (a devpts of another mount, as in some sandboxes)."""
        try:
            return os.readlink("/proc/self/fd/%d" % self.slave)
        except OSError:
            pass
        try:
            return os.ttyname(self.slave)
        except OSError:
            return None

    def close(self) -> None:
        if self.ctl is not None:
            os.close(self.ctl)
            self.ctl = None

    def set_size(self, cols: int, rows: int) -> None:
        import struct
        import termios

        if self.ctl is None:
            raise OSError(_EIO, "the terminal is closed")
        fcntl.ioctl(self.ctl, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.cols, self.rows = cols, rows

    def resize(self, cols: int, rows: int, at: int) -> None:
        """send --size: resize, and note where in stdout the new size starts (for screen)."""
        self.set_size(cols, rows)
        line = json.dumps({"at": at, "cols": cols, "rows": rows}) + "\n"
        try:
            fd = os.open(
                os.path.join(self.job_dir, RESIZE_LOG),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o600,
            )
            try:
                _write_all(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as e:
            _log(1, "cannot record the resize: %s" % e)

    def watch(self, data: bytes) -> None:
        """Follow the program's cursor-key mode (DECSET/DECRST 1) in what it writes."""
        if self.mode_carry:
            data = self.mode_carry + data
            self.mode_carry = b""
        if b"\x1b[?" not in data:
            return
        for params, final in _PRIVATE_MODE_RE.findall(data):
            if b"1" in params.split(b";"):
                self.app_cursor = final == b"h"
        tail = data.rfind(b"\x1b", max(0, len(data) - 16))
        if tail >= 0 and _PRIVATE_MODE_RE.match(data, tail) is None:
            self.mode_carry = data[tail:]  # perhaps the start of one: kept for the next read

    def keys(self, data: bytes) -> bytes:
        """Typed keys as the program's current cursor-key mode wants them."""
        if self.app_cursor:
            for normal, app in _APP_CURSOR_KEYS:
                data = data.replace(normal, app)
        return data


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
        # --limit-cpu: the CPU seconds of the job's processes reaped here
        # (each one's rusage includes the children it reaped itself).
        self.reaped_cpu_s = 0.0

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
                pid, wait_status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            except InterruptedError:
                continue
            if pid == 0:
                return True
            if pid != self.hook_pid:
                self.reaped_cpu_s += rusage.ru_utime + rusage.ru_stime
            if pid == facts.pid and facts.wait_status is None:
                facts.wait_status = wait_status
                facts.rusage = rusage
                facts.ended_mono = time.monotonic()
            elif pid == self.hook_pid:
                self.hook_status = wait_status

    def watch_hook(self, pid: "int | None") -> None:
        """Record the notify command's exit status from now on (None: stop)."""
        self.hook_pid = pid
        self.hook_status = None

    def hook_exit(self) -> "int | None":
        """The watched notify command's wait status, once reaped."""
        return self.hook_status

    def kill_tree(self, sig: int) -> None:
        """Send ``sig`` once to every process of the job.

        The workload's group gets one killpg(); each live descendant outside
        that group (one that called setsid or setpgid) gets one kill().  A
        descendant still in the group is skipped: killpg already reached it,
        and a second delivery would count twice in a trap.  Safe against pid
        reuse: the workload is our child, so its pid (and so its group id)
        cannot be recycled until we reap it; the other targets are found as
        live descendants of this very process.  A SIGKILL is repeated for
        those forked meanwhile, until no descendant is left.
        """
        facts = self.facts
        rounds = _KILL_ROUNDS if sig == _SIGKILL else 1
        for i in range(rounds):
            group = facts.pid if facts.pid and facts.wait_status is None else None
            if group is not None:
                try:
                    os.killpg(group, sig)
                except OSError:
                    group = None
            exclude = {self.hook_pid} if self.hook_pid else set()
            targets = _descendants_of(os.getpid(), exclude)
            for pid in targets:
                try:
                    if group is None or os.getpgid(pid) != group:
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
        payload = _to_json(event)
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
        event["end_reason"] = _end_reason(event["state"], doc, doc.get("failure"))
        event["success"] = event["end_reason"] == "exit" and result["exit_code"] == 0
        if doc.get("failure"):
            event["failure"] = doc["failure"]
        if doc.get("limit"):
            event["limit"] = doc["limit"]  # which limit ended the job, its value, the measure
        # Which attempt ended (2 and up after restarts): the job id is the same.
        attempt = doc.get("attempt") or self.cfg.get("attempt") or 1
        event["attempt"] = attempt if isinstance(attempt, int) else 1
        return event

    def _run_command(self, argv: list, payload: str, event_path: str) -> dict:
        """Run the command sink with the event on stdin; its delivery result."""
        res = {"sink_type": "command", "target": _to_json(argv), "success": False}
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
            "lease": self._on_lease,
            "sample": self._on_sample,
            "auto_gc": self._on_auto_gc,
        }
        self.on_control = {
            "kill": self._on_kill,
            "send": self._on_send,
            "resize": self._on_resize,
            "renew": self._on_renew,
        }
        facts.attempt = cfg.get("attempt") or 1
        self.last_sample_write = 0.0  # monotonic time the sampler last wrote state.json
        # run --pty: the terminal, whose master side is both the output read
        # as stdout and the input `send` types into.
        # Made in _start, so that a failure (no pty left) is the job's spawn_failed.
        self.pty = None  # type: _Terminal | None
        self.input = None  # type: _Input | None
        if not cfg.get("pty") and cfg.get("stdin_open"):
            self.input = _Input()
        self.terminal = False  # the terminal state is written
        self.final_doc = None  # type: dict | None  (that state, for the events)
        self.wake_r = None  # type: int | None  (readable after a SIGCHLD)
        self.control_fd = None  # type: int | None
        self.control_carry = b""  # an unfinished control line
        self.ready_lock_fd = None  # type: int | None  (holds ready.lock until ready)

    # -- start -------------------------------------------------------------

    def run(self, handshake_fd: int) -> int:
        """Start the workload, answer `run` on ``handshake_fd``, serve the job; the exit code."""
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
            self.ready_lock_fd = _open_locked(os.path.join(self.job_dir, READY_LOCK))
        try:
            self._start()
        except Exception as e:  # OSError from exec; ValueError, SubprocessError
            reason = getattr(e, "strerror", None) or e
            msg = "cannot start %s: %s" % (_short(self.cfg["argv"][0]), reason)
            self._on_auto_gc()  # before the terminal state, as in _finish
            self._write_failed("spawn_failed", msg)
            _send_ready(handshake_fd, {"ok": True})
            self._after_terminal()
            return 0
        self.state_writer.write()
        _send_ready(handshake_fd, {"ok": True})
        self._loop()
        return 0

    def _start(self) -> None:
        """Open the logs, start the workload on two pipes (or a terminal), set the timers."""
        cfg = self.cfg
        facts = self.facts
        self.capture.open_logs()
        if cfg.get("pty"):
            self.pty = _Terminal(self.job_dir, cfg["pty"]["cols"], cfg["pty"]["rows"])
            self.capture.pty = self.pty
            self.input = _Input(self.pty.master)
        term = self.pty
        if term is not None:
            # A terminal merges the two streams: the workload's 0, 1 and 2 are
            # all its slave side, and what it writes is read from the master
            # as stdout.  The stderr pipe stays unused (its write end is
            # closed below, so stderr.log ends empty at once).
            out_r, out_w = term.master, term.slave
        else:
            out_r, out_w = _output_pipe()
        try:
            err_r, err_w = _output_pipe()
        except BaseException:
            os.close(out_r)
            os.close(out_w)
            raise
        try:
            if term is not None:
                facts.stdin_target = term.slave_name()  # None: any terminal will do
                stdio = (out_w, out_w, out_w)
            else:
                if self.input is not None:
                    facts.stdin_target = "pipe:[%d]" % os.fstat(self.input.read_fd).st_ino
                stdin = self.input.read_fd if self.input is not None else cfg.get("stdin_path")
                stdio = (out_w, err_w, stdin)
            setup = _ChildSetup(
                cfg["argv"],
                cfg["env"],
                cfg["cwd"],
                *stdio,
                pty=term is not None,
                rlimits=_child_rlimits(cfg),
                nice=cfg.get("nice"),
            )
            facts.pid = _spawn_workload(setup)
        except BaseException:
            for fd in {out_r, out_w, err_r, err_w}:
                os.close(fd)
            raise
        finally:
            facts.started_mono = time.monotonic()
            facts.started_at = _now()
        os.close(out_w)
        os.close(err_w)
        if term is not None:
            term.slave = None  # closed just now, as out_w
        if self.input is not None:
            self.input.after_spawn()
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
        self._start_guards()
        if cfg.get("auto_gc_after_ms"):
            self.timers.start("auto_gc", AUTO_GC_DELAY_S)

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
        writing = False  # the --stdin-open pipe is registered for POLLOUT
        while True:
            if self.input is not None and self.input.wants_write() != writing:
                writing = not writing
                if writing:
                    poller.register(self.input.fd, select.POLLOUT)
                else:
                    poller.unregister(self.input.fd)
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
                elif self.input is not None and fd == self.input.fd:
                    self.input.write()
                    if self.input.closed:
                        writing = False
                        poller.unregister(fd)
                elif not self.capture.read(streams[fd]):
                    poller.unregister(fd)
            for name in timers.pop_expired():
                self.on_timer[name]()
            if self.output_kill:
                self._check_output_limit()
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
        """--ready-port: try to connect; again in READY_PROBE_S until it works.

        A connection alone could reach another process that holds the port
        (the job itself may be failing with "address in use"): on Linux the
        job is ready only once a process of its own tree listens there.
        """
        if _probe_port(self.ready_port) and self._tree_listens(self.ready_port):
            self._mark_ready()
        else:
            self.timers.start("probe", READY_PROBE_S)

    def _tree_listens(self, port: int) -> bool:
        by_inode = _listen_table()
        if by_inode is None:
            return True  # cannot tell (no /proc/net): the connection has to do
        inodes = {i for i, p in by_inode.items() if p == port}
        tree = _descendants_of(os.getpid(), {self.tree.hook_pid} if self.tree.hook_pid else None)
        return any(inodes.intersection(_socket_inodes(pid)) for pid in tree)

    def _on_auto_gc(self) -> None:
        """One step of the root's automatic clean-up (see _auto_gc), once per job:
        here, off run's path, so that it never delays run's answer."""
        after_ms = self.cfg.pop("auto_gc_after_ms", None)
        if after_ms:
            self.timers.cancel("auto_gc")
            _auto_gc(os.path.dirname(self.job_dir), after_ms)

    def _on_flush(self) -> None:
        """A partial line has been quiet for PARTIAL_FLUSH_S: give it its row."""
        self.capture.flush_partials(time.monotonic())

    # -- lifecycle and guards: leases, limits -------------------------------
    #
    # A lease is a timer that `renew` moves (a control verb: the supervisor
    # sleeps in poll(2), so a message wakes it at once and the deadline moves
    # exactly, with no file to re-read on a schedule).  The /proc limits are
    # one sampler timer, every SAMPLE_S.  Whatever ends the job goes through
    # _end_by: TERM the tree, then KILL after --kill-after, as a timeout does.

    def _start_guards(self) -> None:
        cfg = self.cfg
        facts = self.facts
        lease_ms = cfg.get("lease_ms") or 0
        if lease_ms > 0:
            facts.lease_ms = lease_ms
            self._set_lease(lease_ms)
        if cfg.get("limit_mem") or cfg.get("limit_cpu_ms") or cfg.get("limit_procs"):
            if _IS_LINUX:
                self.timers.start_at("sample", facts.started_mono)

    def _set_lease(self, ms: int) -> None:
        self.timers.start("lease", ms / 1000.0)
        self.facts.lease_expires_at = _rfc3339(time.time() + ms / 1000.0)

    def _on_lease(self) -> None:
        """The lease ran out without a renewal: end the job."""
        self._end_by("lease_expired", None)

    def _on_renew(self, msg: dict) -> None:
        """{"verb": "renew", "lease_ms": n, "reply": fifo}: extend the lease from now."""
        ms = msg.get("lease_ms")
        if self.terminal or self.facts.wait_status is not None or self.facts.end_cause:
            answer = {"ok": False, "code": "invalid_state", "message": "the job has ended"}
        elif not self.facts.lease_ms:
            answer = {"ok": False, "code": "invalid_state", "message": "the job has no lease"}
        elif type(ms) is not int or ms <= 0:
            answer = {"ok": False, "code": "invalid_argument", "message": "bad lease %r" % (ms,)}
        else:
            self._set_lease(ms)
            self.state_writer.write(quiet=True)
            answer = {"ok": True, "lease_expires_at": self.facts.lease_expires_at}
        _reply(self.job_dir, msg.get("reply"), answer)

    def _on_sample(self) -> None:
        """--limit-mem, --limit-cpu, --limit-procs: measure the tree, end it past a limit."""
        if self.facts.wait_status is not None or self.facts.end_cause:
            return
        cfg = self.cfg
        facts = self.facts
        pids = _tree_pids(os.getpid(), {self.tree.hook_pid} if self.tree.hook_pid else set())
        rss, cpu_s, count = _tree_usage(pids)
        cpu_ms = int((cpu_s + self.tree.reaped_cpu_s) * 1000)
        grew = facts.memory_peak is None or rss > facts.memory_peak
        if cfg.get("limit_mem"):
            facts.memory_peak = max(rss, facts.memory_peak or 0)
        if cfg.get("limit_cpu_ms"):
            facts.cpu_ms = cpu_ms
        limit_mem = cfg.get("limit_mem") or 0
        limit_cpu = cfg.get("limit_cpu_ms") or 0
        limit_procs = cfg.get("limit_procs") or 0
        if limit_mem and rss > limit_mem:
            self._end_by("memory_limit", {"name": "memory", "value": limit_mem, "measured": rss})
        elif limit_cpu and cpu_ms > limit_cpu:
            self._end_by("cpu_limit", {"name": "cpu", "value": limit_cpu, "measured": cpu_ms})
        elif limit_procs and count > limit_procs:
            self._end_by("procs_limit", {"name": "procs", "value": limit_procs, "measured": count})
        else:
            self.timers.start("sample", SAMPLE_S)
            # Readers see the peak and the CPU time while the job runs, at
            # most once a second (a write per sample would cost more).
            now = time.monotonic()
            if (grew or limit_cpu) and now - self.last_sample_write >= 1.0:
                self.last_sample_write = now
                self.state_writer.write(quiet=True)

    @property
    def output_kill(self) -> bool:
        return bool(self.cfg.get("max_output_action") == "kill" and self.capture.cap)

    def _check_output_limit(self) -> None:
        """--max-output SIZE --max-output-action kill: end the job past SIZE on a stream."""
        if self.facts.wait_status is not None or self.facts.end_cause:
            return
        cap = self.capture.cap
        written = max((s.total for s in self.capture.streams), default=0)
        if written > cap:
            self._end_by("output_limit", {"name": "output", "value": cap, "measured": written})

    def _end_by(self, reason: str, limit: "dict | None") -> None:
        """A lease or a limit ends the job: TERM the tree, then KILL after --kill-after."""
        facts = self.facts
        if facts.wait_status is not None or facts.end_cause or facts.timed_out:
            return  # already ending, for this reason or its --timeout
        facts.end_cause = reason
        facts.limit = limit
        facts.kill_signal = _SIGTERM
        self.timers.cancel("lease")
        self.timers.cancel("sample")
        self.state_writer.write(quiet=True)
        self.tree.kill_tree(_SIGTERM)
        kill_after = self.cfg.get("kill_after_ms") or 0
        if kill_after <= 0:
            self.tree.kill_tree(_SIGKILL)
        else:
            self.timers.start("kill_after", kill_after / 1000.0)

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
            self.facts.sent_signals.add(sig)
            if signal_name(sig)[3:] not in _NON_ENDING_SIGNALS:
                self.facts.kill_signal = sig
        self.tree.kill_tree(sig)

    def _on_send(self, msg: dict) -> None:
        """{"verb": "send", "file": path, "eof": bool, "reply": fifo}: input for stdin.

        The bytes come in a file that `send` wrote (so a message is always
        small enough for one atomic write to the FIFO); it is removed here.
        """
        data = b""
        path = msg.get("file")
        if isinstance(path, str) and os.path.dirname(path) == self.job_dir:
            try:
                with open(path, "rb") as f:
                    data = f.read(STDIN_BUFFER_MAX + 1)
            except OSError:
                pass
            try:
                os.unlink(path)
            except OSError:
                pass
        eof = bool(msg.get("eof"))
        if self.pty is not None:
            # Typing on a terminal: the keys as the program's mode wants them,
            # and an end of file is the terminal's EOF character (ctrl-d),
            # which the program reads as one at the start of a line.  The
            # terminal itself stays open: closing it would hang the job up.
            if msg.get("keys"):
                self.capture.drain_available()  # a mode switch not read yet counts
                data = self.pty.keys(data)
            if eof:
                # A ctrl-d after text with no newline only ends that text's
                # read(); a second one, now at the start of a line, is the EOF.
                data += b"\x04\x04" if data and not data.endswith((b"\n", b"\r")) else b"\x04"
            eof = False
        if self.input is None:
            answer = {"ok": False, "code": "invalid_state", "message": "no open stdin"}
        elif self.terminal or self.facts.wait_status is not None:
            answer = {"ok": False, "code": "invalid_state", "message": "the job has ended"}
        else:
            answer = self.input.accept(data, eof)
        _reply(self.job_dir, msg.get("reply"), answer)

    def _on_resize(self, msg: dict) -> None:
        """{"verb": "resize", "cols": c, "rows": r, "reply": fifo}: send --size."""
        cols, rows = msg.get("cols"), msg.get("rows")
        if self.pty is None:
            answer = {"ok": False, "code": "invalid_state", "message": "the job has no terminal"}
        elif self.terminal or self.facts.wait_status is not None:
            answer = {"ok": False, "code": "invalid_state", "message": "the job has ended"}
        elif not (
            type(cols) is int
            and type(rows) is int
            and 0 < cols <= TERM_MAX_COLS
            and 0 < rows <= TERM_MAX_ROWS
        ):
            answer = {"ok": False, "code": "invalid_argument", "message": "bad size"}
        else:
            # Output written before the resize belongs to the old size: take
            # it in first, so the recorded position divides the two.
            self.capture.drain_available()
            stdout = self.capture.streams[0] if self.capture.streams else None
            try:
                self.pty.resize(cols, rows, stdout.total if stdout else 0)
                answer = {"ok": True, "cols": cols, "rows": rows}
            except OSError as e:
                answer = {"ok": False, "code": "io_error", "message": "cannot resize: %s" % e}
        _reply(self.job_dir, msg.get("reply"), answer)

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
        if self.ready_lock_fd is not None:
            os.close(self.ready_lock_fd)
            self.ready_lock_fd = None

    # -- the end -----------------------------------------------------------

    def _finish(self) -> None:
        """The main process has been reaped: write the one terminal state, wake the waiters."""
        if self.input is not None:
            self.input.close()  # nobody reads it any more
        self.capture.final_drain()
        if self.pty is not None:
            self.pty.close()  # no resize after the end
        self.capture.flush_partials(None)
        for name in ("timeout", "progress", "probe", "lease", "sample"):
            self.timers.cancel(name)  # kill_after stays: it is for the descendants
        # A job that ended before its clean-up timer takes the step now, before
        # its terminal state: once a caller sees the job over, the supervisor
        # writes nothing more in the root (a caller may remove it at once).
        self._on_auto_gc()
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


# --limit-mem, --limit-cpu, --limit-procs: how often the tree is measured.
SAMPLE_S = 0.1
_CLK_TCK = None  # os.sysconf("SC_CLK_TCK"), read on first use
_PAGE_SIZE = None


def _tree_pids(root_pid: int, exclude: set) -> list:
    """Descendants of ``root_pid`` (not itself) for the sampler, cheaply.

    /proc/<pid>/task/<tid>/children (Linux 3.5+) names each thread's
    children, so a small tree costs a few reads instead of a walk of every
    process of the machine; without it, the walk (_descendants_of).
    """
    if not os.path.exists("/proc/%d/task/%d/children" % (root_pid, root_pid)):
        return _descendants_of(root_pid, exclude)
    out = []
    queue = [root_pid]
    while queue:
        pid = queue.pop(0)
        try:
            for tid in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/children" % (pid, tid), "rb") as f:
                    for word in f.read().split():
                        child = int(word)
                        if child not in exclude:
                            out.append(child)
                            queue.append(child)
        except (OSError, ValueError):  # it (or a thread of it) ended meanwhile
            continue
    return out


def _tree_usage(pids: list) -> "tuple":
    """(summed RSS in bytes, CPU seconds, live process count) of ``pids``, from /proc.

    CPU is utime+stime plus cutime+cstime (what each process's own reaped
    children used).  Zombies count for CPU only.  Linux only.
    """
    global _CLK_TCK, _PAGE_SIZE
    if _CLK_TCK is None:
        _CLK_TCK = os.sysconf("SC_CLK_TCK") or 100
        _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") or 4096
    rss = ticks = count = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        try:
            ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            if fields[0] not in (b"Z", b"X"):
                count += 1
                rss += int(fields[21]) * _PAGE_SIZE
        except (IndexError, ValueError):
            continue
    return rss, ticks / float(_CLK_TCK), count


def _child_rlimits(cfg: dict) -> list:
    """The (resource, (soft, hard)) pairs the workload gets: --limit-files, --limit-procs.

    RLIMIT_NOFILE is N for soft and hard alike.  RLIMIT_NPROC counts every
    process of the user, not of the job: it is set (Linux, not for root,
    which it does not bind) to the user's process count now plus N, as a
    backstop against a fork bomb between two samples; the supervisor's count
    of the tree is the real limit.
    """
    out = []
    files = cfg.get("limit_files")
    procs = cfg.get("limit_procs")
    if not files and not procs:
        return out
    import resource

    if files:
        out.append((resource.RLIMIT_NOFILE, (files, files)))
    if procs and _IS_LINUX and os.getuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
        uid = os.getuid()
        mine = 0
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat("/proc/" + name).st_uid == uid:
                        mine += 1
                except OSError:
                    pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        want = mine + procs
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        out.append((resource.RLIMIT_NPROC, (want, hard)))
    return out


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


def supervise_main(job_dir: str, lock_fd: int, config_fd: int, handshake_fd: int) -> int:
    """Body of the supervisor, in a re-executed interpreter or a forked child."""
    try:
        try:
            cfg = json.loads(_read_fd(config_fd).decode("utf-8", "surrogatepass"))
        finally:
            os.close(config_fd)
    except (OSError, ValueError) as e:
        _log(0, "supervisor: bad configuration: %s" % e)
        os.close(handshake_fd)
        return 1
    sup = _Supervisor(job_dir, lock_fd, cfg)
    try:
        return sup.run(handshake_fd)
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
    if not path or not path.endswith((".py", ".pyc")):  # .pyc: installed from a pipe
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
    "l=(im.SourcelessFileLoader if sys.argv[1].endswith('.pyc') else im.SourceFileLoader)"
    "(n,sys.argv[1]);m=type(sys)(n);"
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


# ==== Declarations ===========================================================
#
# Each command is declared once, by @command above its handler: its options
# (Opt), the checks that run after parsing (conflicts, as data), and the
# fields of its answer (Field).  The CLI parser, the response schema and the
# tool list of a second front end are all derived from that declaration, so
# they cannot disagree.  Handlers take an options object ``o`` (attributes
# named after the Opts, plus ``root``, ``started`` and ``cancel``) and
# return the answer's fields as a dict.

# One option or positional of one command.  ``name`` is the attribute of
# ``o`` ("tail_lines" is --tail-lines); ``kind`` is a key of _KINDS (how the
# value is parsed and described); ``fronts=("cli",)`` keeps a flag for the
# command line only (old scripts), out of any tool list; ``flags`` overrides
# the option strings derived from the name.
Opt = collections.namedtuple(
    "Opt",
    "name kind default help metavar choices fronts flags",
    defaults=("str", None, "", None, None, ("cli", "mcp"), None),
)

# How a kind of value is parsed (``parse``, a function that raises
# ValueError; ``what`` names it in argparse's messages), described (``json``,
# a JSON Schema) and taken (``action``, ``nargs``; ``positional`` kinds have
# no flag; ``units`` is said after the help of every option of the kind).
_Kind = collections.namedtuple(
    "_Kind", "parse what json action nargs metavar positional units", defaults=(None,) * 8
)

# A field of an answer, with its JSON Schema and whether it is always there.
Field = collections.namedtuple("Field", "name schema required", defaults=(False,))

_Command = collections.namedtuple(
    "_Command",
    "name help handler opts returns checks variants annotations exit_status examples table streams"
    " fronts tool_help",
)
COMMANDS = {}  # name -> _Command, in the order --help and a tool list show them


def command(
    name,
    help,
    opts=(),
    returns=(),
    checks=(),
    variants=None,
    annotations=None,
    exit_status=None,
    examples=(),
    table=None,
    streams=False,
    fronts=("cli", "mcp"),
    tool_help=None,
):
    """Declare a command beside its handler.

    ``checks`` are functions of ``o`` that return a usage message when the
    options do not go together (None when they do); they run in order,
    after parsing, whichever front end asked.  ``variants`` is an ``anyOf``
    list added to the answer's schema, for a command whose answer has two
    forms (wait: one job, or several).  ``annotations`` are hints for a tool
    list (readOnlyHint, destructiveHint, idempotentHint).  ``exit_status``,
    a function of ``o`` and the answer, gives the exit code of a successful
    answer (default 0): run --wait --exit-code passes the job's on.
    ``examples`` are (command line, what it does) pairs that end --help.
    ``table`` renders a successful answer for a person (--format table);
    a command that ``streams`` writes its output to ``o.out`` (a binary file)
    as it goes, and its answer is not printed unless it is an error.
    ``fronts`` are the front ends that offer the command (a tool list only
    those with "mcp").  ``tool_help`` is the tool's description for a model
    (what it does, when to use it, what to call next); ``help`` stands in
    for a command that has none.
    """

    def register(handler):
        COMMANDS[name] = _Command(
            name,
            help,
            handler,
            tuple(opts),
            tuple(returns),
            tuple(checks),
            variants,
            annotations,
            exit_status,
            tuple(examples),
            table,
            streams,
            tuple(fronts),
            tool_help,
        )
        return handler

    return register


def conflict(a: str, b: str, message: "str | None" = None):
    """A check: options ``a`` and ``b`` may not both be given."""

    def check(o) -> "str | None":
        if getattr(o, a, None) and getattr(o, b, None):
            flag_a, flag_b = ("--" + x.replace("_", "-") for x in (a, b))
            return message or "%s and %s conflict" % (flag_a, flag_b)
        return None

    return check


# -- JSON Schema pieces ---------------------------------------------------------

STR = {"type": "string"}
INT = {"type": "integer"}
COUNT = {"type": "integer", "minimum": 0}
BOOL = {"type": "boolean"}
STR_OR_NULL = {"type": ["string", "null"]}
BOOL_OR_NULL = {"type": ["boolean", "null"]}
JOB_STATE = {"enum": list(STATES)}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def ref(name: str) -> dict:
    return {"$ref": "#/definitions/%s" % name}


def obj(fields, nullable: bool = False) -> dict:
    """The JSON Schema of an object with these Fields (later names win)."""
    props = {}
    required = []
    for f in fields:
        props[f.name] = f.schema
        if f.required and f.name not in required:
            required.append(f.name)
    kind = ["object", "null"] if nullable else "object"
    return {"type": kind, "required": required, "properties": props}


STRS = array(STR)
FAILURE = obj(
    (
        Field("code", {"enum": sorted(FAILURE_CODES)}, True),
        Field("message", STR, True),
    ),
    nullable=True,
)

# -- shared groups of fields ------------------------------------------------------

JOB_HEAD = (Field("job_id", STR, True), Field("state", JOB_STATE, True))
# What every answer about a terminal job carries, when known (see _Job.result_fields).
RESULT_FIELDS = (
    Field("exit_code", INT),
    Field("signal", STR),
    Field("finished_at", STR),
    Field("duration_ms", COUNT),
    Field("end_reason", {"enum": list(END_REASONS)}),
    Field("success", BOOL),
    Field("failure", FAILURE),
)
DROPPED_FIELDS = (Field("stdout_dropped_bytes", COUNT), Field("stderr_dropped_bytes", COUNT))
LOG_PATH_FIELDS = (Field("stdout_log_path", STR, True), Field("stderr_log_path", STR, True))
# The snapshot object (see take_snapshot); in sorted order, as its schema lists them.
SNAPSHOT_FIELDS = (
    Field("encoding", {"const": "utf-8-lossy"}, True),
    Field("stderr_included_bytes", COUNT, True),
    Field("stderr_observed_bytes", COUNT, True),
    Field("stderr_tail", STR, True),
    Field("stdout_included_bytes", COUNT, True),
    Field("stdout_observed_bytes", COUNT, True),
    Field("stdout_tail", STR, True),
    Field("truncated", BOOL, True),
)
CURSOR_FIELD = Field("cursor", STR)
ERROR_FIELDS = (
    Field("code", {"enum": sorted(ERROR_CODES)}, True),
    Field("message", STR, True),
    Field("retryable", BOOL, True),
    # port_in_use: who holds the port (the pid, and the job when it is one of the root's)
    Field("pid", INT),
    Field("job_id", STR),
)

# -- kinds of values --------------------------------------------------------------------

_NUMBER_OR_TEXT = {"type": ["integer", "string"]}
_DURATION_HELP = "DURATION: a bare number is ms, or 250ms, 5s, 2m, 1h"
_SIZE_HELP = "SIZE: bytes, or 64k, 1M, 2G"


def _nonneg_int(text: str) -> int:
    s = str(text).strip()
    if not s or not all(c in _DIGITS for c in s) or len(s) > 18:
        raise ValueError("expected a whole number >= 0, got %r" % _short(text))
    return int(s)


def _niceness(text: str) -> int:
    s = str(text).strip()
    sign = -1 if s.startswith("-") else 1
    value = _nonneg_int(s.lstrip("+-")) * sign
    if not -20 <= value <= 19:
        raise ValueError("expected a niceness -20..19, got %r" % _short(text))
    return value


def _positive_duration(text: str) -> int:
    ms = parse_duration_ms(text)
    if ms <= 0:
        raise ValueError("expected a duration > 0, got %r" % text)
    return ms


def _port(text: str) -> int:
    try:
        port = _nonneg_int(text)
    except ValueError:
        port = 0  # not a number: the same message as for a number out of range
    if not 1 <= port <= 65535:
        raise ValueError("expected a TCP port 1-65535, got %r" % text)
    return port


def _port_or_auto(text: str) -> "int | str":
    """run --port: ``auto`` (agent-exec picks a free one) or a TCP port."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return _port(text)
    except ValueError:
        raise ValueError("expected auto or a TCP port 1-65535, got %r" % _short(text))


def _env_pair(text: str) -> str:
    key, eq, _ = text.partition("=")
    if not eq or not _valid_env_key(key):
        raise ValueError("expected KEY=VALUE, got %r" % _short(text.partition("=")[0] + "=..."))
    return text


def _env_key(text: str) -> str:
    if not _valid_env_key(text):
        raise ValueError("expected an environment variable name, got %r" % _short(text))
    return text


def _valid_env_key(key: str) -> bool:
    return bool(key) and key[0] not in _DIGITS and all(c in _ENV_KEY_CHARS for c in key)


_KINDS = {
    "flag": _Kind(json=BOOL, action="store_true"),
    "verbosity": _Kind(json=COUNT, action="count"),
    "str": _Kind(json=STR),
    "strs": _Kind(json=STRS, action="append"),
    "choice": _Kind(json=STR),
    "count": _Kind(_nonneg_int, "count", COUNT, metavar="N"),
    "niceness": _Kind(
        _niceness, "niceness", {"type": "integer", "minimum": -20, "maximum": 19}, metavar="N"
    ),
    "duration": _Kind(
        parse_duration_ms, "duration", _NUMBER_OR_TEXT, metavar="DURATION", units=_DURATION_HELP
    ),
    "positive_duration": _Kind(
        _positive_duration, "duration", _NUMBER_OR_TEXT, metavar="DURATION", units=_DURATION_HELP
    ),
    "size": _Kind(parse_size, "size", _NUMBER_OR_TEXT, metavar="SIZE", units=_SIZE_HELP),
    "signal": _Kind(parse_signal, "signal", _NUMBER_OR_TEXT, metavar="NAME"),
    "cursor": _Kind(parse_cursor, "cursor", STR, metavar="C"),
    "port": _Kind(
        _port, "port", {"type": "integer", "minimum": 1, "maximum": 65535}, metavar="PORT"
    ),
    "term_size": _Kind(
        parse_term_size,
        "terminal size",
        {"type": "string", "pattern": "^[0-9]+[xX][0-9]+$"},
        metavar="COLSxROWS",
    ),
    "keys": _Kind(parse_keys, "keys", STR, metavar="SPEC"),
    "env_pairs": _Kind(_env_pair, "env", STRS, "append", metavar="KEY=VALUE"),
    "env_keys": _Kind(_env_key, "key", STRS, "append", metavar="KEY"),
    "job_id": _Kind(json=STR, positional=True),
    # status, wait, kill: a job id (or name), or --key KEY instead of one
    "job_id_or_key": _Kind(json=STR, nargs="?", positional=True),
    "job_ids_or_key": _Kind(json=STRS, nargs="*", positional=True),
    "port_or_auto": _Kind(_port_or_auto, "port", _NUMBER_OR_TEXT, metavar="auto|PORT"),
    "word": _Kind(json=STR, positional=True),
    "job_ids": _Kind(json=dict(STRS, minItems=1), nargs="+", positional=True),
    "argv": _Kind(json=dict(STRS, minItems=1), nargs="...", positional=True),
}

# Options every command takes.  The top-level parser lists them in the
# opposite order, and a command's --help words --root more briefly, as they
# always have.
GLOBAL_OPTS = (
    Opt("root", "str", help="jobs root directory", metavar="DIR"),
    Opt(
        "verbose", "verbosity", 0, "-v info, -vv debug", fronts=("cli",), flags=("-v", "--verbose")
    ),
)
_GLOBAL_HELP_IN_COMMAND = {"root": "jobs root"}

# Options that several commands share.
JOB_ID = Opt(
    "job_id", "job_id", help="a job id, a unique prefix of one (4+ characters), or a job name"
)
JOB_IDS = Opt(
    "job_ids", "job_ids", help="one or more job ids, unique prefixes or names", metavar="job_id"
)
# status, wait, kill: the job id may be left out for --key KEY.
JOB_ID_OR_KEY = JOB_ID._replace(kind="job_id_or_key", help=JOB_ID.help + "; or give --key")
JOB_IDS_OR_KEY = JOB_IDS._replace(kind="job_ids_or_key", help=JOB_IDS.help + "; or give --key")
KEY_INSTEAD = Opt(
    "key", help="the newest job started with run --key KEY, instead of a job id", metavar="KEY"
)


def _id_or_key(o) -> "str | None":
    ids = getattr(o, "job_ids", None) if hasattr(o, "job_ids") else getattr(o, "job_id", None)
    given = bool(ids) if isinstance(ids, list) else ids is not None  # "" is a (bad) id
    if getattr(o, "key", None) is not None:
        return "give a job id or --key, not both" if given else None
    return None if given else "give a job id (or a name, or --key KEY)"


TAIL_LINES = Opt(
    "tail_lines", "count", DEFAULT_TAIL_LINES, "show the last N lines of each stream (default 50)"
)
MAX_BYTES = Opt(
    "max_bytes", "size", DEFAULT_MAX_BYTES, "at most SIZE bytes of each stream (default 64k)"
)
# --plain (tail, read, wait, run, screen): see _plain_text.
PLAIN = Opt(
    "plain",
    "flag",
    help="remove terminal escape sequences from the text, and reduce a line redrawn "
    "with CR to its last version (byte counts and cursors still count the raw bytes)",
)
_UNUSED_HELP = "accepted for old scripts; it has no effect"
# The view for people, on the commands that have one (the CLI only).
FORMAT_OPTS = (
    Opt(
        "format",
        "choice",
        None,  # json; None tells "not given" apart, for the conflict with -H
        "json (the default, for programs) or table (for people)",
        choices=("json", "table"),
        fronts=("cli",),
    ),
    Opt("human", "flag", help="same as --format table", fronts=("cli",), flags=("-H",)),
)


def _format_conflict(o) -> "str | None":
    if getattr(o, "human", False) and getattr(o, "format", None) == "json":
        return "-H and --format json conflict"
    return None


def _wants_table(o) -> bool:
    return bool(getattr(o, "human", False)) or getattr(o, "format", None) == "table"


DRY_RUN = Opt("dry_run", "flag", help="say what would go; delete nothing")
RENEW = Opt("renew", "flag", help="also renew the job's lease (see renew), in passing")


def _flags(opt: Opt) -> tuple:
    return opt.flags or ("--" + opt.name.replace("_", "-"),)


# ==== Commands ===============================================================
#
# Per command, in --help order: its declaration, its handler, then the
# helpers only it uses.  A handler returns the answer's fields (dispatch()
# adds schema_version, ok and type) and never prints.


def _root(o) -> str:
    return resolve_root(getattr(o, "root", None))


def _open_job(o, ident: "str | None") -> _Job:
    """The job that ``ident`` (an id, a prefix or a name) names in the root of
    ``o``; with no ident, the job of ``o.key`` (status/kill --key)."""
    root = _root(o)
    _check_root(root)
    if ident is None and getattr(o, "key", None) is not None:
        return load_job(root, resolve_key(root, o.key))
    return load_job(root, resolve_job(root, ident))


def _cancelled(o) -> "object | None":
    """The cancel flag of a front end that can cancel a call (None for the CLI)."""
    return getattr(o, "cancel", None)


# ---- run ----------------------------------------------------------------------


def _needs_command(o) -> "str | None":
    words = list(o.command or [])
    words = words[1:] if words[:1] == ["--"] else words
    if getattr(o, "shell", None) is not None:
        if words:
            return "--shell STRING and a command after -- conflict: give one"
        if not o.shell.strip():
            return "--shell needs a command line"
        return None
    if not words:
        return "run needs a command: agent-exec run [options] -- <command> [args...]"
    return None


def _argv_of(o) -> list:
    """The job's argv: the words after --, or /bin/sh -c STRING for --shell."""
    if getattr(o, "shell", None) is not None:
        return ["/bin/sh", "-c", o.shell]
    argv = list(o.command or [])
    return argv[1:] if argv[:1] == ["--"] else argv


# run --noninteractive: what unattended programs look for, so that none waits
# for a person (a pager, a credential prompt, a debconf question) or draws
# for one (colours, progress bars).  --env-file and --env still win.
NONINTERACTIVE_ENV = (
    ("CI", "1"),
    ("GIT_TERMINAL_PROMPT", "0"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("PAGER", "cat"),
    ("GIT_PAGER", "cat"),
    ("PYTHONUNBUFFERED", "1"),
    ("NO_COLOR", "1"),
)


def _regex_error(pattern: "str | None", option: str) -> "str | None":
    if pattern is None:
        return None
    try:
        _compile_regex(pattern, option)
    except UsageError as e:
        return e.message
    return None


def _notify_argv(text: "str | None") -> "list | None":
    """--notify-command's JSON array, or None when it is not one."""
    try:
        argv = json.loads(text)
    except (TypeError, ValueError):
        return None
    if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
        return argv
    return None


def _notify_command_error(o) -> "str | None":
    if o.notify_command is not None and _notify_argv(o.notify_command) is None:
        return "--notify-command must be a non-empty JSON array of strings"
    return None


def _exit_code_needs_wait(o) -> "str | None":
    return "--exit-code goes with --wait" if o.exit_code and not o.wait else None


def _passed_on_exit_status(o, answer: dict) -> int:
    """run, start, restart: --wait --exit-code exits as the job did (see _job_exit_status)."""
    return _job_exit_status(answer) if o.exit_code else 0


# The checks of a job's definition: run's, and create's (which records one).
_JOB_CHECKS = (
    _needs_command,
    lambda o: _regex_error(o.ready_match, "--ready-match"),
    conflict("no_inherit_env", "inherit_env"),
    conflict("stdin", "stdin_file"),
    conflict("stdin", "stdin_open"),
    conflict("stdin_file", "stdin_open"),
    conflict(
        "pty",
        "stdin",
        "--pty and --stdin conflict: a terminal job reads what `agent-exec send` types",
    ),
    conflict(
        "pty",
        "stdin_file",
        "--pty and --stdin-file conflict: a terminal job reads what `agent-exec send` types",
    ),
    lambda o: "--pty-size goes with --pty" if o.pty_size and not o.pty else None,
    _notify_command_error,
    lambda o: "--key-scope goes with --key" if o.key_scope and not o.key else None,
    conflict("port", "ready_port", "--port already makes the job ready when it listens"),
)

_RUN_OPTS = (
    Opt(
        "snapshot_after",
        "duration",
        DEFAULT_SNAPSHOT_AFTER_MS,
        "observe the job this long before answering (max 10000; 0 = at once)",
    ),
    Opt("timeout", "duration", 0, "SIGTERM the job's processes at this deadline (0 = none)"),
    Opt("kill_after", "duration", 0, "SIGKILL what is left this long after the timeout's SIGTERM"),
    TAIL_LINES,
    MAX_BYTES,
    Opt("cwd", help="working directory (default: the caller's)", metavar="DIR"),
    Opt("env", "env_pairs", help="set KEY to VALUE in the job's environment (repeatable)"),
    Opt(
        "env_file",
        "strs",
        help="read KEY=VALUE lines from FILE, before any --env (repeatable)",
        metavar="FILE",
    ),
    Opt("no_inherit_env", "flag", help="start from an empty environment"),
    # Accepted so that it can be said explicitly; it only conflicts.
    Opt("inherit_env", "flag", help="inherit the environment (default)", fronts=("cli",)),
    Opt("mask", "env_keys", help="never show KEY's value in any output or file"),
    Opt("log", help="where full.log goes", metavar="PATH"),
    Opt("progress_every", "duration", 0, "refresh state.json this often while it runs (0 = off)"),
    Opt("wait", "flag", help="block until the job is terminal"),
    Opt(
        "exit_code",
        "flag",
        help="with --wait: exit with the job's exit code (128+N for signal N, "
        "125 if it never ran or its end is unknown)",
    ),
    # Accepted for scripts written for the first versions; not used.
    Opt("wait_poll_ms", "duration", DEFAULT_WAIT_POLL_MS, _UNUSED_HELP, fronts=("cli",)),
    Opt(
        "notify_command",
        help='when the job ends, run this command (a JSON array: ["notify", "x"]) '
        "with the completion event on stdin",
        metavar="JSON_ARGV",
    ),
    Opt(
        "notify_file",
        help="when the job ends, append the completion event to PATH as one JSON line",
        metavar="PATH",
    ),
    Opt(
        "notify_timeout",
        "positive_duration",
        DEFAULT_NOTIFY_TIMEOUT_MS,
        "kill a notify command after this long",
    ),
    Opt("ready_match", help="the job is ready when a line matches", metavar="REGEX"),
    Opt("ready_port", "port", help="the job is ready when localhost:PORT accepts a connection"),
    Opt(
        "max_output",
        "size",
        0,
        "keep at most SIZE bytes per stream on disk, the newest (0 = no limit)",
        metavar="SIZE",
    ),
    Opt(
        "stdin",
        help="the job reads TEXT on its stdin, then EOF ('-': read this command's own "
        "stdin to EOF first; default: /dev/null)",
        metavar="TEXT",
    ),
    Opt(
        "stdin_file", help="the job reads this file's bytes on its stdin, then EOF", metavar="PATH"
    ),
    Opt("stdin_open", "flag", help="keep the job's stdin open: `agent-exec send` writes to it"),
    Opt(
        "stdin_max_bytes",
        "size",
        DEFAULT_STDIN_MAX_BYTES,
        "refuse more stdin than this (default 64 MiB)",
    ),
    Opt(
        "pty",
        "flag",
        help="run the job on a pseudo-terminal, its controlling terminal: both streams go "
        "to stdout.log, and `agent-exec send` types into it",
    ),
    Opt(
        "pty_size",
        "term_size",
        None,
        "with --pty: the terminal's size (default 80x24)",
        metavar="COLSxROWS",
    ),
    Opt(
        "shell",
        help="run /bin/sh -c STRING (pipes, redirections, &&) instead of a command after --",
        metavar="STRING",
    ),
    Opt(
        "noninteractive",
        "flag",
        help="set CI=1, GIT_TERMINAL_PROMPT=0, DEBIAN_FRONTEND=noninteractive, PAGER=cat, "
        "GIT_PAGER=cat, PYTHONUNBUFFERED=1, NO_COLOR=1 (--env still wins)",
    ),
    PLAIN,
    # -- lifecycle and guards: leases, limits (one block, see "Leases and limits")
    Opt(
        "lease",
        "duration",
        None,
        "end the job (TERM, then KILL after --kill-after) unless `renew` extends it within this",
    ),
    Opt("limit_mem", "size", None, "end the job when its tree's summed RSS passes SIZE (>= 1M)"),
    Opt("limit_cpu", "duration", None, "end the job when its tree has used this much CPU time"),
    Opt("limit_files", "count", None, "RLIMIT_NOFILE: at most N open files per process"),
    Opt("limit_procs", "count", None, "end the job when its tree has more than N live processes"),
    Opt("nice", "niceness", None, "run the job at this niceness increment (-20..19)"),
    Opt(
        "max_output_action",
        "choice",
        "truncate",
        "what --max-output does: truncate (keep the newest SIZE bytes, the default) or kill "
        "(end the job once a stream has written more than SIZE)",
        choices=("truncate", "kill"),
    ),
    # Finding the job again, single-flight and ports (see "Finding jobs again").
    Opt("name", help="name the job (letters, digits, - _ .; at most 64)", metavar="NAME"),
    Opt("tag", "strs", help="tag the job: KEY or KEY=VALUE (repeatable)", metavar="TAG"),
    Opt("owner", help="who the job is for (default: $AGENT_EXEC_OWNER)", metavar="OWNER"),
    Opt(
        "key",
        help="single-flight: if a job with KEY runs, start nothing and answer it (reused: true)",
        metavar="KEY",
    ),
    Opt(
        "key_scope",
        "choice",
        help="with --key: reuse a job that runs (default), or any job with the key",
        choices=("running", "any"),
    ),
    Opt(
        "port",
        "port_or_auto",
        help="give the job a TCP port as $PORT ('auto': a free one); ready when it listens",
    ),
    Opt("command", "argv", help="the command and its arguments"),
)


@command(
    "run",
    "start a background job",
    tool_help=(
        "Start a command as a background job and get its job_id at once; the job keeps "
        "running after this call (and after this session) ends. Use it instead of a plain "
        "shell call for anything that may take more than a few seconds, a server, or "
        'output you want to page through. `command` is the argv list (["make", "test"]); '
        "`shell` is one string for /bin/sh -c (pipes, &&). The answer has a snapshot of "
        "the first output (snapshot_after, at most 10 s) and a cursor. With ready_match / "
        "ready_port it answers once the job is ready. With wait it blocks until the end, "
        "at most about 20 s per call (the server's cap): if state is still running, call "
        "wait. Next: read (with the cursor) for new output, wait for the end, status, "
        "kill."
    ),
    opts=_RUN_OPTS,
    checks=_JOB_CHECKS + (_exit_code_needs_wait,),
    exit_status=_passed_on_exit_status,
    examples=(
        ("agent-exec run -- make test", "everything after -- is the command, word for word"),
        (
            "agent-exec run --shell 'make 2>&1 | tee build.log'",
            "pipes, redirections and && need a shell (or: -- sh -c '...')",
        ),
        (
            "agent-exec run --timeout 10m --kill-after 5s -- ./slow-job",
            "TERM at 10 min, KILL 5 s later",
        ),
        (
            "agent-exec run --ready-port 8000 -- python3 -u -m http.server 8000",
            "answer once port 8000 accepts connections",
        ),
        (
            "agent-exec run --ready-match 'Listening on' -- npm run dev",
            "answer once a line of output matches",
        ),
        ("agent-exec run --wait --exit-code -- make && deploy", "block, then exit as make did"),
    ),
    returns=JOB_HEAD
    + LOG_PATH_FIELDS
    + (
        Field("waited_ms", COUNT, True),
        Field("elapsed_ms", COUNT, True),
        Field("env_vars", STRS),
        Field("snapshot", ref("snapshot")),
        Field("final_snapshot", ref("snapshot")),
        CURSOR_FIELD,
        Field("ready", BOOL),
        Field("waiting_for_input", BOOL),
        Field("input_prompt", STR),
        Field("reused", BOOL),
        Field("port", {"type": ["integer", "null"], "minimum": 1, "maximum": 65535}),
    )
    + RESULT_FIELDS,
    annotations={
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
        "openWorldHint": True,
    },
)
def cmd_run(o) -> dict:
    """Start a job: check everything, create its directory, hand it to a supervisor.

    Nothing is created until every check has passed.  The answer comes once
    meta.json and state.json exist, after the snapshot wait (or --wait).
    """
    if o.key is not None:
        return _run_keyed(o)
    spec = _job_spec(o)
    root = _root(o)
    _ensure_root(root)
    job_id = _start_job(root, spec)
    return _run_answer(o, root, job_id, spec)


def _start_job(root: str, spec: dict) -> str:
    """Create the job of ``spec`` in ``root`` and launch its supervisor; its id."""
    job_id, job_dir = _create_job_dir(root)
    _index_job(root, job_id, spec)
    meta = _meta_document(job_id, root, job_dir, spec)
    # meta.json appears already locked: no reader can see the job unlocked
    # (that is: lost) before its supervisor holds the lock.
    meta_path = job_dir + "/" + META
    try:
        lock_fd = _write_json_atomic(meta_path, meta, keep_locked=True)
    except OSError as e:
        raise AgentExecError("io_error", "cannot write %s: %s" % (meta_path, e.strerror or e))
    try:
        if spec["stdin"] is not None:  # before the supervisor: the workload reads it
            _write_private_file(os.path.join(job_dir, STDIN_FILE), spec["stdin"])
        ready = _launch_supervisor(job_dir, lock_fd, _supervisor_config(spec, job_dir))
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
    if spec.get("port"):
        _claim_port(root, spec["port"], job_id)
    return job_id


# run --wait --exit-code, for a job that did not end with an exit code of its
# own: it never ran (spawn_failed), or its supervisor was lost.  125, as
# env(1), nice(1) and docker run answer when they could not run the command.
_NO_EXIT_STATUS = 125


def _job_exit_status(answer: dict) -> int:
    """The exit status a shell would report for the job of ``answer``."""
    if answer.get("exit_code") is not None:
        return answer["exit_code"]
    name = answer.get("signal")
    if name and answer.get("end_reason") in ("signal", "kill", "timeout"):
        try:
            return 128 + parse_signal(name)
        except ValueError:
            import signal

            num = getattr(signal, name, None)
            if num is not None:
                return 128 + int(num)
    return _NO_EXIT_STATUS


def _job_spec(o) -> dict:
    """What the job is, from the options: checked, resolved, nothing created yet.

    meta.json (for readers) and the supervisor's configuration (which also
    carries the environment's values) are both projections of it.
    """
    argv = _argv_of(o)
    cwd = _job_cwd(o.cwd)
    env, env_keys, explicit = _job_env(o)
    masks = list(dict.fromkeys(o.mask or ()))
    try:
        _resolve_command(argv[0], cwd, env)
    except AgentExecError as e:
        if len(argv) == 1 and _SHELL_SYNTAX.intersection(argv[0]):
            import shlex

            raise AgentExecError(
                e.code,
                "command %r not found: it looks like a shell command line given as one "
                "argument; to run it through a shell: agent-exec run --shell %s "
                "(or: agent-exec run -- sh -c %s)"
                % (_short(argv[0]), shlex.quote(argv[0]), shlex.quote(argv[0])),
            )
        raise
    if o.ready_port:
        _refuse_port_in_use(o.ready_port)
    stdin = _job_stdin(o)
    spec = {
        "stdin": stdin,
        "stdin_open": bool(o.stdin_open),
        "pty": _pty_size(o),
        "shell": o.shell,
        "argv": argv,
        "cwd": cwd,
        "env": env,
        "env_keys": env_keys,
        "explicit_env": explicit,
        "masks": masks,
        "secrets": [env[k] for k in masks if env.get(k)],
        "inherit_env": not o.no_inherit_env,
        "timeout_ms": o.timeout,
        "kill_after_ms": o.kill_after,
        "progress_every_ms": o.progress_every,
        "max_output": o.max_output,
        "ready_match": o.ready_match,
        "ready_port": o.ready_port,
        "log_path": _full_log_path(o.log),
        "notify_command": _notify_argv(o.notify_command) if o.notify_command else None,
        "notify_file": os.path.abspath(o.notify_file) if o.notify_file else None,
        "notify_timeout_ms": o.notify_timeout,
        **_guard_spec(o),
    }
    spec.update(_finding_spec(o, spec))
    return spec


# --limit-mem below this is refused: no program starts in less.
MIN_LIMIT_MEM = 1 << 20


def _guard_spec(o) -> dict:
    """The lease and limits of the job, checked (invalid_argument when unusable)."""
    lease = getattr(o, "lease", None)
    if lease is not None and lease <= 0:
        raise AgentExecError("invalid_argument", "--lease must be longer than 0")
    mem = getattr(o, "limit_mem", None)
    if mem is not None and mem < MIN_LIMIT_MEM:
        raise AgentExecError(
            "invalid_argument", "--limit-mem %d is below 1 MiB: no program runs in that" % mem
        )
    cpu = getattr(o, "limit_cpu", None)
    if cpu is not None and cpu <= 0:
        raise AgentExecError("invalid_argument", "--limit-cpu must be longer than 0")
    files = getattr(o, "limit_files", None)
    procs = getattr(o, "limit_procs", None)
    for flag, value in (("--limit-files", files), ("--limit-procs", procs)):
        if value is not None and value < 1:
            raise AgentExecError("invalid_argument", "%s must be at least 1" % flag)
    if files is not None:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and files > hard:
            raise AgentExecError(
                "invalid_argument",
                "--limit-files %d is above this user's hard limit (%d)" % (files, hard),
            )
    if not _IS_LINUX and (mem or cpu or procs):
        # These are measured from /proc; elsewhere they could not be kept.
        raise AgentExecError(
            "unsupported_platform", "--limit-mem, --limit-cpu and --limit-procs need Linux (/proc)"
        )
    action = getattr(o, "max_output_action", None) or "truncate"
    if action == "kill" and not o.max_output:
        raise AgentExecError("invalid_argument", "--max-output-action kill needs --max-output SIZE")
    return {
        "lease_ms": lease,
        "limit_mem": mem,
        "limit_cpu_ms": cpu,
        "limit_files": files,
        "limit_procs": procs,
        "nice": getattr(o, "nice", None),
        "max_output_action": action,
        # what start/restart need to build an attempt's environment again
        "env_files": [os.path.abspath(p) for p in o.env_file or ()],
        "noninteractive": bool(getattr(o, "noninteractive", False)),
    }


def _pty_size(o) -> "dict | None":
    """run --pty: {"cols": c, "rows": r}; None without a terminal."""
    if not getattr(o, "pty", False):
        return None
    cols, rows = o.pty_size or DEFAULT_PTY_SIZE
    return {"cols": cols, "rows": rows}


def _job_stdin(o) -> "bytes | None":
    """The bytes of --stdin TEXT, --stdin - or --stdin-file, checked; None for /dev/null.

    Only these read anything: run never reads its caller's stdin unless told
    (a harness often leaves a pipe open that never closes)."""
    limit = o.stdin_max_bytes
    if o.stdin_file is not None:
        try:
            with open(o.stdin_file, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise AgentExecError(
                "invalid_argument", "cannot read --stdin-file %s: %s" % (o.stdin_file, e.strerror)
            )
        what = "--stdin-file %s" % o.stdin_file
    elif o.stdin == "-":
        reader = getattr(sys.stdin, "buffer", None)
        try:
            data = reader.read(limit + 1) if reader is not None else b""
        except (OSError, ValueError) as e:
            raise AgentExecError("invalid_argument", "cannot read stdin: %s" % e)
        what = "stdin"
    elif o.stdin is not None:
        data = os.fsencode(o.stdin)
        what = "--stdin"
    else:
        return None
    if len(data) > limit:
        raise AgentExecError(
            "invalid_argument",
            "%s holds more than --stdin-max-bytes (%d bytes)" % (what, limit),
        )
    return data


def _reserving_job_pid(root: str, job_id: str) -> "int | None":
    """The main pid (state.json) of the job that reserved a port, if known."""
    try:
        pid = load_job(root, job_id).record.get("pid")
    except AgentExecError:
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def _refuse_port_in_use(port: int, root: "str | None" = None) -> None:
    """run --ready-port P (or --port P) while something already accepts on P: the
    job could never be the one that answers, so nothing is created.

    With ``root`` (run --port), a port that a live job of the root reserved
    is taken too, listening or not; the error names the holder's pid and,
    when a job of the root holds it, the job's id.
    """
    details = {}
    if not _probe_port(port):
        held, job_id = _reserved_by(root, port) if root else (False, None)
        if not held:
            return
        who = " (reserved by job %s)" % job_id if job_id else " (reserved by a run starting)"
        if job_id:
            details["job_id"] = job_id
            pid = _reserving_job_pid(root, job_id)
            if pid is not None:  # the job's main pid: it holds the port, not listening yet
                details["pid"] = pid
                who = " (reserved by job %s, pid %d)" % (job_id, pid)
        raise AgentExecError(
            "port_in_use",
            "port %d is already in use%s: stop that job or pick another port" % (port, who),
            details=details,
        )
    holders = _port_holders(port)
    who = ""
    if holders:
        names = []
        for pid in holders[:3]:
            try:
                with open("/proc/%d/comm" % pid) as f:
                    names.append("pid %d (%s)" % (pid, f.read().strip()))
            except OSError:
                names.append("pid %d" % pid)
        who = " by " + ", ".join(names)
        details["pid"] = holders[0]
    job_id = _job_holding(root, holders) if root else None
    if job_id is None and root:
        job_id = _reserved_by(root, port)[1]
    if job_id:
        who += " of job %s" % job_id
        details["job_id"] = job_id
    raise AgentExecError(
        "port_in_use",
        "port %d is already in use%s: stop that process or pick another port" % (port, who),
        details=details,
    )


def _job_cwd(cwd: "str | None") -> str:
    try:
        path = os.path.realpath(cwd) if cwd else os.path.realpath(os.getcwd())
    except OSError as e:
        raise AgentExecError("cwd_not_found", "the current directory is gone: %s" % e.strerror)
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise AgentExecError("cwd_not_found", "working directory %s %s" % (path, what))
    return path


def _job_env(o) -> "tuple":
    """(env, env_keys, explicit): inherited (or not), then env files in order, then --env."""
    env = {} if o.no_inherit_env else dict(os.environ)
    env_keys = []  # type: list
    if getattr(o, "noninteractive", False):
        env.update(NONINTERACTIVE_ENV)
    if getattr(o, "pty", False):
        env["TERM"] = PTY_TERM  # the terminal is an xterm's kind, whatever the caller's is
    for path in o.env_file or ():
        for key, value in _parse_env_file(path):
            env[key] = value
            env_keys.append(key)
    explicit = []
    for item in o.env or ():
        key, _, value = item.partition("=")
        env[key] = value
        env_keys.append(key)
        explicit.append((key, value))
    return env, list(dict.fromkeys(env_keys)), explicit


def _full_log_path(log: "str | None") -> "str | None":
    """--log's absolute path (its directory created), or None for the job's own full.log."""
    if not log:
        return None
    path = os.path.abspath(log)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        # Name the part of the path that is in the way, not just errno's words.
        blocker = parent
        while blocker != os.path.dirname(blocker) and not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        if os.path.lexists(blocker) and not os.path.isdir(blocker):
            raise AgentExecError(
                "invalid_argument",
                "cannot use --log %s: %s is a file, not a directory" % (path, blocker),
            )
        raise AgentExecError(
            "invalid_argument", "cannot use --log %s: %s" % (path, e.strerror or e)
        )
    if os.path.isdir(path):
        raise AgentExecError("invalid_argument", "--log %s is a directory" % path)
    return path


def _create_job_dir(root: str) -> "tuple":
    while True:
        job_id = new_ulid()
        job_dir = os.path.join(root, job_id)
        try:
            os.mkdir(job_dir, 0o700)
            os.chmod(job_dir, 0o700)
            return job_id, job_dir
        except FileExistsError:
            continue
        except OSError as e:
            raise AgentExecError("io_error", "cannot create job directory: %s" % e.strerror)


def _write_private_file(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        raise AgentExecError("io_error", "cannot write %s: %s" % (path, e.strerror or e))


def _meta_document(job_id: str, root: str, job_dir: str, spec: dict) -> dict:
    """meta.json: the job's definition, for readers; no environment values."""
    meta = {
        "schema_version": SCHEMA_VERSION,
        "job": {"id": job_id},
        "command": spec["argv"],
        "created_at": _now(),
        "root": root,
        "cwd": spec["cwd"],
        "env_keys": spec["env_keys"],
        "mask": spec["masks"],
        "inherit_env": spec["inherit_env"],
        "timeout_ms": spec["timeout_ms"],
        "kill_after_ms": spec["kill_after_ms"],
        "max_output": spec["max_output"] or None,
        "ready_match": spec["ready_match"],
        "ready_port": spec["ready_port"],
        "log_path": spec["log_path"] or os.path.join(job_dir, FULL_LOG),
        "stdin_bytes": len(spec["stdin"]) if spec["stdin"] is not None else None,
        "stdin_open": spec["stdin_open"] or spec["pty"] is not None,
        "pty": spec["pty"] is not None,
        "pty_size": spec["pty"],
        "shell": spec["shell"] is not None,
        "shell_command": spec["shell"],
        "agent_exec_version": __version__,
    }
    meta.update(_guard_meta(spec))
    meta["definition"] = _definition(spec)
    for key in _FINDING_META_KEYS:
        meta[key] = spec.get(key)
    if spec["notify_command"] or spec["notify_file"]:
        meta["notification"] = {
            "notify_command": spec["notify_command"],
            "notify_file": spec["notify_file"],
        }
    return meta


def _guard_meta(spec: dict) -> dict:
    """meta.json's lease and limits (only those given), for readers."""
    out = {}
    if spec.get("lease_ms"):
        out["lease_ms"] = spec["lease_ms"]
    limits = {
        "memory": spec.get("limit_mem"),
        "cpu_ms": spec.get("limit_cpu_ms"),
        "files": spec.get("limit_files"),
        "procs": spec.get("limit_procs"),
        "nice": spec.get("nice"),
    }
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        out["limits"] = limits
    if spec.get("max_output_action") == "kill":
        out["max_output_action"] = "kill"
    return out


# What the supervisor is told (through a pipe, never argv): the spec's keys
# it reads, environment values and secrets included.
_SUPERVISOR_KEYS = (
    "argv",
    "cwd",
    "env",
    "secrets",
    "timeout_ms",
    "kill_after_ms",
    "progress_every_ms",
    "log_path",
    "notify_command",
    "notify_file",
    "notify_timeout_ms",
    "max_output",
    "ready_match",
    "ready_port",
    "stdin_open",
    "pty",
    # lifecycle and guards
    "lease_ms",
    "limit_mem",
    "limit_cpu_ms",
    "limit_files",
    "limit_procs",
    "nice",
    "max_output_action",
)


def _supervisor_config(spec: dict, job_dir: str) -> dict:
    cfg = {key: spec[key] for key in _SUPERVISOR_KEYS}
    cfg["stdin_path"] = os.path.join(job_dir, STDIN_FILE) if spec["stdin"] is not None else None
    # The supervisor runs the root's automatic clean-up (see _auto_gc).
    cfg["auto_gc_after_ms"] = _gc_after_ms()
    return cfg


def _run_answer(o, root: str, job_id: str, spec: dict, observed_ms: int = 0) -> dict:
    """Watch the new job as asked (--snapshot-after, --wait, readiness), then answer.

    ``observed_ms``: how long the job has run already (a job that run --key
    reuses): the snapshot wait covers the job's first --snapshot-after ms.
    """
    t_start = time.monotonic()
    o.observed_job_id = job_id  # for a front end's progress reports while this blocks
    job_dir = os.path.join(root, job_id)
    meta_path = os.path.join(job_dir, META)
    snapshot_after = min(o.snapshot_after, MAX_SNAPSHOT_AFTER_MS)
    window = max(0, snapshot_after - observed_ms)
    readiness = bool(spec["ready_match"] or spec["ready_port"])
    waiting = None
    if o.wait:
        _wait_lock(meta_path, None, _cancelled(o))
    elif window > 0 and (spec["stdin_open"] or spec.get("pty")) and not readiness:
        # A job whose stdin is open may stop to ask something: answer then,
        # with waiting_for_input, rather than at the end of the snapshot wait.
        job = load_job(root, job_id)
        watch = _LockWatch.acquire(meta_path)
        try:
            deadline = time.monotonic() + window / 1000.0
            waiting = _input_wanted(job, watch, deadline, _cancelled(o))
        finally:
            watch.release()
    elif window > 0:
        # With a readiness condition, answer as soon as the job is ready: the
        # supervisor lets go of ready.lock then (or when the job ends).
        lock = os.path.join(job_dir, READY_LOCK) if readiness else meta_path
        _wait_lock(lock, window / 1000.0, _cancelled(o))
    waited_ms = int(round((time.monotonic() - t_start) * 1000))
    job = load_job(root, job_id)
    out = {"job_id": job_id, "state": job.state}
    out.update(job.log_paths())
    out["waited_ms"] = waited_ms
    if spec["explicit_env"]:
        masked = set(spec["masks"])
        out["env_vars"] = [
            "%s=%s" % (k, "***" if k in masked else v) for k, v in spec["explicit_env"]
        ]
    if snapshot_after > 0 or o.wait:
        snap, out["cursor"] = take_snapshot(job, o.tail_lines, o.max_bytes)
        if getattr(o, "plain", False):
            _plain_snapshot(snap)
        if snapshot_after > 0:
            out["snapshot"] = snap
        if o.wait:
            out["final_snapshot"] = snap
    else:
        out["cursor"] = make_cursor(0, 0)  # nothing seen yet
    if readiness:
        out["ready"] = bool(job.record.get("ready"))
    if waiting is not None:
        out["waiting_for_input"] = waiting and not job.terminal
        if out["waiting_for_input"]:
            prompt = _input_prompt(job)
            if prompt is not None:
                out["input_prompt"] = _plain_text(prompt) if o.plain else prompt
    if spec.get("port"):
        out["port"] = spec["port"]
    out.update(job.result_fields())
    out.pop("duration_ms", None)
    out["elapsed_ms"] = int(round((time.monotonic() - o.started) * 1000))
    return out


# An env file larger than this is refused: /dev/zero or /dev/full would
# otherwise be read until memory runs out.
_ENV_FILE_MAX = 1 << 20


def _parse_env_file(path: str) -> "list":
    try:
        with open(path, "rb") as f:
            raw = f.read(_ENV_FILE_MAX + 1)
    except OSError as e:
        raise AgentExecError(
            "invalid_argument", "cannot read env file %s: %s" % (path, e.strerror or e)
        )
    if len(raw) > _ENV_FILE_MAX:
        raise AgentExecError(
            "invalid_argument", "env file %s is larger than 1 MiB: not an env file" % path
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
        if "\0" in value:
            # exec cannot pass it: refuse it now, as --env does, not as spawn_failed later
            raise AgentExecError(
                "invalid_argument",
                "env file %s line %d: the value of %s holds a NUL byte" % (path, num, key),
            )
        pairs.append((key, value))
    return pairs


# A lone argument holding any of these is probably a line meant for a shell.
_SHELL_SYNTAX = frozenset(" \t\n|&;<>()$`*?[]{}~'\"=")


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


def _bare_state(job_id: str, state: str, code: str, message: str) -> dict:
    return _state_document(job_id, state, _JobFacts(), failure={"code": code, "message": message})


# ---- run: names, tags, owners, single-flight keys, ports, housekeeping ----------
#
# What lets an agent find its jobs again after it lost its handles, and the
# guards around starting them.  Each is a field of meta.json (written once:
# meta.json is also the job's lock, so it is never rewritten) except a job's
# tags, which `tag` can change later: they live in meta.json at first and in
# the job's tags.json once `tag` has changed them.

# meta.json fields of this block, in this order (null when not given).
_FINDING_META_KEYS = ("name", "tags", "owner", "key", "port")
OWNER_MAX = 256
KEY_MAX = 256
TAG_KEY_MAX = 64
TAG_VALUE_MAX = 256
_TAG_KEY_CHARS = _NAME_CHARS | frozenset("/:")
TAGS_FILE = "tags.json"  # a job's tags once `tag` changed them
TAGS_LOCK = "tags.lock"  # held while `tag` reads, changes and writes them


def _text_error(what: str, text: str, limit: int) -> "str | None":
    """Why ``text`` cannot be an owner or a key (None when it can)."""
    if not text:
        return "%s needs a non-empty value" % what
    if len(text) > limit:
        return "%s takes at most %d characters, got %d" % (what, limit, len(text))
    if not text.isprintable():
        return "%s may not hold control characters: %r" % (what, _short(text))
    return None


def parse_tag(text: str) -> "tuple":
    """A tag, ``KEY`` or ``KEY=VALUE``: (key, value or None); ValueError if malformed.

    KEY: 1-64 letters, digits and ``- _ . / :``, not starting with ``-`` or
    ``.``; VALUE: 1-256 printable characters, no ``*`` (the pattern character
    of list --tag).
    """
    key, eq, value = str(text).partition("=")
    if not key:
        raise ValueError("a tag is KEY or KEY=VALUE, got %r" % _short(text))
    if len(key) > TAG_KEY_MAX or not _TAG_KEY_CHARS.issuperset(key) or key[0] in "-.":
        raise ValueError(
            "a tag's key has 1-%d letters, digits, '-', '_', '.', '/' or ':' (not first "
            "'-' or '.'), got %r" % (TAG_KEY_MAX, _short(key))
        )
    if not eq:
        return key, None
    if not value:
        raise ValueError("tag %r has an empty value: write the key alone" % _short(text))
    if len(value) > TAG_VALUE_MAX or not value.isprintable() or "*" in value:
        raise ValueError(
            "a tag's value has 1-%d printable characters and no '*', got %r"
            % (TAG_VALUE_MAX, _short(value))
        )
    return key, value


def parse_tag_pattern(text: str) -> "tuple":
    """A list --tag pattern: (key, key_is_prefix, value or None, value_is_prefix).

    ``KEY`` matches the tag KEY whatever its value; ``KEY=VALUE`` that value
    only; ``P*`` every tag whose key starts with P (so ``ns.*`` matches
    ``ns.a`` and ``ns.b=1``, not ``ns``); ``KEY=V*`` KEY with a value that
    starts with V.  ``*`` is taken only at the end.
    """
    text = str(text)
    star = text.endswith("*")
    body = text[:-1] if star else text
    key, eq, value = body.partition("=")
    if star and not eq:
        if body and (len(body) > TAG_KEY_MAX or not _TAG_KEY_CHARS.issuperset(body)):
            raise ValueError("tag pattern %r: a key prefix is letters, digits, - _ . / :" % text)
        return body, True, None, False
    try:
        key, value = parse_tag(body + ("" if not star else "x"))
    except ValueError as e:
        raise ValueError("tag pattern %r: %s" % (_short(text), e))
    if star:
        value = value[:-1]
    return key, False, value, star


def _tag_matches(pattern: tuple, tags: list) -> bool:
    key, key_prefix, value, value_prefix = pattern
    for tag in tags:
        k, _, v = tag.partition("=")
        if not (k.startswith(key) if key_prefix else k == key):
            continue
        if value is None or (v.startswith(value) if value_prefix else v == value):
            return True
    return False


def _tag_list(pairs: dict) -> list:
    """Tags as stored and answered: one ``KEY`` or ``KEY=VALUE`` per key, sorted by key."""
    return [k if v is None else "%s=%s" % (k, v) for k, v in sorted(pairs.items())]


def _tag_pairs(texts, what: str) -> dict:
    """key -> value of ``texts`` (a later tag with the same key wins); invalid_argument."""
    pairs = {}
    for text in texts or ():
        try:
            key, value = parse_tag(text)
        except ValueError as e:
            raise AgentExecError("invalid_argument", "%s: %s" % (what, e))
        pairs[key] = value
    return pairs


def _job_tags(job: _Job, tagged: "set | None" = None) -> list:
    """The job's tags now: its tags.json once `tag` wrote one, else meta.json's.

    ``tagged``: the ids that have a tags.json (see _tagged_ids), so that a
    walk over many jobs does not try to open one per job."""
    doc = job.meta
    if tagged is None or job.id in tagged:
        try:
            doc = _read_json(job.path(TAGS_FILE))
        except (OSError, ValueError):
            pass
    tags = doc.get("tags")
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


TAGGED_DIR = "tagged"  # <root>/tagged/<job id>: the jobs whose tags `tag` changed


def _tagged_ids(root: str) -> set:
    try:
        return set(os.listdir(root + "/" + TAGGED_DIR))
    except OSError:
        return set()


def _finding_spec(o, spec: dict) -> dict:
    """run's name, tags, owner, key and port, checked (the port reserved)."""
    if o.name is not None and _name_error(o.name):
        raise AgentExecError("invalid_argument", "--name: " + _name_error(o.name))
    owner, what = o.owner, "--owner"
    if owner is None:
        owner, what = os.environ.get("AGENT_EXEC_OWNER") or None, "$AGENT_EXEC_OWNER"
    if owner is not None and _text_error(what, owner, OWNER_MAX):
        raise AgentExecError("invalid_argument", _text_error(what, owner, OWNER_MAX))
    if o.key is not None and _text_error("--key", o.key, KEY_MAX):
        raise AgentExecError("invalid_argument", _text_error("--key", o.key, KEY_MAX))
    _gc_after_ms()  # a bad AGENT_EXEC_GC_AFTER is refused before anything is created
    out = {
        "name": o.name,
        "tags": _tag_list(_tag_pairs(o.tag, "--tag")),
        "owner": owner,
        "key": o.key,
        "port": None,
    }
    if o.port is not None:
        root = _root(o)
        _ensure_root(root)
        port = _pick_port(root) if o.port == "auto" else _reserve_port(root, o.port)
        out["port"] = out["ready_port"] = port
        spec["env"]["PORT"] = spec["env"]["AGENT_EXEC_PORT"] = str(port)
    return out


# -- single-flight: run --key ---------------------------------------------------------


def _lock_file(path: str, blocking: bool = True) -> "int | None":
    """An fd holding an exclusive flock on ``path`` (made if needed); None when
    ``blocking`` is false and someone else holds it.  The caller closes it."""
    try:
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise AgentExecError("io_error", "cannot open lock %s: %s" % (path, e.strerror))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _run_keyed(o) -> dict:
    """run --key: under the key's lock, answer the job that has the key, or start one.

    The lock (<root>/keys/<h>.lock) is held from the look-up until the new
    job's meta.json exists and its supervisor runs, so concurrent calls with
    one key start one job; it is let go before the snapshot wait.
    """
    error = _text_error("--key", o.key, KEY_MAX)
    if error:
        raise AgentExecError("invalid_argument", error)
    root = _root(o)
    _ensure_root(root)
    _gc_after_ms()
    scope = o.key_scope or "running"
    accept = (lambda job: job.state == "running") if scope == "running" else None
    lock_fd = _lock_file(_index_dir(root, "key", o.key) + ".lock")
    try:
        job = _find_indexed(root, "key", o.key, accept)
        if job is None:
            spec = _job_spec(o)
            job_id = _start_job(root, spec)
    finally:
        os.close(lock_fd)
    if job is None:
        out = _run_answer(o, root, job_id, spec)
        out["reused"] = False
        return out
    meta = job.meta
    seen = {
        "ready_match": meta.get("ready_match"),
        "ready_port": meta.get("ready_port"),
        "stdin_open": bool(meta.get("stdin_open")),
        "pty": meta.get("pty_size"),
        "explicit_env": [],
        "masks": [],
        "port": meta.get("port"),
    }
    try:
        observed_ms = int((time.time() - _parse_rfc3339(job.started_at())) * 1000)
    except ValueError:
        observed_ms = MAX_SNAPSHOT_AFTER_MS
    out = _run_answer(o, root, job.id, seen, observed_ms=max(0, observed_ms))
    out["reused"] = True
    return out


# -- ports: run --port --------------------------------------------------------------
#
# A port that run --port hands out is reserved in <root>/ports/<port>.json
# (under <root>/ports/.lock) until its job is over: two `--port auto` at
# once cannot get the same port, although neither job listens yet.  A
# reservation names its job once the job exists; before that it is held by
# the run that made it, for at most _PORT_HOLD_S.

PORTS_DIR = "ports"
_PORT_HOLD_S = 60.0


def _reservation_path(root: str, port: int) -> str:
    return "%s/%s/%d.json" % (root, PORTS_DIR, port)


def _reserved_by(root: str, port: int) -> "tuple":
    """(held, job id or None): whether a live job (or a run making one) holds ``port``."""
    try:
        res = _read_json(_reservation_path(root, port))
    except (OSError, ValueError):
        return False, None
    job_id = res.get("job_id")
    if isinstance(job_id, str) and is_job_id(job_id):
        try:
            job = load_job(root, job_id)
        except AgentExecError:
            return False, None
        return not job.terminal, job_id
    fresh = time.time() - (res.get("at") or 0) < _PORT_HOLD_S
    return fresh and _is_alive(res.get("pid"), res.get("pid_start_time")), None


def _write_reservation(root: str, port: int, job_id: "str | None") -> None:
    doc = {"port": port, "job_id": job_id, "pid": os.getpid(), "at": time.time()}
    doc["pid_start_time"] = _proc_start_time(os.getpid())
    try:
        _write_json_atomic(_reservation_path(root, port), doc)
    except OSError as e:
        raise AgentExecError("io_error", "cannot reserve port %d: %s" % (port, e.strerror))


def _reserve_port(root: str, port: int) -> int:
    """run --port N: refuse a port that is taken (port_in_use), else reserve it."""
    lock_fd = _lock_file("%s/%s/.lock" % (root, PORTS_DIR))
    try:
        _refuse_port_in_use(port, root)
        _write_reservation(root, port, None)
    finally:
        os.close(lock_fd)
    return port


def _pick_port(root: str) -> int:
    """run --port auto: a port of 127.0.0.1 that is free and not reserved, reserved."""
    import socket

    lock_fd = _lock_file("%s/%s/.lock" % (root, PORTS_DIR))
    try:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))  # the kernel's choice of a free port
                port = sock.getsockname()[1]
            if not _reserved_by(root, port)[0] and not _probe_port(port):
                _write_reservation(root, port, None)
                return port
    except OSError as e:
        raise AgentExecError("io_error", "cannot find a free port: %s" % (e.strerror or e))
    finally:
        os.close(lock_fd)
    raise AgentExecError("port_in_use", "no free port found on 127.0.0.1 in 100 tries")


def _claim_port(root: str, port: int, job_id: str) -> None:
    """The reservation of ``port`` names its job, now that the job exists."""
    try:
        _write_reservation(root, port, job_id)
    except AgentExecError as e:
        _log(1, "port %d: %s" % (port, e.message))


def _job_holding(root: str, pids: list) -> "str | None":
    """The running job of ``root`` whose tree holds one of ``pids`` (an error path)."""
    if not pids or not os.path.isdir(root):
        return None
    for name, _entry in _iter_jobs(root):
        try:
            job = load_job(root, name)
        except AgentExecError:
            continue
        if job.state == "running" and set(pids).intersection(_job_pids(job)):
            return job.id
    return None


# -- housekeeping: the automatic gc of run (and create, start) ------------------------
#
# Terminal jobs older than AGENT_EXEC_GC_AFTER (default 30 days; "off": never)
# are removed by run itself, a little at a time.  At most once an hour a sweep
# starts: one listing of the root writes the ids created before the cut-off
# (no other job can have finished before it) to <root>/.gc-queue, oldest
# first, and <root>/.gc-state.json says how far the sweep got.  Each later
# call examines at most AUTO_GC_BATCH of those jobs, removes at most
# AUTO_GC_REMOVALS, and stops early after AUTO_GC_BUDGET_S, so a run pays a
# bounded few milliseconds however large the root; once the queue is done, a
# run pays one read of the state file.
# A job is removed as gc removes it, and never while a process of it lives.

DEFAULT_GC_AFTER_MS = 30 * 86400000
AUTO_GC_EVERY_S = 3600
AUTO_GC_DELAY_S = 0.1  # after the job's start: its start-up goes first
AUTO_GC_BATCH = 8  # job directories examined per call, at most
AUTO_GC_REMOVALS = 1  # and removed: a removal is most of the cost (1-3 ms of I/O)
AUTO_GC_BUDGET_S = 0.002
GC_STATE = ".gc-state.json"
GC_QUEUE = ".gc-queue"
GC_LOCK = ".gc.lock"


def _gc_after_ms() -> "int | None":
    """AGENT_EXEC_GC_AFTER as ms; None for off; invalid_argument when malformed."""
    text = os.environ.get("AGENT_EXEC_GC_AFTER", "").strip()
    if not text:
        return DEFAULT_GC_AFTER_MS
    if text.lower() == "off":
        return None
    try:
        ms = parse_duration_ms(text)
    except ValueError as e:
        ms, why = 0, str(e)
    else:
        why = "0 would remove every finished job at once; to disable: off"
    if ms <= 0:
        raise AgentExecError(
            "invalid_argument", "AGENT_EXEC_GC_AFTER=%r: %s (e.g. 30d, 12h, off)" % (text, why)
        )
    return ms


def _ulid_prefix(ms: int) -> str:
    """The 10 time characters of a ULID made at ``ms``: ids below it are older."""
    out = []
    for _ in range(10):
        ms, r = divmod(ms, 32)
        out.append(_CROCKFORD[r])
    return "".join(reversed(out))


def _auto_gc(root: str, after_ms: "int | None" = -1) -> None:
    """One bounded step of the automatic clean-up; never fails the caller.

    The supervisor of each job that run (or start) launches calls it, 0.1 s
    after the job started or, if it is over sooner, before its terminal state: off
    the path of run's answer.  A command that launches no supervisor
    (create) calls it itself.  ``after_ms``: AGENT_EXEC_GC_AFTER as resolved
    by the caller (None: off); by default read here.
    """
    try:
        if after_ms == -1:
            after_ms = _gc_after_ms()
        if after_ms is not None:
            _auto_gc_step(root, after_ms)
    except (AgentExecError, OSError, ValueError) as e:
        _log(1, "automatic gc: %s" % (getattr(e, "message", None) or e))


def _gc_state(root: str) -> dict:
    try:
        return _read_json(root + "/" + GC_STATE)
    except (OSError, ValueError):
        return {}


def _sweep_pending(state: dict, now: float) -> bool:
    """True when a call has work: a sweep to go on with, or one to start."""
    if (state.get("offset") or 0) < (state.get("total") or 0):
        return True
    return not 0 <= now - (state.get("started_at") or 0) < AUTO_GC_EVERY_S


def _auto_gc_step(root: str, after_ms: int) -> None:
    now = time.time()
    if not _sweep_pending(_gc_state(root), now):
        return  # the common case: one small read
    lock_fd = _lock_file(root + "/" + GC_LOCK, blocking=False)
    if lock_fd is None:
        return  # another call is at it
    try:
        state = _gc_state(root)  # again, under the lock
        if not _sweep_pending(state, now):
            return
        offset, total = state.get("offset") or 0, state.get("total") or 0
        if offset >= total:
            cut = _ulid_prefix(int(now * 1000) - after_ms)
            old = sorted(name for name, _entry in _iter_jobs(root) if name < cut)
            _write_file_atomic(
                root + "/" + GC_QUEUE, "".join(n + "\n" for n in old).encode(), 0o600
            )
            _write_json_atomic(
                root + "/" + GC_STATE, {"started_at": now, "offset": 0, "total": len(old)}
            )
            return  # the listing is this call's share of the work
        with open(root + "/" + GC_QUEUE, "rb") as f:
            f.seek(offset * 27)  # 26 characters and a newline per id
            batch = f.read(AUTO_GC_BATCH * 27).decode("ascii", "replace").split()
        t0 = time.monotonic()
        processes = {}  # type: dict
        done = removed = 0
        for job_id in batch:
            done += 1
            if is_job_id(job_id) and _auto_gc_job(root, job_id, now, after_ms, processes):
                removed += 1
            if removed >= AUTO_GC_REMOVALS or time.monotonic() - t0 > AUTO_GC_BUDGET_S:
                break
        state["offset"] = offset + done if batch else total
        _write_json_atomic(root + "/" + GC_STATE, state)
    finally:
        os.close(lock_fd)


def _auto_gc_job(root: str, job_id: str, now: float, after_ms: int, processes: dict) -> bool:
    """Remove one job if it is terminal, finished before the cut-off, and has no
    live process (gc's own rules)."""
    try:
        job = load_job(root, job_id)
    except AgentExecError:
        return False
    if not job.terminal:
        return False
    stamp = job.record.get("finished_at") or job.meta.get("created_at")
    # RFC 3339 stamps of one format sort as text: no date parsing (whose
    # import of calendar costs more than the rest of the step).
    if not isinstance(stamp, str) or stamp >= _rfc3339(now - after_ms / 1000.0):
        return False
    if _lingering(job, processes):
        return False
    going = "%s/.deleting-%s-%s" % (root, job_id, os.urandom(4).hex())
    try:
        os.rename(job.dir, going)  # out of the job namespace at once, as _remove_job does
    except OSError:
        return False
    try:  # a job directory holds files only: no need for shutil (5 ms to import)
        for name in os.listdir(going):
            os.unlink(going + "/" + name)
        os.rmdir(going)
    except OSError:
        import shutil

        shutil.rmtree(going, ignore_errors=True)
    return True


# ---- status, tail ---------------------------------------------------------------

# Lifecycle and guards, in status: the attempt, the last one's result, the
# lease, the measures of the limits and the limit that ended the job.
LIMIT = obj(
    (
        Field("name", {"enum": ["memory", "cpu", "procs", "output"]}, True),
        Field("value", COUNT, True),
        Field("measured", COUNT, True),
    )
)
PREVIOUS = obj(
    (
        Field("attempt", COUNT, True),
        Field("state", JOB_STATE, True),
        Field("started_at", STR_OR_NULL),
        Field("limit", LIMIT),
    )
    + RESULT_FIELDS
)
GUARD_FIELDS = (
    Field("attempt", COUNT),
    Field("previous", PREVIOUS),
    Field("lease_ms", COUNT),
    Field("lease_expires_at", STR_OR_NULL),
    Field("memory_peak_bytes", COUNT),
    Field("cpu_ms", COUNT),
    Field("limit", LIMIT),
    Field("env_not_stored", STRS),
)
# status/read/wait --renew: whether the lease was renewed in passing (only with --renew).
RENEWED = Field("renewed", BOOL)
# read/wait --match: the cursor given was of an earlier attempt (see _attempt_cursor).
CURSOR_RESET = Field("cursor_reset", BOOL)


def _attempt_of(job: _Job) -> int:
    """The job's attempt: 1 for its first run, N+1 after N restarts."""
    n = max(job.meta.get("attempt") or 1, job.record.get("attempt") or 1)
    return n if isinstance(n, int) else 1


def _guard_fields(job: _Job) -> dict:
    """status's lifecycle and guard fields (attempt always; the rest when used)."""
    record = job.record
    out = {"attempt": _attempt_of(job)}
    if isinstance(job.meta.get("previous"), dict):
        out["previous"] = job.meta["previous"]
    lease = record.get("lease_ms") or job.meta.get("lease_ms")
    if lease:
        out["lease_ms"] = lease
        out["lease_expires_at"] = record.get("lease_expires_at") if job.state == "running" else None
    for key in ("memory_peak_bytes", "cpu_ms"):
        if isinstance(record.get(key), int):
            out[key] = record[key]
    if isinstance(record.get("limit"), dict) and job.terminal:
        out["limit"] = record["limit"]
    # The --env keys: their values live only in the running attempt's
    # environment, never on disk; start/restart need them given again.
    keys = (job.meta.get("definition") or {}).get("explicit_env_keys")
    if isinstance(keys, list) and keys:
        out["env_not_stored"] = keys
    return out


# name, tags, owner, key and port of a job, in status and list entries.
FINDING_FIELDS = (
    Field("name", STR_OR_NULL, True),
    Field("tags", STRS, True),
    Field("owner", STR_OR_NULL, True),
    Field("key", STR_OR_NULL, True),
    Field("port", {"type": ["integer", "null"]}, True),
)


def _finding_fields(job: _Job, tagged: "set | None" = None) -> dict:
    meta = job.meta
    port = meta.get("port")
    return {
        "name": meta.get("name"),
        "tags": _job_tags(job, tagged),
        "owner": meta.get("owner"),
        "key": meta.get("key"),
        "port": port if isinstance(port, int) else None,
    }


RUSAGE_FIELDS = (
    Field("max_rss_kb", COUNT, True),
    Field("user_ms", COUNT, True),
    Field("sys_ms", COUNT, True),
)


@command(
    "status",
    "show a job's state",
    tool_help=(
        "Show one job's state without waiting: running, exited, killed or failed, "
        "exit_code, signal, end_reason, success, pid, output sizes, idle_ms, readiness, "
        "waiting_for_input. Cheap: call it whenever you need to know where a job is. "
        "Next: read for output, wait to block until the end."
    ),
    opts=FORMAT_OPTS + (RENEW, KEY_INSTEAD, JOB_ID_OR_KEY),
    checks=(_format_conflict, _id_or_key),
    table=lambda answer, color: _status_table(answer, color),
    returns=JOB_HEAD
    + (Field("started_at", STR_OR_NULL, True),)
    + RESULT_FIELDS
    + DROPPED_FIELDS
    + (
        Field("pid", COUNT),
        Field("updated_at", STR),
        Field("log_error", STR_OR_NULL),
        Field("descendants", array(COUNT)),
        Field("stdout_bytes", COUNT),
        Field("stderr_bytes", COUNT),
        Field("last_output_at", STR_OR_NULL),
        Field("idle_ms", COUNT),
        Field("ready", BOOL),
        Field("ready_at", STR_OR_NULL),
        Field("rusage", obj(RUSAGE_FIELDS)),
        Field("ports", array(COUNT)),
        Field("waiting_for_input", BOOL),
        Field("input_prompt", STR),
    )
    + GUARD_FIELDS
    + (RENEWED,)
    + FINDING_FIELDS,
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_status(o) -> dict:
    job = _open_job(o, o.job_id)
    job, renewed = _renew_in_passing(o, job)
    record = job.record
    running = job.state == "running"
    # A created job has not started: started_at is null (created_at is in meta.json).
    started = job.started_at() if job.state != "created" else None
    out = {"job_id": job.id, "state": job.state, "started_at": started}
    out.update(job.result_fields())
    if record.get("pid") is not None:
        out["pid"] = record["pid"]
    out["log_error"] = record.get("log_error")
    out.update(job.dropped())
    if running and record.get("updated_at"):
        out["updated_at"] = record["updated_at"]
    # Output so far: sizes and the time of the last write, from the logs
    # themselves, so the supervisor need not rewrite state.json per chunk.
    last = None
    for stream, st in zip(_STREAMS, _log_stats(job)):
        size = st.st_size if st is not None else 0
        out[stream + "_bytes"] = (record.get(stream + "_dropped_bytes") or 0) + size
        if size:
            last = st.st_mtime if last is None else max(last, st.st_mtime)
    out["last_output_at"] = _rfc3339(last) if last is not None else None
    if out["last_output_at"] is not None and out["last_output_at"] < (started or ""):
        # A file's mtime comes from a coarser clock than time.time() (the
        # kernel's tick): output of the job's first milliseconds can look
        # older than the job.  Never report it so (same format: text order
        # is time order).
        out["last_output_at"] = out["started_at"]
    if running:
        since = last
        if since is None:
            try:
                since = _parse_rfc3339(out["started_at"])
            except ValueError:
                since = None
        if since is not None:
            out["idle_ms"] = max(0, int((time.time() - since) * 1000))
    if record.get("ready") is not None:
        out["ready"] = bool(record["ready"])
        out["ready_at"] = record.get("ready_at")
    if not running and isinstance(record.get("rusage"), dict):
        out["rusage"] = record["rusage"]
    descendants = _live_descendants(job)
    if descendants is not None:
        out["descendants"] = descendants
    if _IS_LINUX:
        pids = list(descendants or [])
        if running and isinstance(record.get("pid"), int):
            pids.insert(0, record["pid"])
        out["ports"] = _listening_ports(pids)
        out["waiting_for_input"] = running and _waiting_for_input(pids, _stdin_target(job))
        if out["waiting_for_input"]:
            prompt = _input_prompt(job)
            if prompt is not None:
                out["input_prompt"] = prompt
    out.update(_guard_fields(job))
    if renewed is not None:
        out["renewed"] = renewed
    out.update(_finding_fields(job))
    return out


# The system calls in which a process waits for input, by machine (the numbers
# differ): those that read the fd given as their first argument (read,
# pread64, readv), and those that wait for several fds to become readable
# (select and pselect6 take a bitmap, poll and ppoll an array of pollfd).
_READ_SYSCALLS = {"x86_64": (0, 17, 19), "aarch64": (63, 67, 65)}
_SELECT_SYSCALLS = {"x86_64": (23, 270), "aarch64": (72,)}
_POLL_SYSCALLS = {"x86_64": (7, 271), "aarch64": (73,)}
# A poll or select over more fds than this is a server's loop, not a prompt.
_WAIT_FDS_MAX = 64
INPUT_PROMPT_MAX = 200


# Where a process sleeps (/proc/<pid>/wchan) when it is blocked reading a
# pipe or a terminal: what is read when /proc/<pid>/syscall is not allowed.
_INPUT_WCHANS = ("pipe_read", "pipe_wait", "wait_woken", "n_tty_read", "tty_read")


def _stdin_target(job: _Job) -> "str | None":
    """What the job's stdin is, as /proc/<pid>/fd shows it ("pipe:[123]",
    "/dev/pts/4"), from state.json; "" for /dev/null or a file (it never
    blocks); None for a job recorded before this was (any pipe or terminal)."""
    target = job.record.get("stdin_target", None if "stdin_target" not in job.record else "")
    return target if isinstance(target, str) or target is None else ""


def _waiting_for_input(pids: list, stdin: "str | None" = None) -> bool:
    """True when one of ``pids`` is blocked reading the job's stdin: the pipe
    of --stdin-open or the terminal of --pty (``stdin``, see _stdin_target).

    Linux: /proc/<pid>/syscall names the call a blocked process sleeps in,
    and its arguments; /proc/<pid>/fd tells that the fd it waits on is the
    job's stdin, not a socket, a file or a pipe between two of the job's
    processes (`make | tee log` does not wait for input).  A read(2) names
    its fd; a select(2) or poll(2) (a REPL with readline, less, top) names a
    set of fds in its memory, read from /proc/<pid>/mem where that is
    allowed, else only a select on fd 0 alone (nfds 1) is recognised.  Where
    /proc/<pid>/syscall cannot be read, /proc/<pid>/wchan saying the process
    sleeps in a pipe or terminal read, with the job's stdin as its fd 0,
    counts.  A stdin of /dev/null or a file never blocks, so never counts.
    """
    if stdin == "":
        return False
    machine = os.uname().machine
    reads = _READ_SYSCALLS.get(machine, ())
    selects = _SELECT_SYSCALLS.get(machine, ())
    polls = _POLL_SYSCALLS.get(machine, ())
    for pid in pids:
        try:
            fd0 = os.readlink("/proc/%d/fd/0" % pid)
        except OSError:
            fd0 = None
        want = stdin if stdin is not None else fd0  # an older job: the process's own stdin
        if not want or not want.startswith(("pipe:", "/dev/pts/", "/dev/tty")):
            continue
        try:
            with open("/proc/%d/syscall" % pid) as f:
                fields = f.read().split()
            number, args = int(fields[0]), [int(a, 16) for a in fields[1:4]]
        except PermissionError:
            if fd0 == want and _read_text("/proc/%d/wchan" % pid) in _INPUT_WCHANS:
                if not _other_streams(pid, want):  # then the sleep can only be on stdin
                    return True
            continue
        except (OSError, ValueError, IndexError):  # gone, or not in a call
            continue
        if number in reads:
            fds = [args[0]]
        elif number in selects:
            fds = _selected_fds(pid, args[0], args[1])
        elif number in polls:
            fds = _polled_fds(pid, args[0], args[1])
        else:
            continue
        for fd in fds:
            try:
                target = os.readlink("/proc/%d/fd/%d" % (pid, fd))
            except OSError:
                continue
            if target == want or (target == "/dev/tty" and want.startswith("/dev/pts/")):
                return True
    return False


def _other_streams(pid: int, stdin: str) -> bool:
    """True when ``pid`` holds a pipe, socket or terminal other than ``stdin``:
    a sleep in a pipe or terminal read may then be on that one."""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return True
    for fd in fds:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target != stdin and target.startswith(("pipe:", "socket:", "/dev/pts/", "/dev/tty")):
            return True
    return False


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _peek(pid: int, address: int, size: int) -> "bytes | None":
    """``size`` bytes of process ``pid``'s memory, or None when that is not allowed."""
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, address)
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if len(data) == size else None


def _selected_fds(pid: int, nfds: int, readfds: int) -> list:
    """The fds a select(2) waits to read; [0] alone is known without its memory."""
    if not readfds or not 0 < nfds <= _WAIT_FDS_MAX:
        return []
    if nfds == 1:
        return [0]
    bitmap = _peek(pid, readfds, (nfds + 7) // 8)
    if bitmap is None:
        return []
    return [fd for fd in range(nfds) if bitmap[fd // 8] >> (fd % 8) & 1]


def _polled_fds(pid: int, pollfds: int, nfds: int) -> list:
    """The fds a poll(2) waits to read (POLLIN), from its array of struct pollfd."""
    if not pollfds or not 0 < nfds <= _WAIT_FDS_MAX:
        return []
    data = _peek(pid, pollfds, 8 * nfds)  # struct pollfd: int fd; short events, revents
    if data is None:
        return []
    out = []
    for i in range(nfds):
        fd = int.from_bytes(data[8 * i : 8 * i + 4], sys.byteorder, signed=True)
        events = int.from_bytes(data[8 * i + 4 : 8 * i + 6], sys.byteorder)
        if fd >= 0 and events & 1:  # POLLIN
            out.append(fd)
    return out


def _input_prompt(job: _Job) -> "str | None":
    """The last line of output that has no newline yet (a prompt), or None.

    On a --pty job, as the terminal shows it (escape sequences removed).
    """
    best = None
    for path, st in zip((job.path(STDOUT_LOG), job.path(STDERR_LOG)), _log_stats(job)):
        if st is None or not st.st_size:
            continue
        data, _size, _cut = tail_bytes(path, 1, 4 * INPUT_PROMPT_MAX)
        if data and not data.endswith(b"\n"):
            if best is None or st.st_mtime >= best[0]:
                best = (st.st_mtime, _decode(data.rsplit(b"\n", 1)[-1]))
    if best is None:
        return None
    prompt = best[1]
    if job.meta.get("pty") and ("\x1b" in prompt or "\r" in prompt):
        # A terminal program draws its prompt (colours, a line editor's
        # redraws): what it shows is the prompt.
        prompt = _plain_text(prompt)
    return prompt[-INPUT_PROMPT_MAX:] or None


def _job_pids(job: _Job) -> list:
    """The live processes of a running job: its main process and its descendants."""
    pids = list(_live_descendants(job) or [])
    main = job.record.get("pid")
    if isinstance(main, int) and _is_alive(main, job.record.get("pid_start_time")):
        pids.insert(0, main)
    return pids


def _live_descendants(job: _Job) -> "list | None":
    """Pids still alive in the job's tree, via its live supervisor, or None."""
    sup = job.record.get("supervisor_pid")
    if not isinstance(sup, int) or sup <= 1:
        return None
    if not _supervisor_alive(job):
        return [] if job.terminal else None
    main_pid = job.record.get("pid")
    return [p for p in _descendants_of(sup) if p != main_pid]


def _lingering(job: _Job, cache: "dict | None" = None) -> list:
    """The live processes of a terminal job: its supervisor, and what the job left.

    What the job left is every live descendant of its supervisor (on Linux
    the supervisor adopts them all) and every process still in the job's
    process group (elsewhere an orphan leaves the tree but keeps its group).
    ``cache`` (a dict) shares one _process_table() between the jobs of a
    walk; the table is only made for a job that may have such processes.
    [] for a running job, and for a job whose every process has ended.
    """
    if not job.terminal:
        return []
    cache = {} if cache is None else cache
    sup = job.record.get("supervisor_pid")
    if _IS_LINUX and cache.get("checked", 0) >= _LINGER_TABLE_AFTER:
        # Many jobs (list --all): one walk of /proc answers every job, where
        # asking the kernel per job would cost two calls each.
        sup_alive, group = _lingering_from_table(job, sup, cache)
    else:
        cache["checked"] = cache.get("checked", 0) + 1
        sup_alive = isinstance(sup, int) and sup > 1 and _supervisor_alive(job)
        group = job.record.get("pid") if _job_group_alive(job) else None
    if not sup_alive and group is None:
        return []
    if "table" not in cache:
        cache["table"] = _process_table()
    table = cache["table"]
    pids = [sup] if sup_alive else []
    if sup_alive:
        pids += _descendants_of(sup, table=table)
    if group is not None:
        pids += [p for p, (_ppid, pgid, _start) in table.items() if pgid == group and p not in pids]
    return [p for p in pids if p != os.getpid()]


# After this many jobs checked one by one, _lingering reads the process table once.
_LINGER_TABLE_AFTER = 64


def _lingering_from_table(job: _Job, sup, cache: dict) -> "tuple":
    """(supervisor alive, the job's group or None), from one process table (Linux)."""
    if "table" not in cache:
        cache["table"] = _process_table()
    table = cache["table"]
    if "groups" not in cache:
        cache["groups"] = {pgid for _ppid, pgid, _start in table.values()}
    entry = table.get(sup) if isinstance(sup, int) and sup > 1 else None
    sup_alive = entry is not None and entry[2] == job.record.get("supervisor_start_time")
    group = job.record.get("pid")
    if not isinstance(group, int) or group <= 1 or group not in cache["groups"]:
        return sup_alive, None
    leader = table.get(group)  # see _job_group_alive: a live leader must be the workload
    if leader is not None and leader[2] != job.record.get("pid_start_time"):
        return sup_alive, None
    return sup_alive, group


def _job_group_alive(job: _Job) -> bool:
    """True when the job's own process group still has a member.

    The group's id is the workload's pid.  While a process with that pid
    lives, the group is the job's only if that process is the workload (its
    start time matches); a pid cannot be handed out again while a group of
    that id exists, so a group whose leader is gone is still the job's.
    """
    group = job.record.get("pid")
    if not isinstance(group, int) or group <= 1:
        return False
    try:
        os.killpg(group, 0)
    except OSError:  # no such group, or someone else's (EPERM)
        return False
    leader = _proc_start_time(group)
    return leader is None or leader == job.record.get("pid_start_time")


def _lingering_reason(job: _Job, pids: list) -> str:
    """Why delete or gc leaves a job alone: its processes, and how to end them."""
    others = [p for p in pids if p != job.record.get("supervisor_pid")]
    if not others:
        what = "its supervisor (pid %d) is still finishing" % pids[0]
        return what + "; try again in a moment"
    what = "%d process%s of the job still run%s (pid %s)" % (
        len(others),
        "" if len(others) == 1 else "es",
        "s" if len(others) == 1 else "",
        ", ".join(str(p) for p in others[:10]) + (", ..." if len(others) > 10 else ""),
    )
    them = "it" if len(others) == 1 else "them"
    return "%s; end %s with: agent-exec kill %s (or --signal KILL)" % (what, them, job.id)


# A job's supervisor outlives its terminal state by a moment (it delivers the
# completion event, then exits); delete waits this long for that.
_SUPERVISOR_EXIT_WAIT_S = 2.0


def _settled_lingering(job: _Job) -> list:
    """_lingering(), after a short wait for a supervisor that is only finishing."""
    pids = _lingering(job)
    deadline = time.monotonic() + _SUPERVISOR_EXIT_WAIT_S
    while pids == [job.record.get("supervisor_pid")] and time.monotonic() < deadline:
        time.sleep(0.01)
        pids = _lingering(job)
    return pids


@command(
    "tail",
    "show the end of a job's output",
    tool_help=(
        "Show the last lines of a job's stdout and stderr (tail_lines, max_bytes), with a "
        "cursor that read can continue from. Use it to look at a long log's end; use read "
        "to go through output in order."
    ),
    opts=(TAIL_LINES, MAX_BYTES, PLAIN) + FORMAT_OPTS + (JOB_ID,),
    checks=(_format_conflict,),
    table=lambda answer, color: _tail_table(answer, color),
    returns=(Field("job_id", STR, True), Field("state", JOB_STATE))
    + LOG_PATH_FIELDS
    + SNAPSHOT_FIELDS
    + DROPPED_FIELDS
    + (CURSOR_FIELD,),
    annotations={"readOnlyHint": True, "idempotentHint": True},
)
def cmd_tail(o) -> dict:
    job = _open_job(o, o.job_id)
    out = {"job_id": job.id, "state": job.state}
    snap, out["cursor"] = take_snapshot(job, o.tail_lines, o.max_bytes)
    if o.plain:
        _plain_snapshot(snap)
    out.update(snap)
    out.update(job.log_paths())
    out.update(job.dropped())
    return out


# ---- create, start, restart -----------------------------------------------------
#
# A job's definition (meta.json "definition": everything the supervisor is
# told but the environment's values) is recorded by `run` and `create`;
# `start` and `restart` launch a supervisor from it.  Environment values are
# never written to disk: the environment of an attempt is the caller's own
# (unless --no-inherit-env), then --noninteractive's, then the recorded
# --env-file files, read again, then the --env given to start/restart.  Keys
# of the recorded --env whose values were not given again are named in the
# answer's env_missing.

# run's options that only say how `run` watches the job it started: `create`
# takes all of run's options but these; `start` and `restart` take these.
_OBSERVE_OPTS = ("snapshot_after", "tail_lines", "max_bytes", "wait", "exit_code", "wait_poll_ms")
_CREATE_OPTS = tuple(opt for opt in _RUN_OPTS if opt.name not in _OBSERVE_OPTS)
_START_OPTS = tuple(opt for opt in _RUN_OPTS if opt.name in _OBSERVE_OPTS + ("env", "env_file")) + (
    JOB_ID,
)
_ATTEMPT_FIELDS = (
    Field("attempt", COUNT, True),
    Field("previous", PREVIOUS),
    Field("env_missing", STRS),
    Field("note", STR),
)


def _definition(spec: dict) -> dict:
    """meta.json's "definition": what start/restart need, without environment values."""
    out = {key: spec[key] for key in _SUPERVISOR_KEYS if key not in ("env", "secrets")}
    out.update(
        env_files=spec.get("env_files") or [],
        explicit_env_keys=[k for k, _v in spec["explicit_env"]],
        noninteractive=bool(spec.get("noninteractive")),
        inherit_env=spec["inherit_env"],
        masks=spec["masks"],
        stdin=spec["stdin"] is not None,
    )
    return out


@command(
    "create",
    "record a job without starting it (state created; `start` starts it)",
    tool_help=(
        "Record a job (command, cwd, environment keys, timeout, readiness, limits: the "
        "options of run) without starting it; its state is created. Use it to prepare a job "
        "that another step starts. Next: start with its job_id."
    ),
    opts=_CREATE_OPTS,
    checks=_JOB_CHECKS,
    returns=JOB_HEAD
    + LOG_PATH_FIELDS
    + (Field("created_at", STR, True), Field("env_vars", STRS), Field("port", COUNT)),
    annotations={"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False},
)
def cmd_create(o) -> dict:
    """Check everything as `run` does, record the job (state.json first, then meta.json)."""
    spec = _job_spec(o)
    root = _root(o)
    _ensure_root(root)
    _auto_gc(root)  # no supervisor comes to do it (see _auto_gc)
    job_id, job_dir = _create_job_dir(root)
    _index_job(root, job_id, spec)  # its name and key find it before it starts
    meta = _meta_document(job_id, root, job_dir, spec)
    doc = _state_document(job_id, "created", _JobFacts())
    doc["job"]["started_at"] = None
    try:
        if spec["stdin"] is not None:
            _write_private_file(os.path.join(job_dir, STDIN_FILE), spec["stdin"])
        # state.json before meta.json: a job with meta.json and no state.json
        # reads as one whose supervisor is starting (or lost).
        _write_json_atomic(os.path.join(job_dir, STATE), doc, durable=True)
        _write_json_atomic(os.path.join(job_dir, META), meta, durable=True)
    except OSError as e:
        raise AgentExecError("io_error", "cannot record job %s: %s" % (job_id, e.strerror or e))
    if spec.get("port"):
        _claim_port(root, spec["port"], job_id)
    out = {"job_id": job_id, "state": "created", "created_at": meta["created_at"]}
    out.update(_Job(job_id, job_dir, meta, doc, "created", None).log_paths())
    if spec["explicit_env"]:
        out["env_vars"] = ["%s=<not stored>" % k for k, _v in spec["explicit_env"]]
    if spec.get("port"):
        out["port"] = spec["port"]
    return out


@command(
    "start",
    "start a created job with the options it was created with; answers like run",
    tool_help=(
        "Start a job recorded by create, with the options it was created with; the answer is "
        "like run's (snapshot, cursor, readiness). --env values are never stored: give env "
        "again if the job needs them (the answer's env_missing names them). Next: read, "
        "wait, status."
    ),
    opts=_START_OPTS,
    checks=(_exit_code_needs_wait,),
    exit_status=_passed_on_exit_status,
    returns=COMMANDS["run"].returns + _ATTEMPT_FIELDS,
    annotations={
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
        "openWorldHint": True,
    },
)
def cmd_start(o) -> dict:
    root = _root(o)
    _check_root(root)
    job_id = resolve_job(root, o.job_id)
    meta_path = os.path.join(root, job_id, META)
    fd = _open_meta(meta_path)
    try:
        if not _lock_now(fd):  # a supervisor (or another start) holds it
            raise AgentExecError("invalid_state", _not_created(load_job(root, job_id)))
        job = load_job(root, job_id)
        if job.state != "created":
            raise AgentExecError("invalid_state", _not_created(job))
        cfg, spec = _attempt_config(o, job, 1)
    except BaseException:
        os.close(fd)
        raise
    return _launch_attempt(o, root, job, fd, cfg, spec)


def _not_created(job: _Job) -> str:
    return "job %s is %s, not created: start starts a created job once (restart runs it again)" % (
        job.id,
        job.state,
    )


def _open_meta(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as e:
        raise AgentExecError("io_error", "cannot open %s: %s" % (path, e.strerror or e))


def _lock_now(fd: int, timeout: float = 0.0) -> bool:
    """Take the exclusive job lock on ``fd`` within ``timeout`` s (polling); True if taken."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _attempt_env(definition: dict, o) -> "tuple":
    """(env, explicit pairs, missing keys) of a new attempt (see the section's banner)."""
    env = dict(os.environ) if definition.get("inherit_env", True) else {}
    if definition.get("noninteractive"):
        env.update(NONINTERACTIVE_ENV)
    if definition.get("pty"):
        env["TERM"] = PTY_TERM  # as run --pty sets it
    for path in list(definition.get("env_files") or ()) + list(getattr(o, "env_file", None) or ()):
        for key, value in _parse_env_file(path):
            env[key] = value
    explicit = []
    for item in getattr(o, "env", None) or ():
        key, _, value = item.partition("=")
        env[key] = value
        explicit.append((key, value))
    given = {k for k, _v in explicit}
    missing = [k for k in definition.get("explicit_env_keys") or () if k not in given]
    return env, explicit, missing


def _attempt_config(o, job: _Job, attempt: int, check_port: bool = True) -> "tuple":
    """(supervisor config, spec for the answer) of attempt ``attempt``: checked, nothing changed."""
    definition = job.meta.get("definition")
    if not isinstance(definition, dict):
        raise AgentExecError(
            "invalid_state",
            "job %s was recorded without its definition (an older agent-exec): run it anew"
            % job.id,
        )
    env, explicit, missing = _attempt_env(definition, o)
    cwd = _job_cwd(definition["cwd"])
    _resolve_command(definition["argv"][0], cwd, env)
    if check_port and definition.get("ready_port"):
        _refuse_port_in_use(definition["ready_port"])
    cfg = {key: definition.get(key) for key in _SUPERVISOR_KEYS if key not in ("env", "secrets")}
    masks = definition.get("masks") or []
    port = job.meta.get("port")
    if isinstance(port, int):  # run --port: the same port for every attempt
        env["PORT"] = env["AGENT_EXEC_PORT"] = str(port)
    cfg.update(env=env, secrets=[env[k] for k in masks if env.get(k)], attempt=attempt)
    cfg["auto_gc_after_ms"] = _gc_after_ms()  # its supervisor takes a clean-up step
    has_stdin = definition.get("stdin")
    cfg["stdin_path"] = os.path.join(job.dir, STDIN_FILE) if has_stdin else None
    spec = {
        "stdin_open": bool(definition.get("stdin_open")),
        "pty": definition.get("pty"),
        "explicit_env": explicit,
        "masks": masks,
        "missing": missing,
        "ready_match": definition.get("ready_match"),
        "ready_port": definition.get("ready_port"),
        "port": port if isinstance(port, int) else None,  # answered like run's
    }
    return cfg, spec


class _Overlay:
    """The options ``o`` with some attributes replaced (run's answer path reads them)."""

    def __init__(self, o, **values) -> None:
        self.__dict__.update(values)
        self._o = o

    def __getattr__(self, name: str):
        return getattr(self._o, name)


def _launch_attempt(o, root: str, job: _Job, lock_fd: int, cfg: dict, spec: dict) -> dict:
    """Hand the job (its lock ``lock_fd``, closed here) to a new supervisor; answer like run."""
    try:
        ready = _launch_supervisor(job.dir, lock_fd, cfg)
    finally:
        os.close(lock_fd)
    if not ready.get("ok"):
        doc = _bare_state(job.id, "failed", "supervisor_failed", "the supervisor did not start")
        doc["attempt"] = cfg["attempt"]
        _write_json_atomic(os.path.join(job.dir, STATE), doc, durable=True)
    view = _Overlay(o, ready_match=spec["ready_match"], ready_port=spec["ready_port"])
    out = _run_answer(view, root, job.id, spec)
    out["attempt"] = cfg["attempt"]
    if spec["missing"]:
        out["env_missing"] = spec["missing"]
        out["note"] = (
            "--env values are never stored: %s not set in this attempt; "
            "give --env again (or keep them in an --env-file)" % ", ".join(spec["missing"])
        )
    return out


# restart: how long the old supervisor may take to go once the job's lock is
# free (it lingers while descendants run; they are KILLed first).
RESTART_SETTLE_S = 5.0
# How often restart tries again when another restart replaced the job meanwhile.
_RESTART_ROUNDS = 5


@command(
    "restart",
    "end a job if it still runs, then start its definition again under the same id",
    tool_help=(
        "Restart a job under the same job_id: end it if it still runs (TERM, then KILL), "
        "keep its result and logs as the previous attempt (status.previous), and start its "
        "definition again; the answer is like run's. Use it for a dev server after a code "
        "change. Give env again for --env values (they are never stored)."
    ),
    opts=(
        Opt(
            "signal",
            "signal",
            _SIGTERM,
            "end the running job with this signal first (default TERM)",
        ),
        Opt(
            "kill_after",
            "duration",
            None,
            "KILL what is left this long after the signal (default: the job's --kill-after)",
        ),
    )
    + _START_OPTS,
    checks=(_exit_code_needs_wait,),
    exit_status=_passed_on_exit_status,
    returns=COMMANDS["run"].returns + _ATTEMPT_FIELDS,
    annotations={
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
        "openWorldHint": True,
    },
)
def cmd_restart(o) -> dict:
    """End the current attempt, keep it as attempts/N/, start attempt N+1.

    The job lock serializes everything: restart takes meta.json's lock
    exclusively (once the supervisor has let go of it), keeps the attempt,
    then writes a new meta.json (a new inode, born locked) and hands that to
    the new supervisor.  A second restart that waited on the old lock sees
    that meta.json is another file now, and restarts the new attempt in turn.
    A `wait` on the old attempt wakes when the old lock is let go and answers
    with the old attempt's result (see _attempt_job).
    """
    root = _root(o)
    _check_root(root)
    job_id = resolve_job(root, o.job_id)
    meta_path = os.path.join(root, job_id, META)
    for _round in range(_RESTART_ROUNDS):
        # The lock first, then the job read through the same meta.json: an
        # attempt ended here is the one whose lock this restart holds.
        fd = _open_meta(meta_path)
        try:
            job = load_job(root, job_id)
            if os.fstat(fd).st_ino != _inode(meta_path):
                os.close(fd)
                fd = None
                continue  # replaced in between: read again
            if job.state == "created":
                os.close(fd)
                fd = None
                return cmd_start(o)
            attempt = _attempt_of(job)
            # Every check before any change; but the port, which the running
            # attempt may hold itself, only once that has ended.
            cfg, spec = _attempt_config(o, job, attempt + 1, check_port=False)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        try:
            if not _end_for_restart(o, job, fd):
                raise AgentExecError(
                    "invalid_state", "job %s did not end after KILL; not restarted" % job.id
                )
            if os.fstat(fd).st_ino != _inode(meta_path):
                os.close(fd)
                fd = None
                continue  # another restart went first: end and restart its attempt
            if spec["ready_port"]:
                _refuse_port_in_use(spec["ready_port"])
            previous = _keep_attempt(job, attempt)
            meta = dict(job.meta, attempt=attempt + 1, previous=previous)
            facts = _JobFacts()
            facts.attempt = attempt + 1
            _write_json_atomic(
                os.path.join(job.dir, STATE), _state_document(job.id, "running", facts)
            )
            new_fd = _write_json_atomic(meta_path, meta, keep_locked=True)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        try:
            job = _Job(job.id, job.dir, meta, {}, "running", None)
            out = _launch_attempt(o, root, job, new_fd, cfg, spec)
        finally:
            os.close(fd)  # the old lock: waiters on the old attempt wake now
        out["previous"] = previous
        return out
    raise AgentExecError(
        "invalid_state", "job %s is being restarted by others; try again" % job_id, retryable=True
    )


def _inode(path: str) -> "int | None":
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _end_for_restart(o, job: _Job, fd: int) -> bool:
    """End the job's attempt (signal, then KILL after the grace) and take its lock on ``fd``."""
    definition = job.meta.get("definition") or {}
    grace_ms = o.kill_after if o.kill_after is not None else definition.get("kill_after_ms") or 0
    kill_at = time.monotonic() + grace_ms / 1000.0
    give_up = kill_at + RESTART_SETTLE_S + 5.0
    delivered = None  # the last signal that reached the job
    while not _lock_now(fd):
        now = time.monotonic()
        if now > give_up:
            return False
        # The signal asked for first, always; KILL once the grace is over.
        want = _SIGKILL if delivered is not None and now >= kill_at else o.signal
        if delivered != want and _inode(job.path(META)) == os.fstat(fd).st_ino:
            # Sent again until it arrives: a supervisor just launched by
            # another restart may not have its control FIFO yet.
            job = job.reload()
            if _ask_supervisor_to_signal(job, want) or _signal_without_supervisor(job, want):
                delivered = want
        time.sleep(0.02)
    # The attempt is over; its supervisor may linger for descendants: end them.
    job = job.reload() if _inode(job.path(META)) == os.fstat(fd).st_ino else job
    if _supervisor_alive(job):
        _ask_supervisor_to_signal(job, _SIGKILL)
        deadline = time.monotonic() + RESTART_SETTLE_S
        while _supervisor_alive(job) and time.monotonic() < deadline:
            time.sleep(0.02)
    return True


def _keep_attempt(job: _Job, attempt: int) -> dict:
    """Move attempt ``attempt``'s state and logs to attempts/N/; its summary (status.previous).

    The caller holds the job lock, and the supervisor is gone: a state.json
    that still says running is a lost supervisor's, and is kept as such.
    """
    record, written = _read_record(job.dir)
    state, failure = _verdict(record, written, True, None)
    record = dict(record or {})
    record["job"] = dict(record.get("job") or {}, status=state)
    record["failure"] = failure
    adir = os.path.join(job.dir, ATTEMPTS, str(attempt))
    try:
        os.makedirs(adir, 0o700, exist_ok=True)
        _write_json_atomic(os.path.join(adir, STATE), record, durable=True)
        names = [STDOUT_LOG, STDERR_LOG, EVENT_FILE, RESIZE_LOG]  # the sizes go with the log
        if not job.meta.get("definition", {}).get("log_path"):
            names.append(FULL_LOG)
        for name in names:
            try:
                os.rename(job.path(name), os.path.join(adir, name))
            except FileNotFoundError:
                pass
        # The new supervisor makes its own FIFO; screen's checkpoint was of the old log.
        for name in (CONTROL, SCREEN_CACHE):
            try:
                os.unlink(job.path(name))
            except FileNotFoundError:
                pass
    except OSError as e:
        raise AgentExecError("io_error", "cannot keep attempt %d: %s" % (attempt, e.strerror or e))
    kept = _Job(job.id, adir, job.meta, record, state, failure)
    previous = {"attempt": attempt, "state": state, "started_at": kept.started_at() or None}
    previous.update(kept.result_fields())
    if isinstance(record.get("limit"), dict):
        previous["limit"] = record["limit"]
    return previous


# ---- wait, read -------------------------------------------------------------------


def _wait_single_job_options(o) -> "str | None":
    several = len(set(o.job_ids or ())) > 1 or o.any
    if several and (o.match is not None or o.ready or o.cursor is not None or o.input):
        return "--match, --ready, --input and --cursor take a single job id"
    if o.input and (o.match is not None or o.ready):
        return "--input goes alone (not with --match or --ready)"
    return None


def _wait_match_options(o) -> "str | None":
    if o.match is None and (o.cursor is not None or o.stream is not None):
        return "--cursor and --stream go with --match"
    return None


# One job of a wait on several.
_BRIEF = obj(
    JOB_HEAD
    + tuple(f for f in RESULT_FIELDS if f.name in ("exit_code", "signal", "end_reason", "success"))
)


@command(
    "wait",
    "block until a job is terminal (or ready, or prints a match)",
    tool_help=(
        "Block until a job ends (or, with ready, is ready; with match, prints a line "
        "matching a regex; with input, waits for input), then answer its state and "
        "result. Each call waits at most timeout_ms, 20 s by default and never more than "
        "the server's cap (55 s unless configured): when timed_out is true the job is "
        "still running, so call wait again, or read from the cursor to see its output "
        "meanwhile. Several job_ids: all of them (or, with any, the first). Waiting never "
        "stops a job; cancelling this call only ends the wait."
    ),
    opts=(
        Opt("timeout_ms", "duration", 0, "0 = no limit"),
        # Accepted for scripts written for the first versions; not used.
        Opt("poll_ms", "duration", DEFAULT_WAIT_POLL_MS, _UNUSED_HELP, fronts=("cli",)),
        Opt("match", help="return when an output line matches", metavar="REGEX"),
        Opt("stream", "choice", help="with --match", choices=("stdout", "stderr", "both")),
        Opt("cursor", "cursor", help="with --match: search from C"),
        Opt("any", "flag", help="with several ids: the first to end"),
        Opt("ready", "flag", help="return when ready or terminal"),
        Opt(
            "input",
            "flag",
            help="return when the job waits for input, on Linux (or is terminal)",
        ),
        PLAIN,
        RENEW,
        KEY_INSTEAD,
        JOB_IDS_OR_KEY,
    ),
    checks=(_id_or_key, _wait_single_job_options, _wait_match_options),
    returns=(
        Field("job_id", STR),
        Field("state", JOB_STATE),
        Field("timed_out", BOOL, True),
        CURSOR_FIELD,
        Field("ready", BOOL),
        Field("matched", BOOL),
        Field(
            "match",
            obj(
                (
                    Field("stream", {"enum": ["stdout", "stderr"]}, True),
                    Field("line", STR, True),
                    Field("cursor", STR, True),
                )
            ),
        ),
        Field("jobs", array(_BRIEF)),
        Field("first_job_id", STR_OR_NULL),
        Field("waiting_for_input", BOOL),
        Field("input_prompt", STR),
        RENEWED,
        CURSOR_RESET,
    )
    + RESULT_FIELDS,
    variants=[{"required": ["job_id", "state"]}, {"required": ["jobs"]}],
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_wait(o) -> dict:
    ticker = _LeaseTicker() if getattr(o, "renew", False) else None
    try:
        out = _wait_answer(o, ticker)
    finally:
        if ticker is not None:
            ticker.stop()
    if ticker is not None:
        out["renewed"] = ticker.renewed
    return out


def _wait_answer(o, ticker: "_LeaseTicker | None") -> dict:
    ids = list(dict.fromkeys(o.job_ids or ()))
    root = _root(o)
    _check_root(root)
    job_ids = [resolve_job(root, ident) for ident in ids]
    if o.key is not None:
        ids = job_ids = [resolve_key(root, o.key)]
    deadline = time.monotonic() + o.timeout_ms / 1000.0 if o.timeout_ms > 0 else None
    if ticker is not None:
        ticker.begin(root, job_ids)
    # A created job: wait for `start` first (then for its end, as asked).
    first = _wait_started(root, job_ids, deadline, _cancelled(o))
    if first is not None and first.state == "created":
        out = first.head()
        out.update(timed_out=True, cursor=make_cursor(0, 0))
        return out
    if len(ids) > 1 or o.any:
        return _wait_many(root, job_ids, o.any, deadline, _cancelled(o))
    job_id = job_ids[0]
    if o.match is not None:
        regex = _compile_regex(o.match, "--match")
        start = o.cursor if o.cursor is not None else (0, 0)
        streams = o.stream or "both"
        out = _wait_match(root, job_id, regex, streams, start, deadline, _cancelled(o), o.ready)
        if o.plain and "match" in out:
            out["match"]["line"] = _plain_text(out["match"]["line"])
        return out
    if o.input:
        out = _wait_input(root, job_id, deadline, _cancelled(o))
        if o.plain and "input_prompt" in out:
            out["input_prompt"] = _plain_text(out["input_prompt"])
        return out
    job_dir = os.path.join(root, job_id)
    lock = os.path.join(job_dir, META)
    if o.ready and os.path.exists(os.path.join(job_dir, READY_LOCK)):
        lock = os.path.join(job_dir, READY_LOCK)
    _wait_lock(lock, _remaining(deadline), _cancelled(o))
    job = load_job(root, job_id)
    if first is not None and _attempt_of(job) != _attempt_of(first):
        # Restarted meanwhile: this wait was on the earlier attempt; its end.
        job = _attempt_job(job, _attempt_of(first)) or job
    out = job.head()
    ready = job.record.get("ready")
    if o.ready:
        out["ready"] = bool(ready)
    out["timed_out"] = job.state == "running" and not (o.ready and ready)
    out["cursor"] = job_cursor(job)
    return out


# How often a wait on a created job looks whether it has been started.
CREATED_POLL_S = 0.05


def _wait_started(root: str, job_ids: list, deadline, cancel=None) -> "_Job | None":
    """Sleep while any of the jobs is still created (not started); the first job then."""
    while True:
        jobs = [load_job(root, job_id) for job_id in job_ids]
        if all(j.state != "created" for j in jobs):
            return jobs[0]
        left = _remaining(deadline)
        if (left is not None and left <= 0) or (cancel is not None and cancel.is_set()):
            return next(j for j in jobs if j.state == "created")
        time.sleep(CREATED_POLL_S if left is None else min(CREATED_POLL_S, left))


def _attempt_job(job: _Job, attempt: int) -> "_Job | None":
    """Attempt ``attempt`` of ``job``, as kept in attempts/N/ by `restart`; None if absent."""
    adir = os.path.join(job.dir, ATTEMPTS, str(attempt))
    try:
        record = _read_json(os.path.join(adir, STATE))
    except (OSError, ValueError):
        return None
    status = (record.get("job") or {}).get("status")
    if status not in TERMINAL_STATES:
        return None
    return _Job(job.id, adir, job.meta, record, status, record.get("failure"))


# How often wait --input (and run --stdin-open's snapshot) look at the job's
# processes: a blocked read shows only in /proc, which wakes nobody.
INPUT_POLL_S = 0.05


def _input_wanted(job: _Job, watch: "_LockWatch", deadline, cancel=None) -> bool:
    """Sleep until the job waits for input (True), or it ends or time is up (False)."""
    while _IS_LINUX:
        if _waiting_for_input(_job_pids(job), _stdin_target(job)):
            return True
        remaining = _remaining(deadline)
        step = INPUT_POLL_S if remaining is None else min(INPUT_POLL_S, remaining)
        if step <= 0 or watch.wait(step, cancel) or (cancel is not None and cancel.is_set()):
            return False
    watch.wait(_remaining(deadline), cancel)  # elsewhere: only the end can be seen
    return False


def _wait_input(root: str, job_id: str, deadline, cancel=None) -> dict:
    """wait --input: until the job waits for input, ends, or the timeout."""
    job = load_job(root, job_id)
    watch = _LockWatch.acquire(job.path(META))
    try:
        waiting = not job.terminal and _input_wanted(job, watch, deadline, cancel)
    finally:
        watch.release()
    job = job.reload()
    waiting = waiting and not job.terminal
    out = job.head()
    out["waiting_for_input"] = waiting
    if waiting:
        prompt = _input_prompt(job)
        if prompt is not None:
            out["input_prompt"] = prompt
    out["timed_out"] = job.state == "running" and not waiting
    out["cursor"] = job_cursor(job)
    return out


def _wait_many(root: str, job_ids: list, any_job: bool, deadline, cancel=None) -> dict:
    """Block until every job (or, with --any, the first) is terminal."""
    import threading

    event = threading.Event()
    watches = [_LockWatch.acquire(os.path.join(root, j, META), event) for j in job_ids]
    first = None
    try:
        while True:
            done = [j for j, w in zip(job_ids, watches) if w.done.is_set()]
            finished = [j for j in done if load_job(root, j).terminal]
            if any_job and finished:
                first = finished[0]
                break
            if not any_job and len(finished) == len(job_ids):
                break
            remaining = _remaining(deadline)
            if remaining == 0 or (cancel is not None and cancel.is_set()):
                break
            step = remaining if cancel is None else min(_CANCEL_POLL_S, remaining or 1.0)
            event.wait(step)
            event.clear()
    finally:
        for watch in watches:
            watch.release(event)
    entries = []
    for j in job_ids:
        job = load_job(root, j)
        entry = {"job_id": j, "state": job.state}
        result = job.result_fields()
        for key in ("exit_code", "signal", "end_reason", "success"):
            if result.get(key) is not None:
                entry[key] = result[key]
        entries.append(entry)
    out = {"jobs": entries}
    if any_job:
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


_CR_LF_RE = _LazyRegex(lambda: _compile("\r+\n"))


def _match_line(regex, data: bytes) -> "tuple | None":
    """The first line of ``data`` that ``regex`` matches: (text, end offset).

    One regex search over the whole chunk finds a candidate at C speed; the
    line holding it is then tested on its own, so a match that only exists
    across a line break does not count.
    """
    raw = data.decode("utf-8", "surrogateescape")  # round-trips every byte
    # A line may end in \r\n (a terminal's, a Windows program's): its $ is
    # before the \r, so the search runs on the text with LF line ends, and
    # the offset is found again in the raw text by counting lines.
    # (On a terminal a program's own CR LF arrives as CR CR LF: every CR
    # before a LF goes.)
    text = _CR_LF_RE.sub("\n", raw) if "\r\n" in raw else raw
    m = regex.search(text)
    while m:
        start = text.rfind("\n", 0, m.start()) + 1
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        line = text[start:end]
        if regex.search(line):
            raw_end = end
            if text is not raw and end == len(text):
                raw_end = len(raw)
            elif text is not raw:  # the line's newline is the (lines before it + 1)th
                raw_end = -1
                for _ in range(text.count("\n", 0, end) + 1):
                    raw_end = raw.find("\n", raw_end + 1)
            offset = len(raw[: raw_end + 1].encode("utf-8", "surrogateescape"))
            return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), offset
        m = regex.search(text, end + 1)
    return None


def _wait_match(
    root: str, job_id: str, regex, which: str, start: tuple, deadline, cancel=None, ready=False
):
    """wait --match: block until an output line matches, the job ends, or time is up.

    With ``ready`` (wait --ready --match) the job becoming ready ends the
    wait too; the answer's ``ready`` and ``matched`` say which came first.
    """
    streams = list(_STREAMS) if which == "both" else [which]
    pos = {"stdout": start[0], "stderr": start[1]}  # start of the unscanned bytes
    pending = {"stdout": b"", "stderr": b""}  # a line still being written
    watch = ready_watch = None
    ready_lock = os.path.join(root, job_id, READY_LOCK)
    reset = None  # whether the cursor was of an earlier attempt (see _attempt_cursor)
    try:
        while True:
            job = load_job(root, job_id)
            if reset is None:
                (pos["stdout"], pos["stderr"]), reset = _attempt_cursor(job, start)
            before = _log_sizes(job)  # before reading: see _wait_output
            hit = _scan_for_match(job, regex, streams, pos, pending)
            is_ready = ready and job.record.get("ready") is True
            remaining = _remaining(deadline)
            cancelled = cancel is not None and cancel.is_set()
            if hit is not None or is_ready or job.terminal or remaining == 0 or cancelled:
                out = job.head()
                if ready:
                    out["ready"] = is_ready
                out["matched"] = hit is not None
                cursor = make_cursor(pos["stdout"], pos["stderr"])
                if hit is not None:
                    out["match"] = {"stream": hit[0], "line": hit[1], "cursor": cursor}
                out["timed_out"] = hit is None and not is_ready and not job.terminal
                out["cursor"] = cursor
                if reset:
                    out["cursor_reset"] = True
                return out
            if watch is None:
                watch = _LockWatch.acquire(job.path(META))
                if ready and os.path.exists(ready_lock):
                    ready_watch = _LockWatch.acquire(ready_lock)
            _wait_output(job, watch, remaining, before, cancel, ready_watch)
    finally:
        if watch is not None:
            watch.release()
        if ready_watch is not None:
            ready_watch.release()


def _scan_for_match(job: _Job, regex, streams: list, pos: dict, pending: dict):
    """Look at the new bytes of ``streams`` for a matching line: (stream, line) or None.

    ``pos`` and ``pending`` carry the scan over calls: after a hit, ``pos``
    of its stream is just past the matching line.
    """
    terminal = job.terminal
    for stream in streams:
        while True:
            at = pos[stream] + len(pending[stream])
            data, new_pos, more = read_span(job, stream, at, READ_CHUNK, terminal)
            if not data and not (terminal and pending[stream]):
                break
            if new_pos - len(data) != at:  # bytes dropped by --max-output
                pos[stream], pending[stream] = new_pos - len(data), b""
            buf = pending[stream] + data
            cut = _complete_lines(buf, terminal and not more, READ_CHUNK)
            hit = _match_line(regex, buf[:cut]) if cut else None
            if hit is not None:
                line, offset = hit
                pos[stream] += offset
                return stream, line
            pos[stream] += cut
            pending[stream] = buf[cut:]
            if not data:
                break
    return None


def _wait_output(
    job: _Job, watch: _LockWatch, remaining, before: list, cancel=None, also=None
) -> None:
    """Sleep until a log differs from ``before``, the job ends (the lock), or time is up.

    ``before`` must be taken before the logs were last read: bytes written
    between that read and this wait then still count as a change.  ``also``
    is a second _LockWatch that ends the sleep when it fires (ready.lock).
    """
    deadline = None if remaining is None else time.monotonic() + remaining
    while True:
        step = READ_POLL_S if deadline is None else min(READ_POLL_S, deadline - time.monotonic())
        if step <= 0 or watch.wait(step) or _log_sizes(job) != before:
            return
        if also is not None and also.done.is_set():
            return
        if cancel is not None and cancel.is_set():
            return


@command(
    "read",
    "read the output that arrived after a cursor",
    tool_help=(
        "Read the job's output in order: stdout and stderr after a cursor, at most "
        "max_bytes each, and a new cursor to pass next time. Without a cursor it "
        "continues where this session's last read of that job ended (the first read "
        "starts at the beginning), so nothing is missed or repeated. wait_ms blocks until "
        "new output arrives (capped like wait). more: call again at once; eof: all output "
        "is read and the answer carries the job's result."
    ),
    opts=(
        Opt("cursor", "cursor", help="default: the start"),
        MAX_BYTES,
        Opt("wait_ms", "duration", 0, "block until there is new output, the job ends, or MS pass"),
        PLAIN,
        RENEW,
        JOB_ID,
    ),
    returns=JOB_HEAD
    + (
        Field("stdout", STR, True),
        Field("stderr", STR, True),
        Field("cursor", STR, True),
        Field("more", BOOL, True),
        Field("eof", BOOL, True),
        RENEWED,
        CURSOR_RESET,
    )
    + RESULT_FIELDS,
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_read(o) -> dict:
    job, renewed = _renew_in_passing(o, _open_job(o, o.job_id))
    out = _read_answer(o, job)
    if renewed is not None:
        out["renewed"] = renewed
    return out


def _read_answer(o, job: _Job) -> dict:
    if job.state == "created":
        # Nothing has run: no output yet, and a cursor to read from later.
        out = {"job_id": job.id, "state": job.state, "stdout": "", "stderr": ""}
        out.update(cursor=make_cursor(0, 0), more=False, eof=False)
        return out
    (out_pos, err_pos), reset = _attempt_cursor(job, o.cursor)
    deadline = time.monotonic() + o.wait_ms / 1000.0
    cancel = _cancelled(o)
    watch = None
    try:
        while True:
            terminal = job.terminal
            before = _log_sizes(job)  # before reading: see _wait_output
            out_data, new_out, out_more = read_span(job, "stdout", out_pos, o.max_bytes, terminal)
            err_data, new_err, err_more = read_span(job, "stderr", err_pos, o.max_bytes, terminal)
            remaining = _remaining(deadline)
            if out_data or err_data or terminal or not remaining:
                break
            if cancel is not None and cancel.is_set():
                break
            if watch is None:
                watch = _LockWatch.acquire(job.path(META))
            _wait_output(job, watch, remaining, before, cancel)
            job = job.reload()
    finally:
        if watch is not None:
            watch.release()
    if o.plain:
        out_data, new_out, out_more = _plain_span(
            job, "stdout", out_pos, out_data, new_out, out_more, terminal
        )
        err_data, new_err, err_more = _plain_span(
            job, "stderr", err_pos, err_data, new_err, err_more, terminal
        )
    more = out_more or err_more
    out = {
        "job_id": job.id,
        "state": job.state,
        "stdout": _decode(out_data),
        "stderr": _decode(err_data),
        "cursor": make_cursor(new_out, new_err),
        "more": more,
        "eof": terminal and not more,
    }
    if o.plain:  # the cursor above counts the raw bytes
        out["stdout"], out["stderr"] = _plain_text(out["stdout"]), _plain_text(out["stderr"])
    if reset:
        out["cursor_reset"] = True
    if out["eof"]:
        # The last read carries the result, so no status call is needed.
        out.update(job.result_fields())
    return out


# ---- renew (leases) ---------------------------------------------------------------

# How long `renew` waits for the supervisor's answer.
RENEW_ANSWER_S = 5.0


@command(
    "renew",
    "extend a job's lease (run --lease)",
    tool_help=(
        "Extend the lease of a job started with lease: the job is ended when its lease runs "
        "out without a renewal. Call it (or status/read/wait with renew) more often than the "
        "lease length while you still need the job."
    ),
    opts=(
        Opt(
            "lease",
            "duration",
            None,
            "the job lives this long from now (default: the length of its lease)",
        ),
        JOB_ID,
    ),
    returns=JOB_HEAD + (Field("lease_ms", COUNT, True), Field("lease_expires_at", STR, True)),
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_renew(o) -> dict:
    job = _open_job(o, o.job_id)
    if o.lease is not None and o.lease <= 0:
        raise AgentExecError("invalid_argument", "--lease must be longer than 0")
    return _renew(job, o.lease)


def _renew(job: _Job, lease_ms: "int | None") -> dict:
    """Ask the supervisor to move the lease's deadline; the renew answer."""
    length = job.record.get("lease_ms") or job.meta.get("lease_ms")
    if not length:
        raise AgentExecError(
            "invalid_state", "job %s has no lease (run --lease DURATION gives one)" % job.id
        )
    if job.state != "running":
        raise AgentExecError(
            "invalid_state", "job %s is %s: there is no lease to renew" % (job.id, job.state)
        )
    ms = lease_ms or length
    answer = _ask_supervisor(job.dir, {"verb": "renew", "lease_ms": ms}, RENEW_ANSWER_S)
    if answer is None:
        job = job.reload()
        if job.state != "running":
            raise AgentExecError("invalid_state", "job %s is %s" % (job.id, job.state))
        raise AgentExecError("io_error", "the supervisor of job %s did not answer" % job.id)
    if not answer.get("ok"):
        code = answer.get("code")
        raise AgentExecError(
            code if code in ERROR_CODES else "invalid_state", str(answer.get("message"))
        )
    return {
        "job_id": job.id,
        "state": "running",
        "lease_ms": ms,
        "lease_expires_at": answer.get("lease_expires_at"),
    }


def _renew_in_passing(o, job: _Job) -> "tuple":
    """status/read/wait --renew: renew the lease first; (the job as it is then, renewed).

    In passing means it never fails the call: a job without a lease, or one
    that has ended, is answered as without --renew, with renewed false.
    renewed is None without --renew (the answer then has no such field).
    """
    if not getattr(o, "renew", False):
        return job, None
    renewed = _try_renew(job)
    return job.reload(), renewed


def _try_renew(job: _Job) -> bool:
    """Renew the job's lease if it has one and runs; whether it was renewed."""
    if not (job.record.get("lease_ms") or job.meta.get("lease_ms")) or job.state != "running":
        return False
    try:
        _renew(job, None)
    except AgentExecError:
        return False  # it ended meanwhile, or its supervisor did not answer
    return True


class _LeaseTicker:
    """wait --renew: renew the waited jobs' leases while the wait blocks.

    A thread renews each job that has a lease and runs, now and then every
    third of its lease length, so an agent that waits keeps its job alive;
    stop() ends it when the wait answers.  renewed: any renewal succeeded.
    """

    def __init__(self) -> None:
        import threading

        self.renewed = False
        self._stop = threading.Event()
        self._thread = None

    def begin(self, root: str, job_ids: list) -> None:
        leases = []
        for job_id in job_ids:
            job = load_job(root, job_id)
            length = job.record.get("lease_ms") or job.meta.get("lease_ms")
            if isinstance(length, int) and length > 0:
                leases.append(length)
            self.renewed = _try_renew(job) or self.renewed
        if not leases:
            return
        every = max(0.05, min(leases) / 3000.0)

        def tick() -> None:
            while not self._stop.wait(every):
                for job_id in job_ids:
                    try:
                        job = load_job(root, job_id)
                    except AgentExecError:
                        continue
                    self.renewed = _try_renew(job) or self.renewed

        import threading

        self._thread = threading.Thread(target=tick, name="agent-exec-renew", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(RENEW_ANSWER_S + 1.0)


# ---- kill -------------------------------------------------------------------------


@command(
    "kill",
    "signal every live process of a job",
    tool_help=(
        "Signal every live process of a job (TERM by default; KILL, INT, HUP... or a "
        "number) and answer its state, usually final after up to 1 s. Use it to stop a "
        "job that hangs or is no longer needed; STOP and CONT pause and resume it."
    ),
    opts=(
        Opt(
            "signal",
            "signal",
            _SIGTERM,
            "TERM (default), INT, KILL, HUP, QUIT, USR1, USR2, STOP, CONT or WINCH, "
            "with or without SIG, or a number",
        ),
        KEY_INSTEAD,
        JOB_ID_OR_KEY,
    ),
    checks=(_id_or_key,),
    returns=JOB_HEAD[:1]
    + (Field("signal", STR, True), JOB_HEAD[1], Field("sent", BOOL))
    + RESULT_FIELDS,
    annotations={"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False},
)
def cmd_kill(o) -> dict:
    job = _open_job(o, o.job_id)
    if job.state == "created":
        raise AgentExecError(
            "invalid_state",
            "job %s is created, not started: nothing runs to signal (agent-exec start %s "
            "starts it; agent-exec delete %s removes it)" % (job.id, job.id, job.id),
        )
    sig = o.signal
    sent = _ask_supervisor_to_signal(job, sig) or _signal_without_supervisor(job, sig)
    if sent and job.state == "running" and signal_name(sig)[3:] not in _NON_ENDING_SIGNALS:
        # Give the job a moment to end, so the answer is usually final.
        _wait_lock(job.path(META), KILL_SETTLE_S, _cancelled(o))
        job = job.reload()
    out = {"job_id": job.id, "signal": signal_name(sig), "state": job.state, "sent": sent}
    for key, value in job.result_fields().items():
        if key != "signal":  # what was sent, not what the job died of (that is in status)
            out[key] = value
    return out


def _ask_supervisor_to_signal(job: _Job, sig: int) -> bool:
    """Ask the live supervisor, through its control FIFO, to signal the job's tree."""
    if job.state != "running":
        # Terminal: only descendants can be alive; skip the FIFO unless the
        # supervisor provably still runs (without it, _signal_without_supervisor
        # reaches what is left of the job's group).
        if not _supervisor_alive(job) or not _descendants_of(job.record["supervisor_pid"]):
            return False
    if not job.record.get("control_protocol"):
        # A supervisor of an earlier version (its state.json does not name the
        # protocol) reads only this line; a current one reads it too.
        return _send_control_line(job.dir, b"kill %d\n" % sig)
    return _send_control(job.dir, {"verb": "kill", "signal": sig})


def _signal_without_supervisor(job: _Job, sig: int) -> bool:
    """The supervisor is gone: signal the workload's group only if provably ours.

    That is the workload itself while it lives (its start time matches), or,
    once it has ended, what is left of its group (see _job_group_alive): the
    processes a finished job left behind can still be ended after its
    supervisor died.
    """
    pid = job.record.get("pid")
    alive = _is_alive(pid, job.record.get("pid_start_time"))
    if not alive and not (job.terminal and _job_group_alive(job)):
        return False
    try:
        os.killpg(pid, sig)
        return True
    except OSError:
        if not alive:
            return False
        try:
            os.kill(pid, sig)
            return True
        except OSError:
            return False


# ---- send --------------------------------------------------------------------------

# How long `send` waits for the supervisor's answer.
SEND_ANSWER_S = 10.0


def _send_input_options(o) -> "str | None":
    given = [x for x in ("text", "file", "stdin") if getattr(o, x) is not None]
    if len(given) > 1:
        return "--text, --file and --stdin conflict: give one"
    if not given and not o.eof and o.keys is None and o.size is None:
        return "send needs --text, --file, --stdin -, --keys, --size or --eof"
    if o.stdin is not None and o.stdin != "-":
        return "--stdin takes '-' (this command's own stdin)"
    return None


@command(
    "send",
    "write to the stdin of a job started with --stdin-open, or type into a --pty job",
    tool_help=(
        "Write to a job's input: the stdin of a job started with stdin_open, or the "
        "terminal of a job started with pty. text is sent as is (no newline is added: end "
        'it with \\n for a --stdin-open job, or add keys "enter" for a pty job). keys '
        "(pty jobs) types named keys: a comma-separated list like 'enter', 'ctrl-c', "
        "'down*3,enter', '\"yes\",enter'. size (pty jobs) resizes the terminal, COLSxROWS. "
        "eof closes the stdin (on a pty: types ctrl-d). Use it when status or wait (input) "
        "says waiting_for_input. Next: read for the job's reply, or screen for a pty job."
    ),
    opts=(
        Opt("text", help="send TEXT (no newline is added)", metavar="TEXT"),
        Opt("file", help="send this file's bytes", metavar="PATH"),
        Opt("stdin", help="'-': send this command's own stdin, read to EOF", metavar="-"),
        Opt(
            "keys",
            "keys",
            help="--pty jobs: type named keys, after any text: a comma-separated list of "
            "enter, tab, esc, backspace, up, down, left, right, home, end, pgup, pgdn, "
            'f1 ... f12, ctrl-a ... ctrl-z, and "quoted text" (a key may repeat: down*3)',
        ),
        Opt(
            "size",
            "term_size",
            None,
            "--pty jobs: resize the terminal (the job gets SIGWINCH), before any typing",
            metavar="COLSxROWS",
        ),
        Opt(
            "eof",
            "flag",
            help="then close the job's stdin (alone: just close it); on a --pty job: type ctrl-d",
        ),
        JOB_ID,
    ),
    checks=(_send_input_options,),
    examples=(
        ("agent-exec send JOB --text 'yes' --keys enter", "answer a prompt of a --pty job"),
        ("agent-exec send JOB --keys ctrl-c", "interrupt the foreground program of a --pty job"),
        ("agent-exec send JOB --text $'line\\n' --eof", "give a --stdin-open job its last line"),
    ),
    returns=JOB_HEAD
    + (
        Field("accepted_bytes", COUNT, True),
        Field("buffered_bytes", COUNT, True),
        Field("eof", BOOL, True),
        Field("size", obj((Field("cols", COUNT, True), Field("rows", COUNT, True)))),
    ),
    annotations={
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
        "openWorldHint": True,
    },
)
def cmd_send(o) -> dict:
    """Hand bytes to the job's supervisor, which writes them as the job reads."""
    job = _open_job(o, o.job_id)
    pty = bool(job.meta.get("pty"))
    if not pty and (o.keys is not None or o.size is not None):
        raise AgentExecError(
            "invalid_state",
            "job %s has no terminal: %s goes with jobs started with run --pty"
            % (job.id, "--keys" if o.keys is not None else "--size"),
        )
    if not job.meta.get("stdin_open"):
        raise AgentExecError(
            "invalid_state",
            "job %s has no open stdin (start it with run --stdin-open or run --pty)" % job.id,
        )
    if job.terminal:
        raise AgentExecError(
            "invalid_state", "job %s is %s: it reads no more" % (job.id, job.state)
        )
    out = {"job_id": job.id, "state": job.state}
    if o.size is not None:
        cols, rows = o.size
        answer = _ask_supervisor(
            job.dir, {"verb": "resize", "cols": cols, "rows": rows}, SEND_ANSWER_S
        )
        _check_send_answer(job, answer)
        out["size"] = {"cols": cols, "rows": rows}
    data = _send_data(o)
    keys = o.keys or b""  # parsed already (the "keys" kind)
    if data or keys or o.eof or o.size is None:
        accepted = 0
        if data and keys:  # the text as it is; only the named keys follow the terminal's mode
            accepted = _send_bytes(job, data, False, False).get("accepted_bytes", 0)
            data = b""
        answer = _send_bytes(job, data + keys, bool(o.eof), bool(keys))
        out["accepted_bytes"] = accepted + answer.get("accepted_bytes", 0)
        out["buffered_bytes"] = answer.get("buffered_bytes", 0)
    else:  # --size alone
        out["accepted_bytes"] = out["buffered_bytes"] = 0
    out["eof"] = bool(o.eof)
    return out


def _send_bytes(job: _Job, data: bytes, eof: bool, keys: bool) -> dict:
    """Hand ``data`` to the job's supervisor; its answer (ok, accepted and buffered bytes)."""
    path = os.path.join(job.dir, ".send-%d-%s" % (os.getpid(), os.urandom(4).hex()))
    _write_private_file(path, data)
    try:
        msg = {"verb": "send", "file": path, "eof": eof}
        if keys:
            msg["keys"] = True  # named keys: the supervisor types them as the terminal's mode wants
        answer = _ask_supervisor(job.dir, msg, SEND_ANSWER_S)
    finally:
        try:
            os.unlink(path)  # the supervisor removes it once read; not if it never came
        except OSError:
            pass
    _check_send_answer(job, answer)
    return answer


def _check_send_answer(job: _Job, answer: "dict | None") -> None:
    if answer is None:
        job = job.reload()
        if job.terminal:
            raise AgentExecError("invalid_state", "job %s has ended" % job.id)
        raise AgentExecError("io_error", "job %s's supervisor did not answer" % job.id)
    if not answer.get("ok"):
        code = answer.get("code") if answer.get("code") in ERROR_CODES else "invalid_state"
        raise AgentExecError(code, "job %s: %s" % (job.id, answer.get("message")))


def _send_data(o) -> bytes:
    if o.text is not None:
        data = os.fsencode(o.text)
    elif o.file is not None:
        try:
            with open(o.file, "rb") as f:
                data = f.read(STDIN_BUFFER_MAX + 1)
        except OSError as e:
            raise AgentExecError("invalid_argument", "cannot read %s: %s" % (o.file, e.strerror))
    elif o.stdin is not None:
        reader = getattr(sys.stdin, "buffer", None)
        data = reader.read(STDIN_BUFFER_MAX + 1) if reader is not None else b""
    else:
        data = b""
    if len(data) > STDIN_BUFFER_MAX:
        raise AgentExecError(
            "invalid_argument", "send takes at most %d bytes at a time" % STDIN_BUFFER_MAX
        )
    return data


# ---- screen --------------------------------------------------------------------------


@command(
    "screen",
    "show what a person would see on the job's terminal now",
    tool_help=(
        "Show what a person would see on the job's terminal right now: rows (text lines, "
        "trailing spaces trimmed), cols, lines, cursor {row, col}, alt_screen, title. Use it "
        "for jobs started with pty (less, top, vim, a TUI, a REPL) and for output drawn with "
        "\\r (progress bars), where read shows raw escape codes. log_cursor is the read "
        "cursor of the output the screen reflects. Next: send keys, then screen again."
    ),
    opts=(PLAIN, JOB_ID),
    returns=JOB_HEAD
    + (
        Field("rows", STRS, True),
        Field("cols", COUNT, True),
        Field("lines", COUNT, True),
        Field(
            "cursor",
            obj((Field("row", COUNT, True), Field("col", COUNT, True))),
            True,
        ),
        Field("alt_screen", BOOL, True),
        Field("title", STR),
        Field("log_cursor", STR, True),
    ),
    examples=(
        ("agent-exec screen 01J...", "the rows of the job's terminal, as text"),
        (
            'agent-exec read --cursor "$(agent-exec screen ID | jq -r .log_cursor)" ID',
            "what came after that screen",
        ),
    ),
    annotations={"readOnlyHint": True, "idempotentHint": True},
)
def cmd_screen(o) -> dict:
    """Render stdout.log through the terminal emulator (see Terminal screen).

    A job without a PTY is rendered as on an 80x24 terminal, its LF taken as
    CR LF (as a terminal's driver would have done).  --plain changes nothing:
    rows never hold escape sequences.
    """
    job = _open_job(o, o.job_id)
    screen, stdout_pos = _job_screen(job)
    err = _log_stats(job)[1]
    stderr_pos = (job.record.get("stderr_dropped_bytes") or 0) + (err.st_size if err else 0)
    out = {
        "job_id": job.id,
        "state": job.state,
        "rows": screen.lines,
        "cols": screen.cols,
        "lines": screen.rows,
        "cursor": screen.cursor,
        "alt_screen": screen.alt_screen,
        "log_cursor": make_cursor(stdout_pos, stderr_pos),
    }
    if screen.title is not None:
        out["title"] = screen.title
    return out


# ---- list, delete, gc ---------------------------------------------------------------

_LIST_ENTRY = obj(
    JOB_HEAD
    + (
        Field("started_at", STR_OR_NULL, True),
        Field("command", STRS, True),
        Field("cwd", STR, True),
        Field("updated_at", STR),
        Field("ready", BOOL_OR_NULL),
        Field("lingering", BOOL, True),
    )
    + RESULT_FIELDS
    + FINDING_FIELDS
)


def _running_state_conflict(o) -> "str | None":
    if o.running and o.state not in (None, "running"):
        return "--running and --state %s conflict" % o.state
    return None


@command(
    "list",
    "list jobs, newest first",
    tool_help=(
        "List jobs, newest first: by default those started in the server's working "
        "directory (cwd to pick another, all for every one), optionally by state. Use it "
        "to find a job_id you lost."
    ),
    opts=(
        Opt("state", "choice", help="only jobs in this state", choices=STATES),
        Opt(
            "limit",
            "count",
            DEFAULT_LIST_LIMIT,
            "at most N jobs (0 = all; default %d)" % DEFAULT_LIST_LIMIT,
        ),
        Opt("cwd", help="jobs started in DIR (default: here)", metavar="DIR"),
        Opt("all", "flag", help="jobs from every directory"),
        Opt("running", "flag", help="same as --state running"),
        Opt(
            "lingering",
            "flag",
            help="only finished jobs whose processes still run (delete and gc refuse them)",
        ),
        # Finding jobs again: each of these looks in every directory unless --cwd is given.
        Opt("name", help="only jobs with this name", metavar="NAME"),
        Opt(
            "tag",
            "strs",
            help="only jobs with this tag: KEY, KEY=VALUE, PREFIX* or KEY=PREFIX* "
            "(repeatable: all must match)",
            metavar="TAG",
        ),
        Opt("owner", help="only jobs of this owner", metavar="OWNER"),
        Opt("mine", "flag", help="only jobs whose owner is $AGENT_EXEC_OWNER"),
        Opt("key", help="only jobs started with run --key KEY", metavar="KEY"),
        Opt("port", "port", help="only the jobs that own this port (--port, or listening on it)"),
    )
    + FORMAT_OPTS,
    checks=(
        conflict("cwd", "all"),
        _running_state_conflict,
        _format_conflict,
        conflict("owner", "mine"),
    ),
    table=lambda answer, color: _list_table(answer, color),
    returns=(
        Field("root", STR, True),
        Field("jobs", array(_LIST_ENTRY), True),
        Field("truncated", BOOL, True),
        Field("skipped", COUNT, True),
    ),
    annotations={"readOnlyHint": True, "idempotentHint": True},
)
def cmd_list(o) -> dict:
    want_state = "running" if o.running else o.state
    root = _root(o)
    out = {"root": root, "jobs": [], "truncated": False, "skipped": 0}
    _check_root(root)  # a root that is a file is refused here as by run
    tagged = _tagged_ids(root)
    finding = _finding_filter(o, tagged)
    meta_filter = finding[0] if finding else None
    if not o.all and (finding is None or o.cwd is not None):
        try:
            want_cwd = os.path.realpath(o.cwd or os.getcwd())
        except OSError as e:
            raise AgentExecError(
                "cwd_not_found",
                "the current directory is gone (%s), so list has no directory to match: "
                "pass --cwd DIR, or --all" % e.strerror,
            )

        def meta_filter(meta: dict, also=meta_filter) -> bool:
            return meta.get("cwd") == want_cwd and (also is None or also(meta))

    if not os.path.isdir(root):
        return out
    processes = {}  # one process table for the walk, if any job needs it
    for name, _entry in _iter_jobs(root):
        try:
            job = load_job(root, name, meta_filter)
        except AgentExecError:
            out["skipped"] += 1
            continue
        if job is None or (want_state and job.state != want_state):
            continue
        if finding and not finding[1](job):
            continue
        lingering = bool(_lingering(job, processes))
        if o.lingering and not lingering:
            continue
        if o.limit and len(out["jobs"]) >= o.limit:
            out["truncated"] = True
            break
        out["jobs"].append(_list_entry(job, lingering, tagged))
    return out


def _list_entry(job: _Job, lingering: bool, tagged: "set | None" = None) -> dict:
    meta = job.meta
    entry = {
        "job_id": job.id,
        "state": job.state,
        "started_at": job.started_at() if job.state != "created" else None,
        "command": meta.get("command"),
        "cwd": meta.get("cwd"),
        "ready": job.record.get("ready"),
    }
    result = job.result_fields()
    for key in ("exit_code", "signal", "finished_at", "end_reason", "success", "failure"):
        if key in result:
            entry[key] = result[key]
    if job.record.get("updated_at"):
        entry["updated_at"] = job.record["updated_at"]
    entry["lingering"] = lingering
    entry.update(_finding_fields(job, tagged))
    return entry


def _finding_filter(o, tagged: "set | None" = None) -> "tuple | None":
    """list --name/--tag/--owner/--mine/--key/--port: (a test of meta.json, a
    test of the job), or None when none is given."""
    owner = o.owner
    if o.mine:
        owner = os.environ.get("AGENT_EXEC_OWNER") or None
        if owner is None:
            raise UsageError("--mine needs $AGENT_EXEC_OWNER set (the owner run records)")
    patterns = []
    for text in o.tag or ():
        try:
            patterns.append(parse_tag_pattern(text))
        except ValueError as e:
            raise AgentExecError("invalid_argument", "--tag: %s" % e)
    wanted = {"name": o.name, "owner": owner, "key": o.key}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if not (wanted or patterns or o.port):
        return None
    port = o.port

    def on_meta(meta: dict) -> bool:
        return all(meta.get(k) == v for k, v in wanted.items())

    def on_job(job: _Job) -> bool:
        if patterns:
            tags = _job_tags(job, tagged)
            if not all(_tag_matches(p, tags) for p in patterns):
                return False
        if port:
            recorded = port in (job.meta.get("port"), job.meta.get("ready_port"))
            return recorded or (job.state == "running" and port in _listening_ports(_job_pids(job)))
        return True

    return on_meta, on_job


# ---- tag ----------------------------------------------------------------------------


@command(
    "tag",
    "add or remove a job's tags",
    tool_help=(
        "Add or remove tags of a job (KEY or KEY=VALUE) after it started, so that list "
        "with tag finds it. Removals apply first. Use tags to mark what a job is for "
        "(tag 'project=web', 'role=server')."
    ),
    opts=(
        Opt("add", "strs", help="add TAG (KEY or KEY=VALUE; replaces KEY's value)", metavar="TAG"),
        Opt(
            "remove",
            "strs",
            help="remove the tag KEY (KEY=VALUE: only while it has that value)",
            metavar="TAG",
        ),
        JOB_ID,
    ),
    returns=(Field("job_id", STR, True), Field("tags", STRS, True), Field("changed", BOOL, True)),
    annotations={"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True},
)
def cmd_tag(o) -> dict:
    """Change a job's tags: removals first, then additions, under the job's tags.lock."""
    adds = _tag_pairs(o.add, "--add")
    removes = []
    for text in o.remove or ():
        try:
            removes.append(parse_tag(text))
        except ValueError as e:
            raise AgentExecError("invalid_argument", "--remove: %s" % e)
    job = _open_job(o, o.job_id)
    lock_fd = _lock_file(job.path(TAGS_LOCK))
    try:
        before = _job_tags(job)
        pairs = dict(parse_tag(t) for t in before)
        for key, value in removes:
            if key in pairs and (value is None or pairs[key] == value):
                del pairs[key]
        pairs.update(adds)
        tags = _tag_list(pairs)
        if tags != before:
            path = job.path(TAGS_FILE)
            try:
                # First the marker that tells list to read this job's tags.json.
                root = os.path.dirname(job.dir)
                os.makedirs(root + "/" + TAGGED_DIR, 0o700, exist_ok=True)
                os.close(
                    os.open(root + "/" + TAGGED_DIR + "/" + job.id, os.O_WRONLY | os.O_CREAT, 0o600)
                )
                _write_json_atomic(path, {"tags": tags, "updated_at": _now()}, durable=True)
            except OSError as e:
                raise AgentExecError("io_error", "cannot write %s: %s" % (path, e.strerror or e))
    finally:
        os.close(lock_fd)
    return {"job_id": job.id, "tags": tags, "changed": tags != before}


# What delete and gc both answer: the jobs left alone and why, the bytes
# freed, and whether it was a dry run.
_REMOVAL_FIELDS = (
    Field("refused", array(obj((Field("job_id", STR, True), Field("reason", STR, True)))), True),
    Field("freed_bytes", COUNT, True),
    Field("dry_run", BOOL, True),
)
_DESTRUCTIVE = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True}


@command(
    "delete",
    "delete finished jobs",
    tool_help=(
        "Delete finished jobs and their logs (dry_run to see what would go). A running "
        "job is refused: kill it first."
    ),
    opts=(DRY_RUN, JOB_IDS),
    returns=(Field("deleted", STRS, True),) + _REMOVAL_FIELDS,
    annotations=_DESTRUCTIVE,
)
def cmd_delete(o) -> dict:
    """Delete terminal jobs; refuse, with the reason, a job with live processes."""
    root = _root(o)
    _check_root(root)
    # Resolve every id first: a typo deletes nothing.
    job_ids = list(dict.fromkeys(resolve_job(root, ident) for ident in o.job_ids))
    deleted, refused, freed = [], [], 0
    for job_id in job_ids:
        try:
            job = load_job(root, job_id)
        except AgentExecError as e:
            refused.append({"job_id": job_id, "reason": e.message})
            continue
        if not job.terminal and job.state != "created":
            reason = "the job is %s; stop it first (agent-exec kill %s)" % (job.state, job_id)
            refused.append({"job_id": job_id, "reason": reason})
            continue
        pids = _settled_lingering(job)
        if pids:
            # Deleting it would leave processes that no command can reach.
            refused.append({"job_id": job_id, "reason": _lingering_reason(job, pids)})
            continue
        freed += _remove_job(job.dir, o.dry_run)
        deleted.append(job_id)
    return {"deleted": deleted, "refused": refused, "freed_bytes": freed, "dry_run": o.dry_run}


def _remove_job(job_dir: str, dry_run: bool) -> int:
    """Delete a job directory (or only measure it); return the bytes it held.

    The directory is first renamed out of the job namespace (to a name that
    is not a job id, which every command ignores), so no reader ever sees a
    half-deleted job.
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
    going = os.path.join(parent, ".deleting-%s-%s" % (name, os.urandom(4).hex()))
    try:
        os.rename(job_dir, going)
    except OSError as e:
        raise AgentExecError("io_error", "cannot delete %s: %s" % (job_dir, e.strerror or e))
    shutil.rmtree(going, ignore_errors=True)
    return size


@command(
    "gc",
    "delete old finished jobs",
    tool_help=(
        "Delete finished jobs older than older_than (default 7 days), or beyond the "
        "newest max_jobs; dry_run shows what would go."
    ),
    opts=(
        Opt(
            "older_than",
            "duration",
            DEFAULT_GC_OLDER_THAN_MS,
            "delete the jobs that finished longer ago than this (default 7d)",
        ),
        Opt("max_jobs", "count", help="keep at most the newest N"),
        DRY_RUN,
    ),
    returns=(
        Field("deleted", COUNT, True),
        Field("job_ids", STRS, True),
        Field("skipped", COUNT, True),
    )
    + _REMOVAL_FIELDS,
    annotations=_DESTRUCTIVE,
)
def cmd_gc(o) -> dict:
    root = _root(o)
    out = {"deleted": 0, "job_ids": [], "skipped": 0, "refused": [], "freed_bytes": 0}
    out["dry_run"] = o.dry_run
    _check_root(root)  # a root that is a file is refused here as by run
    if not os.path.isdir(root):
        return out
    now = time.time()
    processes = {}  # one process table for the walk, if any job needs it
    rank = 0  # position among readable jobs, newest first
    for name, _entry in _iter_jobs(root):
        try:
            job = load_job(root, name)
        except AgentExecError:
            out["skipped"] += 1  # unreadable: never touched
            continue
        rank += 1
        if not job.terminal:
            out["skipped"] += 1  # running (or unknown): never touched
            continue
        stamp = job.record.get("finished_at") or job.meta.get("created_at")
        try:
            age_ms = (now - _parse_rfc3339(stamp)) * 1000
        except (TypeError, ValueError):
            age_ms = 0
        beyond = o.max_jobs is not None and rank > o.max_jobs
        if age_ms < o.older_than and not beyond:
            continue
        pids = _lingering(job, processes)
        if pids:  # deleting it would leave processes no command can reach
            out["refused"].append({"job_id": name, "reason": _lingering_reason(job, pids)})
            continue
        out["freed_bytes"] += _remove_job(job.dir, o.dry_run)
        out["job_ids"].append(name)
    out["deleted"] = len(out["job_ids"])
    return out


# ---- schema -------------------------------------------------------------------------


@command(
    "schema",
    "print the JSON Schema of every response",
    tool_help=(
        "The JSON Schema of every answer of every command, for a program that checks answers."
    ),
    returns=(
        Field("schema_format", {"const": "json-schema-draft-07"}, True),
        Field("schema", {"type": "object"}, True),
        Field("generated_at", STR, True),
    ),
    annotations={"readOnlyHint": True, "idempotentHint": True},
)
def cmd_schema(o) -> dict:
    return {
        "schema_format": "json-schema-draft-07",
        "schema": response_schema(),
        "generated_at": _now(),
    }


# ---- follow, completion ---------------------------------------------------------


def _cancel_on_sigint(o):
    """A cancel flag that Ctrl-C raises (o.interrupted says so): the follow
    loop then ends at its next step, wherever the signal found it."""
    import signal
    import threading

    flag = threading.Event()

    def on_sigint(_signum, _frame):
        o.interrupted = True
        flag.set()

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: Ctrl-C stays KeyboardInterrupt
        pass
    return flag


def _follow_exit_status(o, answer: dict) -> int:
    """The job's exit status; 130 after Ctrl-C, 141 (128 + SIGPIPE) when the
    reader went away before the end."""
    if getattr(o, "interrupted", False):
        return 130
    if getattr(o, "closed", False):
        return 141
    return _job_exit_status(answer)


@command(
    "follow",
    "print a job's output as it arrives, until the job ends (text, not JSON)",
    opts=(
        Opt(
            "stream",
            "choice",
            help="which output (default both, interleaved as they arrive)",
            choices=("both", "stdout", "stderr"),
        ),
        Opt("cursor", "cursor", help="start from C (default: the start)"),
        JOB_ID,
    ),
    returns=JOB_HEAD + RESULT_FIELDS + (CURSOR_FIELD,),
    exit_status=lambda o, answer: _follow_exit_status(o, answer),
    streams=True,
    fronts=("cli",),
    examples=(
        ("agent-exec follow 01M8", "watch it to the end; exits as the job did"),
        ("agent-exec follow --stream stderr 01M8", "only its stderr"),
    ),
)
def cmd_follow(o) -> dict:
    """Copy the job's new bytes to ``o.out`` until the job is terminal and read.

    Both streams come in the order full.log's rows give (_RowOrder); one
    stream, or a job whose full.log cannot give that order, is copied chunk
    by chunk.  Every byte is copied once, from stdout.log and stderr.log.
    """
    job = _open_job(o, o.job_id)
    which = o.stream or "both"
    streams = list(_STREAMS) if which == "both" else [which]
    pos = dict(zip(_STREAMS, o.cursor if o.cursor is not None else (0, 0)))
    rows = _RowOrder(job, pos) if which == "both" else None
    cancel = _cancelled(o) or _cancel_on_sigint(o)
    if job.state == "created":  # nothing to follow until `start`: wait for it
        job = _wait_started(os.path.dirname(job.dir), [job.id], None, cancel)
        if job.state == "created":
            out = job.head()
            out["cursor"] = make_cursor(pos["stdout"], pos["stderr"])
            return out
    watch = _LockWatch.acquire(job.path(META))
    try:
        while True:
            terminal = job.terminal
            before = _log_sizes(job)  # before reading: see _wait_output
            if rows is not None:
                data = rows.take(job)
                more = bool(data)
                if rows.broken or (terminal and not data):
                    rows = None  # the rest, chunk by chunk (full.log has said all it can)
                    more = True
            else:
                data, more = b"", False
                for stream in streams:
                    chunk, pos[stream], cut = read_span(
                        job, stream, pos[stream], READ_CHUNK, terminal
                    )
                    data += chunk
                    more = more or cut
            if data:
                o.out.write(data)
                o.out.flush()
            if (terminal and not more and rows is None) or (cancel is not None and cancel.is_set()):
                break
            if not data:
                if rows is not None:  # a row may come without the logs growing (a partial line)
                    watch.wait(READ_POLL_S, cancel)
                else:
                    _wait_output(job, watch, None, before, cancel)
            job = job.reload()
    except BrokenPipeError:  # `follow ID | head`: the reader has seen enough
        o.closed = True
    finally:
        watch.release()
    out = job.head()
    out["cursor"] = make_cursor(pos["stdout"], pos["stderr"])
    return out


class _RowOrder:
    """The order in which the two streams' bytes arrived, from full.log's rows.

    Each row of full.log is one line (or a cut piece of one) of one stream,
    in arrival order, its text byte for byte what the stream's log holds.
    take() walks the new rows and, for each, copies that many bytes (and the
    newline that ends them) from the stream's own log.  ``broken`` goes up
    when the rows cannot be matched with the logs (--max-output dropped
    bytes, a full.log that a full disk cut short, a row that differs): the
    caller then copies the rest chunk by chunk, so no byte is lost or doubled.
    """

    _TAGS = {b" [STDOUT] ": "stdout", b" [STDERR] ": "stderr"}
    _PREFIX = 24  # the RFC 3339 timestamp that starts every row

    def __init__(self, job: _Job, pos: dict) -> None:
        self.path = job.meta.get("log_path") or job.path(FULL_LOG)
        self.pos = pos  # the caller's: where each stream's next byte to copy is
        self.seen = {"stdout": 0, "stderr": 0}  # where the rows have got to
        self.cut = {"stdout": False, "stderr": False}  # the last row had no newline
        self.offset = 0  # of the next full.log row
        self.broken = bool(job.meta.get("max_output"))

    def take(self, job: _Job) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(READ_CHUNK)
        except OSError:
            self.broken = True
            return b""
        out = []
        start = 0
        while not self.broken:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if not self._row(job, data[start:end], out):
                break  # its bytes are not in the log yet: again next time
            start = end + 1
        self.offset += start
        return b"".join(out)

    def _row(self, job: _Job, row: bytes, out: list) -> bool:
        stream = self._TAGS.get(row[self._PREFIX : self._PREFIX + 10])
        if stream is None:
            self.broken = True
            return False
        text = row[self._PREFIX + 10 :]
        at = self.seen[stream]
        data, new_pos, _more = read_span(job, stream, at, len(text) + 2, True)
        if new_pos - len(data) != at:  # bytes dropped before this row
            self.broken = True
            return False
        i = 1 if self.cut[stream] and data[:1] == b"\n" else 0  # it ended the cut row
        if len(data) < i + len(text):
            return False
        if data[i : i + len(text)] != text:
            self.broken = True
            return False
        j = i + len(text)
        self.cut[stream] = data[j : j + 1] != b"\n"
        if not self.cut[stream]:
            j += 1
        skip = max(0, self.pos[stream] - at)  # before a --cursor: seen, not copied
        out.append(data[skip:j])
        self.seen[stream] = at + j
        self.pos[stream] = max(self.pos[stream], at + j)
        return True


@command(
    "completion",
    "print a shell completion script (bash, zsh or fish)",
    opts=(Opt("shell", "word", help="bash, zsh or fish", choices=("bash", "zsh", "fish")),),
    streams=True,
    fronts=("cli",),
    examples=(
        ('eval "$(agent-exec completion bash)"', "in ~/.bashrc"),
        ("agent-exec completion fish > ~/.config/fish/completions/agent-exec.fish", "fish"),
    ),
)
def cmd_completion(o) -> dict:
    o.out.write(_completion_script(o.shell).encode())
    return {}


def _completion_words() -> dict:
    """command -> its option strings, from the declarations (so new ones appear)."""
    words = {}
    for name, cmd in COMMANDS.items():
        flags = ["--help"]
        for opt in GLOBAL_OPTS + cmd.opts:
            if "cli" in opt.fronts and not _KINDS[opt.kind].positional:
                flags += list(_flags(opt))
        words[name] = flags
    return words


# Commands whose positional arguments are job ids, for the completion scripts.
_TAKES_JOB_IDS = ("status", "tail", "wait", "read", "kill", "delete", "follow", "tag")


def _completion_script(shell: str) -> str:
    words = _completion_words()
    names = " ".join(list(words) + ["help"])
    ids = 'agent-exec "${root[@]}" _complete_ids 2>/dev/null'
    fish_ids = "agent-exec _complete_ids 2>/dev/null"
    if shell == "fish":
        lines = [
            "# agent-exec completion for fish",
            "complete -c agent-exec -f",
            "complete -c agent-exec -n __fish_use_subcommand -a '%s'" % names,
        ]
        for name, flags in words.items():
            for flag in flags:
                lines.append(
                    "complete -c agent-exec -n '__fish_seen_subcommand_from %s' -l %s"
                    % (name, flag[2:])
                    if flag.startswith("--")
                    else "complete -c agent-exec -n '__fish_seen_subcommand_from %s' -s %s"
                    % (name, flag[1:])
                )
        lines.append(
            "complete -c agent-exec -n '__fish_seen_subcommand_from %s' -a '(%s)'"
            % (" ".join(_TAKES_JOB_IDS), fish_ids)
        )
        return "\n".join(lines) + "\n"
    cases = "".join(
        "        %s) opts=%s ;;\n" % (name, _sh_quote(" ".join(flags)))
        for name, flags in words.items()
    )
    script = _BASH_COMPLETION % {
        "names": names,
        "cases": cases,
        "ids_for": "|".join(_TAKES_JOB_IDS),
        "ids": ids,
    }
    if shell == "zsh":
        script = "# agent-exec completion for zsh (through bashcompinit)\n" + (
            "autoload -U +X bashcompinit && bashcompinit\n" + script
        )
    return script


def _sh_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


_BASH_COMPLETION = """# agent-exec completion for bash: eval "$(agent-exec completion bash)"
_agent_exec() {
    local cur="${COMP_WORDS[COMP_CWORD]}" cmd="" i opts root=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --root) root=(--root "${COMP_WORDS[i + 1]}"); ((i++)) ;;
            --root=*) root=("${COMP_WORDS[i]}") ;;
            -*) ;;
            *) cmd="${COMP_WORDS[i]}"; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "%(names)s --help --version --root -v" -- "$cur"))
        return
    fi
    case "$cmd" in
%(cases)s        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case "$cmd" in
        %(ids_for)s) COMPREPLY=($(compgen -W "$(%(ids)s)" -- "$cur")) ;;
        help) COMPREPLY=($(compgen -W "%(names)s" -- "$cur")) ;;
    esac
}
complete -F _agent_exec agent-exec
"""


# ---- install, uninstall ----------------------------------------------------------
#
# As a script, every call compiles this whole file first (CPython never caches
# a script's bytecode); imported, it loads the cached bytecode.  `install`
# puts a copy where it can be imported, compiles it once, and writes a
# launcher that imports it.  What it wrote is listed in install.json beside
# the copy, which is all that `uninstall` removes.

_MANIFEST = "install.json"
_LAUNCHER = """#!{python} -IS
# The agent-exec {version} launcher, written by `agent-exec install`: it runs
# the copy in this directory through its cached bytecode:
#     {lib}
# `agent-exec uninstall` removes it.
import sys

sys.path.insert(0, {lib!r})
__import__("agent_exec").cli()
"""


def _library_dir(prefix: "str | None") -> str:
    """<--prefix>/lib, by default $XDG_DATA_HOME/agent-exec/lib (or ~/.local/share/...)."""
    if prefix == "":
        raise UsageError("--prefix needs a directory, not an empty string")
    prefix = prefix or os.path.join(_data_home("the library", "--prefix DIR"), "agent-exec")
    return os.path.join(os.path.abspath(prefix), "lib")


def _bin_dir(bin_dir: "str | None") -> str:
    """--bin-dir, by default ~/.local/bin."""
    if bin_dir == "":
        raise UsageError("--bin-dir needs a directory, not an empty string")
    if not bin_dir:
        home = _home_dir()
        if home is None:
            raise AgentExecError("invalid_argument", "no home directory: pass --bin-dir DIR")
        bin_dir = os.path.join(home, ".local", "bin")
    return os.path.abspath(bin_dir)


def _on_path(directory: str) -> bool:
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return any(e and os.path.abspath(e) == directory for e in entries)


@command(
    "install",
    "install agent-exec for fast start-up: a private copy and an agent-exec launcher",
    opts=(
        Opt(
            "bin_dir",
            help="where the agent-exec launcher goes (default ~/.local/bin)",
            metavar="DIR",
        ),
        Opt(
            "prefix",
            help="where the copy goes, in DIR/lib (default $XDG_DATA_HOME/agent-exec)",
            metavar="DIR",
        ),
    ),
    fronts=("cli",),
    returns=(
        Field("version", STR, True),
        Field("python", STR, True),
        Field("library_path", STR, True),
        Field("bytecode_path", STR, True),
        Field("launcher_path", STR, True),
        Field("bin_dir", STR, True),
        Field("on_path", BOOL, True),
        Field("upgraded", BOOL, True),
        Field("manifest_path", STR, True),
    ),
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_install(o) -> dict:
    """Copy this file (or, piped in, its bytecode) into the library; write the launcher."""
    import importlib.util

    lib, bin_dir = _library_dir(o.prefix), _bin_dir(o.bin_dir)
    manifest = os.path.join(lib, _MANIFEST)
    before = _installed_files(manifest)
    upgraded = before is not None
    launcher = os.path.join(bin_dir, "agent-exec")
    _refuse_foreign_launcher(launcher)  # before anything is written
    if any(c.isspace() for c in sys.executable):
        raise AgentExecError(
            "invalid_argument",
            "install: the interpreter's path %r holds white space, which a #! line "
            "cannot take" % sys.executable,
        )
    try:
        os.makedirs(lib, 0o755, exist_ok=True)
        os.makedirs(bin_dir, 0o755, exist_ok=True)
        source = globals().get("__file__")
        if source and source.endswith(".py") and os.path.isfile(source):
            library = os.path.join(lib, "agent_exec.py")
            if os.path.abspath(source) != library:
                with open(source, "rb") as f:
                    _write_file_atomic(library, f.read(), 0o644)
            bytecode = importlib.util.cache_from_source(library)
            import py_compile

            py_compile.compile(library, cfile=bytecode, doraise=True)
        else:
            # No source to copy: write the bytecode as a sourceless module,
            # which the import system loads from lib/agent_exec.pyc when no
            # agent_exec.py stands beside it.
            library = bytecode = os.path.join(lib, "agent_exec.pyc")
            _write_file_atomic(bytecode, _own_bytecode(source), 0o644)
        text = _LAUNCHER.format(python=sys.executable, version=__version__, lib=lib)
        _write_file_atomic(launcher, text.encode(), 0o755)
        written = [library, launcher] + ([bytecode] if bytecode != library else [])
        _write_json_atomic(
            manifest,
            {"version": __version__, "python": sys.executable, "files": written},
        )
        for path in set(before or ()) - set(written):  # the last install's, not this one's
            if _ours(path, lib):
                _unlink_quietly(path)
    except OSError as e:
        raise AgentExecError("io_error", "install: %s: %s" % (e.filename or lib, e.strerror or e))
    return {
        "version": __version__,
        "python": sys.executable,
        "library_path": library,
        "bytecode_path": bytecode,
        "launcher_path": launcher,
        "bin_dir": bin_dir,
        "on_path": _on_path(bin_dir),
        "upgraded": upgraded,
        "manifest_path": manifest,
    }


def _refuse_foreign_launcher(path: str) -> None:
    """An agent-exec in the bin dir that install did not write (pip's, or a
    user's script) is left alone: install must not replace what it cannot
    give back."""
    try:
        head = _launcher_head(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise AgentExecError("io_error", "install: cannot read %s: %s" % (path, e.strerror or e))
    if _LAUNCHER_MARK not in head:
        raise AgentExecError(
            "invalid_argument",
            "install: %s exists and was not written by agent-exec install; remove it, "
            "or pass --bin-dir DIR" % path,
        )


def _ours(path: str, lib: str) -> bool:
    """May install or uninstall remove ``path``?  Files in the library are
    ours; a launcher only while it is still the one written for ``lib``."""
    if os.path.dirname(path) in (lib, os.path.join(lib, "__pycache__")):
        return True
    try:
        head = _launcher_head(path)
    except OSError:
        return False
    return _LAUNCHER_MARK in head and repr(lib).encode() in head


# What every launcher that install writes says of itself (see _LAUNCHER).
_LAUNCHER_MARK = b"written by `agent-exec install`"


def _launcher_head(path: str) -> bytes:
    """The start of a file that may be a launcher: enough for its mark and
    its library path.  Raises OSError."""
    with open(path, "rb") as f:
        return f.read(1024)


def _installed_files(manifest: str) -> "list | None":
    """The files an earlier install wrote (its install.json), or None if none."""
    try:
        files = _read_json(manifest).get("files")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AgentExecError(
            "io_error",
            "cannot read %s (%s): remove it, and the files beside it, to start afresh"
            % (manifest, e),
        )
    return [p for p in files if isinstance(p, str)] if isinstance(files, list) else []


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _own_bytecode(source: "str | None") -> bytes:
    """This module as a .pyc file: the one it was loaded from, or its code object."""
    if source and source.endswith(".pyc") and os.path.isfile(source):
        with open(source, "rb") as f:  # run from a sourceless install: copy it
            return f.read()
    if _MAIN_CODE is None:
        raise AgentExecError("invalid_argument", "install: cannot find agent-exec's own code")
    import importlib.util
    import marshal

    # The header is the magic number, then flags, mtime and source size,
    # which a sourceless load does not check.
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(_MAIN_CODE)


def _write_file_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``, mode ``mode``: a temp file, then a rename;
    nothing is left behind on error."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)  # exactly, whatever the umask
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@command(
    "uninstall",
    "remove what install wrote, and nothing else",
    opts=(Opt("prefix", help="the --prefix that install was given", metavar="DIR"),),
    returns=(Field("removed", STRS, True), Field("manifest_path", STR, True)),
    annotations=_DESTRUCTIVE,
    fronts=("cli",),
)
def cmd_uninstall(o) -> dict:
    """Remove the files that install.json lists, then install.json and the empty lib dir."""
    lib = _library_dir(o.prefix)
    manifest = os.path.join(lib, _MANIFEST)
    listed = _installed_files(manifest)
    if listed is None:
        return {"removed": [], "manifest_path": manifest}
    removed = []
    for path in listed + [manifest]:
        if not _ours(path, lib):
            continue  # a launcher that another install (or the user) has replaced
        try:
            if _unlink_quietly(path):
                removed.append(path)
        except OSError as e:
            raise AgentExecError("io_error", "uninstall: %s: %s" % (path, e.strerror or e))
    for d in (os.path.join(lib, "__pycache__"), lib):
        try:
            os.rmdir(d)  # only when empty: nothing install did not write
        except OSError:
            pass
    return {"removed": removed, "manifest_path": manifest}


# ---- install-skills -------------------------------------------------------------
#
# A skill is a folder with a SKILL.md (YAML front matter: name, description;
# then instructions for a model).  Harnesses look for them in .agents/skills/
# (or .claude/skills/) of the project or of the home directory; the
# .skill-lock.json beside that folder records what was installed from where,
# as the `skills` tools of the harnesses keep it.

_SKILL_NAME = "agent-exec"
_SKILL_LOCK = ".skill-lock.json"
_SKILL_SCHEMES = ("self", "local")
_SKILL_MD = """\
---
name: agent-exec
description: Run shell commands as background jobs that outlive the tool call - builds, test
  suites, servers, installs, anything that may take more than a few seconds or must keep running -
  then read their output by cursor, wait for them with a bounded wait, and kill them. Use it
  instead of a plain blocking shell call whenever a command may be slow, hang, prompt, or serve.
---

# agent-exec: background jobs for agents

`agent-exec` starts a command as a job and answers at once with a `job_id`; the
job keeps running under its own supervisor after the call (and the session)
ends. Every answer is one JSON object: check `ok` first, then `type`.

## When to use `run` rather than a plain shell call

- The command may take longer than a few seconds (build, test suite, install,
  download, migration), or you do not know how long it takes.
- It is a server or a watcher that must keep running while you do other work.
- Its output may be large: read it in pages instead of flooding the context.
- It may hang or ask a question: a job can be inspected, answered or killed.

A quick, known-short command (`ls`, `git status`) needs no job.

## The loop: run, read, wait

1. `agent-exec run -- make test` (or the MCP tool `run` with
   `"command": ["make", "test"]`; `--shell 'a | b'` for pipes). The answer has
   `job_id`, `state`, a `snapshot` of the first output and a `cursor`.
2. `agent-exec read JOB --cursor C` gives the output after cursor `C`
   (`stdout`, `stderr`) and the next `cursor`. Always pass the newest cursor:
   nothing is missed or repeated. `more: true` means call again at once;
   `eof: true` means all output is read, and the answer carries the result.
   `--wait-ms 5000` blocks until new output arrives.
3. `agent-exec wait JOB --timeout-ms 20000` blocks until the job ends. When
   `timed_out` is true the job is still running: wait again, or read.
4. `agent-exec status JOB` at any time: `state`, `exit_code`, `end_reason`.

Over MCP every blocking call is capped (20 s by default); a capped answer
says the job still runs, with the cursor to continue from. Cancelling a call
never stops the job.

## Readiness

For a server, `run --ready-port 8000 -- ...` or `run --ready-match 'Listening'`
answers once the port accepts connections or a line matches (`ready: true`),
so you do not sleep and guess. `wait JOB --ready` waits for it later.

## Stopping

`agent-exec kill JOB` sends TERM to every process of the job (`--signal KILL`
if it ignores TERM); `run --timeout 10m` bounds a job up front. Finished
jobs are removed with `agent-exec delete JOB` or `agent-exec gc`.

## The fields that matter

- `state`: `running`, `exited`, `killed` or `failed`.
- `exit_code`, `signal`, `end_reason` (`exit`, `signal`, `kill`, `timeout`,
  `spawn_failed`, `supervisor_lost`), `success`.
- `cursor`: where the next `read` starts; `snapshot.stdout_tail` and
  `snapshot.stderr_tail`: the latest output.
- `waiting_for_input`: the job blocks reading stdin (start it with
  `--stdin-open`, answer with `agent-exec send JOB --text 'y\\n'`).
- On error: `error.code` and `error.message`; `error.retryable` says whether
  trying again may help.
"""


def _skills_base(o) -> str:
    """The directory that holds the skills folder: here, or the home directory."""
    if getattr(o, "global"):
        home = _home_dir()
        if home is None:
            raise AgentExecError("invalid_argument", "install-skills --global: no home directory")
        return home
    try:
        return os.getcwd()
    except OSError as e:
        raise AgentExecError("cwd_not_found", "the current directory is gone: %s" % e)


def _skill_source(text: str) -> "tuple":
    """(scheme, path) of --source: self, or local:PATH (made absolute)."""
    scheme, colon, rest = text.partition(":")
    if not colon and scheme == "self":
        return "self", None
    if colon and scheme == "local":
        if not rest:
            raise AgentExecError("invalid_argument", "--source local:PATH needs a PATH")
        return "local", os.path.abspath(os.path.expanduser(rest))
    raise AgentExecError(
        "unknown_source_scheme",
        "--source %r: the sources are self and local:PATH" % _short(text),
    )


def _skill_front_matter_name(text: str) -> "str | None":
    """The ``name:`` of a SKILL.md's YAML front matter (None when it has none)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, colon, value = line.partition(":")
        if colon and key.strip() == "name":
            return value.strip().strip("\"'") or None
    return None


def _local_skill(path: str) -> "tuple":
    """(name, SKILL.md text) of a local skill folder, checked."""
    skill_md = os.path.join(path, "SKILL.md")
    if not os.path.isdir(path):
        raise AgentExecError("invalid_argument", "--source local:%s: not a directory" % path)
    try:
        with open(skill_md, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        raise AgentExecError("invalid_argument", "--source local:%s: no SKILL.md in it" % path)
    name = _skill_front_matter_name(text) or os.path.basename(os.path.normpath(path))
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise AgentExecError("invalid_argument", "SKILL.md of %s: bad skill name %r" % (path, name))
    return name, text


def _replace_tree(target: str, fill) -> None:
    """Make ``target`` a fresh directory filled by ``fill(tmp)``: built aside, then swapped in."""
    import shutil

    parent = os.path.dirname(target)
    tmp = "%s.%d.tmp" % (target, os.getpid())
    old = "%s.%d.old" % (target, os.getpid())
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        fill(tmp)
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(tmp, target)
    except (OSError, shutil.Error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AgentExecError("io_error", "cannot write %s: %s" % (target, e))
    shutil.rmtree(old, ignore_errors=True)


def _write_skill_lock(lock_path: str, entries: list) -> None:
    """Add (or replace, by name) ``entries`` in the lock file; other skills stay."""
    try:
        with open(lock_path, encoding="utf-8") as f:
            lock = json.load(f)
    except (OSError, ValueError):
        lock = {}
    skills = lock.get("skills") if isinstance(lock, dict) else None
    if not isinstance(skills, list):
        skills = []
    names = {e["name"] for e in entries}
    kept = [s for s in skills if not (isinstance(s, dict) and s.get("name") in names)]
    doc = {"version": 1, "skills": kept + entries}
    try:
        _write_file_atomic(lock_path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    except OSError as e:
        raise AgentExecError("io_error", "cannot write %s: %s" % (lock_path, e.strerror or e))


@command(
    "install-skills",
    "install agent-exec's skill (or a local one) where agent harnesses load skills",
    opts=(
        Opt(
            "source",
            default="self",
            help="self (agent-exec's own skill, the default) or local:PATH (a folder with a "
            "SKILL.md)",
            metavar="SOURCE",
        ),
        Opt("global", "flag", help="under the home directory instead of the current one"),
        Opt("claude", "flag", help="into .claude/skills/ instead of .agents/skills/"),
    ),
    fronts=("cli",),
    returns=(
        Field("type", {"const": "install_skills"}, True),
        Field(
            "skills",
            array(
                obj(
                    (
                        Field("name", STR, True),
                        Field("source_type", {"enum": list(_SKILL_SCHEMES)}, True),
                        Field("path", STR, True),
                    )
                )
            ),
            True,
        ),
        Field("global", BOOL, True),
        Field("lock_file_path", STR, True),
    ),
    examples=(
        ("agent-exec install-skills", "into ./.agents/skills/agent-exec/"),
        ("agent-exec install-skills --global --claude", "into ~/.claude/skills/agent-exec/"),
        ("agent-exec install-skills --source local:./my-skill", "a skill folder of your own"),
    ),
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": True},
)
def cmd_install_skills(o) -> dict:
    import shutil

    scheme, path = _skill_source(o.source)
    base = os.path.join(_skills_base(o), ".claude" if o.claude else ".agents")
    if scheme == "self":
        name, text = _SKILL_NAME, _SKILL_MD
    else:
        name, text = _local_skill(path)
    target = os.path.join(base, "skills", name)

    def fill(tmp: str) -> None:
        if scheme == "self":
            os.makedirs(tmp)
            with open(os.path.join(tmp, "SKILL.md"), "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copytree(path, tmp, symlinks=True)

    _replace_tree(target, fill)
    entry = {"name": name, "source_type": scheme, "path": target}
    lock_path = os.path.join(base, _SKILL_LOCK)
    source = "self" if scheme == "self" else "local:" + path
    _write_skill_lock(lock_path, [dict(entry, source=source, installed_at=_now())])
    return {
        "type": "install_skills",
        "skills": [entry],
        "global": bool(getattr(o, "global")),
        "lock_file_path": lock_path,
    }


def cmd_supervise(job_dir: str, fds: str) -> int:
    """The hidden ``_supervise`` subcommand: returns an exit code, prints nothing."""
    lock_fd, cfg_fd, handshake_fd = (int(x) for x in fds.split(","))
    for fd in (lock_fd, cfg_fd, handshake_fd):
        os.set_inheritable(fd, False)
    return supervise_main(job_dir, lock_fd, cfg_fd, handshake_fd)


# ==== Response schema ========================================================
#
# Derived from the declarations, so a field a handler emits is a field some
# declaration names.  Built only for `schema` (and a tool list): never on the
# path of an ordinary command.

_ENVELOPE_FIELDS = (Field("schema_version", {"const": SCHEMA_VERSION}, True),)


def _answer_schema(cmd: _Command) -> dict:
    head = _ENVELOPE_FIELDS + (
        Field("ok", {"const": True}, True),
        Field("type", {"const": cmd.name}, True),
    )
    schema = obj(head + cmd.returns)
    if cmd.variants:
        schema["anyOf"] = cmd.variants
    return schema


def response_schema() -> dict:
    """One draft-07 JSON Schema that every response of every command matches.

    Every response names its command in ``type``, so the top level is a
    oneOf over one definition per type.  Objects stay open (no
    additionalProperties: false) so that a field added later does not break
    an older client's validation.
    """
    error = obj(
        _ENVELOPE_FIELDS
        + (
            Field("ok", {"const": False}, True),
            Field("type", {"const": "error"}, True),
            Field("error", obj(ERROR_FIELDS), True),
        )
    )
    defs = {"snapshot": obj(SNAPSHOT_FIELDS), "error": error}
    for cmd in COMMANDS.values():
        if not cmd.streams:  # a streaming command's answer is its output, not JSON
            defs[cmd.name] = _answer_schema(cmd)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "agent-exec response",
        "definitions": defs,
        "oneOf": [ref(name) for name in sorted(defs) if name != "snapshot"],
    }


def tool_list() -> list:
    """The commands as tools (name, description, inputSchema, annotations), for a
    front end that is not the command line; from the same Opts as the parser."""
    return [_tool(cmd) for cmd in COMMANDS.values() if "mcp" in cmd.fronts]


def _tool(cmd: _Command) -> dict:
    opts = [x for x in cmd.opts if "mcp" in x.fronts]
    props = {}
    for x in opts:
        prop = dict(_KINDS[x.kind].json)
        if x.choices:
            prop = {"enum": list(x.choices)}
        if x.help:
            prop["description"] = x.help
        if x.default is not None and x.kind != "flag":
            prop["default"] = x.default
        props[x.name] = prop
    required = [
        x.name for x in opts if _KINDS[x.kind].positional and _KINDS[x.kind].nargs not in ("?", "*")
    ]
    schema = {"type": "object", "properties": props, "required": required}
    schema["additionalProperties"] = False
    tool = {"name": cmd.name, "description": cmd.help, "inputSchema": schema}
    if cmd.annotations:
        tool["annotations"] = dict(cmd.annotations)
    return tool


def options_from_arguments(name: str, arguments: dict, root: "str | None" = None):
    """The options object of command ``name`` from a tool call's JSON arguments.

    Each value goes through its kind's parser, as on the command line, and
    a missing one (or null) takes its default; an unknown, malformed or
    missing argument is a usage_error in the words argparse gives for the
    same mistake on the command line (the CLI's flag names), from the same
    Opts.  A wrong JSON type, which a command line cannot have, is said in
    the same form.
    """
    import types

    cmd = COMMANDS[name]
    prog = "%s %s" % (PROG, name)
    opts = {x.name: x for x in cmd.opts if "mcp" in x.fronts}
    unknown = [k for k in arguments if k not in opts]
    if unknown:
        raise UsageError(_unrecognized(unknown, opts))
    values = {x.name: x.default for x in cmd.opts}
    for x in cmd.opts:
        if _KINDS[x.kind].action == "store_true" and x.default is None:
            values[x.name] = False
    for key, value in arguments.items():
        if value is not None:
            values[key] = _argument_value(opts[key], value, prog)
    missing = [
        _cli_name(x)
        for x in opts.values()
        if _KINDS[x.kind].positional and not _optional(x) and values.get(x.name) in (None, [])
    ]
    if missing:
        raise UsageError("the following arguments are required: %s" % ", ".join(missing), "", prog)
    return types.SimpleNamespace(root=root, verbose=0, command_name=name, **values)


def _cli_name(opt: Opt) -> str:
    """How argparse names the option in a message: its flags, or a positional's metavar."""
    if _KINDS[opt.kind].positional:
        return opt.metavar or opt.name
    return "/".join(_flags(opt))


def _unrecognized(keys: list, opts: dict) -> str:
    """argparse's "unrecognized arguments", with the CLI's "did you mean" (see _did_you_mean)."""
    import difflib

    words = ["--" + str(k).replace("_", "-") for k in keys]
    message = "unrecognized arguments: %s" % " ".join(_short(w) for w in words)
    known = sorted("--" + k.replace("_", "-") for k in opts)
    close = sorted(k for k in known if k.startswith(words[0]))
    close = close or difflib.get_close_matches(words[0], known, 1, 0.6)
    if close:
        message += " (did you mean %s?)" % " or ".join(close[:3])
    return message


def _optional(opt: Opt) -> bool:
    """A positional that may be left out (the command's argv; a job id that --key replaces)."""
    return opt.kind == "argv" or _KINDS[opt.kind].nargs in ("?", "*")


def _argument_value(opt: Opt, value, prog: str = PROG):
    kind = _KINDS[opt.kind]
    many = kind.action == "append" or kind.nargs in ("+", "*", "...")
    json_type = kind.json.get("type")
    if many:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _wrong_type(opt, "a list of strings", value, prog)
        return [_parse_value(opt, kind, v, prog) for v in value]
    if json_type == "boolean":
        if not isinstance(value, bool):
            _wrong_type(opt, "true or false", value, prog)
        return value
    numbers = "integer" in (json_type if isinstance(json_type, list) else [json_type])
    if isinstance(value, bool) or not isinstance(value, (str, int) if numbers else str):
        _wrong_type(opt, "a string or a number" if numbers else "a string", value, prog)
    return _parse_value(opt, kind, value, prog)


def _wrong_type(opt: Opt, wanted: str, value, prog: str) -> None:
    got = _short(json.dumps(value)) if not isinstance(value, str) else repr(_short(value))
    raise UsageError("argument %s: expected %s, got %s" % (_cli_name(opt), wanted, got), "", prog)


def _parse_value(opt: Opt, kind: _Kind, value, prog: str = PROG):
    if opt.choices and value not in opt.choices:
        raise UsageError(
            "argument %s: invalid choice: %r (choose from %s)"
            % (_cli_name(opt), value, ", ".join(map(repr, opt.choices))),
            "",
            prog,
        )
    if kind.parse is None:
        return value if isinstance(value, str) else str(value)
    try:
        return kind.parse(str(value))
    except ValueError as e:
        raise UsageError("argument %s: %s" % (_cli_name(opt), e), "", prog)


# ==== Terminal screen ========================================================
#
# A small terminal emulator, enough to say what a person would see on a
# job's terminal (`screen`), and the escape stripper of --plain.  It follows
# xterm where programs rely on it: cursor movement, erase, scroll regions,
# insert and delete, the alternate screen, deferred autowrap, tabs, UTF-8
# and wide characters, the DEC line-drawing set.  Colours and every other
# attribute, and sequences it does not implement (CSI, OSC, DCS, SOS, PM,
# APC, charset designations, ESC x), are parsed and dropped, never shown.
# Combining marks (Mn, Me) attach to the cell before them; other zero-width
# characters (Cf: ZWJ, soft hyphen's kin) are dropped.  There is no
# scrollback and no reflow on resize.  A run of printable ASCII is written
# into its row with one slice assignment: that path is what bulk output
# takes, and what keeps 10 MB of text at a few seconds.

_ESC_RE = None  # compiled on first use: re costs start-up time that most commands never pay

# How long an unterminated OSC/DCS string may grow while it waits for its
# terminator across feed() calls; beyond, it is dropped.
_SCREEN_STRING_MAX = 1 << 16
# xterm's DEC Special Graphics set (ESC ( 0): the line-drawing characters
# curses draws boxes with.
_DEC_GRAPHICS = dict(
    zip(
        range(0x5F, 0x7F),
        "\u00a0\u25c6\u2592\u2409\u240c\u240d\u240a\u00b0\u00b1\u2424\u240b\u2518\u2510"
        "\u250c\u2514\u253c\u23ba\u23bb\u2500\u23bc\u23bd\u251c\u2524\u2534\u252c\u2502"
        "\u2264\u2265\u03c0\u2260\u00a3\u00b7",
    )
)


def _escape_regexes() -> "tuple":
    """(one whole escape sequence, a prefix of one that runs to the end of the
    text, a run of printable characters of one cell each), compiled once."""
    global _ESC_RE
    if _ESC_RE is None:
        import re

        whole = re.compile(
            "\x1b(?:"
            "\\[(?P<cp>[\x30-\x3f]*)(?P<ci>[\x20-\x2f]*)(?P<cf>[\x40-\x7e])"  # CSI
            "|\\](?P<osc>[^\x07\x1b]*)(?:\x07|\x1b\\\\)"  # OSC, ended by BEL or ST
            "|[PX^_][^\x07\x1b]*(?:\x07|\x1b\\\\)"  # DCS, SOS, PM, APC
            "|(?P<ei>[\x20-\x2f]+)(?P<ef>[\x30-\x7e])"  # ESC ( 0, ESC # 8, ...
            # ESC 7, ESC M, ESC c, ...: not the introducers above, cut short
            "|(?P<e>[\x30-\x4f\x51-\x57\x59\x5a\x5c\x60-\x7e])"
            ")"
        )
        partial = re.compile(
            "\x1b(?:\\[[\x30-\x3f]*[\x20-\x2f]*|[\\]PX^_][^\x07\x1b]*\x1b?|[\x20-\x2f]*)\\Z"
        )
        # Printable characters that take one cell each and combine with
        # nothing (checked against unicodedata by the tests): Latin,
        # Greek, Cyrillic, punctuation, arrows, maths, box drawing, blocks.
        narrow = re.compile(
            "[\x20-\x7e\u00a0-\u00ac\u00ae-\u02ff\u0370-\u0482\u048a-\u0590"
            "\u2010-\u2027\u2030-\u205f\u2190-\u2319\u231c-\u2328\u232b-\u23e8"
            "\u2500-\u25fc]+"
        )
        _ESC_RE = (whole, partial, narrow)
    return _ESC_RE


def _char_width(ch: str) -> int:
    """Cells a character takes: 2 for East Asian wide/fullwidth, 0 for marks."""
    import unicodedata

    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


class _Screen:
    """A terminal of ``cols`` x ``rows`` cells fed with a program's output bytes.

    Each cell holds a str: one character (with its combining marks), or ""
    for the right half of a wide character.  ``newline_mode`` makes LF also
    return the carriage, as a terminal's ONLCR does for a program that
    writes to it: on for the output of a job without a PTY (its "\\n" was
    never translated), off for a PTY's output, which the kernel translated.
    """

    def __init__(self, cols: int = 80, rows: int = 24, newline_mode: bool = False):
        import codecs

        self.cols, self.rows = max(1, cols), max(1, rows)
        self.newline_mode = newline_mode
        self.title = None  # type: str | None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # an escape sequence cut by the end of a feed()
        self.reset()

    # -- state ---------------------------------------------------------------

    def reset(self) -> None:
        """RIS (ESC c): the power-on state; the title stays, as in xterm."""
        self.grid = [self._blank() for _ in range(self.rows)]
        self.x = self.y = 0
        self.wrap_next = False  # the last column was written: wrap before the next character
        self.top, self.bottom = 0, self.rows - 1
        self.autowrap = True
        self.origin = False
        self.insert = False
        self.saved = None  # DECSC: (x, y, origin, charsets)
        self.main = None  # the main screen's grid while the alternate one is shown
        self.main_saved = None
        self.alt_screen = False
        self.tabs = set(range(8, self.cols, 8))
        self.charsets = [False, False]  # G0, G1: the DEC line-drawing set?
        self.shift = 0  # SI selects G0, SO G1
        self.last = " "

    def _blank(self) -> list:
        return [" "] * self.cols

    @property
    def cursor(self) -> dict:
        return {"row": self.y, "col": self.x}

    @property
    def lines(self) -> list:
        """The rows as text, trailing spaces trimmed."""
        return ["".join(row).rstrip(" ") for row in self.grid]

    def state(self) -> dict:
        """Everything the emulator holds, as JSON values (the screen cache)."""
        pending, flag = self._decoder.getstate()
        return {
            "cols": self.cols,
            "rows": self.rows,
            "newline_mode": self.newline_mode,
            "title": self.title,
            "grid": self.grid,
            "main": self.main,
            "x": self.x,
            "y": self.y,
            "wrap_next": self.wrap_next,
            "top": self.top,
            "bottom": self.bottom,
            "autowrap": self.autowrap,
            "origin": self.origin,
            "insert": self.insert,
            "saved": self.saved,
            "main_saved": self.main_saved,
            "alt_screen": self.alt_screen,
            "tabs": sorted(self.tabs),
            "charsets": self.charsets,
            "shift": self.shift,
            "last": self.last,
            "pending": self._pending,
            "utf8": pending.hex(),
            "utf8_flag": flag,
        }

    @classmethod
    def from_state(cls, s: dict) -> "_Screen":
        """The emulator that state() described; ValueError/KeyError/TypeError if damaged."""
        scr = cls(int(s["cols"]), int(s["rows"]), bool(s["newline_mode"]))
        for (
            key
        ) in "title x y wrap_next top bottom autowrap origin insert alt_screen shift last".split():
            setattr(scr, key, s[key])
        scr.grid = [list(r) for r in s["grid"]]
        scr.main = [list(r) for r in s["main"]] if s["main"] is not None else None
        scr.saved = tuple(s["saved"]) if s["saved"] is not None else None
        scr.main_saved = tuple(s["main_saved"]) if s["main_saved"] is not None else None
        scr.tabs = set(s["tabs"])
        scr.charsets = list(s["charsets"])
        scr._pending = s["pending"]
        scr._decoder.setstate((bytes.fromhex(s["utf8"]), int(s["utf8_flag"])))
        if len(scr.grid) != scr.rows or any(len(r) != scr.cols for r in scr.grid):
            raise ValueError("screen state: grid does not match its size")
        if not (0 <= scr.x < scr.cols and 0 <= scr.y < scr.rows):
            raise ValueError("screen state: cursor out of the grid")
        return scr

    # -- input ---------------------------------------------------------------

    def feed(self, data: bytes, final: bool = False) -> None:
        """Interpret output bytes; a sequence cut by the end of ``data`` waits for the rest."""
        text = self._decoder.decode(data, final)
        if self._pending:
            text, self._pending = self._pending + text, ""
        if text:
            self._interpret(text)

    def _interpret(self, text: str) -> None:
        whole, partial, narrow = _escape_regexes()
        n = len(text)
        i = 0
        run = narrow.match
        while i < n:
            m = run(text, i)
            if m is not None:
                j = m.end()
                # The common case inline: a run that fits in the row, written
                # over plain cells, no insert mode, no line-drawing set.
                x = self.x
                end = x + j - i
                row = self.grid[self.y]
                if (
                    end < self.cols
                    and not self.wrap_next
                    and not self.insert
                    and not self.charsets[self.shift]
                    and row[x] != ""
                    and row[end] != ""
                ):
                    row[x:end] = text[i:j]
                    self.x = end
                    self.last = text[j - 1]
                else:
                    self._print_run(m.group())
                i = j
                continue
            ch = text[i]
            if ch == "\x1b":
                m = whole.match(text, i)
                if m is not None:
                    i = m.end()
                    if text[i - 1] != "m" or m.lastgroup != "cf":  # SGR: nothing to do
                        self._escape(m)
                    continue
                if partial.match(text, i):  # the rest comes with the next feed()
                    if n - i <= _SCREEN_STRING_MAX:
                        self._pending = text[i:]
                    return
                i += 1  # a broken sequence: drop the ESC, show what follows
                continue
            if ch == "\r" and text[i + 1 : i + 2] == "\n" and not self.newline_mode:
                self.x = 0  # CR LF, as a terminal's output ends its lines
                self.wrap_next = False
                self._index()
                i += 2
                continue
            o = ord(ch)
            if o < 0x20:
                self._control(ch)
            elif 0x7F <= o < 0xA0:
                pass  # DEL and the C1 controls: nothing to show
            else:
                self._print_char(ch)
            i += 1

    # -- printing ------------------------------------------------------------

    def _print_run(self, s: str) -> None:
        """Characters of one cell each: written a row's worth at a time."""
        if self.insert:
            for ch in s:
                self._print_char(ch)
            return
        if self.charsets[self.shift]:
            s = s.translate(_DEC_GRAPHICS)
        cols = self.cols
        n = len(s)
        i = 0
        while i < n:
            if self.wrap_next:
                self._wrap()
            row = self.grid[self.y]
            x = self.x
            k = min(cols - x, n - i)
            if row[x] == "" and x > 0:  # overwriting a wide character's right half
                row[x - 1] = " "
            end = x + k
            if end < cols and row[end] == "":  # ... or its left half
                row[end] = " "
            row[x:end] = s[i : i + k]
            i += k
            if end >= cols:
                self.x = cols - 1
                if self.autowrap:
                    self.wrap_next = True
                elif i < n:  # no autowrap: the rest overwrites the last column
                    row[cols - 1] = s[n - 1]
                    i = n
            else:
                self.x = end
        self.last = s[-1]

    def _print_char(self, ch: str) -> None:
        width = _char_width(ch)
        if width == 0:
            if _char_category(ch) == "Cf":
                return
            # A combining mark joins the character before the cursor.
            x, row = self.x, self.grid[self.y]
            if not self.wrap_next:
                x -= 1
            if x >= 0 and row[x] == "" and x > 0:
                x -= 1
            if x >= 0:
                row[x] += ch
            return
        if self.wrap_next:
            self._wrap()
        cols = self.cols
        if width == 2 and self.x == cols - 1:
            # A wide character does not fit in the last column: it wraps (xterm).
            if not self.autowrap:
                return
            self.grid[self.y][self.x] = " "
            self.x = cols - 1
            self._wrap()
        if width > cols:
            return
        row = self.grid[self.y]
        x = self.x
        if self.insert:
            row[x:x] = [" "] * width
            del row[cols:]
            self._mend(row)
        if row[x] == "" and x > 0:
            row[x - 1] = " "
        end = x + width
        if end < cols and row[end] == "":
            row[end] = " "
        row[x] = ch
        if width == 2:
            row[x + 1] = ""
        if end >= cols:
            self.x = cols - 1
            self.wrap_next = self.autowrap
        else:
            self.x = end
        self.last = ch

    def _wrap(self) -> None:
        self.wrap_next = False
        self.x = 0
        self._index()

    # -- controls ------------------------------------------------------------

    def _control(self, ch: str) -> None:
        if ch == "\r":
            self.x = 0
            self.wrap_next = False
        elif ch in "\n\x0b\x0c":
            if self.newline_mode:
                self.x = 0
            self.wrap_next = False
            self._index()
        elif ch == "\b":
            if self.x > 0:
                self.x -= 1
            self.wrap_next = False
        elif ch == "\t":
            self._tab(1)
        elif ch == "\x0e":
            self.shift = 1
        elif ch == "\x0f":
            self.shift = 0
        # BEL and the other C0 controls show nothing.

    def _tab(self, n: int) -> None:
        x = self.x
        for _ in range(min(n, self.cols)):
            stops = [t for t in self.tabs if t > x]
            x = min(stops) if stops else self.cols - 1
        self.x = min(x, self.cols - 1)
        self.wrap_next = False

    def _index(self) -> None:
        """IND / LF: down one row, scrolling the region at its bottom margin."""
        if self.y == self.bottom:
            if self.top == 0:  # the whole screen (or its top part): the usual scroll
                del self.grid[0]
                self.grid.insert(self.bottom, [" "] * self.cols)
                return
            self._scroll_up(1)
        elif self.y < self.rows - 1:
            self.y += 1

    def _reverse_index(self) -> None:
        if self.y == self.top:
            self._scroll_down(1)
        elif self.y > 0:
            self.y -= 1

    def _scroll_up(self, n: int, top: "int | None" = None) -> None:
        top = self.top if top is None else top
        bottom = self.bottom
        n = min(n, bottom - top + 1)
        if n <= 0:
            return
        grid = self.grid
        del grid[top : top + n]
        grid[bottom - n + 1 : bottom - n + 1] = [self._blank() for _ in range(n)]

    def _scroll_down(self, n: int, top: "int | None" = None) -> None:
        top = self.top if top is None else top
        bottom = self.bottom
        n = min(n, bottom - top + 1)
        if n <= 0:
            return
        grid = self.grid
        del grid[bottom - n + 1 : bottom + 1]
        grid[top:top] = [self._blank() for _ in range(n)]

    # -- escape sequences ----------------------------------------------------

    def _escape(self, m) -> None:
        final = m.group("cf")
        if final is not None:
            self._csi(m.group("cp"), m.group("ci"), final)
            return
        osc = m.group("osc")
        if osc is not None:
            code, _, value = osc.partition(";")
            if code in ("0", "2"):
                self.title = value
            return
        e = m.group("e")
        if e is not None:
            self._esc(e)
            return
        inter, final = m.group("ei"), m.group("ef")
        if inter is not None:
            if inter in "()" and len(inter) == 1:
                self.charsets["()".index(inter)] = final == "0"
            elif inter == "#" and final == "8":  # DECALN: the screen full of E
                self.grid = [["E"] * self.cols for _ in range(self.rows)]
                self.x = self.y = 0
                self.wrap_next = False
        # DCS, SOS, PM, APC: dropped

    def _esc(self, e: str) -> None:
        if e == "7":
            self._save_cursor()
        elif e == "8":
            self._restore_cursor()
        elif e == "D":
            self.wrap_next = False
            self._index()
        elif e == "E":
            self.x = 0
            self.wrap_next = False
            self._index()
        elif e == "M":
            self.wrap_next = False
            self._reverse_index()
        elif e == "H":
            self.tabs.add(self.x)
        elif e == "c":
            self.reset()
        # ESC = and ESC > (keypad modes) and the rest: nothing to show

    def _save_cursor(self) -> None:
        self.saved = (self.x, self.y, self.origin, list(self.charsets), self.wrap_next)

    def _restore_cursor(self) -> None:
        if self.saved is None:
            self.x = self.y = 0
            self.origin = False
            self.wrap_next = False
            return
        x, y, self.origin, charsets, wrap = self.saved
        self.charsets = list(charsets)
        self.x = min(x, self.cols - 1)
        self.y = min(y, self.rows - 1)
        self.wrap_next = bool(wrap) and self.x == self.cols - 1

    def _csi(self, params: str, inter: str, final: str) -> None:
        private = params[:1] if params[:1] in ("?", ">", "<", "=") else ""
        if private:
            params = params[1:]
        args = []
        for p in params.split(";") if params else ():
            p = p.split(":", 1)[0]
            # (a 5000-digit number is an error to int() on 3.11+, and no
            # screen has that many cells)
            args.append(int(p[:6]) if p.isdigit() else 0)
        if inter:
            return  # DECSCUSR (CSI q with a space) and the like: no visible effect
        if private:
            if private == "?" and final in "hl":
                self._private_modes(args, final == "h")
            return
        a = args[0] if args else 0
        n = a or 1  # a count: 0 or missing means 1
        if final in "Hf":
            row = args[0] if args else 0
            col = args[1] if len(args) > 1 else 0
            self._goto(max(row, 1) - 1, max(col, 1) - 1)
        elif final == "A":
            top = self.top if self.y >= self.top else 0
            self._move(max(top, self.y - n), self.x)
        elif final in "Be":
            bottom = self.bottom if self.y <= self.bottom else self.rows - 1
            self._move(min(bottom, self.y + n), self.x)
        elif final in "Ca":
            self._move(self.y, self.x + n)
        elif final == "D":
            self._move(self.y, self.x - n)
        elif final == "E":
            bottom = self.bottom if self.y <= self.bottom else self.rows - 1
            self._move(min(bottom, self.y + n), 0)
        elif final == "F":
            top = self.top if self.y >= self.top else 0
            self._move(max(top, self.y - n), 0)
        elif final in "G`":
            self._move(self.y, n - 1)
        elif final == "d":
            self._goto(n - 1, self.x)
        elif final == "J":
            self._erase_display(a)
        elif final == "K":
            self._erase_line(a)
        elif final == "L":
            if self.top <= self.y <= self.bottom:
                self._scroll_down(n, self.y)
                self.x = 0
                self.wrap_next = False
        elif final == "M":
            if self.top <= self.y <= self.bottom:
                self._scroll_up(n, self.y)
                self.x = 0
                self.wrap_next = False
        elif final == "@":
            row = self.grid[self.y]
            n = min(n, self.cols - self.x)
            row[self.x : self.x] = [" "] * n
            del row[self.cols :]
            self._mend(row)
            self.wrap_next = False
        elif final == "P":
            row = self.grid[self.y]
            n = min(n, self.cols - self.x)
            del row[self.x : self.x + n]
            row.extend([" "] * n)
            self._mend(row)
            self.wrap_next = False
        elif final == "X":
            row = self.grid[self.y]
            end = min(self.cols, self.x + n)
            row[self.x : end] = [" "] * (end - self.x)
            self._mend(row)
            self.wrap_next = False
        elif final == "S":
            self._scroll_up(n)
        elif final == "T":
            if len(args) <= 1:  # with 5 arguments: xterm's mouse highlighting
                self._scroll_down(n)
        elif final == "r":
            top = (args[0] if args and args[0] else 1) - 1
            bottom = (args[1] if len(args) > 1 and args[1] else self.rows) - 1
            bottom = min(bottom, self.rows - 1)
            if top < bottom:
                self.top, self.bottom = top, bottom
                self._goto(0, 0)
        elif final == "s":
            self._save_cursor()
        elif final == "u":
            self._restore_cursor()
        elif final in "hl":
            if 4 in args:  # IRM
                self.insert = final == "h"
            if 20 in args:  # LNM
                self.newline_mode = final == "h"
        elif final == "g":
            if a == 0:
                self.tabs.discard(self.x)
            elif a == 3:
                self.tabs.clear()
        elif final == "I":
            self._tab(n)
        elif final == "Z":
            x = self.x
            for _ in range(min(n, self.cols)):
                stops = [t for t in self.tabs if t < x]
                x = max(stops) if stops else 0
            self._move(self.y, x)
        elif final == "b":  # REP: the last character again
            if self.last:
                self._print_run(self.last * min(n, self.cols * self.rows))
        # m (SGR), n (DSR), c (DA), t (window ops), q (LEDs) and the rest: dropped

    def _mend(self, row: list) -> None:
        """After a shift of cells: no half of a wide character left alone."""
        if row and row[0] == "":
            row[0] = " "
        for i in range(1, len(row)):
            if row[i] == "" and _char_width(row[i - 1][:1] or " ") != 2:
                row[i] = " "
        last = row[-1]
        if last and _char_width(last[:1]) == 2:
            row[-1] = " "

    def _move(self, y: int, x: int) -> None:
        self.y = max(0, min(self.rows - 1, y))
        self.x = max(0, min(self.cols - 1, x))
        self.wrap_next = False

    def _goto(self, y: int, x: int) -> None:
        """CUP, VPA: with origin mode, rows count from the top margin and stay in the region."""
        if self.origin:
            y = max(self.top, min(self.bottom, y + self.top))
        self._move(y, x)

    def _erase_display(self, how: int) -> None:
        if how == 0:
            self._erase_line(0)
            for r in range(self.y + 1, self.rows):
                self.grid[r] = self._blank()
        elif how == 1:
            self._erase_line(1)
            for r in range(self.y):
                self.grid[r] = self._blank()
        elif how == 2:
            self.grid = [self._blank() for _ in range(self.rows)]
        # 3: xterm erases the scrollback only, which is not kept here
        self.wrap_next = False

    def _erase_line(self, how: int) -> None:
        row = self.grid[self.y]
        x = self.x
        if how == 0:
            if x > 0 and row[x] == "":
                row[x - 1] = " "
            row[x:] = [" "] * (self.cols - x)
        elif how == 1:
            end = min(x + 1, self.cols)
            if end < self.cols and row[end] == "":
                row[end] = " "
            row[:end] = [" "] * end
        elif how == 2:
            self.grid[self.y] = self._blank()
        self.wrap_next = False

    def _private_modes(self, args: list, on: bool) -> None:
        for mode in args:
            if mode == 7:
                self.autowrap = on
                if not on:
                    self.wrap_next = False
            elif mode == 6:
                self.origin = on
                self._goto(0, 0)
            elif mode in (1049, 1047, 47):
                if mode == 1049 and on:
                    self._save_cursor()
                self._alternate(on, clear=mode != 47)
                if mode == 1049 and not on:
                    self._restore_cursor()
            elif mode == 1048:
                if on:
                    self._save_cursor()
                else:
                    self._restore_cursor()

    def _alternate(self, on: bool, clear: bool) -> None:
        """Show the alternate screen (on) or the main one again."""
        if on == self.alt_screen:
            if on and clear:
                self.grid = [self._blank() for _ in range(self.rows)]
            return
        if on:
            self.main, self.main_saved = self.grid, self.saved
            self.grid = [self._blank() for _ in range(self.rows)]
        else:
            if clear:
                self.grid = [self._blank() for _ in range(self.rows)]
            self.grid = self.main if self.main is not None else self.grid
            self.main = None
            if self.main_saved is not None:
                self.saved = self.main_saved
            self.main_saved = None
        self.alt_screen = on

    # -- size ----------------------------------------------------------------

    def resize(self, cols: int, rows: int) -> None:
        """A new size: rows dropped from the top when needed to keep the cursor's,
        blank rows added at the bottom, columns cut or padded (no reflow)."""
        cols, rows = max(1, cols), max(1, rows)
        if (cols, rows) == (self.cols, self.rows):
            return
        old_cols = self.cols
        drop = max(0, self.y + 1 - rows)
        self.grid = self._fit(self.grid, cols, rows, drop)
        if self.main is not None:
            self.main = self._fit(self.main, cols, rows, max(0, len(self.main) - rows))
        self.y -= drop
        self.cols, self.rows = cols, rows
        self.x = min(self.x, cols - 1)
        self.y = max(0, min(self.y, rows - 1))
        self.wrap_next = False
        self.top, self.bottom = 0, rows - 1
        self.tabs = {t for t in self.tabs if t < cols} | set(range(-(-old_cols // 8) * 8, cols, 8))
        self.tabs.discard(0)

    def _fit(self, grid: list, cols: int, rows: int, drop: int) -> list:
        out = []
        for row in grid[drop : drop + rows]:
            row = row[:cols] + [" "] * (cols - len(row))
            if row[-1] != "" and _char_width(row[-1][:1] or " ") == 2:
                row[-1] = " "  # a wide character cut in half
            out.append(row)
        while len(out) < rows:
            out.append([" "] * cols)
        return out


def _char_category(ch: str) -> str:
    import unicodedata

    return unicodedata.category(ch)


# -- --plain -------------------------------------------------------------------

# What --plain keeps of erase-in-line, as private markers while a line is
# rebuilt (the text's own C0 controls are removed before they are used).
_PLAIN_EL = {"": "\x01", "0": "\x01", "1": "\x02", "2": "\x03"}


def _plain_text(text: str) -> str:
    """Text as a person reads it on a terminal, line by line: --plain.

    Escape sequences go (CSI, OSC, DCS, SOS, PM, APC, charset designations,
    ESC x), and so does a sequence cut off at the end of ``text`` (a read
    chunk can end inside one; the cursor still counts its bytes).  A line
    redrawn with CR is reduced to its last version (see _plain_line).  BS
    steps back one character; other control characters go, except tab and
    newline.  A line that ends with CR LF keeps its text.  Cursor movement
    between lines is not followed: use ``screen`` for that.
    """
    if _PLAIN_NEEDED.search(text) is None:
        return text

    whole, partial, _narrow = _escape_regexes()
    text = _PLAIN_MARKERS.sub("", text)  # the text's own: the markers below are ours

    if "K" in text:  # erase in line: kept as a marker, for the redraws below
        text = _PLAIN_EL_RE.sub(lambda m: _PLAIN_EL[m.group(1)], text)
    text = whole.sub("", text)
    cut = partial.search(text)
    if cut is not None:
        text = text[: cut.start()]
    text = _PLAIN_CONTROLS.sub("", text)
    if _PLAIN_REDRAWN.search(text) is None:
        return text
    return "\n".join(_plain_line(line) for line in text.split("\n"))


# Anything --plain changes; the text's own \x01-\x03 (the erase markers are
# those); the controls it removes once escapes are gone (all but \t \n \r
# \b and the markers); what makes a line need rebuilding.
_PLAIN_NEEDED = _LazyRegex(lambda: _compile("[\x00-\x08\x0b-\x1f\x7f]"))
_PLAIN_EL_RE = _LazyRegex(lambda: _compile("\x1b\\[([012]?)K"))
_PLAIN_MARKERS = _LazyRegex(lambda: _compile("[\x01-\x03]"))
_PLAIN_CONTROLS = _LazyRegex(lambda: _compile("[\x00\x04-\x07\x0b\x0c\x0e-\x1f\x7f]"))
_PLAIN_REDRAWN = _LazyRegex(lambda: _compile("[\r\b\x01-\x03]"))


def _plain_line(line: str) -> str:
    """One line reduced to its last version, with its BS and erase markers applied.

    A line redrawn with CR is its last redraw: the text after the last CR
    that is followed by anything (a CR that ends the line, as in CR LF or a
    progress bar waiting for its next redraw, leaves the version before it).
    """
    if not any(c in line for c in "\r\b\x01\x02\x03"):
        return line
    if "\r" in line:
        versions = [v for v in line.split("\r") if v]
        line = versions[-1] if versions else ""
    if "\b" not in line and "\x02" not in line and "\x03" not in line:
        return line.replace("\x01", "")  # erasing from the end of the text erases nothing
    cells = []  # type: list
    pos = 0
    for ch in line:
        if ch == "\r":
            pos = 0
        elif ch == "\b":
            pos = max(0, pos - 1)
        elif ch == "\x01":
            del cells[pos:]
        elif ch == "\x02":
            cells[: min(pos + 1, len(cells))] = [" "] * min(pos + 1, len(cells))
        elif ch == "\x03":
            cells = [" "] * len(cells)
        elif pos < len(cells):
            cells[pos] = ch
            pos += 1
        else:
            cells.extend(" " * (pos - len(cells)))
            cells.append(ch)
            pos += 1
    erased = "\x02" in line or "\x03" in line
    return "".join(cells).rstrip(" ") if erased else "".join(cells)


# read --plain holds back an unfinished escape sequence at the end of a chunk
# up to this long; a longer one (an endless OSC) is let go, as the raw read.
_ESCAPE_HOLD_MAX = 256


def _unfinished_escape(data: bytes) -> int:
    """How many bytes at the end of ``data`` begin an escape sequence that is
    not finished (0 when none)."""
    esc = data.rfind(b"\x1b", max(0, len(data) - _ESCAPE_HOLD_MAX))
    if esc < 0:
        return 0
    tail = data[esc:].decode("utf-8", "replace")
    return len(data) - esc if _escape_regexes()[1].match(tail) else 0


def _plain_span(job, stream: str, pos: int, data: bytes, new_pos: int, more: bool, terminal):
    """read --plain: a chunk that ends inside an escape sequence ends before it
    instead, so the next read starts at its ESC and no half of it shows as
    text.  A chunk that is nothing but the start of one (a --max-bytes
    smaller than the sequence) moves past the whole sequence, with no text."""
    cut = _unfinished_escape(data)
    if not cut:
        return data, new_pos, more
    if cut < len(data):
        return data[:-cut], new_pos - cut, True
    ahead, _end, _more = read_span(job, stream, pos, _ESCAPE_HOLD_MAX, terminal)
    whole = _escape_regexes()[0].match(ahead.decode("latin-1"))  # one byte, one character
    if whole is None:
        return data, new_pos, more  # endless or not there yet: as the raw read
    return b"", pos + whole.end(), True


def _plain_snapshot(snap: dict) -> dict:
    """A snapshot object with --plain text; its byte counts stay the raw ones."""
    for key in ("stdout_tail", "stderr_tail"):
        if key in snap:
            snap[key] = _plain_text(snap[key])
    return snap


# -- a job's screen, from its stdout.log -------------------------------------------
#
# Cost: `screen` keeps a checkpoint, screen.cache in the job directory (mode
# 0600, replaced atomically): the emulator's whole state and the offset of
# stdout.log it reflects, valid while the log's inode, dropped-byte count and
# the 32 bytes before that offset are the same (a compacted or replaced log
# is read afresh).  So each call
# feeds only the bytes that arrived since the last one.  Without a valid
# checkpoint, the log is searched backwards, with bytes.find-speed scans, for
# the last point where the screen's content is known without the output
# before it, and the emulator starts there:
#   - RIS (ESC c): everything is reset;
#   - ESC [?1049h not followed by a switch back to the main screen: the
#     alternate screen starts blank, and the main one is never shown again;
#   - a clear with the cursor homed (ESC [H ESC [2J, or the other order)
#     outside a span of the alternate screen that ends later (a full-screen
#     program that has exited: a clear before it started still counts): the
#     screen is blank; whether it is the alternate one is the last screen
#     switch before it (searched further back);
#   - the start of the last rows+1 lines, when these hold no escape but
#     colours, erase in line and OSC, and what comes before them nothing with
#     a lasting effect (modes, a scroll region, tab stops, charsets): a plain
#     or coloured log (LF ends a line at column 0 without a PTY; on a PTY the
#     line must end with CR LF).
# The title set before that point is searched for too (backwards, until one
# is found).  Modes set before it (a scroll region, autowrap off) are not
# seen: programs that clear set them again.  A checkpoint far behind the
# log (64 KiB) gets the same search over the bytes after it, so a call never
# feeds more than the output since the last such point.

_SCREEN_CACHE_VERSION = 1
_SCREEN_BLOCK = 1 << 20  # bytes read (and fed) at a time
# A size beyond what run --pty accepts (a damaged file) is cut to it: the
# grid is cols x rows cells.
_SCREEN_MAX_COLS, _SCREEN_MAX_ROWS = TERM_MAX_COLS, TERM_MAX_ROWS


def _screen_size(meta: dict) -> "tuple":
    """(cols, rows, pty) of a job's terminal, as meta.json has them (80x24 without)."""
    size = meta.get("pty_size")
    cols, rows = DEFAULT_PTY_SIZE
    if isinstance(size, dict):
        c, r = size.get("cols"), size.get("rows")
        if isinstance(c, int) and isinstance(r, int) and c > 0 and r > 0:
            cols, rows = min(c, _SCREEN_MAX_COLS), min(r, _SCREEN_MAX_ROWS)
    return cols, rows, bool(meta.get("pty"))


def _screen_resizes(job_dir: str) -> list:
    """resize.jsonl: [(at, cols, rows)] in order; a damaged line is skipped."""
    out = []
    try:
        with open(os.path.join(job_dir, RESIZE_LOG), "rb") as f:
            raw = f.read()
    except OSError:
        return out
    for line in raw.splitlines():
        try:
            doc = json.loads(line)
            at, cols, rows = doc["at"], doc["cols"], doc["rows"]
        except (ValueError, KeyError, TypeError):
            continue
        if all(isinstance(v, int) and v >= 0 for v in (at, cols, rows)) and cols and rows:
            out.append((at, min(cols, _SCREEN_MAX_COLS), min(rows, _SCREEN_MAX_ROWS)))
    return out


def _screen_events():
    import re

    return re.compile(
        b"\x1bc|\x1b\\[\\?(1049|1047|47)([hl])"
        b"|\x1b\\[(?:1;1|1|;|1;)?H\x1b\\[2J|\x1b\\[2J\x1b\\[(?:1;1|1|;|1;)?H"
    )


_SCREEN_EVENTS = _LazyRegex(_screen_events)


def _screen_restart(
    fd: int, size: int, rows: int, pty: bool, floor: int = 0, floor_alt: bool = False
) -> "tuple | None":
    """(offset, alternate): where a cold start may begin feeding stdout.log (see above).

    With ``floor`` (a checkpoint's offset, whose screen is alternate or not
    as ``floor_alt`` says), only the bytes after it are searched, and None
    means that none of them will do.
    """
    events = _SCREEN_EVENTS
    end = size
    exit_after = False  # a switch back to the main screen comes later
    cleared = None  # offset of a clear that waits for the alternate/main question
    saw_esc = False
    while end > floor:
        begin = max(floor, end - _SCREEN_BLOCK)
        buf = os.pread(fd, min(size, end + 16) - begin, begin)
        if b"\x1b" not in buf:
            end = begin
            continue
        saw_esc = True
        if cleared is not None:
            # Only the last screen switch (or reset) before the clear is wanted
            # now: plain substring searches, much faster than the regex.
            found = _screen_last_switch(buf, end - begin)
            if found is not None:
                return cleared, found
            end = begin
            continue
        if b"\x1bc" not in buf and b"\x1b[?" not in buf and b"[2J" not in buf:
            end = begin  # no event here: skip the regex, which tries at every ESC
            continue
        for m in reversed([m for m in events.finditer(buf) if begin + m.start() < end]):
            at = begin + m.start()
            mode, how = m.group(1), m.group(2)
            if mode is None and m.group().endswith(b"c"):  # RIS
                return (cleared if cleared is not None else at), False
            if mode is not None:
                if cleared is not None:
                    return cleared, how == b"h"
                if how == b"l":
                    exit_after = True
                elif exit_after:
                    # The start of the alternate screen that the later switch
                    # back ends: what comes before is the main screen it shows
                    # again, so a clear before here will do.
                    exit_after = False
                elif mode == b"1049":
                    return at, False  # fed from here, the emulator switches itself
            elif cleared is None and not exit_after:
                cleared = at
        end = begin
    if cleared is not None:
        return cleared, floor_alt
    if floor:
        return None
    start = _screen_tail_start(fd, size, rows, pty) if size else 0
    if start and saw_esc:
        # Escapes, but maybe only colours: then the tail still tells it all.
        if _screen_search(fd, start, size, _SCREEN_MOVES) or _screen_search(
            fd, 0, start, _SCREEN_MODES
        ):
            start = 0
    return start, False


# After the start of the last lines, what a line may hold: colours, erase in
# line, OSC; anything else (a cursor movement up into the rows before, SO,
# SI) makes the start unsafe.  Before it, what has a lasting effect: modes,
# scroll regions, tab stops, saved cursors, charsets.
_SCREEN_MOVES = _LazyRegex(lambda: _compile(b"\x1b(?!\\[[\x30-\x3f]*[mK]|\\])|[\x0e\x0f]"))
_SCREEN_MODES = _LazyRegex(
    lambda: _compile(b"\x1b\\[[\x30-\x3f]*[\x20-\x2f]*[hlrgsu]|\x1b[()*+\\-./H78#]|[\x0e\x0f]")
)


def _screen_search(fd: int, lo: int, hi: int, regex) -> bool:
    """True when ``regex`` matches somewhere from offset lo (before hi), block by block.

    Blocks end after a newline, so that no sequence is cut between two.  Colours
    are most of a log's escapes, and the regex would try at every ESC: a block
    whose every ESC starts a colour, an erase in line or an OSC (or ends one)
    is told apart by counting, at C speed, and skipped.
    """
    pos = lo
    while pos < hi:
        buf = os.pread(fd, min(_SCREEN_BLOCK, hi - pos), pos)
        if not buf:
            break
        if pos + len(buf) < hi and buf.rfind(b"\n") > 0:
            buf = buf[: buf.rfind(b"\n") + 1]
        pos += len(buf)
        if b"\x1b" not in buf and b"\x0e" not in buf and b"\x0f" not in buf:
            continue
        bare = buf.translate(None, b"0123456789;:")  # ESC [ 1;31 m is ESC [ m now
        known = sum(bare.count(x) for x in (b"\x1b[m", b"\x1b[K", b"\x1b]", b"\x1b\\"))
        if known == bare.count(b"\x1b") and b"\x0e" not in buf and b"\x0f" not in buf:
            continue
        if regex.search(buf) is not None:
            return True
    return False


def _screen_last_switch(buf: bytes, limit: int) -> "bool | None":
    """Whether the last screen switch or reset that starts before ``limit`` in
    ``buf`` left the alternate screen on (None: there is none)."""
    on = None
    at = buf.rfind(b"\x1b[?", 0, limit + 2)
    while at >= 0:
        m = _SCREEN_SWITCH.match(buf, at)
        if m is not None:
            on = m.group(1) == b"h"
            break
        at = buf.rfind(b"\x1b[?", 0, at + 2)
    if buf.rfind(b"\x1bc", 0, limit + 1) > at:
        return False
    return on


_SCREEN_SWITCH = _LazyRegex(lambda: _compile(b"\x1b\\[\\?(?:1049|1047|47)([hl])"))


def _screen_tail_start(fd: int, size: int, rows: int, pty: bool) -> int:
    """In a log without escapes: the start of its last rows+1 lines (0 if fewer)."""
    need = rows + 1
    begin = size
    buf = b""
    while begin > 0:
        step = min(begin, _SCREEN_BLOCK)
        begin -= step
        buf = os.pread(fd, step, begin) + buf
        if buf.count(b"\n") > need:
            break
    pos = len(buf)
    for _ in range(need):
        pos = buf.rfind(b"\n", 0, pos)
        if pos < 0:
            return 0
    if pty and (pos == 0 or buf[pos - 1 : pos] != b"\r"):
        return 0  # a bare LF on a terminal keeps the column: not a clean line start
    return begin + pos + 1


def _screen_last_title(fd: int, lo: int, hi: int) -> "str | None":
    """The title that the last OSC 0 or 2 between offsets lo and hi set (None: none)."""
    end = hi
    while end > lo:
        begin = max(lo, end - _SCREEN_BLOCK)
        buf = os.pread(fd, end - begin, begin)
        at = max(buf.rfind(b"\x1b]0;"), buf.rfind(b"\x1b]2;"))
        if at >= 0:
            want = min(hi - (begin + at) - 4, _SCREEN_STRING_MAX)
            text = os.pread(fd, want, begin + at + 4) if want > 0 else b""
            for stop in (text.find(b"\x07"), text.find(b"\x1b")):
                if stop >= 0:
                    text = text[:stop]
            return _decode(text)
        end = begin + 3  # a sequence cut by the block's start is found in the next
        if begin == lo:
            break
    return None


def _fresh_screen(cols, rows, pty, resizes, dropped, offset, alternate) -> "tuple":
    """(a new _Screen for feeding from ``offset``, the resizes applied before it)."""
    applied = 0
    for at, c, r in resizes:
        if at - dropped > offset:
            break
        cols, rows = c, r
        applied += 1
    screen = _Screen(cols, rows, not pty)
    if alternate:
        screen._alternate(True, clear=True)
    return screen, applied


# A checkpoint this far behind the log: look for a restart point in between
# (feeding is the slow part; the search runs at bytes.find speed).
_SCREEN_SKIP_MIN = 1 << 16


def _screen_fingerprint(fd: int, offset: int) -> str:
    """The last bytes before ``offset``: a log replaced by one of the same inode
    number and size (inodes are reused at once) does not pass for the old one."""
    start = max(0, offset - 32)
    return os.pread(fd, offset - start, start).hex()


def _load_screen_cache(job, fd: int, st, dropped: int, size_key: list) -> "tuple | None":
    """(screen, offset, resizes applied) from a checkpoint that still fits the log."""
    try:
        with open(job.path(SCREEN_CACHE), "rb") as f:
            doc = json.loads(f.read())
        if (
            doc.get("version") != _SCREEN_CACHE_VERSION
            or doc.get("ino") != st.st_ino
            or doc.get("dev") != st.st_dev
            or doc.get("dropped") != dropped
            or doc.get("size_key") != size_key
            or not 0 <= doc.get("offset", -1) <= st.st_size
            or doc.get("last") != _screen_fingerprint(fd, doc["offset"])
        ):
            return None
        return _Screen.from_state(doc["state"]), doc["offset"], int(doc["applied"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _save_screen_cache(job, fd, st, dropped, size_key, screen, offset, applied) -> None:
    """Best effort: a read-only job directory just means no checkpoint."""
    doc = {
        "last": _screen_fingerprint(fd, offset),
        "version": _SCREEN_CACHE_VERSION,
        "ino": st.st_ino,
        "dev": st.st_dev,
        "dropped": dropped,
        "size_key": size_key,
        "offset": offset,
        "applied": applied,
        "state": screen.state(),
    }
    try:
        _write_json_atomic(job.path(SCREEN_CACHE), doc)
    except OSError as e:
        _log(3, "screen: cannot write %s: %s" % (SCREEN_CACHE, e))


def _job_screen(job, use_cache: bool = True) -> "tuple":
    """(the _Screen of a job's stdout.log as it is now, the stdout position it reflects)."""
    cols, rows, pty = _screen_size(job.meta)
    size_key = [cols, rows, pty]
    resizes = _screen_resizes(job.dir)
    dropped = job.record.get("stdout_dropped_bytes") or 0
    try:
        fd = os.open(job.path(STDOUT_LOG), os.O_RDONLY)
    except OSError:
        return _Screen(cols, rows, not pty), dropped
    try:
        st = os.fstat(fd)
        size = st.st_size
        cached = _load_screen_cache(job, fd, st, dropped, size_key) if use_cache else None
        if cached is not None and cached[2] < len(resizes):
            if resizes[cached[2]][0] - dropped < cached[1]:
                cached = None  # a resize recorded behind the checkpoint: feed again
        most_rows = max([rows] + [r for _at, _c, r in resizes])
        if cached is not None:
            screen, offset, applied = cached
            if offset == size and applied == len(resizes):
                return screen, dropped + offset
            found = None
            if size - offset > _SCREEN_SKIP_MIN:
                found = _screen_restart(fd, size, most_rows, pty, offset, screen.alt_screen)
            if found is not None and found[0] > offset:
                # What the checkpoint held is cleared away later: start there.
                title = _screen_last_title(fd, offset, found[0])
                title = screen.title if title is None else title
                screen, applied = _fresh_screen(cols, rows, pty, resizes, dropped, *found)
                screen.title = title
                offset = found[0]
        else:
            offset, alternate = _screen_restart(fd, size, most_rows, pty)
            screen, applied = _fresh_screen(cols, rows, pty, resizes, dropped, offset, alternate)
            if offset:
                screen.title = _screen_last_title(fd, 0, offset)
        start = offset
        while True:
            if applied < len(resizes) and resizes[applied][0] - dropped <= offset:
                screen.resize(resizes[applied][1], resizes[applied][2])
                applied += 1
                continue
            if offset >= size:
                break
            stop = min(size, offset + _SCREEN_BLOCK)
            if applied < len(resizes):
                stop = min(stop, max(offset + 1, resizes[applied][0] - dropped))
            data = os.pread(fd, stop - offset, offset)
            if not data:
                break
            screen.feed(data)
            offset += len(data)
        if use_cache and (offset != start or cached is None):
            _save_screen_cache(job, fd, st, dropped, size_key, screen, offset, applied)
        return screen, dropped + offset
    finally:
        os.close(fd)


# ==== Views for people =======================================================
#
# --format table (-H) on list, status and tail: what a person looking over an
# agent's shoulder wants to read.  JSON stays the default and the only format
# a program needs; colour only on a terminal, and never with NO_COLOR set.

_STATE_COLOURS = {"running": "36", "exited": "32", "killed": "33", "failed": "31", "unknown": "2"}


def _color_wanted() -> bool:
    if "NO_COLOR" in os.environ:  # set, even empty: no colour
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _paint(text: str, code: str, color: bool) -> str:
    return "\033[%sm%s\033[0m" % (code, text) if color and code else text


def _state_colour(entry: dict) -> str:
    if entry.get("state") == "exited" and entry.get("success") is False:
        return "31"  # exited, but not with 0: a failure to a person
    return _STATE_COLOURS.get(entry.get("state"), "")


def _ago(stamp: "str | None", now: float) -> str:
    """'3m ago' for an RFC 3339 time ('-' for none: a created job has not started)."""
    if not stamp:
        return "-"
    try:
        ms = (now - _parse_rfc3339(stamp)) * 1000
        return (_human_span(ms) if ms >= 60000 else "%ds" % (ms // 1000)) + " ago"
    except (TypeError, ValueError):
        return "-"


def _human_span(ms: float) -> str:
    """850ms, 12.3s, 3m04s, 2h05m, 3d04h."""
    ms = max(0, int(ms))
    if ms < 1000:
        return "%dms" % ms
    secs = ms // 1000
    if secs < 60:
        return "%.1fs" % (ms / 1000.0)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if secs >= size:
            return "%d%s%02d%s" % (secs // size, unit, secs % size // sub_size, sub)
    return "%dm%02ds" % (secs // 60, secs % 60)


def _duration(entry: dict, now: float) -> str:
    start = entry.get("started_at")
    end = entry.get("finished_at")
    if not start:
        return "-"  # created, not started
    try:
        until = _parse_rfc3339(end) if end else now
        return _human_span((until - _parse_rfc3339(start)) * 1000)
    except (TypeError, ValueError):
        return "-"


def _outcome(entry: dict) -> str:
    """EXIT: the exit code, else the signal, else the failure's code."""
    if entry.get("exit_code") is not None:
        return str(entry["exit_code"])
    if entry.get("signal"):
        return entry["signal"]
    return (entry.get("failure") or {}).get("code") or "-"


def _command_line(argv) -> str:
    import shlex

    if not isinstance(argv, list):
        return "-"
    return _printable(" ".join(shlex.quote(str(word)) for word in argv))


def _printable(text: str) -> str:
    """A table cell without control characters: a job's command must not be
    able to move the cursor or recolour a person's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short_ids(ids: list) -> list:
    """The shortest prefixes (12 characters at least) that tell these ids apart."""
    n = 12
    while n < 26 and len({i[:n] for i in ids}) < len(set(ids)):
        n += 1
    return [i[:n] for i in ids]


def _columns(rows: list, colours: list, color: bool, width: int) -> str:
    """Rows of cells as aligned columns; the last column is cut to the width."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row, colour in zip(rows, colours):
        cells = [cell.ljust(w) for cell, w in zip(row, widths)]
        if colour:
            cells[2] = _paint(cells[2], colour, color)  # the STATE column
        line = "  ".join(cells) + "  "
        room = max(10, width - sum(widths) - 2 * len(widths))
        last = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "\u2026"
        out.append((line + last).rstrip())
    return "\n".join(out) + "\n"


def _list_table(answer: dict, color: bool) -> str:
    import shutil

    jobs = answer["jobs"]
    if not jobs:
        return "no jobs here (list --all shows those of every directory)\n"
    now = time.time()
    rows = [["ID", "NAME", "STATE", "EXIT", "AGE", "DURATION", "COMMAND"]]
    colours = [""]
    for short, job in zip(_short_ids([j["job_id"] for j in jobs]), jobs):
        state = job["state"] + ("*" if job.get("lingering") else "")
        rows.append(
            [
                short,
                _printable(str(job.get("name") or "-")),
                state,
                _outcome(job) if job["state"] != "running" else "-",
                _ago(job.get("started_at"), now),
                _duration(job, now),
                _command_line(job.get("command")),
            ]
        )
        colours.append(_state_colour(job))
    text = _columns(rows, colours, color, shutil.get_terminal_size((100, 24)).columns)
    header, _, body = text.partition("\n")
    text = _paint(header, "1", color) + "\n" + body  # the header in bold
    notes = []
    if any(j.get("lingering") for j in jobs):
        notes.append("* finished, but processes it started still run")
    if answer.get("truncated"):
        notes.append("more jobs than --limit: --limit 0 shows them all")
    return text + "".join("(%s)\n" % n for n in notes)


def _status_table(answer: dict, color: bool) -> str:
    """One aligned "key  value" line per field of the answer."""
    now = time.time()
    lines = []
    for key, value in answer.items():
        if key in ("schema_version", "ok", "type"):
            continue
        if key == "state":
            value = _paint(value, _state_colour(answer), color)
        elif key in ("started_at", "finished_at", "last_output_at", "ready_at", "updated_at"):
            value = "%s (%s)" % (value, _ago(value, now)) if value else "-"
        elif key in ("duration_ms", "idle_ms"):
            value = _human_span(value)
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, dict):
            value = ", ".join("%s=%s" % kv for kv in value.items())
        elif value is None:
            value = "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append((key.replace("_", " "), str(value)))
    width = max(len(k) for k, _ in lines)
    return "".join("%s  %s\n" % (k.ljust(width), v) for k, v in lines)


def _tail_table(answer: dict, color: bool) -> str:
    """The two tails as text, each under a rule that names its stream."""
    state = _paint(answer.get("state") or "?", _state_colour(answer), color)
    out = ["%s  %s\n" % (answer["job_id"], state)]
    for stream in _STREAMS:
        text = answer[stream + "_tail"]
        if stream == "stderr" and not text:
            continue
        out.append(_paint("--- %s ---" % stream, "2", color) + "\n")
        out.append(text if not text or text.endswith("\n") else text + "\n")
    if answer.get("truncated"):
        out.append(_paint("(the start is cut: --tail-lines, --max-bytes)", "2", color) + "\n")
    return "".join(out)


# ==== Front end: CLI =========================================================
#
# The parser is derived from the declarations, and built for the invoked
# command only (the others are listed, so --help still shows every command):
# building every command's options costs more than the work of a read-only
# command.  main() is parse, dispatch, print.


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


def _add_option(parser, opt: Opt, **override) -> None:
    """One add_argument call for one declared Opt."""
    kind = _KINDS[opt.kind]
    kw = {}
    if kind.action:
        kw["action"] = kind.action
    if kind.nargs:
        import argparse

        kw["nargs"] = argparse.REMAINDER if kind.nargs == "..." else kind.nargs
    if kind.parse is not None:
        kw["type"] = _arg_type(kind.parse, kind.what)
    if opt.default is not None:
        kw["default"] = opt.default
    metavar = opt.metavar or kind.metavar
    if metavar and not opt.choices:
        kw["metavar"] = metavar
    if opt.choices:
        kw["choices"] = opt.choices
    if opt.help:
        kw["help"] = opt.help
        if kind.units:
            kw["help"] = "%s [%s]" % (opt.help, kind.units)
    kw.update(override)
    if kind.positional:
        parser.add_argument(opt.name, **kw)
    else:
        kw.setdefault("dest", opt.name)  # -H is o.human, not o.H
        parser.add_argument(*_flags(opt), **kw)


def build_parser(command: "str | None" = None):
    """The CLI, from COMMANDS: every command listed, ``command``'s options built.

    The parser's ``commands`` attribute maps each name to its subparser.
    """
    import argparse

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kw):
            # No abbreviations: a script that says --snap would break the day
            # an option --snapshot-x arrives.
            kw.setdefault("allow_abbrev", False)
            kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
            super().__init__(*args, **kw)

        def error(self, message):  # argparse's usage errors take the JSON path
            raise UsageError(_did_you_mean(self, message), self.format_usage(), self.prog)

    parser = Parser(
        prog=PROG,
        description="Run commands as detached background jobs and answer in JSON.",
        epilog=_EPILOG
        + "\n`agent-exec help COMMAND` (or COMMAND --help) shows a command's options.",
    )
    parser.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    for opt in reversed(GLOBAL_OPTS):
        _add_option(parser, opt)
    common = Parser(add_help=False)
    for opt in GLOBAL_OPTS:
        help_text = _GLOBAL_HELP_IN_COMMAND.get(opt.name, opt.help)
        _add_option(common, opt, default=argparse.SUPPRESS, help=help_text)
    sub = parser.add_subparsers(
        dest="command_name",
        metavar="<command>",
        parser_class=Parser,
        help="one of these; `agent-exec help <command>` shows its options",
    )
    sub.required = True
    parser.commands = {}
    for name, cmd in COMMANDS.items():
        wanted = command is None or command == name
        p = sub.add_parser(
            name,
            parents=[common] if wanted else [],
            description=cmd.help,
            help=cmd.help,
            epilog=_command_epilog(cmd) if wanted else None,
        )
        if wanted:
            for opt in cmd.opts:
                if "cli" in opt.fronts:
                    _add_option(p, opt)
        parser.commands[name] = p
    # `help` is listed so that --help shows it; main() runs it (_help_argv).
    parser.commands["help"] = sub.add_parser("help", help=_HELP_HELP, description=_HELP_HELP)
    parser.commands["help"].add_argument("topic", nargs="?", metavar="command")
    # `_supervise` is not here: main() recognises it before argparse runs,
    # so it stays out of --help and out of the choices that errors list.
    return parser


_EPILOG = (
    "Every command prints exactly one JSON object on stdout (follow, completion\n"
    "and --format table print text, for people); `agent-exec schema` prints the\n"
    "JSON Schema of every answer."
)
_HELP_HELP = "show the help of agent-exec, or of one command"


def _command_epilog(cmd: _Command) -> str:
    text = _EPILOG
    if cmd.examples:
        rows = ["  # %s\n  %s" % (what, line) for line, what in cmd.examples]
        text += "\n\nexamples:\n" + "\n".join(rows)
    return text


def _did_you_mean(parser, message: str) -> str:
    """argparse's message, plus a suggestion for an unknown option that is close to one."""
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return message
    import difflib

    known = set(parser._option_string_actions)
    for sub in getattr(parser, "commands", {}).values():
        known.update(sub._option_string_actions)
    for arg in message[len(prefix) :].split():
        if arg.startswith("--"):
            word = arg.partition("=")[0]
            # An abbreviation first (--snap), then a typo (--tiemout).
            close = sorted(k for k in known if k.startswith(word))
            close = close or difflib.get_close_matches(word, sorted(known), 1, 0.6)
            if close:
                return "%s (did you mean %s?)" % (message, " or ".join(close[:3]))
    return message


def _command_in(argv: list) -> "str | None":
    """The command named in argv (None if there is none), before argparse runs."""
    at = _command_index(argv)
    return None if at is None else argv[at]


def _command_index(argv: list, start: int = 0) -> "int | None":
    """Where the first word that is not an option (or a global option's value) is."""
    takes_value = {
        flag for opt in GLOBAL_OPTS if _KINDS[opt.kind].action is None for flag in _flags(opt)
    }
    skip = False
    for i in range(start, len(argv)):
        arg = argv[i]
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif arg == "--":
            return None
        elif not arg.startswith("-"):
            return i
    return None


def _help_argv(argv: list) -> list:
    """`help [command]` is `[command] --help`: the same text, one way to make it."""
    at = _command_index(argv)
    if at is None or argv[at] != "help":
        return argv
    topic = _command_index(argv, at + 1)
    return argv[:at] + ([argv[topic]] if topic is not None else []) + ["--help"]


def _refuse_nul(cmd: _Command, o) -> None:
    """No path, command word or value may hold a NUL byte: the OS cannot take it.

    Job ids are left alone: an id with a NUL simply names no job.
    """
    for opt in GLOBAL_OPTS + cmd.opts:
        if opt.kind in ("job_id", "job_ids", "job_id_or_key", "job_ids_or_key"):
            continue
        value = getattr(o, opt.name, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and "\x00" in v for v in values):
            where = "the command" if opt.kind == "argv" else _flags(opt)[-1]
            raise AgentExecError("invalid_argument", "%s contains a NUL byte" % where)


def _envelope_error(code: str, message: str, retryable: bool = False) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "ok": False,
        "type": "error",
        "error": {"code": code, "message": message, "retryable": retryable},
    }


def _internal_error(e: BaseException) -> dict:
    """Log an unexpected exception (the traceback at -vv) and make its envelope."""
    if _log_level >= 3:
        import traceback

        traceback.print_exc(file=sys.stderr)
    else:
        _log(0, "internal error: %r (run with -vv for the traceback)" % (e,))
    return _envelope_error("internal_error", "%s: %s" % (type(e).__name__, e))


def dispatch(name: str, o) -> "tuple":
    """Run one declared command on options ``o``: (exit code, envelope).

    The one place where an outcome becomes the JSON envelope, for every
    front end: the NUL check, the declared checks (the same words whichever
    front end asked), the handler, and every error.  It never prints.
    """
    cmd = COMMANDS[name]
    if getattr(o, "started", None) is None:
        o.started = time.monotonic()
    try:
        _refuse_nul(cmd, o)
        for check in cmd.checks:
            message = check(o)
            if message:
                raise UsageError(message)
        body = cmd.handler(o)
    except AgentExecError as e:
        if e.code != "usage_error":
            _log(2, "%s: %s" % (e.code, e.message))
        envelope = _envelope_error(e.code, e.message, e.retryable)
        if getattr(e, "details", None):
            envelope["error"].update(e.details)
        return e.exit_code, envelope
    except KeyboardInterrupt:
        return 1, _envelope_error("interrupted", "interrupted by the user", retryable=True)
    except Exception as e:
        return 1, _internal_error(e)
    envelope = {"schema_version": SCHEMA_VERSION, "ok": True, "type": name}
    envelope.update(body)
    return (cmd.exit_status(o, body) if cmd.exit_status else 0), envelope


def _emit(envelope: dict) -> None:
    """Print one answer: the only write to stdout."""
    data = _to_json(envelope) + "\n"
    try:
        sys.stdout.write(data)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _binary_stdout():
    return getattr(sys.stdout, "buffer", sys.stdout)


def _emit_text(text: str) -> None:
    """Print a view for people (the table of --format table)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def _print_job_ids(argv: list) -> int:
    root = None
    for i, arg in enumerate(argv):
        if arg == "--root" and i + 1 < len(argv):
            root = argv[i + 1]
        elif arg.startswith("--root="):
            root = arg[len("--root=") :]
    try:
        o = options_from_arguments("list", {"limit": 200}, root)
        ids = [job["job_id"] for job in cmd_list(o)["jobs"]]
    except Exception:
        return 1
    _emit_text("".join(i + "\n" for i in ids))
    return 0


def _print_usage_error(usage: str, prog: str, message: str) -> None:
    try:
        sys.stderr.write("%s%s: error: %s\n" % (usage, prog, message))
    except (OSError, ValueError):
        pass


def main(argv: "list | None" = None) -> int:
    """Run one command: parse, dispatch, print one JSON object; return the exit code."""
    global _log_level
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    _log_level = _level_from_env()
    if not _IS_POSIX:
        _emit(_envelope_error("unsupported_platform", "agent-exec runs on Linux and macOS only"))
        return 1
    if _command_in(argv) == "_complete_ids":
        # Hidden, for the completion scripts: the ids of this directory's
        # jobs, newest first, one per line (nothing at all on any error).
        return _print_job_ids(argv)
    if argv[:1] == ["_supervise"]:
        # The hidden subcommand that runs the detached supervisor.  `run`
        # starts it with exactly these arguments; it prints nothing, and it
        # skips argparse, which it would only pay for at start-up.
        if len(argv) != 4 or argv[2] != "--fds":
            _emit(_envelope_error("usage_error", "_supervise is internal to agent-exec"))
            return 2
        return cmd_supervise(argv[1], argv[3])
    try:
        argv = _help_argv(argv)
        parser = build_parser(_command_in(argv))
        o = parser.parse_args(argv)
    except UsageError as e:
        _print_usage_error(e.usage, e.prog, e.bare)
        _emit(_envelope_error(e.code, e.message))
        return e.exit_code
    except SystemExit as e:  # --help and --version
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        _emit(_envelope_error("interrupted", "interrupted by the user", retryable=True))
        return 1
    except Exception as e:
        _emit(_internal_error(e))
        return 1
    if o.verbose:
        _log_level = max(_log_level, 1 + min(o.verbose, 2))
    o.started = started
    cmd = COMMANDS[o.command_name]
    if cmd.streams:
        o.out = _binary_stdout()
    code, envelope = dispatch(o.command_name, o)
    if envelope["ok"]:
        if cmd.streams:  # its output was the answer
            return code
        if cmd.table is not None and _wants_table(o):
            _emit_text(cmd.table(envelope, _color_wanted()))
            return code
    elif envelope["error"]["code"] == "usage_error":
        # A conflict found after parsing: the command's usage, as argparse gives.
        sub = parser.commands[o.command_name]
        _print_usage_error(sub.format_usage(), sub.prog, envelope["error"]["message"])
    elif cmd.streams and envelope["error"]["code"] == "interrupted":
        return 130  # Ctrl-C stops following (never the job): the usual 128 + SIGINT
    _emit(envelope)
    return code


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


# ==== Front end: MCP =========================================================
#
# `agent-exec mcp` serves the declared commands as MCP tools over stdio:
# newline-delimited JSON-RPC 2.0 on stdin and stdout, logs on stderr.  The
# tool list, the input schemas and the argument checks come from the same
# declarations as the CLI (tool_list(), options_from_arguments()), and every
# call goes through dispatch(), so a command declared later is a tool too.
#
# Both generations of the protocol are spoken on one connection, request by
# request: the handshake one (initialize, then requests; 2024-11-05 to
# 2025-11-25) and the stateless revision 2026-07-28, whose requests carry
# their protocol version and client capabilities in params._meta and whose
# results all carry resultType.  server/discover is answered at any time.
#
# Design: threads, not a poll loop.  The main thread reads stdin and answers
# the cheap methods itself; each tools/call runs on a thread of its own, so a
# second request is answered while a wait blocks.  The handlers block (in
# flock watchers, sleeps, reads) and already take a cancel flag (o.cancel,
# see _cancelled); a poll loop would need every one rewritten as a state
# machine.  One lock serialises the writes to stdout.  The job store needs
# no lock: every command is already safe against other processes.
#
# Long-lived: `run` launches each supervisor with a double fork and reaps the
# intermediate child at once (see _launch_supervisor), so no zombie is left;
# the waits share one _LockWatch thread per job; a finished call leaves
# nothing behind but the session's read position of its job.

MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
MCP_STATELESS_VERSIONS = ("2026-07-28",)
# structuredContent's outputSchema arrived with 2025-06-18.
_MCP_OUTPUT_SCHEMA_VERSIONS = ("2025-06-18", "2025-11-25") + MCP_STATELESS_VERSIONS
_MCP_META_VERSION = "io.modelcontextprotocol/protocolVersion"
_MCP_META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
_MCP_META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
# JSON-RPC 2.0 error codes, and MCP's for a protocol version it does not speak.
_RPC_PARSE_ERROR = -32700
_RPC_INVALID_REQUEST = -32600
_RPC_METHOD_NOT_FOUND = -32601
_RPC_INVALID_PARAMS = -32602
_RPC_INTERNAL_ERROR = -32603
_RPC_UNSUPPORTED_VERSION = -32022
# Clients cut a tool call after 60 s (some desktop clients) to 300 s (Codex):
# a blocking call is bounded well inside that.
MCP_DEFAULT_WAIT_MS = 20000
MCP_MAX_WAIT_MS = 55000
# How long a client may keep the tool list (it changes only with a new server).
_MCP_LIST_TTL_MS = 3600000
_MCP_PROGRESS_EVERY_S = 1.0
_MCP_INSTRUCTIONS = (
    "agent-exec runs commands as background jobs that outlive the call. Start one with run "
    "(command: an argv list, or shell: one string), then read its output with read (each answer "
    "has a cursor; without one, read continues where the last read of that job ended), wait for "
    "its end with wait (bounded per call: when timed_out is true it still runs, call wait again), "
    "check it with status, stop it with kill. Cancelling a call never stops a job."
)


def _mcp_max_wait_ms() -> int:
    """AGENT_EXEC_MCP_MAX_WAIT_MS, the cap on one blocking call (default 55 s)."""
    raw = os.environ.get("AGENT_EXEC_MCP_MAX_WAIT_MS", "")
    try:
        value = parse_duration_ms(raw) if raw.strip() else MCP_MAX_WAIT_MS
    except ValueError:
        _log(
            1, "AGENT_EXEC_MCP_MAX_WAIT_MS=%r is not a duration: using %d" % (raw, MCP_MAX_WAIT_MS)
        )
        return MCP_MAX_WAIT_MS
    return max(1, value)


class _RpcError(Exception):
    """A JSON-RPC error answer: code, message and optional data."""

    def __init__(self, code: int, message: str, data=None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def _mcp_output_schema(cmd: _Command) -> dict:
    """The command's answer or the error envelope: every answer conforms."""
    defs = {"snapshot": obj(SNAPSHOT_FIELDS), "error": response_schema()["definitions"]["error"]}
    answer = _answer_schema(cmd)
    if cmd.name in ("wait", "read") or _mcp_observes(cmd.name):  # see after_call
        answer["properties"].update(_MCP_BOUND_FIELDS)
    schema = {"type": "object", "$defs": defs, "anyOf": [answer, ref("error")]}
    # $defs, not draft-07's definitions: 2025-11-25 reads a schema without
    # $schema as JSON Schema 2020-12, which knows only $defs.  A $ref is a
    # JSON pointer into the document, so a draft-07 reader (older revisions)
    # resolves "#/$defs/..." just as well.
    return json.loads(json.dumps(schema).replace('"#/definitions/', '"#/$defs/'))


# The fields that the MCP front end adds to the answer of a bounded call that
# ended with the job still running.
_MCP_BOUND_FIELDS = {"hint": STR, "wait_bound_ms": COUNT}


def _mcp_observes(name: str) -> bool:
    """True for a command that starts a job and watches it as `run` does
    (run, start, restart: they take --snapshot-after and --wait)."""
    cmd = COMMANDS.get(name)
    return cmd is not None and any(opt.name == "snapshot_after" for opt in cmd.opts)


# What an argument does over MCP where its CLI help is not true here (the
# bounds of a call, the session's read position, no stdin of our own): by
# (tool, argument), or (None, argument) for every tool that has it.  Formatted
# with the bounds: default (ms) and cap (ms).
_MCP_ARGUMENT_HELP = {
    ("wait", "cursor"): "with match: search from this cursor (default: the start)",
    ("wait", "timeout_ms"): "wait at most this long in this call (DURATION: a number is ms, or "
    "250ms, 5s, 2m); 0 or absent: {default} ms; at most {cap} ms (AGENT_EXEC_MCP_MAX_WAIT_MS): "
    "a longer wait is cut to that, never refused. When timed_out is true the job still runs: "
    "call wait again",
    ("read", "cursor"): "where to read from: the cursor of an earlier answer (c1.0.0: the start); "
    "default: where this session's last read of this job ended (the start, the first time)",
    ("read", "wait_ms"): "block until there is new output, the job ends, or this long passes "
    "(DURATION); at most {cap} ms in this call",
    (None, "snapshot_after"): "observe the job this long before answering (DURATION; at most "
    "10000, and at most {cap} ms in this call; 0 = at once)",
    (None, "wait"): "block until the job is terminal, at most {default} ms in this call: if it "
    "still runs then, the answer's hint says to call wait",
    (None, "shell"): "run /bin/sh -c STRING (pipes, redirections, &&) instead of command",
    (None, "stdin"): "the job reads this text on its stdin, then EOF (default: /dev/null)",
    ("send", "stdin"): "not over MCP ('-' is this server's stdin, the transport): use text",
}
# Defaults that differ over MCP (formatted as above).
_MCP_ARGUMENT_DEFAULT = {("wait", "timeout_ms"): "{default}"}


def _mcp_tools(version: "str | None", max_wait_ms: int = MCP_MAX_WAIT_MS) -> list:
    """tools/list: the declared tools, with a model-facing description, full
    annotations, and (where the revision has it) an outputSchema."""
    bounds = {"default": min(MCP_DEFAULT_WAIT_MS, max_wait_ms), "cap": max_wait_ms}
    out = []
    for tool in tool_list():
        cmd = COMMANDS[tool["name"]]
        tool["description"] = cmd.tool_help or cmd.help
        schema = tool["inputSchema"]
        for arg, prop in schema["properties"].items():
            text = _MCP_ARGUMENT_HELP.get((cmd.name, arg), _MCP_ARGUMENT_HELP.get((None, arg)))
            if text is not None:
                prop["description"] = text.format(**bounds)
            if prop.get("description", "").endswith("; or give --key"):  # a tool has no flags
                prop["description"] = prop["description"][: -len("--key")] + "key"
            if (cmd.name, arg) in _MCP_ARGUMENT_DEFAULT:
                prop["default"] = int(_MCP_ARGUMENT_DEFAULT[cmd.name, arg].format(**bounds))
        # `command` of run is not required: `shell` stands in for it.
        argv = {x.name for x in cmd.opts if x.kind == "argv"}
        schema["required"] = [n for n in schema["required"] if n not in argv]
        hints = dict(tool.get("annotations") or {})
        hints.setdefault("readOnlyHint", False)
        hints.setdefault("destructiveHint", not hints["readOnlyHint"])
        hints.setdefault("idempotentHint", hints["readOnlyHint"])
        hints.setdefault("openWorldHint", False)
        tool["annotations"] = hints
        if version in _MCP_OUTPUT_SCHEMA_VERSIONS:
            tool["outputSchema"] = _mcp_output_schema(cmd)
        out.append(tool)
    return out


def _mcp_lenient(name: str, arguments: dict) -> dict:
    """One job id where a list of them is wanted (``"job_ids": "01J..."``) is
    taken as that list: a model's slip, with only one reading."""
    out = dict(arguments)
    for x in COMMANDS[name].opts:
        if x.kind in ("job_ids", "job_ids_or_key") and isinstance(out.get(x.name), str):
            out[x.name] = [out[x.name]]
    return out


class _McpCall:
    """One tools/call in progress: its cancel flag (is_set(), as the handlers
    expect of o.cancel), its deadline, and whether the client cancelled it."""

    def __init__(self, request_id, deadline: "float | None") -> None:
        import threading

        self.id = request_id
        self.deadline = deadline
        self.flag = threading.Event()
        self.client_cancelled = False
        self.stopping = False  # the server is ending (EOF, SIGTERM): not the bound
        self.done = False
        self.lock = threading.Lock()  # progress notifications and the answer

    def is_set(self) -> bool:
        if self.flag.is_set():
            return True
        return self.deadline is not None and time.monotonic() >= self.deadline

    def cancel(self, by_client: bool) -> None:
        self.client_cancelled = self.client_cancelled or by_client
        self.stopping = self.stopping or not by_client
        self.flag.set()


class _McpServer:
    """One stdio session: the protocol state, the calls in flight, the read positions."""

    def __init__(self, out, root: "str | None", max_wait_ms: int) -> None:
        import threading

        self.out = out  # the protocol's stream (binary); nothing else writes to it
        self.root = root
        self.max_wait_ms = max_wait_ms
        self.write_lock = threading.Lock()
        self.calls = {}  # type: dict  # request id (as JSON text) -> _McpCall
        self.calls_lock = threading.Lock()
        self.threads = set()  # type: set
        self.version = None  # type: str | None  # negotiated by initialize
        self.read_positions = {}  # type: dict  # job id -> (stdout, stderr) offsets
        self.positions_lock = threading.Lock()
        self.broken = False  # stdout is gone
        self._tools = {}  # type: dict  # version -> tool list, built once

    # -- the wire ---------------------------------------------------------------

    def send(self, message: dict) -> None:
        data = (_to_json(message, separators=(",", ":")) + "\n").encode("utf-8")
        with self.write_lock:
            if self.broken:
                return
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                self.broken = True

    def answer(self, request_id, result: dict) -> None:
        self.send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def fail(self, request_id, e: _RpcError) -> None:
        error = {"code": e.code, "message": e.message}
        if e.data is not None:
            error["data"] = e.data
        self.send({"jsonrpc": "2.0", "id": request_id, "error": error})

    def serve(self, infile) -> int:
        """Read requests until EOF (or SIGTERM); then end the calls in flight and return."""
        try:
            while not self.broken:
                line = infile.readline()
                if not line:
                    break
                if line.strip():
                    self.handle_line(line)
        except (_McpStop, KeyboardInterrupt):
            _log(2, "mcp: stopping on a signal")
        finally:
            self.close()
        return 0

    def close(self) -> None:
        """End every observation in flight at once (never a job) and let the
        calls answer with what they saw."""
        with self.calls_lock:
            calls = list(self.calls.values())
            threads = list(self.threads)
        for call in calls:
            call.cancel(by_client=False)
        deadline = time.monotonic() + 2.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- messages ---------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            self.fail(None, _RpcError(_RPC_PARSE_ERROR, "Parse error: %s" % e))
            return
        if isinstance(msg, list):
            self.fail(
                None, _RpcError(_RPC_INVALID_REQUEST, "Invalid Request: batches are not supported")
            )
            return
        if not isinstance(msg, dict):
            self.fail(None, _RpcError(_RPC_INVALID_REQUEST, "Invalid Request: not an object"))
            return
        request_id = msg.get("id")
        has_id = "id" in msg
        if has_id and (isinstance(request_id, bool) or not isinstance(request_id, (str, int))):
            self.fail(
                None,
                _RpcError(
                    _RPC_INVALID_REQUEST, "Invalid Request: id must be a string or an integer"
                ),
            )
            return
        if "method" not in msg and ("result" in msg or "error" in msg):
            return  # a response: this server sends no requests, so none is awaited
        method = msg.get("method")
        if msg.get("jsonrpc") != "2.0" or not isinstance(method, str):
            message = 'Invalid Request: needs "jsonrpc": "2.0" and a method'
            self.fail(request_id if has_id else None, _RpcError(_RPC_INVALID_REQUEST, message))
            return
        params = msg.get("params")
        if not has_id:
            self.notification(method, params)
            return
        try:
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise _RpcError(_RPC_INVALID_PARAMS, "Invalid params: params must be an object")
            stateless = self.envelope_version(params)
            if method == "server/discover":  # a 2026-07-28 method, however it is asked
                stateless = stateless or MCP_STATELESS_VERSIONS[0]
            result = self.request(request_id, method, params, stateless)
        except _RpcError as e:
            self.fail(request_id, e)
            return
        except Exception as e:  # a bug: say so, keep serving
            _log(0, "mcp: %s: internal error: %r" % (method, e))
            self.fail(request_id, _RpcError(_RPC_INTERNAL_ERROR, "Internal error: %s" % e))
            return
        if result is not None:  # None: a call thread answers later
            self.answer(request_id, self.stamp(result, stateless))

    def envelope_version(self, params: dict) -> "str | None":
        """The 2026-07-28 envelope of a request: its version, checked (None: no envelope)."""
        meta = params.get("_meta")
        if not isinstance(meta, dict) or _MCP_META_VERSION not in meta:
            return None
        missing = [k for k in (_MCP_META_VERSION, _MCP_META_CAPABILITIES) if k not in meta]
        if missing:
            raise _RpcError(
                _RPC_INVALID_PARAMS, "Invalid params: params._meta lacks %s" % ", ".join(missing)
            )
        version = meta[_MCP_META_VERSION]
        if not isinstance(version, str):
            raise _RpcError(
                _RPC_INVALID_PARAMS, "Invalid params: %s must be a string" % _MCP_META_VERSION
            )
        if not isinstance(meta[_MCP_META_CAPABILITIES], dict):
            raise _RpcError(
                _RPC_INVALID_PARAMS, "Invalid params: %s must be an object" % _MCP_META_CAPABILITIES
            )
        if version not in MCP_STATELESS_VERSIONS:
            raise _RpcError(
                _RPC_UNSUPPORTED_VERSION,
                "Unsupported protocol version",
                {"supported": list(MCP_STATELESS_VERSIONS), "requested": version},
            )
        return version

    def stamp(self, result: dict, stateless: "str | None") -> dict:
        """A 2026-07-28 result carries resultType, and the server's identity in _meta."""
        if stateless is not None:
            result.setdefault("resultType", "complete")
            meta = dict(result.get("_meta") or {})
            meta.setdefault(_MCP_META_SERVER_INFO, self.server_info())
            result["_meta"] = meta
        return result

    @staticmethod
    def server_info() -> dict:
        return {"name": PROG, "version": __version__}

    def notification(self, method: str, params) -> None:
        if method == "notifications/cancelled":
            if isinstance(params, dict) and "requestId" in params:
                key = json.dumps(params["requestId"])
                with self.calls_lock:
                    call = self.calls.get(key)
                if call is not None:
                    call.cancel(by_client=True)
            return
        # notifications/initialized and any other: nothing to do.

    def request(self, request_id, method: str, params: dict, stateless: "str | None"):
        if method == "initialize":
            return self.initialize(params)
        if method == "ping" and stateless is None:  # revision 2026-07-28 has no ping
            return {}
        if method == "server/discover":
            return {
                "supportedVersions": list(MCP_STATELESS_VERSIONS),
                "capabilities": {"tools": {"listChanged": False}},
                # No serverInfo here: DiscoverResult has none; stamp() puts it
                # in _meta, where 2026-07-28 carries it on every result.
                "instructions": _MCP_INSTRUCTIONS,
                "ttlMs": _MCP_LIST_TTL_MS,
                "cacheScope": "public",
            }
        if method not in ("tools/list", "tools/call"):
            raise _RpcError(_RPC_METHOD_NOT_FOUND, "Method not found: %s" % method)
        if stateless is None and self.version is None:
            # As the MCP Python SDK answers a request before the handshake.
            raise _RpcError(
                _RPC_INVALID_PARAMS,
                "Invalid request parameters: the session is not initialized (send initialize "
                "first, or give params._meta the 2026-07-28 protocol version)",
            )
        version = stateless or self.version
        if method == "tools/list":
            if version not in self._tools:
                self._tools[version] = _mcp_tools(version, self.max_wait_ms)
            result = {"tools": self._tools[version]}
            if stateless is not None:
                result["ttlMs"] = _MCP_LIST_TTL_MS
                result["cacheScope"] = "public"
            return result
        return self.start_call(request_id, params, stateless)

    def initialize(self, params: dict) -> dict:
        wanted = params.get("protocolVersion")
        if not isinstance(wanted, str):
            raise _RpcError(
                _RPC_INVALID_PARAMS, "Invalid params: initialize needs a protocolVersion string"
            )
        self.version = wanted if wanted in MCP_HANDSHAKE_VERSIONS else MCP_HANDSHAKE_VERSIONS[0]
        return {
            "protocolVersion": self.version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": self.server_info(),
            "instructions": _MCP_INSTRUCTIONS,
        }

    # -- tools/call ---------------------------------------------------------------

    def start_call(self, request_id, params: dict, stateless: "str | None") -> None:
        import threading

        name = params.get("name")
        if not isinstance(name, str):
            raise _RpcError(
                _RPC_INVALID_PARAMS,
                "Invalid params: tools/call needs the tool's name as a string in params.name",
            )
        cmd = COMMANDS.get(name)
        if cmd is None or "mcp" not in cmd.fronts:
            raise _RpcError(_RPC_INVALID_PARAMS, "Unknown tool: %s" % _short(str(name)))
        arguments = params.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise _RpcError(_RPC_INVALID_PARAMS, "Invalid params: arguments must be an object")
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        call = _McpCall(request_id, None)
        key = json.dumps(request_id)
        thread = threading.Thread(
            target=self.run_call,
            args=(call, key, cmd.name, arguments, token, stateless),
            name="agent-exec-mcp-call",
            daemon=True,
        )
        with self.calls_lock:
            if key in self.calls:
                raise _RpcError(
                    _RPC_INVALID_REQUEST, "Invalid Request: id %s is already in use" % key
                )
            self.calls[key] = call
            self.threads.add(thread)
        thread.start()
        return None

    def run_call(
        self, call: _McpCall, key: str, name: str, arguments: dict, token, stateless
    ) -> None:
        import threading

        ticker = None
        try:
            try:
                o = options_from_arguments(name, _mcp_lenient(name, arguments), self.root)
                if getattr(o, "stdin", None) == "-":  # this process's stdin is the transport
                    raise AgentExecError(
                        "invalid_argument",
                        "stdin '-' (this command's own stdin) is the MCP transport here: "
                        "give the text itself",
                    )
            except AgentExecError as e:  # in the CLI's words (see options_from_arguments)
                code, envelope = e.exit_code, _envelope_error(e.code, e.message, e.retryable)
            else:
                bound_ms = self.bound(name, o, arguments)
                if bound_ms is not None and _mcp_observes(name):
                    call.deadline = time.monotonic() + bound_ms / 1000.0
                else:  # any other call that blocks (a command added later) stops at the cap
                    call.deadline = time.monotonic() + self.max_wait_ms / 1000.0 + 1.0
                o.cancel = call
                self.before_call(name, o, arguments)
                if (
                    token is not None
                    and isinstance(token, (str, int))
                    and not isinstance(token, bool)
                ):
                    ticker = threading.Thread(
                        target=self.progress, args=(call, token, name, o, bound_ms), daemon=True
                    )
                    ticker.start()
                code, envelope = dispatch(name, o)
                call.flag.set()  # the progress ticker stops
                self.after_call(name, o, envelope, bound_ms, call)
            result = {
                "content": [{"type": "text", "text": _to_json(envelope)}],
                "structuredContent": envelope,
                "isError": not envelope["ok"],
            }
            with call.lock:
                call.done = True
                if not call.client_cancelled:  # a cancelled request gets no answer
                    self.answer(call.id, self.stamp(result, stateless))
        except Exception as e:  # a bug in this front end: answer, keep serving
            _log(0, "mcp: tools/call %s: internal error: %r" % (name, e))
            with call.lock:
                call.done = True
                if not call.client_cancelled:
                    self.fail(call.id, _RpcError(_RPC_INTERNAL_ERROR, "Internal error: %s" % e))
        finally:
            with self.calls_lock:
                self.calls.pop(key, None)
                self.threads.discard(threading.current_thread())

    def bound(self, name: str, o, arguments: dict) -> "int | None":
        """Cap the call's blocking part (ms): wait, read's wait_ms, run's wait.
        Longer requests are clamped, never refused; None: the call does not block.
        A bound that is not what was asked (a longer wait, or none: the CLI's
        0 = no limit) sets o.mcp_clamped_from, and the answer then says it
        (wait_bound_ms, see after_call)."""
        cap = self.max_wait_ms
        default = min(MCP_DEFAULT_WAIT_MS, cap)
        if name == "wait":
            asked = o.timeout_ms
            o.timeout_ms = default if asked <= 0 else min(asked, cap)
            if asked <= 0 or asked > cap:
                o.mcp_clamped_from = asked
            return o.timeout_ms
        if name == "read" and o.wait_ms > 0:
            if o.wait_ms > cap:
                o.mcp_clamped_from = o.wait_ms
                o.wait_ms = cap
            return o.wait_ms
        if _mcp_observes(name):  # run, start, restart
            bound = None
            if o.snapshot_after > cap:  # the snapshot wait is an observation too
                o.mcp_clamped_from = o.snapshot_after
                o.snapshot_after = bound = cap
            if o.wait:  # no limit on the CLI
                o.mcp_clamped_from = 0
                bound = default
            return bound
        return None

    def before_call(self, name: str, o, arguments: dict) -> None:
        """read without a cursor: from where this session's last read of the job ended."""
        if name != "read" or "cursor" in arguments:
            return
        try:
            root = _root(o)
            job_id = resolve_job(root, o.job_id)
        except AgentExecError:
            return  # the call itself says what is wrong
        with self.positions_lock:
            position = self.read_positions.get(job_id)
        if position is not None:
            o.cursor = position

    def after_call(
        self, name: str, o, envelope: dict, bound_ms: "int | None", call: "_McpCall | None" = None
    ) -> None:
        """The read position; and for a bounded call that ended with a job still
        running, a hint that says why it ended and how to go on, and
        wait_bound_ms when the bound is not what was asked."""
        if not envelope.get("ok"):
            return
        if name == "read":
            with self.positions_lock:
                self.read_positions[envelope["job_id"]] = parse_cursor(envelope["cursor"])
        if bound_ms is None:
            return
        stopping = call is not None and call.stopping
        if stopping:  # EOF or SIGTERM ended the call early: the bound did not elapse
            why = (
                "this call ended early because the MCP server is stopping (end of input or SIGTERM)"
            )
        else:
            why = "this call's %d ms bound elapsed" % bound_ms
        running = [j["job_id"] for j in envelope.get("jobs") or () if j["state"] == "running"]
        if running and (envelope.get("timed_out") or stopping):  # wait on several jobs
            envelope["hint"] = "%s still running: %s; call wait again to keep waiting" % (
                ", ".join(running),
                why,
            )
        elif envelope.get("state") != "running":
            return
        elif name == "read" and (envelope.get("stdout") or envelope.get("stderr")):
            return
        elif name == "wait" and not (envelope.get("timed_out") or stopping):
            return  # it ended on readiness, a match or input, inside the bound
        else:
            how = {
                "wait": "call wait again to keep waiting",
                "read": "call read again (cursor %s) for its output" % envelope.get("cursor"),
            }.get(
                name,
                "call wait to wait for its end, or read (cursor %s) for its output"
                % envelope.get("cursor"),
            )
            envelope["hint"] = "the job %s is still running: %s; %s" % (
                envelope.get("job_id"),
                why,
                how,
            )
        if getattr(o, "mcp_clamped_from", None) is not None:
            envelope["wait_bound_ms"] = bound_ms

    def progress(self, call: _McpCall, token, name: str, o, bound_ms: "int | None") -> None:
        """notifications/progress about once a second while the call blocks."""
        ticks = 0
        while not call.flag.wait(_MCP_PROGRESS_EVERY_S):
            ticks += 1
            message = self.progress_message(name, o, ticks)
            with call.lock:
                if call.done or call.client_cancelled:
                    return
                params = {"progressToken": token, "progress": ticks, "message": message}
                if bound_ms:
                    params["total"] = max(ticks, int(round(bound_ms / 1000.0)))
                self.send({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

    def progress_message(self, name: str, o, seconds: int) -> str:
        # run records the job it started on o (see _run_answer); start and
        # restart name theirs in job_id.
        ids = getattr(o, "job_ids", None) or [
            getattr(o, "job_id", None) or getattr(o, "observed_job_id", None)
        ]
        parts = []
        try:
            root = _root(o)
            for ident in [i for i in ids if i][:4]:
                job = load_job(root, resolve_job(root, ident))
                out, err = (0 if st is None else st.st_size for st in _log_stats(job))
                parts.append("%s %s, %d stdout + %d stderr bytes" % (job.id, job.state, out, err))
        except (AgentExecError, OSError, TypeError, ValueError):
            pass
        return "%s: %ds; %s" % (name, seconds, "; ".join(parts) or "waiting")


class _McpStop(BaseException):
    """Raised in the main thread by SIGTERM: leave the read loop (a BaseException,
    so that no ``except Exception`` on the way takes it for an error)."""


def _mcp_stdio() -> "tuple":
    """(input, output) for the protocol, on descriptors of their own: fd 1
    points at stderr from now on, so that nothing but the protocol can ever
    reach the client's stdout, and fd 0 at /dev/null, so that nothing can
    read the protocol's input by mistake."""
    infile = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return infile, out


@command(
    "mcp",
    "serve the commands as MCP tools over stdio (newline-delimited JSON-RPC)",
    fronts=("cli",),
    streams=True,
    examples=(
        ("claude mcp add agent-exec -- agent-exec mcp", "register it with Claude Code"),
        ("AGENT_EXEC_MCP_MAX_WAIT_MS=30000 agent-exec mcp", "cap a blocking call at 30 s"),
    ),
    annotations={"readOnlyHint": False, "destructiveHint": False, "idempotentHint": False},
)
def cmd_mcp(o) -> dict:
    import signal
    import warnings

    # `run` forks (then execs at once) from a process with threads: safe here,
    # and Python 3.12+ would warn about it on every run.
    warnings.filterwarnings("ignore", ".*multi-threaded.*fork", DeprecationWarning)

    def on_signal(_signum, _frame):
        raise _McpStop()

    signal.signal(signal.SIGTERM, on_signal)
    if _LockWatch._guard is None:  # made here, before two calls can race to make it
        import threading

        _LockWatch._guard = threading.Lock()
    infile, out = _mcp_stdio()
    server = _McpServer(out, getattr(o, "root", None), _mcp_max_wait_ms())
    _log(2, "mcp: serving on stdio (max wait %d ms)" % server.max_wait_ms)
    try:
        server.serve(infile)
    except _McpStop:  # a second SIGTERM while the calls were ending: stop now
        pass
    for stream in (out, infile):
        try:
            stream.close()
        except (OSError, ValueError):
            pass
    return {}


# ==== Entry point ============================================================

if __name__ == "__main__":
    cli()
