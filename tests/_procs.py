"""Process and output helpers shared by the tests and bench/stress.py.

Reading /proc (Linux), killing only processes that are provably the ones a
job recorded, the no-newline output generator and its checksum, and the
in-process kill-race driver.  Standard library only; bench/stress.py imports
this module with the repository on sys.path.
"""

import hashlib
import json
import os
import re
import signal
import sys
import time


def pid_alive(pid):
    """True when ``pid`` exists and is not a zombie (zombies count as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def wait_until(pred, timeout=10.0, interval=0.02):
    """Poll ``pred`` until it is truthy or ``timeout`` passes; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


MIB = 1 << 20
ROW_MAX = 64 * 1024
ROW_RE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(STDOUT|STDERR)\] ")

# Writes argv[1] MiB to stdout, never a newline: block i is b"%07d|" % i repeated.
GEN_NO_NEWLINE = (
    "import os, sys\n"
    "for i in range(int(sys.argv[1])):\n"
    "    v = memoryview((b'%07d|' % i) * 131072)\n"
    "    while v:\n"
    "        v = v[os.write(1, v):]\n"
)


def expected_no_newline_sha(mib):
    h = hashlib.sha256()
    for i in range(mib):
        h.update((b"%07d|" % i) * 131072)
    return h.hexdigest()


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(MIB)
            if not block:
                return h.hexdigest()
            h.update(block)


# ---- /proc helpers ----------------------------------------------------------


def proc_stat(pid):
    """(state, ppid) of a process, or None when it does not exist."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1])


def proc_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return None


def all_pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def pids_running(argvs):
    """Live (non-zombie) pids whose argv is one of ``argvs`` (lists of str)."""
    wanted = {tuple(a.encode() for a in argv) for argv in argvs}
    out = []
    for pid in all_pids():
        cmd = proc_cmdline(pid)
        if cmd and tuple(cmd) in wanted and pid_alive(pid):
            out.append(pid)
    return out


def zombies_of(ppid):
    out = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st and st[0] == "Z" and st[1] == ppid:
            out.append(pid)
    return out


def vmrss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def kill_quietly(pids, group=False):
    for pid in pids:
        if not isinstance(pid, int) or pid <= 1:
            continue
        fns = (os.killpg, os.kill) if group else (os.kill,)
        for fn in fns:
            try:
                fn(pid, signal.SIGKILL)
            except OSError:
                pass


def start_token(pid):
    """Field 22 of /proc/<pid>/stat (start time), or None; what state.json records."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, TypeError):
        return None


def kill_recorded(st):
    """SIGKILL a job's workload group and supervisor, only if they are provably
    the processes state.json names (pid reuse must never hit a stranger)."""
    for key, token, group in (
        ("pid", "pid_start_time", True),
        ("supervisor_pid", "supervisor_start_time", False),
    ):
        pid = st.get(key)
        if isinstance(pid, int) and pid > 1 and st.get(token) is not None:
            if start_token(pid) == st.get(token):
                kill_quietly([pid], group)


def writer_code(chunks, byte="x", exit_code=0, stderr_line=""):
    """Python source of a workload that writes ``chunks`` x 64 KiB of ``byte``
    to stdout in single writes, then a line on stderr, then exits."""
    code = "import os\nfor _ in range(%d):\n    os.write(1, b'%s' * 65536)\n" % (chunks, byte)
    if stderr_line:
        code += "os.write(2, %r)\n" % (stderr_line + "\n").encode()
    return code + "raise SystemExit(%d)\n" % exit_code


# A workload that writes 10 MB to stderr, and only then 10 MB to stdout: a
# supervisor that drained one pipe at a time would deadlock on it.
FLOOD_STDERR_THEN_STDOUT = (
    "import os\n"
    "def w(fd, data):\n"
    "    v = memoryview(data)\n"
    "    while v:\n"
    "        v = v[os.write(fd, v):]\n"
    "w(2, b'e' * 10000000)\n"
    "w(1, b'o' * 10000000)\n"
)


def fsize_limit(limit):
    """A preexec_fn that caps the size of any file the process (and so its
    job's supervisor) writes: RLIMIT_FSIZE."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def mount_tiny_tmpfs(path):
    """Mount a 1 MiB tmpfs on ``path`` (a new directory); (mounted, why not)."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("mount"):
        return False, "mounting a tmpfs needs root"
    os.mkdir(path, 0o700)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=20,
    )
    if r.returncode != 0:
        return False, "cannot mount a tmpfs here: %r" % r.stdout[-200:]
    return True, ""


def unmount_tiny_tmpfs(path, root):
    """Kill the jobs of ``root`` (inside the mount), then unmount ``path``."""
    import subprocess

    kill_jobs_in(root)
    time.sleep(0.1)
    subprocess.run(["umount", "-l", path], timeout=20)


def hanging_hook():
    """(run options for a notify command that hangs, its argv to find it by).

    The hook is a ``sleep`` with a duration of its own, so that pids_running()
    finds exactly this one, and run kills it after 500 ms."""
    import random

    argv = ["sleep", "30.%06d" % random.randint(0, 999999)]
    opts = ["--notify-timeout", "500", "--notify-command", json.dumps(argv)]
    return opts, argv


def kill_jobs_in(root):
    """kill_recorded() every job of a jobs root: what a test or a stress case
    started must not outlive it."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        try:
            with open(os.path.join(root, name, "state.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(st, dict):
            kill_recorded(st)


# A driver for the kill race: it calls main() in process, so that the kill
# lands within a millisecond of the chosen moment, not an interpreter start-up
# later (which would always be after the job's end).
RACE_DRIVER = r"""
import contextlib, io, json, random, sys, time
import agent_exec
root, cwd, events, seed, first, count = sys.argv[1:7]
seed, first, count = int(seed), int(first), int(count)

def call(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = agent_exec.main(["--root", root] + argv)
    return rc, json.loads(out.getvalue())

res = []
for i in range(first, first + count):
    rnd = random.Random(seed + i)
    x, sig, delay = rnd.randint(1, 9), rnd.choice(["TERM", "KILL", "INT"]), rnd.uniform(0, 0.12)
    cmd = ["sh", "-c", "sleep 0.0%d; exit 3" % x]
    rc, r = call(["run", "--snapshot-after", "0", "--cwd", cwd, "--notify-file", events, "--"]
                 + cmd)
    if rc != 0:
        res.append({"i": i, "run": r})
        continue
    time.sleep(delay)
    krc, k = call(["kill", "--signal", sig, r["job_id"]])
    wrc, w = call(["wait", "--timeout-ms", "20000", r["job_id"]])
    res.append({"i": i, "jid": r["job_id"], "sig": sig, "x": x, "delay": round(delay, 4),
                "krc": krc, "k": k, "wrc": wrc, "w": w})
print(json.dumps(res))
"""


# A driver that calls main() in process for n jobs (some leaving a background
# child), waits for them, and reports the children and zombies it is left
# with: agent-exec must leave a long-lived caller neither.
ZOMBIE_DRIVER = r"""
import io, json, os, sys, contextlib
import agent_exec
root, n = sys.argv[1], int(sys.argv[2])

def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = agent_exec.main(["--root", root] + argv)
    return rc, json.loads(out.getvalue())

answers = []
for i in range(n):
    mode = ["--snapshot-after", "0"], ["--snapshot-after", "3000"], ["--wait"]
    cmd = ["sh", "-c", "echo job-%d; exit %d" % (i, i % 3)]
    if i % 5 == 4:
        cmd = ["sh", "-c", "(sleep 0.2 &); echo job-%d; exit %d" % (i, i % 3)]
    answers.append(call(["run"] + mode[i % 3] + ["--"] + cmd))
ids = [a[1]["job_id"] for a in answers]
finals = [call(["wait", "--timeout-ms", "20000", j]) for j in ids]
# One more: a job that cannot start, and a kill of a finished job.
answers.append(call(["run", "--snapshot-after", "0", "--", "/nonexistent-xyz"]))
finals.append(call(["kill", ids[0]]))

def children():
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % tid) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out

def zombies():
    me, out = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == b"Z" and int(fields[1]) == me:
                out.append(int(name))
    return out

print(json.dumps({"answers": answers, "finals": finals, "children": children(),
                  "zombies": zombies()}))
"""


def curses_box_rows(rows=24):
    """The screen that the tests' curses programs draw: a title, a 5x20 box at
    row 2, column 10 with "hello curses" inside, and "corner" at the bottom
    right (each test adds what else its program draws)."""
    want = [""] * rows
    want[0] = "curses test"
    want[2] = " " * 10 + "\u250c" + "\u2500" * 18 + "\u2510"
    want[3] = want[5] = " " * 10 + "\u2502" + " " * 18 + "\u2502"
    want[4] = " " * 10 + "\u2502  hello curses    \u2502"
    want[6] = " " * 10 + "\u2514" + "\u2500" * 18 + "\u2518"
    want[23] = " " * 70 + "corner"
    return want
