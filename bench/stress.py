#!/usr/bin/env python3
"""Stress run for agent-exec: the reliability cases at full size.

    python3 bench/stress.py              # full size (about 5-10 minutes)
    python3 bench/stress.py --quick      # scaled down (about a minute)
    python3 bench/stress.py --json out.json
    python3 bench/stress.py --only output,load

Every figure is printed with its bound and PASS or FAIL; the exit
status is 0 only when every figure passes.  The script drives the real CLI
(``python3 agent_exec.py``) against a temp jobs root of its own, kills every
process it started and removes the root at the end.  Standard library only;
Linux only (it reads /proc).

tests/test_supervisor.py, tests/test_kill.py and tests/test_store.py hold the
scaled-down twin of every case here.
"""

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, "agent_exec.py")
PY = sys.executable
SH = "/bin/sh"

sys.path.insert(0, REPO)
from tests._procs import (  # noqa: E402  (the repository is on sys.path only now)
    FLOOD_STDERR_THEN_STDOUT,
    GEN_NO_NEWLINE,
    MIB,
    RACE_DRIVER,
    ZOMBIE_DRIVER,
    ROW_MAX,
    ROW_RE,
    file_sha,
    fsize_limit,
    hanging_hook,
    kill_jobs_in,
    kill_quietly,
    kill_recorded,
    mount_tiny_tmpfs,
    pid_alive,
    pids_running,
    proc_stat,
    unmount_tiny_tmpfs,
    vmrss_kb,
    wait_until,
    writer_code,
    zombies_of,
)

# (full, quick) sizes of every case.
SIZES = {
    "kill_race_trials": (200, 40),
    "zombie_jobs": (50, 10),
    "output_mib": (1024, 64),
    "max_output_mib": (256, 32),
    "notify_jobs": (100, 20),
    "load_runs": (200, 40),
    "job_dirs": (20000, 2000),
}


# ---- the harness --------------------------------------------------------------


class Stress:
    def __init__(self, quick, base):
        self.quick = quick
        self.base = base
        self.root = os.path.join(base, "root")
        self.results = []
        self.sleeps = []  # argvs of unique sleeps to kill at the end
        self.env = dict(os.environ)
        for key in ("AGENT_EXEC_LOG", "RUST_LOG"):
            self.env.pop(key, None)
        self.env["AGENT_EXEC_ROOT"] = self.root

    def size(self, key):
        full, quick = SIZES[key]
        return quick if self.quick else full

    # -- running the CLI --

    def cli(self, *args, timeout=120, env=None):
        proc = subprocess.run(
            [PY, SCRIPT] + [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env or self.env,
            cwd=self.base,
            timeout=timeout,
        )
        try:
            obj = json.loads(proc.stdout.decode())
        except ValueError:
            # Not one JSON object: keep what came out, for the report.
            obj = {
                "_not_json_stdout": proc.stdout.decode("utf-8", "replace")[-2000:],
                "_stderr": proc.stderr.decode("utf-8", "replace")[-2000:],
            }
        return proc.returncode, obj

    def ok(self, *args, **kw):
        code, obj = self.cli(*args, **kw)
        if code != 0 or not isinstance(obj, dict) or not obj.get("ok"):
            raise RuntimeError(
                "agent-exec %s failed (%s): %r" % (" ".join(map(str, args)), code, obj)
            )
        return obj

    def start(self, *cmd, opts=()):
        return self.ok("run", "--snapshot-after", "0", *opts, "--", *cmd)["job_id"]

    def state(self, jid):
        with open(os.path.join(self.root, jid, "state.json")) as f:
            return json.load(f)

    def job_pids(self, jid):
        wait_until(lambda: isinstance(self.state(jid).get("pid"), int), 5)
        st = self.state(jid)
        return st["pid"], st["supervisor_pid"]

    def unique_sleeps(self, n):
        base = random.randint(100000, 999999) * 10
        durs = [str(base + k + 1) for k in range(n)]
        self.sleeps += [["sleep", d] for d in durs]
        return durs

    # -- figures --

    def record(self, case, name, value, unit, bound, passed, detail=""):
        row = {
            "case": case,
            "figure": name,
            "value": value,
            "unit": unit,
            "bound": bound,
            "pass": bool(passed),
        }
        if detail:
            row["detail"] = detail
        self.results.append(row)
        shown = ("%.3f" % value) if isinstance(value, float) else str(value)
        print(
            "  %-4s %-44s %14s %-6s (bound: %s)%s"
            % (
                "PASS" if passed else "FAIL",
                name,
                shown,
                unit,
                bound,
                ("  -- " + detail) if detail and not passed else "",
            ),
            flush=True,
        )

    def cleanup(self):
        kill_quietly(pids_running(self.sleeps))
        for root in (self.root, os.path.join(self.base, "tiny", "root")):
            kill_jobs_in(root)

    # ==== the cases ==========================================================

    def case_supervisor_lost(self):
        jid = self.start("sleep", "60")
        pid, sup = self.job_pids(jid)
        try:
            waiter = subprocess.Popen(
                [PY, SCRIPT, "wait", "--timeout-ms", "30000", jid],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
            time.sleep(0.5)
            t0 = time.monotonic()
            os.kill(sup, signal.SIGKILL)

            def answer(args):
                obj = self.ok(*args) if args else json.loads(waiter.communicate(timeout=30)[0])
                return obj, time.monotonic() - t0

            # The waiter, a status and a list, all at once from the moment of the kill.
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                fw = pool.submit(answer, None)
                fs = pool.submit(answer, ("status", jid))
                fl = pool.submit(answer, ("list", "--all", "--limit", "5"))
                (w, t_wait), (s, t_status), (lst, t_list) = fw.result(), fs.result(), fl.result()
            mine = [e["state"] for e in lst["jobs"] if e["job_id"] == jid]
            good = (
                w.get("state") == "failed"
                and s.get("state") == "failed"
                and (s.get("failure") or {}).get("code") == "supervisor_lost"
                and mine == ["failed"]
            )
            detail = "wait=%s status=%s list=%s" % (w.get("state"), s.get("state"), mine)
            self.record(
                "supervisor_lost", "reported failed/supervisor_lost", good, "", "true", good, detail
            )
            for what, t in (("wait", t_wait), ("status", t_status), ("list", t_list)):
                self.record(
                    "supervisor_lost", "%s answered after SIGKILL" % what, t, "s", "< 1 s", t < 1.0
                )
        finally:
            kill_recorded(self.state(jid))
        # An earlier boot: the live job's state.json gets another boot id.
        jid = self.start("sleep", "60")
        pid, sup = self.job_pids(jid)
        try:
            st = self.state(jid)
            st["boot_id"] = "00000000-0000-4000-8000-000000000000"
            path = os.path.join(self.root, jid, "state.json")
            with open(path + ".bench", "w") as f:
                json.dump(st, f)
            os.replace(path + ".bench", path)
            s = self.ok("status", jid)
            code = (s.get("failure") or {}).get("code")
            good = s.get("state") == "failed" and code == "supervisor_lost"
            self.record(
                "supervisor_lost",
                "earlier boot_id is failed/supervisor_lost",
                good,
                "",
                "true",
                good,
                repr(s),
            )
        finally:
            kill_recorded(self.state(jid))

    def case_pid_reuse(self):
        jid = self.start("sleep", "60")
        pid, sup = self.job_pids(jid)
        os.kill(sup, signal.SIGKILL)
        kill_quietly([pid], group=True)
        wait_until(lambda: not pid_alive(pid) and not pid_alive(sup), 5)
        (dur,) = self.unique_sleeps(1)
        victim = subprocess.Popen(["sleep", dur], start_new_session=True)
        try:
            time.sleep(0.1)
            st = self.state(jid)
            st.update(pid=victim.pid, pgid=victim.pid, pid_start_time="12345")
            path = os.path.join(self.root, jid, "state.json")
            with open(path + ".bench", "w") as f:
                json.dump(st, f)
            os.replace(path + ".bench", path)
            self.cli("kill", "--signal", "KILL", jid)
            time.sleep(0.3)
            spared = victim.poll() is None
            self.record(
                "pid_reuse", "foreign pid with wrong start time spared", spared, "", "true", spared
            )
        finally:
            kill_quietly([victim.pid], group=True)
            victim.wait()

    def case_kill_race(self):
        n = self.size("kill_race_trials")
        workers = 4
        seed = random.randrange(1 << 30)
        events = os.path.join(self.base, "race-events.ndjson")
        per = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
        first = [sum(per[:w]) for w in range(workers)]

        def driver(w):
            proc = subprocess.run(
                [PY, "-c", RACE_DRIVER, self.root, self.base, events, str(seed)]
                + [str(first[w]), str(per[w])],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=REPO,
                timeout=900,
            )
            if proc.returncode != 0:
                raise RuntimeError("race driver failed: %s" % proc.stderr.decode()[-500:])
            return json.loads(proc.stdout.decode())

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            trials = [t for batch in pool.map(driver, range(workers)) for t in batch]
        took = time.monotonic() - t0
        problems = []
        for t in trials:
            w = t.get("w") or {}
            if "run" in t or t.get("krc") != 0 or t.get("wrc") != 0:
                problems.append("trial %d failed: %r" % (t["i"], t))
            elif w.get("state") == "exited":
                if w.get("exit_code") != 3 or w.get("signal") is not None:
                    problems.append("exited wrongly: %r" % w)
            elif w.get("state") == "killed":
                if w.get("signal") != "SIG" + t["sig"] or w.get("exit_code") not in (None, 3):
                    problems.append("killed wrongly (sent %s): %r" % (t["sig"], w))
            else:
                problems.append("state %r" % w)
        # Terminal exactly once: a later read agrees with what wait said.
        time.sleep(0.2)
        listed = {e["job_id"]: e for e in self.ok("list", "--all", "--limit", "0")["jobs"]}
        for t in trials:
            e = listed.get(t.get("jid"), {})
            for key in ("state", "exit_code", "signal", "finished_at"):
                if e.get(key) != (t.get("w") or {}).get(key):
                    problems.append("list disagrees on %s: %r vs %r" % (key, e, t.get("w")))
        out = [(t.get("jid"), (t.get("w") or {}).get("state")) for t in trials]
        exited = sum(1 for _, s in out if s == "exited")
        killed = sum(1 for _, s in out if s == "killed")
        raced = sum(
            1 for t in trials if (t.get("k") or {}).get("sent") and t["w"]["state"] == "exited"
        )

        def count():
            try:
                with open(events) as f:
                    return [json.loads(x)["job_id"] for x in f.read().splitlines()]
            except OSError:
                return []

        wait_until(lambda: len(count()) >= n, 30)
        time.sleep(0.5)
        evs = count()
        once = sorted(evs) == sorted(j for j, _ in out)
        self.record(
            "kill_race",
            "trials ending wrongly (of %d; %d exited, %d killed)" % (n, exited, killed),
            len(problems),
            "",
            "0",
            not problems,
            "seed=%d %s" % (seed, problems[:3]),
        )
        self.record(
            "kill_race",
            "jobs with != 1 completion event",
            n if not once else 0,
            "",
            "0",
            once,
            "%d events" % len(evs),
        )
        self.record("kill_race", "kills sent that lost the race to exit", raced, "", "info", True)
        self.record("kill_race", "wall time", took, "s", "info", True)

    def case_torn_writes(self):
        jid = self.start("sleep", "3", opts=("--progress-every", "10"))
        self.job_pids(jid)
        path = os.path.join(self.root, jid, "state.json")
        errors = reads = 0
        stamps = set()
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                with open(path, "rb") as f:
                    stamps.add(json.loads(f.read().decode())["updated_at"])
            except (OSError, ValueError, KeyError, TypeError):
                errors += 1
            reads += 1
        self.ok("wait", "--timeout-ms", "10000", jid)
        self.record("torn_writes", "parse errors in %d reads" % reads, errors, "", "0", errors == 0)
        self.record(
            "torn_writes",
            "distinct updated_at seen in 2 s",
            len(stamps),
            "",
            "> 20",
            len(stamps) > 20,
        )

    def case_zombies(self):
        n = self.size("zombie_jobs")
        proc = subprocess.run(
            [PY, "-c", ZOMBIE_DRIVER, self.root, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=600,
        )
        out = json.loads(proc.stdout.decode()) if proc.returncode == 0 else None
        if out is not None:
            finals = [f for _rc, f in out["finals"][:n]]
            out["bad"] = [
                f
                for i, f in enumerate(finals)
                if f.get("state") != "exited" or f.get("exit_code") != i % 3
            ]
        if out is None:
            self.record(
                "zombies",
                "in-process script",
                proc.returncode,
                "exit",
                "0",
                False,
                proc.stderr.decode()[-300:],
            )
            return
        self.record(
            "zombies",
            "zombies after %d in-process runs" % n,
            len(out["zombies"]),
            "",
            "0",
            not out["zombies"],
        )
        self.record(
            "zombies",
            "children left after %d runs" % n,
            len(out["children"]),
            "",
            "0",
            not out["children"],
        )
        self.record(
            "zombies",
            "jobs with a wrong result",
            len(out["bad"]),
            "",
            "0",
            not out["bad"],
            repr(out["bad"][:2]),
        )
        # The supervisor reaps the orphans it adopts.
        jid = self.start(SH, "-c", "(sleep 0.3 & echo $!); exec sleep 30")
        pid, sup = self.job_pids(jid)
        log = os.path.join(self.root, jid, "stdout.log")

        def gpid():
            with open(log) as f:
                t = f.read().strip()
            return int(t) if t.isdigit() else None

        g = wait_until(gpid, 5)
        wait_until(lambda: not pid_alive(g), 5, 0.005)
        t0 = time.monotonic()
        reaped = wait_until(lambda: not zombies_of(sup) and proc_stat(g) is None, 3, 0.005)
        took = time.monotonic() - t0
        self.ok("kill", "--signal", "KILL", jid)
        self.record(
            "zombies",
            "adopted orphan reaped after exit",
            took,
            "s",
            "< 1 s",
            bool(reaped) and took < 1.0,
        )

    def case_tree_kill(self):
        for how in ("timeout", "kill"):
            durs = self.unique_sleeps(4)
            script = 'sleep %s & setsid sleep %s & (setsid sh -c "sleep %s" &); sleep %s' % tuple(
                durs
            )
            argvs = [["sleep", d] for d in durs]
            t0 = time.monotonic()
            opts = ("--timeout", "1000", "--kill-after", "1000") if how == "timeout" else ()
            jid = self.start(SH, "-c", script, opts=opts)
            up = wait_until(lambda a=argvs: len(pids_running(a)) == 4, 5)
            if how == "kill":
                t0 = time.monotonic()
                self.ok("kill", jid)
            gone = wait_until(
                lambda a=argvs: not pids_running(a), max(0.1, t0 + 4.0 - time.monotonic())
            )
            left = len(pids_running(argvs))
            self.ok("wait", "--timeout-ms", "10000", jid)
            self.record(
                "tree_kill",
                "survivors 4 s after start (%s)"
                % ("--timeout 1000" if how == "timeout" else "kill"),
                left,
                "",
                "0",
                bool(up) and bool(gone) and left == 0,
                "tree up: %s" % bool(up),
            )

    def case_output(self):
        mib = self.size("output_mib")
        # Baseline: the same bytes through `tee` into two files on this disk,
        # as agent-exec writes them twice (stdout.log and full.log).
        base_file = os.path.join(self.base, "baseline.out")
        t0 = time.monotonic()
        with open(base_file, "wb") as f:
            gen = subprocess.Popen([PY, "-c", GEN_NO_NEWLINE, str(mib)], stdout=subprocess.PIPE)
            tee = subprocess.Popen(["tee", base_file + "2"], stdin=gen.stdout, stdout=f)
            gen.stdout.close()
            tee.wait(timeout=600)
            gen.wait(timeout=600)
        baseline = time.monotonic() - t0
        want = file_sha(base_file)
        os.unlink(base_file)
        os.unlink(base_file + "2")

        t0 = time.monotonic()
        jid = self.start(PY, "-c", GEN_NO_NEWLINE, str(mib))
        _, sup = self.job_pids(jid)
        peak = 0
        deadline = time.monotonic() + 900
        while pid_alive(sup) and time.monotonic() < deadline:
            rss = vmrss_kb(sup)
            if rss:
                peak = max(peak, rss)
            time.sleep(0.01)
        wall = time.monotonic() - t0
        w = self.ok("wait", "--timeout-ms", "60000", jid)
        s = self.ok("status", jid)
        out = os.path.join(self.root, jid, "stdout.log")
        size = os.path.getsize(out)
        exact = size == mib * MIB and file_sha(out) == want
        longest = 0
        bad_rows = 0
        h = hashlib.sha256()
        with open(os.path.join(self.root, jid, "full.log"), "rb") as f:
            for row in f:
                m = ROW_RE.match(row)
                if not m or not row.endswith(b"\n"):
                    bad_rows += 1
                    continue
                text = row[m.end() : -1]
                longest = max(longest, len(text))
                h.update(text)
        full_exact = h.hexdigest() == want
        rate = mib / wall
        self.record(
            "output",
            "%d MiB, no newline: state" % mib,
            w["state"],
            "",
            "exited",
            w["state"] == "exited",
        )
        self.record("output", "job duration_ms", s.get("duration_ms"), "ms", "info", True)
        self.record("output", "throughput through agent-exec", rate, "MiB/s", "info", True)
        self.record("output", "baseline `tee file2 > file1` time", baseline, "s", "info", True)
        # "At full speed": the job's own run time under the supervisor, against
        # the same bytes written to two files by `tee`.
        ratio = (s.get("duration_ms") or 0) / 1000.0 / baseline
        self.record(
            "output",
            "job duration / baseline",
            ratio,
            "x",
            "<= 3",
            0 < ratio <= 3.0,
        )
        self.record(
            "output",
            "supervisor peak VmRSS",
            peak / 1024.0,
            "MiB",
            "< 64 MiB",
            0 < peak < 64 * 1024,
        )
        self.record(
            "output", "stdout.log size and sha256 exact", exact, "", "true", exact, "size=%d" % size
        )
        self.record(
            "output", "full.log longest row text", longest, "B", "<= 65536", longest <= ROW_MAX
        )
        self.record("output", "full.log malformed rows", bad_rows, "", "0", bad_rows == 0)
        self.record(
            "output", "full.log rows rebuild stdout exactly", full_exact, "", "true", full_exact
        )
        shutil.rmtree(os.path.join(self.root, jid), True)
        t0 = time.monotonic()
        j = self.ok("run", "--wait", "--", PY, "-c", FLOOD_STDERR_THEN_STDOUT, timeout=120)
        took = time.monotonic() - t0
        sizes = (os.path.getsize(j["stderr_log_path"]), os.path.getsize(j["stdout_log_path"]))
        good = j["state"] == "exited" and sizes == (10000000, 10000000)
        self.record(
            "output",
            "10 MB stderr then 10 MB stdout",
            took,
            "s",
            "no deadlock, exact",
            good,
            repr(sizes),
        )

    def case_max_output(self):
        mib = self.size("max_output_mib")
        cap = MIB
        code = (
            "import os, sys\n"
            "z = b'z' * 53\n"
            "for i in range(int(sys.argv[1]) * 16):\n"
            "    os.write(1, b''.join(b'%09d %s\\n' % (i * 1024 + k, z) for k in range(1024)))\n"
        )
        # Each row: 9 digits + space + 53 z + newline = 64 bytes; 1024 rows = 64 KiB.
        jid = self.start(PY, "-c", code, str(mib), opts=("--max-output", "1M"))
        path = os.path.join(self.root, jid, "stdout.log")
        peak = 0
        while True:
            try:
                peak = max(peak, os.path.getsize(path))
            except OSError:
                pass
            if self.state(jid)["job"]["status"] != "running":
                break
            time.sleep(0.005)
        w = self.ok("wait", "--timeout-ms", "60000", jid)
        s = self.ok("status", jid)
        t = self.ok("tail", "--tail-lines", "1", jid)
        total = mib * MIB
        kept = os.path.getsize(path)
        last = mib * 16 * 1024 - 1
        good_end = t["stdout_tail"] == "%09d %s\n" % (last, "z" * 53)
        self.record(
            "max_output",
            "%d MiB with --max-output 1M: state" % mib,
            w["state"],
            "",
            "exited",
            w["state"] == "exited",
        )
        self.record("max_output", "peak stdout.log size", peak, "B", "<= 1 MiB", peak <= cap)
        self.record(
            "max_output",
            "tail shows the last line",
            good_end,
            "",
            "true",
            good_end,
            repr(t["stdout_tail"][-80:]),
        )
        dropped = s.get("stdout_dropped_bytes")
        self.record(
            "max_output",
            "dropped bytes == written - kept",
            dropped,
            "B",
            "%d" % (total - kept),
            dropped == total - kept and t.get("stdout_dropped_bytes") == dropped,
        )

    def case_notify(self):
        hook_opts, hook = hanging_hook()
        self.sleeps.append(hook)
        j = self.ok("run", "--wait", *hook_opts, "--", "true")
        ev_path = os.path.join(self.root, j["job_id"], "completion_event.json")
        t0 = time.monotonic()

        def results():
            try:
                with open(ev_path) as f:
                    return json.load(f).get("delivery_results")
            except (OSError, ValueError):
                return None

        res = wait_until(results, 40)
        took = time.monotonic() - t0
        timed_out = bool(res) and res[0].get("timed_out") is True and res[0].get("success") is False
        self.record(
            "notify",
            "hanging sink killed, timed_out: true",
            timed_out,
            "",
            "true",
            timed_out,
            repr(res),
        )
        self.record(
            "notify",
            "hanging sink settled after job end",
            took,
            "s",
            "< 2 s (timeout 500 ms)",
            took < 2.0,
        )
        n = self.size("notify_jobs")
        events = os.path.join(self.base, "shared", "events.ndjson")

        def one(i):
            return self.start(SH, "-c", "exit %d" % (i % 4), opts=("--notify-file", events))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(one, range(n)))

        def lines():
            try:
                with open(events, "rb") as f:
                    return f.read().split(b"\n")[:-1]
            except OSError:
                return []

        wait_until(lambda: len(lines()) >= n, 60)
        time.sleep(0.5)
        raw = lines()
        valid = 0
        got = []
        for line in raw:
            try:
                got.append(json.loads(line.decode())["job_id"])
                valid += 1
            except (ValueError, KeyError, TypeError):
                pass
        good = valid == len(raw) == n and sorted(got) == sorted(ids)
        self.record(
            "notify",
            "valid lines from %d jobs, one file" % n,
            valid,
            "",
            "== %d" % n,
            good,
            "%d lines" % len(raw),
        )

    def case_load(self):
        n = self.size("load_runs")
        script = 'echo "out-$1"; echo "err-$1" >&2; exit "$2"'
        t0 = time.monotonic()

        def one(i):
            return self.cli(
                "run", "--snapshot-after", "0", "--", SH, "-c", script, "sh", i, i % 5, timeout=300
            )

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(one, range(n)))
        t_runs = time.monotonic() - t0
        failed_runs = [(i, r) for i, r in enumerate(runs) if r[0] != 0]
        started = [(i, r[1]["job_id"]) for i, r in enumerate(runs) if r[0] == 0]
        ids = [jid for _, jid in started]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            waits = list(pool.map(lambda j: self.cli("wait", "--timeout-ms", "60000", j)[1], ids))
        wrong = 0
        for (i, jid), w in zip(started, waits):
            d = os.path.join(self.root, jid)
            with open(os.path.join(d, "stdout.log"), "rb") as f:
                out = f.read()
            with open(os.path.join(d, "stderr.log"), "rb") as f:
                err = f.read()
            if w.get("state") != "exited" or w.get("exit_code") != i % 5:
                wrong += 1
            elif out != b"out-%d\n" % i or err != b"err-%d\n" % i:
                wrong += 1

        def temps():
            found = []
            for _dirpath, _d, files in os.walk(self.root):
                found += [f for f in files if "tmp" in f]
            return found

        wait_until(lambda: not temps(), 5)
        self.record(
            "load",
            "%d concurrent runs: failed runs" % n,
            len(failed_runs),
            "",
            "0",
            not failed_runs,
            repr(failed_runs[:2]),
        )
        self.record(
            "load",
            "distinct job ids",
            len(set(ids)),
            "",
            "== %d" % len(ids),
            len(set(ids)) == len(ids),
        )
        self.record("load", "jobs with wrong state or foreign output", wrong, "", "0", wrong == 0)
        self.record(
            "load",
            "temp files left in the root",
            len(temps()),
            "",
            "0",
            not temps(),
            repr(temps()[:3]),
        )
        self.record("load", "wall time of the %d runs" % n, t_runs, "s", "info", True)

    def case_job_dirs(self):
        n = self.size("job_dirs")
        sys.path.insert(0, REPO)
        import agent_exec

        jid = self.ok("run", "--wait", "--", "echo", "real")["job_id"]
        # The same job in a root of its own: what `status` costs unaffected.
        small_env = dict(self.env, AGENT_EXEC_ROOT=os.path.join(self.base, "root-small"))
        small = self.ok("run", "--wait", "--", "echo", "real", env=small_env)["job_id"]
        src = os.path.join(self.root, jid)
        files = {}
        for name in os.listdir(src):
            p = os.path.join(src, name)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    files[name] = f.read()
        for _ in range(n):
            d = os.path.join(self.root, agent_exec.new_ulid())
            os.mkdir(d, 0o700)
            for name, data in files.items():
                fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
        count = len(os.listdir(self.root))

        def timed(*args, **kw):
            t0 = time.monotonic()
            obj = self.ok(*args, **kw)
            return time.monotonic() - t0, obj

        t_list, t_big, t_small = [], [], []
        for _ in range(5):  # interleaved, so machine load hits both sides alike
            t, lst = timed("list", "--all", "--limit", "50")
            t_list.append(t)
            t, s = timed("status", jid)
            t_big.append(t)
            t, s_small = timed("status", small, env=small_env)
            t_small.append(t)
        good = len(lst["jobs"]) == 50 and lst["truncated"] is True
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        self.record(
            "job_dirs",
            "list --limit 50 over %d dirs (median of 5)" % count,
            med(t_list),
            "s",
            "< 2 s",
            good and med(t_list) < 2.0,
        )
        self.record(
            "job_dirs",
            "status with %d dirs (1-job root: %.3fs)" % (count, med(t_small)),
            med(t_big),
            "s",
            "<= 1.5 x 1-job root + 50 ms",
            s["state"] == "exited" and med(t_big) <= 1.5 * med(t_small) + 0.05,
        )

    def case_disk_errors(self):
        code = writer_code(64, "x", 7)
        proc = subprocess.run(
            [PY, SCRIPT, "run", "--wait", "--", PY, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=fsize_limit(256 * 1024),
            timeout=120,
        )
        j = json.loads(proc.stdout.decode())
        st = self.state(j["job_id"])
        good = j.get("state") == "exited" and j.get("exit_code") == 7 and bool(st.get("log_error"))
        self.record(
            "disk_errors",
            "RLIMIT_FSIZE: exit code kept, log_error",
            good,
            "",
            "true",
            good,
            repr(j),
        )
        j = self.ok("run", "--wait", "--log", "/dev/full", "--", SH, "-c", "echo hi; exit 5")
        s = self.ok("status", j["job_id"])
        good = s.get("exit_code") == 5 and bool(s.get("log_error"))
        self.record("disk_errors", "--log /dev/full: log_error", good, "", "true", good, repr(s))
        mnt = os.path.join(self.base, "tiny")
        if not mount_tiny_tmpfs(mnt)[0]:
            return
        root = os.path.join(mnt, "root")
        try:
            env = dict(self.env, AGENT_EXEC_ROOT=root)
            code = writer_code(80, "y", 4)
            rc, j = self.cli("run", "--wait", "--", PY, "-c", code, env=env)
            rc, s = self.cli("status", (j or {}).get("job_id", "x"), env=env)
            good = (
                (s or {}).get("state") == "exited"
                and s.get("exit_code") == 4
                and bool(s.get("log_error"))
            )
            self.record(
                "disk_errors",
                "1 MiB tmpfs, 5 MB output: result, log_error",
                good,
                "",
                "true",
                good,
                repr(s),
            )
        finally:
            self.cleanup()
            unmount_tiny_tmpfs(mnt, root)


CASES = [
    ("supervisor_lost", Stress.case_supervisor_lost),
    ("pid_reuse", Stress.case_pid_reuse),
    ("kill_race", Stress.case_kill_race),
    ("torn_writes", Stress.case_torn_writes),
    ("zombies", Stress.case_zombies),
    ("tree_kill", Stress.case_tree_kill),
    ("output", Stress.case_output),
    ("max_output", Stress.case_max_output),
    ("disk_errors", Stress.case_disk_errors),
    ("notify", Stress.case_notify),
    ("load", Stress.case_load),
    ("job_dirs", Stress.case_job_dirs),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (about a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    ap.add_argument(
        "--only",
        metavar="CASES",
        help="comma-separated case names: %s" % ", ".join(n for n, _ in CASES),
    )
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench/stress.py needs Linux (/proc)", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    if only and only - {n for n, _ in CASES}:
        ap.error("unknown case(s): %s" % ", ".join(sorted(only - {n for n, _ in CASES})))
    base = tempfile.mkdtemp(prefix="agent-exec-stress-")
    os.chmod(base, 0o700)
    bench = Stress(args.quick, base)
    t_start = time.monotonic()
    print(
        "agent-exec stress (%s) in %s, python %s"
        % ("quick" if args.quick else "full", base, sys.version.split()[0])
    )
    try:
        for name, fn in CASES:
            if only and name not in only:
                continue
            print("== %s" % name, flush=True)
            t0 = time.monotonic()
            try:
                fn(bench)
            except Exception as e:  # a crashed case is a failed figure, not a crashed run
                bench.record(
                    name,
                    "case completed",
                    False,
                    "",
                    "true",
                    False,
                    "%s: %s" % (type(e).__name__, e),
                )
            finally:
                bench.cleanup()
            print("   (%.1fs)" % (time.monotonic() - t0), flush=True)
    finally:
        bench.cleanup()
        with contextlib.suppress(Exception):
            subprocess.run(
                ["umount", "-l", os.path.join(base, "tiny")], stderr=subprocess.DEVNULL, timeout=20
            )
        shutil.rmtree(base, True)
    failed = [r for r in bench.results if not r["pass"]]
    total = time.monotonic() - t_start
    print("%d figures, %d failed, %.1fs" % (len(bench.results), len(failed), total))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "mode": "quick" if args.quick else "full",
                    "python": sys.version.split()[0],
                    "seconds": round(total, 1),
                    "failed": len(failed),
                    "results": bench.results,
                },
                f,
                indent=2,
            )
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
