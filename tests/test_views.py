"""The views for people: --format table, follow and completion, seen through
a real pseudo-terminal where a person would see them."""

import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import time
import unittest

from tests._jobs import JobsTestCase
from tests._util import CLI


def on_a_terminal(argv, env, cwd, timeout=30, send_sigint_after=None):
    """Run ``argv`` with a pty as stdout (and stdin/stderr); (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, start_new_session=True
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    sent = False
    try:
        while time.monotonic() < deadline:
            if send_sigint_after is not None and not sent and send_sigint_after(out):
                proc.send_signal(signal.SIGINT)
                sent = True
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=10), out.decode("utf-8", "replace").replace("\r\n", "\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


class TableTests(JobsTestCase):
    def setUp(self):
        super().setUp()
        self.ok_id = self.ok("run", "--wait", "--", "sh", "-c", "echo out; echo err >&2")["job_id"]
        self.bad_id = self.ok("run", "--wait", "--", "sh", "-c", "exit 3")["job_id"]
        self.run_id = self.start_bg("sleep", "30")

    def term_env(self, **extra):
        env = self.env(COLUMNS="100")
        env.pop("NO_COLOR", None)
        env.update(extra)
        return env

    def test_list_table_on_a_terminal(self):
        code, text = on_a_terminal(CLI + ["list", "-H"], self.term_env(), self.tmp)
        self.assertEqual(code, 0, text)
        self.assertIn("\033[", text)  # colour on a terminal
        plain = _strip_ansi(text).splitlines()
        self.assertRegex(plain[0], r"^ID\s+NAME\s+STATE\s+EXIT\s+AGE\s+DURATION\s+COMMAND$")
        by_id = {line.split()[0]: line for line in plain[1:4]}
        for jid, state, exit_cell, command in (
            (self.ok_id, "exited", "0", "sh -c 'echo out; echo err >&2'"),
            (self.bad_id, "exited", "3", "sh -c 'exit 3'"),
            (self.run_id, "running", "-", "sleep 30"),
        ):
            row = by_id[jid[:12]]
            self.assertEqual(row.split()[2:4], [state, exit_cell], row)
            self.assertIn(" ago ", row)
            self.assertTrue(row.endswith(command), row)
        # the columns are aligned: STATE starts at the same place in every row
        at = plain[0].index("STATE")
        self.assertTrue(all(line[at - 2 : at] == "  " for line in plain[:4]), plain)

    def test_no_colour_with_no_color_or_without_a_terminal(self):
        code, text = on_a_terminal(CLI + ["list", "-H"], self.term_env(NO_COLOR="1"), self.tmp)
        self.assertEqual(code, 0)
        self.assertNotIn("\033[", text)
        r = self.cli("list", "--format", "table")  # a pipe: the table, asked for, plain
        self.assertEqual(r.code, 0)
        self.assertTrue(r.stdout.startswith("ID "), r.stdout)
        self.assertNotIn("\033[", r.stdout)
        self.assertTrue(self.cli("list").stdout.startswith("{"))  # JSON by default

    def test_control_characters_never_reach_the_terminal(self):
        self.ok("run", "--wait", "--", "echo", "x\ny\033[31mRED")
        r = self.cli("list", "-H")
        self.assertNotIn("\033", r.stdout)
        self.assertIn("\\n", r.stdout)
        self.assertEqual(len(r.stdout.splitlines()), 5, r.stdout)  # header + 4 jobs
        code, text = on_a_terminal(CLI + ["list", "-H"], self.term_env(NO_COLOR=""), self.tmp)
        self.assertNotIn("\033[", text)  # NO_COLOR set, even empty: no colour

    def test_status_and_tail_tables(self):
        r = self.cli("status", "-H", self.bad_id)
        self.assertRegex(r.stdout, r"(?m)^state\s+exited$")
        self.assertRegex(r.stdout, r"(?m)^exit code\s+3$")
        self.assertRegex(r.stdout, r"(?m)^end reason\s+exit$")
        self.assertRegex(r.stdout, r"(?m)^success\s+no$")
        r = self.cli("tail", "-H", self.ok_id)
        self.assertEqual(
            r.stdout, "%s  exited\n--- stdout ---\nout\n--- stderr ---\nerr\n" % self.ok_id
        )
        e = self.cli("list", "-H", "--format", "json")
        self.assertEqual((e.code, e.json["error"]["code"]), (2, "usage_error"))


def _strip_ansi(text):
    import re

    return re.sub(r"\033\[[0-9;]*m", "", text)


class FollowTests(JobsTestCase):
    def test_follow_streams_as_output_arrives_and_exits_as_the_job(self):
        jid = self.start_bg(
            "sh", "-c", "echo first; sleep 1; echo second >&2; sleep 1; echo third; exit 4"
        )
        seen = {}
        t0 = time.monotonic()

        def watch(out):
            for word in (b"first", b"second", b"third"):
                if word in out and word not in seen:
                    seen[word] = time.monotonic() - t0
            return False

        code, text = on_a_terminal(
            CLI + ["follow", jid], self.env(), self.tmp, send_sigint_after=watch
        )
        self.assertEqual(code, 4, text)
        self.assertEqual(text, "first\nsecond\nthird\n")
        # each line came when the job wrote it, not all at the end
        self.assertLess(seen[b"first"], seen[b"third"] - 1.0, seen)

    def test_both_streams_in_full_logs_order_and_a_cursor(self):
        script = "echo o1; sleep 0.2; echo e1 >&2; sleep 0.2; echo o2; printf tail"
        jid = self.ok("run", "--wait", "--", "sh", "-c", script)["job_id"]
        r = self.cli("follow", jid)
        self.assertEqual((r.code, r.stdout), (0, "o1\ne1\no2\ntail"))
        r = self.cli("follow", "--cursor", "c1.3.0", jid)  # past "o1\n"
        self.assertEqual(r.stdout, "e1\no2\ntail")

    @unittest.skipUnless(shutil.which("bash"), "bash is not installed")
    def test_a_reader_that_goes_away(self):
        jid = self.start_bg("sh", "-c", "while :; do echo y; sleep 0.05; done")
        argv = " ".join(shlex.quote(a) for a in CLI)
        proc = subprocess.run(
            ["bash", "-c", "%s follow %s | head -n 2; echo ${PIPESTATUS[0]}" % (argv, jid)],
            stdout=subprocess.PIPE,
            env=self.env(),
            cwd=self.tmp,
            universal_newlines=True,
            timeout=60,
        )
        self.assertEqual(proc.stdout.split(), ["y", "y", "141"], proc.stdout)
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_ctrl_c_stops_following_not_the_job(self):
        jid = self.start_bg("sh", "-c", "echo started; sleep 30")
        code, text = on_a_terminal(
            CLI + ["follow", jid],
            self.env(),
            self.tmp,
            send_sigint_after=lambda out: b"started" in out,
        )
        self.assertEqual(code, 130, text)
        self.assertEqual(text, "started\n")
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_follow_a_finished_job_and_one_stream(self):
        jid = self.ok("run", "--wait", "--", "sh", "-c", "echo o; echo e >&2; kill -TERM $$")[
            "job_id"
        ]
        r = self.cli("follow", "--stream", "stderr", jid)
        self.assertEqual((r.code, r.stdout), (128 + 15, "e\n"))
        r = self.cli("follow", "nope")  # errors are still JSON
        self.assertEqual((r.code, r.json["error"]["code"]), (1, "job_not_found"))


@unittest.skipUnless(shutil.which("bash"), "bash is not installed")
class CompletionTests(JobsTestCase):
    def complete(self, line, bin_dir):
        """COMPREPLY of the bash completion for ``line`` (the cursor at its end)."""
        script = self.cli("completion", "bash").stdout
        words = line.split(" ")
        program = (
            script
            + "\nCOMP_WORDS=(%s); COMP_CWORD=%d; _agent_exec; printf '%%s\\n' \"${COMPREPLY[@]}\""
            % (" ".join("'%s'" % w for w in words), len(words) - 1)
        )
        env = self.env(PATH=bin_dir + ":" + os.environ.get("PATH", ""))
        proc = subprocess.run(
            ["bash", "-c", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.tmp,
            universal_newlines=True,
            timeout=30,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout.split()

    def test_bash_completes_commands_options_and_job_ids(self):
        bin_dir = os.path.join(self.tmp, "bin")
        os.mkdir(bin_dir)
        with open(os.path.join(bin_dir, "agent-exec"), "w") as f:
            f.write('#!/bin/sh\nexec %s "$@"\n' % " ".join(shlex.quote(a) for a in CLI))
        os.chmod(os.path.join(bin_dir, "agent-exec"), 0o755)
        jid = self.ok("run", "--wait", "--", "true")["job_id"]
        self.assertEqual(self.complete("agent-exec fol", bin_dir), ["follow"])
        self.assertIn("--timeout", self.complete("agent-exec run --ti", bin_dir))
        self.assertIn("--lingering", self.complete("agent-exec list --l", bin_dir))
        self.assertEqual(self.complete("agent-exec status " + jid[:6], bin_dir), [jid])

    def test_every_shell_gets_a_script(self):
        for shell in ("bash", "zsh", "fish"):
            with self.subTest(shell=shell):
                r = self.cli("completion", shell)
                self.assertEqual(r.code, 0)
                self.assertIn("agent-exec", r.stdout)
                self.assertIn("follow", r.stdout)
        check = subprocess.run(["bash", "-n"], input=self.cli("completion", "bash").stdout,
                               universal_newlines=True, timeout=30)  # fmt: skip
        self.assertEqual(check.returncode, 0)
        r = self.cli("completion", "tcsh")
        self.assertEqual((r.code, r.json["error"]["code"]), (2, "usage_error"))


if __name__ == "__main__":
    unittest.main()
