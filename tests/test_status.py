"""``status`` and ``tail``."""

import json
import os
import time
import unittest

from tests._jobs import (
    JobsTestCase,
    LINUX,
    PORT_SERVER,
    RFC3339_RE,
    SH,
    free_port,
    parse_rfc3339,
    read_text,
)
from tests._procs import pid_alive, wait_until
from tests._util import PY


# --------------------------------------------------------------------------
# status / tail
# --------------------------------------------------------------------------


class StatusAndTailTests(JobsTestCase):
    def test_status_running(self):
        jid = self.start_bg("sleep", "30")
        s = self.ok("status", jid)
        self.assertEqual(s["schema_version"], "0.1")
        self.assertEqual(s["type"], "status")
        self.assertEqual(s["job_id"], jid)
        self.assertEqual(s["state"], "running")
        self.assertTimestamp(s["started_at"])
        self.assertNotIn("finished_at", [k for k, v in s.items() if v is not None])
        self.assertNotIn("exit_code", [k for k, v in s.items() if v is not None])
        pid, _ = self.job_pids(jid)
        s = self.ok("status", jid)
        self.assertEqual(s.get("pid"), pid)

    def test_status_terminal(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "exit 7")
        jid = j["job_id"]
        s = self.ok("status", jid)
        self.assertEqual(s["job_id"], jid)
        self.assertEqual(s["state"], "exited")
        self.assertEqual(s["exit_code"], 7)
        self.assertIsNone(s.get("signal"))
        self.assertTimestamp(s["started_at"])
        self.assertTimestamp(s["finished_at"])
        self.assertIsInstance(s["duration_ms"], int)
        self.assertIsInstance(s["pid"], int)
        self.assertIsNone(s.get("failure"))

    def test_status_by_prefix(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", "true")
        s = self.ok("status", j["job_id"][:20])
        self.assertEqual(s["job_id"], j["job_id"])

    def test_status_unknown_job(self):
        self.fail_with("job_not_found", "status", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
        self.fail_with("job_not_found", "status", "../x")

    def test_tail(self):
        code = (
            "import sys\nfor i in range(20): print('out%02d' % i)\n"
            "for i in range(4): sys.stderr.write('err%d\\n' % i)"
        )
        j = self.ok("run", "--snapshot-after", "5000", "--", PY, "-c", code)
        jid = j["job_id"]
        self.assertEqual(j["state"], "exited", j)
        t = self.ok("tail", "--tail-lines", "5", jid)
        self.assertEqual(t["type"], "tail")
        self.assertEqual(t["job_id"], jid)
        self.assertEqual(t["stdout_log_path"], os.path.join(self.job_dir(jid), "stdout.log"))
        self.assertEqual(t["stderr_log_path"], os.path.join(self.job_dir(jid), "stderr.log"))
        self.assertEqual(t["stdout_tail"].splitlines(), ["out%02d" % i for i in range(15, 20)])
        self.assertEqual(t["stderr_tail"].splitlines(), ["err%d" % i for i in range(4)])
        self.assertIs(t["truncated"], True)
        self.assertEqual(t["encoding"], "utf-8-lossy")
        self.assertEqual(t["stdout_observed_bytes"], 20 * 6)
        self.assertEqual(t["stderr_observed_bytes"], 4 * 5)
        self.assertEqual(t["stdout_included_bytes"], len(t["stdout_tail"].encode("utf-8")))
        self.assertEqual(t["stderr_included_bytes"], len(t["stderr_tail"].encode("utf-8")))

        t = self.ok("tail", "--max-bytes", "8", jid)
        self.assertLessEqual(len(t["stdout_tail"].encode("utf-8")), 8)
        self.assertTrue(t["stdout_tail"])
        full = "".join("out%02d\n" % i for i in range(20))
        self.assertTrue(full.rstrip("\n").endswith(t["stdout_tail"].rstrip("\n")), t)
        self.assertIs(t["truncated"], True)

        t = self.ok("tail", "--tail-lines", "100", "--max-bytes", "1M", jid)
        self.assertIs(t["truncated"], False)
        self.assertEqual(len(t["stdout_tail"].splitlines()), 20)

    def test_tail_running_job(self):
        jid = self.start_bg(SH, "-c", "echo one; echo two; sleep 30")
        self.wait_for_output(jid, "two")
        t = self.ok("tail", jid)
        self.assertEqual(t["stdout_tail"].splitlines(), ["one", "two"])
        self.assertEqual(t["stderr_tail"], "")


# ---- status and list -------------------------------------------------------------------


class StatusTests(JobsTestCase):
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


class EndReasonTests(JobsTestCase):
    def test_each_end_reason_in_every_answer(self):
        event_file = os.path.join(self.tmp, "events.jsonl")
        cases = (
            (("--",), ("true",), "exited", "exit", True, 0),
            (("--",), ("sh", "-c", "exit 3"), "exited", "exit", False, 3),
            (("--",), ("sh", "-c", "kill -TERM $$"), "killed", "signal", False, None),
            (("--timeout", "300ms", "--"), ("sleep", "30"), "killed", "timeout", False, None),
        )
        for opts, cmd, state, reason, success, code in cases:
            with self.subTest(reason=reason, cmd=cmd):
                r = self.ok("run", "--wait", "--notify-file", event_file, *opts, *cmd)
                jid = r["job_id"]
                for what, answer in (
                    ("run", r),
                    ("status", self.ok("status", jid)),
                    ("wait", self.ok("wait", jid)),
                    ("read", self.ok("read", jid)),
                    ("list", [e for e in self.ok("list")["jobs"] if e["job_id"] == jid][0]),
                ):
                    self.assertEqual(answer["state"], state, (what, answer))
                    self.assertEqual(answer["end_reason"], reason, (what, answer))
                    self.assertIs(answer["success"], success, (what, answer))
                    self.assertEqual(answer.get("exit_code"), code, (what, answer))
                    # wait's own timed_out is about the wait, not the job.
                    if what == "wait":
                        self.assertIs(answer["timed_out"], False)
                read = self.ok("read", jid)
                self.assertTrue(read["eof"], read)
                self.assertIn("finished_at", read)
        # the completion events, in order
        self.assertTrue(wait_until(lambda: _lines(event_file) == 4, 10))
        with open(event_file) as f:
            events = [json.loads(line) for line in f]
        self.assertEqual(
            [(e["end_reason"], e["success"]) for e in events],
            [("exit", True), ("exit", False), ("signal", False), ("timeout", False)],
        )

    def test_wait_on_several_jobs_gives_each_its_reason(self):
        a = self.ok("run", "--wait", "--", "true")["job_id"]
        b = self.ok("run", "--wait", "--", "sh", "-c", "exit 2")["job_id"]
        jobs = {e["job_id"]: e for e in self.ok("wait", a, b)["jobs"]}
        self.assertEqual((jobs[a]["end_reason"], jobs[a]["success"]), ("exit", True))
        self.assertEqual((jobs[b]["end_reason"], jobs[b]["success"]), ("exit", False))

    def test_kill_is_its_own_reason(self):
        jid = self.start_bg("sleep", "30")
        self.ok("kill", jid)
        j = self.ok("wait", "--timeout-ms", "10000", jid)
        self.assertEqual((j["state"], j["end_reason"], j["success"]), ("killed", "kill", False))

    def test_running_job_has_no_end_reason(self):
        jid = self.start_bg("sleep", "30")
        for answer in (self.ok("status", jid), self.ok("read", jid)):
            self.assertNotIn("end_reason", answer)
            self.assertNotIn("success", answer)

    def test_read_carries_the_result_only_at_eof(self):
        r = self.ok("run", "--wait", "--", "sh", "-c", "echo hi; exit 4")
        first = self.ok("read", "--max-bytes", "1", r["job_id"])
        self.assertFalse(first["eof"])
        self.assertNotIn("exit_code", first)
        last = self.ok("read", "--cursor", first["cursor"], r["job_id"])
        self.assertTrue(last["eof"], last)
        self.assertEqual(
            (last["exit_code"], last["end_reason"], last["success"]), (4, "exit", False)
        )


def _lines(path):
    try:
        with open(path) as f:
            return len(f.readlines())
    except OSError:
        return 0


if __name__ == "__main__":
    unittest.main()
