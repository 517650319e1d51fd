"""Fast, in-process tests of the supervisor's pure parts: the timers, the
state.json builder, the control protocol's frame splitter and sender, and the
--mask carry-over.  No process is started; the whole file runs in well under
a second.
"""

import os
import random
import shutil
import sys
import tempfile
import types
import unittest
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402

NOW = "2026-03-15T12:00:00.123Z"
# The keys of state.json as the supervisor wrote them before the split.
STATE_KEYS = {
    "schema_version",
    "job",
    "result",
    "pid",
    "pgid",
    "pid_start_time",
    "supervisor_pid",
    "supervisor_start_time",
    "control_protocol",
    "boot_id",
    "stdin_target",
    "finished_at",
    "updated_at",
    "failure",
    "timed_out",
    "log_error",
    "stdout_bytes",
    "stderr_bytes",
    "stdout_dropped_bytes",
    "stderr_dropped_bytes",
    "ready",
    "ready_at",
}
# The keys of the failure path's document (_bare_state) before the split.
BARE_KEYS = {
    "schema_version",
    "job",
    "result",
    "pid",
    "supervisor_pid",
    "finished_at",
    "updated_at",
    "failure",
}


class FakeClock:
    """A time.monotonic stand-in that moves only when told."""

    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class TimersTests(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        patcher = mock.patch.object(agent_exec.time, "monotonic", self.clock)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.timers = agent_exec._Timers()

    def test_nothing_timed_waits_for_io(self):
        self.assertIsNone(self.timers.poll_ms())
        self.assertEqual(self.timers.pop_expired(), [])

    def test_poll_ms_counts_to_the_first_deadline(self):
        self.timers.start("progress", 2.0)
        self.timers.start("timeout", 0.5)
        self.assertEqual(self.timers.poll_ms(), 501)  # +1: never wake a hair early
        self.clock.t += 0.5
        self.assertEqual(self.timers.poll_ms(), 1)

    def test_poll_ms_is_bounded(self):
        self.timers.start("lease", 10.0**9)
        self.assertEqual(self.timers.poll_ms(), 86400 * 1000 + 1)  # a C int of ms
        self.timers.start_at("lease", self.clock.t - 50)
        self.assertEqual(self.timers.poll_ms(), 1)  # overdue: poll without sleeping

    def test_pop_expired_earliest_first_and_once(self):
        self.timers.start("c", 0.3)
        self.timers.start("a", 0.1)
        self.timers.start("b", 0.2)
        self.timers.start("later", 5.0)
        self.assertEqual(self.timers.pop_expired(), [])
        self.clock.t += 0.25
        self.assertEqual(self.timers.pop_expired(), ["a", "b"])
        self.assertEqual(self.timers.pop_expired(), [])  # no longer set
        self.clock.t += 0.05
        self.assertEqual(self.timers.pop_expired(), ["c"])
        self.assertEqual(sorted(self.timers.due), ["later"])

    def test_start_again_moves_the_deadline(self):
        self.timers.start("probe", 0.1)
        self.timers.start("probe", 1.0)
        self.clock.t += 0.5
        self.assertEqual(self.timers.pop_expired(), [])
        self.clock.t += 0.5
        self.assertEqual(self.timers.pop_expired(), ["probe"])

    def test_cancel(self):
        self.timers.start("timeout", 0.1)
        self.timers.start("progress", 0.2)
        self.timers.cancel("timeout")
        self.timers.cancel("never-set")  # no error
        self.clock.t += 1
        self.assertEqual(self.timers.pop_expired(), ["progress"])
        self.assertIsNone(self.timers.poll_ms())

    def test_start_at_uses_the_monotonic_clock(self):
        self.timers.start_at("flush", self.clock.t + 0.25)
        self.assertEqual(self.timers.poll_ms(), 251)


def exited(code):
    return code << 8  # a raw wait status, as wait4 gives it


def facts(**values):
    f = agent_exec._JobFacts()
    f.pid, f.pid_start, f.started_at = 4242, "12345", "2026-03-15T11:59:59.000Z"
    f.supervisor_pid, f.supervisor_start, f.boot_id = 4241, "12340", "boot-1"
    f.started_mono, f.ended_mono = 100.0, 101.5
    for name, value in values.items():
        setattr(f, name, value)
    return f


COUNTS = {
    "stdout_bytes": 10,
    "stderr_bytes": 20,
    "stdout_dropped_bytes": 1,
    "stderr_dropped_bytes": 2,
}


class StateDocumentTests(unittest.TestCase):
    def doc(self, state, f, counts=COUNTS, failure=None):
        return agent_exec._state_document("JOB", state, f, counts, failure, now=NOW)

    def test_running(self):
        d = self.doc("running", facts(ended_mono=0.0))
        self.assertEqual(set(d), STATE_KEYS)
        self.assertEqual(
            d["job"], {"id": "JOB", "status": "running", "started_at": facts().started_at}
        )
        self.assertEqual(
            d["result"],
            {"exit_code": None, "signal": None, "duration_ms": None, "end_reason": None},
        )
        self.assertIsNone(d["finished_at"])
        self.assertEqual(d["updated_at"], NOW)
        self.assertEqual((d["pid"], d["pgid"], d["pid_start_time"]), (4242, 4242, "12345"))
        self.assertEqual((d["supervisor_pid"], d["supervisor_start_time"]), (4241, "12340"))
        self.assertEqual(d["boot_id"], "boot-1")
        for key, value in COUNTS.items():
            self.assertEqual(d[key], value)
        self.assertIsNone(d["failure"])

    def test_exit(self):
        f = facts(wait_status=exited(3))
        d = self.doc(agent_exec._end_state(f), f)
        self.assertEqual(d["job"]["status"], "exited")
        self.assertEqual(
            d["result"], {"exit_code": 3, "signal": None, "duration_ms": 1500, "end_reason": "exit"}
        )
        self.assertEqual(d["finished_at"], NOW)
        self.assertNotIn("rusage", d)

    def test_kill_that_ends_in_an_exit_code(self):
        # The workload caught the TERM that `kill` sent and exited 143 itself.
        f = facts(wait_status=exited(143), kill_signal=15)
        self.assertEqual(agent_exec._end_state(f), "killed")
        d = self.doc("killed", f)
        self.assertEqual(d["result"]["exit_code"], 143)
        self.assertEqual(d["result"]["signal"], "SIGTERM")

    def test_signal_death(self):
        f = facts(wait_status=9, kill_signal=15, timed_out=True)
        self.assertEqual(agent_exec._end_state(f), "killed")
        d = self.doc("killed", f)
        self.assertEqual(
            d["result"],
            {"exit_code": None, "signal": "SIGKILL", "duration_ms": 1500, "end_reason": "timeout"},
        )
        self.assertTrue(d["timed_out"])

    def test_end_reasons(self):
        # (facts, end_reason): by itself, a signal from outside, a `kill` that
        # the job died of or exited after, its own timeout; a USR1 that `kill`
        # sent is no reason when the job exits by itself afterwards.
        cases = (
            (facts(wait_status=exited(0)), "exit"),
            (facts(wait_status=9), "signal"),
            (facts(wait_status=9, sent_signals={9}, kill_signal=9), "kill"),
            (facts(wait_status=10, sent_signals={10}), "kill"),
            (facts(wait_status=exited(143), kill_signal=15, sent_signals={15}), "kill"),
            (facts(wait_status=exited(0), sent_signals={10}), "exit"),
            (facts(wait_status=15, kill_signal=15, timed_out=True), "timeout"),
        )
        for f, reason in cases:
            with self.subTest(reason=reason, status=f.wait_status):
                self.assertEqual(agent_exec._end_reason_of(f), reason)

    def test_rusage(self):
        ru = types.SimpleNamespace(ru_maxrss=2048, ru_utime=0.25, ru_stime=0.125)
        d = self.doc("exited", facts(wait_status=0, rusage=ru))
        kb = 2048 if agent_exec._IS_LINUX else 2
        self.assertEqual(d["rusage"], {"max_rss_kb": kb, "user_ms": 250, "sys_ms": 125})
        self.assertEqual(set(d) - {"rusage"}, STATE_KEYS)

    def test_failed_before_start(self):
        f = facts(pid=None, pid_start=None)
        failure = {"code": "spawn_failed", "message": "cannot start x"}
        d = self.doc("failed", f, counts={}, failure=failure)
        self.assertEqual(
            d["result"],
            {"exit_code": None, "signal": None, "duration_ms": 0, "end_reason": "spawn_failed"},
        )
        self.assertEqual(d["finished_at"], NOW)
        self.assertEqual(d["failure"], failure)
        self.assertEqual(d["stdout_bytes"], 0)

    def test_bare_state_has_every_key(self):
        d = agent_exec._bare_state("JOB", "failed", "supervisor_failed", "did not start")
        self.assertTrue(BARE_KEYS <= set(d))
        self.assertEqual(set(d), STATE_KEYS)
        self.assertEqual(d["job"]["status"], "failed")
        self.assertEqual(d["job"]["started_at"], d["finished_at"])
        self.assertEqual(
            d["result"],
            {"exit_code": None, "signal": None, "duration_ms": 0, "end_reason": "spawn_failed"},
        )
        self.assertIsNone(d["pid"])
        self.assertIsNone(d["supervisor_pid"])
        self.assertIsNone(d["ready"])  # as absent was: no readiness recorded
        self.assertEqual(d["failure"], {"code": "supervisor_failed", "message": "did not start"})
        for key in COUNTS:
            self.assertEqual(d[key], 0)


def split_all(chunks):
    """Feed chunks through the splitter as the supervisor does."""
    carry, messages, rejected = b"", [], []
    for chunk in chunks:
        got, carry, bad = agent_exec._split_control(chunk, carry)
        messages += got
        rejected += bad
    return messages, carry, rejected


class ControlFrameTests(unittest.TestCase):
    KILL15 = {"verb": "kill", "signal": 15}

    def test_several_messages_in_one_read(self):
        data = b'{"verb": "kill", "signal": 15}\n{"verb":"kill","signal":9}\n'
        messages, carry, rejected = agent_exec._split_control(data, b"")
        self.assertEqual(messages, [self.KILL15, {"verb": "kill", "signal": 9}])
        self.assertEqual((carry, rejected), (b"", []))

    def test_partial_frame_across_reads(self):
        line = b'{"verb": "kill", "signal": 15}\n'
        for cut in range(1, len(line)):
            with self.subTest(cut=cut):
                messages, carry, rejected = split_all([line[:cut], line[cut:]])
                self.assertEqual(messages, [self.KILL15])
                self.assertEqual((carry, rejected), (b"", []))

    def test_unfinished_line_is_carried_not_parsed(self):
        messages, carry, rejected = agent_exec._split_control(b'{"verb": "ki', b"")
        self.assertEqual((messages, rejected), ([], []))
        self.assertEqual(carry, b'{"verb": "ki')

    def test_random_chunkings(self):
        rng = random.Random(7)
        stream = b"".join(b'{"verb":"kill","signal":%d}\nkill %d\n' % (n, n) for n in range(1, 40))
        want = [{"verb": "kill", "signal": n} for n in range(1, 40) for _ in (0, 1)]
        for _ in range(100):
            cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
            chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
            self.assertEqual(split_all(chunks), (want, b"", []))

    def test_legacy_kill_line(self):
        for data in (b"kill 15\n", b"kill 15\r\n", b"  kill   15 \n"):
            with self.subTest(data=data):
                self.assertEqual(agent_exec._split_control(data, b""), ([self.KILL15], b"", []))

    def test_garbage_is_rejected_and_the_rest_kept(self):
        data = b'kill\nkill x\nhello\n{"verb": 3}\n[1]\n{bad json\n\xff\xfe\n{"no": "verb"}\n'
        messages, carry, rejected = agent_exec._split_control(data + b"kill 9\n", b"")
        self.assertEqual(messages, [{"verb": "kill", "signal": 9}])
        self.assertEqual(carry, b"")
        self.assertEqual(len(rejected), 8)

    def test_empty_lines_are_skipped(self):
        self.assertEqual(
            agent_exec._split_control(b"\n\n \nkill 15\n", b""), ([self.KILL15], b"", [])
        )

    def test_other_verbs_pass_through(self):
        data = b'{"verb": "resize", "rows": 24, "cols": 80}\n'
        messages, _, _ = agent_exec._split_control(data, b"")
        self.assertEqual(messages, [{"verb": "resize", "rows": 24, "cols": 80}])

    def test_oversized_line_is_dropped_and_memory_bounded(self):
        limit = agent_exec._CONTROL_LINE_MAX
        chunks = [b"x" * 4096] * (limit // 4096 + 4)  # a line well past the limit
        carry = b""
        for chunk in chunks:
            messages, carry, rejected = agent_exec._split_control(chunk, carry)
            self.assertEqual((messages, rejected), ([], []))
            self.assertLessEqual(len(carry), limit + 1)
        messages, carry, rejected = agent_exec._split_control(b"xx\nkill 15\n", carry)
        self.assertEqual(messages, [self.KILL15])  # the next line is read as usual
        self.assertEqual(carry, b"")
        self.assertEqual(len(rejected), 1)
        self.assertIn("more than", rejected[0])

    def test_line_of_exactly_the_limit_is_read(self):
        limit = agent_exec._CONTROL_LINE_MAX
        head = b'{"verb": "kill", "signal": 15, "pad": "'
        line = head + b"p" * (limit - len(head) - 2) + b'"}'
        self.assertEqual(len(line), limit)
        messages, _, rejected = split_all([line[:5000], line[5000:] + b"\n"])
        self.assertEqual((len(messages), rejected), (1, []))
        messages, _, rejected = split_all([b" " + line + b"\n"])
        self.assertEqual((messages, len(rejected)), ([], 1))


class SendControlTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="agent-exec-units-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_no_fifo(self):
        self.assertFalse(agent_exec._send_control(self.dir, {"verb": "kill", "signal": 15}))

    def test_fifo_without_reader(self):
        os.mkfifo(os.path.join(self.dir, agent_exec.CONTROL), 0o600)
        self.assertFalse(agent_exec._send_control(self.dir, {"verb": "kill", "signal": 15}))

    def test_one_line_to_the_reader(self):
        fd = agent_exec._open_control(self.dir)
        self.assertIsNotNone(fd)
        self.addCleanup(os.close, fd)
        self.assertTrue(agent_exec._send_control(self.dir, {"verb": "kill", "signal": 9}))
        self.assertTrue(agent_exec._send_control(self.dir, {"verb": "kill", "signal": 15}))
        data = os.read(fd, 4096)
        self.assertEqual(data.count(b"\n"), 2)
        messages, carry, rejected = agent_exec._split_control(data, b"")
        self.assertEqual([m["signal"] for m in messages], [9, 15])
        self.assertEqual((carry, rejected), (b"", []))

    def test_message_too_long_for_one_atomic_write(self):
        with self.assertRaises(ValueError):
            agent_exec._send_control(self.dir, {"verb": "send", "data": "x" * 1000})


class RedactTests(unittest.TestCase):
    """--mask across chunk ends, against masking the whole output at once."""

    SECRETS = ["hunter2", "abcabd"]

    def capture(self):
        cfg = {"secrets": self.SECRETS}
        return agent_exec._Capture("/nonexistent", cfg, None, None, None)

    def whole(self, data):
        for secret in sorted((s.encode() for s in self.SECRETS), key=len, reverse=True):
            data = data.replace(secret, b"***")
        return data

    def test_random_chunkings(self):
        rng = random.Random(3)
        words = [b"hunter2", b"hunter", b"abcab", b"abcabd", b"x", b"\n", b"abc"]
        for _ in range(200):
            data = b"".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 5)))
            chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            capture, stream = self.capture(), agent_exec._Stream("stdout", -1, None)
            out = b"".join(capture._redact(stream, c, False) for c in chunks)
            out += capture._redact(stream, b"", True)
            self.assertEqual(out, self.whole(data), chunks)


if __name__ == "__main__":
    unittest.main()
