"""Observing jobs: read, cursors, wait --match/--any, readiness,
the richer status and list, delete and gc.

Every test drives the real CLI against a private jobs root (``CLITestCase``),
bounds every call in time and kills what it started.  Every new response is
also validated against the schema that ``agent-exec schema`` returns.

Cursors are opaque to users; the tests peek inside them (``c1.<hex>.<hex>``:
byte positions in stdout and stderr) only to check that each read covers
exactly the bytes it should.
"""

import concurrent.futures
import json
import math
import os
import random
import re
import resource
import socket
import string
import subprocess
import sys
import tempfile
import time
import unittest

from tests import _schema_check
from tests._util import PY, SCRIPT, CLITestCase, pid_alive, wait_until

LINUX = sys.platform.startswith("linux")
TERMINAL = ("exited", "killed", "failed")
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


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


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


class ObserveCase(CLITestCase):
    """CLITestCase plus schema checks and a few workload shortcuts."""

    def setUp(self):
        super().setUp()
        self.schema = response_schema()
        self.validator_name, self.validate = _schema_check.best_validator()

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

    def kill_job(self, job_id):
        self.cli("kill", "--signal", "KILL", job_id, timeout=30)

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


# ---- read ---------------------------------------------------------------------


class ReadTests(ObserveCase):
    def test_read_whole_output_of_a_finished_job(self):
        job = self.bytes_job(b"hello\nworld\n", b"oops\n")
        j = self.okv("read", job)
        self.assertEqual(j["type"], "read")
        self.assertEqual(j["job_id"], job)
        self.assertEqual(j["state"], "exited")
        self.assertEqual(j["stdout"], "hello\nworld\n")
        self.assertEqual(j["stderr"], "oops\n")
        self.assertIs(j["more"], False)
        self.assertIs(j["eof"], True)
        self.assertEqual(cursor_pos(j["cursor"]), (12, 5))
        # Reading again from that cursor: nothing new, still eof.
        again = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual((again["stdout"], again["stderr"]), ("", ""))
        self.assertIs(again["eof"], True)
        self.assertEqual(again["cursor"], j["cursor"])

    def test_read_resolves_a_prefix(self):
        job = self.bytes_job(b"x\n")
        j = self.okv("read", job[:10])
        self.assertEqual(j["job_id"], job)
        self.assertEqual(j["stdout"], "x\n")

    def test_max_bytes_pages_with_more_and_eof(self):
        job = self.bytes_job(b"0123456789", b"abcdef")
        pages = []
        cursor = None
        for _ in range(10):
            args = ["read", "--max-bytes", "4"] + (["--cursor", cursor] if cursor else [])
            j = self.okv(*(args + [job]))
            pages.append((j["stdout"], j["stderr"], j["more"], j["eof"]))
            cursor = j["cursor"]
            if j["eof"]:
                break
        self.assertEqual(
            pages,
            [
                ("0123", "abcd", True, False),
                ("4567", "ef", True, False),
                ("89", "", False, True),
            ],
        )

    def test_default_max_bytes_is_64k_per_stream(self):
        n = 65536 + 1000
        job = self.bytes_job(b"a" * n, b"b" * 10)
        j = self.okv("read", job)
        self.assertEqual(len(j["stdout"]), 65536)
        self.assertEqual(j["stderr"], "b" * 10)
        self.assertIs(j["more"], True)
        self.assertIs(j["eof"], False)
        j2 = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual(j2["stdout"], "a" * 1000)
        self.assertIs(j2["eof"], True)

    def test_multibyte_characters_are_never_split(self):
        text = "aé€😀\n中𝄞"
        data = text.encode("utf-8")
        job = self.bytes_job(data, text[::-1].encode("utf-8"))
        for max_bytes in (1, 2, 3):
            with self.subTest(max_bytes=max_bytes):
                pages = self.read_all(job, max_bytes)
                for p in pages:
                    self.assertNotIn(REPLACEMENT, p["stdout"] + p["stderr"], p)
                self.assertEqual("".join(p["stdout"] for p in pages), text)
                self.assertEqual("".join(p["stderr"] for p in pages), text[::-1])
                # Never more than max_bytes, unless one character is wider.
                prev = (0, 0)
                for p in pages:
                    cur = cursor_pos(p["cursor"])
                    for i in (0, 1):
                        self.assertLessEqual(cur[i] - prev[i], max(max_bytes, 4), p)
                    prev = cur

    def test_invalid_bytes_before_a_character_do_not_split_it(self):
        # A lone lead byte, an ASCII byte, then a valid 4-byte character: read
        # one byte at a time, the emoji must still come back whole.
        data = b"\xf0A" + "😀".encode("utf-8") + b"z"
        job = self.bytes_job(data)
        pages = self.read_all(job, 1)
        got = "".join(p["stdout"] for p in pages)
        self.assertEqual(got, data.decode("utf-8", "replace"), pages)
        self.assertEqual(cursor_pos(pages[-1]["cursor"])[0], len(data))

    def test_truncated_character_at_the_end_still_reaches_eof(self):
        # The log ends inside a multi-byte character (the job died mid-write):
        # reading byte by byte must still get past it and reach eof.
        for tail in (b"\xf0\x9f", b"\xe2\x82"):
            with self.subTest(tail=tail):
                data = b"ab" + tail
                job = self.bytes_job(data)
                pages = self.read_all(job, 1, limit=8)
                got = "".join(p["stdout"] for p in pages)
                self.assertEqual(got, data.decode("utf-8", "replace"))
                self.assertEqual(cursor_pos(pages[-1]["cursor"])[0], len(data))

    def test_invalid_bytes_are_replaced_and_counted(self):
        data = b"ok\xff\xfe\n\xc3(\n"
        job = self.bytes_job(data, b"\x80")
        j = self.okv("read", job)
        self.assertEqual(j["stdout"], data.decode("utf-8", "replace"))
        self.assertEqual(j["stderr"], REPLACEMENT)
        self.assertEqual(cursor_pos(j["cursor"]), (len(data), 1))
        self.assertIs(j["eof"], True)

    def test_malformed_cursor_is_a_usage_error(self):
        job = self.bytes_job(b"x\n")
        for bad in ("garbage", "c1.0", "c1.zz.0", "c2.0.0", "c1.-1.0"):
            with self.subTest(cursor=bad):
                self.fail_with("usage_error", "read", "--cursor", bad, job, exit_code=2)

    def test_bad_max_bytes_and_wait_ms_are_usage_errors(self):
        job = self.bytes_job(b"x\n")
        self.fail_with("usage_error", "read", "--max-bytes", "-1", job, exit_code=2)
        self.fail_with("usage_error", "read", "--max-bytes", "lots", job, exit_code=2)
        self.fail_with("usage_error", "read", "--wait-ms", "soon", job, exit_code=2)

    def test_unknown_job(self):
        self.fail_with("job_not_found", "read", "0123456789ABCDEFGHJKMNPQRS")
        self.fail_with("job_not_found", "read", "../etc")

    def test_cursor_past_the_end_reads_nothing(self):
        job = self.bytes_job(b"abc\n")
        j = self.okv("read", "--cursor", "c1.ff.ff", job)
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertIs(j["more"], False)


class WaitOutputRaceTests(unittest.TestCase):
    """_wait_output compares the logs with sizes taken before they were read."""

    class _NeverEnds:
        def wait(self, timeout):
            time.sleep(timeout)
            return False

    def test_bytes_written_between_read_and_wait_wake_it(self):
        if os.path.dirname(SCRIPT) not in sys.path:
            sys.path.insert(0, os.path.dirname(SCRIPT))
        import agent_exec

        with tempfile.TemporaryDirectory() as d:
            for name in ("stdout.log", "stderr.log"):
                open(os.path.join(d, name), "wb").close()
            job = agent_exec._Job("01ABCDEFGHJKMNPQRSTVWXYZ00", d, {}, None, "running", None)
            before = agent_exec._log_sizes(job)  # the read happens here and finds nothing
            with open(os.path.join(d, "stdout.log"), "ab") as f:
                f.write(b"late line\n")  # ...then the line lands, before the wait starts
            t0 = time.monotonic()
            agent_exec._wait_output(job, self._NeverEnds(), 10.0, before)
            self.assertLess(time.monotonic() - t0, 5.0, "the wait missed the line")


class LongPollTests(ObserveCase):
    def test_wait_ms_wakes_on_new_output(self):
        # Three lines, 0.8 s apart; each read long-polls for the next one.
        # The line carries the time it was written: the read must come back
        # right after it (the target: within 50 ms; the test allows noise).
        code = (
            "import sys, time\n"
            "for i in range(3):\n"
            "    time.sleep(0.8)\n"
            "    sys.stdout.write('%.6f\\n' % time.time())\n"
            "    sys.stdout.flush()\n"
            "time.sleep(30)\n"
        )
        job = self.py_job(code)
        cursor = None
        lags = []
        for _ in range(3):
            args = ["read", "--wait-ms", "10000"] + (["--cursor", cursor] if cursor else [])
            j, took = self.timed(*(args + [job]))
            now = time.time()
            self.assertEqual(j["state"], "running", j)
            self.assertLess(took, 8.0, j)
            lines = j["stdout"].splitlines()
            self.assertTrue(lines, j)
            lags.append(now - float(lines[-1]))
            cursor = j["cursor"]
        self.kill_job(job)
        self.assertLess(min(lags), 0.3, "long-poll wake-up lags: %r" % lags)

    def test_wait_ms_returns_at_once_when_the_job_ends(self):
        job = self.py_job("import time; time.sleep(1.0)")
        t0 = time.monotonic()
        j = self.okv("read", "--wait-ms", "20000", job)
        took = time.monotonic() - t0
        self.assertIn(j["state"], TERMINAL)
        self.assertEqual(j["state"], "exited")
        self.assertIs(j["eof"], True)
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertLess(took, 6.0)

    def test_wait_ms_times_out_without_output_and_costs_no_cpu(self):
        job = self.start("sleep", "30")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        j = self.okv("read", "--wait-ms", "1500", job)
        took = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.assertEqual(j["state"], "running")
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertIs(j["eof"], False)
        self.assertIs(j["more"], False)
        self.assertEqual(cursor_pos(j["cursor"]), (0, 0))
        self.assertGreaterEqual(took, 1.4)
        self.assertLess(took, 8.0)
        # Startup costs a fraction of a second; a busy loop would burn ~1.5 s.
        self.assertLess(cpu, 0.9, "read --wait-ms used %.2fs of CPU" % cpu)
        self.kill_job(job)

    def test_wait_ms_returns_existing_output_immediately(self):
        job = self.py_job("import time; print('ready', flush=True); time.sleep(30)")
        self.assertTrue(
            wait_until(lambda: os.path.getsize(os.path.join(self.job_dir(job), "stdout.log")))
        )
        j, took = self.timed("read", "--wait-ms", "20000", job)
        self.assertEqual(j["stdout"], "ready\n")
        self.assertLess(took, 6.0)
        self.kill_job(job)


class CursorHandoffTests(ObserveCase):
    """run, tail and wait return a cursor; read --cursor continues from it."""

    TWO_PHASE = (
        "import sys, time\n"
        "sys.stdout.write('first\\n'); sys.stdout.flush()\n"
        "sys.stderr.write('e1\\n'); sys.stderr.flush()\n"
        "time.sleep(1.5)\n"
        "sys.stdout.write('second\\n'); sys.stdout.flush()\n"
        "sys.stderr.write('e2\\n'); sys.stderr.flush()\n"
    )

    def test_run_with_snapshot_then_read_loses_and_repeats_nothing(self):
        r = self.okv("run", "--snapshot-after", "700", "--", PY, "-c", self.TWO_PHASE)
        job = r["job_id"]
        self.assertEqual(r["state"], "running", r)
        snap = r["snapshot"]
        self.assertEqual(snap["stdout_tail"], "first\n", r)
        self.assertEqual(
            cursor_pos(r["cursor"]),
            (snap["stdout_observed_bytes"], snap["stderr_observed_bytes"]),
        )
        self.wait_job(job)
        j = self.okv("read", "--cursor", r["cursor"], job)
        self.assertEqual(j["stdout"], "second\n")
        self.assertEqual(j["stderr"], "e2\n")
        self.assertIs(j["eof"], True)
        self.assertEqual(snap["stdout_tail"] + j["stdout"], self.log(job, "stdout").decode())
        self.assertEqual(snap["stderr_tail"] + j["stderr"], self.log(job, "stderr").decode())

    def test_run_without_snapshot_gives_a_cursor_at_the_start(self):
        r = self.okv("run", "--snapshot-after", "0", "--", PY, "-c", "print('all of it')")
        self.assertIn("cursor", r)
        self.wait_job(r["job_id"])
        j = self.okv("read", "--cursor", r["cursor"], r["job_id"])
        self.assertEqual(j["stdout"], "all of it\n")

    def test_run_wait_cursor_is_at_the_end(self):
        r = self.okv("run", "--wait", "--", PY, "-c", "print('x' * 10)")
        self.assertEqual(cursor_pos(r["cursor"]), (11, 0))
        j = self.okv("read", "--cursor", r["cursor"], r["job_id"])
        self.assertEqual((j["stdout"], j["eof"]), ("", True))

    def test_tail_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        path = os.path.join(self.job_dir(job), "stderr.log")
        self.assertTrue(wait_until(lambda: os.path.getsize(path) >= 3))
        t = self.okv("tail", job)
        self.assertIn("cursor", t)
        self.assertEqual(t["stdout_tail"], "first\n", t)
        self.assertEqual(cursor_pos(t["cursor"]), (6, 3))
        j = self.okv("read", "--cursor", t["cursor"], "--wait-ms", "10000", job)
        self.assertEqual(j["stdout"], "second\n")
        self.wait_job(job)

    def test_wait_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        w = self.okv("wait", "--timeout-ms", "30000", job)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(cursor_pos(w["cursor"]), (13, 6))
        j = self.okv("read", "--cursor", w["cursor"], job)
        self.assertEqual((j["stdout"], j["stderr"], j["eof"]), ("", "", True))

    def test_wait_match_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        w = self.okv("wait", "--match", "first", "--timeout-ms", "20000", job)
        self.assertIs(w["matched"], True, w)
        j = self.okv("read", "--cursor", w["match"]["cursor"], "--wait-ms", "10000", job)
        self.wait_job(job)
        rest = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual(j["stdout"] + rest["stdout"], "second\n")


# ---- the exact-bytes property ------------------------------------------------------

MULTIBYTE = ["é", "ß", "ñ", "Ω", "€", "中", "文", "한", "😀", "🎉", "𝄞", "\u0301"]
ASCII = string.ascii_letters + string.digits + " .,;:-_=+"
SHAPES = ("ascii", "utf8", "multibyte", "binary", "long_line", "mixed", "empty")
SEEDS = [3, 17, 42, 101, 256, 777, 1009, 2024, 4242, 5150, 8080, 9001, 31337, 65537, 99991]


def _text(rng, n, ratio):
    return "".join(
        rng.choice(MULTIBYTE) if rng.random() < ratio else rng.choice(ASCII) for _ in range(n)
    )


def gen_stream(rng, shape, budget):
    """Random output of one stream, about ``budget`` bytes, of the given shape."""
    if shape == "empty":
        return b""
    kinds = {
        "ascii": ["ascii"],
        "utf8": ["ascii", "utf8"],
        "multibyte": ["multibyte"],
        "binary": ["binary", "ascii"],
        "long_line": ["long"],
        "mixed": ["ascii", "utf8", "multibyte", "binary", "long", "crlf"],
    }[shape]
    parts = []
    total = 0
    while total < budget:
        left = budget - total
        kind = rng.choice(kinds)
        if kind == "ascii":
            piece = (_text(rng, rng.randint(0, min(60, left)), 0.0) + "\n").encode()
        elif kind == "utf8":
            piece = (_text(rng, rng.randint(0, max(1, min(40, left // 2))), 0.4) + "\n").encode()
        elif kind == "multibyte":
            piece = _text(rng, rng.randint(1, max(1, min(30, left // 3))), 1.0).encode()
            if rng.random() < 0.5:
                piece += b"\n"
        elif kind == "binary":
            piece = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, min(64, left))))
        elif kind == "crlf":
            piece = (_text(rng, rng.randint(0, min(20, left)), 0.2) + "\r\n").encode()
        else:  # one long line, no newline of its own
            piece = _text(rng, max(1, left // 2), 0.3).encode()
        parts.append(piece)
        total += len(piece)
    data = b"".join(parts)
    if data.endswith(b"\n") and rng.random() < 0.5:
        data = data[:-1]  # no newline at the very end
    return data


def gen_case(index, seed):
    """Case ``index`` of the property test: output, write plan and --max-bytes range."""
    rng = random.Random(seed)
    # Every shape comes up on stdout (rotation) and at random on stderr.
    shapes = (SHAPES[index % len(SHAPES)], rng.choice(SHAPES))
    hi = max(1, min(5000, int(math.exp(rng.uniform(0, math.log(5000))))))
    if "long_line" in shapes:
        hi = max(hi, rng.randint(1000, 5000))  # a long line, in a bounded number of reads
    lo = max(1, hi // 3)
    out = gen_stream(rng, shapes[0], rng.randint(1, 6 * hi))
    err = gen_stream(rng, shapes[1], rng.randint(1, 6 * hi))
    # Random write sizes (splitting characters on purpose), interleaved; a
    # few pauses, most of a second in all, so that reads race the writer.
    steps = []
    offs = {1: 0, 2: 0}
    sizes = {1: len(out), 2: len(err)}
    while offs[1] < sizes[1] or offs[2] < sizes[2]:
        fd = rng.choice([fd for fd in (1, 2) if offs[fd] < sizes[fd]])
        left = sizes[fd] - offs[fd]
        n = rng.randint(1, max(1, min(left, max(1, sizes[fd] // 4))))
        steps.append([fd, n, 0.0])
        offs[fd] += n
    if steps:
        for i in rng.sample(range(len(steps)), min(len(steps), 6)):
            steps[i][2] = round(rng.uniform(0.08, 0.25), 3)
    return {"seed": seed, "lo": lo, "hi": hi, "out": out, "err": err, "steps": steps}


class ExactBytesPropertyTests(ObserveCase):
    """Reading cursor by cursor, with any --max-bytes, gives back the logs exactly."""

    def _run_case(self, case):
        rng = random.Random(case["seed"] * 7 + 1)
        plan = os.path.join(self.tmp, "plan-%d.json" % case["seed"])
        with open(plan, "w") as f:
            json.dump(
                {"out": case["out"].hex(), "err": case["err"].hex(), "steps": case["steps"]}, f
            )
        r = self.ok("run", "--snapshot-after", "0", "--", PY, "-c", PLAN_WORKLOAD, plan)
        job = r["job_id"]
        cursor = r["cursor"]
        chunks = {"stdout": [], "stderr": []}  # (start, end, text)
        reads = running_reads = 0
        stalled = False
        validated = False
        while True:
            max_bytes = rng.randint(case["lo"], case["hi"])
            args = ["read", "--max-bytes", str(max_bytes), "--cursor", cursor]
            if stalled or rng.random() < 0.2:
                args += ["--wait-ms", "300"]
            j = self.ok(*(args + [job]))
            if not validated:
                self.assert_schema(j, "read")
                validated = True
            reads += 1
            if j["state"] == "running":
                running_reads += 1
            before, after = cursor_pos(cursor), cursor_pos(j["cursor"])
            for i, stream in enumerate(("stdout", "stderr")):
                self.assertGreaterEqual(after[i], before[i], j)
                # At most max_bytes, unless a single character is wider.
                self.assertLessEqual(after[i] - before[i], max(max_bytes, 4), (max_bytes, j))
                chunks[stream].append((before[i], after[i], j[stream], max_bytes))
            if j["state"] in TERMINAL and not j["more"]:
                self.assertIs(j["eof"], True, j)
            if j["eof"]:
                self.assertIs(j["more"], False, j)
                break
            progressed = after != before
            if j["state"] in TERMINAL:
                self.assertTrue(progressed, "a terminal job's read made no progress: %r" % j)
            stalled = not progressed
            cursor = j["cursor"]
            self.assertLess(reads, 1000, "read never reached eof")
        # One read past the end: nothing, and still eof.
        end = self.ok("read", "--cursor", j["cursor"], job)
        self.assertEqual((end["stdout"], end["stderr"], end["eof"]), ("", "", True))
        self.assertEqual(end["cursor"], j["cursor"])
        for stream, expected in (("stdout", case["out"]), ("stderr", case["err"])):
            log = self.log(job, stream)
            self.assertEqual(log, expected, "%s.log is not what the workload wrote" % stream)
            pieces = chunks[stream]
            self.assertEqual(pieces[-1][1], len(log), "the last cursor is not at the end")
            valid = is_utf8(log)
            for start, stop, text, max_bytes in pieces:
                where = "%s[%d:%d] (--max-bytes %d)" % (stream, start, stop, max_bytes)
                self.assertEqual(text, log[start:stop].decode("utf-8", "replace"), where)
                if splits_a_character(log, stop):
                    self.fail(
                        "a read split a character at %s: bytes %r | %r"
                        % (where, log[max(0, stop - 6) : stop], log[stop : stop + 6])
                    )
                if valid:
                    self.assertNotIn(REPLACEMENT, text, where)
            self.assertEqual(
                "".join(p[2] for p in pieces),
                log.decode("utf-8", "replace"),
                "the reads of %s do not add up to the log" % stream,
            )
        return reads, running_reads

    def test_reads_add_up_to_the_logs_exactly(self):
        cases = [gen_case(i, seed) for i, seed in enumerate(SEEDS)]
        # Four cases at a time: most of the cost is interpreter start-up and pauses.
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = [(c, pool.submit(self._run_case, c)) for c in cases]
            total_running = 0
            for case, fut in futures:
                with self.subTest(seed=case["seed"], hi=case["hi"]):
                    _reads, running = fut.result(timeout=300)
                    total_running += running
        # Some of the reads must have raced the writer.
        self.assertGreater(total_running, 0)

    def test_generator_covers_the_shapes(self):
        # The property test is only as good as its inputs.
        cases = [gen_case(i, seed) for i, seed in enumerate(SEEDS)]
        blobs = [c["out"] for c in cases] + [c["err"] for c in cases]
        self.assertTrue(any(not is_utf8(b) for b in blobs), "no invalid UTF-8")
        self.assertTrue(any(re.search(rb"[\xf0-\xf4]", b) for b in blobs), "no 4-byte chars")
        self.assertTrue(any(b and not b.endswith(b"\n") for b in blobs), "no missing newline")
        self.assertTrue(any(b"\n" not in b and len(b) > 1000 for b in blobs), "no long line")
        self.assertTrue(any(c["hi"] < 8 for c in cases), "no tiny --max-bytes")
        self.assertTrue(any(c["hi"] > 1000 for c in cases), "no large --max-bytes")


# ---- wait --match -------------------------------------------------------------


class WaitMatchTests(ObserveCase):
    def test_returns_as_soon_as_a_line_matches(self):
        code = (
            "import sys, time\n"
            "print('starting', flush=True)\n"
            "time.sleep(1.0)\n"
            "print('server READY on 8080', flush=True)\n"
            "time.sleep(0.5)\n"
            "print('after', flush=True)\n"
            "time.sleep(30)\n"
        )
        t0 = time.monotonic()
        job = self.py_job(code)
        w = self.okv("wait", "--match", "READY", "--timeout-ms", "15000", job)
        took = time.monotonic() - t0
        self.assertIs(w["matched"], True, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertEqual(w["job_id"], job)
        self.assertEqual(w["match"]["stream"], "stdout")
        self.assertEqual(w["match"]["line"], "server READY on 8080")
        self.assertGreaterEqual(took, 0.8)
        self.assertLess(took, 8.0)
        # The match's cursor is just past the matching line.
        self.assertEqual(
            cursor_pos(w["match"]["cursor"]), (len("starting\nserver READY on 8080\n"), 0)
        )
        j = self.okv("read", "--cursor", w["match"]["cursor"], "--wait-ms", "10000", job)
        self.assertEqual(j["stdout"], "after\n")
        self.kill_job(job)

    def test_stream_filter(self):
        job = self.bytes_job(b"nothing here\n", b"the needle\n")
        w = self.okv("wait", "--match", "needle", "--stream", "stdout", job)
        self.assertIs(w["matched"], False, w)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 0)
        self.assertIs(w["timed_out"], False)
        self.assertNotIn("match", w)
        for stream in ("stderr", "both"):
            w = self.okv("wait", "--match", "needle", "--stream", stream, job)
            self.assertIs(w["matched"], True, w)
            self.assertEqual(w["match"]["stream"], "stderr")
            self.assertEqual(w["match"]["line"], "the needle")
        w = self.okv("wait", "--match", "needle", job)  # default: both
        self.assertEqual(w["match"]["stream"], "stderr")

    def test_search_resumes_from_a_cursor(self):
        job = self.bytes_job(b"hit 1\nmiss\nhit 2\n")
        w1 = self.okv("wait", "--match", r"^hit \d", job)
        self.assertEqual(w1["match"]["line"], "hit 1")
        w2 = self.okv("wait", "--match", r"^hit \d", "--cursor", w1["match"]["cursor"], job)
        self.assertEqual(w2["match"]["line"], "hit 2")
        self.assertEqual(cursor_pos(w2["match"]["cursor"]), (17, 0))
        w3 = self.okv("wait", "--match", r"^hit \d", "--cursor", w2["match"]["cursor"], job)
        self.assertIs(w3["matched"], False, w3)
        self.assertEqual(w3["state"], "exited")

    def test_job_ends_without_a_match(self):
        job = self.py_job("import sys; print('no luck'); sys.exit(3)")
        w = self.okv("wait", "--match", "never", "--timeout-ms", "20000", job)
        self.assertIs(w["matched"], False, w)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 3)
        self.assertIs(w["timed_out"], False)

    def test_killed_job_without_a_match(self):
        job = self.start("sleep", "30")
        self.kill_job(job)
        w = self.okv("wait", "--match", "never", "--timeout-ms", "20000", job)
        self.assertIs(w["matched"], False, w)
        self.assertEqual(w["state"], "killed")
        self.assertEqual(w["signal"], "SIGKILL")

    def test_timeout(self):
        job = self.start("sleep", "30")
        w, took = self.timed("wait", "--match", "x", "--timeout-ms", "500", job)
        self.assertIs(w["timed_out"], True, w)
        self.assertIs(w["matched"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertGreaterEqual(took, 0.45)
        self.assertLess(took, 6.0)
        self.kill_job(job)

    def test_a_match_must_lie_within_one_line(self):
        job = self.bytes_job(b"foo\nbar\n")
        w = self.okv("wait", "--match", "foo\\nbar", job)
        self.assertIs(w["matched"], False, w)
        w = self.okv("wait", "--match", "o.b", job)
        self.assertIs(w["matched"], False, w)
        w = self.okv("wait", "--match", "^bar$", job)
        self.assertIs(w["matched"], True, w)
        self.assertEqual(w["match"]["line"], "bar")

    def test_last_line_without_newline_matches_at_the_end(self):
        job = self.bytes_job(b"first\nfinal words")
        w = self.okv("wait", "--match", "final", job)
        self.assertIs(w["matched"], True, w)
        self.assertEqual(w["match"]["line"], "final words")

    def test_usage_errors(self):
        a = self.bytes_job(b"x\n")
        b = self.bytes_job(b"y\n")
        bad = [
            ("wait", "--match", "x", a, b),
            ("wait", "--ready", a, b),
            ("wait", "--cursor", "c1.0.0", "--match", "x", a, b),
            ("wait", "--any", "--match", "x", a),
            ("wait", "--cursor", "c1.0.0", a),
            ("wait", "--stream", "stdout", a),
            ("wait", "--match", "(unclosed", a),
            ("wait", "--match", "x", "--stream", "neither", a),
            ("wait", "--match", "x", "--cursor", "nonsense", a),
        ]
        for argv in bad:
            with self.subTest(argv=argv):
                self.fail_with("usage_error", *argv, exit_code=2)


# ---- wait on several jobs -----------------------------------------------------------


class WaitManyTests(ObserveCase):
    def test_wait_any_over_three_jobs_of_different_lengths(self):
        code = "import sys, time; time.sleep(float(sys.argv[1])); sys.exit(int(sys.argv[2]))"
        long_ = self.py_job(code, "4.0", "2")
        mid = self.py_job(code, "2.5", "1")
        short = self.py_job(code, "0.3", "0")
        t0 = time.monotonic()
        w = self.okv("wait", "--any", "--timeout-ms", "20000", long_, mid, short)
        took = time.monotonic() - t0
        self.assertEqual(w["first_job_id"], short, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertNotIn("job_id", w)
        self.assertEqual([e["job_id"] for e in w["jobs"]], [long_, mid, short])
        by_id = {e["job_id"]: e for e in w["jobs"]}
        self.assertEqual(by_id[short]["state"], "exited")
        self.assertEqual(by_id[short]["exit_code"], 0)
        self.assertEqual(by_id[long_]["state"], "running", w)
        self.assertNotIn("exit_code", by_id[long_])
        self.assertLess(took, 3.0, "wait --any did not return with the first job")
        # Without --any: all of them.
        w = self.okv("wait", "--timeout-ms", "20000", long_, mid, short)
        took = time.monotonic() - t0
        self.assertIs(w["timed_out"], False, w)
        self.assertNotIn("first_job_id", w)
        self.assertEqual(
            [(e["job_id"], e["state"], e.get("exit_code")) for e in w["jobs"]],
            [(long_, "exited", 2), (mid, "exited", 1), (short, "exited", 0)],
        )
        self.assertGreaterEqual(took, 2.0)

    def test_timeout_with_several_jobs(self):
        a = self.start("sleep", "30")
        b = self.start("sleep", "30")
        w, took = self.timed("wait", "--timeout-ms", "400", a, b)
        self.assertIs(w["timed_out"], True, w)
        self.assertEqual([e["state"] for e in w["jobs"]], ["running", "running"])
        self.assertGreaterEqual(took, 0.35)
        self.assertLess(took, 6.0)
        w = self.okv("wait", "--any", "--timeout-ms", "300", a, b)
        self.assertIs(w["timed_out"], True, w)
        self.assertIsNone(w["first_job_id"], w)
        # A killed job: its entry carries the signal.
        self.kill_job(b)
        w = self.okv("wait", "--any", "--timeout-ms", "20000", a, b)
        self.assertEqual(w["first_job_id"], b, w)
        entry = w["jobs"][1]
        self.assertEqual((entry["state"], entry["signal"]), ("killed", "SIGKILL"))
        self.kill_job(a)

    def test_one_id_keeps_the_single_job_response(self):
        job = self.bytes_job(b"x\n")
        w = self.okv("wait", job)
        self.assertEqual(w["job_id"], job)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 0)
        self.assertNotIn("jobs", w)
        self.assertNotIn("first_job_id", w)

    def test_unknown_id_among_several(self):
        job = self.bytes_job(b"x\n")
        self.fail_with("job_not_found", "wait", job, "0123456789ABCDEFGHJKMNPQRS")


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


class ReadinessTests(ObserveCase):
    def test_ready_match_dev_server(self):
        r = self.okv("run", "--ready-match", "listening", "--", PY, "-c", DEV_SERVER)
        job = r["job_id"]
        self.assertIs(r["ready"], True, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 800, r)
        self.assertLessEqual(r["waited_ms"], 5000, r)
        self.assertIn("listening", r["snapshot"]["stdout_tail"])
        s = self.okv("status", job)
        self.assertIs(s["ready"], True, s)
        self.assertRegex(s["ready_at"], RFC3339_RE)
        started = parse_rfc3339(s["started_at"])
        self.assertGreaterEqual(parse_rfc3339(s["ready_at"]) - started, 0.7, s)
        w, took = self.timed("wait", "--ready", "--timeout-ms", "10000", job)
        self.assertIs(w["ready"], True, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertLess(took, 5.0)
        entry = self.okv("list")["jobs"][0]
        self.assertEqual(entry["job_id"], job)
        self.assertIs(entry["ready"], True)
        self.kill_job(job)

    def test_wait_ready_blocks_until_ready(self):
        job = self.py_job(DEV_SERVER, opts=("--ready-match", "listening"))
        self.assertIs(self.okv("status", job)["ready"], False)
        w, took = self.timed("wait", "--ready", "--timeout-ms", "15000", job)
        self.assertIs(w["ready"], True, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertGreaterEqual(took, 0.5)
        self.assertLess(took, 8.0)
        self.kill_job(job)

    def test_ready_port(self):
        port = free_port()
        r = self.okv("run", "--ready-port", str(port), "--", PY, "-c", PORT_SERVER, str(port))
        job = r["job_id"]
        self.assertIs(r["ready"], True, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 800, r)
        self.assertLessEqual(r["waited_ms"], 5000, r)
        s = self.okv("status", job)
        self.assertIs(s["ready"], True, s)
        if LINUX:
            self.assertIn(port, s["ports"], s)
        self.kill_job(job)

    def test_job_ends_before_it_is_ready(self):
        r, took = self.timed(
            "run", "--ready-match", "never", "--", "/bin/sh", "-c", "echo hi; exit 3"
        )
        self.assertIs(r["ready"], False, r)
        self.assertEqual(r["state"], "exited")
        self.assertEqual(r["exit_code"], 3)
        self.assertLess(r["waited_ms"], 5000)
        w = self.okv("wait", "--ready", "--timeout-ms", "10000", r["job_id"])
        self.assertIs(w["ready"], False, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "exited")
        s = self.okv("status", r["job_id"])
        self.assertIs(s["ready"], False, s)
        self.assertIsNone(s["ready_at"])

    def test_snapshot_after_passes_before_ready(self):
        r = self.okv(
            "run", "--ready-match", "never", "--snapshot-after", "700", "--", "sleep", "30"
        )
        job = r["job_id"]
        self.assertIs(r["ready"], False, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 600, r)
        self.assertLess(r["waited_ms"], 5000, r)
        w = self.okv("wait", "--ready", "--timeout-ms", "300", job)
        self.assertIs(w["timed_out"], True, w)
        self.assertIs(w["ready"], False, w)
        self.kill_job(job)

    def test_no_condition_no_ready_fields(self):
        r = self.okv("run", "--", "/bin/sh", "-c", "echo hi")
        self.assertNotIn("ready", r)
        s = self.okv("status", r["job_id"])
        self.assertNotIn("ready", s)
        self.assertNotIn("ready_at", s)
        entry = self.okv("list")["jobs"][0]
        self.assertIn("ready", entry)
        self.assertIsNone(entry["ready"])

    def test_bad_readiness_options_are_usage_errors(self):
        for argv in (
            ("--ready-match", "(unclosed"),
            ("--ready-port", "0"),
            ("--ready-port", "65536"),
            ("--ready-port", "http"),
        ):
            with self.subTest(argv=argv):
                self.fail_with("usage_error", "run", *(argv + ("--", "true")), exit_code=2)
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))


# ---- status and list -------------------------------------------------------------------


class StatusTests(ObserveCase):
    def test_output_sizes_last_output_and_idle(self):
        job = self.py_job(
            "import sys, time\n"
            "sys.stdout.write('12345\\n'); sys.stdout.flush()\n"
            "sys.stderr.write('abc'); sys.stderr.flush()\n"
            "time.sleep(30)\n"
        )

        def sized():
            s = self.ok("status", job)
            return s if (s["stdout_bytes"], s["stderr_bytes"]) == (6, 3) else None

        self.assertTrue(wait_until(sized, timeout=15))
        time.sleep(1.0)
        s = self.okv("status", job)
        self.assertEqual(s["state"], "running")
        self.assertEqual((s["stdout_bytes"], s["stderr_bytes"]), (6, 3))
        self.assertRegex(s["last_output_at"], RFC3339_RE)
        self.assertGreaterEqual(s["idle_ms"], 900, s)
        self.assertLess(s["idle_ms"], 30000, s)
        age = time.time() - parse_rfc3339(s["last_output_at"])
        self.assertGreaterEqual(age, 0.8, s)
        self.assertLess(age, 30, s)
        self.kill_job(job)
        s = self.okv("status", job)
        self.assertNotIn("idle_ms", s)

    def test_idle_ms_stays_low_while_output_flows(self):
        job = self.py_job(
            "import time\nfor i in range(600):\n    print(i, flush=True)\n    time.sleep(0.05)\n"
        )
        self.assertTrue(wait_until(lambda: self.ok("status", job)["stdout_bytes"] > 0))
        time.sleep(1.0)
        s = self.okv("status", job)
        self.assertEqual(s["state"], "running")
        self.assertLess(s["idle_ms"], 900, s)
        self.kill_job(job)

    def test_silent_job(self):
        job = self.start("sleep", "30")
        s = self.okv("status", job)
        self.assertIsNone(s["last_output_at"])
        self.assertEqual((s["stdout_bytes"], s["stderr_bytes"]), (0, 0))
        self.assertGreaterEqual(s["idle_ms"], 0)
        self.kill_job(job)

    def test_rusage_once_terminal(self):
        code = (
            "import time\n"
            "b = b'x' * (64 << 20)\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.4:\n"
            "    pass\n"
            "print(len(b))\n"
        )
        job = self.py_job(code)
        s = self.okv("status", job)
        if s["state"] == "running":
            self.assertNotIn("rusage", s)
        self.wait_job(job)
        s = self.okv("status", job)
        self.assertEqual(s["state"], "exited")
        ru = s["rusage"]
        self.assertGreaterEqual(ru["max_rss_kb"], 60 * 1024, ru)
        self.assertLess(ru["max_rss_kb"], 16 << 20, ru)  # in kB, not bytes
        self.assertGreaterEqual(ru["user_ms"] + ru["sys_ms"], 300, ru)
        self.assertLess(ru["user_ms"] + ru["sys_ms"], 60000, ru)
        self.assertEqual(s["stdout_bytes"], len(self.log(job, "stdout")))
        self.assertNotIn("idle_ms", s)

    def test_descendants_and_ports(self):
        port = free_port()
        pidfile = os.path.join(self.tmp, "child.pid")
        script = '"%s" -c "$1" %d & echo $! > "%s"; wait' % (PY, port, pidfile)
        job = self.start("/bin/sh", "-c", script, "sh", PORT_SERVER)
        self.assertTrue(wait_until(lambda: read_text(pidfile).strip()))
        child = int(read_text(pidfile))
        s = self.okv("status", job)
        self.assertIn(child, s["descendants"], s)
        self.assertNotIn(s["pid"], s["descendants"], s)
        if LINUX:
            self.assertTrue(
                wait_until(lambda: port in self.ok("status", job)["ports"], timeout=15),
                "port %d never showed up in status" % port,
            )
        self.kill_job(job)
        self.assertTrue(wait_until(lambda: not pid_alive(child)))
        self.assertTrue(
            wait_until(lambda: not self.ok("status", job).get("descendants"), timeout=10)
        )
        s = self.okv("status", job)
        self.assertEqual(s["state"], "killed")
        if LINUX:
            self.assertEqual(s["ports"], [])

    @unittest.skipUnless(LINUX, "ports are reported on Linux")
    def test_ports_of_the_main_process(self):
        port = free_port()
        job = self.py_job(PORT_SERVER, str(port))
        self.assertTrue(
            wait_until(lambda: self.ok("status", job)["ports"] == [port], timeout=15),
            self.ok("status", job),
        )
        self.assert_schema(self.ok("status", job), "status")
        self.kill_job(job)


class ListTests(ObserveCase):
    def test_running_filter_command_and_ready(self):
        done = self.start("/bin/sh", "-c", "echo x")
        self.wait_job(done)
        running = self.start("sleep", "30")
        ready = self.py_job(DEV_SERVER, opts=("--ready-match", "listening"))
        j = self.okv("list", "--running")
        self.assertEqual({e["job_id"] for e in j["jobs"]}, {running, ready})
        by_id = {e["job_id"]: e for e in j["jobs"]}
        self.assertEqual(by_id[running]["command"], ["sleep", "30"])
        self.assertIsNone(by_id[running]["ready"])
        self.assertIn(by_id[ready]["ready"], (False, True))
        self.assertEqual(
            [e["job_id"] for e in self.okv("list", "--state", "running")["jobs"]],
            [e["job_id"] for e in j["jobs"]],
        )
        every = self.okv("list")
        self.assertIn(done, [e["job_id"] for e in every["jobs"]])
        entry = [e for e in every["jobs"] if e["job_id"] == done][0]
        self.assertEqual(entry["command"], ["/bin/sh", "-c", "echo x"])
        self.assertIsNone(entry["ready"])
        self.okv("wait", "--ready", "--timeout-ms", "15000", ready)
        entry = [e for e in self.okv("list", "--running")["jobs"] if e["job_id"] == ready][0]
        self.assertIs(entry["ready"], True)
        self.kill_job(running)
        self.kill_job(ready)
        self.assertEqual(self.okv("list", "--running")["jobs"], [])

    def test_running_conflicts_with_another_state(self):
        self.fail_with("usage_error", "list", "--running", "--state", "exited", exit_code=2)


# ---- delete and gc -----------------------------------------------------------------------


class DeleteTests(ObserveCase):
    def test_delete_terminal_jobs(self):
        a = self.bytes_job(b"a" * 1000)
        b = self.bytes_job(b"b" * 10)
        size_a = sum(e.stat().st_size for e in os.scandir(self.job_dir(a)))
        d = self.okv("delete", a, b[:12])
        self.assertEqual(d["deleted"], [a, b])
        self.assertEqual(d["refused"], [])
        self.assertIs(d["dry_run"], False)
        self.assertGreaterEqual(d["freed_bytes"], size_a)
        self.assertGreaterEqual(d["freed_bytes"], 1010)
        self.assertFalse(os.path.exists(self.job_dir(a)))
        self.assertFalse(os.path.exists(self.job_dir(b)))
        self.fail_with("job_not_found", "status", a)
        self.assertEqual([n for n in os.listdir(self.root)], [])

    def test_running_job_is_refused_with_a_reason(self):
        done = self.bytes_job(b"x\n")
        running = self.start("sleep", "30")
        d = self.okv("delete", running, done)
        self.assertEqual(d["deleted"], [done])
        self.assertEqual(len(d["refused"]), 1, d)
        self.assertEqual(d["refused"][0]["job_id"], running)
        self.assertIn("running", d["refused"][0]["reason"])
        self.assertTrue(os.path.isdir(self.job_dir(running)))
        self.assertEqual(self.okv("status", running)["state"], "running")
        self.kill_job(running)

    def test_dry_run_deletes_nothing(self):
        job = self.bytes_job(b"z" * 5000)
        size = sum(e.stat().st_size for e in os.scandir(self.job_dir(job)))
        d = self.okv("delete", "--dry-run", job)
        self.assertIs(d["dry_run"], True)
        self.assertEqual(d["deleted"], [job])
        self.assertEqual(d["freed_bytes"], size)
        self.assertTrue(os.path.isdir(self.job_dir(job)))
        self.assertEqual(self.okv("read", job)["stdout"], "z" * 5000)

    def test_unknown_id_deletes_nothing(self):
        job = self.bytes_job(b"x\n")
        self.fail_with("job_not_found", "delete", job, "0123456789ABCDEFGHJKMNPQRS")
        self.assertTrue(os.path.isdir(self.job_dir(job)))
        self.fail_with("job_not_found", "delete", "../..")
        self.assertTrue(os.path.isdir(self.job_dir(job)))


class GcTests(ObserveCase):
    def make_jobs(self, n):
        return [self.bytes_job(b"%d\n" % i) for i in range(n)]

    def test_default_age_is_seven_days(self):
        old, recent, fresh = self.make_jobs(3)
        self.age_job(old, 8 * 86400)
        self.age_job(recent, 6 * 86400)
        g = self.okv("gc")
        self.assertEqual(g["deleted"], 1, g)
        self.assertEqual(g["job_ids"], [old])
        self.assertGreater(g["freed_bytes"], 0)
        self.assertIs(g["dry_run"], False)
        self.assertFalse(os.path.exists(self.job_dir(old)))
        self.assertTrue(os.path.isdir(self.job_dir(recent)))
        self.assertTrue(os.path.isdir(self.job_dir(fresh)))

    def test_older_than_units(self):
        jobs = self.make_jobs(4)
        ages = [3 * 3600, 30 * 60, 90, 5]  # 3 h, 30 min, 90 s, 5 s
        for job, age in zip(jobs, ages):
            self.age_job(job, age)
        g = self.okv("gc", "--older-than", "1h", "--dry-run")
        self.assertEqual(g["job_ids"], [jobs[0]])
        self.assertIs(g["dry_run"], True)
        g = self.okv("gc", "--older-than", "20m", "--dry-run")
        self.assertEqual(sorted(g["job_ids"]), sorted(jobs[:2]))
        g = self.okv("gc", "--older-than", "60s", "--dry-run")
        self.assertEqual(sorted(g["job_ids"]), sorted(jobs[:3]))
        g = self.okv("gc", "--older-than", "2d", "--dry-run")
        self.assertEqual(g["job_ids"], [])
        for job in jobs:
            self.assertTrue(os.path.isdir(self.job_dir(job)))
        g = self.okv("gc", "--older-than", "20m")
        self.assertEqual(g["deleted"], 2)
        self.assertEqual(sorted(os.listdir(self.root)), sorted(jobs[2:]))

    def test_max_jobs_keeps_the_newest(self):
        jobs = self.make_jobs(4)  # oldest first
        g = self.okv("gc", "--max-jobs", "2")
        self.assertEqual(sorted(g["job_ids"]), sorted(jobs[:2]))
        self.assertEqual(g["deleted"], 2)
        self.assertEqual(sorted(os.listdir(self.root)), sorted(jobs[2:]))

    def test_dry_run(self):
        jobs = self.make_jobs(2)
        for job in jobs:
            self.age_job(job, 30 * 86400)
        sizes = sum(e.stat().st_size for job in jobs for e in os.scandir(self.job_dir(job)))
        g = self.okv("gc", "--dry-run")
        self.assertIs(g["dry_run"], True)
        self.assertEqual(g["deleted"], 2)
        self.assertEqual(sorted(g["job_ids"]), sorted(jobs))
        self.assertEqual(g["freed_bytes"], sizes)
        for job in jobs:
            self.assertTrue(os.path.isdir(self.job_dir(job)))

    def test_never_touches_running_jobs_or_unreadable_dirs(self):
        done = self.bytes_job(b"x\n")
        running = self.start("sleep", "30")
        # A running job whose state claims an ancient finish must still stay.
        self.write_state(running, finished_at=rfc3339(time.time() - 90 * 86400))
        broken = os.path.join(self.root, "01ARZ3NDEKTSV4RRFFQ69G5FAV")
        os.mkdir(broken, 0o700)
        with open(os.path.join(broken, "meta.json"), "w") as f:
            f.write("{not json")
        self.age_job(done, 30 * 86400)
        g = self.okv("gc", "--max-jobs", "0", "--older-than", "0s")
        self.assertEqual(g["job_ids"], [done], g)
        self.assertGreaterEqual(g["skipped"], 1, g)
        self.assertTrue(os.path.isdir(self.job_dir(running)))
        self.assertTrue(os.path.isdir(broken))
        self.assertEqual(self.okv("status", running)["state"], "running")
        self.kill_job(running)

    def test_missing_root(self):
        g = self.okv("gc")
        self.assertEqual((g["deleted"], g["job_ids"], g["freed_bytes"]), (0, [], 0))

    def test_bad_values_are_usage_errors(self):
        for argv in (
            ("--older-than", "7x"),
            ("--older-than", "-1d"),
            ("--max-jobs", "-1"),
            ("--max-jobs", "many"),
        ):
            with self.subTest(argv=argv):
                self.fail_with("usage_error", "gc", *argv, exit_code=2)


# ---- the schema declares the new responses and fields -----------------------------------


class SchemaTests(ObserveCase):
    def test_new_responses_and_fields_are_declared(self):
        expect = {
            "read": (
                ["job_id", "state", "stdout", "stderr", "cursor", "more", "eof"],
                ["job_id", "state", "stdout", "stderr", "cursor", "more", "eof"],
            ),
            "wait": (
                ["timed_out"],
                ["cursor", "ready", "matched", "match", "jobs", "first_job_id", "timed_out"],
            ),
            "run": ([], ["cursor", "ready"]),
            "tail": ([], ["cursor"]),
            "status": (
                [],
                [
                    "last_output_at",
                    "idle_ms",
                    "descendants",
                    "ports",
                    "rusage",
                    "stdout_bytes",
                    "stderr_bytes",
                    "ready",
                    "ready_at",
                ],
            ),
            "delete": (
                ["deleted", "refused", "freed_bytes", "dry_run"],
                ["deleted", "refused", "freed_bytes", "dry_run"],
            ),
            "gc": (
                ["deleted", "job_ids", "skipped", "freed_bytes", "dry_run"],
                ["deleted", "job_ids", "skipped", "freed_bytes", "dry_run"],
            ),
        }
        for name, (required, props) in expect.items():
            with self.subTest(type=name):
                d = find_def(self.schema, name)
                self.assertIsNotNone(d, "no definition for %s" % name)
                for key in required:
                    self.assertIn(key, d.get("required", []))
                for key in props:
                    self.assertIn(key, d.get("properties", {}))
        entry = find_def(self.schema, "list")["properties"]["jobs"]["items"]
        self.assertIn("ready", entry["properties"])
        self.assertIn("command", entry["required"])

    def test_schema_rejects_broken_new_responses(self):
        bad = [
            {"schema_version": "0.1", "ok": True, "type": "read", "job_id": "X", "state": "exited"},
            {
                "schema_version": "0.1",
                "ok": True,
                "type": "read",
                "job_id": "X",
                "state": "exited",
                "stdout": "",
                "stderr": "",
                "cursor": "c1.0.0",
                "more": "no",
                "eof": True,
            },
            {"schema_version": "0.1", "ok": True, "type": "gc", "deleted": [], "job_ids": []},
            {
                "schema_version": "0.1",
                "ok": True,
                "type": "delete",
                "deleted": [],
                "refused": [{"job_id": "X"}],
                "freed_bytes": 0,
                "dry_run": False,
            },
            {
                "schema_version": "0.1",
                "ok": True,
                "type": "wait",
                "timed_out": False,
                "jobs": [{"job_id": "X"}],
            },
            {
                "schema_version": "0.1",
                "ok": True,
                "type": "status",
                "job_id": "X",
                "state": "exited",
                "started_at": "2026-01-01T00:00:00.000Z",
                "rusage": {"max_rss_kb": 1},
            },
        ]
        for obj in bad:
            with self.subTest(obj=obj):
                self.assertTrue(self.validate(obj, self.schema), "accepted: %r" % obj)
                self.assertTrue(_schema_check.errors(obj, self.schema))


if __name__ == "__main__":
    unittest.main()
