"""run --pty: a job on a pseudo-terminal, typed into with send --keys, resized with send --size."""

import json
import os
import shutil
import time
import unittest

from tests._jobs import LINUX, PY, JobsTestCase
from tests._procs import curses_box_rows

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


# Draws a box and text at known cells, then waits for a key.
CURSES_PROGRAM = (
    "import curses\n"
    "def main(w):\n"
    "    curses.curs_set(1)\n"
    "    w.addstr(0, 0, 'curses test')\n"
    "    win = curses.newwin(5, 20, 2, 10)\n"
    "    win.box()\n"
    "    win.addstr(2, 3, 'hello curses')\n"
    "    w.addstr(23, 70, 'corner')\n"
    "    w.refresh()\n"
    "    win.refresh()\n"
    "    w.move(20, 7)\n"
    "    w.refresh()\n"
    "    while w.getch() != ord('q'):\n"
    "        pass\n"
    "curses.wrapper(main)\n"
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
        # Python 3.13's REPL draws its lines with escape sequences (the line of
        # the answer starts with some): match its end; read --plain shows it.
        m = self.ok("wait", "--match", "4$", "--timeout-ms", "15000", jid)
        self.assertTrue(m["matched"], m)
        self.assertIn("\n4\n", self.ok("read", "--plain", jid)["stdout"])
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
        # After text with no newline, --eof still ends the input (two ctrl-d).
        jid = self.start_bg("cat", opts=("--pty",))
        self.ok("send", "--text", "abc", "--eof", jid)
        w = self.wait_done(jid)
        self.assertEqual((w["state"], w["exit_code"]), ("exited", 0), w)
        self.assertIn("abc", self.stdout_of(jid))
        self.fail_with("invalid_state", "send", "--size", "40x10", jid)  # over: no resize

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

    def screen_until(self, jid, done, timeout=15.0):
        """screen's answer once ``done(answer)`` holds (the last one, after the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            scr = self.ok("screen", jid)
            if done(scr) or time.monotonic() > deadline:
                return scr
            time.sleep(0.1)

    @unittest.skipUnless(shutil.which("less"), "no less")
    def test_less_on_the_screen_then_pgdn(self):
        path = os.path.join(self.tmp, "lines.txt")
        with open(path, "w") as f:
            f.write("".join("line %d\n" % i for i in range(1, 201)))
        jid = self.start_bg("less", path, opts=("--pty",))
        scr = self.screen_until(jid, lambda a: a["rows"][22:23] == ["line 23"])
        self.assertEqual(scr["rows"][:23], ["line %d" % i for i in range(1, 24)], scr)
        self.assertEqual((scr["cols"], scr["lines"], scr["alt_screen"]), (80, 24, True), scr)
        self.assertIn("lines.txt", scr["rows"][23])  # less's prompt
        self.assertEqual(scr["cursor"]["row"], 23)
        self.ok("send", "--keys", "pgdn", jid)
        scr = self.screen_until(jid, lambda a: a["rows"][:1] == ["line 24"])
        self.assertEqual(scr["rows"][:23], ["line %d" % i for i in range(24, 47)], scr)
        self.ok("send", "--keys", "down*2", jid)  # application cursor keys, as less asked
        scr = self.screen_until(jid, lambda a: a["rows"][:1] == ["line 26"])
        self.assertEqual(scr["rows"][0], "line 26", scr)
        self.ok("send", "--text", "q", jid)
        self.assertEqual(self.wait_done(jid)["state"], "exited")
        self.assertIs(self.ok("screen", jid)["alt_screen"], False)

    def test_a_curses_program_on_the_screen(self):
        jid = self.start_bg(PY, "-c", CURSES_PROGRAM, opts=("--pty", "--pty-size", "80x24"))
        scr = self.screen_until(jid, lambda a: a["cursor"] == {"row": 20, "col": 7})
        want = curses_box_rows()
        self.assertEqual(scr["rows"], want, scr)
        self.assertIs(scr["alt_screen"], True)
        log_cursor = scr["log_cursor"]
        self.assertEqual(self.ok("read", "--cursor", log_cursor, jid)["stdout"], "")
        self.ok("send", "--text", "q", jid)
        self.assertEqual(self.wait_done(jid)["exit_code"], 0)

    def test_the_screen_follows_a_resize(self):
        jid = self.start_bg(
            "sh", "-c", "read x; tput cols; read x", opts=("--pty", "--pty-size", "40x10")
        )
        scr = self.screen_until(jid, lambda a: True)
        self.assertEqual((scr["cols"], scr["lines"]), (40, 10), scr)
        self.ok("send", "--size", "100x30", "--keys", "enter", jid)
        scr = self.screen_until(jid, lambda a: "100" in a["rows"])
        self.assertEqual((scr["cols"], scr["lines"]), (100, 30), scr)
        self.assertIn("100", scr["rows"])

    @unittest.skipUnless(LINUX, "waiting_for_input reads /proc")
    def test_a_pipe_inside_the_job_is_not_its_stdin(self):
        # cat reads the pipe from sleep, not the job's stdin: nobody waits for input.
        for opts in ((), ("--stdin-open",), ("--pty",)):
            with self.subTest(opts=opts):
                r = self.ok("run", *opts, "--snapshot-after", "1000", "--shell", "sleep 5 | cat")
                self.addCleanup(self.kill_job, r["job_id"])
                self.assertGreaterEqual(r["waited_ms"], 900, r)
                self.assertIs(r.get("waiting_for_input", False), False, r)
                self.assertIs(self.ok("status", r["job_id"])["waiting_for_input"], False)
        r = self.ok("run", "--stdin-open", "--shell", "read x | cat")  # reads the job's stdin
        self.addCleanup(self.kill_job, r["job_id"])
        self.assertIs(r["waiting_for_input"], True, r)

    def test_plain_reads_page_around_escape_sequences(self):
        jid = self.ok("run", "--wait", "--shell", r'printf "abc\rX\n\033[31mhello\033[0m\n"')[
            "job_id"
        ]
        cursor, texts = "c1.0.0", []
        for _ in range(20):
            r = self.ok("read", "--plain", "--max-bytes", "4", "--cursor", cursor, jid)
            texts.append(r["stdout"])
            cursor = r["cursor"]
            if r["eof"]:
                break
        self.assertEqual("".join(texts), "abcX\nhello\n")  # no "31m" fragment
        self.assertEqual(cursor, "c1.15.0")  # every raw byte counted
        self.assertEqual(self.ok("read", "--cursor", cursor, jid)["stdout"], "")

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
