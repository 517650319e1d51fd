"""agent-exec mcp over its raw protocol: a subprocess and plain JSON lines.

Stdlib only, so it runs with nothing installed (tests/test_mcp_sdk.py drives
the same server with the official MCP Python SDK).  Every method of both
protocol generations, every error path, EOF and SIGTERM, two requests in
flight, cancellation, bounded waits, progress, the per-session read position,
and many runs with no zombie left (200 here; AGENT_EXEC_MCP_TEST_RUNS=1000
for the full count, which bench/mcp.py also runs).
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import unittest

from tests._procs import pid_alive, wait_until, zombies_of
from tests._util import CLI, CLITestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import agent_exec  # noqa: E402

MODERN = "2026-07-28"
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}
# How long any one answer may take before the test fails (generous: the
# machine is shared).
ANSWER_TIMEOUT = 30.0


def threads_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


class McpSession:
    """One `agent-exec mcp` process: send JSON lines, collect what comes back."""

    def __init__(self, env, cwd):
        self.proc = subprocess.Popen(
            CLI + ["mcp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        self.lines = queue.Queue()
        self.raw = []  # every stdout line, for the "only protocol" check
        self.answers = {}
        self.notes = []
        self.next_id = 100
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.errors = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.raw.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.errors.append(line)

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, message):
        self.send_raw((json.dumps(message) + "\n").encode())

    def _pump(self, timeout):
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise EOFError("the server closed stdout")
        msg = json.loads(line)
        if "id" in msg and "method" not in msg:
            self.answers[json.dumps(msg["id"])] = msg
        else:
            self.notes.append(msg)
        return msg

    def answer(self, request_id, timeout=ANSWER_TIMEOUT):
        key = json.dumps(request_id)
        deadline = time.monotonic() + timeout
        while key not in self.answers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no answer to id %r in %.0f s" % (request_id, timeout))
            try:
                self._pump(remaining)
            except queue.Empty:
                pass
        return self.answers.pop(key)

    def request(self, method, params=None, request_id=None, timeout=ANSWER_TIMEOUT):
        if request_id is None:
            self.next_id += 1
            request_id = self.next_id
        msg = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        return self.answer(request_id, timeout)

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def initialize(self, version="2025-11-25"):
        r = self.request(
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "test", "version": "1"},
            },
        )
        self.notify("notifications/initialized")
        return r

    def call(self, name, arguments=None, meta=None, request_id=None, timeout=ANSWER_TIMEOUT):
        params = {"name": name, "arguments": arguments or {}}
        if meta:
            params["_meta"] = meta
        r = self.request("tools/call", params, request_id, timeout)
        if "error" in r:
            raise AssertionError("tools/call %s: %r" % (name, r))
        return r["result"]

    def close(self, timeout=10):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


class McpTestCase(CLITestCase):
    def open(self, **env):
        session = McpSession(self.env(**env), self.tmp)
        self.addCleanup(session.close)
        return session

    def session(self, version="2025-11-25", **env):
        s = self.open(**env)
        r = s.initialize(version)
        self.assertIn("result", r, r)
        return s

    def assert_error(self, answer, code):
        self.assertIn("error", answer, answer)
        self.assertEqual(answer["error"]["code"], code, answer)
        self.assertIsInstance(answer["error"]["message"], str)
        return answer["error"]

    def send_wait(self, s, request_id, job_id, **arguments):
        """Send a `wait` tools/call for one job without waiting for its answer."""
        arguments = dict(arguments, job_ids=[job_id])
        s.send(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {"name": "wait", "arguments": arguments},
            }
        )

    def sleeper(self, s, seconds=30):
        r = s.call("run", {"command": ["sleep", str(seconds)], "snapshot_after": 0})
        self.assertFalse(r["isError"], r)
        return r["structuredContent"]["job_id"]


class HandshakeTests(McpTestCase):
    def test_initialize_negotiates_the_version(self):
        for asked, agreed in (
            ("2025-11-25", "2025-11-25"),
            ("2025-06-18", "2025-06-18"),
            ("2025-03-26", "2025-03-26"),
            ("2024-11-05", "2024-11-05"),
            ("1999-01-01", "2025-11-25"),
        ):
            with self.subTest(asked=asked):
                s = self.open()
                r = s.initialize(asked)["result"]
                self.assertEqual(r["protocolVersion"], agreed)
                self.assertEqual(r["serverInfo"]["name"], "agent-exec")
                self.assertIn("tools", r["capabilities"])
                self.assertNotIn("resultType", r)  # a handshake-generation result
                self.assertEqual(s.close(), 0)

    def test_initialize_without_a_version_is_invalid_params(self):
        s = self.open()
        self.assert_error(s.request("initialize", {"capabilities": {}}), -32602)

    def test_ping_and_notifications(self):
        s = self.session()
        self.assertEqual(s.request("ping")["result"], {})
        s.notify("notifications/initialized")
        s.notify("notifications/whatever", {"x": 1})
        s.notify("notifications/cancelled", {"requestId": 12345})  # nothing in flight
        self.assertEqual(s.request("ping")["result"], {})
        self.assertEqual(s.notes, [])  # a notification is never answered

    def test_a_request_before_initialize_is_refused(self):
        s = self.open()
        for method in ("tools/list", "tools/call"):
            with self.subTest(method=method):
                error = self.assert_error(s.request(method, {"name": "status"}), -32602)
                self.assertIn("initialize", error["message"])
        self.assertEqual(s.request("ping")["result"], {})  # ping is allowed at any time

    def test_tools_list(self):
        s = self.session("2025-06-18")
        tools = s.request("tools/list")["result"]["tools"]
        names = [t["name"] for t in tools]
        expected = [n for n, c in agent_exec.COMMANDS.items() if "mcp" in c.fronts]
        self.assertEqual(names, expected)
        for name in ("run", "status", "read", "tail", "wait", "kill", "list", "delete", "send"):
            self.assertIn(name, names)
        for name in ("mcp", "install-skills", "follow", "completion", "install"):
            self.assertNotIn(name, names)
        for t in tools:
            with self.subTest(tool=t["name"]):
                self.assertGreater(len(t["description"]), 60)
                self.assertEqual(t["inputSchema"]["type"], "object")
                hints = t["annotations"]
                for key in ("readOnlyHint", "destructiveHint", "idempotentHint"):
                    self.assertIsInstance(hints[key], bool)
                self.assertEqual(t["outputSchema"]["type"], "object")
        by_name = {t["name"]: t for t in tools}
        run = by_name["run"]["inputSchema"]
        self.assertEqual(run["properties"]["command"]["type"], "array")
        self.assertEqual(run["properties"]["shell"]["type"], "string")
        self.assertNotIn("command", run["required"])  # shell stands in for it
        self.assertTrue(by_name["tail"]["annotations"]["readOnlyHint"])
        self.assertTrue(by_name["kill"]["annotations"]["destructiveHint"])
        self.assertFalse(by_name["kill"]["annotations"]["readOnlyHint"])

    def test_annotations_are_true(self):
        s = self.session()
        hints = {t["name"]: t["annotations"] for t in s.request("tools/list")["result"]["tools"]}
        # They run arbitrary commands (send types into one: ctrl-c, EOF).
        for name in ("run", "start", "restart", "send"):
            with self.subTest(tool=name):
                self.assertTrue(hints[name]["destructiveHint"])
                self.assertTrue(hints[name]["openWorldHint"])
                self.assertFalse(hints[name]["idempotentHint"])
        # renew in passing is a write: not read-only, but only additive.
        for name in ("status", "read", "wait", "renew"):
            with self.subTest(tool=name):
                self.assertFalse(hints[name]["readOnlyHint"])
                self.assertFalse(hints[name]["destructiveHint"])
        for name in ("tail", "screen", "list", "schema"):
            with self.subTest(tool=name):
                self.assertTrue(hints[name]["readOnlyHint"])
                self.assertFalse(hints[name]["openWorldHint"])
        for name in ("kill", "delete", "gc", "create", "tag"):
            with self.subTest(tool=name):
                self.assertTrue(hints[name]["destructiveHint"])
                self.assertFalse(hints[name]["readOnlyHint"])

    def test_argument_descriptions_say_what_mcp_does(self):
        s = self.session(AGENT_EXEC_MCP_MAX_WAIT_MS="30000")
        props = {
            t["name"]: t["inputSchema"]["properties"]
            for t in s.request("tools/list")["result"]["tools"]
        }
        timeout = props["wait"]["timeout_ms"]
        self.assertNotIn("no limit", timeout["description"])
        self.assertIn("20000", timeout["description"])
        self.assertIn("30000", timeout["description"])
        self.assertEqual(timeout["default"], 20000)
        self.assertIn("session", props["read"]["cursor"]["description"])
        for name in ("run", "create"):
            self.assertNotIn("--", props[name]["shell"]["description"])
            self.assertIn("instead of command", props[name]["shell"]["description"])
            self.assertNotIn("own stdin", props[name]["stdin"]["description"])

    def test_output_schema_uses_defs(self):
        s = self.session()
        for t in s.request("tools/list")["result"]["tools"]:
            text = json.dumps(t["outputSchema"])
            self.assertIn("$defs", t["outputSchema"])
            self.assertNotIn("#/definitions/", text)

    def test_a_second_initialize_is_answered(self):
        # As the MCP Python SDK does: it negotiates again, nothing else changes.
        s = self.session("2025-06-18")
        r = s.initialize("2025-03-26")["result"]
        self.assertEqual(r["protocolVersion"], "2025-03-26")
        tools = s.request("tools/list")["result"]["tools"]
        self.assertNotIn("outputSchema", tools[0])  # the newly agreed revision

    def test_no_output_schema_before_2025_06_18(self):
        s = self.session("2025-03-26")
        for t in s.request("tools/list")["result"]["tools"]:
            self.assertNotIn("outputSchema", t)


class ErrorPathTests(McpTestCase):
    def test_parse_error(self):
        s = self.session()
        s.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
        self.assert_error(s.answer(None), -32700)
        s.send_raw(b"\xff\xfe not utf-8\n")
        self.assert_error(s.answer(None), -32700)
        self.assertEqual(s.request("ping")["result"], {})  # still serving

    def test_invalid_requests(self):
        s = self.session()
        s.send({"id": 7, "method": "ping"})  # no "jsonrpc": "2.0"
        self.assert_error(s.answer(7), -32600)
        s.send({"jsonrpc": "2.0", "id": 8, "method": 5})
        self.assert_error(s.answer(8), -32600)
        s.send({"jsonrpc": "2.0", "id": None, "method": "ping"})
        self.assert_error(s.answer(None), -32600)
        s.send({"jsonrpc": "2.0", "id": [1], "method": "ping"})
        self.assert_error(s.answer(None), -32600)
        s.send([{"jsonrpc": "2.0", "id": 9, "method": "ping"}])  # a batch
        self.assert_error(s.answer(None), -32600)
        s.send("hello")
        self.assert_error(s.answer(None), -32600)
        s.send({"jsonrpc": "2.0", "id": 10, "result": {}})  # a response: ignored
        self.assertEqual(s.request("ping", request_id="str-id")["result"], {})

    def test_method_not_found(self):
        s = self.session()
        error = self.assert_error(s.request("resources/list"), -32601)
        self.assertIn("resources/list", error["message"])
        self.assert_error(s.request("nonsense"), -32601)

    def test_invalid_params(self):
        s = self.session()
        self.assert_error(s.request("tools/list", [1, 2]), -32602)
        self.assert_error(s.request("tools/call", {"name": "nope"}), -32602)
        self.assert_error(s.request("tools/call", {"name": "mcp"}), -32602)  # not a tool
        self.assert_error(s.request("tools/call", {}), -32602)
        self.assert_error(s.request("tools/call", {"name": "status", "arguments": [1]}), -32602)

    def test_argument_errors_are_tool_errors_with_the_cli_message(self):
        s = self.session()
        r = s.call("wait", {"job_ids": ["abcd"], "timeout_ms": "xyz"})
        self.assertTrue(r["isError"])
        mcp_error = r["structuredContent"]["error"]
        cli = self.cli("wait", "--timeout-ms", "xyz", "abcd").json["error"]
        self.assertEqual(mcp_error, cli)
        self.assertEqual(json.loads(r["content"][0]["text"]), r["structuredContent"])
        # A check that runs after parsing: the same words too.
        r = s.call("run", {"command": ["true"], "shell": "true"})
        cli = self.cli("run", "--shell", "true", "--", "true").json["error"]
        self.assertEqual(r["structuredContent"]["error"], cli)
        r = s.call("wait", {"job_ids": "nosuchjob"})  # one id for the list: taken as [id]
        self.assertEqual(r["structuredContent"]["error"]["code"], "job_not_found")
        r = s.call("status", {"job_id": "abcd", "bogus": 1})
        self.assertTrue(r["isError"])
        self.assertEqual(r["structuredContent"]["error"]["code"], "usage_error")
        self.assertIn("bogus", r["structuredContent"]["error"]["message"])
        r = s.call("status", {})
        self.assertTrue(r["isError"])
        self.assertIn("job id", r["structuredContent"]["error"]["message"])
        r = s.call("status", {"job_id": "nosuchjob"})
        self.assertTrue(r["isError"])
        self.assertEqual(r["structuredContent"]["error"]["code"], "job_not_found")

    def test_argument_errors_in_the_cli_words(self):
        s = self.session()
        for name, args, argv in (
            ("status", {}, ["status"]),
            ("wait", {"job_ids": []}, ["wait"]),
            ("wait", {}, ["wait"]),
            ("delete", {"job_ids": []}, ["delete"]),
            ("read", {}, ["read"]),
            ("list", {"state": "bogus"}, ["list", "--state", "bogus"]),
            ("wait", {"job_ids": ["abcd"], "stream": "x"}, ["wait", "--stream", "x", "abcd"]),
            ("read", {"job_id": "abcd", "cursor": "zz"}, ["read", "--cursor", "zz", "abcd"]),
        ):
            with self.subTest(tool=name, args=args):
                r = s.call(name, args)
                self.assertTrue(r["isError"])
                self.assertEqual(r["structuredContent"]["error"], self.cli(*argv).json["error"])
        messages = {
            "agent-exec delete: the following arguments are required: job_id": (
                "delete",
                {"job_ids": []},
            ),
            "agent-exec list: argument --state: invalid choice: 'bogus' (choose from 'created', "
            "'running', 'exited', 'killed', 'failed', 'unknown')": ("list", {"state": "bogus"}),
            # Unknown arguments: argparse's form, with the CLI's flag names.
            "unrecognized arguments: --bogus": ("status", {"job_id": "abcd", "bogus": 1}),
            "unrecognized arguments: --renw (did you mean --renew?)": (
                "status",
                {"job_id": "abcd", "renw": True},
            ),
            # A JSON type that no command line can have: the same form.
            "agent-exec status: argument job_id: expected a string, got 5": (
                "status",
                {"job_id": 5},
            ),
            "agent-exec list: argument --all: expected true or false, got 1": (
                "list",
                {"all": 1},
            ),
            "agent-exec run: argument command: expected a list of strings, got 'ls'": (
                "run",
                {"command": "ls"},
            ),
        }
        for message, (name, args) in messages.items():
            with self.subTest(tool=name, args=args):
                error = s.call(name, args)["structuredContent"]["error"]
                self.assertEqual(error["code"], "usage_error")
                self.assertEqual(error["message"], message)
        # null is "not given"; one id for a list of them is that list.
        r = s.call("list", {"all": True, "limit": None})
        self.assertFalse(r["isError"], r)
        r = s.call("wait", {"job_ids": "nosuchjob"})
        self.assertEqual(r["structuredContent"]["error"]["code"], "job_not_found")
        error = self.assert_error(s.request("tools/call", {"arguments": {}}), -32602)
        self.assertIn("name", error["message"])
        self.assert_error(s.request("tools/call", {"name": 5}), -32602)

    def test_stdin_dash_is_refused(self):
        # "-" is this command's own stdin: over MCP, the transport itself.
        s = self.session()
        for name, args in (
            ("run", {"command": ["cat"], "stdin": "-"}),
            ("send", {"job_id": "abcd", "stdin": "-"}),
        ):
            with self.subTest(tool=name):
                r = s.call(name, args)
                self.assertTrue(r["isError"])
                self.assertEqual(r["structuredContent"]["error"]["code"], "invalid_argument")
        self.assertEqual(s.request("ping")["result"], {})  # the transport is intact
        self.assertEqual(os.listdir(self.root) if os.path.isdir(self.root) else [], [])

    def test_stdout_carries_only_the_protocol(self):
        s = self.session()
        s.call("run", {"shell": "echo to-the-job; echo err >&2", "snapshot_after": 100})
        s.request("nonsense")
        self.assertEqual(s.close(), 0)
        for line in s.raw:
            msg = json.loads(line)
            self.assertEqual(msg["jsonrpc"], "2.0")


class StatelessTests(McpTestCase):
    def test_server_discover_at_any_time(self):
        s = self.open()
        for params in ({}, {"_meta": ENVELOPE}):
            r = s.request("server/discover", params)["result"]
            self.assertEqual(r["supportedVersions"], [MODERN])
            self.assertIn("tools", r["capabilities"])
            # DiscoverResult has no serverInfo: 2026-07-28 carries it in _meta.
            self.assertNotIn("serverInfo", r)
            self.assertEqual(r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "agent-exec")
            self.assertEqual(r["resultType"], "complete")
            self.assertGreaterEqual(r["ttlMs"], 0)
            self.assertIn(r["cacheScope"], ("public", "private"))
        s.initialize()
        self.assertIn("result", s.request("server/discover"))

    def test_requests_carry_their_version(self):
        s = self.open()  # no initialize: every request stands alone
        r = s.request("tools/list", {"_meta": ENVELOPE})["result"]
        self.assertEqual(r["resultType"], "complete")
        self.assertGreaterEqual(r["ttlMs"], 0)
        self.assertIn(r["cacheScope"], ("public", "private"))
        self.assertIn("outputSchema", r["tools"][0])
        self.assertEqual(r["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "agent-exec")
        r = s.call("list", {"all": True}, meta=ENVELOPE)
        self.assertEqual(r["resultType"], "complete")
        self.assertFalse(r["isError"])
        # Revision 2026-07-28 has no ping (nor initialize: that opens the handshake).
        self.assert_error(s.request("ping", {"_meta": ENVELOPE}), -32601)

    def test_unsupported_version_is_32022(self):
        s = self.open()
        meta = dict(ENVELOPE)
        meta["io.modelcontextprotocol/protocolVersion"] = "2099-01-01"
        error = self.assert_error(s.request("tools/list", {"_meta": meta}), -32022)
        self.assertEqual(error["data"]["supported"], [MODERN])
        self.assertEqual(error["data"]["requested"], "2099-01-01")

    def test_a_broken_envelope_is_invalid_params(self):
        s = self.open()
        meta = {"io.modelcontextprotocol/protocolVersion": MODERN}  # no capabilities
        self.assert_error(s.request("tools/list", {"_meta": meta}), -32602)
        meta = dict(ENVELOPE, **{"io.modelcontextprotocol/protocolVersion": 7})
        self.assert_error(s.request("tools/list", {"_meta": meta}), -32602)


class ToolCallTests(McpTestCase):
    def test_run_read_wait_kill(self):
        s = self.session()
        r = s.call("run", {"command": ["sh", "-c", "echo one; sleep 1; echo two"]})
        self.assertFalse(r["isError"], r)
        job = r["structuredContent"]
        self.assertEqual(job["type"], "run")
        self.assertEqual(json.loads(r["content"][0]["text"]), job)
        r = s.call("wait", {"job_ids": [job["job_id"]], "timeout_ms": 20000})
        self.assertEqual(r["structuredContent"]["state"], "exited")
        self.assertFalse(r["structuredContent"]["timed_out"])
        r = s.call("read", {"job_id": job["job_id"]})["structuredContent"]
        self.assertEqual(r["stdout"], "one\ntwo\n")
        self.assertTrue(r["eof"])
        self.assertEqual(r["exit_code"], 0)
        # kill: a job that runs, then is killed; the answer is an ok one.
        jid = self.sleeper(s)
        r = s.call("kill", {"job_id": jid})
        self.assertFalse(r["isError"], r)
        self.assertEqual(r["structuredContent"]["signal"], "SIGTERM")
        r = s.call("status", {"job_id": jid})["structuredContent"]
        self.assertEqual(r["state"], "killed")

    def test_every_answer_fits_the_output_schema(self):
        from tests import _schema_check

        s = self.session()
        schemas = {t["name"]: t["outputSchema"] for t in s.request("tools/list")["result"]["tools"]}
        jid = self.sleeper(s)
        calls = [
            ("run", {"command": ["sh", "-c", "echo x"], "wait": True}),
            ("status", {"job_id": jid}),
            ("status", {"job_id": "nosuchjob"}),
            ("tail", {"job_id": jid}),
            ("read", {"job_id": jid, "wait_ms": 100}),
            ("wait", {"job_ids": [jid], "timeout_ms": 200}),
            ("wait", {"job_ids": [jid, jid[:10]], "any": True, "timeout_ms": 200}),
            ("wait", {"job_ids": ["abcd"], "timeout_ms": "soon"}),
            ("list", {"all": True}),
            ("send", {"job_id": jid, "text": "x"}),
            ("kill", {"job_id": jid}),
            ("delete", {"job_ids": [jid], "dry_run": True}),
            ("gc", {"dry_run": True}),
            ("schema", {}),
        ]
        for name, args in calls:
            with self.subTest(tool=name, args=args):
                r = s.call(name, args)
                problems = _schema_check.errors(r["structuredContent"], schemas[name])
                self.assertEqual(problems, [], r["structuredContent"])
                self.assertEqual(r["isError"], not r["structuredContent"]["ok"])

    def test_shell_form(self):
        s = self.session()
        r = s.call("run", {"shell": "echo a | tr a b", "wait": True})["structuredContent"]
        self.assertEqual(r["state"], "exited")
        self.assertEqual(r["final_snapshot"]["stdout_tail"], "b\n")

    def test_read_without_a_cursor_continues(self):
        s = self.session()
        code = "import sys,time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
        jid = s.call("run", {"command": [sys.executable, "-c", code], "snapshot_after": 500})[
            "structuredContent"
        ]["job_id"]
        first = s.call("read", {"job_id": jid})["structuredContent"]
        self.assertEqual(first["stdout"], "first\n")
        s.call("wait", {"job_ids": [jid]})
        second = s.call("read", {"job_id": jid[:8]})["structuredContent"]  # a prefix: same job
        self.assertEqual(second["stdout"], "second\n")
        again = s.call("read", {"job_id": jid})["structuredContent"]
        self.assertEqual(again["stdout"], "")
        self.assertTrue(again["eof"])
        # An explicit cursor still wins, and a new session starts at the beginning.
        whole = s.call("read", {"job_id": jid, "cursor": "c1.0.0"})["structuredContent"]
        self.assertEqual(whole["stdout"], "first\nsecond\n")
        other = self.session()
        self.assertEqual(
            other.call("read", {"job_id": jid})["structuredContent"]["stdout"], "first\nsecond\n"
        )

    def test_two_requests_in_flight(self):
        s = self.session()
        jid = self.sleeper(s)
        self.send_wait(s, "slow", jid, timeout_ms=4000)
        t0 = time.monotonic()
        r = s.call("status", {"job_id": jid})
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertEqual(r["structuredContent"]["state"], "running")
        self.assertEqual(s.request("ping")["result"], {})
        slow = s.answer("slow")["result"]["structuredContent"]
        self.assertTrue(slow["timed_out"])
        self.assertGreaterEqual(time.monotonic() - t0, 3.0)

    def test_cancel_ends_the_wait_not_the_job(self):
        s = self.session()
        jid = self.sleeper(s)
        self.send_wait(s, 77, jid)
        time.sleep(0.5)
        s.notify("notifications/cancelled", {"requestId": 77, "reason": "user"})
        t0 = time.monotonic()
        self.assertEqual(s.request("ping")["result"], {})
        time.sleep(0.5)
        self.assertEqual(s.request("ping")["result"], {})
        self.assertNotIn("77", s.answers)  # a cancelled request gets no answer
        self.assertLess(time.monotonic() - t0, 5)
        r = s.call("status", {"job_id": jid})["structuredContent"]
        self.assertEqual(r["state"], "running")

    def test_waits_are_bounded(self):
        s = self.session(AGENT_EXEC_MCP_MAX_WAIT_MS="1500")
        jid = self.sleeper(s)
        for args in ({}, {"timeout_ms": 600000}):
            with self.subTest(args=args):
                t0 = time.monotonic()
                r = s.call("wait", dict(args, job_ids=[jid]))["structuredContent"]
                took = time.monotonic() - t0
                self.assertTrue(r["timed_out"])
                self.assertEqual(r["state"], "running")
                self.assertIn("still running", r["hint"])
                self.assertIn("cursor", r)
                self.assertGreater(took, 1.2)
                self.assertLess(took, 10)
        t0 = time.monotonic()
        r = s.call("read", {"job_id": jid, "wait_ms": 600000})["structuredContent"]
        self.assertLess(time.monotonic() - t0, 10)
        self.assertIn("still running", r["hint"])
        t0 = time.monotonic()
        r = s.call("run", {"command": ["sleep", "30"]})["structuredContent"]  # snapshot: 10 s
        self.assertLess(time.monotonic() - t0, 8)
        self.assertLessEqual(r["waited_ms"], 3000)
        t0 = time.monotonic()
        r = s.call("run", {"command": ["sleep", "30"], "wait": True})["structuredContent"]
        self.assertLess(time.monotonic() - t0, 10)
        self.assertEqual(r["state"], "running")
        self.assertIn("call wait", r["hint"])

    def test_clamped_answers_say_how_to_continue(self):
        s = self.session(AGENT_EXEC_MCP_MAX_WAIT_MS="1500")
        jid = self.sleeper(s)
        other = self.sleeper(s)
        t0 = time.monotonic()
        r = s.call("run", {"command": ["sleep", "30"], "snapshot_after": 100000})
        r = r["structuredContent"]
        self.assertLess(time.monotonic() - t0, 8)
        self.assertEqual(r["state"], "running")
        self.assertIn("still running", r["hint"])
        self.assertIn("cursor", r["hint"])
        self.assertEqual(r["wait_bound_ms"], 1500)
        r = s.call("wait", {"job_ids": [jid, other], "timeout_ms": 600000})["structuredContent"]
        self.assertTrue(r["timed_out"])
        self.assertIn("call wait again", r["hint"])
        self.assertEqual(r["wait_bound_ms"], 1500)
        # Asked within the bound: nothing was clamped, so no wait_bound_ms.
        r = s.call("wait", {"job_ids": [jid, other], "timeout_ms": 300})["structuredContent"]
        self.assertIn("hint", r)
        self.assertNotIn("wait_bound_ms", r)
        # start observes like run.
        created = s.call("create", {"command": ["sleep", "30"]})["structuredContent"]
        r = s.call("start", {"job_id": created["job_id"], "wait": True})["structuredContent"]
        self.assertEqual(r["state"], "running")
        self.assertIn("call wait", r["hint"])
        self.assertEqual(r["wait_bound_ms"], 1500)  # the default, 20 s, capped at 1.5 s
        self.assertIn("1500 ms bound", r["hint"])

    def test_run_wait_reports_progress(self):
        s = self.session(AGENT_EXEC_MCP_MAX_WAIT_MS="3500")
        code = "import time\nwhile True:\n    print('x' * 99, flush=True)\n    time.sleep(0.2)"
        r = s.call(
            "run",
            {"command": [sys.executable, "-c", code], "wait": True},
            meta={"progressToken": 9},
        )["structuredContent"]
        self.assertEqual(r["state"], "running")
        progress = [n for n in s.notes if n.get("method") == "notifications/progress"]
        self.assertGreaterEqual(len(progress), 2, s.notes)
        last = progress[-1]["params"]["message"]
        self.assertIn(r["job_id"], last)
        self.assertIn("running", last)
        seen = int(last.split(" stdout")[0].rsplit(" ", 1)[1])
        self.assertGreater(seen, 0)
        s.call("kill", {"job_id": r["job_id"], "signal": "KILL"})

    def test_progress_while_a_wait_blocks(self):
        s = self.session()
        jid = self.sleeper(s)
        r = s.call("wait", {"job_ids": [jid], "timeout_ms": 3500}, meta={"progressToken": "tok-1"})
        self.assertTrue(r["structuredContent"]["timed_out"])
        progress = [n for n in s.notes if n.get("method") == "notifications/progress"]
        self.assertGreaterEqual(len(progress), 2, s.notes)
        values = [n["params"]["progress"] for n in progress]
        self.assertEqual(values, sorted(set(values)))  # it only increases
        for n in progress:
            self.assertEqual(n["params"]["progressToken"], "tok-1")
            self.assertIn("running", n["params"]["message"])
            self.assertIn("bytes", n["params"]["message"])


class LifetimeTests(McpTestCase):
    def setUp(self):
        super().setUp()
        if not os.path.isdir("/proc/self/task"):
            self.skipTest("needs /proc (Linux)")

    def test_eof_exits_and_leaves_the_jobs(self):
        s = self.session()
        jid = self.sleeper(s)
        self.send_wait(s, 5, jid)
        time.sleep(0.3)
        t0 = time.monotonic()
        self.assertEqual(s.close(), 0)
        self.assertLess(time.monotonic() - t0, 5)
        pid = self.read_state(jid)["pid"]
        self.assertTrue(pid_alive(pid))
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_an_early_end_does_not_claim_the_bound(self):
        s = self.session()
        jid = self.sleeper(s)
        self.send_wait(s, 6, jid, timeout_ms=50000)
        time.sleep(0.5)
        s.proc.stdin.close()  # EOF: the server ends the wait and answers what it saw
        r = s.answer(6)["result"]["structuredContent"]
        self.assertEqual(r["state"], "running")
        self.assertIn("stopping", r["hint"])
        self.assertNotIn("bound elapsed", r["hint"])
        self.assertEqual(s.close(), 0)

    def test_sigterm_exits_and_leaves_the_jobs(self):
        s = self.session()
        jid = self.sleeper(s)
        self.send_wait(s, 5, jid)
        time.sleep(0.3)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        self.assertEqual(s.proc.wait(10), 0)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_one_watcher_per_job(self):
        s = self.session()
        jid = self.sleeper(s)
        ids = ["w%d" % i for i in range(6)]
        for rid in ids:
            self.send_wait(s, rid, jid, timeout_ms=1500)
        for rid in ids:
            self.assertTrue(s.answer(rid)["result"]["structuredContent"]["timed_out"])
        # Left: the main thread and the one watcher parked on the job's lock
        # (the calls' threads are gone).
        self.assertTrue(wait_until(lambda: threads_of(s.proc.pid) <= 2, timeout=5))
        s.call("kill", {"job_id": jid, "signal": "KILL"})
        self.assertTrue(wait_until(lambda: threads_of(s.proc.pid) == 1, timeout=10))

    def test_many_runs_leave_no_zombie(self):
        n = int(os.environ.get("AGENT_EXEC_MCP_TEST_RUNS", "200"))
        s = self.session()
        batch = 20
        for start in range(0, n, batch):
            ids = []
            for i in range(start, min(n, start + batch)):
                ids.append("r%d" % i)
                s.send(
                    {
                        "jsonrpc": "2.0",
                        "id": ids[-1],
                        "method": "tools/call",
                        "params": {
                            "name": "run",
                            "arguments": {"command": ["true"], "snapshot_after": 0},
                        },
                    }
                )
            for rid in ids:
                r = s.answer(rid, timeout=60)["result"]
                self.assertFalse(r["isError"], r)
        self.assertEqual(zombies_of(s.proc.pid), [])
        # The root holds other entries too (.gc-* files, names/, keys/, ...).
        jobs = [e for e in os.listdir(self.root) if agent_exec.is_job_id(e)]
        self.assertEqual(len(jobs), n)
        r = s.call("list", {"all": True, "limit": 0})["structuredContent"]
        self.assertEqual(len(r["jobs"]), n)
        self.assertEqual(s.close(), 0)


if __name__ == "__main__":
    unittest.main()
