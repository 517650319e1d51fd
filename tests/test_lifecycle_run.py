"""Lifecycle and guards: create/start/restart, leases, limits (subprocess tests)."""

import json
import os
import subprocess
import sys
import threading
import time
import unittest

from tests._jobs import JobsTestCase, LINUX
from tests._util import CLI, PY, REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402

# Allocates 50 MiB a second, and touches it, until it is stopped.
ALLOC_50M_PER_S = (
    "import time\nheld = []\nwhile True:\n    held.append(bytearray(50 << 20))\n    time.sleep(1)\n"
)


class LeaseTests(JobsTestCase):
    def test_lease_without_renewal_ends_the_job_at_about_its_length(self):
        t0 = time.monotonic()
        jid = self.start_bg("sleep", "30", opts=("--lease", "2s"))
        st = self.ok("status", jid)
        self.assertEqual(st["lease_ms"], 2000)
        self.assertTimestamp(st["lease_expires_at"])
        w = self.wait_job(jid, 20000)
        elapsed = time.monotonic() - t0
        self.assertEqual(w["end_reason"], "lease_expired", w)
        self.assertEqual(w["state"], "killed")
        self.assertFalse(w["success"])
        self.assertGreaterEqual(w["duration_ms"], 1900, w)
        self.assertLess(elapsed, 6.0)
        self.assertIsNone(self.ok("status", jid)["lease_expires_at"])

    def test_renewals_every_second_keep_it_alive_for_ten_seconds(self):
        jid = self.start_bg("sleep", "60", opts=("--lease", "2s"))
        t0 = time.monotonic()
        # renew, and the three commands that renew in passing
        ways = (
            ("renew", jid),
            ("status", "--renew", jid),
            ("read", "--renew", jid),
            ("wait", "--renew", "--timeout-ms", "1", jid),
        )
        i = 0
        while time.monotonic() - t0 < 10.0:
            self.ok(*ways[i % len(ways)])
            i += 1
            time.sleep(1.0)
        self.assertEqual(self.ok("status", jid)["state"], "running")
        w = self.wait_job(jid, 20000)
        self.assertEqual(w["end_reason"], "lease_expired")
        self.assertGreaterEqual(w["duration_ms"], 10000)

    def test_renew_answer_and_a_longer_lease(self):
        jid = self.start_bg("sleep", "30", opts=("--lease", "2s"))
        r = self.ok("renew", "--lease", "1m", jid)
        self.assertEqual(r["lease_ms"], 60000)
        self.assertEqual(r["state"], "running")
        time.sleep(2.5)
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_bad_leases(self):
        self.fail_with("invalid_argument", "run", "--lease", "0", "--", "true")
        self.assertFalse(os.path.exists(self.root) and os.listdir(self.root))
        jid = self.start_bg("sleep", "30")
        self.fail_with("invalid_state", "renew", jid)
        self.assertFalse(self.ok("status", "--renew", jid)["renewed"])  # in passing: no error
        leased = self.start_bg("sleep", "30", opts=("--lease", "5s"))
        self.fail_with("invalid_argument", "renew", "--lease", "0", leased)
        done = self.start("true", opts=("--lease", "5s"))
        self.wait_job(done)
        self.fail_with("invalid_state", "renew", done)


@unittest.skipUnless(LINUX, "the /proc limits are Linux only")
class LimitTests(JobsTestCase):
    def test_memory_limit_ends_a_growing_process_before_300m(self):
        events = os.path.join(self.tmp, "events.jsonl")
        jid = self.start_bg(
            PY, "-c", ALLOC_50M_PER_S, opts=("--limit-mem", "200M", "--notify-file", events)
        )
        w = self.wait_job(jid, 30000)
        self.assertEqual(w["end_reason"], "memory_limit", w)
        st = self.ok("status", jid)
        limit = st["limit"]
        self.assertEqual(limit["name"], "memory")
        self.assertEqual(limit["value"], 200 << 20)
        self.assertGreater(limit["measured"], 200 << 20)
        self.assertLess(limit["measured"], 300 << 20)
        self.assertLess(st["memory_peak_bytes"], 300 << 20)
        self.assertTrue(agent_exec._wait_lock(os.path.join(self.job_dir(jid), "meta.json"), 5))
        for _ in range(100):
            if os.path.exists(events) and os.path.getsize(events):
                break
            time.sleep(0.05)
        with open(events) as f:
            event = json.loads(f.readline())
        self.assertEqual(event["end_reason"], "memory_limit")
        self.assertEqual(event["limit"], limit)

    def test_cpu_limit(self):
        jid = self.start_bg(PY, "-c", "while True: pass", opts=("--limit-cpu", "300ms"))
        w = self.wait_job(jid, 30000)
        self.assertEqual(w["end_reason"], "cpu_limit", w)
        limit = self.ok("status", jid)["limit"]
        self.assertEqual((limit["name"], limit["value"]), ("cpu", 300))
        self.assertGreater(limit["measured"], 300)

    def test_procs_limit(self):
        script = "for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; wait"
        jid = self.start_bg("/bin/sh", "-c", script, opts=("--limit-procs", "4"))
        w = self.wait_job(jid, 30000)
        self.assertEqual(w["end_reason"], "procs_limit", w)
        limit = self.ok("status", jid)["limit"]
        self.assertEqual((limit["name"], limit["value"]), ("procs", 4))
        self.assertGreater(limit["measured"], 4)

    def test_limit_files_and_nice_reach_the_workload(self):
        r = self.ok(
            "run",
            "--wait",
            "--limit-files",
            "17",
            "--nice",
            "3",
            "--",
            "/bin/sh",
            "-c",
            "ulimit -n; nice",
        )
        self.assertEqual(r["final_snapshot"]["stdout_tail"].split(), ["17", "3"])
        self.assertEqual(r["end_reason"], "exit")

    def test_bad_limits(self):
        self.fail_with("invalid_argument", "run", "--limit-mem", "1000k", "--", "true")
        self.fail_with("invalid_argument", "run", "--limit-cpu", "0", "--", "true")
        self.fail_with("invalid_argument", "run", "--limit-procs", "0", "--", "true")
        self.fail_with("usage_error", "run", "--nice", "20", "--", "true", exit_code=2)
        self.fail_with("invalid_argument", "run", "--max-output-action", "kill", "--", "true")


class OutputLimitTests(JobsTestCase):
    def test_max_output_kill_ends_the_job(self):
        jid = self.start_bg(
            "/bin/sh",
            "-c",
            "yes hello",
            opts=("--max-output", "64k", "--max-output-action", "kill"),
        )
        w = self.wait_job(jid, 20000)
        self.assertEqual(w["end_reason"], "output_limit", w)
        limit = self.ok("status", jid)["limit"]
        self.assertEqual((limit["name"], limit["value"]), ("output", 65536))
        self.assertGreater(limit["measured"], 65536)

    def test_max_output_default_still_truncates(self):
        r = self.ok("run", "--wait", "--max-output", "1k", "--", PY, "-c", "print('x' * 5000)")
        self.assertEqual(r["end_reason"], "exit")
        self.assertEqual(r["exit_code"], 0)


class CreateStartTests(JobsTestCase):
    def create(self, *cmd, opts=()):
        j = self.ok("create", *opts, "--", *cmd)
        self.assertEqual(j["state"], "created")
        self.addCleanup(self.kill_job, j["job_id"])
        return j["job_id"]

    def test_created_job_answers_then_starts_like_run(self):
        jid = self.create("/bin/sh", "-c", "echo hi; sleep 1", opts=("--timeout", "20s"))
        st = self.ok("status", jid)
        self.assertEqual(st["state"], "created")
        self.assertEqual(st["attempt"], 1)
        self.assertEqual(
            [j["job_id"] for j in self.ok("list", "--state", "created")["jobs"]], [jid]
        )
        self.fail_with("invalid_state", "kill", jid)
        r = self.ok("read", jid)
        self.assertEqual((r["stdout"], r["eof"], r["cursor"]), ("", False, "c1.0.0"))
        w = self.ok("wait", "--timeout-ms", "300", jid)
        self.assertEqual((w["state"], w["timed_out"]), ("created", True))
        self.assertFalse(os.path.exists(os.path.join(self.job_dir(jid), "stdout.log")))
        # a wait that began before the start returns the end of the run
        waiter = subprocess.Popen(
            CLI + ["wait", "--timeout-ms", "20000", jid],
            stdout=subprocess.PIPE,
            env=self.env(),
            universal_newlines=True,
        )
        time.sleep(0.5)
        s = self.ok("start", "--snapshot-after", "500", jid)
        self.assertEqual(s["job_id"], jid)
        self.assertEqual(s["attempt"], 1)
        self.assertIn("hi", s["snapshot"]["stdout_tail"])
        self.fail_with("invalid_state", "start", jid)
        out, _ = waiter.communicate(timeout=30)
        w = json.loads(out)
        self.assertEqual((w["state"], w["exit_code"], w["timed_out"]), ("exited", 0, False))
        self.assertEqual(self.ok("status", jid)["stdout_bytes"], 3)

    def test_start_wait_exit_code_and_env_not_stored(self):
        jid = self.create("/bin/sh", "-c", 'echo "[$A][$B]"; exit 4', opts=("--env", "A=secret-a"))
        with open(os.path.join(self.job_dir(jid), "meta.json")) as f:
            self.assertNotIn("secret-a", f.read())
        r = self.cli("start", "--wait", "--exit-code", "--env", "B=b", jid)
        self.assertEqual(r.code, 4, r)
        self.assertEqual(r.json["env_missing"], ["A"])
        self.assertIn("never stored", r.json["note"])
        self.assertEqual(r.json["final_snapshot"]["stdout_tail"], "[][b]\n")

    def test_delete_a_created_job(self):
        jid = self.create("true")
        self.ok("delete", jid)
        self.fail_with("job_not_found", "status", jid)


class RestartTests(JobsTestCase):
    def test_restart_keeps_the_id_and_the_previous_result(self):
        envfile = os.path.join(self.tmp, "env")
        with open(envfile, "w") as f:
            f.write("V=one\n")
        jid = self.start("/bin/sh", "-c", 'echo "v=$V"; exit 3', opts=("--env-file", envfile))
        first = self.wait_job(jid)
        with open(envfile, "w") as f:
            f.write("V=two\n")
        r = self.ok("restart", "--wait", jid)
        self.assertEqual(r["job_id"], jid)
        self.assertEqual(r["attempt"], 2)
        self.assertEqual(r["final_snapshot"]["stdout_tail"], "v=two\n")  # the env file, re-read
        prev = r["previous"]
        self.assertEqual((prev["attempt"], prev["exit_code"]), (1, 3))
        self.assertEqual(prev["finished_at"], first["finished_at"])
        st = self.ok("status", jid)
        self.assertEqual((st["attempt"], st["previous"]), (2, prev))
        kept = os.path.join(self.job_dir(jid), "attempts", "1")
        for name in ("state.json", "stdout.log", "stderr.log", "full.log"):
            self.assertTrue(os.path.exists(os.path.join(kept, name)), name)
        with open(os.path.join(kept, "stdout.log")) as f:
            self.assertEqual(f.read(), "v=one\n")

    def test_restart_ends_a_running_job_and_a_wait_on_it_gets_its_end(self):
        script = 'trap "exit 7" TERM; echo up; while :; do sleep 0.1; done'
        jid = self.start_bg("/bin/sh", "-c", script)
        time.sleep(0.5)
        waiter = subprocess.Popen(
            CLI + ["wait", "--timeout-ms", "20000", jid],
            stdout=subprocess.PIPE,
            env=self.env(),
            universal_newlines=True,
        )
        time.sleep(0.3)
        r = self.ok("restart", "--kill-after", "5s", "--snapshot-after", "0", jid)
        self.assertEqual(r["state"], "running")
        self.assertEqual((r["attempt"], r["previous"]["end_reason"]), (2, "kill"))
        out, _ = waiter.communicate(timeout=30)
        w = json.loads(out)
        self.assertEqual((w["state"], w["exit_code"]), ("killed", 7), w)
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_two_restarts_at_once_give_two_attempts(self):
        jid = self.start_bg("sleep", "30")
        answers = []

        def restart():
            answers.append(self.ok("restart", "--snapshot-after", "0", jid))

        threads = [threading.Thread(target=restart) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(sorted(a["attempt"] for a in answers), [2, 3])
        st = self.ok("status", jid)
        self.assertEqual((st["state"], st["attempt"]), ("running", 3))

    def test_restart_a_server_that_holds_its_ready_port(self):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = (
            "import http.server as h; h.HTTPServer(('127.0.0.1', %d), h.BaseHTTPRequestHandler)"
            % port
        )
        r = self.ok("run", "--ready-port", str(port), "--", PY, "-c", server + ".serve_forever()")
        self.addCleanup(self.kill_job, r["job_id"])
        self.assertTrue(r["ready"], r)
        again = self.ok("restart", r["job_id"])
        self.assertEqual((again["attempt"], again["ready"], again["state"]), (2, True, "running"))

    def test_restart_signal_and_kill_after(self):
        script = 'trap "" TERM; while :; do sleep 0.1; done'
        jid = self.start_bg("/bin/sh", "-c", script)
        time.sleep(0.3)
        t0 = time.monotonic()
        r = self.ok("restart", "--kill-after", "500ms", "--snapshot-after", "0", jid)
        self.assertLess(time.monotonic() - t0, 10)
        self.assertEqual(r["previous"]["signal"], "SIGKILL")
        # With time to die of it: the job's own --kill-after is 0 (KILL at once).
        r = self.ok(
            "restart", "--signal", "INT", "--kill-after", "5s", "--snapshot-after", "0", jid
        )
        self.assertEqual(r["previous"]["signal"], "SIGINT")


class RenewInPassingTests(JobsTestCase):
    def test_renew_in_passing_never_fails_the_call(self):
        plain = self.start_bg("sleep", "30")
        self.assertEqual(self.ok("status", "--renew", plain)["renewed"], False)
        self.assertEqual(self.ok("read", "--renew", plain)["renewed"], False)
        w = self.ok("wait", "--renew", "--timeout-ms", "1", plain)
        self.assertEqual((w["timed_out"], w["renewed"]), (True, False))
        self.assertNotIn("renewed", self.ok("status", plain))
        self.fail_with("invalid_state", "renew", plain)  # renew itself still refuses
        leased = self.start_bg("sleep", "30", opts=("--lease", "20s"))
        self.assertEqual(self.ok("status", "--renew", leased)["renewed"], True)
        self.ok("kill", leased)
        self.wait_job(leased)
        st = self.ok("status", "--renew", leased)  # ended: answered as without --renew
        self.assertEqual((st["state"], st["renewed"]), ("killed", False))
        r = self.ok("read", "--renew", leased)
        self.assertEqual((r["eof"], r["renewed"]), (True, False))
        self.assertEqual(self.ok("wait", "--renew", leased)["renewed"], False)

    def test_a_blocking_wait_renew_keeps_renewing(self):
        jid = self.start_bg("sleep", "30", opts=("--lease", "1500ms"))
        t0 = time.monotonic()
        w = self.ok("wait", "--renew", "--timeout-ms", "4500", jid)
        self.assertGreaterEqual(time.monotonic() - t0, 4.0)
        self.assertEqual((w["state"], w["timed_out"], w["renewed"]), ("running", True, True), w)
        self.assertEqual(self.ok("status", jid)["state"], "running")


class AttemptCursorTests(JobsTestCase):
    def test_a_cursor_of_an_earlier_attempt_reads_the_new_attempt(self):
        flag = os.path.join(self.tmp, "short")
        script = 'if [ -e "$1" ]; then echo short; else seq 1 100; fi'
        jid = self.start("/bin/sh", "-c", script, "sh", flag)
        self.wait_job(jid)
        first = self.ok("read", jid)
        self.assertTrue(first["stdout"].endswith("100\n"))
        self.assertNotIn("cursor_reset", first)
        old = first["cursor"]
        with open(flag, "w"):
            pass
        self.ok("restart", "--wait", jid)
        r = self.ok("read", "--cursor", old, jid)
        self.assertEqual((r["stdout"], r["cursor_reset"]), ("short\n", True), r)
        self.assertNotIn("cursor_reset", self.ok("read", "--cursor", r["cursor"], jid))
        w = self.ok("wait", "--match", "short", "--cursor", old, "--timeout-ms", "5000", jid)
        self.assertEqual((w["matched"], w["cursor_reset"]), (True, True), w)
        self.assertEqual(w["match"]["line"], "short")


class AttemptAnswerTests(JobsTestCase):
    def test_create_start_restart_answer_port_and_status_names_env_not_stored(self):
        c = self.ok("create", "--port", "auto", "--env", "A=secret", "--", "sleep", "30")
        jid = c["job_id"]
        self.addCleanup(self.kill_job, jid)
        self.assertIsInstance(c["port"], int)
        st = self.ok("status", jid)
        self.assertIsNone(st["started_at"])
        self.assertIsNone(self.ok("list")["jobs"][0]["started_at"])
        self.assertIn("created", self.cli("list", "-H").stdout)
        s = self.ok("start", "--snapshot-after", "0", jid)
        self.assertEqual(s["port"], c["port"])
        self.assertIn("never stored", s["note"])
        st = self.ok("status", jid)
        self.assertEqual(st["env_not_stored"], ["A"])
        self.assertTimestamp(st["started_at"])
        r = self.ok("restart", "--snapshot-after", "0", "--env", "A=again", jid)
        self.assertEqual((r["port"], r["attempt"]), (c["port"], 2))
        self.assertNotIn("env_not_stored", self.ok("status", self.start_bg("true")))

    def test_completion_events_carry_the_attempt(self):
        events = os.path.join(self.tmp, "events.jsonl")
        jid = self.start("true", opts=("--notify-file", events))
        self.wait_job(jid)
        self.ok("restart", "--wait", jid)

        def lines():
            try:
                with open(events) as f:
                    return [json.loads(line) for line in f if line.strip()]
            except OSError:
                return []

        for _ in range(200):
            if len(lines()) >= 2:
                break
            time.sleep(0.05)
        self.assertEqual([e["attempt"] for e in lines()], [1, 2])


class PureTests(unittest.TestCase):
    def test_niceness(self):
        self.assertEqual(agent_exec._niceness("-5"), -5)
        self.assertEqual(agent_exec._niceness("19"), 19)
        for bad in ("20", "-21", "x", ""):
            with self.assertRaises(ValueError):
                agent_exec._niceness(bad)

    @unittest.skipUnless(LINUX, "/proc")
    def test_tree_usage_of_this_process(self):
        rss, cpu, count = agent_exec._tree_usage([os.getpid(), 999999999])
        self.assertGreater(rss, 1 << 20)
        self.assertGreaterEqual(cpu, 0.0)
        self.assertEqual(count, 1)

    def test_end_reasons_and_states(self):
        for reason in ("lease_expired", "memory_limit", "cpu_limit", "output_limit"):
            self.assertIn(reason, agent_exec.END_REASONS)
        self.assertIn("created", agent_exec.STATES)
        self.assertNotIn("created", agent_exec.TERMINAL_STATES)

    def test_state_document_of_a_job_a_limit_ended(self):
        facts = agent_exec._JobFacts()
        facts.wait_status = 15  # died of SIGTERM
        facts.kill_signal = 15
        facts.end_cause = "memory_limit"
        facts.limit = {"name": "memory", "value": 1 << 20, "measured": 2 << 20}
        facts.memory_peak = 2 << 20
        facts.attempt = 3
        doc = agent_exec._state_document("X", "killed", facts, now="2026-01-01T00:00:00.000Z")
        self.assertEqual(doc["result"]["end_reason"], "memory_limit")
        self.assertEqual((doc["limit"], doc["memory_peak_bytes"]), (facts.limit, 2 << 20))
        self.assertEqual(doc["attempt"], 3)
        self.assertEqual(agent_exec._end_state(facts), "killed")
        plain = agent_exec._state_document("X", "running", agent_exec._JobFacts())
        for key in ("attempt", "limit", "lease_ms", "memory_peak_bytes", "cpu_ms"):
            self.assertNotIn(key, plain)

    def test_create_takes_runs_options_but_the_observing_ones(self):
        run = {o.name for o in agent_exec.COMMANDS["run"].opts}
        create = {o.name for o in agent_exec.COMMANDS["create"].opts}
        self.assertEqual(run - create, set(agent_exec._OBSERVE_OPTS))


if __name__ == "__main__":
    unittest.main()
