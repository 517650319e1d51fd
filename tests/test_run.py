"""``run``: its response, the job directory, preflight checks, the environment,
masking, snapshots, exec failures, stdin, full.log rows, and readiness.
"""

import contextlib
import io
import json
import os
import random
import socket
import stat
import subprocess
import sys
import time
import unittest
import uuid
from unittest import mock

from tests._jobs import (
    DEV_SERVER,
    ENV_BIN,
    FULL_ROW_RE,
    JobsTestCase,
    LINUX,
    PORT_SERVER,
    RFC3339_RE,
    SH,
    SNAPSHOT_KEYS,
    ULID_RE,
    free_port,
    parse_rfc3339,
)
from tests._procs import wait_until
from tests._util import CALL_TIMEOUT, PY, SCRIPT, TS_RE
from tests._util import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402


# --------------------------------------------------------------------------
# The response
# --------------------------------------------------------------------------


class RunResponseTests(JobsTestCase):
    def test_response_fields_running_job_without_snapshot(self):
        t0 = time.monotonic()
        j = self.ok("run", "--snapshot-after", "0", "--", "sleep", "30")
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(j["schema_version"], "0.1")
        self.assertEqual(j["type"], "run")
        self.assertRegex(j["job_id"], ULID_RE)
        self.assertEqual(len(j["job_id"]), 26)
        self.assertEqual(j["state"], "running")
        jd = self.job_dir(j["job_id"])
        self.assertEqual(j["stdout_log_path"], os.path.join(jd, "stdout.log"))
        self.assertEqual(j["stderr_log_path"], os.path.join(jd, "stderr.log"))
        self.assertIsInstance(j["waited_ms"], int)
        self.assertIsInstance(j["elapsed_ms"], int)
        self.assertGreaterEqual(j["waited_ms"], 0)
        self.assertGreaterEqual(j["elapsed_ms"], 0)
        self.assertNotIn("snapshot", j)
        self.assertNotIn("final_snapshot", j)
        self.assertNotIn("exit_code", j)
        self.assertNotIn("finished_at", j)
        self.assertNotIn("env_vars", j)
        # run answers only once meta.json and state.json exist
        self.assertTrue(os.path.isfile(os.path.join(jd, "meta.json")))
        self.assertTrue(os.path.isfile(os.path.join(jd, "state.json")))
        self.assertEqual(self.read_state(j["job_id"])["job"]["status"], "running")

    def test_response_fields_terminal_job_with_snapshot(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "echo hello; echo oops >&2")
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["exit_code"], 0)
        self.assertTimestamp(j["finished_at"])
        self.assertIn("snapshot", j)
        snap = j["snapshot"]
        for key in SNAPSHOT_KEYS:
            self.assertIn(key, snap)
        self.assertEqual(snap["stdout_tail"].rstrip("\n"), "hello")
        self.assertEqual(snap["stderr_tail"].rstrip("\n"), "oops")
        self.assertEqual(snap["encoding"], "utf-8-lossy")
        self.assertIs(snap["truncated"], False)
        self.assertLessEqual(j["waited_ms"], j["elapsed_ms"] + 1)
        self.assertNotIn("final_snapshot", j)  # only with --wait

    def test_job_ids_are_ulids_sorted_by_creation(self):
        ids = []
        for _ in range(3):
            ids.append(self.ok("run", "--snapshot-after", "0", "--", "true")["job_id"])
            time.sleep(0.01)
        for i in ids:
            self.assertRegex(i, ULID_RE)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 3)
        for i in ids:
            self.wait_terminal(i)

    def test_snapshot_after_early_return_when_job_ends(self):
        t0 = time.monotonic()
        j = self.ok("run", "--snapshot-after", "30000", "--", "true")
        took = time.monotonic() - t0
        self.assertLess(took, 5.0, "run did not return early when the job ended")
        self.assertEqual(j["state"], "exited")
        self.assertEqual(j["exit_code"], 0)
        self.assertIn("snapshot", j)
        self.assertLess(j["waited_ms"], 5000)

    def test_snapshot_after_is_clamped_to_10s(self):
        # The clamp is MAX_SNAPSHOT_AFTER_MS (10000): tested in-process with
        # the constant at 300 ms, so the test does not wait out 10 s.

        self.assertEqual(agent_exec.MAX_SNAPSHOT_AFTER_MS, 10000)
        out = io.StringIO()
        argv = ["--root", self.root, "run", "--snapshot-after", "60000", "--", "sleep", "30"]
        with mock.patch.object(agent_exec, "MAX_SNAPSHOT_AFTER_MS", 300):
            t0 = time.monotonic()
            with contextlib.redirect_stdout(out):
                code = agent_exec.main(argv)
            took = time.monotonic() - t0
        j = json.loads(out.getvalue())
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertEqual(code, 0, j)
        self.assertEqual(j["state"], "running")
        self.assertIn("snapshot", j)
        self.assertGreaterEqual(took, 0.27)
        self.assertLess(took, 10.0, "snapshot-after was not clamped")
        self.assertGreaterEqual(j["waited_ms"], 270)
        self.assertLessEqual(j["waited_ms"], 3000)

    def test_wait_blocks_until_terminal(self):
        t0 = time.monotonic()
        j = self.ok(
            "run", "--snapshot-after", "100", "--wait", "--", SH, "-c", "sleep 1; echo done"
        )
        took = time.monotonic() - t0
        self.assertGreaterEqual(took, 0.9)
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["exit_code"], 0)
        self.assertTimestamp(j["finished_at"])
        self.assertIn("final_snapshot", j)
        for key in SNAPSHOT_KEYS:
            self.assertIn(key, j["final_snapshot"])
        self.assertEqual(j["final_snapshot"]["stdout_tail"].rstrip("\n"), "done")
        self.assertGreaterEqual(j["waited_ms"], 900)

    def test_wait_poll_ms_accepted(self):
        j = self.ok("run", "--wait", "--wait-poll-ms", "50", "--", SH, "-c", "sleep 0.3")
        self.assertEqual(j["state"], "exited", j)

    def test_wait_with_snapshot_after_zero_still_blocks(self):
        j = self.ok("run", "--snapshot-after", "0", "--wait", "--", SH, "-c", "sleep 0.5; exit 3")
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["exit_code"], 3)
        self.assertIn("final_snapshot", j)

    def test_exit_code_recorded_in_response(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "exit 5")
        self.assertEqual(j["state"], "exited")
        self.assertEqual(j["exit_code"], 5)


# --------------------------------------------------------------------------
# The job directory
# --------------------------------------------------------------------------


class JobDirectoryTests(JobsTestCase):
    def run_with_umask_000(self, *args):
        argv = [SH, "-c", 'umask 000; exec "$0" "$@"', PY, SCRIPT] + list(args)
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.tmp,
            timeout=CALL_TIMEOUT,
            universal_newlines=True,
        )
        self.assertEqual(proc.returncode, 0, proc)
        return json.loads(proc.stdout)

    def test_modes_under_umask_000(self):
        notify = os.path.join(self.tmp, "ev.ndjson")
        j = self.run_with_umask_000(
            "run",
            "--snapshot-after",
            "0",
            "--wait",
            "--notify-file",
            notify,
            "--",
            SH,
            "-c",
            "echo out; echo err >&2",
        )
        self.assertEqual(j["state"], "exited", j)
        jd = self.job_dir(j["job_id"])
        # the completion event is written after the terminal state
        wait_until(lambda: os.path.exists(os.path.join(jd, "completion_event.json")), 10)
        time.sleep(0.2)
        self.assertEqual(stat.S_IMODE(os.stat(self.root).st_mode), 0o700, "root mode")
        self.assertEqual(stat.S_IMODE(os.stat(jd).st_mode), 0o700, "job dir mode")
        names = sorted(os.listdir(jd))
        for expected in (
            "meta.json",
            "state.json",
            "stdout.log",
            "stderr.log",
            "full.log",
            "completion_event.json",
        ):
            self.assertIn(expected, names)
        for name in names:
            path = os.path.join(jd, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                self.assertEqual(stat.S_IMODE(st.st_mode), 0o600, "mode of %s" % name)

    def test_meta_json(self):
        real = self.make_dir("realcwd")
        link = os.path.join(self.tmp, "linkcwd")
        os.symlink(real, link)
        j = self.ok(
            "run",
            "--snapshot-after",
            "0",
            "--cwd",
            link,
            "--env",
            "FOO=barvalue-123",
            "--",
            "echo",
            "a b",
            "c",
        )
        jid = j["job_id"]
        self.wait_terminal(jid)
        meta = self.read_meta(jid)
        self.assertEqual(meta["schema_version"], "0.1")
        self.assertEqual(meta["job"]["id"], jid)
        self.assertEqual(meta["command"], ["echo", "a b", "c"])
        self.assertTrue(os.path.isabs(meta["cwd"]))
        self.assertEqual(meta["cwd"], os.path.realpath(real))
        self.assertTimestamp(meta["created_at"])
        self.assertEqual(os.path.realpath(meta["root"]), os.path.realpath(self.root))
        self.assertIn("FOO", meta["env_keys"])
        for key in meta["env_keys"]:
            self.assertNotIn("=", key)
        self.assertIn("mask", meta)
        with open(os.path.join(self.job_dir(jid), "meta.json")) as f:
            self.assertNotIn("barvalue-123", f.read())

    def test_meta_cwd_defaults_to_callers_directory(self):
        d = self.make_dir("caller")
        j = self.ok("run", "--snapshot-after", "5000", "--", "pwd", cwd=d)
        self.assertEqual(self.read_meta(j["job_id"])["cwd"], os.path.realpath(d))
        self.assertEqual(j["snapshot"]["stdout_tail"].rstrip("\n"), os.path.realpath(d))

    def test_state_json_keys_while_running_and_after(self):
        j = self.ok("run", "--snapshot-after", "0", "--", "sleep", "30")
        jid = j["job_id"]
        self.addCleanup(self.kill_job, jid)
        st = self.read_state(jid)
        self.check_state_keys(st, jid)
        self.assertEqual(st["job"]["status"], "running")
        self.assertIsNone(st["result"]["exit_code"])
        self.assertIsNone(st["result"]["signal"])
        self.assertIsNone(st["result"]["duration_ms"])
        self.assertIsNone(st["finished_at"])
        self.assertTimestamp(st["job"]["started_at"])
        self.assertTimestamp(st["updated_at"])
        # pid may be null for an instant, but a running sleep must get one
        self.assertTrue(wait_until(lambda: isinstance(self.read_state(jid).get("pid"), int), 5))
        self.ok("kill", jid)
        self.wait_terminal(jid)
        st = self.read_state(jid)
        self.check_state_keys(st, jid)
        self.assertEqual(st["job"]["status"], "killed")
        self.assertTimestamp(st["finished_at"])
        self.assertIsInstance(st["result"]["duration_ms"], int)

    def test_state_json_after_exit(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "exit 4")
        st = self.read_state(j["job_id"])
        self.check_state_keys(st, j["job_id"])
        self.assertEqual(st["job"]["status"], "exited")
        self.assertEqual(st["result"]["exit_code"], 4)
        self.assertIsNone(st["result"]["signal"])
        self.assertIsInstance(st["result"]["duration_ms"], int)
        self.assertGreaterEqual(st["result"]["duration_ms"], 0)
        self.assertTimestamp(st["finished_at"])
        self.assertTimestamp(st["updated_at"])
        self.assertTimestamp(st["job"]["started_at"])
        self.assertIsInstance(st["pid"], int)
        self.assertEqual(st["finished_at"], j["finished_at"])
        self.assertIn("supervisor_pid", st)
        self.assertIn("failure", st)
        self.assertIsNone(st["failure"])

    def check_state_keys(self, st, jid):
        self.assertEqual(st["job"]["id"], jid)
        for key in ("status", "started_at"):
            self.assertIn(key, st["job"])
        for key in ("exit_code", "signal", "duration_ms"):
            self.assertIn(key, st["result"])
        for key in ("pid", "finished_at", "updated_at"):
            self.assertIn(key, st)

    def test_logs_are_byte_exact(self):
        # all 256 byte values on stdout, octal escapes and a last line without newline on stderr
        code = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 3 + b'\\nno newline')"
        j = self.ok("run", "--snapshot-after", "0", "--", PY, "-c", code)
        j2 = self.ok(
            "run", "--snapshot-after", "0", "--", SH, "-c", r"printf 'a\377\376b\000c\nlast' >&2"
        )
        self.wait_terminal(j["job_id"])
        self.wait_terminal(j2["job_id"])
        self.assertEqual(
            self.read_bytes(j["stdout_log_path"]), bytes(range(256)) * 3 + b"\nno newline"
        )
        self.assertEqual(self.read_bytes(j["stderr_log_path"]), b"")
        self.assertEqual(self.read_bytes(j2["stderr_log_path"]), b"a\xff\xfeb\x00c\nlast")
        self.assertEqual(self.read_bytes(j2["stdout_log_path"]), b"")

    def test_large_output_is_complete(self):
        code = (
            "import sys\n"
            "for i in range(20000): sys.stdout.write('line %06d ' % i + 'x' * 80 + '\\n')\n"
            "sys.stderr.write('y' * 300000)\n"
        )
        j = self.ok("run", "--snapshot-after", "0", "--wait", "--", PY, "-c", code)
        self.assertEqual(j["state"], "exited", j)
        out = self.read_bytes(j["stdout_log_path"])
        self.assertEqual(out.count(b"\n"), 20000)
        self.assertTrue(out.startswith(b"line 000000 "))
        self.assertTrue(out.endswith(b"line 019999 " + b"x" * 80 + b"\n"))
        self.assertEqual(self.read_bytes(j["stderr_log_path"]), b"y" * 300000)

    def test_long_line_without_newline_does_not_block(self):
        code = "import sys; sys.stdout.write('a' * 3000000); sys.stderr.write('b' * 1000000)"
        t0 = time.monotonic()
        j = self.ok("run", "--snapshot-after", "0", "--wait", "--", PY, "-c", code)
        self.assertLess(time.monotonic() - t0, 20.0)
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(os.path.getsize(j["stdout_log_path"]), 3000000)
        self.assertEqual(os.path.getsize(j["stderr_log_path"]), 1000000)
        self.assertLessEqual(j["final_snapshot"]["stdout_included_bytes"], 65536)
        self.assertIs(j["final_snapshot"]["truncated"], True)

    def test_progress_every_refreshes_updated_at(self):
        j = self.ok("run", "--snapshot-after", "0", "--progress-every", "200", "--", "sleep", "30")
        jid = j["job_id"]
        self.addCleanup(self.kill_job, jid)
        first = self.read_state(jid)["updated_at"]
        self.assertTrue(
            wait_until(lambda: self.read_state(jid)["updated_at"] != first, 5),
            "updated_at was not refreshed",
        )
        self.assertTimestamp(self.read_state(jid)["updated_at"])
        self.assertEqual(self.read_state(jid)["job"]["status"], "running")

    def test_full_log_rows(self):
        j = self.ok(
            "run",
            "--snapshot-after",
            "0",
            "--",
            SH,
            "-c",
            "echo out1; sleep 0.3; echo err1 >&2; sleep 0.3; echo out2; sleep 0.3; "
            "printf errlast >&2; sleep 0.3; printf outlast",
        )
        self.wait_terminal(j["job_id"])
        full = os.path.join(self.job_dir(j["job_id"]), "full.log")
        with open(full, "rb") as f:
            text = f.read().decode("utf-8")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        rows = []
        for line in lines:
            m = FULL_ROW_RE.match(line)
            self.assertIsNotNone(m, "bad full.log row %r in %r" % (line, text))
            self.assertRegex(m.group(1), TS_RE)
            rows.append((m.group(2), m.group(3)))
        self.assertEqual(
            rows,
            [
                ("STDOUT", "out1"),
                ("STDERR", "err1"),
                ("STDOUT", "out2"),
                ("STDERR", "errlast"),
                ("STDOUT", "outlast"),
            ],
        )

    def test_log_option_moves_full_log(self):
        target = os.path.join(self.tmp, "elsewhere", "my.log")
        os.makedirs(os.path.dirname(target))
        j = self.ok("run", "--snapshot-after", "0", "--log", target, "--", "echo", "via-log")
        self.wait_terminal(j["job_id"])
        self.assertTrue(
            wait_until(lambda: os.path.exists(target) and b"via-log" in self.read_bytes(target), 5)
        )
        row = self.read_bytes(target).decode().splitlines()[0]
        m = FULL_ROW_RE.match(row)
        self.assertIsNotNone(m, row)
        self.assertEqual((m.group(2), m.group(3)), ("STDOUT", "via-log"))


# --------------------------------------------------------------------------
# Pre-flight errors: nothing is created
# --------------------------------------------------------------------------


class PreflightTests(JobsTestCase):
    def test_cwd_not_found(self):
        self.fail_with(
            "cwd_not_found", "run", "--cwd", os.path.join(self.tmp, "nope"), "--", "true"
        )
        self.assertNoJobCreated()

    def test_cwd_is_a_file(self):
        f = self.write_file(os.path.join(self.tmp, "afile"), "x")
        r = self.cli("run", "--cwd", f, "--", "true")
        self.assertEqual(r.code, 1, r)
        self.assertIn(r.json["error"]["code"], ("cwd_not_found", "invalid_argument"), r)
        self.assertNoJobCreated()

    def test_command_not_found_bare_name(self):
        self.fail_with(
            "command_not_found", "run", "--", "no-such-command-%s" % uuid.uuid4().hex[:8]
        )
        self.assertNoJobCreated()

    def test_command_not_found_on_env_path(self):
        empty = self.make_dir("emptybin")
        self.fail_with(
            "command_not_found", "run", "--env", "PATH=%s" % empty, "--", "sh", "-c", "true"
        )
        self.assertNoJobCreated()

    def test_command_found_on_env_path_only(self):
        bindir = self.make_dir("mybin")
        self.write_file(os.path.join(bindir, "only-here-cmd"), "#!/bin/sh\necho found-it\n", 0o755)
        j = self.ok(
            "run",
            "--snapshot-after",
            "5000",
            "--env",
            "PATH=%s:/usr/bin:/bin" % bindir,
            "--",
            "only-here-cmd",
        )
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["snapshot"]["stdout_tail"].rstrip("\n"), "found-it")

    def test_relative_path_resolved_against_cwd_not_executable(self):
        d = self.make_dir("jobcwd")
        self.write_file(os.path.join(d, "script.sh"), "#!/bin/sh\necho hi\n", 0o644)
        self.fail_with("command_not_found", "run", "--cwd", d, "--", "./script.sh")
        self.assertNoJobCreated()

    def test_relative_path_resolved_against_cwd_missing(self):
        d = self.make_dir("jobcwd")
        # exists (and is executable) relative to the caller's cwd, not the job's
        self.write_file(os.path.join(self.tmp, "script.sh"), "#!/bin/sh\necho hi\n", 0o755)
        self.fail_with("command_not_found", "run", "--cwd", d, "--", "./script.sh")
        self.assertNoJobCreated()

    def test_relative_path_resolved_against_cwd_ok(self):
        d = self.make_dir("jobcwd")
        self.write_file(os.path.join(d, "script.sh"), "#!/bin/sh\necho rel-ok\n", 0o755)
        j = self.ok("run", "--snapshot-after", "5000", "--cwd", d, "--", "./script.sh")
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["snapshot"]["stdout_tail"].rstrip("\n"), "rel-ok")

    def test_directory_is_not_an_executable_file(self):
        d = self.make_dir("adir")
        os.chmod(d, 0o755)
        self.fail_with("command_not_found", "run", "--", d)
        self.assertNoJobCreated()

    def test_env_file_unreadable(self):
        self.fail_with(
            "invalid_argument",
            "run",
            "--env-file",
            os.path.join(self.tmp, "missing.env"),
            "--",
            "true",
        )
        self.assertNoJobCreated()
        d = self.make_dir("dir.env")
        self.fail_with("invalid_argument", "run", "--env-file", d, "--", "true")
        self.assertNoJobCreated()

    def test_env_file_malformed_line(self):
        f = self.write_file(os.path.join(self.tmp, "bad.env"), "GOOD=1\nthis line is not valid\n")
        self.fail_with("invalid_argument", "run", "--env-file", f, "--", "true")
        self.assertNoJobCreated()

    def test_notify_command_malformed(self):
        for bad in ("not json", "[]", '["/bin/echo", 1]', '{"a": "b"}', '"echo"', "[null]"):
            self.fail_with("usage_error", "run", "--notify-command", bad, "--", "true", exit_code=2)
        self.assertNoJobCreated()

    def test_inherit_env_conflict(self):
        self.fail_with(
            "usage_error", "run", "--no-inherit-env", "--inherit-env", "--", "true", exit_code=2
        )
        self.fail_with(
            "usage_error", "run", "--inherit-env", "--no-inherit-env", "--", "true", exit_code=2
        )
        self.assertNoJobCreated()

    def test_usage_error_has_json_and_usage_on_stderr(self):
        r = self.cli("run", "--snapshot-after", "-5", "--", "true")
        self.assertEqual(r.code, 2, r)
        self.assertEqual(r.json["error"]["code"], "usage_error", r)
        self.assertTrue(r.stderr.strip(), "usage text expected on stderr")
        self.assertNoJobCreated()

    def test_missing_command_is_usage_error(self):
        self.fail_with("usage_error", "run", exit_code=2)
        self.assertNoJobCreated()


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


class EnvironmentTests(JobsTestCase):
    def env_of_job(self, *opts, **kw):
        j = self.ok("run", "--snapshot-after", "0", *opts, "--", ENV_BIN, **kw)
        self.wait_terminal(j["job_id"])
        out = self.read_bytes(j["stdout_log_path"]).decode()
        env = {}
        for line in out.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                env[k] = v
        return j, env

    def test_env_file_syntax_and_order(self):
        f1 = self.write_file(
            os.path.join(self.tmp, "one.env"),
            "\n".join(
                [
                    "# a comment",
                    "",
                    "PLAIN=plain value",
                    "export EXPORTED=exp",
                    'DQ="double quoted"',
                    "SQ='single quoted'",
                    "EQ=a=b=c",
                    "ORDER=file1",
                    "ORDER2=file1",
                    "ORDER3=file1",
                    "",
                ]
            ),
        )
        f2 = self.write_file(os.path.join(self.tmp, "two.env"), "ORDER=file2\nORDER2=file2\n")
        j, env = self.env_of_job(
            "--env", "ORDER2=cli", "--env-file", f1, "--env-file", f2, "--env", "CLI=x y"
        )
        self.assertEqual(env.get("PLAIN"), "plain value")
        self.assertEqual(env.get("EXPORTED"), "exp")
        self.assertNotIn("export EXPORTED", env)
        self.assertEqual(env.get("DQ"), "double quoted")
        self.assertEqual(env.get("SQ"), "single quoted")
        self.assertEqual(env.get("EQ"), "a=b=c")
        self.assertEqual(env.get("ORDER"), "file2")  # later env-file wins
        self.assertEqual(env.get("ORDER2"), "cli")  # --env applied after every env-file
        self.assertEqual(env.get("ORDER3"), "file1")
        self.assertEqual(env.get("CLI"), "x y")
        for k in env:
            self.assertFalse(k.startswith("#"), k)
        self.assertIn("CLI=x y", j["env_vars"])
        self.assertIn("ORDER2=cli", j["env_vars"])

    def test_inherits_callers_env_by_default(self):
        marker = "M" + uuid.uuid4().hex[:10]
        _, env = self.env_of_job("--env", "A=1", env=self.env(AE_TEST_MARKER=marker))
        self.assertEqual(env.get("AE_TEST_MARKER"), marker)
        self.assertEqual(env.get("A"), "1")
        _, env = self.env_of_job("--inherit-env", env=self.env(AE_TEST_MARKER=marker))
        self.assertEqual(env.get("AE_TEST_MARKER"), marker)

    def test_no_inherit_env(self):
        marker = "M" + uuid.uuid4().hex[:10]
        j, env = self.env_of_job(
            "--no-inherit-env",
            "--env",
            "A=1",
            "--env",
            "B=two",
            env=self.env(AE_TEST_MARKER=marker),
        )
        self.assertEqual(env, {"A": "1", "B": "two"})
        self.assertEqual(sorted(j["env_vars"]), ["A=1", "B=two"])

    def test_env_vars_absent_without_env(self):
        j = self.ok("run", "--snapshot-after", "0", "--", "true")
        self.assertNotIn("env_vars", j)
        self.wait_terminal(j["job_id"])

    def test_env_value_containing_equals(self):
        j = self.ok(
            "run",
            "--snapshot-after",
            "0",
            "--env",
            "K=a=b",
            "--",
            PY,
            "-c",
            "import os,sys; sys.stdout.write(os.environ['K'])",
        )
        self.wait_terminal(j["job_id"])
        self.assertEqual(self.read_bytes(j["stdout_log_path"]), b"a=b")
        self.assertIn("K=a=b", j["env_vars"])

    def test_malformed_env_option_is_an_error(self):
        r = self.cli("run", "--env", "NOEQUALS", "--", "true")
        self.assertIn(r.code, (1, 2), r)
        self.assertIs(r.json["ok"], False, r)
        self.assertIn(r.json["error"]["code"], ("usage_error", "invalid_argument"), r)
        self.assertNoJobCreated()


# --------------------------------------------------------------------------
# Masking and secrets
# --------------------------------------------------------------------------


class MaskAndSecretsTests(JobsTestCase):
    def all_files_under(self, top):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                # only regular files: the job dir may hold a FIFO (opening it would block)
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path

    def assertNotInAnyFile(self, needle, top, skip=()):
        needle_b = needle.encode()
        for path in self.all_files_under(top):
            if os.path.basename(path) in skip:
                continue
            data = self.read_bytes(path)
            self.assertNotIn(needle_b, data, "secret found in %s" % path)

    def test_masked_value_in_no_output_and_no_file(self):
        secret = "sekret-" + uuid.uuid4().hex
        events = os.path.join(self.tmp, "ev.ndjson")
        outputs = []
        r = self.cli(
            "run",
            "--snapshot-after",
            "3000",
            "--wait",
            "--env",
            "API_KEY=%s" % secret,
            "--env",
            "OTHER=visible",
            "--mask",
            "API_KEY",
            "--notify-file",
            events,
            "--",
            SH,
            "-c",
            'echo started; test -n "$API_KEY" && echo has-key',
        )
        outputs.append(r)
        self.assertEqual(r.code, 0, r)
        j = r.json
        jid = j["job_id"]
        self.assertEqual(j["state"], "exited", j)
        self.assertIn("API_KEY=***", j["env_vars"])
        self.assertIn("OTHER=visible", j["env_vars"])
        self.assertIn("has-key", j["final_snapshot"]["stdout_tail"])  # the workload still got it
        for args in (
            ("status", jid),
            ("tail", jid),
            ("wait", jid),
            ("list", "--all"),
            ("kill", jid),
            ("schema",),
        ):
            outputs.append(self.cli(*args))
        for res in outputs:
            self.assertNotIn(secret, res.stdout, res.argv)
            self.assertNotIn(secret, res.stderr, res.argv)
        wait_until(lambda: os.path.exists(events), 10)
        time.sleep(0.2)
        self.assertNotInAnyFile(secret, self.root)
        self.assertNotInAnyFile(secret, os.path.dirname(events), skip=())
        meta = self.read_meta(jid)
        self.assertIn("API_KEY", meta["mask"])

    def test_masked_value_printed_by_workload_appears_nowhere(self):
        # "the value of KEY never appears in any output or file": even when the
        # workload prints it (whole, and split across two writes), neither the
        # logs, full.log, snapshots, tail nor any file of the job carries it.
        secret = "printed-" + uuid.uuid4().hex
        code = (
            "import os, sys, time\n"
            "v = os.environ['TOK']\n"
            "print('token is ' + v, flush=True)\n"
            "sys.stderr.write('err ' + v + '\\n'); sys.stderr.flush()\n"
            "sys.stdout.write(v[:7]); sys.stdout.flush(); time.sleep(0.3)\n"
            "sys.stdout.write(v[7:] + '\\n'); sys.stdout.flush()\n"
        )
        r = self.cli(
            "run",
            "--snapshot-after",
            "0",
            "--wait",
            "--env",
            "TOK=%s" % secret,
            "--mask",
            "TOK",
            "--",
            PY,
            "-c",
            code,
        )
        self.assertEqual(r.code, 0, r)
        j = r.json
        self.assertEqual(j["state"], "exited", j)
        self.assertIn("TOK=***", j["env_vars"])
        self.assertNotIn(secret, r.stdout)
        self.assertNotIn(secret, r.stderr)
        for args in (("status", j["job_id"]), ("tail", j["job_id"]), ("wait", j["job_id"])):
            res = self.cli(*args)
            self.assertEqual(res.code, 0, res)
            self.assertNotIn(secret, res.stdout, args)
        self.assertNotInAnyFile(secret, self.root)
        # the workload did run and print (something in place of) the value
        self.assertIn(b"token is ", self.read_bytes(j["stdout_log_path"]))

    def test_env_secret_not_on_disk_nor_on_any_command_line(self):
        secret = "tok" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
        seen = os.path.join(self.tmp, "seen.txt")
        j = self.ok(
            "run",
            "--snapshot-after",
            "0",
            "--env",
            "TOKEN=%s" % secret,
            "--",
            SH,
            "-c",
            'printf %s "$TOKEN" > "$0"; sleep 30',
            seen,
        )
        jid = j["job_id"]
        self.addCleanup(self.kill_job, jid)
        self.assertTrue(wait_until(lambda: os.path.exists(seen) and os.path.getsize(seen) > 0, 10))
        with open(seen) as f:
            self.assertEqual(f.read(), secret, "the workload did not see TOKEN")
        # While the job runs: no process's argv holds the value.
        if os.path.isdir("/proc/self"):
            found = []
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open("/proc/%s/cmdline" % name, "rb") as f:
                        if secret.encode() in f.read():
                            found.append(name)
                except OSError:
                    pass
            self.assertEqual(found, [], "secret visible in /proc/<pid>/cmdline")
        self.assertIn("TOKEN=%s" % secret, j["env_vars"])  # not masked: the response may show it
        self.assertNotInAnyFile(secret, self.root)
        self.ok("kill", jid)
        self.wait_terminal(jid)
        self.assertNotInAnyFile(secret, self.root)


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


class SnapshotsTests(JobsTestCase):
    def test_tail_lines(self):
        code = (
            "import sys\nfor i in range(100): print('line%d' % i)\n"
            "for i in range(5): sys.stderr.write('e%d\\n' % i)"
        )
        j = self.ok("run", "--snapshot-after", "5000", "--tail-lines", "3", "--", PY, "-c", code)
        self.assertEqual(j["state"], "exited", j)
        s = j["snapshot"]
        self.assertEqual(s["stdout_tail"].splitlines(), ["line97", "line98", "line99"])
        self.assertEqual(s["stderr_tail"].splitlines(), ["e2", "e3", "e4"])
        self.assertIs(s["truncated"], True)
        self.assertEqual(s["encoding"], "utf-8-lossy")
        self.assertEqual(s["stdout_observed_bytes"], os.path.getsize(j["stdout_log_path"]))
        self.assertEqual(s["stderr_observed_bytes"], os.path.getsize(j["stderr_log_path"]))
        self.assertEqual(s["stdout_included_bytes"], len(s["stdout_tail"].encode("utf-8")))
        self.assertEqual(s["stderr_included_bytes"], len(s["stderr_tail"].encode("utf-8")))

    def test_not_truncated_when_everything_fits(self):
        j = self.ok("run", "--snapshot-after", "5000", "--", SH, "-c", "echo a; echo b; echo c >&2")
        s = j["snapshot"]
        self.assertIs(s["truncated"], False)
        self.assertEqual(s["stdout_tail"].rstrip("\n"), "a\nb")
        self.assertEqual(s["stderr_tail"].rstrip("\n"), "c")
        self.assertEqual(s["stdout_observed_bytes"], 4)
        self.assertEqual(s["stdout_included_bytes"], len(s["stdout_tail"].encode("utf-8")))
        self.assertEqual(s["stderr_observed_bytes"], 2)

    def test_max_bytes(self):
        j = self.ok(
            "run",
            "--snapshot-after",
            "5000",
            "--max-bytes",
            "10",
            "--",
            SH,
            "-c",
            "echo 0123456789abcdefghij; echo short >&2",
        )
        s = j["snapshot"]
        self.assertLessEqual(len(s["stdout_tail"].encode("utf-8")), 10)
        self.assertTrue(s["stdout_tail"])
        self.assertTrue("0123456789abcdefghij".endswith(s["stdout_tail"].rstrip("\n")), s)
        self.assertIs(s["truncated"], True)
        self.assertEqual(s["stdout_observed_bytes"], 21)
        self.assertEqual(s["stdout_included_bytes"], len(s["stdout_tail"].encode("utf-8")))
        self.assertEqual(s["stderr_tail"].rstrip("\n"), "short")

    def test_size_suffix_for_max_bytes(self):
        j = self.ok(
            "run",
            "--snapshot-after",
            "5000",
            "--max-bytes",
            "1k",
            "--",
            PY,
            "-c",
            "print('z' * 5000)",
        )
        s = j["snapshot"]
        self.assertLessEqual(s["stdout_included_bytes"], 1024)
        self.assertGreater(s["stdout_included_bytes"], 0)
        self.assertIs(s["truncated"], True)

    def test_invalid_utf8_is_replaced(self):
        j = self.ok(
            "run",
            "--snapshot-after",
            "5000",
            "--",
            SH,
            "-c",
            r"printf 'a\377b\n'; printf '\303\251t\351\n' >&2",
        )
        s = j["snapshot"]
        self.assertEqual(s["stdout_tail"].rstrip("\n"), "a\ufffdb")
        self.assertEqual(s["stderr_tail"].rstrip("\n"), "\u00e9t\ufffd")
        self.assertEqual(s["encoding"], "utf-8-lossy")
        self.assertEqual(s["stdout_observed_bytes"], 4)
        self.assertEqual(s["stdout_included_bytes"], len(s["stdout_tail"].encode("utf-8")))

    def test_snapshot_while_running(self):
        j = self.ok("run", "--snapshot-after", "1500", "--", SH, "-c", "echo early; sleep 30")
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertEqual(j["state"], "running")
        self.assertEqual(j["snapshot"]["stdout_tail"].rstrip("\n"), "early")
        self.assertNotIn("exit_code", j)
        self.assertNotIn("finished_at", j)
        self.assertGreaterEqual(j["waited_ms"], 1000)


# --------------------------------------------------------------------------
# Exec failure in the supervisor
# --------------------------------------------------------------------------


class ExecFailureTests(JobsTestCase):
    def test_bad_interpreter_gives_failed_job(self):
        script = self.write_file(
            os.path.join(self.tmp, "badinterp"), "#!/nonexistent/x\necho no\n", 0o755
        )
        r = self.cli("run", "--snapshot-after", "5000", "--", script)
        self.assertEqual(r.code, 0, r)
        j = r.json
        self.assertTrue(j["ok"])
        self.assertEqual(j["state"], "failed", j)
        self.assertIsInstance(j["failure"], dict)
        self.assertIsInstance(j["failure"]["code"], str)
        self.assertIsInstance(j["failure"]["message"], str)
        st = self.ok("status", j["job_id"])
        self.assertEqual(st["state"], "failed")
        self.assertIsInstance(st["failure"], dict)
        state = self.read_state(j["job_id"])
        self.assertEqual(state["job"]["status"], "failed")
        self.assertIsInstance(state["failure"], dict)
        w = self.wait_job(j["job_id"], 5000)
        self.assertEqual(w["state"], "failed")

    def test_bad_interpreter_with_snapshot_after_zero(self):
        script = self.write_file(os.path.join(self.tmp, "badinterp"), "#!/nonexistent/x\n", 0o755)
        j = self.ok("run", "--snapshot-after", "0", "--", script)
        self.assertIn(j["state"], ("running", "failed"))
        w = self.wait_job(j["job_id"], 10000)
        self.assertEqual(w["state"], "failed", w)
        self.assertIsInstance(self.ok("status", j["job_id"])["failure"], dict)


# --------------------------------------------------------------------------
# The stdin fallback: python3 - run ...
# --------------------------------------------------------------------------


class StdinFallbackTests(JobsTestCase):
    def run_from_stdin(self, *args):
        cwd = self.make_dir("stdin-cwd-%s" % uuid.uuid4().hex[:6])
        with open(SCRIPT, "rb") as src:
            proc = subprocess.run(
                [PY, "-"] + list(args),
                stdin=src,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(),
                cwd=cwd,
                timeout=CALL_TIMEOUT,
            )
        self.assertEqual(proc.returncode, 0, proc)
        return json.loads(proc.stdout.decode())

    def test_run_wait_from_stdin(self):
        j = self.run_from_stdin("run", "--wait", "--", "echo", "hi")
        self.assertTrue(j["ok"], j)
        self.assertEqual(j["state"], "exited", j)
        self.assertEqual(j["exit_code"], 0)
        self.assertEqual(j["final_snapshot"]["stdout_tail"].rstrip("\n"), "hi")
        self.assertEqual(self.read_bytes(j["stdout_log_path"]), b"hi\n")

    def test_job_started_from_stdin_survives_caller(self):
        t0 = time.monotonic()
        j = self.run_from_stdin("run", "--snapshot-after", "0", "--", "sleep", "2")
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertLess(time.monotonic() - t0, 10.0)
        self.assertEqual(j["state"], "running", j)
        # the caller is gone: the job goes on and ends on its own
        w = self.wait_job(j["job_id"], 20000)
        self.assertEqual(w["state"], "exited", w)
        self.assertEqual(w["exit_code"], 0)
        st = self.read_state(j["job_id"])
        self.assertGreaterEqual(st["result"]["duration_ms"], 1500)


class FullLogRowsTests(unittest.TestCase):
    """The row builder of full.log, fed chunks directly (no processes)."""

    LIMIT = 8
    PREFIX = b"T [STDOUT] "

    def rows_of(self, chunks):
        """What the builder writes for these chunks, the last one final."""
        stream = agent_exec._Stream("stdout", -1, None)
        out = []
        with mock.patch.object(agent_exec, "FULL_LOG_ROW_MAX", self.LIMIT), mock.patch.object(
            agent_exec, "_timestamp_prefix", lambda s: self.PREFIX
        ):
            for i, chunk in enumerate(chunks):
                final = i == len(chunks) - 1
                out.append(b"".join(agent_exec._full_log_rows(stream, chunk, final)))
        self.assertEqual(stream.partial, b"")
        return b"".join(out)

    def expected(self, data):
        """One row per line; a line longer than LIMIT in LIMIT-sized rows."""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        rows = []
        for line in lines:
            pieces = [line[i : i + self.LIMIT] for i in range(0, len(line), self.LIMIT)]
            rows.extend(pieces or [b""])
        return b"".join(self.PREFIX + r + b"\n" for r in rows)

    def test_whole_output_in_one_chunk(self):
        for data in (b"a\nbb\n", b"a\n\nc", b"x" * 8 + b"\n", b"x" * 16 + b"\ny\n", b"z" * 20):
            with self.subTest(data=data):
                self.assertEqual(self.rows_of([data]), self.expected(data))

    def test_line_cut_at_the_limit_then_its_newline_alone(self):
        # The newline that arrives after a row cut at the limit adds no empty row.
        self.assertEqual(self.rows_of([b"x" * 8, b"\n", b""]), self.PREFIX + b"x" * 8 + b"\n")

    def test_any_chunking_gives_the_same_rows(self):
        rnd = random.Random(4)
        for _ in range(300):
            data = bytes(rnd.choice(b"ab\n\n\x00") for _ in range(rnd.randrange(0, 60)))
            data += b"q" * rnd.choice((0, 0, 7, 8, 9, 16, 17))
            cuts = sorted(rnd.sample(range(len(data) + 1), min(len(data) + 1, rnd.randrange(0, 6))))
            chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])] + [b""]
            with self.subTest(data=data, cuts=cuts):
                self.assertEqual(self.rows_of(chunks), self.expected(data))

    def test_pieces_are_views_not_copies_for_long_lines(self):
        stream = agent_exec._Stream("stdout", -1, None)
        parts = agent_exec._full_log_rows(stream, b"\x00" * (3 * 65536), True)
        self.assertEqual(sum(isinstance(p, memoryview) for p in parts), 3)
        self.assertEqual(sum(len(p) for p in parts), 3 * 65536 + 3 * (len(parts[0]) + 1))


class ReadinessTests(JobsTestCase):
    def test_ready_match_dev_server(self):
        r = self.okv("run", "--ready-match", "listening", "--", PY, "-c", DEV_SERVER)
        job = r["job_id"]
        self.assertIs(r["ready"], True, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 800, r)
        self.assertLessEqual(r["waited_ms"], 5000, r)
        self.assertIn("listening", r["snapshot"]["stdout_tail"])
        s = self.okv("status", job)
        self.assertIs(s["ready"], True, s)
        self.assertRegex(s["ready_at"], RFC3339_RE)
        started = parse_rfc3339(s["started_at"])
        self.assertGreaterEqual(parse_rfc3339(s["ready_at"]) - started, 0.7, s)
        w, took = self.timed("wait", "--ready", "--timeout-ms", "10000", job)
        self.assertIs(w["ready"], True, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertLess(took, 5.0)
        entry = self.okv("list")["jobs"][0]
        self.assertEqual(entry["job_id"], job)
        self.assertIs(entry["ready"], True)
        self.kill_job(job)

    def test_wait_ready_blocks_until_ready(self):
        job = self.py_job(DEV_SERVER, opts=("--ready-match", "listening"))
        self.assertIs(self.okv("status", job)["ready"], False)
        w, took = self.timed("wait", "--ready", "--timeout-ms", "15000", job)
        self.assertIs(w["ready"], True, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "running")
        self.assertGreaterEqual(took, 0.5)
        self.assertLess(took, 8.0)
        self.kill_job(job)

    def test_ready_port(self):
        port = free_port()
        r = self.okv("run", "--ready-port", str(port), "--", PY, "-c", PORT_SERVER, str(port))
        job = r["job_id"]
        self.assertIs(r["ready"], True, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 800, r)
        self.assertLessEqual(r["waited_ms"], 5000, r)
        s = self.okv("status", job)
        self.assertIs(s["ready"], True, s)
        if LINUX:
            self.assertIn(port, s["ports"], s)
        self.kill_job(job)

    def test_job_ends_before_it_is_ready(self):
        r, took = self.timed(
            "run", "--ready-match", "never", "--", "/bin/sh", "-c", "echo hi; exit 3"
        )
        self.assertIs(r["ready"], False, r)
        self.assertEqual(r["state"], "exited")
        self.assertEqual(r["exit_code"], 3)
        self.assertLess(r["waited_ms"], 5000)
        w = self.okv("wait", "--ready", "--timeout-ms", "10000", r["job_id"])
        self.assertIs(w["ready"], False, w)
        self.assertIs(w["timed_out"], False, w)
        self.assertEqual(w["state"], "exited")
        s = self.okv("status", r["job_id"])
        self.assertIs(s["ready"], False, s)
        self.assertIsNone(s["ready_at"])

    def test_snapshot_after_passes_before_ready(self):
        r = self.okv(
            "run", "--ready-match", "never", "--snapshot-after", "700", "--", "sleep", "30"
        )
        job = r["job_id"]
        self.assertIs(r["ready"], False, r)
        self.assertEqual(r["state"], "running")
        self.assertGreaterEqual(r["waited_ms"], 600, r)
        self.assertLess(r["waited_ms"], 5000, r)
        w = self.okv("wait", "--ready", "--timeout-ms", "300", job)
        self.assertIs(w["timed_out"], True, w)
        self.assertIs(w["ready"], False, w)
        self.kill_job(job)

    def test_no_condition_no_ready_fields(self):
        r = self.okv("run", "--", "/bin/sh", "-c", "echo hi")
        self.assertNotIn("ready", r)
        s = self.okv("status", r["job_id"])
        self.assertNotIn("ready", s)
        self.assertNotIn("ready_at", s)
        entry = self.okv("list")["jobs"][0]
        self.assertIn("ready", entry)
        self.assertIsNone(entry["ready"])

    def test_bad_readiness_options_are_usage_errors(self):
        for argv in (
            ("--ready-match", "(unclosed"),
            ("--ready-port", "0"),
            ("--ready-port", "65536"),
            ("--ready-port", "http"),
        ):
            with self.subTest(argv=argv):
                self.fail_with("usage_error", "run", *(argv + ("--", "true")), exit_code=2)
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))


class StdinTests(JobsTestCase):
    """run --stdin TEXT | - and --stdin-file: bytes the job reads, then EOF."""

    def final_out(self, *args, **kw):
        j = self.ok("run", "--wait", *args, **kw)
        self.assertEqual(j["state"], "exited", j)
        return j, j["final_snapshot"]["stdout_tail"]

    def test_text_file_and_the_callers_stdin(self):
        j, out = self.final_out("--stdin", "two\nlines", "--", "cat")
        self.assertEqual(out, "two\nlines")  # exact: no newline added
        path = os.path.join(self.job_dir(j["job_id"]), "stdin")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(self.read_json(os.path.join(self.job_dir(j["job_id"]), "meta.json"))[
            "stdin_bytes"], 9)  # fmt: skip
        # input is never written to a log
        j, out = self.final_out("--stdin", "s3cret\n", "--", "sh", "-c", "read x; echo read")
        self.assertEqual(out, "read\n")
        for log in ("stdout.log", "stderr.log", "full.log"):
            with open(os.path.join(self.job_dir(j["job_id"]), log), "rb") as f:
                self.assertNotIn(b"s3cret", f.read())
        src = os.path.join(self.tmp, "in.bin")
        with open(src, "wb") as f:
            f.write(b"\x00\xffabc")
        _j, out = self.final_out("--stdin-file", src, "--", "wc", "-c")
        self.assertEqual(out.strip(), "5")
        with open(src, "rb") as f:
            _j, out = self.final_out("--stdin", "-", "--", "wc", "-c", stdin=f)
        self.assertEqual(out.strip(), "5")
        # without any: /dev/null, and run never reads its own stdin
        with open(src, "rb") as f:
            _j, out = self.final_out("--", "wc", "-c", stdin=f)
        self.assertEqual(out.strip(), "0")

    def test_bad_input_creates_nothing(self):
        src = os.path.join(self.tmp, "in.txt")
        with open(src, "w") as f:
            f.write("abc")
        self.fail_with("usage_error", "run", "--stdin", "x", "--stdin-file", src, "--", "cat",
                       exit_code=2)  # fmt: skip
        j = self.fail_with(
            "invalid_argument", "run", "--stdin-max-bytes", "2", "--stdin-file", src, "--", "cat"
        )
        self.assertIn("--stdin-max-bytes", j["error"]["message"])
        self.fail_with("invalid_argument", "run", "--stdin-file", src + ".nope", "--", "cat")
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))


class SendTests(JobsTestCase):
    """run --stdin-open and send: input while the job runs."""

    def test_a_python_repl_driven_by_send(self):
        jid = self.start_bg("python3", "-i", "-q", opts=("--stdin-open",))
        j = self.ok("send", "--text", "2+2\n", jid)
        self.assertEqual((j["accepted_bytes"], j["eof"]), (4, False), j)
        m = self.ok("wait", "--match", "^4$", "--timeout-ms", "10000", jid)
        self.assertTrue(m["matched"], m)
        self.assertEqual(self.ok("send", "--eof", jid)["eof"], True)
        w = self.ok("wait", "--timeout-ms", "10000", jid)
        self.assertEqual((w["state"], w["exit_code"]), ("exited", 0), w)
        self.assertEqual(
            sorted(n for n in os.listdir(self.job_dir(jid)) if n.startswith(".")), []
        )  # no .send-* or .reply-* left
        e = self.fail_with("invalid_state", "send", "--text", "x", jid)
        self.assertIn("exited", e["error"]["message"])

    def test_send_never_blocks_and_says_when_to_retry(self):
        jid = self.start_bg("sleep", "30", opts=("--stdin-open",))  # never reads
        big = os.path.join(self.tmp, "big")
        with open(big, "wb") as f:
            f.write(b"x" * 1000000)
        t0 = time.monotonic()
        j = self.ok("send", "--file", big, jid)
        self.assertEqual(j["accepted_bytes"], 1000000)
        e = self.fail_with("input_full", "send", "--file", big, jid)
        self.assertIs(e["error"]["retryable"], True)
        self.assertLess(time.monotonic() - t0, 10)

    def test_bad_sends(self):
        done = self.ok("run", "--wait", "--", "true")["job_id"]
        e = self.fail_with("invalid_state", "send", "--text", "x", done)
        self.assertIn("--stdin-open", e["error"]["message"])
        for args in (("--text", "a", "--file", "/etc/hostname"), (), ("--stdin", "x")):
            with self.subTest(args=args):
                self.fail_with("usage_error", "send", *args, done, exit_code=2)
        self.fail_with("usage_error", "run", "--stdin-open", "--stdin", "x", "--", "true",
                       exit_code=2)  # fmt: skip


@unittest.skipUnless(LINUX, "waiting_for_input reads /proc")
class WaitingForInputTests(JobsTestCase):
    ASK = "import time; time.sleep(0.3); x = input('name? '); print('hi', x)"

    def test_detected_answered_and_gone(self):
        t0 = time.monotonic()
        r = self.ok("run", "--stdin-open", "--", PY, "-c", self.ASK)  # snapshot up to 10 s
        self.addCleanup(self.kill_job, r["job_id"])
        self.assertLess(time.monotonic() - t0, 8)  # answered early, when it asked
        self.assertIs(r["waiting_for_input"], True, r)
        jid = r["job_id"]
        st = self.ok("status", jid)
        self.assertEqual((st["waiting_for_input"], st["input_prompt"]), (True, "name? "), st)
        self.ok("send", "--text", "bob\n", jid)
        w = self.ok("wait", "--timeout-ms", "10000", jid)
        self.assertEqual(w["state"], "exited", w)
        self.assertEqual(self.ok("tail", jid)["stdout_tail"], "name? hi bob\n")
        self.assertIs(self.ok("status", jid)["waiting_for_input"], False)

    def test_wait_input(self):
        jid = self.start_bg(PY, "-c", self.ASK, opts=("--stdin-open",))
        w = self.ok("wait", "--input", "--timeout-ms", "10000", jid)
        self.assertEqual((w["waiting_for_input"], w["timed_out"]), (True, False), w)
        self.assertEqual(w["input_prompt"], "name? ")
        busy = self.start_bg("sleep", "30", opts=("--stdin-open",))  # never reads
        w = self.ok("wait", "--input", "--timeout-ms", "300", busy)
        self.assertEqual((w["waiting_for_input"], w["timed_out"]), (False, True), w)
        self.assertIs(self.ok("status", busy)["waiting_for_input"], False)
        done = self.ok("run", "--wait", "--", "true")["job_id"]
        w = self.ok("wait", "--input", done)
        self.assertEqual(
            (w["waiting_for_input"], w["timed_out"], w["state"]), (False, False, "exited")
        )
        self.fail_with("usage_error", "wait", "--input", "--ready", done, exit_code=2)


class ShellAndNoninteractiveTests(JobsTestCase):
    def test_shell_string(self):
        j = self.ok("run", "--wait", "--shell", "echo a | tr a b && echo done >&2")
        self.assertEqual(j["final_snapshot"]["stdout_tail"], "b\n")
        self.assertEqual(j["final_snapshot"]["stderr_tail"], "done\n")
        meta = self.read_json(os.path.join(self.job_dir(j["job_id"]), "meta.json"))
        self.assertEqual(
            (meta["shell"], meta["shell_command"]), (True, "echo a | tr a b && echo done >&2")
        )
        self.assertEqual(meta["command"], ["/bin/sh", "-c", "echo a | tr a b && echo done >&2"])
        plain = self.read_json(
            os.path.join(
                self.job_dir(self.ok("run", "--wait", "--", "true")["job_id"]), "meta.json"
            )
        )
        self.assertEqual((plain["shell"], plain["shell_command"]), (False, None))
        self.fail_with("usage_error", "run", "--shell", "true", "--", "true", exit_code=2)
        self.fail_with("usage_error", "run", "--shell", " ", exit_code=2)
        e = self.fail_with("command_not_found", "run", "--", "make x | y")
        self.assertIn("agent-exec run --shell 'make x | y'", e["error"]["message"])

    def test_noninteractive_environment(self):
        show = "echo $CI $GIT_TERMINAL_PROMPT $DEBIAN_FRONTEND $PAGER $GIT_PAGER"
        show += " $PYTHONUNBUFFERED $NO_COLOR"
        j = self.ok("run", "--wait", "--noninteractive", "--shell", show)
        self.assertEqual(j["final_snapshot"]["stdout_tail"], "1 0 noninteractive cat cat 1 1\n")
        j = self.ok(
            "run", "--wait", "--noninteractive", "--env", "PAGER=less", "--shell", "echo $PAGER"
        )
        self.assertEqual(j["final_snapshot"]["stdout_tail"], "less\n")  # --env wins
        j = self.ok("run", "--wait", "--env", "X=1", "--shell", "echo ${CI-unset}")
        self.assertEqual(j["final_snapshot"]["stdout_tail"].strip(), os.environ.get("CI", "unset"))


class ExitCodeTests(JobsTestCase):
    def test_run_wait_exit_code_passes_the_job_status_on(self):
        for cmd, status in ((("sh", "-c", "exit 3"), 3), (("sh", "-c", "kill -TERM $$"), 143)):
            with self.subTest(cmd=cmd):
                r = self.cli("run", "--wait", "--exit-code", "--", *cmd)
                self.assertEqual(r.code, status, r)
                self.assertTrue(r.json["ok"], r)  # still its one JSON answer
        # without the flag: 0, whatever the job did
        self.assertEqual(self.cli("run", "--wait", "--", "sh", "-c", "exit 3").code, 0)

    def test_exit_code_needs_wait(self):
        j = self.fail_with("usage_error", "run", "--exit-code", "--", "true", exit_code=2)
        self.assertIn("--wait", j["error"]["message"])
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))

    def test_exit_status_of_answers(self):
        f = agent_exec._job_exit_status
        self.assertEqual(f({"exit_code": 0, "end_reason": "exit"}), 0)
        self.assertEqual(f({"exit_code": 143, "signal": "SIGTERM", "end_reason": "kill"}), 143)
        self.assertEqual(f({"signal": "SIGKILL", "end_reason": "timeout"}), 137)
        self.assertEqual(f({"signal": "SIGSEGV", "end_reason": "signal"}), 128 + 11)
        self.assertEqual(f({"end_reason": "spawn_failed"}), 125)
        self.assertEqual(f({"end_reason": "supervisor_lost"}), 125)


class PortInUseTests(JobsTestCase):
    def test_a_held_port_is_refused_before_anything_is_created(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            j = self.fail_with("port_in_use", "run", "--ready-port", str(port), "--", "true")
            if agent_exec._IS_LINUX:
                self.assertIn("pid %d" % os.getpid(), j["error"]["message"])
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))

    @unittest.skipUnless(sys.platform.startswith("linux"), "Linux: /proc/net/tcp")
    def test_ready_only_when_the_job_itself_listens(self):
        port = free_port()
        server = (
            "import socket, time; s = socket.socket(); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            "s.bind(('127.0.0.1', %d)); s.listen(5); time.sleep(30)" % port
        )
        # The job binds after 1 s; another process takes the port first.
        jid = self.start_bg(
            "sh", "-c", 'sleep 1; exec %s -c "%s"' % (PY, server), opts=("--ready-port", str(port))
        )
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(5)
            j = self.ok("wait", "--ready", "--timeout-ms", "2500", jid)
            self.assertFalse(j.get("ready"), j)
            self.assertFalse(self.ok("status", jid).get("ready"))
        # The port is free again but the job's bind failed: it never listened.
        self.wait_job(jid)
        self.assertFalse(self.ok("status", jid).get("ready"))


class ShellLineTests(JobsTestCase):
    def test_a_lone_argument_with_shell_syntax(self):
        j = self.fail_with("command_not_found", "run", "--", "make test | tee log")
        msg = j["error"]["message"]
        self.assertIn("looks like a shell command line", msg)
        self.assertIn("agent-exec run -- sh -c 'make test | tee log'", msg)
        j = self.fail_with("command_not_found", "run", "--", "no-such-cmd-xyz")
        self.assertNotIn("shell", j["error"]["message"])


if __name__ == "__main__":
    unittest.main()
