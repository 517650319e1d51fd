"""Run the suite's modules side by side, for ``python3 -m unittest``.

Most of the suite's wall time is spent waiting (for jobs to start, print,
time out, end), not computing, so the modules run in child processes, a few
at a time, and their outcomes are replayed into the ordinary runner of the
parent: its output, its counts and its exit code are those of a serial run.
Each module runs whole in one child, so setUpModule/setUpClass keep their
meaning.  AGENT_EXEC_TEST_JOBS=1 runs everything serially in one process.
Naming a module (``python3 -m unittest tests.test_units``) runs it as usual.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A module that takes longer than this has hung: its child is killed.
MODULE_TIMEOUT = 900


def workers() -> int:
    try:
        return max(1, int(os.environ.get("AGENT_EXEC_TEST_JOBS", "")))
    except ValueError:
        return 3  # the suite waits far more than it computes: 3 on 2 cores


class _ChildFailure(Exception):
    """A failure or error reported by a child; its message is the child's traceback."""


class _Replayed(unittest.TestCase):
    """Stands in the parent for a test that ran in a child."""

    def __init__(self, entry: dict) -> None:
        super().__init__("run")
        self._entry = entry

    def run(self, result=None):  # never run here: only replayed
        raise RuntimeError("a replayed test is not run")

    def id(self):
        return self._entry["id"]

    def __str__(self):
        return self._entry["str"]

    def shortDescription(self):
        return self._entry.get("doc")


def _say_skips(result) -> None:
    """List what was skipped and why just before the summary, one line per
    reason: a missing dev tool must be seen, not only counted."""
    reasons = {}
    for test, reason in getattr(result, "skipped", ()):
        reasons.setdefault(reason, []).append(str(test))
    if reasons:
        sys.stderr.write("\n")
    for reason, tests in sorted(reasons.items()):
        sys.stderr.write("skipped %d: %s (%s)\n" % (len(tests), reason, ", ".join(tests[:3])))


class ParallelSuite(unittest.TestSuite):
    """The tests of several modules, run one child process per module."""

    def __init__(self, modules: list) -> None:
        super().__init__()
        self.modules = modules  # [(module name, number of tests)]

    def countTestCases(self):
        return sum(n for _, n in self.modules)

    def run(self, result, debug=False):
        pending = sorted(self.modules, key=lambda m: -m[1])  # the biggest first
        running = []
        tmp = tempfile.mkdtemp(prefix="agent-exec-tests-")
        try:
            while pending or running:
                while pending and len(running) < workers():
                    running.append(self._start(pending.pop(0)[0], tmp))
                time.sleep(0.05)
                for child in list(running):
                    if child["proc"].poll() is not None or self._overdue(child):
                        running.remove(child)
                        self._replay(child, result)
                if result.shouldStop:
                    for child in running:
                        child["proc"].kill()
                        child["proc"].wait()
                    break
        finally:
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
        _say_skips(result)
        return result

    @staticmethod
    def _start(module: str, tmp: str) -> dict:
        out = os.path.join(tmp, module + ".jsonl")
        argv = [sys.executable, "-m", "tests._parallel", module, out]
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL)
        return {"module": module, "out": out, "proc": proc, "started": time.monotonic()}

    @staticmethod
    def _overdue(child: dict) -> bool:
        if time.monotonic() - child["started"] < MODULE_TIMEOUT:
            return False
        child["proc"].kill()
        child["proc"].wait()
        child["timed_out"] = True
        return True

    @staticmethod
    def _replay(child: dict, result) -> None:
        entries = []
        try:
            with open(child["out"]) as f:
                entries = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError):
            pass
        done = bool(entries) and entries[-1].get("outcome") == "finished"
        for entry in entries:
            if entry["outcome"] == "finished":
                continue
            test = _Replayed(entry)
            result.startTest(test)
            for problem in entry.get("problems", ()):
                err = (_ChildFailure, _ChildFailure(problem["text"]), None)
                if problem["kind"] == "failure":
                    result.addFailure(test, err)
                else:
                    result.addError(test, err)
            outcome = entry["outcome"]
            if outcome == "skip":
                result.addSkip(test, entry.get("reason", ""))
            elif outcome == "expected_failure":
                result.addExpectedFailure(test, (_ChildFailure, _ChildFailure("expected"), None))
            elif outcome == "unexpected_success":
                result.addUnexpectedSuccess(test)
            elif outcome == "success":
                result.addSuccess(test)
            result.stopTest(test)
        if not done:  # the child died (or hung) before it finished the module
            why = (
                "timed out after %d s" % MODULE_TIMEOUT
                if child.get("timed_out")
                else ("exited with %s" % child["proc"].returncode)
            )
            entry = {"id": child["module"], "str": child["module"] + " (module)"}
            test = _Replayed(entry)
            result.startTest(test)
            msg = "the child running %s %s before the module finished" % (child["module"], why)
            result.addError(test, (_ChildFailure, _ChildFailure(msg), None))
            result.stopTest(test)


def parallel_suite(loader, suite):
    """The package's tests as a ParallelSuite (or ``suite`` itself when serial)."""
    if workers() <= 1:
        return suite
    counts = {}
    for test in _leaves(suite):
        module = type(test).__module__
        if module.startswith("unittest."):  # a module that failed to import
            return suite
        counts[module] = counts.get(module, 0) + 1
    return ParallelSuite(sorted(counts.items()))


def _leaves(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _leaves(item)
        else:
            yield item


# ---- the child ----------------------------------------------------------------


class _RecordingResult(unittest.TestResult):
    """Writes one JSON line per test (with its problems) to ``out``."""

    def __init__(self, out) -> None:
        super().__init__()
        self.out = out
        self.current = None

    def _text(self, err, test) -> str:
        try:
            return self._exc_info_to_string(err, test)
        except Exception:
            return "".join(traceback.format_exception(*err))

    def startTest(self, test):
        super().startTest(test)
        self.current = {"id": test.id(), "str": str(test), "doc": test.shortDescription()}
        self.current["problems"] = []
        self.current["outcome"] = "problem"

    def stopTest(self, test):
        super().stopTest(test)
        if self.current is not None:
            self._write(self.current)
            self.current = None

    def _write(self, entry):
        self.out.write(json.dumps(entry) + "\n")
        self.out.flush()

    def _problem(self, kind, test, err):
        problem = {"kind": kind, "text": self._text(err, test)}
        if self.current is not None and self.current["id"] == test.id():
            self.current["problems"].append(problem)
        else:  # setUpClass / setUpModule: no test is current
            entry = {"id": test.id(), "str": str(test), "doc": None, "problems": [problem]}
            entry["outcome"] = "problem"
            self._write(entry)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._problem("failure", test, err)

    def addError(self, test, err):
        super().addError(test, err)
        self._problem("error", test, err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failure" if issubclass(err[0], test.failureException) else "error"
            problem = {"kind": kind, "text": str(subtest) + "\n" + self._text(err, test)}
            if self.current is not None:
                self.current["problems"].append(problem)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.current["outcome"] = "success"

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        if self.current is None:  # a skipped class: record it on its own
            self._write({"id": test.id(), "str": str(test), "outcome": "skip", "reason": reason})
            return
        self.current["outcome"] = "skip"
        self.current["reason"] = reason

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self.current["outcome"] = "expected_failure"

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.current["outcome"] = "unexpected_success"


def _child(module: str, out_path: str) -> int:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    suite = unittest.defaultTestLoader.loadTestsFromName(module)
    with open(out_path, "w") as out:
        result = _RecordingResult(out)
        suite.run(result)
        out.write(json.dumps({"outcome": "finished"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
