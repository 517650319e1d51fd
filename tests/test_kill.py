"""``kill``: signals, a kill racing a natural exit, the whole process tree."""

import concurrent.futures
import json
import os
import random
import signal
import time
import unittest

from tests._jobs import JobsTestCase, LINUX, SH, open_bytes, read_text, run_script
from tests._procs import RACE_DRIVER, pid_alive, pids_running, wait_until
from tests._util import PY


# --------------------------------------------------------------------------
# kill and timeouts
# --------------------------------------------------------------------------


class KillTests(JobsTestCase):
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
        # one name through the CLI; every bad name: test_units (SignalTests,
        # OptionValueWiringTests)
        for bad in ("SIGNOPE",):
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


# ==========================================================================
# kill racing a natural exit
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class KillRaceTests(JobsTestCase):
    TRIALS = 20
    WORKERS = 4

    def test_kill_racing_natural_exit(self):
        seed = random.randrange(1 << 30)
        events = os.path.join(self.tmp, "events.ndjson")
        per = self.TRIALS // self.WORKERS

        def driver(w):
            args = (self.root, self.tmp, events, seed, w * per, per)
            return run_script(RACE_DRIVER, *args, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(self.WORKERS) as pool:
            results = [r for batch in pool.map(driver, range(self.WORKERS)) for r in batch]
        self.assertEqual(len(results), self.TRIALS)
        seen = {}
        for res in results:
            msg = "seed=%d trial=%r" % (seed, res)
            self.assertNotIn("run", res, msg)
            k, w = res["k"], res["w"]
            self.assertEqual(res["krc"], 0, msg)
            self.assertTrue(k["ok"], msg)
            self.assertEqual(res["wrc"], 0, msg)
            self.assertIs(w["timed_out"], False, msg)
            state = w["state"]
            if state == "exited":
                self.assertEqual(w.get("exit_code"), 3, msg)
                self.assertIsNone(w.get("signal"), msg)
            else:
                self.assertEqual(state, "killed", msg)
                self.assertEqual(w.get("signal"), "SIG" + res["sig"], msg)
                self.assertIn(w.get("exit_code"), (None, 3), msg)
            seen[state] = seen.get(state, 0) + 1
        jids = {res["jid"] for res in results}
        # Terminal exactly once: a later read agrees with wait, nothing moved.
        time.sleep(0.2)
        listed = {e["job_id"]: e for e in self.ok("list", "--all", "--limit", "0")["jobs"]}
        self.assertEqual(set(listed), jids)
        for res in results:
            w, e = res["w"], listed[res["jid"]]
            for key in ("state", "exit_code", "signal", "finished_at"):
                self.assertEqual(e.get(key), w.get(key), "seed=%d %s %r %r" % (seed, key, e, w))

        def lines():
            try:
                with open(events) as f:
                    return f.read().splitlines()
            except OSError:
                return []

        wait_until(lambda: len(lines()) >= self.TRIALS, 10)
        time.sleep(0.3)
        got = [json.loads(line) for line in lines()]
        self.assertEqual(sorted(e["job_id"] for e in got), sorted(jids), "one event per job")
        by_id = {res["jid"]: res["w"] for res in results}
        for ev in got:
            self.assertEqual(ev["state"], by_id[ev["job_id"]]["state"], ev)


# ==========================================================================
# Whole-tree kill
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class WholeTreeKillTests(JobsTestCase):
    def tree(self, prefix=""):
        durs = self.unique_sleeps(4)
        script = prefix + 'sleep %s & setsid sleep %s & (setsid sh -c "sleep %s" &); sleep %s' % (
            tuple(durs)
        )
        return durs, script

    def wait_tree_up(self, durs):
        argvs = [["sleep", d] for d in durs]
        ok = wait_until(lambda: len(pids_running(argvs)) == 4, 5)
        self.assertTrue(ok, "the tree never came up: %r" % pids_running(argvs))
        return argvs

    def assert_tree_gone(self, argvs, t0, within=4.0):
        left = wait_until(lambda: not pids_running(argvs), max(0.1, t0 + within - time.monotonic()))
        self.assertTrue(left, "survivors after %.1fs: %r" % (within, pids_running(argvs)))

    def test_timeout_kills_whole_tree(self):
        durs, script = self.tree()
        t0 = time.monotonic()
        jid = self.start_bg(SH, "-c", script, opts=("--timeout", "1000", "--kill-after", "1000"))
        argvs = self.wait_tree_up(durs)
        self.assert_tree_gone(argvs, t0)
        w = self.wait_job(jid, 10000)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w.get("signal"), "SIGTERM", w)
        self.assertIs(self.read_state(jid)["timed_out"], True)

    def test_timeout_kill_after_reaches_term_ignoring_tree(self):
        durs, script = self.tree(prefix='trap "" TERM; ')
        t0 = time.monotonic()
        jid = self.start_bg(SH, "-c", script, opts=("--timeout", "1000", "--kill-after", "1000"))
        argvs = self.wait_tree_up(durs)
        time.sleep(max(0.0, t0 + 1.5 - time.monotonic()))
        # SIGTERM went out at 1 s and is ignored: all four still run.
        self.assertEqual(len(pids_running(argvs)), 4)
        self.assert_tree_gone(argvs, t0)
        w = self.wait_job(jid, 10000)
        self.assertEqual(w["state"], "killed", w)

    def test_kill_command_kills_whole_tree(self):
        durs, script = self.tree()
        jid = self.start_bg(SH, "-c", script)
        argvs = self.wait_tree_up(durs)
        t0 = time.monotonic()
        k = self.ok("kill", jid, timeout=20)
        self.assertEqual(k["signal"], "SIGTERM")
        self.assert_tree_gone(argvs, t0)
        w = self.wait_job(jid, 10000)
        self.assertEqual(w["state"], "killed", w)
        self.assertEqual(w.get("signal"), "SIGTERM", w)

    def test_kill_signal_kill_reaches_term_ignoring_tree(self):
        durs, script = self.tree(prefix='trap "" TERM; ')
        jid = self.start_bg(SH, "-c", script)
        argvs = self.wait_tree_up(durs)
        t0 = time.monotonic()
        self.ok("kill", "--signal", "KILL", jid, timeout=20)
        self.assert_tree_gone(argvs, t0)
        self.assertEqual(self.wait_job(jid, 10000)["state"], "killed")


# A job whose main process, a child in its group, and a child that left the
# group (setsid) count the USR1s they get, each in a file of its own.
_COUNTERS = r"""
import os, signal, sys, time
def count(tag):
    n = [0]
    def on_usr1(*_):
        n[0] += 1
        with open(tag + ".tmp", "w") as f:
            f.write(str(n[0]))
        os.replace(tag + ".tmp", tag)
    signal.signal(signal.SIGUSR1, on_usr1)
    open(tag + ".ready", "w").close()
    while True:
        time.sleep(1)
if os.fork() == 0:
    os.setsid()
    count("left")
if os.fork() == 0:
    count("group")
count("main")
"""


class KillOnceTests(JobsTestCase):
    def test_each_process_gets_each_signal_once(self):
        work = os.path.join(self.tmp, "w")
        os.mkdir(work)
        jid = self.start_bg(PY, "-c", _COUNTERS, opts=("--cwd", work))
        ready = [os.path.join(work, t + ".ready") for t in ("main", "group", "left")]
        self.assertTrue(wait_until(lambda: all(map(os.path.exists, ready)), 10))
        for _ in range(6):
            t0 = time.monotonic()
            j = self.ok("kill", "--signal", "USR1", jid)
            # Not a signal that ends the job: no settle wait (1 s) before answering.
            self.assertLess(time.monotonic() - t0, 0.9, j)
            self.assertEqual((j["signal"], j["state"], j["sent"]), ("SIGUSR1", "running", True))

        def counts():
            out = {}
            for tag in ("main", "group", "left"):
                try:
                    with open(os.path.join(work, tag)) as f:
                        out[tag] = int(f.read() or 0)
                except (OSError, ValueError):
                    out[tag] = 0
            return out

        wait_until(lambda: counts() == {"main": 6, "group": 6, "left": 6}, 5)
        time.sleep(0.3)  # a late duplicate would show now
        self.assertEqual(counts(), {"main": 6, "group": 6, "left": 6})
        # The job did not end: USR1 is not a kill.
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_what_a_job_left_is_reached_after_its_supervisor_died(self):
        jid = self.start_bg("sh", "-c", "sleep 300 > /dev/null 2>&1 & echo $!; exit 0")
        self.wait_job(jid)
        st = self.read_state(jid)
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        self.assertTrue(wait_until(lambda: not pid_alive(st["supervisor_pid"]), 5))
        listed = self.ok("list")["jobs"][0]
        self.assertTrue(listed["lingering"], listed)
        reason = self.ok("delete", jid)["refused"][0]["reason"]
        self.assertIn("agent-exec kill %s" % jid, reason)
        j = self.ok("kill", jid)
        self.assertTrue(j["sent"], j)
        self.assertTrue(wait_until(lambda: not self.ok("list", "--lingering")["jobs"], 10))
        self.assertEqual(self.ok("delete", jid)["deleted"], [jid])

    def test_stop_cont_winch_by_name(self):
        jid = self.start_bg("sleep", "30")
        for name in ("STOP", "CONT", "WINCH"):
            t0 = time.monotonic()
            j = self.ok("kill", "--signal", name, jid)
            self.assertLess(time.monotonic() - t0, 0.9, j)
            self.assertEqual((j["signal"], j["state"]), ("SIG" + name, "running"), j)
        j = self.ok("kill", jid)
        self.assertEqual((j["state"], j["end_reason"], j["success"]), ("killed", "kill", False))


if __name__ == "__main__":
    unittest.main()
