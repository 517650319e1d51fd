"""Shared helpers for the test suite: drive the real CLI against a temp root.

Every test case that starts jobs should derive from ``CLITestCase``: it gives
each test its own jobs root, and on tear-down kills whatever the test left
running (supervisors, workloads, their process groups), so no test leaves a
process behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests._procs import kill_jobs_in, pid_alive, wait_until  # noqa: F401 (re-exported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "agent_exec.py")
PY = sys.executable
# How cli() starts the CLI: the file loaded through the import system, so its
# cached bytecode is used.  As a script (`python3 agent_exec.py`) CPython
# compiles the whole file at every start (20-40 ms), which over the suite's
# thousands of calls is a good part of its time; the script form itself is
# exercised by the tests that call SCRIPT directly.  -S: agent-exec needs
# nothing but the standard library, and site's .pth files can cost more than
# the command (the supervisor runs with -S too).  No PYTHONPATH: it would
# leak into the environment of the jobs, which some tests inspect.
CLI = [
    PY,
    "-S",
    "-c",
    "import sys; sys.path.insert(0, %r); import agent_exec; agent_exec.cli()" % REPO,
]


def _warm_bytecode():
    """Write __pycache__/agent_exec.*.pyc once per run: $PYTHONDONTWRITEBYTECODE
    stops imports from writing it, not from reading it."""
    import importlib.util
    import py_compile

    try:
        py_compile.compile(SCRIPT, cfile=importlib.util.cache_from_source(SCRIPT), doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # a read-only checkout: the import compiles in memory, still correct


_warm_bytecode()
# One bound for every CLI call: nothing in the suite may hang.
CALL_TIMEOUT = 60
# The timestamps agent-exec writes: RFC 3339, UTC, milliseconds.
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


_strict = []


def strict_schema():
    """The response schema with ``additionalProperties: false`` on every object
    that lists its properties: a field an answer carries but no declaration
    names fails validation.  The published schema stays open for old clients."""
    if not _strict:
        if REPO not in sys.path:
            sys.path.insert(0, REPO)
        import agent_exec

        def close(node):
            if isinstance(node, dict):
                if "properties" in node:
                    node["additionalProperties"] = False
                for value in node.values():
                    close(value)
            elif isinstance(node, list):
                for value in node:
                    close(value)
            return node

        _strict.append(close(agent_exec.response_schema()))
    return _strict[0]


def check_strictly(answer):
    """Raise AssertionError when ``answer`` does not fit the strict schema."""
    from tests import _schema_check

    problems = _schema_check.errors(answer, strict_schema())
    if problems:
        raise AssertionError(
            "answer does not fit the strict schema: %s\n%r" % (problems[:5], answer)
        )


class Result:
    """What one CLI invocation gave back."""

    def __init__(self, proc, argv):
        self.argv = argv
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.json = json.loads(proc.stdout)
        except ValueError:
            self.json = None

    def __repr__(self):
        return "Result(argv=%r, code=%r, stdout=%r, stderr=%r)" % (
            self.argv,
            self.code,
            self.stdout[-2000:],
            self.stderr[-2000:],
        )


def only_regular(src, names):
    """copytree ignore: skip FIFOs, sockets and the like (a job dir may hold a
    control pipe, which copytree cannot copy)."""
    skip = []
    for n in names:
        p = os.path.join(src, n)
        if not (os.path.isdir(p) or os.path.isfile(p)) or os.path.islink(p):
            skip.append(n)
    return skip


def clone_job(src_dir, dst_dir, src_id, dst_id):
    """Copy a finished job's directory, renaming the id inside its JSON files."""
    shutil.copytree(src_dir, dst_dir, ignore=only_regular)
    for name in ("meta.json", "state.json"):
        path = os.path.join(dst_dir, name)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace(src_id, dst_id))


class CLITestCase(unittest.TestCase):
    """A test case with a private jobs root and a ``cli()`` runner."""

    maxDiff = None

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="agent-exec-test-")
        os.chmod(self.tmp, 0o700)
        self.root = os.path.join(self.tmp, "root")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_jobs_in, self.root)

    def env(self, **extra):
        env = dict(os.environ)
        env.pop("AGENT_EXEC_ROOT", None)
        env.pop("AGENT_EXEC_LOG", None)
        env.pop("RUST_LOG", None)
        env["AGENT_EXEC_ROOT"] = self.root
        env.update(extra)
        return env

    def cli(
        self,
        *args,
        env=None,
        cwd=None,
        stdin=None,
        timeout=CALL_TIMEOUT,
        root=True,
        preexec_fn=None,
    ):
        """Run ``agent_exec.py <args>`` and return a Result.

        Every JSON answer is also checked against the strict schema.

        The root comes from $AGENT_EXEC_ROOT (set to this test's root) unless
        the test passes its own ``env``.  ``preexec_fn`` sets up the caller
        process (signals ignored, a umask...), as in subprocess.
        """
        argv = CLI + [str(a) for a in args]
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env() if env is None else env,
            cwd=cwd or self.tmp,
            timeout=timeout,
            universal_newlines=True,
            preexec_fn=preexec_fn,
        )
        result = Result(proc, argv)
        if isinstance(result.json, dict):
            check_strictly(result.json)
        return result

    def ok(self, *args, **kw):
        """Run the CLI and assert exit 0, ``ok: true``; return the JSON."""
        r = self.cli(*args, **kw)
        self.assertEqual(r.code, 0, r)
        self.assertIsInstance(r.json, dict, r)
        self.assertTrue(r.json.get("ok"), r)
        return r.json

    def fail_with(self, code, *args, exit_code=1, **kw):
        """Run the CLI, assert a JSON error with ``code``; return the JSON."""
        r = self.cli(*args, **kw)
        self.assertEqual(r.code, exit_code, r)
        self.assertIsInstance(r.json, dict, r)
        self.assertIs(r.json.get("ok"), False, r)
        self.assertEqual(r.json.get("type"), "error", r)
        self.assertEqual(r.json["error"]["code"], code, r)
        return r.json

    def start(self, *cmd, opts=()):
        """``run --snapshot-after 0 [opts] -- cmd``; return the job id."""
        j = self.ok("run", "--snapshot-after", "0", *opts, "--", *cmd)
        return j["job_id"]

    def job_dir(self, job_id):
        return os.path.join(self.root, job_id)

    def read_state(self, job_id):
        with open(os.path.join(self.job_dir(job_id), "state.json")) as f:
            return json.load(f)

    def wait_job(self, job_id, timeout_ms=30000):
        return self.ok("wait", "--timeout-ms", str(timeout_ms), job_id)

    def read_json(self, path):
        with open(path) as f:
            return json.load(f)

    def assertTimestamp(self, value, what=""):
        self.assertIsInstance(value, str, what)
        self.assertRegex(value, TS_RE, what)

    def kill_job(self, job_id):
        """Best effort: stop a job this test started."""
        try:
            self.cli("kill", "--signal", "KILL", job_id, timeout=20)
            self.cli("wait", "--timeout-ms", "5000", job_id, timeout=20)
        except Exception:
            pass

    def start_bg(self, *cmd, opts=()):
        """start(), and kill the job when the test ends."""
        jid = self.start(*cmd, opts=opts)
        self.addCleanup(self.kill_job, jid)
        return jid

    def job_pids(self, job_id):
        """(workload pid, supervisor pid) once state.json has them."""
        ok = wait_until(lambda: isinstance(self.read_state(job_id).get("pid"), int), 5)
        self.assertTrue(ok, "state.json never got a pid")
        st = self.read_state(job_id)
        self.assertIsInstance(st.get("supervisor_pid"), int, st)
        return st["pid"], st["supervisor_pid"]
