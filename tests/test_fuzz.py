"""Property-based fuzzing of the command line, with Hypothesis.

Random argv for every subcommand goes through ``agent_exec.main()`` in this
process, stdout and stderr redirected.  Whatever the input: exactly one JSON
object on stdout, exit code 0, 1 or 2, never a traceback on stdout, never an
``internal_error``.

Hypothesis is a development dependency only: without it the test is skipped.
``run`` is fuzzed only in its options: the command is always ``true`` after
``--``, and paths the options name stay inside the test's temp directory.
"""

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is dev-only
    HAVE_HYPOTHESIS = False
else:
    HAVE_HYPOTHESIS = True

# The fixture lives at module level because @given wraps the test method.
_FIX = {}


def _help_like(token):
    """argv tokens that would print help or the version (plain text by design)."""
    if token.startswith("--"):
        name = token.split("=", 1)[0]
        return len(name) > 2 and ("--help".startswith(name) or "--version".startswith(name))
    return token.startswith("-") and "h" in token


def _call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = agent_exec.main(argv)
    return code, out.getvalue(), err.getvalue()


if HAVE_HYPOTHESIS:
    _printable = st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), min_codepoint=1), max_size=40
    )
    _weird = st.sampled_from(
        [
            "",
            "-",
            "--",
            "0",
            "-1",
            "1e3",
            "5s",
            "250ms",
            "2m",
            "1h",
            "99999999999999999999999",
            "64k",
            "1MiB",
            "2G",
            "nan",
            "inf",
            " 7 ",
            "\u0661",
            "TERM",
            "SIGKILL",
            "9",
            "0",
            "65",
            "running",
            "exited",
            "unknown",
            "\x00",
            "a\x00b",
            "../../etc",
            "/etc",
            "..",
            "A" * 4096,
            "01ARZ3NDEKTSV4RRFFQ69G5FAV",
            "X=1",
            "=1",
            "1X=2",
            "KEY",
            "[]",
            '["true"]',
            "[1]",
            "{}",
            '"x"',
        ]
    )
    _value = st.one_of(_weird, _printable)
    _token = _value.filter(lambda t: not _help_like(t))

    def _path():
        tmp = _FIX["tmp"]
        return st.sampled_from(
            [
                os.path.join(tmp, "p", "notify.ndjson"),
                os.path.join(tmp, "p", "full.log"),
                os.path.join(tmp, "missing", "x"),
                os.path.join(tmp, "afile"),
                os.path.join(tmp, "adir"),
                os.path.join(tmp, "env.txt"),
                os.path.join(tmp, "open-root"),
                tmp,
                "/dev/null",
                "/dev/full",
                "",
                "relative/path",
                "\x00",
            ]
        )

    # run's options: name -> "flag" or a strategy factory for its value.
    def _run_options():
        return {
            "--snapshot-after": _value,
            "--timeout": _value,
            "--kill-after": _value,
            "--tail-lines": _value,
            "--max-bytes": _value,
            "--cwd": _path(),
            "--env": _value,
            "--env-file": _path(),
            "--no-inherit-env": None,
            "--inherit-env": None,
            "--mask": _value,
            "--log": _path(),
            "--progress-every": _value,
            "--wait": None,
            "--wait-poll-ms": _value,
            "--notify-command": st.sampled_from(
                ['["true"]', '["false"]', '["/nonexistent-hook"]', "[]", "[1]", "x", ""]
            ),
            "--notify-file": _path(),
            "--notify-timeout": _value,
            "--max-output": _value,
            "--root": _path(),
            "-v": None,
            "--verbose": None,
        }

    _OTHER = {
        "status": {"--root": "path", "-v": None},
        "tail": {"--tail-lines": "v", "--max-bytes": "v", "--root": "path"},
        "wait": {"--timeout-ms": "short", "--poll-ms": "v", "--root": "path"},
        "kill": {"--signal": "v", "--root": "path"},
        "list": {"--state": "v", "--limit": "v", "--cwd": "path", "--all": None, "--root": "path"},
        "schema": {"--root": "path", "-v": None},
    }

    @st.composite
    def _opts(draw, table, n_max=4):
        argv = []
        names = sorted(table)
        for _ in range(draw(st.integers(0, n_max))):
            name = draw(st.sampled_from(names))
            value = table[name]
            argv.append(name)
            if value is None:
                continue
            if value == "path":
                argv.append(draw(_path()))
            elif value == "short":  # never wait long on a job that still runs
                argv.append(draw(st.sampled_from(["0", "1", "10ms", "-5", "x", "1s", ""])))
            elif value == "v":
                argv.append(draw(_token))
            else:
                argv.append(draw(value))
        return argv

    @st.composite
    def _argv(draw):
        head = []
        if draw(st.booleans()):
            head += ["--root", draw(_path())]
        if draw(st.booleans()):
            head.append(draw(st.sampled_from(["-v", "-vv", "--verbose"])))
        cmd = draw(st.sampled_from(["run", "status", "tail", "wait", "kill", "list", "schema"]))
        if cmd == "run":
            # Only options before "--", and the command is always `true`.
            opts = draw(_opts(_run_options(), 5))
            opts = [t for t in opts if not _help_like(t)]
            return head + ["run", "--snapshot-after", "0"] + opts + ["--", "true"]
        argv = head + [cmd] + draw(_opts(_OTHER[cmd]))
        if cmd not in ("list", "schema"):
            ids = _FIX["ids"]
            choice = st.one_of(
                st.sampled_from(ids + [i[:4] for i in ids] + [i[:12].lower() for i in ids]),
                _token,
            )
            if draw(st.integers(0, 9)) > 0:
                argv.append(draw(choice))
        # Junk tokens anywhere but the subcommand slot: unknown flags, extra args.
        for _ in range(draw(st.integers(0, 2))):
            tok = draw(_token)
            pos = draw(st.integers(len(head) + 1, len(argv)))
            argv.insert(pos, tok)
        return argv


@unittest.skipUnless(HAVE_HYPOTHESIS, "hypothesis is not installed (dev-only)")
@unittest.skipUnless(sys.platform.startswith("linux") or sys.platform == "darwin", "POSIX only")
class CLIFuzzTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        tmp = tempfile.mkdtemp(prefix="agent-exec-fuzz-")
        os.chmod(tmp, 0o700)
        cls.tmp = tmp
        cls.root = os.path.join(tmp, "root")
        os.makedirs(os.path.join(tmp, "adir"))
        with open(os.path.join(tmp, "afile"), "w") as f:
            f.write("x\n")
        with open(os.path.join(tmp, "env.txt"), "w") as f:
            f.write("# env\nexport A=1\nB='two'\n")
        os.mkdir(os.path.join(tmp, "open-root"))
        os.chmod(os.path.join(tmp, "open-root"), 0o777)
        cls._saved_env = {k: os.environ.get(k) for k in ("AGENT_EXEC_ROOT", "AGENT_EXEC_LOG")}
        os.environ["AGENT_EXEC_ROOT"] = cls.root
        os.environ.pop("AGENT_EXEC_LOG", None)
        cls._cwd = os.getcwd()
        os.chdir(tmp)
        ids = []
        for cmd in (["true"], ["sh", "-c", "echo out; echo err >&2; exit 3"]):
            code, out, _ = _call(["run", "--wait", "--"] + cmd)
            assert code == 0, out
            ids.append(json.loads(out)["job_id"])
        _FIX.update(tmp=tmp, ids=ids)

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)
        for k, v in cls._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # Every job ran `true` (or the fixture's short jobs): wait for them all,
        # in whichever root the fuzzer put them.
        for dirpath, dirs, _files in os.walk(cls.tmp):
            for name in dirs:
                if agent_exec.is_job_id(name):
                    _call(["--root", dirpath, "wait", "--timeout-ms", "5000", name])
        shutil.rmtree(cls.tmp, True)

    def check_one_object(self, argv):
        code, out, err = _call(argv)
        note = "argv=%r code=%r stdout=%r stderr=%r" % (argv, code, out[-500:], err[-500:])
        self.assertIn(code, (0, 1, 2), note)
        self.assertNotIn("Traceback", out, note)
        self.assertTrue(out.endswith("\n"), note)
        self.assertEqual(out.count("\n"), 1, note)
        obj = json.loads(out)
        self.assertIsInstance(obj, dict, note)
        self.assertEqual(obj.get("schema_version"), "0.1", note)
        self.assertIs(obj.get("ok"), code == 0, note)
        if code == 0:
            self.assertIn(obj["type"], argv, note)
        else:
            self.assertEqual(obj["type"], "error", note)
            self.assertIsInstance(obj["error"].get("code"), str, note)
            if code == 2:
                self.assertEqual(obj["error"]["code"], "usage_error", note)
        return obj, note

    if HAVE_HYPOTHESIS:
        _settings = settings(
            max_examples=200,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )

        @_settings
        @given(_argv())
        def test_random_argv_gives_one_json_object(self, argv):
            # The property: one JSON object, exit 0/1/2, no traceback.
            self.check_one_object(argv)

        @_settings
        @given(_argv())
        def test_random_argv_never_internal_error(self, argv):
            # Stricter: internal_error means an exception nobody expected.
            obj, note = self.check_one_object(argv)
            if not obj["ok"]:
                self.assertNotEqual(obj["error"]["code"], "internal_error", note)

    else:
        # The same names without Hypothesis, so the run's summary counts them
        # as skipped, with the reason, instead of not mentioning them at all.
        def test_random_argv_gives_one_json_object(self):
            pass

        def test_random_argv_never_internal_error(self):
            pass


if __name__ == "__main__":
    unittest.main()
