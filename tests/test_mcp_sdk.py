"""agent-exec mcp driven by the official MCP Python SDK (PyPI `mcp`), over stdio.

A dev-only dependency: .ci/run installs it into its throwaway venv and runs
this module there.  Elsewhere (no SDK, or a Python older than it needs) every
test skips, saying why.  Each test runs in both protocol generations, through
the SDK client's two modes: "legacy" (the initialize handshake) and
"2026-07-28" (the stateless revision, the version in every request's _meta).
"""

import importlib
import sys
import time
import unittest

from tests._util import CLI, CLITestCase

MODES = ("legacy", "2026-07-28")

try:
    anyio = importlib.import_module("anyio")
    _mcp = importlib.import_module("mcp")
    _stdio = importlib.import_module("mcp.client.stdio")
    SKIP = None
except Exception as e:  # ImportError, or a SyntaxError on an old Python
    SKIP = "the MCP Python SDK (pip install mcp) is not importable here: %s: %s" % (
        type(e).__name__,
        e,
    )


@unittest.skipIf(SKIP is not None, SKIP or "")
class SdkTests(CLITestCase):
    def client(self, mode, **env):
        params = _stdio.StdioServerParameters(
            command=CLI[0], args=CLI[1:] + ["mcp"], env=self.env(**env), cwd=self.tmp
        )
        return _mcp.Client(params, mode=mode, read_timeout_seconds=60)

    def each_mode(self, body, **env):
        """Run ``body(client, mode)`` (a coroutine function) once per protocol generation."""
        for mode in MODES:
            with self.subTest(mode=mode):

                async def main(mode=mode):
                    async with self.client(mode, **env) as client:
                        await body(client, mode)

                anyio.run(main)

    async def sleeper(self, client, seconds=30):
        r = await client.call_tool("run", {"command": ["sleep", str(seconds)], "snapshot_after": 0})
        self.assertFalse(r.is_error, r)
        return r.structured_content["job_id"]

    def test_list_tools(self):
        async def body(client, mode):
            self.assertEqual(client.protocol_version, "2025-11-25" if mode == "legacy" else mode)
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for name in ("run", "status", "read", "tail", "wait", "kill", "list", "delete"):
                self.assertIn(name, tools)
            self.assertNotIn("mcp", tools)
            run = tools["run"]
            self.assertEqual(run.input_schema["properties"]["command"]["type"], "array")
            self.assertTrue(run.output_schema)
            self.assertTrue(tools["tail"].annotations.read_only_hint)
            self.assertFalse(tools["status"].annotations.read_only_hint)  # renew: a write
            self.assertTrue(tools["run"].annotations.destructive_hint)
            self.assertTrue(tools["run"].annotations.open_world_hint)

        self.each_mode(body)

    def test_auto_mode_finds_the_stateless_revision(self):
        # The SDK's default: probe server/discover, else fall back to initialize.
        async def main():
            async with self.client("auto") as client:
                self.assertEqual(client.protocol_version, "2026-07-28")
                r = await client.call_tool("list", {"all": True})
                self.assertFalse(r.is_error, r)

        anyio.run(main)

    def test_run_read_wait_kill(self):
        async def body(client, mode):
            r = await client.call_tool(
                "run",
                {"command": ["sh", "-c", "echo hello; sleep 1.5; echo bye"], "snapshot_after": 300},
            )
            self.assertFalse(r.is_error, r)
            job = r.structured_content
            self.assertEqual(job["type"], "run")
            r = await client.call_tool("read", {"job_id": job["job_id"]})
            self.assertIn("hello", r.structured_content["stdout"])
            r = await client.call_tool("wait", {"job_ids": [job["job_id"]]})
            self.assertEqual(r.structured_content["state"], "exited")
            r = await client.call_tool("read", {"job_id": job["job_id"]})
            self.assertEqual(r.structured_content["stdout"], "bye\n")  # continued, not repeated
            jid = await self.sleeper(client)
            r = await client.call_tool("kill", {"job_id": jid})
            self.assertFalse(r.is_error, r)
            r = await client.call_tool("status", {"job_id": jid})
            self.assertEqual(r.structured_content["state"], "killed")

        self.each_mode(body)

    def test_argument_error(self):
        async def body(client, mode):
            r = await client.call_tool("wait", {"job_ids": ["abcd"], "timeout_ms": "soon"})
            self.assertTrue(r.is_error)
            error = r.structured_content["error"]
            self.assertEqual(error["code"], "usage_error")
            self.assertIn("--timeout-ms", error["message"])
            self.assertIn("usage_error", r.content[0].text)

        self.each_mode(body)

    def test_cancelled_wait_leaves_the_job_running(self):
        async def body(client, mode):
            jid = await self.sleeper(client)
            t0 = time.monotonic()
            with anyio.move_on_after(1.0):  # the SDK sends notifications/cancelled
                await client.call_tool("wait", {"job_ids": [jid], "timeout_ms": 15000})
            self.assertLess(time.monotonic() - t0, 5)
            r = await client.call_tool("status", {"job_id": jid})
            self.assertEqual(r.structured_content["state"], "running")
            await client.call_tool("kill", {"job_id": jid, "signal": "KILL"})

        self.each_mode(body)

    def test_progress_during_a_long_wait(self):
        async def body(client, mode):
            jid = await self.sleeper(client)
            seen = []

            async def on_progress(progress, total, message):
                seen.append((progress, total, message))

            r = await client.call_tool(
                "wait", {"job_ids": [jid], "timeout_ms": 3500}, progress_callback=on_progress
            )
            self.assertTrue(r.structured_content["timed_out"])
            self.assertGreaterEqual(len(seen), 2, seen)
            self.assertIn("running", seen[-1][2])
            await client.call_tool("kill", {"job_id": jid, "signal": "KILL"})

        self.each_mode(body)


if __name__ == "__main__":
    if SKIP:
        sys.stderr.write("skipping: %s\n" % SKIP)
    unittest.main()
