"""The command declarations and what is derived from them.

Each command is declared once (@command in agent_exec.py): the argparse
parser, the response schema and the tool list are derived from it, every
error code comes from one table, and one dispatcher turns every outcome
into the envelope.  These tests run in-process and take milliseconds.
"""

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import agent_exec  # noqa: E402

# The commands with a JSON answer that a tool list offers too, then those
# of the command line only (follow and completion print text, not JSON).
TOOL_NAMES = (
    "run",
    "status",
    "tail",
    "create",
    "start",
    "restart",
    "wait",
    "read",
    "renew",
    "kill",
    "send",
    "screen",
    "list",
    "tag",
    "delete",
    "gc",
    "schema",
)
CLI_ONLY = ("follow", "completion", "install", "uninstall", "install-skills", "mcp")
STREAMING = ("follow", "completion", "mcp")
COMMAND_NAMES = TOOL_NAMES + CLI_ONLY
JSON_NAMES = tuple(n for n in COMMAND_NAMES if n not in STREAMING)


def _readme_table(heading: str) -> list:
    """The codes in the first column of the README table that follows ``heading``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(heading)
    codes = []
    for line in text[start:].splitlines()[1:]:
        m = re.match(r"^\| `([a-z_]+)` \|", line)
        if m:
            codes.append(m.group(1))
        elif codes and not line.startswith("|"):
            break
    return codes


class DeclarationTests(unittest.TestCase):
    def test_every_command_is_declared_once_in_help_order(self):
        self.assertEqual(tuple(agent_exec.COMMANDS), COMMAND_NAMES)
        for cmd in agent_exec.COMMANDS.values():
            with self.subTest(command=cmd.name):
                self.assertTrue(cmd.help)
                self.assertTrue(callable(cmd.handler))
                names = [o.name for o in cmd.opts]
                self.assertEqual(len(names), len(set(names)), names)
                for opt in cmd.opts:
                    self.assertIn(opt.kind, agent_exec._KINDS, opt)

    def test_the_parser_has_exactly_the_declared_options(self):
        for name, cmd in agent_exec.COMMANDS.items():
            with self.subTest(command=name):
                sub = agent_exec.build_parser(name).commands[name]
                dests = {a.dest for a in sub._actions} - {"help"}
                want = {o.name for o in cmd.opts if "cli" in o.fronts}
                want |= {o.name for o in agent_exec.GLOBAL_OPTS}
                self.assertEqual(dests, want)

    def test_only_the_invoked_command_gets_its_options(self):
        parser = agent_exec.build_parser("status")
        self.assertEqual(len(parser.commands["run"]._actions), 1)  # -h only
        self.assertGreater(len(parser.commands["status"]._actions), 1)

    def test_global_flags_that_take_a_value_are_skipped_by_the_pre_parser(self):
        self.assertEqual(agent_exec._command_in(["--root", "list", "status", "x"]), "status")
        self.assertEqual(agent_exec._command_in(["-v", "tail", "x"]), "tail")
        self.assertIsNone(agent_exec._command_in(["--", "run"]))


class ErrorTableTests(unittest.TestCase):
    def test_codes_match_the_readme(self):
        self.assertEqual(_readme_table("| `error.code` | meaning |"), list(agent_exec.ERROR_CODES))
        self.assertEqual(
            sorted(_readme_table("### `failure.code` of a failed job")),
            sorted(agent_exec.FAILURE_CODES),
        )

    def test_schema_enums_are_the_tables(self):
        defs = agent_exec.response_schema()["definitions"]
        code = defs["error"]["properties"]["error"]["properties"]["code"]
        self.assertEqual(code, {"enum": sorted(agent_exec.ERROR_CODES)})
        failure = defs["status"]["properties"]["failure"]["properties"]["code"]
        self.assertEqual(failure, {"enum": sorted(agent_exec.FAILURE_CODES)})

    def test_an_error_takes_its_exit_code_and_retryable_from_the_table(self):
        for code, (exit_code, retryable, meaning) in agent_exec.ERROR_CODES.items():
            with self.subTest(code=code):
                e = agent_exec.AgentExecError(code, "x")
                self.assertEqual((e.exit_code, e.retryable), (exit_code, retryable))
                self.assertTrue(meaning)
        self.assertEqual(agent_exec.UsageError("x").exit_code, 2)
        self.assertRaises(KeyError, agent_exec.AgentExecError, "no_such_code", "x")


class ReadmeTests(unittest.TestCase):
    """The README stands on its own: a clone has everything it points at."""

    def setUp(self):
        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            self.text = f.read()

    def test_no_pointers_outside_the_repository(self):
        self.assertNotIn("CONTRACT.md", self.text)
        self.assertNotRegex(self.text, r"(?i)rust original|the original agent-exec")
        self.assertNotRegex(self.text, r"(?i)\bissue\s*#?\d")
        for link in re.findall(r"\]\(([^)#]+)\)", self.text):
            if "://" not in link:
                self.assertTrue(os.path.exists(os.path.join(REPO, link)), link)

    def test_the_agent_loop_runs_a_server_of_the_repository(self):
        self.assertIn("python3 -u examples/server.py", self.text)
        self.assertTrue(os.path.isfile(os.path.join(REPO, "examples", "server.py")))
        self.assertIn("PYTHONUNBUFFERED", self.text)

    def test_a_fast_subset_of_the_tests_is_named(self):
        self.assertIn(
            "python3 -m unittest tests.test_units tests.test_declarations "
            "tests.test_supervisor_units",
            self.text,
        )


class SchemaTests(unittest.TestCase):
    def test_one_definition_per_command_and_the_envelope(self):
        schema = agent_exec.response_schema()
        self.assertEqual(set(schema["definitions"]), set(JSON_NAMES) | {"error", "snapshot"})
        refs = [x["$ref"].rsplit("/", 1)[1] for x in schema["oneOf"]]
        self.assertEqual(refs, sorted(set(JSON_NAMES) | {"error"}))

    def test_each_answer_lists_its_declared_fields(self):
        defs = agent_exec.response_schema()["definitions"]
        for name, cmd in agent_exec.COMMANDS.items():
            if cmd.streams:
                self.assertNotIn(name, defs)
                continue
            with self.subTest(command=name):
                props = defs[name]["properties"]
                self.assertEqual(set(props) - {"schema_version", "ok", "type"},
                                 {f.name for f in cmd.returns} - {"type"})  # fmt: skip
                # install-skills answers type "install_skills", as agent-exec 0.1 did.
                declared = [f.schema for f in cmd.returns if f.name == "type"]
                self.assertEqual(props["type"], declared[0] if declared else {"const": name})
                required = [f.name for f in cmd.returns if f.required and f.name != "type"]
                self.assertEqual(defs[name]["required"][3:], list(dict.fromkeys(required)))

    def test_wait_declares_its_two_forms(self):
        wait = agent_exec.response_schema()["definitions"]["wait"]
        self.assertEqual(wait["anyOf"], [{"required": ["job_id", "state"]}, {"required": ["jobs"]}])

    def test_result_fields_of_a_job_are_the_declared_ones(self):
        record = {
            "job": {"id": "X", "status": "exited"},
            "result": {"exit_code": 3, "signal": None, "duration_ms": 5},
            "finished_at": "2026-01-01T00:00:00.000Z",
        }
        job = agent_exec._Job("X", "/nonexistent", {}, record, "exited", None)
        declared = {f.name for f in agent_exec.RESULT_FIELDS}
        self.assertLessEqual(set(job.result_fields()), declared)
        self.assertEqual(job.head(), {
            "job_id": "X", "state": "exited", "exit_code": 3, "duration_ms": 5,
            "finished_at": "2026-01-01T00:00:00.000Z", "end_reason": "exit",
            "success": False,
        })  # fmt: skip

    def test_end_reason_of_records(self):
        # (state, result, timed_out, failure) -> end_reason; success only for exit 0.
        cases = (
            ("exited", {"exit_code": 0, "end_reason": "exit"}, False, None, "exit", True),
            ("killed", {"signal": "SIGTERM", "end_reason": "kill"}, False, None, "kill", False),
            # records from before end_reason existed
            ("exited", {"exit_code": 0}, False, None, "exit", True),
            ("killed", {"exit_code": 143, "signal": "SIGTERM"}, False, None, "kill", False),
            ("killed", {"signal": "SIGKILL"}, False, None, "signal", False),
            ("killed", {"signal": "SIGKILL"}, True, None, "timeout", False),
            # a verdict of failure overrides what the record says
            (
                "failed",
                {"exit_code": 0},
                False,
                {"code": "supervisor_lost"},
                "supervisor_lost",
                False,
            ),
            ("failed", {}, False, {"code": "spawn_failed"}, "spawn_failed", False),
            ("failed", {}, False, {"code": "supervisor_failed"}, "spawn_failed", False),
            ("failed", {}, False, {"code": "supervisor_error"}, "supervisor_lost", False),
        )
        for state, result, timed_out, failure, reason, success in cases:
            with self.subTest(state=state, result=result, failure=failure):
                record = {"result": result, "timed_out": timed_out}
                job = agent_exec._Job("X", "/nonexistent", {}, record, state, failure)
                fields = job.result_fields()
                self.assertEqual((fields["end_reason"], fields["success"]), (reason, success))
        running = agent_exec._Job("X", "/nonexistent", {}, {}, "running", None)
        self.assertNotIn("end_reason", running.result_fields())


class ToolListTests(unittest.TestCase):
    def test_every_command_is_a_tool_with_its_options(self):
        tools = {t["name"]: t for t in agent_exec.tool_list()}
        self.assertEqual(tuple(tools), TOOL_NAMES)
        for name, cmd in agent_exec.COMMANDS.items():
            if name in CLI_ONLY:
                continue
            with self.subTest(tool=name):
                props = tools[name]["inputSchema"]["properties"]
                self.assertEqual(set(props), {o.name for o in cmd.opts if "mcp" in o.fronts})
                self.assertEqual(tools[name]["description"], cmd.help)
        self.assertNotIn("wait_poll_ms", tools["run"]["inputSchema"]["properties"])
        self.assertEqual(tools["tail"]["inputSchema"]["required"], ["job_id"])
        self.assertEqual(tools["status"]["inputSchema"]["required"], [])  # job_id or key
        self.assertEqual(tools["run"]["inputSchema"]["required"], ["command"])
        self.assertTrue(tools["tail"]["annotations"]["readOnlyHint"])
        self.assertTrue(tools["kill"]["annotations"]["destructiveHint"])

    def test_arguments_go_through_the_same_parsers(self):
        o = agent_exec.options_from_arguments(
            "run", {"command": ["true"], "timeout": "5s", "max_output": "1k", "env": ["A=1"]}
        )
        self.assertEqual((o.timeout, o.max_output, o.env), (5000, 1024, ["A=1"]))
        self.assertEqual(o.snapshot_after, agent_exec.DEFAULT_SNAPSHOT_AFTER_MS)
        self.assertIs(o.wait, False)
        o = agent_exec.options_from_arguments("kill", {"job_id": "ABCD", "signal": "INT"})
        self.assertEqual(o.signal, 2)

    def test_bad_arguments_are_usage_errors_with_the_cli_words(self):
        cases = (
            ("run", {"command": ["true"], "timeout": "5x"}, "invalid duration"),
            ("run", {"command": ["true"], "bogus": 1}, "unrecognized arguments: --bogus"),
            ("tail", {}, "the following arguments are required: job_id"),
            ("list", {"state": "sleeping"}, "invalid choice"),
            ("wait", {"job_ids": "ABCD"}, "list of strings"),
        )
        for name, args, words in cases:
            with self.subTest(args=args):
                with self.assertRaises(agent_exec.UsageError) as cm:
                    agent_exec.options_from_arguments(name, args)
                self.assertIn(words, cm.exception.message)


class DispatchTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def dispatch(self, name, **args):
        o = agent_exec.options_from_arguments(name, args, root=self.tmp.name)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = agent_exec.dispatch(name, o)
        self.assertEqual(out.getvalue(), "", "dispatch printed")
        return result

    def test_success_is_the_envelope_and_exit_0(self):
        code, envelope = self.dispatch("list", all=True)
        self.assertEqual(code, 0)
        self.assertEqual(envelope["type"], "list")
        self.assertIs(envelope["ok"], True)
        self.assertEqual(envelope["schema_version"], agent_exec.SCHEMA_VERSION)

    def test_a_declared_conflict_has_the_same_words_as_on_the_cli(self):
        code, envelope = self.dispatch("list", all=True, cwd="/tmp")
        self.assertEqual(code, 2)
        self.assertEqual(envelope["error"]["code"], "usage_error")
        self.assertEqual(envelope["error"]["message"], "--cwd and --all conflict")

    def test_expected_and_unexpected_errors(self):
        code, envelope = self.dispatch("status", job_id="ZZZZ")
        self.assertEqual((code, envelope["error"]["code"]), (1, "job_not_found"))
        level, agent_exec._log_level = agent_exec._log_level, -1  # no log line on stderr
        self.addCleanup(setattr, agent_exec, "_log_level", level)
        name = "boom_for_test"
        agent_exec.command(name, "a test command")(lambda o: 1 / 0)
        self.addCleanup(agent_exec.COMMANDS.pop, name)
        code, envelope = self.dispatch(name)
        self.assertEqual((code, envelope["error"]["code"]), (1, "internal_error"))
        self.assertIn("ZeroDivisionError", envelope["error"]["message"])

    def test_nul_bytes_are_refused_before_the_handler(self):
        code, envelope = self.dispatch("run", command=["echo", "a\x00b"])
        self.assertEqual((code, envelope["error"]["code"]), (1, "invalid_argument"))
        self.assertEqual(envelope["error"]["message"], "the command contains a NUL byte")
        self.assertEqual(os.listdir(self.tmp.name), [])


class VerdictTests(unittest.TestCase):
    """_verdict: a job's published state from what its files say."""

    RUNNING = {"job": {"status": "running"}, "boot_id": "b1", "failure": None}

    def test_table(self):
        lost = "supervisor_lost"
        cases = (
            # record, written, lock free, boot, state, failure code
            (self.RUNNING, "running", False, "b1", "running", None),
            (self.RUNNING, "running", True, "b1", "failed", lost),
            (self.RUNNING, "running", False, "b2", "failed", lost),
            (self.RUNNING, "running", False, None, "running", None),
            (None, "running", False, None, "running", None),  # not started yet
            (None, "running", True, None, "failed", lost),
            (None, "unknown", True, None, "failed", lost),  # unreadable, nobody on it
            (None, "unknown", False, None, "unknown", None),
            (
                {"job": {}, "failure": {"code": "spawn_failed", "message": "m"}},
                "failed",
                True,
                None,
                "failed",
                "spawn_failed",
            ),  # fmt: skip
            ({"job": {}, "failure": None}, "exited", True, None, "exited", None),
        )
        for record, written, free, boot, state, failure in cases:
            with self.subTest(written=written, free=free, boot=boot, record=record):
                got_state, got_failure = agent_exec._verdict(record, written, free, boot)
                self.assertEqual(got_state, state)
                self.assertEqual((got_failure or {}).get("code"), failure)


class LockWatchTests(unittest.TestCase):
    def setUp(self):
        import fcntl

        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "meta.json")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.addCleanup(self._unlock)

    def _unlock(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def test_waits_share_one_watcher_per_lock(self):
        before = set(threading.enumerate())  # (a watcher of an earlier test may be ending)
        a = agent_exec._LockWatch.acquire(self.path)
        b = agent_exec._LockWatch.acquire(self.path)
        self.assertIs(a, b)
        started = set(threading.enumerate()) - before
        self.assertEqual([t.name for t in started], ["agent-exec-lock"])
        a.release()
        b.release()
        self._unlock()
        self.assertTrue(a.wait(10.0))
        deadline = time.monotonic() + 10
        while agent_exec._LockWatch._by_path.get(self.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertNotIn(self.path, agent_exec._LockWatch._by_path)

    def test_a_wait_can_be_cancelled_and_bounded(self):
        cancel = threading.Event()
        threading.Timer(0.1, cancel.set).start()
        t0 = time.monotonic()
        self.assertFalse(agent_exec._wait_lock(self.path, None, cancel))
        self.assertLess(time.monotonic() - t0, 5.0)
        t0 = time.monotonic()
        self.assertFalse(agent_exec._wait_lock(self.path, 0.1, threading.Event()))
        self.assertLess(time.monotonic() - t0, 5.0)
        self._unlock()
        self.assertTrue(agent_exec._wait_lock(self.path, 10.0, threading.Event()))


if __name__ == "__main__":
    unittest.main()
