"""The response schema (``agent-exec schema``) against every answer, and the
validators themselves (jsonschema's when installed, else tests/_schema_check).
"""

import copy
import json
import os
import unittest

from tests import _schema_check
from tests._jobs import JobsTestCase, find_def, sibling_id
from tests._util import clone_job


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


try:
    import jsonschema  # noqa: F401

    _HAVE_JSONSCHEMA = True
except ImportError:  # dev-only: the suite's own validator does the rest
    _HAVE_JSONSCHEMA = False


class SchemaTests(JobsTestCase):
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

    @unittest.skipUnless(_HAVE_JSONSCHEMA, "jsonschema is not installed (dev-only)")
    def test_schema_is_a_draft07_schema_for_jsonschema(self):
        from jsonschema import Draft7Validator

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

    # ---- the read, wait, delete and gc answers, and the declared fields ----

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
