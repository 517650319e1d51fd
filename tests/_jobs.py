"""The shared base class of the subprocess test modules, and their helpers.

``JobsTestCase`` is ``CLITestCase`` (a private jobs root, ``cli()``, clean-up of
every process a test leaves) plus the shortcuts the subject modules use: jobs
started or finished in one call, the output contract and usage-error checks,
schema validation of answers, crafted states and raw CLI calls.
"""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import contextlib
import io

from tests import _schema_check
from tests._procs import kill_quietly, pids_running
from tests._util import PY, REPO, SCRIPT, CLITestCase, Result, clone_job, wait_until

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402


ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")

# Looser: any name of 26 Crockford characters (what a job directory may be).
_ID_SHAPE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

COMMANDS = ("run", "status", "tail", "wait", "kill", "list", "schema")


def other_char(c, avoid=()):
    """A Crockford base32 character different from ``c`` (and from ``avoid``)."""
    for x in reversed(CROCKFORD):
        if x != c and x not in avoid:
            return x
    raise AssertionError("unreachable")


TERMINAL = ("exited", "killed", "failed")

SH = "/bin/sh"

LINUX = sys.platform.startswith("linux")


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def open_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def sibling_id(job_id, n=6):
    """A ULID with the same timestamp as ``job_id`` but other last characters."""
    return job_id[: 26 - n] + "".join(other_char(c) for c in job_id[26 - n :])


RFC3339_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

REPLACEMENT = "\ufffd"

# ---- helpers ------------------------------------------------------------------

_SCHEMA = []


def response_schema():
    """The schema of every response, fetched once from ``agent-exec schema``."""
    if not _SCHEMA:
        proc = subprocess.run(
            [PY, SCRIPT, "schema"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        obj = json.loads(proc.stdout.decode("utf-8"))
        assert obj.get("ok") is True, obj
        _SCHEMA.append(obj["schema"])
    return _SCHEMA[0]


def cursor_pos(cursor):
    """(stdout_pos, stderr_pos) of a cursor; test-only knowledge of its format."""
    m = re.match(r"^c1\.([0-9a-f]+)\.([0-9a-f]+)$", cursor)
    assert m, "unexpected cursor format %r" % cursor
    return int(m.group(1), 16), int(m.group(2), 16)


def splits_a_character(data, at):
    """True when cutting ``data`` at ``at`` changes its lossy UTF-8 decoding.

    That is: decoding the two sides apart does not give the text of the
    whole, so the cut falls inside a character (or inside what the decoder
    reads as one unit).  Covers valid UTF-8 and invalid bytes alike.
    """
    whole = data.decode("utf-8", "replace")
    return data[:at].decode("utf-8", "replace") + data[at:].decode("utf-8", "replace") != whole


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def rfc3339(t):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def parse_rfc3339(text):
    import calendar

    base, _, frac = text.rstrip("Z").partition(".")
    t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return t + (float("0." + frac) if frac else 0.0)


def find_def(schema, type_name):
    """The schema definition whose ``type`` is the constant ``type_name``."""
    for d in schema.get("definitions", {}).values():
        props = d.get("properties") or {}
        if (props.get("type") or {}).get("const") == type_name:
            return d
    return None


# Workload: replay a plan of writes (stream, size, sleep) of two byte strings.
PLAN_WORKLOAD = (
    "import json, os, sys, time\n"
    "p = json.load(open(sys.argv[1]))\n"
    "data = {1: bytes.fromhex(p['out']), 2: bytes.fromhex(p['err'])}\n"
    "off = {1: 0, 2: 0}\n"
    "for fd, n, pause in p['steps']:\n"
    "    b = data[fd][off[fd]:off[fd] + n]\n"
    "    off[fd] += n\n"
    "    while b:\n"
    "        b = b[os.write(fd, b):]\n"
    "    if pause:\n"
    "        time.sleep(pause)\n"
)

# Workload: copy file argv[1] to stdout and file argv[2] to stderr, exit.
BYTES_WORKLOAD = (
    "import os, sys\n"
    "for fd, path in ((1, sys.argv[1]), (2, sys.argv[2])):\n"
    "    with open(path, 'rb') as f:\n"
    "        b = f.read()\n"
    "    while b:\n"
    "        b = b[os.write(fd, b):]\n"
)


def run_script(code, *args, timeout=60):
    """Run ``python -c code args`` (with the repo importable); return parsed JSON stdout."""
    proc = subprocess.run(
        [PY, "-c", code] + [str(a) for a in args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
        cwd=REPO,
        universal_newlines=True,
    )
    if proc.returncode != 0:
        raise AssertionError("script failed (%d): %s" % (proc.returncode, proc.stderr[-3000:]))
    return json.loads(proc.stdout)


FULL_ROW_RE = re.compile(
    r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z) \[(STDOUT|STDERR)\] (.*)$"
)

ENV_BIN = shutil.which("env") or "/usr/bin/env"

SNAPSHOT_KEYS = (
    "stdout_tail",
    "stderr_tail",
    "truncated",
    "encoding",
    "stdout_observed_bytes",
    "stderr_observed_bytes",
    "stdout_included_bytes",
    "stderr_included_bytes",
)

# ---- readiness -----------------------------------------------------------------------

DEV_SERVER = (
    "import time\n"
    "print('booting', flush=True)\n"
    "time.sleep(1.0)\n"
    "print('listening on http://localhost:3000', flush=True)\n"
    "time.sleep(30)\n"
)

PORT_SERVER = (
    "import socket, sys, time\n"
    "time.sleep(1.0)\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen(16)\n"
    "time.sleep(30)\n"
)


def call_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = agent_exec.main(argv)
    return rc, out.getvalue()


def job_ids_in(root):
    """Sorted names in ``root`` that look like job ids ([] when it is absent)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if _ID_SHAPE_RE.match(n))


def write_json_atomic(path, obj):
    """Replace ``path`` with ``obj`` as JSON (temp file 0600, rename)."""
    tmp = path + ".test.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class JobsTestCase(CLITestCase):
    """CLITestCase plus the shortcuts of the subject modules."""

    _schema = None

    def setUp(self):
        super().setUp()
        self.validator_name, self.validate = _schema_check.best_validator()

    @property
    def schema(self):
        """The response schema (``agent-exec schema``, fetched once per process)."""
        if self._schema is None:
            self._schema = response_schema()
        return self._schema

    @schema.setter
    def schema(self, value):
        self._schema = value

    def assert_contract(self, r, exit_code=None):
        """stdout is exactly one JSON object carrying the common fields."""
        self.assertIsInstance(r.json, dict, r)
        self.assertTrue(r.stdout.lstrip().startswith("{"), r)
        self.assertEqual(r.json.get("schema_version"), "0.1", r)
        self.assertIsInstance(r.json.get("ok"), bool, r)
        self.assertIsInstance(r.json.get("type"), str, r)
        if r.json["ok"]:
            self.assertEqual(r.code, 0, r)
            self.assertNotEqual(r.json["type"], "error", r)
        else:
            self.assertIn(r.code, (1, 2), r)
            self.assertEqual(r.json["type"], "error", r)
            err = r.json.get("error")
            self.assertIsInstance(err, dict, r)
            self.assertIsInstance(err.get("code"), str, r)
            self.assertTrue(err["code"], r)
            self.assertIsInstance(err.get("message"), str, r)
            self.assertIsInstance(err.get("retryable"), bool, r)
        self.assertNotIn("Traceback", r.stdout, r)
        if exit_code is not None:
            self.assertEqual(r.code, exit_code, r)
        return r.json

    def finished_job(self, *cmd):
        """A job that has ended: ``run --wait -- cmd`` (default ``true``)."""
        j = self.ok("run", "--wait", "--", *(cmd or ("true",)))
        self.assertIn(j["state"], ("exited", "killed"), j)
        return j["job_id"]

    def usage_error(self, *args, **kw):
        """Assert exit 2, one JSON usage_error on stdout, usage text on stderr."""
        before = job_ids_in(self.root)
        r = self.cli(*args, **kw)
        self.assert_contract(r, exit_code=2)
        self.assertEqual(r.json["error"]["code"], "usage_error", r)
        self.assertIn("usage", r.stderr.lower(), r)
        self.assertNotIn("Traceback", r.stderr, r)
        # A usage error never creates a job.
        self.assertEqual(job_ids_in(self.root), before, r)
        return r

    def wait_for_output(self, job_id, text, timeout=10.0):
        path = os.path.join(self.job_dir(job_id), "stdout.log")

        def has():
            try:
                with open(path, "rb") as f:
                    return text.encode() in f.read()
            except OSError:
                return False

        self.assertTrue(wait_until(has, timeout), "job never printed %r" % text)

    def finished(self, *cmd, **kw):
        j = self.ok("run", "--wait", "--", *cmd, **kw)
        self.assertIn(j["state"], ("exited", "killed"), j)
        return j["job_id"]

    def running(self, *cmd, **kw):
        jid = self.ok("run", "--snapshot-after", "0", "--", *(cmd or ("sleep", "30")), **kw)[
            "job_id"
        ]
        self.addCleanup(self.cli, "kill", "--signal", "KILL", jid)
        return jid

    def list_ids(self, *args, **kw):
        j = self.ok("list", *args, **kw)
        self.assertEqual(j["type"], "list", j)
        return [e["job_id"] for e in j["jobs"]]

    def craft_failed(self, src_id):
        """A copy of a finished job whose recorded state is ``failed``."""
        new_id = sibling_id(src_id)
        clone_job(self.job_dir(src_id), self.job_dir(new_id), src_id, new_id)
        path = os.path.join(self.job_dir(new_id), "state.json")
        with open(path) as f:
            st = json.load(f)
        self.assertIn("job", st, st)
        self.assertIn("status", st["job"], st)
        self.assertIn("result", st, st)
        st["job"]["status"] = "failed"
        st["result"]["exit_code"] = None
        st["result"]["signal"] = None
        st["pid"] = None
        st["failure"] = {"code": "spawn_failed", "message": "crafted by the test suite"}
        write_json_atomic(path, st)
        return new_id

    def mkdir(self, name):
        path = os.path.join(self.tmp, name)
        os.mkdir(path, 0o700)
        return path

    def assert_schema(self, obj, label=""):
        errs = self.validate(obj, self.schema)
        self.assertFalse(
            errs, "%s response does not validate: %s\n%s" % (label, errs[:5], json.dumps(obj))
        )

    def okv(self, *args, **kw):
        """``ok()`` plus validation of the response against the schema."""
        j = self.ok(*args, **kw)
        self.assert_schema(j, args[0] if args else "")
        return j

    def timed(self, *args, **kw):
        t0 = time.monotonic()
        j = self.okv(*args, **kw)
        return j, time.monotonic() - t0

    def py_job(self, code, *argv, opts=()):
        return self.start(PY, "-c", code, *argv, opts=opts)

    def bytes_job(self, out=b"", err=b""):
        """A job that writes these exact bytes and exits; waits until it is over."""
        paths = []
        for data in (out, err):
            fd, path = tempfile.mkstemp(dir=self.tmp, prefix="bytes-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        r = self.ok("run", "--wait", "--", PY, "-c", BYTES_WORKLOAD, *paths)
        self.assertEqual(r["state"], "exited", r)
        return r["job_id"]

    def log(self, job_id, stream):
        with open(os.path.join(self.job_dir(job_id), stream + ".log"), "rb") as f:
            return f.read()

    def read_all(self, job_id, max_bytes, cursor=None, limit=5000):
        """Read a terminal job to eof, cursor by cursor; return the responses."""
        out = []
        while True:
            args = ["read", "--max-bytes", str(max_bytes)]
            if cursor is not None:
                args += ["--cursor", cursor]
            j = self.ok(*(args + [job_id]))
            out.append(j)
            cursor = j["cursor"]
            if j["eof"]:
                return out
            self.assertLess(len(out), limit, "read never reached eof")

    def write_state(self, job_id, **changes):
        """Rewrite state.json atomically (temp file + rename) with ``changes``."""
        path = os.path.join(self.job_dir(job_id), "state.json")
        state = self.read_state(job_id)
        state.update(changes)
        tmp = path + ".test-tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)

    def age_job(self, job_id, seconds):
        """Make a terminal job look as if it finished ``seconds`` ago."""
        self.write_state(job_id, finished_at=rfc3339(time.time() - seconds))

    def cli_raw(self, *args, preexec_fn=None, env=None, timeout=60):
        argv = [PY, SCRIPT] + [str(a) for a in args]
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or self.env(),
            cwd=self.tmp,
            timeout=timeout,
            universal_newlines=True,
            preexec_fn=preexec_fn,
        )
        return Result(proc, argv)

    def read_bytes(self, path):
        with open(path, "rb") as f:
            return f.read()

    def event_results(self, jid, timeout=10.0):
        """completion_event.json once its delivery results are in."""
        path = os.path.join(self.job_dir(jid), "completion_event.json")

        def done():
            try:
                with open(path) as f:
                    ev = json.load(f)
            except (OSError, ValueError):
                return None
            return ev if ev.get("delivery_results") else None

        ev = wait_until(done, timeout)
        self.assertTrue(ev, "no delivery results in %s" % path)
        return ev

    def unique_sleeps(self, n):
        """n unique sleep durations (as strings), killed on tear-down if still alive."""
        base = random.randint(100000, 999999) * 10
        durs = [str(base + k + 1) for k in range(n)]
        self.addCleanup(lambda: kill_quietly(pids_running([["sleep", d] for d in durs])))
        return durs

    def read_meta(self, job_id):
        return self.read_json(os.path.join(self.job_dir(job_id), "meta.json"))

    def wait_terminal(self, job_id, timeout_ms=30000):
        w = self.wait_job(job_id, timeout_ms)
        self.assertIn(w["state"], TERMINAL, w)
        return w

    def make_dir(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path)
        return path

    def write_file(self, path, text, mode=None):
        with open(path, "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(path, mode)
        return path

    def assertNoJobCreated(self):
        self.assertEqual(job_ids_in(self.root), [], "a job directory was created")
