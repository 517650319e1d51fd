"""`list` and the `schema` command's JSON Schema.

Every response of every command must validate against the schema that the
`schema` command returns. The check uses ``jsonschema`` (Draft7Validator) when
it is importable and the suite's own draft-07 subset validator otherwise (and
as a cross-check when both are there).
"""

import copy
import json
import os
import re
import shutil
import time
import unittest

from tests import _schema_check
from tests._util import CLITestCase, clone_job, only_regular

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def other_char(c):
    for x in reversed(CROCKFORD):
        if x != c:
            return x
    raise AssertionError("unreachable")


def sibling_id(job_id, n=6):
    """A ULID with the same timestamp as ``job_id`` but other last characters."""
    return job_id[: 26 - n] + "".join(other_char(c) for c in job_id[26 - n :])


def write_json_atomic(path, obj):
    tmp = path + ".tmp-test"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)


class JobsMixin:
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


class ListTests(JobsMixin, CLITestCase):
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
        for bad in ("bogus", "done", "finished", ""):
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
        for bad in ("abc", "-1", "1.5", ""):
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


def _mutations(valid_ok, valid_err):
    """(label, object) pairs that break the output contract."""
    out = []
    for key in ("schema_version", "ok", "type"):
        m = copy.deepcopy(valid_ok)
        del m[key]
        out.append(("ok response without %s" % key, m))
    m = copy.deepcopy(valid_ok)
    m["ok"] = "yes"
    out.append(("ok is a string", m))
    m = copy.deepcopy(valid_ok)
    m["schema_version"] = 1
    out.append(("schema_version is a number", m))
    m = copy.deepcopy(valid_err)
    del m["error"]
    out.append(("error envelope without error", m))
    m = copy.deepcopy(valid_err)
    del m["error"]["code"]
    out.append(("error without code", m))
    m = copy.deepcopy(valid_err)
    m["error"]["retryable"] = "no"
    out.append(("retryable is a string", m))
    out.append(("not an object", ["schema_version", "0.1"]))
    return out


def _typed_mutations(responses):
    """Per-command required fields removed from real responses."""
    required = {
        "status": ("job_id", "state"),
        "list": ("jobs", "root"),
        "run": ("job_id", "state"),
        "wait": ("job_id", "state"),
        "kill": ("job_id",),
        "tail": ("stdout_tail", "job_id"),
        "schema": ("schema",),
    }
    out = []
    seen = set()
    for _label, obj in responses:
        t = obj.get("type")
        if t in required and t not in seen:
            seen.add(t)
            for key in required[t]:
                m = copy.deepcopy(obj)
                m.pop(key, None)
                out.append(("%s without %s" % (t, key), m))
    return out


class SchemaTests(JobsMixin, CLITestCase):
    def setUp(self):
        super().setUp()
        j = self.ok("schema")
        self.assertEqual(j["schema_format"], "json-schema-draft-07")
        self.schema = j["schema"]
        self.schema_response = j
        self.validator_name, self.validate = _schema_check.best_validator()

    def assert_valid(self, responses):
        failures = []
        for label, obj in responses:
            errs = self.validate(obj, self.schema)
            if errs:
                failures.append("%s: %s\n    %s" % (label, errs[:5], json.dumps(obj)[:600]))
            if self.validator_name != "_schema_check":
                # cross-check the suite's own validator against jsonschema
                own = _schema_check.errors(obj, self.schema)
                self.assertEqual(bool(own), bool(errs), (label, own, errs))
        self.assertFalse(
            failures,
            "responses not valid against the schema (%s):\n%s"
            % (self.validator_name, "\n".join(failures)),
        )

    def test_schema_is_a_draft07_schema(self):
        self.assertIsInstance(self.schema, dict)
        _schema_check.check_schema(self.schema)
        try:
            from jsonschema import Draft7Validator
        except ImportError:
            return
        Draft7Validator.check_schema(self.schema)

    def collect(self):
        """Run every command in its main variants; return (label, json) pairs."""
        out = []

        def add(label, r, exit_code):
            self.assertEqual(r.code, exit_code, r)
            self.assertIsInstance(r.json, dict, r)
            out.append((label, r.json))
            return r.json

        c = self.cli
        add("schema", c("schema"), 0)
        a = add("run snapshot-after 0", c("run", "--snapshot-after", "0", "--", "echo", "hi"), 0)
        add(
            "run snapshot ended early",
            c(
                "run",
                "--snapshot-after",
                "2000",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ),
            0,
        )
        add("run --wait", c("run", "--wait", "--", "sh", "-c", "printf 'a\\nb'; echo c >&2"), 0)
        add(
            "run --wait --env --mask",
            c(
                "run",
                "--wait",
                "--env",
                "FOO=bar",
                "--env",
                "SECRET=s3",
                "--mask",
                "SECRET",
                "--",
                "true",
            ),
            0,
        )
        add(
            "run --wait timeout",
            c("run", "--wait", "--timeout", "200", "--kill-after", "200", "--", "sleep", "30"),
            0,
        )
        run_r = add(
            "run snapshot running",
            c("run", "--snapshot-after", "300", "--tail-lines", "5", "--", "sleep", "30"),
            0,
        )
        jr = run_r["job_id"]
        self.addCleanup(c, "kill", "--signal", "KILL", jr)
        self.assertEqual(run_r["state"], "running", run_r)

        add("status running", c("status", jr), 0)
        add("tail running", c("tail", jr), 0)
        add("wait timed_out", c("wait", "--timeout-ms", "200", jr), 0)
        add("list running", c("list", "--all", "--state", "running"), 0)
        add("kill TERM", c("kill", jr), 0)
        add("wait killed", c("wait", "--timeout-ms", "20000", jr), 0)
        add("status killed", c("status", jr), 0)
        add("kill nothing alive", c("kill", "--signal", "KILL", jr), 0)

        ja = a["job_id"]
        add("wait exited", c("wait", "--timeout-ms", "20000", ja), 0)
        add("status exited", c("status", ja), 0)
        add("tail exited", c("tail", "--tail-lines", "1", "--max-bytes", "1k", ja), 0)
        add("list", c("list"), 0)
        add("list --all", c("list", "--all", "--limit", "2"), 0)
        add("list missing root", c("--root", os.path.join(self.tmp, "nope"), "list"), 0)

        jx = self.craft_failed(ja)
        add("status failed", c("status", jx), 0)
        add("list failed", c("list", "--all", "--state", "failed"), 0)

        script = os.path.join(self.tmp, "bad-interp.sh")
        with open(script, "w") as f:
            f.write("#!/nonexistent/interpreter\necho never\n")
        os.chmod(script, 0o755)
        r = c("run", "--wait", "--", script)
        add("run exec fails", r, r.code)

        corrupt = sibling_id(ja, 3)
        clone_job(self.job_dir(ja), self.job_dir(corrupt), ja, corrupt)
        with open(os.path.join(self.job_dir(corrupt), "meta.json"), "w") as f:
            f.write("{")
        add("list with skipped", c("list", "--all"), 0)

        add("error job_not_found", c("status", "ZZZZZZZZ"), 1)
        add("error ambiguous", c("status", ja[:20]), 1)
        add("error usage (none)", c(), 2)
        add("error usage (flag)", c("list", "--bogus"), 2)
        add("error usage (value)", c("wait", "--timeout-ms", "5x", ja), 2)
        add(
            "error cwd_not_found",
            c("run", "--cwd", os.path.join(self.tmp, "nope"), "--", "true"),
            1,
        )
        add("error command_not_found", c("run", "--", "agent-exec-no-such-command-xyz"), 1)
        add(
            "error invalid_argument",
            c("run", "--env-file", os.path.join(self.tmp, "no.env"), "--", "true"),
            1,
        )
        return out

    def test_every_response_validates(self):
        responses = self.collect()
        self.assertGreaterEqual(len(responses), 30)
        types = {obj.get("type") for _, obj in responses}
        for t in ("run", "status", "tail", "wait", "kill", "list", "schema", "error"):
            self.assertIn(t, types)
        codes = {obj["error"]["code"] for _, obj in responses if obj.get("type") == "error"}
        for code in (
            "job_not_found",
            "ambiguous_job_id",
            "usage_error",
            "cwd_not_found",
            "command_not_found",
            "invalid_argument",
        ):
            self.assertIn(code, codes)
        self.assert_valid(responses)
        # the schema is specific enough to notice a missing required field
        for label, bad in _typed_mutations(responses):
            with self.subTest(label):
                self.assertTrue(
                    self.validate(bad, self.schema), "%s was accepted by the schema" % label
                )

    def test_schema_rejects_objects_that_break_the_contract(self):
        ok_resp = self.schema_response
        err_resp = self.cli("status", "ZZZZZZZZ").json
        self.assertIsInstance(err_resp, dict)
        self.assert_valid([("schema", ok_resp), ("error", err_resp)])
        for label, bad in _mutations(ok_resp, err_resp):
            with self.subTest(label):
                self.assertTrue(
                    self.validate(bad, self.schema), "%s was accepted by the schema" % label
                )
                self.assertTrue(_schema_check.errors(bad, self.schema), label)


class ValidatorSelfTests(unittest.TestCase):
    """The subset validator (and jsonschema, when present) reject wrong objects."""

    SCHEMA = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "definitions": {
            "err": {
                "type": "object",
                "required": ["code", "message", "retryable"],
                "properties": {
                    "code": {"type": "string", "enum": ["usage_error", "job_not_found"]},
                    "message": {"type": "string"},
                    "retryable": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
            "count": {"type": "integer", "minimum": 0},
        },
        "type": "object",
        "required": ["schema_version", "ok", "type"],
        "properties": {
            "schema_version": {"const": "0.1"},
            "ok": {"type": "boolean"},
            "type": {"type": "string"},
            "n": {"$ref": "#/definitions/count"},
            "code": {"type": ["integer", "null"]},
            "items": {"type": "array", "items": {"type": "string"}},
        },
        "oneOf": [
            {"properties": {"ok": {"const": True}, "type": {"not": {"const": "error"}}}},
            {
                "properties": {
                    "ok": {"const": False},
                    "type": {"const": "error"},
                    "error": {"$ref": "#/definitions/err"},
                },
                "required": ["error"],
            },
        ],
        "anyOf": [{"required": ["n"]}, {"required": ["error"]}, {"required": ["items"]}],
        "allOf": [{"type": "object"}],
    }

    GOOD = [
        {"schema_version": "0.1", "ok": True, "type": "list", "n": 0},
        {"schema_version": "0.1", "ok": True, "type": "list", "items": ["a"], "code": None},
        {"schema_version": "0.1", "ok": True, "type": "list", "n": 3, "code": 2.0},
        {
            "schema_version": "0.1",
            "ok": False,
            "type": "error",
            "error": {"code": "usage_error", "message": "m", "retryable": False},
        },
    ]

    BAD = [
        ("not an object", []),
        ("missing ok", {"schema_version": "0.1", "type": "list", "n": 1}),
        ("wrong const", {"schema_version": "0.2", "ok": True, "type": "list", "n": 1}),
        ("bool is not integer", {"schema_version": "0.1", "ok": True, "type": "list", "n": True}),
        ("float is not integer", {"schema_version": "0.1", "ok": True, "type": "list", "n": 1.5}),
        ("minimum", {"schema_version": "0.1", "ok": True, "type": "list", "n": -1}),
        ("type list", {"schema_version": "0.1", "ok": True, "type": "list", "n": 1, "code": "x"}),
        ("items", {"schema_version": "0.1", "ok": True, "type": "list", "items": ["a", 1]}),
        ("anyOf none", {"schema_version": "0.1", "ok": True, "type": "list"}),
        ("oneOf none", {"schema_version": "0.1", "ok": False, "type": "list", "n": 1}),
        ("error missing", {"schema_version": "0.1", "ok": False, "type": "error"}),
        (
            "enum",
            {
                "schema_version": "0.1",
                "ok": False,
                "type": "error",
                "error": {"code": "nope", "message": "m", "retryable": False},
            },
        ),
        (
            "additionalProperties",
            {
                "schema_version": "0.1",
                "ok": False,
                "type": "error",
                "error": {"code": "usage_error", "message": "m", "retryable": False, "x": 1},
            },
        ),
        ("ok is a string", {"schema_version": "0.1", "ok": "true", "type": "list", "n": 1}),
    ]

    def validators(self):
        out = [("_schema_check", _schema_check.errors)]
        name, fn = _schema_check.best_validator()
        if name != "_schema_check":
            out.append((name, fn))
        return out

    def test_accepts_good_objects(self):
        for name, fn in self.validators():
            for obj in self.GOOD:
                with self.subTest(validator=name, obj=obj):
                    self.assertEqual(fn(obj, self.SCHEMA), [])

    def test_rejects_wrong_objects(self):
        for name, fn in self.validators():
            for label, obj in self.BAD:
                with self.subTest(validator=name, case=label):
                    self.assertTrue(fn(obj, self.SCHEMA), label)
        with self.assertRaises(_schema_check.ValidationError):
            _schema_check.validate(self.BAD[1][1], self.SCHEMA)

    def test_unknown_keyword_raises(self):
        schema = {"type": "object", "properties": {"a": {"type": "string", "x-strict": True}}}
        with self.assertRaises(_schema_check.SchemaError):
            _schema_check.errors({"a": "b"}, schema)
        with self.assertRaises(_schema_check.SchemaError):
            _schema_check.check_schema(schema)
        with self.assertRaises(_schema_check.SchemaError):
            _schema_check.errors({}, {"$ref": "http://example.com/s.json"})
        with self.assertRaises(_schema_check.SchemaError):
            _schema_check.errors(1, {"type": "int"})


if __name__ == "__main__":
    unittest.main()
