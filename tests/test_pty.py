"""run --pty: a job on a pseudo-terminal, typed into with send --keys, resized with send --size."""

import json
import os
import unittest

from tests._jobs import LINUX, PY, JobsTestCase

# Prints what the workload sees of its terminal, on stdout and on stderr.
SHOW_TERMINAL = (
    "import os, sys; "
    "print(sys.stdin.isatty(), sys.stdout.isatty(), sys.stderr.isatty(), os.environ.get('TERM'), "
    "*os.get_terminal_size()); "
    "sys.stderr.write('to stderr\\n')"
)

# Reads one key in raw mode (after asking for application cursor keys when
# told to) and prints the bytes it got.
READ_KEY = (
    "import os, sys, tty; tty.setraw(0); "
    "sys.stdout.write('\\x1b[?1h' if sys.argv[1] == 'app' else ''); sys.stdout.write('key? '); "
    "sys.stdout.flush(); print(repr(os.read(0, 16)))"
)


class PtyTests(JobsTestCase):
    def wait_done(self, jid, timeout_ms="15000"):
        w = self.ok("wait", "--timeout-ms", timeout_ms, jid)
        self.assertFalse(w.get("timed_out"), w)
        return w

    def stdout_of(self, jid):
        return self.read_bytes(os.path.join(self.job_dir(jid), "stdout.log")).decode()

    def test_the_workload_has_a_terminal(self):
        r = self.ok("run", "--pty", "--wait", "--", PY, "-c", SHOW_TERMINAL)
        out = r["final_snapshot"]["stdout_tail"]
        self.assertIn("True True True xterm-256color 80 24\r\n", out)
        self.assertIn("to stderr\r\n", out)  # both streams, as a terminal merges them
        self.assertEqual(r["final_snapshot"]["stderr_tail"], "")
        jid = r["job_id"]
        self.assertEqual(os.path.getsize(os.path.join(self.job_dir(jid), "stderr.log")), 0)
        meta = self.read_meta(jid)
        self.assertEqual((meta["pty"], meta["pty_size"]), (True, {"cols": 80, "rows": 24}))
        self.assertEqual(self.ok("status", jid)["stderr_bytes"], 0)
        # --pty-size, and the caller's --env TERM wins
        r = self.ok(
            "run", "--pty", "--pty-size", "100x30", "--env", "TERM=vt100", "--wait", "--",
            PY, "-c", SHOW_TERMINAL,
        )  # fmt: skip
        self.assertIn("True True True vt100 100 30", r["final_snapshot"]["stdout_tail"])
        plain = self.read_meta(self.ok("run", "--wait", "--", "true")["job_id"])
        self.assertEqual((plain["pty"], plain["pty_size"]), (False, None))

    def test_a_python_repl_typed_into(self):
        jid = self.start_bg(PY, "-q", opts=("--pty",))
        j = self.ok("send", "--text", "2+2", "--keys", "enter", jid)
        self.assertEqual(j["accepted_bytes"], 4, j)
        m = self.ok("wait", "--match", "^4$", "--timeout-ms", "15000", jid)
        self.assertTrue(m["matched"], m)
        self.assertIn("\n4\r\n", self.ok("read", jid)["stdout"])
        self.ok("send", "--keys", "ctrl-d", jid)  # EOF at the start of a line
        w = self.wait_done(jid)
        self.assertEqual((w["state"], w["exit_code"]), ("exited", 0), w)

    @unittest.skipUnless(LINUX, "waiting_for_input reads /proc")
    def test_a_read_prompt_is_seen_then_answered(self):
        r = self.ok("run", "--pty", "--", "sh", "-c", 'read -p "name? " n; echo hi $n')
        jid = r["job_id"]
        self.addCleanup(self.kill_job, jid)
        self.assertIs(r["waiting_for_input"], True, r)  # answered early, when it asked
        self.assertLess(r["waited_ms"], 9000, r)
        st = self.ok("status", jid)
        self.assertEqual((st["waiting_for_input"], st["input_prompt"]), (True, "name? "), st)
        w = self.ok("wait", "--input", "--timeout-ms", "5000", jid)
        self.assertIs(w["waiting_for_input"], True, w)
        self.ok("send", "--text", "bob", "--keys", "enter", jid)
        self.assertEqual(self.wait_done(jid)["state"], "exited")
        self.assertEqual(
            self.stdout_of(jid), "name? bob\r\nhi bob\r\n"
        )  # the echo, then the answer

    @unittest.skipUnless(LINUX, "waiting_for_input reads /proc")
    def test_a_repl_waiting_in_select_counts_as_waiting(self):
        r = self.ok("run", "--pty", "--", PY, "-q")  # readline waits in select(2)
        self.addCleanup(self.kill_job, r["job_id"])
        self.assertIs(r["waiting_for_input"], True, r)
        self.assertEqual(self.ok("status", r["job_id"])["input_prompt"], ">>> ")

    def test_ctrl_c_interrupts_the_foreground_program(self):
        jid = self.start_bg("sleep", "100", opts=("--pty",))
        self.ok("send", "--keys", "ctrl-c", jid)
        w = self.wait_done(jid, "10000")
        self.assertEqual((w["state"], w["signal"], w["end_reason"]), ("killed", "SIGINT", "signal"))

    def test_a_resize_is_seen_by_the_program(self):
        jid = self.start_bg("sh", "-c", "tput cols; read x; tput cols; tput lines", opts=("--pty",))
        self.wait_for_output(jid, "80")
        j = self.ok("send", "--size", "132x40", "--keys", "enter", jid)
        self.assertEqual(j["size"], {"cols": 132, "rows": 40}, j)
        self.wait_done(jid)
        self.assertEqual(self.stdout_of(jid), "80\r\n\r\n132\r\n40\r\n")
        with open(os.path.join(self.job_dir(jid), "resize.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        self.assertEqual(rows, [{"at": 4, "cols": 132, "rows": 40}])
        # --size alone types nothing
        jid = self.start_bg("sleep", "30", opts=("--pty",))
        j = self.ok("send", "--size", "20x5", jid)
        self.assertEqual((j["accepted_bytes"], j["size"]), (0, {"cols": 20, "rows": 5}), j)

    def test_cursor_keys_follow_the_programs_mode(self):
        for mode, typed in (("normal", r"b'\x1b[A'"), ("app", r"b'\x1bOA'")):
            with self.subTest(mode=mode):
                jid = self.start_bg(PY, "-c", READ_KEY, mode, opts=("--pty",))
                self.wait_for_output(jid, "key? ")
                self.ok("send", "--keys", "up", jid)
                self.wait_done(jid)
                self.assertIn(typed, self.stdout_of(jid))

    def test_masked_values_are_not_echoed_into_the_logs(self):
        jid = self.start_bg(
            "sh", "-c", 'read -p "token? " t; echo got ${#t}',
            opts=("--pty", "--env", "TOKEN=hunter2", "--mask", "TOKEN"),
        )  # fmt: skip
        self.wait_for_output(jid, "token? ")
        self.ok("send", "--text", "hunter2", "--keys", "enter", jid)
        self.wait_done(jid)
        self.assertEqual(self.stdout_of(jid), "token? ***\r\ngot 7\r\n")
        for name in os.listdir(self.job_dir(jid)):
            path = os.path.join(self.job_dir(jid), name)
            if os.path.isfile(path):
                self.assertNotIn(b"hunter2", self.read_bytes(path), name)

    def test_eof_types_ctrl_d(self):
        jid = self.start_bg("cat", opts=("--pty",))
        self.ok("send", "--text", "hi", "--keys", "enter", jid)
        self.assertTrue(self.ok("send", "--eof", jid)["eof"])
        w = self.wait_done(jid)
        self.assertEqual((w["state"], w["exit_code"]), ("exited", 0), w)
        self.assertEqual(self.stdout_of(jid), "hi\r\nhi\r\n")  # echo, then cat's copy

    def test_timeouts_and_readiness_work_as_on_any_job(self):
        r = self.ok("run", "--pty", "--timeout", "300ms", "--wait", "--", "sleep", "30")
        self.assertEqual((r["state"], r["end_reason"]), ("killed", "timeout"), r)
        r = self.ok(
            "run",
            "--pty",
            "--ready-match",
            "^up$",
            "--",
            "sh",
            "-c",
            "sleep 0.2; echo up; sleep 30",
        )
        self.addCleanup(self.kill_job, r["job_id"])
        self.assertIs(r["ready"], True, r)
        k = self.ok("kill", r["job_id"])
        self.assertEqual(k["state"], "killed", k)

    def test_bad_input(self):
        piped = self.start_bg("sleep", "30", opts=("--stdin-open",))
        for args in (("--keys", "enter"), ("--size", "80x24")):
            with self.subTest(args=args):
                e = self.fail_with("invalid_state", "send", *args, piped)
                self.assertIn("--pty", e["error"]["message"])
        pty = self.start_bg("sleep", "30", opts=("--pty",))
        for args, word in (
            (("--keys", "enter,hyper"), "unknown key 'hyper'"),
            (("--keys", '"open'), "not closed"),
            (("--size", "0x0"), "0x0"),
            (("--size", "80"), "COLSxROWS"),
        ):
            with self.subTest(args=args):
                e = self.fail_with("usage_error", "send", *args, pty, exit_code=2)
                self.assertIn(word, e["error"]["message"])
        for args in (
            ("--pty", "--stdin", "x"),
            ("--pty", "--stdin-file", "/etc/hostname"),
            ("--pty-size", "80x24"),
            ("--pty", "--pty-size", "0x0"),
        ):
            with self.subTest(args=args):
                self.fail_with("usage_error", "run", *args, "--", "true", exit_code=2)


if __name__ == "__main__":
    unittest.main()
