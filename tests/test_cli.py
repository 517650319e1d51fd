"""The front end: the output contract (one JSON object, its envelope, exit codes),
robustness, logging, the jobs root, option values and job ids.
"""

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import unittest

from tests._jobs import COMMANDS, JobsTestCase, RFC3339_MS, ULID_RE, job_ids_in, other_char
from tests._util import CLI, REPO, clone_job, only_regular

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402
from tests import test_units as _units  # noqa: E402  (its value lists, not its tests)


class OutputContractTests(JobsTestCase):
    def test_no_subcommand_is_usage_error(self):
        self.usage_error()

    def test_no_subcommand_with_only_global_options(self):
        self.usage_error("--root", os.path.join(self.tmp, "r"))
        self.usage_error("-v")

    def test_unknown_subcommand(self):
        self.usage_error("frobnicate")
        self.usage_error("frobnicate", "--all")

    def test_supervise_is_hidden_from_help(self):
        r = self.cli("--help")
        self.assertEqual(r.code, 0, r)
        self.assertNotIn("_supervise", r.stdout, r)

    def test_bad_flags(self):
        jid = self.finished_job()
        cases = [
            ("--bogus",),
            ("--bogus", "list"),
            ("list", "--bogus"),
            ("status", "--bogus", jid),
            ("kill", "--bogus", jid),
            ("run", "--bogus", "--", "true"),
        ]
        for args in cases:
            with self.subTest(args=args):
                self.usage_error(*args)

    def test_missing_arguments(self):
        cases = [
            ("status",),
            ("kill",),
            ("run",),
            ("run", "--"),
            ("list", "--limit"),
        ]
        for args in cases:
            with self.subTest(args=args):
                self.usage_error(*args)

    def test_bad_values(self):
        jid = self.finished_job()
        cases = [
            ("list", "--limit", "abc"),
            ("tail", "--tail-lines", "-3", jid),
            ("run", "--tail-lines", "x", "--", "true"),
            ("run", "--notify-command", "not json", "--", "true"),
            ("run", "--notify-command", "[]", "--", "true"),
            ("run", "--notify-command", '["/bin/true", 1]', "--", "true"),
        ]
        for args in cases:
            with self.subTest(args=args):
                self.usage_error(*args)

    def test_a_conflict_found_after_parsing_prints_the_commands_usage(self):
        for args, prog in (
            (("run", "--no-inherit-env", "--inherit-env", "--", "true"), "agent-exec run"),
            (("list", "--all", "--cwd", "/"), "agent-exec list"),
        ):
            with self.subTest(args=args):
                r = self.usage_error(*args)
                self.assertTrue(r.stderr.startswith("usage: " + prog + " "), r.stderr)
                self.assertIn(prog + ": error: ", r.stderr)

    def test_bad_signal_name_is_usage_error(self):
        jid = self.finished_job()
        for sig in ("BOGUS", "SIGFOO", "-1"):
            with self.subTest(signal=sig):
                self.usage_error("kill", "--signal", sig, jid)

    def test_conflicting_flags(self):
        self.usage_error("run", "--inherit-env", "--no-inherit-env", "--", "true")
        self.usage_error("list", "--all", "--cwd", self.tmp)

    def test_help_is_plain_text(self):
        for flag in ("--help", "-h"):
            with self.subTest(flag=flag):
                r = self.cli(flag)
                self.assertEqual(r.code, 0, r)
                self.assertIsNone(r.json, r)
                self.assertTrue(r.stdout.strip(), r)
                self.assertFalse(r.stdout.lstrip().startswith("{"), r)
                for cmd in COMMANDS:
                    self.assertIn(cmd, r.stdout, r)

    def test_subcommand_help_is_plain_text(self):
        for args in (("run", "--help"), ("list", "-h"), ("wait", "--help")):
            with self.subTest(args=args):
                r = self.cli(*args)
                self.assertEqual(r.code, 0, r)
                self.assertIsNone(r.json, r)
                self.assertTrue(r.stdout.strip(), r)
        r = self.cli("run", "--help")
        self.assertIn("--snapshot-after", r.stdout, r)
        self.assertEqual(job_ids_in(self.root), [])

    def test_version_is_one_plain_line(self):
        r = self.cli("--version")
        self.assertEqual(r.code, 0, r)
        line = r.stdout.strip()
        self.assertTrue(line, r)
        self.assertNotIn("\n", line, r)
        self.assertLessEqual(r.stdout.count("\n"), 1, r)
        self.assertNotIsInstance(r.json, dict, r)

    def test_every_command_answers_one_object_with_common_fields(self):
        jid = self.start("sh", "-c", "echo out; echo err >&2")
        j = self.assert_contract(self.cli("wait", "--timeout-ms", "20000", jid), 0)
        self.assertEqual(j["type"], "wait")
        runj = self.assert_contract(
            self.cli("run", "--snapshot-after", "0", "--", "echo", "hello"), 0
        )
        self.assertEqual(runj["type"], "run")
        self.wait_job(runj["job_id"])
        for args, typ in [
            (("status", jid), "status"),
            (("tail", jid), "tail"),
            (("kill", jid), "kill"),
            (("list",), "list"),
            (("list", "--all"), "list"),
            (("schema",), "schema"),
            (("run", "--wait", "--", "true"), "run"),
            (("run", "--snapshot-after", "200", "--", "printf", "x"), "run"),
        ]:
            with self.subTest(args=args):
                j = self.assert_contract(self.cli(*args), 0)
                self.assertIs(j["ok"], True)
                self.assertEqual(j["type"], typ)

    def test_error_envelopes(self):
        cases = [
            ("job_not_found", ("status", "01ARZ3NDEKTSV4RRFFQ69G5FAV"), 1),
            ("job_not_found", ("tail", "ZZZZ"), 1),
            ("cwd_not_found", ("run", "--cwd", os.path.join(self.tmp, "nope"), "--", "true"), 1),
            ("command_not_found", ("run", "--", "agent-exec-no-such-command-xyz"), 1),
            ("command_not_found", ("run", "--", os.path.join(self.tmp, "no-such-file")), 1),
            (
                "invalid_argument",
                ("run", "--env-file", os.path.join(self.tmp, "missing.env"), "--", "true"),
                1,
            ),
            ("usage_error", (), 2),
        ]
        for code, args, exit_code in cases:
            with self.subTest(args=args):
                r = self.cli(*args)
                j = self.assert_contract(r, exit_code)
                self.assertIs(j["ok"], False)
                self.assertEqual(j["error"]["code"], code, r)
                self.assertTrue(j["error"]["message"], r)
                self.assertNotIn("Traceback", r.stderr, r)
        # pre-checks never create a job
        self.assertEqual(job_ids_in(self.root), [])

    def test_root_that_is_a_file_gives_one_json_error(self):
        bad = os.path.join(self.tmp, "file")
        with open(bad, "w") as f:
            f.write("x")
        r = self.cli("--root", bad, "run", "--", "true")
        j = self.assert_contract(r, 1)
        self.assertIs(j["ok"], False)
        self.assertNotIn("Traceback", r.stderr, r)

    def test_schema_command(self):
        j = self.ok("schema")
        self.assertEqual(j["type"], "schema")
        self.assertEqual(j["schema_version"], "0.1")
        self.assertEqual(j["schema_format"], "json-schema-draft-07")
        self.assertIsInstance(j["schema"], dict)
        self.assertTrue(j["schema"])
        self.assertIsInstance(j["generated_at"], str)
        self.assertRegex(j["generated_at"], RFC3339_MS)

    def test_schema_works_without_a_root(self):
        missing = os.path.join(self.tmp, "never", "created")
        j = self.ok("--root", missing, "schema")
        self.assertEqual(j["schema_format"], "json-schema-draft-07")


class RobustnessTests(JobsTestCase):
    """Damaged job files never break the output contract."""

    BAD_STATES = [
        "{",
        '{"job": 5}',
        '{"job": {"id": 1, "status": 7}, "result": "x", "pid": "abc"}',
    ]

    def test_damaged_state_json(self):
        jid = self.finished_job()
        path = os.path.join(self.job_dir(jid), "state.json")
        # _util's tear-down reads state.json and expects an object
        self.addCleanup(os.unlink, path)
        for content in self.BAD_STATES:
            with open(path, "w") as f:
                f.write(content)
            for args in (
                ("status", jid),
                ("wait", "--timeout-ms", "300", jid),
                ("kill", jid),
                ("list", "--all"),
            ):
                with self.subTest(state_json=content, args=args):
                    r = self.cli(*args)
                    j = self.assert_contract(r)
                    self.assertIn(r.code, (0, 1), r)
                    self.assertNotIn("Traceback", r.stderr, r)
                    if not j["ok"] and j["error"]["code"] == "internal_error":
                        rv = self.cli("-vv", *args)
                        self.assert_contract(rv, 1)
                        self.assertIn("Traceback", rv.stderr, rv)

    def test_damaged_meta_json(self):
        jid = self.finished_job()
        path = os.path.join(self.job_dir(jid), "meta.json")
        for content in ("{", '{"job": 5, "command": "x", "cwd": 3}'):
            with open(path, "w") as f:
                f.write(content)
            for args in (("status", jid), ("tail", jid), ("list",)):
                with self.subTest(meta_json=content, args=args):
                    r = self.cli(*args)
                    self.assert_contract(r)
                    self.assertIn(r.code, (0, 1), r)
                    self.assertNotIn("Traceback", r.stderr, r)


class LoggingTests(JobsTestCase):
    def test_verbosity_flags_keep_stdout_clean(self):
        jid = self.finished_job()
        for args in (
            ("-v", "list", "--all"),
            ("-vv", "list", "--all"),
            ("-vv", "status", jid),
            ("-v", "tail", jid),
            ("-vv", "wait", "--timeout-ms", "5000", jid),
            ("-vv", "run", "--snapshot-after", "300", "--", "echo", "hi"),
            ("-vv", "run", "--wait", "--", "sh", "-c", "echo a; echo b >&2"),
        ):
            with self.subTest(args=args):
                r = self.cli(*args)
                j = self.assert_contract(r, 0)
                self.assertTrue(j["ok"])

    def test_verbosity_on_errors(self):
        r = self.cli("-vv", "status", "ZZZZZZZZ")
        j = self.assert_contract(r, 1)
        self.assertEqual(j["error"]["code"], "job_not_found")
        r = self.cli("-vv", "frobnicate")
        j = self.assert_contract(r, 2)
        self.assertEqual(j["error"]["code"], "usage_error")

    def test_log_env_vars_keep_stdout_clean(self):
        jid = self.finished_job()
        variants = [
            {"AGENT_EXEC_LOG": "debug"},
            {"RUST_LOG": "debug"},
            {"RUST_LOG": "info,agent_exec=debug"},
            {"AGENT_EXEC_LOG": "error", "RUST_LOG": "debug"},
        ]
        for extra in variants:
            for args in (("status", jid), ("run", "--wait", "--", "echo", "x")):
                with self.subTest(env=extra, args=args):
                    r = self.cli(*args, env=self.env(**extra))
                    self.assert_contract(r, 0)
            with self.subTest(env=extra, args="error"):
                r = self.cli("status", "ZZZZZZZZ", env=self.env(**extra))
                self.assert_contract(r, 1)

    def test_log_levels_have_an_effect(self):
        # An expected failure is logged at some level; the level knobs decide
        # whether that line reaches stderr. Compare line counts only.
        def lines(*pre, **env):
            r = self.cli(*(pre + ("status", "ZZZZZZZZ")), env=self.env(**env))
            self.assert_contract(r, 1)
            return len([l for l in r.stderr.splitlines() if l.strip()])

        default = lines()
        quiet = lines(AGENT_EXEC_LOG="error")
        loud = lines(AGENT_EXEC_LOG="debug")
        self.assertGreater(loud, quiet, "AGENT_EXEC_LOG=debug logs no more than =error")
        self.assertGreater(lines("-vv"), default, "-vv logs no more than the default")
        # RUST_LOG is honoured when AGENT_EXEC_LOG is unset ...
        self.assertEqual(lines(RUST_LOG="debug"), loud)
        # ... and AGENT_EXEC_LOG wins when both are set
        self.assertEqual(lines(AGENT_EXEC_LOG="error", RUST_LOG="debug"), quiet)

    def test_bogus_log_level_keeps_stdout_single_object(self):
        r = self.cli("list", "--all", env=self.env(AGENT_EXEC_LOG="loud"))
        self.assert_contract(r)


class RootTests(JobsTestCase):
    def run_true(self, *pre, **kw):
        j = self.ok(*(pre + ("run", "--wait", "--", "true")), **kw)
        self.assertEqual(j["state"], "exited", j)
        return j["job_id"]

    def listed_root(self, *pre, **kw):
        j = self.ok(*(pre + ("list", "--all")), **kw)
        return os.path.realpath(j["root"])

    def test_root_flag_before_and_after_subcommand(self):
        r1 = os.path.join(self.tmp, "r1")
        r2 = os.path.join(self.tmp, "r2")
        j1 = self.run_true("--root", r1)
        j2 = self.ok("run", "--root", r2, "--wait", "--", "true")["job_id"]
        self.assertTrue(os.path.isdir(os.path.join(r1, j1)))
        self.assertTrue(os.path.isdir(os.path.join(r2, j2)))
        self.assertEqual(job_ids_in(r1), [j1])
        self.assertEqual(job_ids_in(r2), [j2])
        self.assertEqual(job_ids_in(self.root), [])
        # status/list/tail/wait/kill with --root on either side
        self.assertEqual(self.ok("--root", r1, "status", j1)["job_id"], j1)
        self.assertEqual(self.ok("status", "--root", r1, j1)["job_id"], j1)
        self.assertEqual(self.ok("status", j2, "--root", r2)["job_id"], j2)
        self.assertEqual(self.ok("tail", "--root", r2, j2)["job_id"], j2)
        self.assertEqual(self.ok("wait", "--root", r2, "--timeout-ms", "5000", j2)["job_id"], j2)
        self.assertEqual(self.ok("kill", "--root", r2, j2)["job_id"], j2)
        self.assertEqual(self.listed_root("--root", r2), os.path.realpath(r2))
        j = self.ok("list", "--root", r1, "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [j1])
        # the other root does not know the job
        self.fail_with("job_not_found", "--root", r2, "status", j1)
        self.fail_with("job_not_found", "status", j1)

    def _env_without(self, *names, **extra):
        env = self.env(**extra)
        for n in names:
            env.pop(n, None)
        return env

    def test_root_precedence(self):
        flag_root = os.path.join(self.tmp, "flag-root")
        env_root = os.path.join(self.tmp, "env-root")
        xdg = os.path.join(self.tmp, "xdg")
        home = os.path.join(self.tmp, "home")
        os.mkdir(xdg, 0o700)
        os.mkdir(home, 0o700)
        xdg_root = os.path.join(xdg, "agent-exec", "jobs")
        home_root = os.path.join(home, ".local", "share", "agent-exec", "jobs")

        full = self.env(AGENT_EXEC_ROOT=env_root, XDG_DATA_HOME=xdg, HOME=home)
        no_env_root = self._env_without("AGENT_EXEC_ROOT", XDG_DATA_HOME=xdg, HOME=home)
        home_only = self._env_without("AGENT_EXEC_ROOT", "XDG_DATA_HOME", HOME=home)
        empty_vars = self.env(AGENT_EXEC_ROOT="", XDG_DATA_HOME="", HOME=home)

        cases = [
            ("--root beats everything", ("--root", flag_root), full, flag_root),
            ("$AGENT_EXEC_ROOT beats XDG", (), full, env_root),
            ("$XDG_DATA_HOME beats HOME", (), no_env_root, xdg_root),
            ("HOME fallback", (), home_only, home_root),
            ("empty variables count as unset", (), empty_vars, home_root),
        ]
        for label, pre, env, expected in cases:
            with self.subTest(label):
                jid = self.run_true(*pre, env=env)
                self.assertTrue(os.path.isdir(os.path.join(expected, jid)), (label, expected))
                self.assertIn(jid, job_ids_in(expected), label)
                self.assertEqual(self.listed_root(*pre, env=env), os.path.realpath(expected))
                self.assertEqual(stat.S_IMODE(os.stat(expected).st_mode), 0o700, label)
                self.assertEqual(self.ok(*(pre + ("status", jid)), env=env)["job_id"], jid)
        # each job landed in exactly one root
        self.assertEqual(len(job_ids_in(flag_root)), 1)
        self.assertEqual(len(job_ids_in(env_root)), 1)
        self.assertEqual(len(job_ids_in(xdg_root)), 1)
        self.assertEqual(len(job_ids_in(home_root)), 2)

    def test_root_flag_beats_env_for_every_command(self):
        flag_root = os.path.join(self.tmp, "flag-root")
        jid = self.run_true("--root", flag_root)
        # self.root (from $AGENT_EXEC_ROOT) does not have the job, --root does
        for args in (("status", jid), ("tail", jid), ("wait", "--timeout-ms", "2000", jid)):
            with self.subTest(args=args):
                self.fail_with("job_not_found", *args)
                self.ok("--root", flag_root, *args)

    def test_root_created_with_mode_0700(self):
        root = os.path.join(self.tmp, "a", "b", "root")
        old = os.umask(0o022)
        try:
            jid = self.run_true("--root", root)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o700)
        jdir = os.path.join(root, jid)
        self.assertEqual(stat.S_IMODE(os.stat(jdir).st_mode), 0o700)
        names = os.listdir(jdir)
        for name in ("meta.json", "state.json", "stdout.log", "stderr.log"):
            self.assertIn(name, names)
        for name in names:
            path = os.path.join(jdir, name)
            if os.path.isfile(path):
                with self.subTest(file=name):
                    self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_world_writable_root_is_refused(self):
        root = os.path.join(self.tmp, "open-root")
        os.mkdir(root)
        os.chmod(root, 0o777)
        r = self.cli("--root", root, "run", "--", "true")
        j = self.assert_contract(r, 1)
        self.assertEqual(j["error"]["code"], "insecure_root", r)
        self.assertEqual(os.listdir(root), [])

    def test_env_root_created_with_mode_0700(self):
        jid = self.run_true()
        self.assertTrue(os.path.isdir(os.path.join(self.root, jid)))
        self.assertEqual(stat.S_IMODE(os.stat(self.root).st_mode), 0o700)


class DurationAndSizeTests(JobsTestCase):
    """Option values through the real CLI: one or two per kind, to prove the
    wiring (the JSON envelope, the code, the exit code).  The full lists of
    good and bad values are parsed in-process in tests/test_units.py
    (DurationTests, SizeTests, OptionValueWiringTests)."""

    GOOD_DURATIONS = ("0", "250ms")
    BAD_DURATIONS = ("-5s",)

    def test_wait_timeout_ms_accepts_units(self):
        jid = self.finished_job()
        for v in self.GOOD_DURATIONS:
            with self.subTest(value=v):
                j = self.ok("wait", "--timeout-ms", v, jid, timeout=30)
                self.assertEqual(j["job_id"], jid)
                self.assertEqual(j["state"], "exited")
                self.assertIs(j["timed_out"], False)

    def test_wait_timeout_ms_rejects_bad_values(self):
        jid = self.finished_job()
        for v in self.BAD_DURATIONS:
            with self.subTest(value=v):
                self.usage_error("wait", "--timeout-ms", v, jid)
        for v in ("abc",):
            with self.subTest(value=v, form="--opt=value"):
                self.usage_error("wait", "--timeout-ms=" + v, jid)
        self.usage_error("wait", "--poll-ms", "abc", jid)

    def test_run_snapshot_after_accepts_units(self):
        for v in self.GOOD_DURATIONS:
            with self.subTest(value=v):
                t0 = time.monotonic()
                j = self.ok("run", "--snapshot-after", v, "--", "true", timeout=30)
                elapsed = time.monotonic() - t0
                # it answers early once the job ends (and 1h is clamped anyway)
                self.assertLess(elapsed, 12.0, (v, j))
                self.assertTrue(ULID_RE.match(j["job_id"]), j)
                if v == "0":
                    self.assertNotIn("snapshot", j)
                else:
                    self.assertIn("snapshot", j)

    def test_run_duration_options_reject_bad_values(self):
        for v in self.BAD_DURATIONS:
            with self.subTest(option="--snapshot-after", value=v):
                self.usage_error("run", "--snapshot-after", v, "--", "true")
        for opt in ("--timeout",):
            for v in ("5x",):
                with self.subTest(option=opt, value=v):
                    self.usage_error("run", opt, v, "--", "true")

    HUGE_DURATIONS = ("10000000000000",)

    def _accepted_or_usage_error(self, r):
        """A value the parser accepts must work; else it is a usage error."""
        self.assertIsInstance(r.json, dict, r)
        if r.code == 2:
            self.assertEqual(r.json["error"]["code"], "usage_error", r)
            return None
        self.assertEqual(r.code, 0, r)
        return r.json

    def test_huge_durations_never_crash_run(self):
        # (1e13 ms is past what time.sleep/monotonic arithmetic can hold in
        # nanoseconds; the supervisor must not die of it.)
        for opt in ("--timeout", "--progress-every"):
            for v in self.HUGE_DURATIONS:
                with self.subTest(option=opt, value=v):
                    r = self.cli("run", "--wait", opt, v, "--", "true", timeout=30)
                    j = self._accepted_or_usage_error(r)
                    if j is not None:
                        self.assertEqual(j["state"], "exited", j)
                        self.assertEqual(j.get("exit_code"), 0, j)
                        self.assertNotIn("failure", j)
        # the kill-after delay matters once the timeout has fired
        for v in self.HUGE_DURATIONS:
            with self.subTest(option="--timeout 200 --kill-after", value=v):
                r = self.cli(
                    "run",
                    "--wait",
                    "--timeout",
                    "200",
                    "--kill-after",
                    v,
                    "--",
                    "sleep",
                    "5",
                    timeout=30,
                )
                j = self._accepted_or_usage_error(r)
                if j is not None:
                    self.addCleanup(self.cli, "kill", "--signal", "KILL", j["job_id"])
                    self.assertEqual(j["state"], "killed", j)
                    self.assertEqual(j.get("signal"), "SIGTERM", j)

    def test_huge_durations_never_crash_wait(self):
        jid = self.start("sleep", "1")
        self.addCleanup(self.cli, "kill", "--signal", "KILL", jid)
        for v in self.HUGE_DURATIONS:
            for opt in ("--timeout-ms",):
                with self.subTest(option=opt, value=v):
                    r = self.cli("wait", opt, v, jid, timeout=30)
                    j = self._accepted_or_usage_error(r)
                    if j is not None:
                        self.assertEqual(j["job_id"], jid, j)

    def test_non_ascii_digits_are_malformed(self):
        # Python's int() and \d accept Arabic-Indic digits; a CLI must not.
        jid = self.finished_job()
        for v in ("\u0661\u0662",):
            with self.subTest(value=v):
                self.usage_error("wait", "--timeout-ms", v, jid)
                self.usage_error("tail", "--max-bytes", v, jid)

    def test_duration_units_are_honoured(self):
        t0 = time.monotonic()
        j = self.ok("run", "--snapshot-after", "1s", "--", "sleep", "30")
        elapsed = time.monotonic() - t0
        jid = j["job_id"]
        self.addCleanup(self.cli, "kill", "--signal", "KILL", jid)
        self.assertEqual(j["state"], "running", j)
        self.assertGreaterEqual(j["waited_ms"], 900, j)
        self.assertLess(j["waited_ms"], 8000, j)
        self.assertGreaterEqual(elapsed, 0.9)

        for value, low, high in (("500", 0.45, 8.0), ("300ms", 0.25, 8.0), ("1s", 0.9, 9.0)):
            with self.subTest(value=value):
                t0 = time.monotonic()
                w = self.ok("wait", "--timeout-ms", value, jid, timeout=30)
                elapsed = time.monotonic() - t0
                self.assertIs(w["timed_out"], True, w)
                self.assertEqual(w["state"], "running", w)
                self.assertGreaterEqual(elapsed, low, w)
                self.assertLess(elapsed, high, w)
        self.ok("kill", "--signal", "KILL", jid)
        w = self.wait_job(jid)
        self.assertEqual(w["state"], "killed", w)

    def _bulky_job(self):
        # 60 lines of 99 zeros + newline = 6000 bytes on stdout
        script = 'i=0; while [ $i -lt 60 ]; do printf "%099d\\n" 0; i=$((i+1)); done'
        jid = self.start("/bin/sh", "-c", script)
        self.wait_job(jid)
        self.assertEqual(os.path.getsize(os.path.join(self.job_dir(jid), "stdout.log")), 6000)
        return jid

    def test_size_options_accept_suffixes(self):
        jid = self._bulky_job()
        for v in ("100", "1MiB"):
            with self.subTest(value=v):
                j = self.ok("tail", "--tail-lines", "1000", "--max-bytes", v, jid)
                self.assertEqual(j["job_id"], jid)
                self.assertEqual(j["stdout_observed_bytes"], 6000, j)
        for v in ("64k",):
            with self.subTest(run_value=v):
                j = self.ok("run", "--max-bytes", v, "--snapshot-after", "200", "--", "echo", "x")
                self.assertIn("snapshot", j)

    def test_size_suffixes_are_binary(self):
        jid = self._bulky_job()
        j = self.ok("tail", "--tail-lines", "1000", "--max-bytes", "64k", jid)
        self.assertEqual(j["stdout_included_bytes"], 6000, j)
        self.assertIs(j["truncated"], False, j)
        for v, low, high in (("1k", 900, 1024), ("2k", 1900, 2048)):
            with self.subTest(value=v):
                j = self.ok("tail", "--tail-lines", "1000", "--max-bytes", v, jid)
                self.assertGreaterEqual(j["stdout_included_bytes"], low, j)
                self.assertLessEqual(j["stdout_included_bytes"], high, j)
                self.assertIs(j["truncated"], True, j)
                self.assertLessEqual(len(j["stdout_tail"].encode("utf-8")), high, j)

    def test_size_options_reject_bad_values(self):
        jid = self.finished_job()
        for v in ("1.2.3k",):
            with self.subTest(value=v):
                self.usage_error("tail", "--max-bytes", v, jid)
        for v in ("-1",):
            with self.subTest(run_value=v):
                self.usage_error("run", "--max-bytes", v, "--", "true")


class JobIdTests(JobsTestCase):
    """Job ids through the real CLI: a few per command, to prove the wiring.
    Every prefix length and hostile id is resolved in-process in
    tests/test_units.py (ResolveJobTests)."""

    def test_full_id_and_unique_prefixes(self):
        jid = self.finished_job()
        self.assertTrue(ULID_RE.match(jid), jid)
        for n in (26, 4):
            with self.subTest(prefix_len=n):
                self.assertEqual(self.ok("status", jid[:n])["job_id"], jid)
        self.assertEqual(self.ok("tail", jid[:6])["job_id"], jid)
        self.assertEqual(self.ok("wait", "--timeout-ms", "5000", jid[:6])["job_id"], jid)
        self.assertEqual(self.ok("kill", jid[:6])["job_id"], jid)

    def test_prefix_shorter_than_four_is_not_found(self):
        jid = self.finished_job()
        for n in (3,):
            with self.subTest(prefix_len=n):
                self.fail_with("job_not_found", "status", jid[:n])
        for cmd in ("tail", "kill"):
            with self.subTest(prefix_len=3, cmd=cmd):
                self.fail_with("job_not_found", cmd, jid[:3])

    def _assert_ambiguous(self, prefix):
        for args in (
            ("status", prefix),
            ("tail", prefix),
            ("wait", "--timeout-ms", "2000", prefix),
            ("kill", prefix),
        ):
            with self.subTest(args=args):
                j = self.fail_with("ambiguous_job_id", *args)
                self.assertIsInstance(j["error"]["message"], str)

    def test_ambiguous_prefix_of_real_jobs(self):
        a = self.finished_job()
        b = self.finished_job()
        self.assertNotEqual(a, b)
        common = os.path.commonprefix([a, b])
        if len(common) < 4:
            self.skipTest("jobs made far apart in time share no 4-char prefix")
        self._assert_ambiguous(common)
        self.fail_with("ambiguous_job_id", "status", common[:4])
        # a prefix one character longer is unique again
        self.assertEqual(self.ok("status", a[: len(common) + 1])["job_id"], a)
        self.assertEqual(self.ok("status", b[: len(common) + 1])["job_id"], b)

    def test_ambiguous_prefix_of_crafted_job(self):
        a = self.finished_job()
        fake = a[:24] + other_char(a[24]) + other_char(a[25])
        clone_job(self.job_dir(a), self.job_dir(fake), a, fake)
        self._assert_ambiguous(a[:24])
        self.fail_with("ambiguous_job_id", "status", a[:8])
        self.assertEqual(self.ok("status", a[:25])["job_id"], a)
        self.assertEqual(self.ok("status", fake[:25])["job_id"], fake)
        self.assertEqual(self.ok("status", fake)["job_id"], fake)

    def test_bad_ids_are_job_not_found(self):
        jid = self.finished_job()
        # a job directory outside the root, reachable by a relative path
        outside = os.path.join(self.tmp, "outside")
        os.mkdir(outside, 0o700)
        out_id = jid[:20] + "".join(other_char(c) for c in jid[20:])
        clone_job(self.job_dir(jid), os.path.join(outside, out_id), jid, out_id)
        # ids named by the contract, one for every command that takes an id
        for args in (
            ("status", "../../etc"),
            ("tail", "/etc"),
            ("wait", "--timeout-ms", "2000", "A" * 4096),
            ("kill", ""),
        ):
            with self.subTest(cmd=args[0], id=args[-1][:60]):
                r = self.cli(*args)
                self.assert_contract(r, 1)
                self.assertEqual(r.json["error"]["code"], "job_not_found", r)
        # a path to a job outside the root, and the job's own path
        bad_ids = ["../outside/" + out_id, self.job_dir(jid)]
        for bad in bad_ids:
            for args in (("status", bad),):
                with self.subTest(cmd=args[0], id=bad[:60]):
                    r = self.cli(*args)
                    self.assert_contract(r, 1)
                    self.assertEqual(r.json["error"]["code"], "job_not_found", r)

    def _symlinked_job(self):
        """A job-id-named entry of the root that is a symlink to a job
        directory outside the root."""
        jid = self.finished_job("echo", "outside")
        outside = os.path.join(self.tmp, "outside")
        os.mkdir(outside, 0o700)
        link_id = jid[:20] + "".join(other_char(c) for c in jid[20:])
        target = os.path.join(outside, link_id)
        clone_job(self.job_dir(jid), target, jid, link_id)
        os.symlink(target, os.path.join(self.root, link_id))
        return jid, link_id

    def test_symlink_in_root_does_not_resolve_outside(self):
        jid, link_id = self._symlinked_job()
        for args in (
            ("status", link_id),
            ("tail", link_id),
            ("wait", "--timeout-ms", "2000", link_id),
            ("kill", link_id),
        ):
            with self.subTest(args=args):
                self.fail_with("job_not_found", *args)
        # and a prefix shared with it still finds the real job only
        self.assertEqual(self.ok("status", jid[:20])["job_id"], jid)

    def test_list_does_not_show_a_symlinked_job(self):
        # list must agree with status: a job no command can address is not listed
        jid, link_id = self._symlinked_job()
        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [jid], j)

    def test_kill_with_path_like_id_sends_nothing(self):
        # A running job reachable only through a path-like id must not be hit.
        jid = self.start("sleep", "30")
        self.addCleanup(self.cli, "kill", "--signal", "KILL", jid)
        for bad in ("./" + jid, self.job_dir(jid)):
            with self.subTest(id=bad):
                self.fail_with("job_not_found", "kill", "--signal", "KILL", bad)
        self.assertEqual(self.ok("status", jid)["state"], "running")
        self.ok("kill", "--signal", "KILL", jid)
        self.assertEqual(self.wait_job(jid)["state"], "killed")

    def test_non_job_entries_of_root_are_ignored(self):
        jid = self.finished_job()
        junk_dirs = [
            jid + "X",  # too long
            jid[:25],  # too short: a prefix of the real job
            jid[:25] + "U",  # U is not Crockford base32
            jid[:6] + "-junk",
            ".hidden",
            "tmp",
        ]
        for name in junk_dirs:
            # job-like contents, so only the name tells them apart
            shutil.copytree(self.job_dir(jid), os.path.join(self.root, name), ignore=only_regular)
        for name in ("README", "notes.txt", jid[:10] + ".lock"):
            with open(os.path.join(self.root, name), "w") as f:
                f.write("not a job\n")
        os.symlink("/etc", os.path.join(self.root, "etc-link"))

        j = self.ok("list", "--all")
        self.assertEqual([e["job_id"] for e in j["jobs"]], [jid])
        self.assertEqual(j["skipped"], 0, j)
        for prefix in (jid[:4], jid[:25]):
            with self.subTest(prefix=prefix):
                self.assertEqual(self.ok("status", prefix)["job_id"], jid)
        for name in (junk_dirs[2], ".hidden", "README"):
            with self.subTest(name=name):
                self.fail_with("job_not_found", "status", name)


class RootAndCwdTests(JobsTestCase):
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


class StrictJsonTests(JobsTestCase):
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
        self.assertEqual(f({"k\udc80": "\ud800"}), '{"k\\ufffd": "\\ufffd"}')
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

    def call(self, *args):
        """The CLI as a process: (exit code, stdout)."""
        r = subprocess.run(
            CLI + list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
        )
        return r.returncode, r.stdout

    def help_text(self, *args):
        return self.call(*args)[1]

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
        # global options (and their values) before or after the word help
        self.assertEqual(self.help_text("help", "--root", "/tmp/x", "run"), text)
        self.assertEqual(self.help_text("--root", "help", "help", "run"), text)

    def test_no_abbreviations_and_suggestions(self):
        code, out = self.call("run", "--snap", "0", "--", "true")
        j = json.loads(out)
        self.assertEqual((code, j["error"]["code"]), (2, "usage_error"))
        self.assertIn("did you mean --snapshot-after?", j["error"]["message"])
        code, out = self.call("run", "--tiemout", "5s", "--", "true")
        self.assertIn("did you mean --timeout?", json.loads(out)["error"]["message"])


class OptionValueWiringTests(unittest.TestCase):
    """Every option of a value kind refuses every bad value of its kind, in-process.

    The subprocess tests (here, test_read, test_kill) send one or two bad values
    per kind through the real CLI; this runs ``main()`` itself for the full
    lists of test_units, so each option is still shown to use its kind's parser.
    """

    JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    DURATIONS = _units.DurationTests.BAD
    SIZES = _units.SizeTests.BAD
    OPTIONS = (
        # (command, option, bad values, what follows the option)
        ("run", "--snapshot-after", DURATIONS, ["--", "true"]),
        ("run", "--timeout", DURATIONS, ["--", "true"]),
        ("run", "--kill-after", DURATIONS, ["--", "true"]),
        ("run", "--progress-every", DURATIONS, ["--", "true"]),
        ("run", "--wait-poll-ms", DURATIONS, ["--", "true"]),
        ("wait", "--timeout-ms", DURATIONS, [JOB]),
        ("wait", "--poll-ms", DURATIONS, [JOB]),
        ("read", "--wait-ms", DURATIONS, [JOB]),
        ("tail", "--max-bytes", SIZES, [JOB]),
        ("run", "--max-bytes", SIZES, ["--", "true"]),
        ("read", "--max-bytes", SIZES, [JOB]),
        ("kill", "--signal", ("BOGUS", "SIGNOPE", "-3", "", "TERMINATE", "0"), [JOB]),
        ("read", "--cursor", ("garbage", "c1.0", "c1.zz.0", "c2.0.0", "c1.-1.0"), [JOB]),
        ("list", "--state", ("bogus", "done", "finished", ""), ["--all"]),
        ("list", "--limit", ("abc", "-1", "1.5", ""), []),
    )

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.root = os.path.join(tmp.name, "root")

    def call(self, argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = agent_exec.main(argv)
        return rc, out.getvalue(), err.getvalue()

    def test_bad_values_are_usage_errors(self):
        for cmd, opt, values, rest in self.OPTIONS:
            for value in values:
                for form in ("separate", "joined"):
                    opt_args = [opt, value] if form == "separate" else [opt + "=" + value]
                    argv = ["--root", self.root, cmd] + opt_args + rest
                    with self.subTest(cmd=cmd, option=opt, value=value[:40], form=form):
                        rc, out, err = self.call(argv)
                        self.assertEqual(rc, 2, out)
                        j = json.loads(out)
                        self.assertIs(j["ok"], False, j)
                        self.assertEqual(j["error"]["code"], "usage_error", j)
                        self.assertIn(opt, j["error"]["message"], j)
                        self.assertIn("usage", err.lower())
                        self.assertNotIn("Traceback", out + err)
                        self.assertFalse(os.path.exists(self.root), "a usage error made the root")


if __name__ == "__main__":
    unittest.main()
