"""The jobs store: ``list``, ``delete``, ``gc``, hostile job ids, an unsafe root."""

import json
import os
import shutil
import time
import unittest

from tests._jobs import DEV_SERVER, JobsTestCase, LINUX, ULID_RE, call_main, rfc3339, sibling_id
from tests._procs import wait_until
from tests._util import clone_job, only_regular


def _entries(root):
    """The root's entries, less the automatic clean-up's own files (.gc-*)."""
    return sorted(n for n in os.listdir(root) if not n.startswith(".gc"))


class ListTests(JobsTestCase):
    def test_default_lists_jobs_of_the_callers_cwd(self):
        da = self.mkdir("a")
        db = self.mkdir("b")
        link = os.path.join(self.tmp, "a-link")
        os.symlink(da, link)

        ja = self.finished("true", cwd=da)
        jb = self.ok("run", "--wait", "--cwd", db, "--", "true")["job_id"]
        jc = self.ok("run", "--wait", "--cwd", link, "--", "true")["job_id"]
        jt = self.finished("true")  # cwd = self.tmp

        self.assertEqual(sorted(self.list_ids(cwd=da)), sorted([ja, jc]))
        self.assertEqual(sorted(self.list_ids(cwd=link)), sorted([ja, jc]))
        self.assertEqual(self.list_ids(cwd=db), [jb])
        self.assertEqual(self.list_ids(), [jt])
        self.assertEqual(sorted(self.list_ids("--cwd", da)), sorted([ja, jc]))
        self.assertEqual(sorted(self.list_ids("--cwd", link)), sorted([ja, jc]))
        self.assertEqual(self.list_ids("--cwd", db, cwd=da), [jb])
        self.assertEqual(sorted(self.list_ids("--all", cwd=db)), sorted([ja, jb, jc, jt]))
        self.assertEqual(self.list_ids(cwd=self.tmp + "/./a/../b"), [jb])
        # a directory where no job ran
        self.assertEqual(self.list_ids("--cwd", self.mkdir("empty")), [])
        # a relative --cwd is taken from the caller's directory, then canonicalised
        self.assertEqual(sorted(self.list_ids("--cwd", "a")), sorted([ja, jc]))
        self.assertEqual(sorted(self.list_ids("--cwd", "./b/../a-link/")), sorted([ja, jc]))
        self.assertEqual(self.list_ids("--cwd", "..", cwd=db), [jt])
        jd = self.ok("run", "--wait", "--cwd", "b", "--", "true")["job_id"]
        self.assertEqual(sorted(self.list_ids(cwd=db)), sorted([jb, jd]))

        real_a = os.path.realpath(da)
        entries = {e["job_id"]: e for e in self.ok("list", "--all")["jobs"]}
        self.assertEqual(os.path.realpath(entries[ja]["cwd"]), real_a)
        self.assertEqual(os.path.realpath(entries[jc]["cwd"]), real_a)
        self.assertEqual(os.path.realpath(entries[jb]["cwd"]), os.path.realpath(db))
        self.assertTrue(os.path.isabs(entries[jc]["cwd"]), entries[jc])
        # meta.json keeps cwd absolute with symlinks resolved
        with open(os.path.join(self.job_dir(jc), "meta.json")) as f:
            self.assertEqual(json.load(f)["cwd"], real_a)

    def test_cwd_and_all_conflict(self):
        for args in (("--cwd", self.tmp, "--all"), ("--all", "--cwd", self.tmp)):
            with self.subTest(args=args):
                r = self.cli("list", *args)
                self.assertEqual(r.code, 2, r)
                self.assertIsInstance(r.json, dict, r)
                self.assertIs(r.json["ok"], False, r)
                self.assertEqual(r.json["error"]["code"], "usage_error", r)
                self.assertIn("usage", r.stderr.lower(), r)

    def test_state_filter(self):
        je = self.finished("true")
        jf = self.finished("false")
        jk = self.running("sleep", "30")
        self.ok("kill", "--signal", "KILL", jk)
        self.assertEqual(self.wait_job(jk)["state"], "killed")
        jx = self.craft_failed(je)
        failed = {jx}
        # a real failed job: the file is executable, its interpreter is missing
        script = os.path.join(self.tmp, "bad-interp.sh")
        with open(script, "w") as f:
            f.write("#!/nonexistent/interpreter\necho never\n")
        os.chmod(script, 0o755)
        r = self.cli("run", "--wait", "--", script)
        if r.json and r.json.get("ok") and r.json.get("state") == "failed":
            failed.add(r.json["job_id"])
        jr = self.running("sleep", "30")

        expected = {
            "exited": {je, jf},
            "killed": {jk},
            "failed": failed,
            "running": {jr},
        }
        for state, ids in expected.items():
            with self.subTest(state=state):
                j = self.ok("list", "--all", "--state", state)
                self.assertEqual({e["job_id"] for e in j["jobs"]}, ids, j)
                for e in j["jobs"]:
                    self.assertEqual(e["state"], state, e)
        with self.subTest(state="unknown"):
            j = self.ok("list", "--all", "--state", "unknown")
            for e in j["jobs"]:
                self.assertEqual(e["state"], "unknown", e)
            self.assertFalse({e["job_id"] for e in j["jobs"]} & {je, jf, jk, jx, jr}, j)

        # the state filter composes with the default cwd filter
        self.assertEqual(set(self.list_ids("--state", "exited")), {je, jf})
        self.assertEqual(self.list_ids("--state", "exited", cwd=self.mkdir("elsewhere")), [])

        entries = {e["job_id"]: e for e in self.ok("list", "--all")["jobs"]}
        self.assertEqual(set(entries), {je, jf, jk, jr} | failed)
        self.assertEqual(entries[je].get("exit_code"), 0, entries[je])
        self.assertEqual(entries[jf].get("exit_code"), 1, entries[jf])
        for jid in (je, jf, jk):
            self.assertIsInstance(entries[jid].get("finished_at"), str, entries[jid])
        self.assertIsNone(entries[jr].get("exit_code"), entries[jr])
        self.assertIsNone(entries[jr].get("finished_at"), entries[jr])

        self.ok("kill", "--signal", "KILL", jr)
        self.assertEqual(self.wait_job(jr)["state"], "killed")

    def test_bad_state_is_usage_error(self):
        # one value through the CLI; every bad value: test_units.OptionValueWiringTests
        for bad in ("finished",):
            with self.subTest(state=bad):
                r = self.cli("list", "--all", "--state", bad)
                self.assertEqual(r.code, 2, r)
                self.assertIsInstance(r.json, dict, r)
                self.assertEqual(r.json["error"]["code"], "usage_error", r)

    def test_state_is_applied_before_limit(self):
        exited = [self.finished("true") for _ in range(3)]
        runners = [self.running("sleep", "30") for _ in range(2)]

        j = self.ok("list", "--all", "--state", "exited", "--limit", "2")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [exited[2], exited[1]], j)
        self.assertIs(j["truncated"], True, j)

        j = self.ok("list", "--all", "--state", "exited", "--limit", "3")
        self.assertEqual([e["job_id"] for e in j["jobs"]], exited[::-1], j)
        self.assertIs(j["truncated"], False, j)

        j = self.ok("list", "--all", "--state", "running", "--limit", "1")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [runners[1]], j)
        self.assertIs(j["truncated"], True, j)

        j = self.ok("list", "--all", "--limit", "2")
        self.assertEqual([e["job_id"] for e in j["jobs"]], runners[::-1], j)
        self.assertIs(j["truncated"], True, j)

        for jid in runners:
            self.ok("kill", "--signal", "KILL", jid)
        for jid in runners:
            self.wait_job(jid)

    def test_limit_truncated_order_and_fields(self):
        cmds = [["true"], ["echo", "a b"], ["false"], ["printf", "x"]]
        ids = []
        for cmd in cmds:
            ids.append(self.finished(*cmd))
            time.sleep(0.01)
        newest_first = ids[::-1]

        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], newest_first)
        self.assertIs(j["truncated"], False)
        self.assertEqual(j["skipped"], 0)
        self.assertIsInstance(j["root"], str)
        self.assertEqual(os.path.realpath(j["root"]), os.path.realpath(self.root))
        starts = [e["started_at"] for e in j["jobs"]]
        self.assertEqual(starts, sorted(starts, reverse=True))
        by_id = dict(zip(ids, cmds))
        for e in j["jobs"]:
            with self.subTest(job=e["job_id"]):
                for key in ("job_id", "state", "started_at", "command", "cwd"):
                    self.assertIn(key, e)
                self.assertTrue(ULID_RE.match(e["job_id"]), e)
                self.assertEqual(e["state"], "exited", e)
                self.assertEqual(e["command"], by_id[e["job_id"]], e)
                self.assertEqual(os.path.realpath(e["cwd"]), os.path.realpath(self.tmp), e)
                self.assertRegex(e["started_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
                # terminal jobs: finished_at and updated_at are known
                self.assertIsInstance(e.get("finished_at"), str, e)
                self.assertIsInstance(e.get("updated_at"), str, e)

        for limit, expect_trunc in (
            ("1", True),
            ("2", True),
            ("3", True),
            ("4", False),
            ("10", False),
        ):
            with self.subTest(limit=limit):
                j = self.ok("list", "--all", "--limit", limit)
                n = min(int(limit), 4)
                self.assertEqual([e["job_id"] for e in j["jobs"]], newest_first[:n], j)
                self.assertIs(j["truncated"], expect_trunc, j)
        # --limit with the default cwd filter
        j = self.ok("list", "--limit", "1")
        self.assertEqual([e["job_id"] for e in j["jobs"]], newest_first[:1])
        self.assertIs(j["truncated"], True)

    def test_bad_limit_is_usage_error(self):
        # one value through the CLI; every bad value: test_units.OptionValueWiringTests
        for bad in ("-1",):
            with self.subTest(limit=bad):
                r = self.cli("list", "--limit", bad)
                self.assertEqual(r.code, 2, r)
                self.assertIsInstance(r.json, dict, r)
                self.assertEqual(r.json["error"]["code"], "usage_error", r)

    def test_missing_root_gives_empty_list(self):
        missing = os.path.join(self.tmp, "does", "not", "exist")
        for args in ((), ("--all",), ("--state", "running"), ("--limit", "3")):
            with self.subTest(args=args):
                j = self.ok("--root", missing, "list", *args)
                self.assertEqual(j["jobs"], [])
                self.assertIs(j["truncated"], False)
                self.assertEqual(j["skipped"], 0)
        # also via $AGENT_EXEC_ROOT (self.root has not been created yet)
        self.assertFalse(os.path.exists(self.root))
        j = self.ok("list", "--all")
        self.assertEqual(j["jobs"], [])

    def test_empty_existing_root(self):
        self.finished("true")
        other = os.path.join(self.tmp, "other-root")
        self.ok("--root", other, "run", "--wait", "--", "true")
        shutil.rmtree(other)
        os.mkdir(other, 0o700)
        j = self.ok("--root", other, "list", "--all")
        self.assertEqual(j["jobs"], [])
        self.assertEqual(j["skipped"], 0)

    def test_corrupt_meta_counts_as_skipped(self):
        good = self.finished("true")
        bad = sibling_id(good)
        clone_job(self.job_dir(good), self.job_dir(bad), good, bad)
        with open(os.path.join(self.job_dir(bad), "meta.json"), "w") as f:
            f.write('{"schema_version": "0.1", "job": ')
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [good], j)
        self.assertEqual(j["skipped"], 1, j)
        # the other commands give one JSON object for it, never a traceback
        r = self.cli("status", bad)
        self.assertIsInstance(r.json, dict, r)
        self.assertIn(r.code, (0, 1), r)
        self.assertNotIn("Traceback", r.stderr, r)

    def test_meta_of_wrong_shape_counts_as_skipped(self):
        good = self.finished("true")
        bad = sibling_id(good)
        clone_job(self.job_dir(good), self.job_dir(bad), good, bad)
        with open(os.path.join(self.job_dir(bad), "meta.json"), "w") as f:
            f.write("[1, 2, 3]\n")
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [good], j)
        self.assertEqual(j["skipped"], 1, j)

    def test_missing_meta_counts_as_skipped(self):
        good = self.finished("true")
        bad = sibling_id(good)
        clone_job(self.job_dir(good), self.job_dir(bad), good, bad)
        os.unlink(os.path.join(self.job_dir(bad), "meta.json"))
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [good], j)
        self.assertEqual(j["skipped"], 1, j)

    def test_several_unreadable_dirs(self):
        good = self.finished("true")
        for n, content in ((2, "garbage"), (4, ""), (6, "\x00\xff")):
            bad = sibling_id(good, n)
            clone_job(self.job_dir(good), self.job_dir(bad), good, bad)
            with open(os.path.join(self.job_dir(bad), "meta.json"), "w") as f:
                f.write(content)
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [good], j)
        self.assertEqual(j["skipped"], 3, j)

    def test_state_json_of_wrong_shape_does_not_break_list(self):
        # One damaged job directory must not take the whole list down: the
        # others are listed, the damaged one is listed or counted in skipped.
        good = self.finished("true")
        bad = sibling_id(good)
        for content in ('{"job": 5}', "[1]", "{", '{"job": {"status": 3}, "result": []}'):
            clone_job(self.job_dir(good), self.job_dir(bad), good, bad)
            # (removed again before the tear-down reads the state files)
            self.addCleanup(shutil.rmtree, self.job_dir(bad), True)
            with open(os.path.join(self.job_dir(bad), "state.json"), "w") as f:
                f.write(content)
            with self.subTest(state_json=content):
                j = self.ok("list", "--all")
                ids = [e["job_id"] for e in j["jobs"]]
                self.assertIn(good, ids, j)
                self.assertEqual(len(ids) + j["skipped"], 2, j)
            shutil.rmtree(self.job_dir(bad))

    def test_non_job_entries_are_not_skipped(self):
        good = self.finished("true")
        shutil.copytree(
            self.job_dir(good), os.path.join(self.root, "not-a-job"), ignore=only_regular
        )
        os.mkdir(os.path.join(self.root, good[:25]))
        with open(os.path.join(self.root, "README.txt"), "w") as f:
            f.write("hello\n")
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [good], j)
        self.assertEqual(j["skipped"], 0, j)

    # ---- filters: --running, the command, readiness ----

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


class DeleteTests(JobsTestCase):
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
        self.assertEqual(_entries(self.root), [])

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


class GcTests(JobsTestCase):
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
        self.assertEqual(_entries(self.root), sorted(jobs[2:]))

    def test_max_jobs_keeps_the_newest(self):
        jobs = self.make_jobs(4)  # oldest first
        g = self.okv("gc", "--max-jobs", "2")
        self.assertEqual(sorted(g["job_ids"]), sorted(jobs[:2]))
        self.assertEqual(g["deleted"], 2)
        self.assertEqual(_entries(self.root), sorted(jobs[2:]))

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


# ==========================================================================
# Hostile job ids and jobs roots
# ==========================================================================


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class BadIdsTests(JobsTestCase):
    def test_nul_byte_ids_in_process(self):
        jid = self.ok("run", "--wait", "--", "true")["job_id"]
        before_root = sorted(os.listdir(self.root))
        before_tmp = sorted(os.listdir(self.tmp))
        bad_ids = ["\x00", jid[:10] + "\x00", jid + "\x00", "\x00" + jid, "../\x00/etc", "ab\x00cd"]
        for bad in bad_ids:
            for cmd in (["status"], ["tail"], ["wait", "--timeout-ms", "1000"], ["kill"]):
                with self.subTest(cmd=cmd[0], id=repr(bad)):
                    rc, out = call_main(["--root", self.root] + cmd + [bad])
                    self.assertEqual(rc, 1, out)
                    self.assertEqual(len(out.splitlines()), 1, out)
                    j = json.loads(out)
                    self.assertEqual(j["error"]["code"], "job_not_found", j)
        self.assertEqual(sorted(os.listdir(self.root)), before_root)
        self.assertEqual(sorted(os.listdir(self.tmp)), before_tmp)
        self.assertEqual(self.ok("status", jid)["state"], "exited")

    def test_nul_bytes_in_options_in_process(self):
        # A NUL can reach main() only in process; it must still be an expected
        # error (or a failed job), never an exception nobody caught.
        cases = [
            ["--root", "\x00", "run", "--snapshot-after", "0", "--", "true"],
            ["--root", "\x00", "status", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
            ["--root", "a\x00b", "list", "--all"],
            ["run", "--snapshot-after", "0", "--cwd", "\x00", "--", "true"],
            ["run", "--snapshot-after", "0", "--env-file", "a\x00b", "--", "true"],
            ["run", "--snapshot-after", "0", "--log", "a\x00b", "--", "true"],
            ["run", "--wait", "--notify-file", "a\x00b", "--", "true"],
            ["run", "--wait", "--", "true", "a\x00b"],
            ["run", "--wait", "--env", "A=b\x00c", "--", "true"],
            ["list", "--cwd", "a\x00b"],
        ]
        for argv in cases:
            if argv[0] != "--root":
                argv = ["--root", self.root] + argv
            with self.subTest(argv=argv):
                rc, out = call_main(argv)
                self.assertIn(rc, (0, 1, 2), out)
                self.assertEqual(len(out.splitlines()), 1, out)
                j = json.loads(out)
                if not j["ok"]:
                    self.assertNotEqual(j["error"]["code"], "internal_error", (argv, j))

    def test_more_hostile_ids_for_every_command(self):
        jid = self.ok("run", "--wait", "--", "true")["job_id"]
        bad_ids = [
            "~",
            "%2e%2e",
            ".." + "/" * 30,
            jid[:25] + "/",
            jid.lower()[:25] + "/",
            "\u0661\u0662\u0663\u0664",  # Arabic-Indic digits
            "0" * 26 + "\n",
            " " + jid,
        ]
        for bad in bad_ids:
            for cmd in (["status"], ["tail"], ["wait", "--timeout-ms", "1000"], ["kill"]):
                with self.subTest(cmd=cmd[0], id=repr(bad)):
                    rc, out = call_main(["--root", self.root] + cmd + [bad])
                    self.assertEqual(rc, 1, out)
                    self.assertEqual(json.loads(out)["error"]["code"], "job_not_found", out)


@unittest.skipUnless(LINUX, "these fault injections read /proc")
class InsecureRootTests(JobsTestCase):
    ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

    def assert_refused(self, root, needle=None):
        for args in (
            ("run", "--snapshot-after", "0", "--", "true"),
            ("status", self.ULID),
            ("tail", self.ULID),
            ("wait", "--timeout-ms", "1000", self.ULID),
            ("kill", self.ULID),
            ("list", "--all"),
        ):
            with self.subTest(args=args[0]):
                j = self.fail_with("insecure_root", "--root", root, *args)
                if needle:
                    self.assertIn(needle, j["error"]["message"])

    def test_symlink_root(self):
        real = os.path.join(self.tmp, "real-root")
        os.mkdir(real, 0o700)
        link = os.path.join(self.tmp, "link-root")
        os.symlink(real, link)
        self.assert_refused(link)
        self.assertEqual(os.listdir(real), [])

    def test_root_owned_by_someone_else(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to chown")
        root = os.path.join(self.tmp, "their-root")
        os.mkdir(root, 0o700)
        os.chown(root, 65534, 65534)
        self.assert_refused(root)
        self.assertEqual(os.listdir(root), [])

    def test_group_or_world_writable_root(self):
        for mode in (0o720, 0o702):
            with self.subTest(mode=oct(mode)):
                root = os.path.join(self.tmp, "root-%o" % mode)
                os.mkdir(root)
                os.chmod(root, mode)
                self.assert_refused(root, needle="chmod 700")
                self.assertEqual(os.listdir(root), [])


class LingeringTests(JobsTestCase):
    def test_delete_gc_refuse_and_list_marks_a_job_that_left_processes(self):
        other = self.ok("run", "--wait", "--", "true")["job_id"]
        jid = self.start_bg("sh", "-c", "sleep 30 > /dev/null 2>&1 & echo started")
        self.wait_job(jid)
        listing = {e["job_id"]: e for e in self.ok("list")["jobs"]}
        self.assertIs(listing[jid]["lingering"], True)
        self.assertIs(listing[other]["lingering"], False)
        only = [e["job_id"] for e in self.ok("list", "--lingering")["jobs"]]
        self.assertEqual(only, [jid])
        d = self.ok("delete", jid)
        self.assertEqual(d["deleted"], [])
        reason = d["refused"][0]["reason"]
        self.assertIn("1 process of the job still runs", reason)
        self.assertIn("agent-exec kill %s" % jid, reason)
        g = self.ok("gc", "--older-than", "0")
        self.assertEqual(g["job_ids"], [other])
        self.assertEqual([r["job_id"] for r in g["refused"]], [jid])
        self.assertTrue(os.path.isdir(self.job_dir(jid)))
        self.ok("kill", jid)
        self.assertTrue(wait_until(lambda: not self.ok("list", "--lingering")["jobs"], 10))
        self.assertEqual(self.ok("delete", jid)["deleted"], [jid])

    def test_gc_refuses_only_jobs_it_would_delete(self):
        jid = self.start_bg("sh", "-c", "sleep 30 > /dev/null 2>&1 & echo started")
        self.wait_job(jid)
        self.assertTrue(self.ok("list")["jobs"][0]["lingering"])
        g = self.ok("gc")  # 7 days: the job is too young to be collected at all
        self.assertEqual((g["job_ids"], g["refused"]), ([], []), g)

    def test_a_recycled_group_id_is_not_the_jobs(self):
        import signal
        import subprocess

        jid = self.ok("run", "--wait", "--", "true")["job_id"]
        # A stranger whose group id is the job's recorded pid: as if the pid
        # had been handed out again after the job ended.
        stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        path = os.path.join(self.job_dir(jid), "state.json")
        with open(path) as f:
            st = json.load(f)
        st["pid"] = st["pgid"] = stranger.pid
        with open(path, "w") as f:
            json.dump(st, f)
        self.assertFalse(self.ok("list")["jobs"][0]["lingering"])
        self.assertFalse(self.ok("kill", jid)["sent"])
        self.assertIsNone(stranger.poll())  # not signalled
        self.assertEqual(self.ok("delete", jid)["deleted"], [jid])
        stranger.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    unittest.main()
