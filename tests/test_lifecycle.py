"""Tests for a job's life after `run`: status, tail, wait, kill, timeouts,
detachment from the caller, a lost supervisor, and completion events.

Every test drives the real CLI as a subprocess against a private jobs root
(see tests/_util.py).
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import unittest

from tests._util import CALL_TIMEOUT, PY, SCRIPT, CLITestCase, pid_alive, wait_until

ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
TERMINAL = ("exited", "killed", "failed")
SH = "/bin/sh"
LINUX = sys.platform.startswith("linux")


def read_text(path):
    with open(path) as f:
        return f.read()


def open_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


class LifecycleTestCase(CLITestCase):
    def wait_for_output(self, job_id, text, timeout=10.0):
        path = os.path.join(self.job_dir(job_id), "stdout.log")

        def has():
            try:
                with open(path, "rb") as f:
                    return text.encode() in f.read()
            except OSError:
                return False

        self.assertTrue(wait_until(has, timeout), "job never printed %r" % text)


# --------------------------------------------------------------------------
# status / tail
# --------------------------------------------------------------------------


class StatusAndTailTests(LifecycleTestCase):
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


# --------------------------------------------------------------------------
# wait
# --------------------------------------------------------------------------


class WaitTests(LifecycleTestCase):
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


# --------------------------------------------------------------------------
# kill and timeouts
# --------------------------------------------------------------------------


class KillTests(LifecycleTestCase):
    def test_kill_default_term(self):
        jid = self.start_bg("sleep", "30")
        pid, _ = self.job_pids(jid)
        k = self.ok("kill", jid)
        self.assertEqual(k["type"], "kill")
        self.assertEqual(k["job_id"], jid)
        self.assertEqual(k["signal"], "SIGTERM")
        self.assertIn("state", k)
        w = self.wait_job(jid, 10000)
        self.assertEqual(w["state"], "killed")
        self.assertEqual(w["signal"], "SIGTERM")
        st = self.read_state(jid)
        self.assertEqual(st["job"]["status"], "killed")
        self.assertEqual(st["result"]["signal"], "SIGTERM")
        self.assertTrue(wait_until(lambda: not pid_alive(pid), 5))

    def test_kill_signal_forms(self):
        forms = [
            ("INT", "SIGINT"),
            ("KILL", "SIGKILL"),
            ("SIGUSR1", "SIGUSR1"),
            ("9", "SIGKILL"),
            ("SIGHUP", "SIGHUP"),
            ("quit", "SIGQUIT"),
        ]
        jobs = []
        for given, name in forms:
            jobs.append((self.start_bg("sleep", "30"), given, name))
        for jid, _, _ in jobs:
            self.job_pids(jid)
        for jid, given, name in jobs:
            k = self.ok("kill", "--signal", given, jid)
            self.assertEqual(k["signal"], name, (given, k))
        for jid, given, name in jobs:
            w = self.wait_job(jid, 10000)
            self.assertEqual(w["state"], "killed", (given, w))
            self.assertEqual(w["signal"], name, (given, w))

    def test_kill_bad_signal_is_usage_error(self):
        jid = self.start_bg("sleep", "30")
        for bad in ("BOGUS", "SIGNOPE", "-3", ""):
            self.fail_with("usage_error", "kill", "--signal", bad, jid, exit_code=2)
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_kill_finished_job_changes_nothing(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "exit 3")
        jid = j["job_id"]
        self.assertEqual(j["state"], "exited")
        before = self.read_state(jid)
        k = self.ok("kill", jid)
        self.assertEqual(k["job_id"], jid)
        self.assertEqual(k["state"], "exited")
        k = self.ok("kill", "--signal", "KILL", jid)
        time.sleep(0.3)
        after = self.read_state(jid)
        self.assertEqual(after["job"]["status"], "exited")
        self.assertEqual(after["result"], before["result"])
        self.assertEqual(after["finished_at"], before["finished_at"])
        s = self.ok("status", jid)
        self.assertEqual((s["state"], s["exit_code"]), ("exited", 3))
        self.assertIsNone(s.get("signal"))

    def test_kill_unknown_job(self):
        self.fail_with("job_not_found", "kill", "01ARZ3NDEKTSV4RRFFQ69G5FAV")

    def test_timeout_sends_term(self):
        t0 = time.monotonic()
        jid = self.start_bg("sleep", "30", opts=("--timeout", "500"))
        w = self.wait_job(jid, 15000)
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w["signal"], "SIGTERM")
        st = self.read_state(jid)
        self.assertGreaterEqual(st["result"]["duration_ms"], 400)

    def test_timeout_kill_after(self):
        # 1000 ms rather than 300 so the trap is surely installed on a slow box
        jid = self.start_bg(
            SH,
            "-c",
            'trap "" TERM; echo ready; sleep 30',
            opts=("--timeout", "1000", "--kill-after", "300"),
        )
        t0 = time.monotonic()
        w = self.wait_job(jid, 15000)
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w["signal"], "SIGKILL", w)

    def test_timeout_with_units(self):
        jid = self.start_bg("sleep", "30", opts=("--timeout", "1s", "--kill-after", "100ms"))
        w = self.wait_job(jid, 15000)
        self.assertEqual(w["state"], "killed", w)

    def test_exit_code_recorded(self):
        jid = self.start(SH, "-c", "exit 7")
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(w["exit_code"], 7)
        self.assertIsNone(w.get("signal"))
        self.assertEqual(self.read_state(jid)["result"]["exit_code"], 7)

    def test_trap_term_and_exit_zero_is_killed(self):
        jid = self.start_bg(SH, "-c", 'trap "exit 0" TERM; echo ready; sleep 30 & wait')
        self.wait_for_output(jid, "ready")
        self.ok("kill", jid)
        w = self.wait_job(jid, 10000)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w.get("exit_code"), 0, w)
        self.assertEqual(w.get("signal"), "SIGTERM", w)

    def test_self_signalled_job_is_killed(self):
        jid = self.start(SH, "-c", "kill -TERM $$")
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w["signal"], "SIGTERM", w)

    def test_kill_reaches_the_whole_group(self):
        pidfile = os.path.join(self.tmp, "child.pid")
        jid = self.start_bg(SH, "-c", 'sleep 30 & echo $! > "$0"; wait', pidfile)
        self.assertTrue(
            wait_until(lambda: os.path.exists(pidfile) and read_text(pidfile).strip(), 10)
        )
        child = int(read_text(pidfile).strip())
        self.addCleanup(self._kill_quietly, child)
        self.assertTrue(pid_alive(child))
        self.ok("kill", jid)
        self.wait_job(jid, 10000)
        self.assertTrue(wait_until(lambda: not pid_alive(child), 5), "grandchild survived kill")

    def test_descendant_outliving_main_does_not_keep_job_running(self):
        pidfile = os.path.join(self.tmp, "bg.pid")
        t0 = time.monotonic()
        jid = self.start(SH, "-c", '(sleep 1.5; echo late) & echo $! > "$0"; echo early', pidfile)
        w = self.wait_job(jid, 20000)
        self.assertLess(time.monotonic() - t0, 1.4 + 3.0)
        self.assertEqual((w["state"], w["exit_code"]), ("exited", 0))
        # the supervisor drains what the descendant writes after the main process ended
        path = os.path.join(self.job_dir(jid), "stdout.log")
        self.assertTrue(wait_until(lambda: b"late" in open_bytes(path), 10), open_bytes(path))
        self.assertEqual(open_bytes(path), b"early\nlate\n")
        self.assertEqual(self.read_state(jid)["job"]["status"], "exited")

    def test_kill_reaches_descendants_outliving_main(self):
        pidfile = os.path.join(self.tmp, "bg.pid")
        jid = self.start(SH, "-c", 'sleep 30 & echo $! > "$0"', pidfile)
        w = self.wait_job(jid, 20000)
        self.assertEqual(w["state"], "exited")
        self.assertTrue(
            wait_until(lambda: os.path.exists(pidfile) and read_text(pidfile).strip(), 10)
        )
        child = int(read_text(pidfile).strip())
        self.addCleanup(self._kill_quietly, child)
        self.assertTrue(pid_alive(child))
        before = self.read_state(jid)
        k = self.ok("kill", jid)
        self.assertEqual(k["signal"], "SIGTERM")
        self.assertTrue(
            wait_until(lambda: not pid_alive(child), 5), "outliving descendant not signalled"
        )
        after = self.read_state(jid)
        self.assertEqual(after["job"]["status"], "exited")
        self.assertEqual(after["result"], before["result"])

    def _kill_quietly(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --------------------------------------------------------------------------
# Detachment from the caller
# --------------------------------------------------------------------------


class DetachmentTests(LifecycleTestCase):
    def _signal_caller_group(self, sig):
        p = subprocess.Popen(
            [PY, SCRIPT, "run", "--snapshot-after", "2000", "--", "sleep", "3"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tmp,
            start_new_session=True,
        )
        try:

            def job_started():
                if not os.path.isdir(self.root):
                    return None
                for name in os.listdir(self.root):
                    if ULID_RE.match(name) and os.path.exists(
                        os.path.join(self.root, name, "state.json")
                    ):
                        return name
                return None

            jid = wait_until(job_started, 15)
            self.assertTrue(jid, "no job appeared")
            self.addCleanup(self.kill_job, jid)
            time.sleep(0.3)
            pgid = p.pid
            os.killpg(pgid, sig)
            p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        pid, sup = self.job_pids(jid)
        # the supervisor and the workload live in sessions of their own
        if pid_alive(pid):
            self.assertNotEqual(os.getsid(pid), pgid)
            self.assertEqual(os.getpgid(pid), pid, "the workload should lead its own process group")
        if isinstance(sup, int) and pid_alive(sup):
            self.assertNotEqual(os.getsid(sup), pgid)
        w = self.wait_job(jid, 20000)
        self.assertEqual(w["state"], "exited", w)
        self.assertEqual(w["exit_code"], 0)

    def test_sigint_to_callers_group(self):
        self._signal_caller_group(signal.SIGINT)

    def test_sighup_to_callers_group(self):
        self._signal_caller_group(signal.SIGHUP)

    def test_caller_pipes_not_held(self):
        t0 = time.monotonic()
        proc = subprocess.run(
            [PY, SCRIPT, "run", "--snapshot-after", "0", "--", "sleep", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env(),
            cwd=self.tmp,
            timeout=30,
        )
        took = time.monotonic() - t0
        self.assertEqual(proc.returncode, 0, proc)
        j = json.loads(proc.stdout.decode())
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertLess(took, 10.0)
        self.assertEqual(j["state"], "running")

    def test_workload_stdin_is_dev_null(self):
        r, w = os.pipe()
        try:
            t0 = time.monotonic()
            # the caller's stdin is a pipe that stays open: cat must not read it
            res = self.cli(
                "run", "--snapshot-after", "8000", "--", SH, "-c", "cat; echo cat-done", stdin=r
            )
            took = time.monotonic() - t0
        finally:
            os.close(w)
            os.close(r)
        self.assertEqual(res.code, 0, res)
        j = res.json
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["snapshot"]["stdout_tail"].rstrip("\n"), "cat-done")
        self.assertLess(took, 6.0)

    @unittest.skipUnless(LINUX, "needs /proc")
    def test_workload_inherits_no_caller_fd(self):
        r, w = os.pipe()
        high = 57
        os.dup2(w, high)
        os.close(w)
        try:
            proc = subprocess.run(
                [PY, SCRIPT, "run", "--snapshot-after", "5000", "--", "ls", "/proc/self/fd"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(),
                cwd=self.tmp,
                timeout=CALL_TIMEOUT,
                pass_fds=(high,),
            )
        finally:
            os.close(high)
        try:
            self.assertEqual(proc.returncode, 0, proc)
            j = json.loads(proc.stdout.decode())
            self.assertEqual(j["state"], "exited", j)
            with open(j["stdout_log_path"]) as f:
                fds = sorted(int(x) for x in f.read().split())
            self.assertNotIn(high, fds)
            self.assertTrue({0, 1, 2}.issubset(fds), fds)
            extra = [fd for fd in fds if fd > 2]
            self.assertLessEqual(len(extra), 1, "workload inherited fds: %r" % fds)
        finally:
            os.close(r)

    def run_ignoring_signals(self, *args):
        """``agent_exec.py <args>`` from a caller that ignores SIGHUP, SIGINT,
        SIGQUIT and SIGTERM and blocks SIGUSR1 (nohup ignores SIGHUP, a
        script's background job SIGINT and SIGQUIT); return the JSON."""

        def caller_setup():
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

        return self.ok(*args, preexec_fn=caller_setup)

    @unittest.skipUnless(LINUX, "needs /proc")
    def test_workload_signals_and_stdin(self):
        # The workload starts with every signal at its default action and none
        # blocked, whatever its caller ignored or blocked (and Python itself
        # ignores SIGPIPE and SIGXFSZ), and with /dev/null on stdin.
        # grep reads its own status, exec'd straight from the shell: a shell
        # that is waiting for a child shows a mask of its own making.
        script = (
            "readlink /proc/$$/fd/0; yes | head -n 1; "
            "exec grep -E '^Sig(Blk|Ign):' /proc/self/status"
        )
        j = self.run_ignoring_signals("run", "--wait", "--", "sh", "-c", script)
        self.assertEqual(j["state"], "exited", j)
        with open(j["stdout_log_path"]) as f:
            stdin, first, blocked, ignored = f.read().split("\n")[:4]
        self.assertEqual(stdin, "/dev/null")
        self.assertEqual(first, "y")
        self.assertTrue(blocked.startswith("SigBlk:"), blocked)
        self.assertEqual(int(blocked.split()[1], 16), 0, blocked)
        self.assertTrue(ignored.startswith("SigIgn:"), ignored)
        self.assertEqual(int(ignored.split()[1], 16), 0, ignored)

    def test_kill_hup_ends_a_job_started_under_nohup(self):
        j = self.run_ignoring_signals("run", "--snapshot-after", "0", "--", "sleep", "30")
        self.addCleanup(self.kill_job, j["job_id"])
        self.ok("kill", "--signal", "HUP", j["job_id"])
        w = self.wait_job(j["job_id"], 10000)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w.get("signal"), "SIGHUP", w)

    def test_running_job_holds_no_caller_fd(self):
        # While the job runs, neither the supervisor nor the workload keeps the
        # caller's descriptor: once the caller's copies are closed, the pipe is at EOF.
        r, w = os.pipe()
        high = 58
        os.dup2(w, high)
        os.close(w)
        try:
            proc = subprocess.run(
                [PY, SCRIPT, "run", "--snapshot-after", "0", "--", "sleep", "30"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(),
                cwd=self.tmp,
                timeout=CALL_TIMEOUT,
                pass_fds=(high,),
            )
        finally:
            os.close(high)
        try:
            self.assertEqual(proc.returncode, 0, proc)
            jid = json.loads(proc.stdout.decode())["job_id"]
            self.addCleanup(self.kill_job, jid)
            ready, _, _ = select.select([r], [], [], 5)
            self.assertTrue(ready, "the caller's pipe is still held open by the job")
            self.assertEqual(os.read(r, 1), b"")
            self.assertEqual(self.ok("status", jid)["state"], "running")
        finally:
            os.close(r)


# --------------------------------------------------------------------------
# A supervisor that dies
# --------------------------------------------------------------------------


class SupervisorLostTests(LifecycleTestCase):
    def test_supervisor_sigkill(self):
        jid = self.start_bg("sleep", "30")
        pid, sup = self.job_pids(jid)
        self.assertIsInstance(sup, int)
        self.addCleanup(self._kill_group, pid)
        waiter = subprocess.Popen(
            [PY, SCRIPT, "wait", "--timeout-ms", "30000", jid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tmp,
        )
        try:
            time.sleep(0.5)
            self.assertIsNone(waiter.poll(), "wait returned before the job ended")
            t0 = time.monotonic()
            os.kill(sup, signal.SIGKILL)

            def status_failed():
                s = self.cli("status", jid).json
                return s if s and s.get("state") == "failed" else None

            s = wait_until(status_failed, 10, 0.2)
            self.assertTrue(s, "status never reported the lost supervisor")
            self.assertLess(time.monotonic() - t0, 8.0)
            self.assertEqual(s["failure"]["code"], "supervisor_lost")
            out, err = waiter.communicate(timeout=15)
            w = json.loads(out.decode())
            self.assertTrue(w["ok"], w)
            self.assertEqual(w["state"], "failed", w)
            self.assertIs(w.get("timed_out"), False, w)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
        lst = self.ok("list", "--all")
        mine = [x for x in lst["jobs"] if x["job_id"] == jid]
        self.assertEqual(len(mine), 1, lst)
        self.assertEqual(mine[0]["state"], "failed")
        w = self.ok("wait", "--timeout-ms", "5000", jid)
        self.assertEqual(w["state"], "failed")

    def _kill_group(self, pid):
        for fn in (os.killpg, os.kill):
            try:
                fn(pid, signal.SIGKILL)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Completion events
# --------------------------------------------------------------------------


EVENT_KEYS = (
    "schema_version",
    "event_type",
    "job_id",
    "state",
    "command",
    "cwd",
    "started_at",
    "finished_at",
    "duration_ms",
    "stdout_log_path",
    "stderr_log_path",
)


class CompletionEventsTests(LifecycleTestCase):
    def completion_event(self, jid, n_sinks=1, timeout=15):
        path = os.path.join(self.job_dir(jid), "completion_event.json")

        def ready():
            try:
                ev = self.read_json(path)
            except (OSError, ValueError):
                return None
            if len(ev.get("delivery_results") or []) >= n_sinks:
                return ev
            return None

        ev = wait_until(ready, timeout, 0.05)
        self.assertTrue(ev, "completion_event.json never got %d delivery results" % n_sinks)
        return ev

    def check_event(self, ev, jid, state="exited", exit_code=0):
        for key in EVENT_KEYS:
            self.assertIn(key, ev)
        self.assertEqual(ev["schema_version"], "0.1")
        self.assertEqual(ev["event_type"], "job.finished")
        self.assertEqual(ev["job_id"], jid)
        self.assertEqual(ev["state"], state)
        self.assertTimestamp(ev["started_at"])
        self.assertTimestamp(ev["finished_at"])
        self.assertIsInstance(ev["duration_ms"], int)
        self.assertEqual(ev.get("exit_code"), exit_code)
        self.assertEqual(ev["stdout_log_path"], os.path.join(self.job_dir(jid), "stdout.log"))
        self.assertEqual(ev["stderr_log_path"], os.path.join(self.job_dir(jid), "stderr.log"))

    def check_delivery(self, res, sink_type, success):
        self.assertEqual(res["sink_type"], sink_type)
        self.assertIn("target", res)
        self.assertIs(res["success"], success, res)
        self.assertTimestamp(res["attempted_at"])

    def test_notify_file(self):
        target = os.path.join(self.tmp, "a", "b", "events.ndjson")
        jid = self.start(SH, "-c", "exit 2", opts=("--notify-file", target))
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "exited")
        self.assertTrue(
            wait_until(lambda: os.path.exists(target) and read_text(target).endswith("\n"), 10)
        )
        time.sleep(0.3)
        with open(target) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1, lines)
        ev = json.loads(lines[0])
        self.check_event(ev, jid, "exited", 2)
        self.assertEqual(ev["command"], [SH, "-c", "exit 2"])
        self.assertEqual(ev["cwd"], os.path.realpath(self.tmp))
        ce = self.completion_event(jid)
        self.check_event(ce, jid, "exited", 2)
        self.assertEqual(len(ce["delivery_results"]), 1)
        self.check_delivery(ce["delivery_results"][0], "file", True)
        self.assertEqual(
            os.path.realpath(ce["delivery_results"][0]["target"]), os.path.realpath(target)
        )
        meta = self.read_json(os.path.join(self.job_dir(jid), "meta.json"))
        self.assertEqual(
            os.path.realpath(meta["notification"]["notify_file"]), os.path.realpath(target)
        )

    def test_notify_file_appends(self):
        target = os.path.join(self.tmp, "events.ndjson")
        a = self.start("true", opts=("--notify-file", target))
        b = self.start(SH, "-c", "exit 1", opts=("--notify-file", target))
        self.wait_job(a)
        self.wait_job(b)
        self.assertTrue(
            wait_until(lambda: os.path.exists(target) and read_text(target).count("\n") >= 2, 10)
        )
        with open(target) as f:
            evs = [json.loads(line) for line in f.read().splitlines()]
        self.assertEqual(sorted(e["job_id"] for e in evs), sorted([a, b]))

    def test_notify_command(self):
        out = os.path.join(self.tmp, "ev.json")
        envout = os.path.join(self.tmp, "ev.env")
        hook = json.dumps(["/bin/sh", "-c", 'cat > "%s"; env > "%s"' % (out, envout)])
        jid = self.start(SH, "-c", "echo hi", opts=("--notify-command", hook))
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "exited")
        ce = self.completion_event(jid)
        self.check_event(ce, jid, "exited", 0)
        self.assertEqual(len(ce["delivery_results"]), 1)
        self.check_delivery(ce["delivery_results"][0], "command", True)
        self.assertTrue(
            wait_until(lambda: os.path.exists(envout) and os.path.getsize(envout) > 0, 10)
        )
        with open(out) as f:
            ev = json.load(f)
        self.check_event(ev, jid, "exited", 0)
        self.assertEqual(ev["command"], [SH, "-c", "echo hi"])
        env = {}
        with open(envout) as f:
            for line in f.read().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    env[k] = v
        self.assertEqual(
            env.get("AGENT_EXEC_EVENT_PATH"),
            os.path.join(self.job_dir(jid), "completion_event.json"),
        )
        self.assertEqual(env.get("AGENT_EXEC_JOB_ID"), jid)
        self.assertEqual(env.get("AGENT_EXEC_EVENT_TYPE"), "job.finished")
        meta = self.read_json(os.path.join(self.job_dir(jid), "meta.json"))
        self.assertEqual(meta["notification"]["notify_command"], json.loads(hook))

    def test_notify_command_for_killed_job(self):
        out = os.path.join(self.tmp, "ev.json")
        hook = json.dumps(["/bin/sh", "-c", 'cat > "%s"' % out])
        jid = self.start_bg("sleep", "30", opts=("--notify-command", hook))
        self.job_pids(jid)
        self.ok("kill", jid)
        self.wait_job(jid)
        ce = self.completion_event(jid)
        self.assertEqual(ce["state"], "killed")
        self.assertEqual(ce["signal"], "SIGTERM")
        self.assertTrue(wait_until(lambda: os.path.exists(out) and os.path.getsize(out) > 0, 10))
        with open(out) as f:
            self.assertEqual(json.load(f)["state"], "killed")

    def test_failing_sinks(self):
        target = os.path.join(self.tmp, "ok.ndjson")
        a = self.start(SH, "-c", "exit 0", opts=("--notify-command", '["/nonexistent"]'))
        b = self.start(
            SH, "-c", "exit 0", opts=("--notify-command", '["false"]', "--notify-file", target)
        )
        for jid in (a, b):
            w = self.wait_job(jid)
            self.assertEqual((w["state"], w["exit_code"]), ("exited", 0))
        ce = self.completion_event(a)
        self.assertEqual(len(ce["delivery_results"]), 1)
        self.check_delivery(ce["delivery_results"][0], "command", False)
        ce = self.completion_event(b, 2)
        by_type = dict((r["sink_type"], r) for r in ce["delivery_results"])
        self.assertEqual(sorted(by_type), ["command", "file"])
        self.check_delivery(by_type["command"], "command", False)
        self.check_delivery(by_type["file"], "file", True)
        time.sleep(0.3)
        for jid in (a, b):
            st = self.read_state(jid)
            self.assertEqual(st["job"]["status"], "exited")
            self.assertEqual(st["result"]["exit_code"], 0)
            s = self.ok("status", jid)
            self.assertEqual(s["state"], "exited")

    def test_slow_hook_does_not_delay_terminal_state(self):
        pidfile = os.path.join(self.tmp, "hook.pid")
        hook = json.dumps(["/bin/sh", "-c", 'echo $$ > "%s"; exec sleep 30' % pidfile])
        self.addCleanup(self._kill_hook, pidfile)
        t0 = time.monotonic()
        jid = self.start("true", opts=("--notify-command", hook))
        w = self.wait_job(jid, 20000)
        self.assertLess(time.monotonic() - t0, 8.0, "wait was held up by the notify hook")
        self.assertEqual(w["state"], "exited")
        self.assertEqual(self.ok("status", jid)["state"], "exited")
        # the hook did start (and is still sleeping)
        self.assertTrue(
            wait_until(lambda: os.path.exists(pidfile) and read_text(pidfile).strip(), 10)
        )

    def _kill_hook(self, pidfile):
        # runs before the temp dir is removed (cleanups run in reverse order)
        try:
            pid = int(read_text(pidfile).strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def test_no_event_without_sink(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", "true")
        time.sleep(0.5)
        self.assertFalse(
            os.path.exists(os.path.join(self.job_dir(j["job_id"]), "completion_event.json"))
        )


if __name__ == "__main__":
    unittest.main()
