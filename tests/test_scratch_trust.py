"""Scratch: issue-9 tests, to be moved into the subject files."""

import json
import os
import socket
import subprocess
import sys
import time
import unittest

from tests._util import CLI, PY, REPO, CLITestCase, wait_until

sys.path.insert(0, REPO)
import agent_exec  # noqa: E402

# A job whose main process, a child in its group, and a child that left the
# group (setsid) count the USR1s they get, each in a file of its own.
_COUNTERS = r"""
import os, signal, sys, time
def count(tag):
    n = [0]
    def on_usr1(*_):
        n[0] += 1
        with open(tag + ".tmp", "w") as f:
            f.write(str(n[0]))
        os.replace(tag + ".tmp", tag)
    signal.signal(signal.SIGUSR1, on_usr1)
    open(tag + ".ready", "w").close()
    while True:
        time.sleep(1)
if os.fork() == 0:
    os.setsid()
    count("left")
if os.fork() == 0:
    count("group")
count("main")
"""


class KillOnceTests(CLITestCase):
    def test_each_process_gets_each_signal_once(self):
        work = os.path.join(self.tmp, "w")
        os.mkdir(work)
        jid = self.start_bg(PY, "-c", _COUNTERS, opts=("--cwd", work))
        ready = [os.path.join(work, t + ".ready") for t in ("main", "group", "left")]
        self.assertTrue(wait_until(lambda: all(map(os.path.exists, ready)), 10))
        for _ in range(6):
            t0 = time.monotonic()
            j = self.ok("kill", "--signal", "USR1", jid)
            # Not a signal that ends the job: no settle wait (1 s) before answering.
            self.assertLess(time.monotonic() - t0, 0.9, j)
            self.assertEqual((j["signal"], j["state"], j["sent"]), ("SIGUSR1", "running", True))

        def counts():
            out = {}
            for tag in ("main", "group", "left"):
                try:
                    with open(os.path.join(work, tag)) as f:
                        out[tag] = int(f.read() or 0)
                except (OSError, ValueError):
                    out[tag] = 0
            return out

        wait_until(lambda: counts() == {"main": 6, "group": 6, "left": 6}, 5)
        time.sleep(0.3)  # a late duplicate would show now
        self.assertEqual(counts(), {"main": 6, "group": 6, "left": 6})
        # The job did not end: USR1 is not a kill.
        self.assertEqual(self.ok("status", jid)["state"], "running")

    def test_stop_cont_winch_by_name(self):
        jid = self.start_bg("sleep", "30")
        for name in ("STOP", "CONT", "WINCH"):
            t0 = time.monotonic()
            j = self.ok("kill", "--signal", name, jid)
            self.assertLess(time.monotonic() - t0, 0.9, j)
            self.assertEqual((j["signal"], j["state"]), ("SIG" + name, "running"), j)
        j = self.ok("kill", jid)
        self.assertEqual((j["state"], j["end_reason"], j["success"]), ("killed", "kill", False))


class EndReasonTests(CLITestCase):
    def test_each_end_reason_in_every_answer(self):
        event_file = os.path.join(self.tmp, "events.jsonl")
        cases = (
            (("--",), ("true",), "exited", "exit", True, 0),
            (("--",), ("sh", "-c", "exit 3"), "exited", "exit", False, 3),
            (("--",), ("sh", "-c", "kill -TERM $$"), "killed", "signal", False, None),
            (("--timeout", "300ms", "--"), ("sleep", "30"), "killed", "timeout", False, None),
        )
        for opts, cmd, state, reason, success, code in cases:
            with self.subTest(reason=reason, cmd=cmd):
                r = self.ok("run", "--wait", "--notify-file", event_file, *opts, *cmd)
                jid = r["job_id"]
                for what, answer in (
                    ("run", r),
                    ("status", self.ok("status", jid)),
                    ("wait", self.ok("wait", jid)),
                    ("read", self.ok("read", jid)),
                    ("list", [e for e in self.ok("list")["jobs"] if e["job_id"] == jid][0]),
                ):
                    self.assertEqual(answer["state"], state, (what, answer))
                    self.assertEqual(answer["end_reason"], reason, (what, answer))
                    self.assertIs(answer["success"], success, (what, answer))
                    self.assertEqual(answer.get("exit_code"), code, (what, answer))
                    # wait's own timed_out is about the wait, not the job.
                    if what == "wait":
                        self.assertIs(answer["timed_out"], False)
                read = self.ok("read", jid)
                self.assertTrue(read["eof"], read)
                self.assertIn("finished_at", read)
        # the completion events, in order
        self.assertTrue(wait_until(lambda: _lines(event_file) == 4, 10))
        with open(event_file) as f:
            events = [json.loads(line) for line in f]
        self.assertEqual(
            [(e["end_reason"], e["success"]) for e in events],
            [("exit", True), ("exit", False), ("signal", False), ("timeout", False)],
        )

    def test_wait_on_several_jobs_gives_each_its_reason(self):
        a = self.ok("run", "--wait", "--", "true")["job_id"]
        b = self.ok("run", "--wait", "--", "sh", "-c", "exit 2")["job_id"]
        jobs = {e["job_id"]: e for e in self.ok("wait", a, b)["jobs"]}
        self.assertEqual((jobs[a]["end_reason"], jobs[a]["success"]), ("exit", True))
        self.assertEqual((jobs[b]["end_reason"], jobs[b]["success"]), ("exit", False))

    def test_kill_is_its_own_reason(self):
        jid = self.start_bg("sleep", "30")
        self.ok("kill", jid)
        j = self.ok("wait", "--timeout-ms", "10000", jid)
        self.assertEqual((j["state"], j["end_reason"], j["success"]), ("killed", "kill", False))

    def test_running_job_has_no_end_reason(self):
        jid = self.start_bg("sleep", "30")
        for answer in (self.ok("status", jid), self.ok("read", jid)):
            self.assertNotIn("end_reason", answer)
            self.assertNotIn("success", answer)

    def test_read_carries_the_result_only_at_eof(self):
        r = self.ok("run", "--wait", "--", "sh", "-c", "echo hi; exit 4")
        first = self.ok("read", "--max-bytes", "1", r["job_id"])
        self.assertFalse(first["eof"])
        self.assertNotIn("exit_code", first)
        last = self.ok("read", "--cursor", first["cursor"], r["job_id"])
        self.assertTrue(last["eof"], last)
        self.assertEqual(
            (last["exit_code"], last["end_reason"], last["success"]), (4, "exit", False)
        )


def _lines(path):
    try:
        with open(path) as f:
            return len(f.readlines())
    except OSError:
        return 0


class ExitCodeTests(CLITestCase):
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


class WaitReadyMatchTests(CLITestCase):
    def test_ready_first(self):
        jid = self.start_bg("sh", "-c", "echo UP; sleep 30", opts=("--ready-match", "^UP$"))
        t0 = time.monotonic()
        j = self.ok("wait", "--ready", "--match", "NEVER", "--timeout-ms", "20000", jid)
        self.assertLess(time.monotonic() - t0, 10, j)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (True, False, False), j)

    def test_match_first(self):
        port = _free_port()
        jid = self.start_bg(
            "sh", "-c", "sleep 0.2; echo hello; sleep 30", opts=("--ready-port", str(port))
        )
        j = self.ok("wait", "--ready", "--match", "hel+o", "--timeout-ms", "20000", jid)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (False, True, False), j)
        self.assertEqual(j["match"]["line"], "hello")

    def test_neither_before_the_timeout(self):
        port = _free_port()
        jid = self.start_bg("sleep", "30", opts=("--ready-port", str(port)))
        j = self.ok("wait", "--ready", "--match", "x", "--timeout-ms", "300", jid)
        self.assertEqual((j["ready"], j["matched"], j["timed_out"]), (False, False, True), j)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUseTests(CLITestCase):
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
        port = _free_port()
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


class LingeringTests(CLITestCase):
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


class RootAndCwdTests(CLITestCase):
    def test_a_root_that_is_a_file_is_refused_by_every_command(self):
        path = os.path.join(self.tmp, "file")
        with open(path, "w") as f:
            f.write("x")
        env = self.env(AGENT_EXEC_ROOT=path)
        fake = "01" + "A" * 24
        for args in (
            ("run", "--", "true"),
            ("list",),
            ("gc",),
            ("status", fake),
            ("wait", fake),
            ("read", fake),
            ("tail", fake),
            ("kill", fake),
            ("delete", fake),
        ):
            with self.subTest(args=args):
                self.fail_with("insecure_root", *args, env=env)

    def test_list_from_a_deleted_directory(self):
        gone = os.path.join(self.tmp, "gone")
        os.mkdir(gone)
        script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
        argv = ["sh", "-c", script, "sh", gone] + CLI + ["list"]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, env=self.env(), timeout=60)
        j = json.loads(proc.stdout)
        self.assertEqual((proc.returncode, j["error"]["code"]), (1, "cwd_not_found"), j)
        self.assertIn("--all", j["error"]["message"])

    def test_cwd_that_is_a_file_and_log_under_a_file(self):
        path = os.path.join(self.tmp, "file")
        open(path, "w").close()
        j = self.fail_with("cwd_not_found", "run", "--cwd", path, "--", "true")
        self.assertIn("is not a directory", j["error"]["message"])
        j = self.fail_with("invalid_argument", "run", "--log", path + "/x.log", "--", "true")
        self.assertIn("%s is a file" % path, j["error"]["message"])

    def test_an_endless_env_file_is_refused(self):
        # /dev/zero never ends: reading it whole would take all memory.
        j = self.fail_with("invalid_argument", "run", "--env-file", "/dev/zero", "--", "true")
        self.assertIn("larger than 1 MiB", j["error"]["message"])

    def test_nul_in_an_env_file_value(self):
        path = os.path.join(self.tmp, "env")
        with open(path, "wb") as f:
            f.write(b"A=x\x00y\n")
        j = self.fail_with("invalid_argument", "run", "--env-file", path, "--", "true")
        self.assertIn("NUL", j["error"]["message"])
        self.assertFalse(os.path.isdir(self.root) and os.listdir(self.root))

    def test_sub_millisecond_timeout_is_a_usage_error(self):
        j = self.fail_with("usage_error", "run", "--timeout", "0.4ms", "--", "true", exit_code=2)
        self.assertIn("1 ms", j["error"]["message"])


class RootResolutionTests(unittest.TestCase):
    def resolve(self, explicit=None, **env):
        saved = dict(os.environ)
        try:
            for key in ("AGENT_EXEC_ROOT", "XDG_DATA_HOME", "HOME"):
                os.environ.pop(key, None)
            os.environ.update(env)
            return agent_exec.resolve_root(explicit)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def test_rules(self):
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
        tail = "/.local/share/agent-exec/jobs"
        self.assertEqual(self.resolve(HOME="/h"), "/h" + tail)
        self.assertEqual(self.resolve(HOME=""), home + tail)
        self.assertEqual(self.resolve(HOME="rel"), home + tail)
        self.assertEqual(self.resolve(XDG_DATA_HOME="/x", HOME="/h"), "/x/agent-exec/jobs")
        self.assertEqual(self.resolve(XDG_DATA_HOME="rel", HOME="/h"), "/h" + tail)
        self.assertEqual(self.resolve(XDG_DATA_HOME="", HOME="/h"), "/h" + tail)
        cwd = os.getcwd()
        self.assertEqual(self.resolve("rel/r"), os.path.join(cwd, "rel/r"))
        self.assertEqual(self.resolve(AGENT_EXEC_ROOT="rel"), os.path.join(cwd, "rel"))
        self.assertEqual(self.resolve("/r", AGENT_EXEC_ROOT="/e"), "/r")


class StrictJsonTests(CLITestCase):
    def test_bytes_that_are_not_utf8(self):
        arg = os.fsdecode(b"a\xffb")
        r = self.cli("run", "--wait", "--", "printf", "%s", arg)
        raw = r.stdout
        self.assertNotIn("\\udc", raw)
        j = r.json
        job_dir = self.job_dir(j["job_id"])
        with open(os.path.join(job_dir, "meta.json"), "rb") as f:
            meta_raw = f.read()
        meta_raw.decode("utf-8")  # strict
        self.assertNotIn(b"\\udc", meta_raw)
        self.assertEqual(json.loads(meta_raw)["command"], ["printf", "%s", "a\ufffdb"])
        listed = self.cli("list").stdout
        self.assertNotIn("\\udc", listed)
        # The job ran with the exact bytes.
        with open(os.path.join(job_dir, "stdout.log"), "rb") as f:
            self.assertEqual(f.read(), b"a\xffb")

    def test_clean_surrogates(self):
        f = agent_exec._to_json
        self.assertEqual(f(["a\udcffb"]), '["a\\ufffdb"]')
        self.assertEqual(f({"k\udc80": "\ud800"}), '{"k\\ufffd": "?"}')
        self.assertEqual(f(["\U0001f600"]), '["\\ud83d\\ude00"]')  # a valid pair stays

    def test_last_output_never_before_started(self):
        r = self.ok("run", "--wait", "--", "echo", "hi")
        log = os.path.join(self.job_dir(r["job_id"]), "stdout.log")
        old = time.time() - 3600
        os.utime(log, (old, old))
        s = self.ok("status", r["job_id"])
        self.assertGreaterEqual(s["last_output_at"], s["started_at"])


class HelpTests(unittest.TestCase):
    def test_every_option_and_positional_has_help(self):
        for name in agent_exec.COMMANDS:
            parser = agent_exec.build_parser(name).commands[name]
            for action in parser._actions:
                with self.subTest(command=name, option=action.dest):
                    self.assertTrue(action.help, action)
                    if action.metavar in ("DURATION", "SIZE"):
                        self.assertIn(action.metavar + ":", action.help)

    def help_text(self, *args):
        return subprocess.run(
            CLI + list(args), stdout=subprocess.PIPE, universal_newlines=True, timeout=60
        ).stdout

    def test_run_help(self):
        text = self.help_text("run", "--help")
        self.assertIn("--timeout DURATION", text)
        self.assertIn("--max-output SIZE", text)
        self.assertIn("5s", text)
        examples = text[text.index("examples:") :]
        self.assertIn("agent-exec run -- ", examples)
        self.assertIn("sh -c", examples)
        self.assertIn("--timeout", examples)
        self.assertIn("--ready-", examples)
        self.assertIn("agent-exec schema", text)
        self.assertNotIn("README", text)
        self.assertEqual(self.help_text("help", "run"), text)
        self.assertEqual(self.help_text("help"), self.help_text("--help"))

    def test_no_abbreviations_and_suggestions(self):
        r = subprocess.run(
            CLI + ["run", "--snap", "0", "--", "true"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
        )
        j = json.loads(r.stdout)
        self.assertEqual((r.returncode, j["error"]["code"]), (2, "usage_error"))
        self.assertIn("did you mean --snapshot-after?", j["error"]["message"])
        r = subprocess.run(
            CLI + ["run", "--tiemout", "5s", "--", "true"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
        )
        self.assertIn("did you mean --timeout?", json.loads(r.stdout)["error"]["message"])


class ShellLineTests(CLITestCase):
    def test_a_lone_argument_with_shell_syntax(self):
        j = self.fail_with("command_not_found", "run", "--", "make test | tee log")
        msg = j["error"]["message"]
        self.assertIn("looks like a shell command line", msg)
        self.assertIn("agent-exec run -- sh -c 'make test | tee log'", msg)
        j = self.fail_with("command_not_found", "run", "--", "no-such-cmd-xyz")
        self.assertNotIn("shell", j["error"]["message"])


if __name__ == "__main__":
    unittest.main()
