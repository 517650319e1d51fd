"""``wait``: for the end, for a match in the output, for many jobs, and its
race with the output.
"""

import os
import sys
import tempfile
import time
import unittest

from tests._jobs import JobsTestCase, SH, cursor_pos, free_port
from tests._util import REPO, SCRIPT

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402


# --------------------------------------------------------------------------
# wait
# --------------------------------------------------------------------------


class WaitTests(JobsTestCase):
    def test_wait_returns_promptly(self):
        jid = self.start_bg("sleep", "0.5")
        t0 = time.monotonic()
        w = self.ok("wait", "--timeout-ms", "20000", jid)
        took = time.monotonic() - t0
        self.assertLess(took, 5.0)
        self.assertEqual(w["type"], "wait")
        self.assertEqual(w["job_id"], jid)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 0)
        self.assertIs(w["timed_out"], False)

    def test_wait_timeout(self):
        jid = self.start_bg("sleep", "30")
        t0 = time.monotonic()
        r = self.cli("wait", "--timeout-ms", "300", jid)
        took = time.monotonic() - t0
        self.assertEqual(r.code, 0, r)
        self.assertIs(r.json["ok"], True)
        self.assertIs(r.json["timed_out"], True)
        self.assertEqual(r.json["state"], "running")
        self.assertEqual(r.json["job_id"], jid)
        self.assertGreaterEqual(took, 0.25)
        self.assertLess(took, 5.0)

    def test_wait_accepts_units(self):
        jid = self.start_bg("sleep", "30")
        w = self.ok("wait", "--timeout-ms", "200ms", "--poll-ms", "50", jid)
        self.assertIs(w["timed_out"], True)

    def test_wait_on_finished_job(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "exit 7")
        self.assertEqual(j["state"], "exited", j)
        w = self.ok("wait", j["job_id"])
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 7)
        self.assertIs(w["timed_out"], False)


class WaitOutputRaceTests(unittest.TestCase):
    """_wait_output compares the logs with sizes taken before they were read."""

    class _NeverEnds:
        def wait(self, timeout):
            time.sleep(timeout)
            return False

    def test_bytes_written_between_read_and_wait_wake_it(self):
        if os.path.dirname(SCRIPT) not in sys.path:
            sys.path.insert(0, os.path.dirname(SCRIPT))

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


# ---- wait --match -------------------------------------------------------------


class WaitMatchTests(JobsTestCase):
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


class WaitManyTests(JobsTestCase):
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


class WaitReadyMatchTests(JobsTestCase):
    def test_ready_first(self):
        jid = self.start_bg("sh", "-c", "echo UP; sleep 30", opts=("--ready-match", "^UP$"))
        t0 = time.monotonic()
        j = self.ok("wait", "--ready", "--match", "NEVER", "--timeout-ms", "20000", jid)
        self.assertLess(time.monotonic() - t0, 10, j)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (True, False, False), j)

    def test_match_first(self):
        port = free_port()
        jid = self.start_bg(
            "sh", "-c", "sleep 0.2; echo hello; sleep 30", opts=("--ready-port", str(port))
        )
        j = self.ok("wait", "--ready", "--match", "hel+o", "--timeout-ms", "20000", jid)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (False, True, False), j)
        self.assertEqual(j["match"]["line"], "hello")

    def test_neither_before_the_timeout(self):
        port = free_port()
        jid = self.start_bg("sleep", "30", opts=("--ready-port", str(port)))
        j = self.ok("wait", "--ready", "--match", "x", "--timeout-ms", "300", jid)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (False, False, True), j)


if __name__ == "__main__":
    unittest.main()
