"""The supervisor: detachment, a lost supervisor, pid reuse, torn writes,
zombies, output volume, disk limits, notify sinks, completion events, load
and clock jumps (faults injected for real; bench/stress.py scales them up).
"""

import concurrent.futures
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import unittest

from tests._jobs import (
    JobsTestCase,
    LINUX,
    SH,
    ULID_RE,
    call_main,
    read_text,
    run_script,
    write_json_atomic,
)
from tests._procs import (
    FLOOD_STDERR_THEN_STDOUT,
    GEN_NO_NEWLINE,
    MIB,
    ROW_MAX,
    ROW_RE,
    ZOMBIE_DRIVER,
    expected_no_newline_sha,
    file_sha,
    fsize_limit,
    hanging_hook,
    kill_quietly,
    kill_recorded,
    mount_tiny_tmpfs,
    pid_alive,
    pids_running,
    proc_cmdline,
    proc_stat,
    unmount_tiny_tmpfs,
    vmrss_kb,
    wait_until,
    writer_code,
    zombies_of,
)
from tests._util import CALL_TIMEOUT, PY, SCRIPT
from tests._util import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402


# --------------------------------------------------------------------------
# Detachment from the caller
# --------------------------------------------------------------------------


class DetachmentTests(JobsTestCase):
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

    def run_holding_fd(self, high, *args):
        """``agent_exec.py <args>`` (the script) from a caller that holds the
        writing end of a pipe at fd ``high``, inherited; (the process, the
        pipe's reading end, which the test closes)."""
        r, w = os.pipe()
        os.dup2(w, high)
        os.close(w)
        try:
            proc = subprocess.run(
                [PY, SCRIPT] + list(args),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(),
                cwd=self.tmp,
                timeout=CALL_TIMEOUT,
                pass_fds=(high,),
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(high)
        return proc, r

    @unittest.skipUnless(LINUX, "needs /proc")
    def test_workload_inherits_no_caller_fd(self):
        high = 57
        proc, r = self.run_holding_fd(
            high, "run", "--snapshot-after", "5000", "--", "ls", "/proc/self/fd"
        )
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
        proc, r = self.run_holding_fd(58, "run", "--snapshot-after", "0", "--", "sleep", "30")
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


class SupervisorLostTests(JobsTestCase):
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

    # ---- the supervisor SIGKILLed, an earlier boot (faults injected via /proc) ----

    @unittest.skipUnless(LINUX, "these fault injections read /proc")
    def test_status_list_wait_report_lost_supervisor_within_1s(self):
        jid = self.start_bg("sleep", "30")
        pid, sup = self.job_pids(jid)
        self.addCleanup(kill_recorded, self.read_state(jid))
        waiter = subprocess.Popen(
            [PY, SCRIPT, "wait", "--timeout-ms", "20000", jid],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tmp,
            universal_newlines=True,
        )
        self.addCleanup(lambda: waiter.poll() is None and waiter.kill())
        # The waiter must be parked on the job before the fault: one of its
        # threads blocked in flock(2) (a loaded machine may take a while to
        # start the interpreter and compile the script).
        self.assertTrue(wait_until(lambda: _in_flock(waiter.pid), 15, 0.02), "waiter never parked")
        self.assertIsNone(waiter.poll(), "wait returned while the job ran")
        woke = {}

        def collect():
            woke["out"] = waiter.communicate(timeout=10)[0]
            woke["t"] = time.monotonic()

        collector = threading.Thread(target=collect)
        collector.start()
        t0 = time.monotonic()
        os.kill(sup, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: not pid_alive(sup), 2, 0.005))
        # Timed in process, so that what is measured is how soon agent-exec
        # knows, not how long a loaded machine takes to start an interpreter.
        rc, out = call_main(["--root", self.root, "status", jid])
        t_status = time.monotonic() - t0
        s = json.loads(out)
        rc2, out2 = call_main(["--root", self.root, "list", "--all"])
        t_list = time.monotonic() - t0
        lst = json.loads(out2)
        self.assertEqual((rc, rc2), (0, 0), (out, out2))
        collector.join(15)
        w = json.loads(woke["out"])
        t_wait = woke["t"] - t0
        self.assertEqual(s["state"], "failed", s)
        self.assertEqual(s["failure"]["code"], "supervisor_lost", s)
        mine = [e for e in lst["jobs"] if e["job_id"] == jid]
        self.assertEqual(len(mine), 1, lst)
        self.assertEqual(mine[0]["state"], "failed", lst)
        self.assertEqual(w["state"], "failed", w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w.get("failure", {}).get("code"), "supervisor_lost", w)
        self.assertLess(t_status, 1.0, "status took %.2fs after the kill" % t_status)
        self.assertLess(t_list, 1.0, "status+list took %.2fs after the kill" % t_list)
        self.assertLess(t_wait, 1.0, "wait returned %.2fs after the kill" % t_wait)
        # And the same through the real CLI.
        self.assertEqual(self.ok("status", jid)["state"], "failed")
        self.assertEqual(self.ok("wait", "--timeout-ms", "5000", jid)["state"], "failed")

    @unittest.skipUnless(LINUX, "these fault injections read /proc")
    def test_job_from_an_earlier_boot_is_never_running(self):
        jid = self.start_bg("sleep", "30")
        self.job_pids(jid)
        path = os.path.join(self.job_dir(jid), "state.json")
        st = self.read_state(jid)
        self.assertEqual(st["job"]["status"], "running")
        with open("/proc/sys/kernel/random/boot_id") as f:
            self.assertEqual(st.get("boot_id"), f.read().strip(), "boot id not recorded")
        self.assertEqual(self.ok("status", jid)["state"], "running")
        st["boot_id"] = "00000000-0000-4000-8000-000000000000"
        write_json_atomic(path, st)
        s = self.ok("status", jid)
        self.assertEqual(s["state"], "failed", s)
        self.assertEqual(s["failure"]["code"], "supervisor_lost", s)
        lst = self.ok("list", "--all")
        self.assertEqual([e["state"] for e in lst["jobs"] if e["job_id"] == jid], ["failed"])
        self.assertEqual(self.ok("list", "--all", "--state", "running")["jobs"], [])
        w = self.ok("wait", "--timeout-ms", "1500", jid, timeout=20)
        self.assertEqual(w["state"], "failed", w)
        self.assertIs(w["timed_out"], False, w)


# ==========================================================================
# PID reuse
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class PidReuseTests(JobsTestCase):
    def foreign_sleep(self):
        """A live process of the test's own, in a process group of its own."""
        (dur,) = self.unique_sleeps(1)
        p = subprocess.Popen(["sleep", dur], start_new_session=True)
        self.addCleanup(p.wait)
        self.addCleanup(kill_quietly, [p.pid], True)
        self.assertTrue(wait_until(lambda: proc_cmdline(p.pid) == [b"sleep", dur.encode()], 5))
        return p

    def lost_job(self):
        """A running job whose supervisor and workload were both SIGKILLed."""
        jid = self.start_bg("sleep", "30")
        pid, sup = self.job_pids(jid)
        os.kill(sup, signal.SIGKILL)
        kill_quietly([pid], True)
        self.assertTrue(wait_until(lambda: not pid_alive(sup) and not pid_alive(pid), 5))
        return jid

    def point_state_at(self, jid, **fields):
        path = os.path.join(self.job_dir(jid), "state.json")
        st = self.read_state(jid)
        st.update(fields)
        write_json_atomic(path, st)

    def assert_foreign_survives(self, jid, victim, *kill_args):
        r = self.cli("kill", *kill_args, jid, timeout=20)
        self.assertIn(r.code, (0, 1), r)
        self.assertIsInstance(r.json, dict, r)
        if r.code == 0:
            self.assertIs(r.json.get("sent"), False, r)
        time.sleep(0.3)
        self.assertIsNone(victim.poll(), "kill signalled a process that is not the job's")
        self.assertTrue(pid_alive(victim.pid))

    def test_kill_spares_foreign_pid_with_wrong_start_time(self):
        jid = self.lost_job()
        victim = self.foreign_sleep()
        self.point_state_at(jid, pid=victim.pid, pgid=victim.pid, pid_start_time="12345")
        self.assertEqual(self.ok("status", jid)["state"], "failed")
        for sig in ("TERM", "KILL"):
            with self.subTest(signal=sig):
                self.assert_foreign_survives(jid, victim, "--signal", sig)

    def test_kill_spares_foreign_pid_without_start_time(self):
        jid = self.lost_job()
        victim = self.foreign_sleep()
        self.point_state_at(jid, pid=victim.pid, pgid=victim.pid, pid_start_time=None)
        self.assert_foreign_survives(jid, victim, "--signal", "KILL")

    def test_kill_spares_foreign_supervisor_pid(self):
        # Both the workload and the supervisor pid now name foreign processes.
        jid = self.lost_job()
        victim = self.foreign_sleep()
        other = self.foreign_sleep()
        self.point_state_at(
            jid,
            pid=victim.pid,
            pgid=victim.pid,
            pid_start_time="1",
            supervisor_pid=other.pid,
            supervisor_start_time="1",
        )
        self.assert_foreign_survives(jid, victim, "--signal", "KILL")
        self.assertIsNone(other.poll())
        s = self.ok("status", jid)
        self.assertEqual(s.get("descendants", []), [], s)

    def test_live_supervisor_kills_its_own_child_not_the_recorded_pid(self):
        jid = self.start_bg("sleep", "30")
        pid, sup = self.job_pids(jid)
        victim = self.foreign_sleep()
        self.point_state_at(jid, pid=victim.pid, pgid=victim.pid, pid_start_time="1")
        k = self.ok("kill", "--signal", "KILL", jid, timeout=20)
        w = self.ok("wait", "--timeout-ms", "10000", jid, timeout=20)
        self.assertEqual(w["state"], "killed", (k, w))
        self.assertEqual(w.get("signal"), "SIGKILL", w)
        self.assertFalse(pid_alive(pid), "the job's own process survived")
        time.sleep(0.2)
        self.assertIsNone(victim.poll(), "kill reached the pid written in state.json")

    def test_never_signals_pid_or_pgid_le_1(self):
        # os.kill/os.killpg are replaced by recorders in a child interpreter:
        # nothing can really be sent, whatever the code under test does.
        jid = self.lost_job()
        with open("/proc/1/stat", "rb") as f:
            init_start = f.read().rsplit(b")", 1)[1].split()[19].decode()
        code = (
            "import io, json, os, sys, contextlib\n"
            "import agent_exec\n"
            "root, jid, init_start = sys.argv[1:4]\n"
            "path = os.path.join(root, jid, 'state.json')\n"
            "calls = []\n"
            "os.kill = lambda p, s: calls.append(['kill', p, s])\n"
            "os.killpg = lambda p, s: calls.append(['killpg', p, s])\n"
            "answers = []\n"
            "for pid in (-1, 0, 1):\n"
            "    with open(path) as f:\n"
            "        st = json.load(f)\n"
            "    tok = init_start if pid == 1 else '0'\n"
            "    st.update(pid=pid, pgid=pid, pid_start_time=tok, supervisor_pid=pid,\n"
            "              supervisor_start_time=tok)\n"
            "    with open(path + '.t', 'w') as f:\n"
            "        json.dump(st, f)\n"
            "    os.replace(path + '.t', path)\n"
            "    for sig in ('TERM', 'KILL'):\n"
            "        buf = io.StringIO()\n"
            "        with contextlib.redirect_stdout(buf):\n"
            "            rc = agent_exec.main(['--root', root, 'kill', '--signal', sig, jid])\n"
            "        answers.append([rc, buf.getvalue()])\n"
            "print(json.dumps({'calls': calls, 'answers': answers}))\n"
        )
        out = run_script(code, self.root, jid, init_start, timeout=60)
        bad = [c for c in out["calls"] if c[1] <= 1]
        self.assertEqual(bad, [], out)
        for rc, text in out["answers"]:
            self.assertIn(rc, (0, 1), out)
            self.assertEqual(len(text.splitlines()), 1, out)
            json.loads(text)


# ==========================================================================
# Torn writes
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class TornWritesTests(JobsTestCase):
    def test_state_json_never_torn_under_progress_every_10(self):
        jid = self.start_bg("sleep", "3", opts=("--progress-every", "10"))
        self.job_pids(jid)
        path = os.path.join(self.job_dir(jid), "state.json")
        meta = os.path.join(self.job_dir(jid), "meta.json")
        errors = []
        stamps = set()
        reads = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            for p in (path, meta):
                try:
                    with open(p, "rb") as f:
                        obj = json.loads(f.read().decode("utf-8"))
                    if not isinstance(obj, dict):
                        errors.append("not an object: %r" % (obj,))
                    elif p == path:
                        stamps.add(obj.get("updated_at"))
                except (OSError, ValueError) as e:
                    errors.append(repr(e))
                reads += 1
        self.assertEqual(errors[:5], [], "%d errors in %d reads" % (len(errors), reads))
        self.assertGreater(reads, 1000)
        self.assertGreater(len(stamps), 20, "state.json was not refreshed every 10 ms")
        self.assertEqual(self.wait_job(jid)["state"], "exited")


# ==========================================================================
# Zombies
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class ZombiesTests(JobsTestCase):
    N = 10

    def test_in_process_main_leaves_no_zombie(self):
        out = run_script(ZOMBIE_DRIVER, self.root, self.N, timeout=120)
        self.assertEqual(out["zombies"], [], out)
        self.assertEqual(out["children"], [], out)
        for rc, ans in out["answers"][: self.N]:
            self.assertEqual(rc, 0, ans)
            self.assertTrue(ans["ok"], ans)
        self.assertEqual(out["answers"][-1][1]["error"]["code"], "command_not_found")
        for i, (_rc, fin) in enumerate(out["finals"][: self.N]):
            self.assertEqual(fin["state"], "exited", fin)
            self.assertEqual(fin["exit_code"], i % 3, fin)

    def test_supervisor_reaps_adopted_orphan_within_1s(self):
        jid = self.start_bg(SH, "-c", "(sleep 0.3 & echo $!); exec sleep 30")
        pid, sup = self.job_pids(jid)
        log = os.path.join(self.job_dir(jid), "stdout.log")

        def grandchild():
            try:
                text = self.read_bytes(log).decode().strip()
            except OSError:
                return None
            return int(text) if text.isdigit() else None

        gpid = wait_until(grandchild, 5)
        self.assertTrue(gpid, "the job never printed its grandchild's pid")
        # Orphaned by its subshell, it is adopted by the supervisor (subreaper).
        st = proc_stat(gpid)
        if st is not None and st[0] != "Z":
            adopted = wait_until(lambda: (proc_stat(gpid) or ("", 0))[1] == sup, 1.0, 0.01)
            self.assertTrue(adopted or not pid_alive(gpid), proc_stat(gpid))
        self.assertTrue(wait_until(lambda: not pid_alive(gpid), 5, 0.01))
        t_exit = time.monotonic()
        reaped = wait_until(lambda: not zombies_of(sup) and proc_stat(gpid) is None, 1.5, 0.01)
        took = time.monotonic() - t_exit
        self.assertTrue(reaped, "zombies of the supervisor: %r" % zombies_of(sup))
        self.assertLess(took, 1.0)
        self.assertEqual(self.ok("status", jid)["state"], "running")


# ==========================================================================
# Output volume
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class OutputVolumeTests(JobsTestCase):
    MIB_OUT = 64

    def test_big_output_without_newline(self):
        mib = self.MIB_OUT
        want_sha = expected_no_newline_sha(mib)
        t0 = time.monotonic()
        jid = self.start_bg(PY, "-c", GEN_NO_NEWLINE, str(mib))
        _, sup = self.job_pids(jid)
        peak = 0
        samples = 0
        deadline = time.monotonic() + 120
        while pid_alive(sup) and time.monotonic() < deadline:
            rss = vmrss_kb(sup)
            if rss is not None:
                peak = max(peak, rss)
                samples += 1
            time.sleep(0.01)
        wall = time.monotonic() - t0
        w = self.wait_job(jid, 60000)
        self.assertEqual(w["state"], "exited", w)
        self.assertEqual(w["exit_code"], 0, w)
        self.assertGreater(samples, 3)
        self.assertLess(peak, 64 * 1024, "supervisor VmRSS peaked at %d KiB" % peak)
        # At full speed: generous for a slow CI disk, yet no per-byte work fits.
        self.assertLess(wall, 60.0, "%d MiB took %.1fs" % (mib, wall))
        out = os.path.join(self.job_dir(jid), "stdout.log")
        self.assertEqual(os.path.getsize(out), mib * MIB)
        self.assertEqual(file_sha(out), want_sha)
        # full.log: rows of at most 64 KiB of text, which put together are stdout.
        h = hashlib.sha256()
        longest = 0
        with open(os.path.join(self.job_dir(jid), "full.log"), "rb") as f:
            for n, row in enumerate(f):
                m = ROW_RE.match(row)
                self.assertTrue(m, "row %d: %r" % (n, row[:80]))
                self.assertTrue(row.endswith(b"\n"))
                text = row[m.end() : -1]
                longest = max(longest, len(text))
                h.update(text)
        self.assertLessEqual(longest, ROW_MAX)
        self.assertEqual(h.hexdigest(), want_sha)

    def test_binary_and_split_utf8(self):
        code = (
            "import os, time\n"
            "os.write(1, bytes(range(256)) * 4 + b'\\n')\n"
            "for b in 'caf\\u00e9 \\u20ac \\U0001F600 end\\n'.encode():\n"
            "    os.write(1, bytes([b])); time.sleep(0.004)\n"
            "os.write(2, b'\\xff\\xfe\\x00bin\\xe2\\x82')\n"
        )
        want = bytes(range(256)) * 4 + b"\n" + "caf\u00e9 \u20ac \U0001f600 end\n".encode()
        j = self.ok("run", "--wait", "--", PY, "-c", code, timeout=30)
        jid = j["job_id"]
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(self.read_bytes(j["stdout_log_path"]), want)
        self.assertEqual(self.read_bytes(j["stderr_log_path"]), b"\xff\xfe\x00bin\xe2\x82")
        # full.log: the stdout rows, prefixes removed, give stdout back byte for byte.
        rows = self.read_bytes(os.path.join(self.job_dir(jid), "full.log")).split(b"\n")
        self.assertEqual(rows[-1], b"")
        texts = []
        for row in rows[:-1]:
            m = ROW_RE.match(row)
            self.assertTrue(m, row[:80])
            if m.group(1) == b"STDOUT":
                texts.append(row[m.end() :])
        self.assertEqual(b"\n".join(texts) + b"\n", want)
        t = self.ok("tail", "--tail-lines", "1", jid)
        self.assertEqual(t["stdout_tail"], "caf\u00e9 \u20ac \U0001f600 end\n")
        self.assertIn("\ufffd", t["stderr_tail"])
        # Every cut of the window, including inside a multi-byte character.
        # (In process: the read-only command, 23 times, without 23 interpreters.)
        for n in range(1, 24):
            with self.subTest(max_bytes=n):
                rc, out = call_main(["--root", self.root, "tail", "--max-bytes", str(n), jid])
                self.assertEqual(rc, 0, out)
                self.assertEqual(len(out.splitlines()), 1, out)
                self.assertNotIn("Traceback", out)
                tail = json.loads(out)["stdout_tail"]
                self.assertTrue(str(want, "utf-8", "replace").endswith(tail), tail)
        t = self.ok("tail", "--tail-lines", "3", "--max-bytes", "1M", jid)
        self.assertIn("\ufffd", t["stdout_tail"])

    def test_stderr_flood_then_stdout_flood_never_deadlocks(self):
        t0 = time.monotonic()
        j = self.ok("run", "--wait", "--", PY, "-c", FLOOD_STDERR_THEN_STDOUT, timeout=60)
        self.assertLess(time.monotonic() - t0, 30.0)
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(os.path.getsize(j["stderr_log_path"]), 10000000)
        self.assertEqual(os.path.getsize(j["stdout_log_path"]), 10000000)

    def test_partial_line_shows_up_while_running(self):
        jid = self.start_bg(SH, "-c", "printf partial-line-7f3a; sleep 30")
        full = os.path.join(self.job_dir(jid), "full.log")
        out = os.path.join(self.job_dir(jid), "stdout.log")
        self.assertTrue(wait_until(lambda: b"partial-line-7f3a" in self.read_bytes(out), 5))
        t0 = time.monotonic()
        seen = wait_until(lambda: b"[STDOUT] partial-line-7f3a" in self.read_bytes(full), 3)
        took = time.monotonic() - t0
        self.assertTrue(seen, "the partial line never reached full.log")
        self.assertLess(took, 1.5)
        self.assertEqual(self.ok("status", jid)["state"], "running")


# ==========================================================================
# Disk limits and write errors
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class DiskLimitsTests(JobsTestCase):
    def test_max_output_keeps_logs_bounded_and_the_end(self):
        cap = 16 * 1024
        code = (
            "import sys, time\n"
            "for k in range(20):\n"
            "    sys.stdout.write(''.join('line %06d\\n' % (k * 1000 + i) for i in range(1000)))\n"
            "    sys.stderr.write('E' * 5000 + '\\n')\n"
            "    sys.stdout.flush(); sys.stderr.flush(); time.sleep(0.02)\n"
        )
        total_out = 20000 * 12
        total_err = 20 * 5001
        jid = self.start_bg(PY, "-c", code, opts=("--max-output", "16k"))
        d = self.job_dir(jid)
        peak = {"stdout.log": 0, "stderr.log": 0, "full.log": 0}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for name in peak:
                try:
                    peak[name] = max(peak[name], os.path.getsize(os.path.join(d, name)))
                except OSError:
                    pass
            if self.read_state(jid)["job"]["status"] != "running":
                break
            time.sleep(0.005)
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "exited", w)
        self.assertLessEqual(peak["stdout.log"], cap, peak)
        self.assertLessEqual(peak["stderr.log"], cap, peak)
        self.assertLessEqual(peak["full.log"], 3 * cap, peak)
        out = self.read_bytes(os.path.join(d, "stdout.log"))
        err = self.read_bytes(os.path.join(d, "stderr.log"))
        expected = "".join("line %06d\n" % i for i in range(20000)).encode()
        self.assertTrue(out, "nothing kept")
        self.assertTrue(expected.endswith(out), out[:60])
        self.assertTrue(out.endswith(b"line 019999\n"))
        s = self.ok("status", jid)
        self.assertEqual(s["stdout_dropped_bytes"], total_out - len(out), s)
        self.assertEqual(s["stderr_dropped_bytes"], total_err - len(err), s)
        t = self.ok("tail", "--tail-lines", "2", jid)
        self.assertEqual(t["stdout_tail"], "line 019998\nline 019999\n")
        self.assertEqual(t["stdout_dropped_bytes"], s["stdout_dropped_bytes"])
        self.assertEqual(t["stderr_dropped_bytes"], s["stderr_dropped_bytes"])
        st = self.read_state(jid)
        self.assertEqual(st["stdout_bytes"], total_out)
        self.assertEqual(st["stderr_bytes"], total_err)
        self.assertEqual(st["stdout_dropped_bytes"], s["stdout_dropped_bytes"])
        self.assertEqual([n for n in os.listdir(d) if n.endswith(".tmp")], [])

    def test_rlimit_fsize_gives_log_error_not_a_blocked_job(self):
        limit = 256 * 1024
        code = writer_code(32, "x", 7, stderr_line="done")
        t0 = time.monotonic()
        r = self.cli_raw(
            "run", "--wait", "--", PY, "-c", code, preexec_fn=fsize_limit(limit), timeout=60
        )
        took = time.monotonic() - t0
        self.assertEqual(r.code, 0, r)
        j = r.json
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j.get("exit_code"), 7, j)
        self.assertLess(took, 30.0)
        st = self.read_state(j["job_id"])
        self.assertIsInstance(st.get("log_error"), str, st)
        self.assertTrue(st["log_error"])
        self.assertEqual(st["stdout_bytes"], 32 * 65536, st)
        s = self.ok("status", j["job_id"])
        self.assertEqual(s["log_error"], st["log_error"])
        self.assertEqual(s["exit_code"], 7)
        self.assertLessEqual(os.path.getsize(j["stdout_log_path"]), limit)

    def test_log_on_dev_full(self):
        j = self.ok(
            "run", "--wait", "--log", "/dev/full", "--", SH, "-c", "echo hello; exit 5", timeout=30
        )
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j.get("exit_code"), 5, j)
        self.assertEqual(self.read_bytes(j["stdout_log_path"]), b"hello\n")
        s = self.ok("status", j["job_id"])
        self.assertIsInstance(s["log_error"], str, s)
        self.assertTrue(s["log_error"])

    def test_notify_file_on_dev_full_is_a_failed_delivery(self):
        j = self.ok("run", "--wait", "--notify-file", "/dev/full", "--", "true", timeout=30)
        self.assertEqual(j["state"], "exited", j)
        ev = self.event_results(j["job_id"])
        (res,) = ev["delivery_results"]
        self.assertEqual(res["sink_type"], "file")
        self.assertIs(res["success"], False, res)
        self.assertTrue(res.get("error"), res)
        self.assertEqual(self.ok("status", j["job_id"])["state"], "exited")

    def test_tiny_tmpfs_root(self):
        mnt = os.path.join(self.tmp, "tiny")
        mounted, why = mount_tiny_tmpfs(mnt)
        if not mounted:
            self.skipTest(why)
        root = os.path.join(mnt, "root")
        self.addCleanup(unmount_tiny_tmpfs, mnt, root)
        env = self.env(AGENT_EXEC_ROOT=root)
        code = writer_code(80, "y", 4)
        t0 = time.monotonic()
        r = self.cli("run", "--wait", "--", PY, "-c", code, env=env, timeout=60)
        self.assertLess(time.monotonic() - t0, 30.0)
        self.assertEqual(r.code, 0, r)
        self.assertEqual(r.json["state"], "exited", r)
        self.assertEqual(r.json.get("exit_code"), 4, r)
        s = self.cli("status", r.json["job_id"], env=env).json
        self.assertEqual(s["state"], "exited", s)
        self.assertEqual(s.get("exit_code"), 4, s)
        self.assertIsInstance(s.get("log_error"), str, s)


# ==========================================================================
# Notification sinks
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class NotifySinksTests(JobsTestCase):
    def test_hanging_command_sink_is_killed(self):
        hook_opts, hook = hanging_hook()
        self.addCleanup(lambda: kill_quietly(pids_running([hook])))
        t0 = time.monotonic()
        j = self.ok("run", "--wait", *hook_opts, "--", "true", timeout=30)
        self.assertEqual(j["state"], "exited", j)
        ev = self.event_results(j["job_id"])
        took = time.monotonic() - t0
        (res,) = ev["delivery_results"]
        self.assertEqual(res["sink_type"], "command")
        self.assertIs(res["success"], False, res)
        self.assertIs(res.get("timed_out"), True, res)
        self.assertLess(took, 10.0)
        self.assertTrue(wait_until(lambda: not pids_running([hook]), 3))
        self.assertEqual(self.ok("status", j["job_id"])["state"], "exited")

    def test_shared_notify_file_gets_exactly_one_line_per_job(self):
        n = 20
        events = os.path.join(self.tmp, "sub", "events.ndjson")

        def one(i):
            return self.cli(
                "run",
                "--snapshot-after",
                "0",
                "--notify-file",
                events,
                "--",
                SH,
                "-c",
                "echo %d; exit %d" % (i, i % 4),
                timeout=30,
            )

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(one, range(n)))
        for r in runs:
            self.assertEqual(r.code, 0, r)
        ids = [r.json["job_id"] for r in runs]

        def lines():
            try:
                with open(events, "rb") as f:
                    return f.read().split(b"\n")
            except OSError:
                return [b""]

        self.assertTrue(wait_until(lambda: len(lines()) > n, 20), lines())
        time.sleep(0.3)
        raw = lines()
        self.assertEqual(raw[-1], b"", "the file does not end with a newline")
        got = [json.loads(x.decode()) for x in raw[:-1]]
        self.assertEqual(len(got), n)
        self.assertEqual(sorted(e["job_id"] for e in got), sorted(ids))
        for e in got:
            i = ids.index(e["job_id"])
            self.assertEqual(e["event_type"], "job.finished")
            self.assertEqual(e["state"], "exited", e)
            self.assertEqual(e["exit_code"], i % 4, e)


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


class CompletionEventsTests(JobsTestCase):
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


# ==========================================================================
# Load
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class LoadTests(JobsTestCase):
    def test_concurrent_runs(self):
        n = 20
        script = 'echo "out-$1"; echo "err-$1" >&2; exit "$2"'

        def one(i):
            return self.cli(
                "run", "--snapshot-after", "0", "--", SH, "-c", script, "sh", i, i % 5, timeout=60
            )

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(one, range(n)))
        for r in runs:
            self.assertEqual(r.code, 0, r)
        ids = [r.json["job_id"] for r in runs]
        self.assertEqual(len(set(ids)), n)
        running = wait_until(lambda: not self.ok("list", "--all", "--state", "running")["jobs"], 30)
        self.assertTrue(running, "jobs still running after 30 s")
        lst = self.ok("list", "--all", "--limit", "0")
        self.assertEqual(sorted(e["job_id"] for e in lst["jobs"]), sorted(ids))
        by_id = {e["job_id"]: e for e in lst["jobs"]}
        for i, jid in enumerate(ids):
            self.assertEqual(by_id[jid]["state"], "exited", by_id[jid])
            self.assertEqual(by_id[jid].get("exit_code"), i % 5, by_id[jid])
            d = self.job_dir(jid)
            self.assertEqual(self.read_bytes(os.path.join(d, "stdout.log")), b"out-%d\n" % i)
            self.assertEqual(self.read_bytes(os.path.join(d, "stderr.log")), b"err-%d\n" % i)
            rows = self.read_bytes(os.path.join(d, "full.log")).splitlines()
            texts = sorted(ROW_RE.sub(b"", row) for row in rows)
            self.assertEqual(texts, [b"err-%d" % i, b"out-%d" % i])

        def temp_files():
            found = []
            for dirpath, _dirs, files in os.walk(self.root):
                found += [os.path.join(dirpath, f) for f in files if "tmp" in f]
            return found

        wait_until(lambda: not temp_files(), 3)
        self.assertEqual(temp_files(), [])

    def test_many_job_directories(self):
        n = 2000
        jid = self.ok("run", "--wait", "--", "echo", "real")["job_id"]
        src = self.job_dir(jid)
        names = [n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n))]
        # Copies by hard link: the same bytes under new ids, at a fraction of the cost.
        for _ in range(n):
            d = os.path.join(self.root, agent_exec.new_ulid())
            os.mkdir(d, 0o700)
            for name in names:
                try:
                    os.link(os.path.join(src, name), os.path.join(d, name))
                except OSError:
                    shutil.copyfile(os.path.join(src, name), os.path.join(d, name))
        t0 = time.monotonic()
        lst = self.ok("list", "--all", "--limit", "50", timeout=60)
        took = time.monotonic() - t0
        self.assertEqual(len(lst["jobs"]), 50)
        self.assertIs(lst["truncated"], True)
        self.assertLess(took, 10.0)
        t0 = time.monotonic()
        s = self.ok("status", jid)
        self.assertLess(time.monotonic() - t0, 5.0)
        self.assertEqual(s["state"], "exited")
        self.assertEqual(s["exit_code"], 0)
        self.assertEqual(self.ok("tail", jid)["stdout_tail"], "real\n")


# ==========================================================================
# The clock
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class ClockTests(JobsTestCase):
    def test_duration_is_measured_on_a_monotonic_clock(self):
        j = self.ok("run", "--wait", "--", "sleep", "0.3", timeout=30)
        s = self.ok("status", j["job_id"])
        self.assertGreaterEqual(s["duration_ms"], 250, s)
        self.assertLessEqual(s["duration_ms"], 5000, s)

    def test_timeout_fires_on_time(self):
        t0 = time.monotonic()
        j = self.ok("run", "--wait", "--timeout", "500", "--", "sleep", "30", timeout=30)
        took = time.monotonic() - t0
        self.assertEqual(j["state"], "killed", j)
        s = self.ok("status", j["job_id"])
        self.assertGreaterEqual(s["duration_ms"], 450, s)
        self.assertLess(s["duration_ms"], 10000, s)
        self.assertLess(took, 20.0)


# flock(2), by machine: where a `wait` parks on the job's lock.
_FLOCK_SYSCALL = {"x86_64": 73, "aarch64": 32}


def _in_flock(pid):
    """True when a thread of ``pid`` is blocked in flock(2) (Linux); elsewhere
    True after a fixed wait, as the test did before."""
    number = _FLOCK_SYSCALL.get(os.uname().machine)
    if not os.path.isdir("/proc/%d/task" % pid) or number is None:
        time.sleep(0.4)
        return True
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/syscall" % (pid, tid)) as f:
                if f.read().split()[:1] == [str(number)]:
                    return True
        except (OSError, IndexError):
            continue
    return False


if __name__ == "__main__":
    unittest.main()
