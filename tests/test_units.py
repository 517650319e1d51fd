"""The pure parts of agent_exec.py, tested in-process (the whole file in milliseconds).

Parsers of durations, sizes, counts, signals and cursors; ULIDs; UTF-8 edges;
tails and read spans of logs; prefix resolution; env files; line matching;
and how a job's state is derived from its files.  The subprocess tests then
only prove that the command line is wired to these, one per option kind.
"""

import fcntl
import json
import os
import re
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import agent_exec  # noqa: E402

LINUX = sys.platform.startswith("linux")


class DurationTests(unittest.TestCase):
    GOOD = {
        "0": 0,
        "250": 250,
        " 250 ": 250,
        "250ms": 250,
        "5s": 5000,
        "5S": 5000,
        "1.5s": 1500,
        "0.6ms": 1,
        "0.0s": 0,
        "2m": 120000,
        "1h": 3600000,
        "1d": 86400000,
        "36500d": 36500 * 86400000,
        7: 7,
    }
    BAD = (
        ("", "-1", "abc", "5x", "ms", "-5s", "1.5", "1.5.s", ".", ".s", "1e3", "36501d", "9" * 21)
        # past what time.sleep/monotonic arithmetic can hold in nanoseconds
        + ("10000000000000", "99999999999999999999999h")
        # int() and \d take Arabic-Indic and full-width digits; a CLI must not
        + ("\u0661\u0662", "\u0661\u0662ms", "\uff15s")
        # a positive value that rounds to 0 ms would mean "none" to --timeout
        + ("0.4ms", "0.0001s")
    )

    def test_good_values(self):
        for text, ms in self.GOOD.items():
            with self.subTest(text=text):
                self.assertEqual(agent_exec.parse_duration_ms(text), ms)

    def test_bad_values(self):
        for text in self.BAD:
            with self.subTest(text=text):
                self.assertRaises(ValueError, agent_exec.parse_duration_ms, text)

    def test_positive_duration(self):
        self.assertEqual(agent_exec._positive_duration("1s"), 1000)
        self.assertRaises(ValueError, agent_exec._positive_duration, "0")


class SizeTests(unittest.TestCase):
    GOOD = {
        "0": 0,
        "65536": 65536,
        "64k": 65536,
        "64K": 65536,
        "64kb": 65536,
        "64KiB": 65536,
        "1M": 1 << 20,
        "1MiB": 1 << 20,
        "2G": 2 << 30,
        "2gb": 2 << 30,
        "10b": 10,
        " 3 k ": 3072,
        "100": 100,
        "1024": 1024,
        "1k": 1024,
        "1KiB": 1024,
        "2k": 2048,
    }
    BAD = ("", "-1", "k", "1.5M", "1T", "1 0", "x1", "9" * 31) + (
        "abc",
        "5x",
        "1.2.3k",
        "-64k",
        "\u0661\u0662",
        "\u0661\u0662ms",
        "\uff15s",
    )

    def test_good_values(self):
        for text, size in self.GOOD.items():
            with self.subTest(text=text):
                self.assertEqual(agent_exec.parse_size(text), size)

    def test_bad_values(self):
        for text in self.BAD:
            with self.subTest(text=text):
                self.assertRaises(ValueError, agent_exec.parse_size, text)


class CountAndPortTests(unittest.TestCase):
    def test_counts(self):
        self.assertEqual(agent_exec._nonneg_int("0"), 0)
        self.assertEqual(agent_exec._nonneg_int(" 12 "), 12)
        for bad in ("", "-1", "1.0", "1.5", "x", "abc", "1" * 19):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, agent_exec._nonneg_int, bad)

    def test_ports(self):
        self.assertEqual(agent_exec._port("1"), 1)
        self.assertEqual(agent_exec._port("65535"), 65535)
        for bad in ("0", "65536", "-1", "http"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, agent_exec._port, bad)

    def test_env_pairs_and_keys(self):
        self.assertEqual(agent_exec._env_pair("A_1=x=y"), "A_1=x=y")
        self.assertEqual(agent_exec._env_pair("A="), "A=")
        for bad in ("A", "=x", "1A=x", "A-B=x", "A B=x"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, agent_exec._env_pair, bad)
        self.assertEqual(agent_exec._env_key("_X9"), "_X9")
        self.assertRaises(ValueError, agent_exec._env_key, "9X")


class UlidTests(unittest.TestCase):
    def test_shape_and_order(self):
        a = agent_exec.new_ulid(1000.0)
        b = agent_exec.new_ulid(1000.001)
        self.assertEqual(len(a), 26)
        self.assertTrue(set(a) <= set(agent_exec._CROCKFORD))
        self.assertLess(a, b)
        self.assertTrue(agent_exec.is_job_id(a))
        self.assertTrue(agent_exec.new_ulid().startswith(agent_exec.new_ulid()[:6]))

    def test_what_is_not_a_job_id(self):
        good = agent_exec.new_ulid()
        for bad in (good.lower(), good[:-1], good + "0", "8" + good[1:], good[:-1] + "U", ""):
            with self.subTest(bad=bad):
                self.assertFalse(agent_exec.is_job_id(bad))


class SignalTests(unittest.TestCase):
    def test_names_and_numbers(self):
        for text, num in (("TERM", 15), ("SIGTERM", 15), ("term", 15), ("15", 15), ("KILL", 9)):
            with self.subTest(text=text):
                self.assertEqual(agent_exec.parse_signal(text), num)
        self.assertEqual(agent_exec.signal_name(15), "SIGTERM")
        self.assertEqual(agent_exec.signal_name(200), "SIG200")

    def test_bad_signals(self):
        for bad in ("", "0", "TERMINATE", "SIGFOO", "999999", "-9", "BOGUS", "SIGNOPE", "-3"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, agent_exec.parse_signal, bad)


class CursorTests(unittest.TestCase):
    def test_round_trip(self):
        for pos in ((0, 0), (1, 255), (2**40, 7)):
            with self.subTest(pos=pos):
                cursor = agent_exec.make_cursor(*pos)
                self.assertTrue(cursor.startswith("c1."))
                self.assertEqual(agent_exec.parse_cursor(cursor), pos)

    def test_bad_cursors(self):
        for bad in ("", "c1.", "c1.0", "c2.0.0", "c1.A.0", "c1.0.0.0", "c1." + "f" * 17 + ".0") + (
            "garbage",
            "c1.zz.0",
            "c1.-1.0",
        ):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, agent_exec.parse_cursor, bad)


class Utf8Tests(unittest.TestCase):
    EURO = "€".encode()  # 3 bytes

    def test_cut_never_inside_a_character(self):
        self.assertEqual(agent_exec._utf8_cut(b"ab"), 2)
        self.assertEqual(agent_exec._utf8_cut(b"a" + self.EURO), 4)
        self.assertEqual(agent_exec._utf8_cut(b"a" + self.EURO[:2]), 1)
        self.assertEqual(agent_exec._utf8_cut(b"a" + self.EURO[:1]), 1)
        self.assertEqual(agent_exec._utf8_cut(b"\x80\x80"), 2)  # invalid: kept
        self.assertEqual(agent_exec._utf8_cut(b""), 0)

    def test_width_and_skip(self):
        widths = {0x41: 1, 0xC3: 2, 0xE2: 3, 0xF0: 4}
        for lead, width in widths.items():
            self.assertEqual(agent_exec._utf8_width(lead), width)
        self.assertEqual(agent_exec._skip_partial_utf8(self.EURO[1:] + b"x"), b"x")
        self.assertEqual(agent_exec._skip_partial_utf8(b"x"), b"x")

    def test_complete_lines(self):
        self.assertEqual(agent_exec._complete_lines(b"a\nb", False, 100), 2)
        self.assertEqual(agent_exec._complete_lines(b"a\nb", True, 100), 3)
        self.assertEqual(agent_exec._complete_lines(b"abc", False, 100), 0)
        self.assertEqual(agent_exec._complete_lines(b"a" * 10, False, 5), 10)


class TailTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def file(self, data):
        path = os.path.join(self.tmp.name, "log")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_last_lines(self):
        self.assertEqual(agent_exec._last_lines(b"a\nb\nc\n", 2), b"b\nc\n")
        self.assertEqual(agent_exec._last_lines(b"a\nb\nc", 2), b"b\nc")
        self.assertEqual(agent_exec._last_lines(b"a\nb", 5), b"a\nb")

    def test_lines_and_bytes(self):
        path = self.file(b"".join(b"line %d\n" % i for i in range(1000)))
        data, size, cut = agent_exec.tail_bytes(path, 3, 65536)
        self.assertEqual(data, b"line 997\nline 998\nline 999\n")
        self.assertEqual(size, os.path.getsize(path))
        self.assertTrue(cut)
        data, _, cut = agent_exec.tail_bytes(path, 1000, 10)
        self.assertEqual(data, b"\nline 999\n")  # the last 10 bytes
        self.assertTrue(cut)
        data, _, cut = agent_exec.tail_bytes(path, 5000, 1 << 20)
        self.assertEqual(len(data), size)
        self.assertFalse(cut)

    def test_edges(self):
        self.assertEqual(
            agent_exec.tail_bytes(os.path.join(self.tmp.name, "no"), 5, 5), (b"", 0, False)
        )
        self.assertEqual(agent_exec.tail_bytes(self.file(b""), 5, 5), (b"", 0, False))
        self.assertEqual(
            agent_exec.tail_bytes(self.file(b"a\nno newline"), 1, 100)[0], b"no newline"
        )
        self.assertEqual(agent_exec.tail_bytes(self.file(b"abc"), 0, 100), (b"", 3, True))
        euro = "€".encode()
        data, _, _ = agent_exec.tail_bytes(self.file(euro * 10), 1, 4)
        self.assertEqual(data, euro)  # the cut-off start of a character is dropped


def make_job(root, stdout=b"", stderr=b"", record=None, meta=None):
    """A job directory written by hand; returns its id."""
    job_id = agent_exec.new_ulid()
    job_dir = os.path.join(root, job_id)
    os.mkdir(job_dir, 0o700)
    with open(os.path.join(job_dir, "meta.json"), "w") as f:
        json.dump(meta if meta is not None else {"job": {"id": job_id}, "cwd": "/"}, f)
    if record is not None:
        with open(os.path.join(job_dir, "state.json"), "w") as f:
            f.write(record if isinstance(record, str) else json.dumps(record))
    for name, data in (("stdout.log", stdout), ("stderr.log", stderr)):
        with open(os.path.join(job_dir, name), "wb") as f:
            f.write(data)
    return job_id


def exited(**extra):
    record = {
        "job": {"status": "exited", "started_at": "2026-01-01T00:00:00.000Z"},
        "result": {"exit_code": 0, "signal": None, "duration_ms": 3},
        "finished_at": "2026-01-01T00:00:01.000Z",
        "failure": None,
    }
    record.update(extra)
    return record


class ReadSpanTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def job(self, stdout, dropped=0):
        jid = make_job(self.tmp.name, stdout, record=exited(stdout_dropped_bytes=dropped))
        return agent_exec.load_job(self.tmp.name, jid)

    def test_positions_count_dropped_bytes(self):
        job = self.job(b"abcdef", dropped=100)
        self.assertEqual(agent_exec.read_span(job, "stdout", 0, 4, False), (b"abcd", 104, True))
        self.assertEqual(
            agent_exec.read_span(job, "stdout", 102, 100, False), (b"cdef", 106, False)
        )
        self.assertEqual(agent_exec.read_span(job, "stdout", 500, 100, False), (b"", 106, False))

    def test_never_ends_inside_a_character_unless_final(self):
        euro = "€".encode()
        job = self.job(b"a" + euro)
        self.assertEqual(agent_exec.read_span(job, "stdout", 0, 2, False), (b"a", 1, True))
        # One character wider than max_bytes is given whole.
        self.assertEqual(agent_exec.read_span(job, "stdout", 1, 1, False), (euro, 4, False))
        truncated = self.job(b"a" + euro[:2])
        self.assertEqual(agent_exec.read_span(truncated, "stdout", 0, 10, True)[0], b"a" + euro[:2])
        self.assertEqual(agent_exec.read_span(truncated, "stdout", 0, 10, False)[0], b"a")

    def test_invalid_lead_byte_alone(self):
        job = self.job(b"\xe2x")
        self.assertEqual(agent_exec.read_span(job, "stdout", 0, 1, False)[0], b"\xe2")

    def test_missing_log(self):
        job = self.job(b"")
        os.unlink(os.path.join(job.dir, "stderr.log"))
        self.assertEqual(agent_exec.read_span(job, "stderr", 5, 10, False), (b"", 5, False))


class ResolveJobTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.root = self.tmp.name
        self.a = "01AAAA" + "0" * 20
        self.b = "01AAAB" + "0" * 20
        for jid in (self.a, self.b):
            os.mkdir(os.path.join(self.root, jid))

    def code_of(self, ident):
        with self.assertRaises(agent_exec.AgentExecError) as cm:
            agent_exec.resolve_job(self.root, ident)
        return cm.exception.code

    def test_ids_and_prefixes(self):
        self.assertEqual(agent_exec.resolve_job(self.root, self.a), self.a)
        self.assertEqual(agent_exec.resolve_job(self.root, "01AAAB"), self.b)
        self.assertEqual(agent_exec.resolve_job(self.root, "01aaab"), self.b)
        self.assertEqual(self.code_of("01AAA"), "ambiguous_job_id")

    def test_what_names_no_job(self):
        os.symlink(os.path.join(self.root, self.a), os.path.join(self.root, "01AAAC" + "0" * 20))
        with open(os.path.join(self.root, "01AAAD" + "0" * 20), "w"):
            pass
        for ident in (
            "01A",
            "../x",
            "/etc",
            "..",
            "01AAAC",
            "01AAAD",
            "01AAAC" + "0" * 20,
            "Z" * 27,
        ):
            with self.subTest(ident=ident):
                self.assertEqual(self.code_of(ident), "job_not_found")

    def test_walk_skips_symlinks_and_other_names(self):
        os.symlink(os.path.join(self.root, self.a), os.path.join(self.root, "01AAAC" + "0" * 20))
        os.mkdir(os.path.join(self.root, "not-a-job"))
        names = [name for name, _ in agent_exec._iter_jobs(self.root)]
        self.assertEqual(names, [self.b, self.a])  # newest first

    def test_every_prefix_length_and_hostile_ids(self):
        # What the CLI's job-id tests name, resolved in-process (test_cli
        # sends one or two of each through every command).
        jid = "7" + "Z" * 25  # shares no prefix with the other two
        os.mkdir(os.path.join(self.root, jid))
        for n in range(4, 27):
            with self.subTest(prefix_len=n):
                self.assertEqual(agent_exec.resolve_job(self.root, jid[:n].lower()), jid)
        outside = os.path.join(self.root, "..", "outside")
        hostile = [jid[:3], jid[:2], jid[:1]]
        hostile += ["../../etc", "/etc", "..", "", "a/b", "A" * 4096]
        hostile += [jid + "0", jid + "/", "./" + jid, jid + "/../" + jid, "../outside/" + jid]
        hostile += ["../root/" + jid, os.path.join(self.root, jid), os.path.join(outside, jid)]
        for ident in hostile:
            with self.subTest(ident=ident[:60]):
                self.assertEqual(self.code_of(ident), "job_not_found")

    def test_entries_that_are_not_jobs_are_not_found(self):
        jid = self.a
        junk_dirs = [jid + "X", jid[:25] + "U", jid[:6] + "-junk", ".hidden", "tmp"]
        for name in junk_dirs:
            os.mkdir(os.path.join(self.root, name))
        for name in ("README", "notes.txt", jid[:10] + ".lock"):
            with open(os.path.join(self.root, name), "w"):
                pass
        os.symlink("/etc", os.path.join(self.root, "etc-link"))
        for name in junk_dirs + ["README", "notes.txt", "etc-link"]:
            with self.subTest(name=name):
                self.assertEqual(self.code_of(name), "job_not_found")
        for prefix in (jid[:10], jid[:25], jid):
            with self.subTest(prefix=prefix):
                self.assertEqual(agent_exec.resolve_job(self.root, prefix), jid)


class EnvFileTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def parse(self, data):
        path = os.path.join(self.tmp.name, "env")
        with open(path, "wb") as f:
            f.write(data)
        return agent_exec._parse_env_file(path)

    def test_forms(self):
        pairs = self.parse(b"# c\n\nA=1\nexport B = two \nC='q x'\nD=\"d\"\nE=\n")
        self.assertEqual(pairs, [("A", "1"), ("B", "two"), ("C", "q x"), ("D", "d"), ("E", "")])

    def test_errors(self):
        for data, words in (
            (b"A=1\nnot a pair\n", "line 2"),
            (b"\xff=1\n", "not UTF-8"),
            (b"1A=x", "line 1"),
        ):
            with self.subTest(data=data):
                with self.assertRaises(agent_exec.AgentExecError) as cm:
                    self.parse(data)
                self.assertEqual(cm.exception.code, "invalid_argument")
                self.assertIn(words, cm.exception.message)
        with self.assertRaises(agent_exec.AgentExecError):
            agent_exec._parse_env_file(os.path.join(self.tmp.name, "missing"))


class MatchLineTests(unittest.TestCase):
    def test_first_matching_line_and_offset(self):
        regex = re.compile("b+", re.M)
        self.assertEqual(agent_exec._match_line(regex, b"aa\nxbb\ncc\n"), ("xbb", 7))
        self.assertIsNone(agent_exec._match_line(regex, b"aa\ncc\n"))

    def test_no_match_across_lines(self):
        regex = re.compile("a\\sb", re.M)
        self.assertIsNone(agent_exec._match_line(regex, b"a\nb\n"))

    def test_bytes_that_are_not_utf8(self):
        regex = re.compile("ok", re.M)
        self.assertEqual(agent_exec._match_line(regex, b"\xff\nok \xfe\n"), ("ok \ufffd", 7))

    def test_crlf_line_ends_match_dollar_and_offsets_stay_raw(self):
        regex = re.compile("^4$", re.M)
        for data, offset in (
            (b">>> 2+2\r\n4\r\n>>> ", 12),
            (b"a\nb\r\n4\r\nz", 8),
            (b"x\r\ny\r\n4", 7),
            (b"x\r\r\n4\r\r\nz\n", 8),  # a program's CR LF through a terminal's ONLCR
        ):
            with self.subTest(data=data):
                self.assertEqual(agent_exec._match_line(regex, data), ("4", offset))


class KeysAndSizesTests(unittest.TestCase):
    """send --keys SPEC and COLSxROWS sizes."""

    def test_keys(self):
        keys = agent_exec.parse_keys
        self.assertEqual(keys('"2+2",enter'), b"2+2\r")
        self.assertEqual(keys("ctrl-c"), b"\x03")
        self.assertEqual(keys("Down*3, PgDn"), b"\x1b[B" * 3 + b"\x1b[6~")
        self.assertEqual(keys("\"a,b\" , tab, 'c'"), b"a,b\tc")
        self.assertEqual(keys("f1,f12,esc,backspace,ctrl-z"), b"\x1bOP\x1b[24~\x1b\x7f\x1a")
        for bad in ("", "hyper", '"open', "down*0", "down*x", '"a"b', "enter,,tab", "enter,"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                keys(bad)

    def test_terminal_sizes(self):
        self.assertEqual(agent_exec.parse_term_size("80x24"), (80, 24))
        self.assertEqual(agent_exec.parse_term_size("132X40"), (132, 40))
        for bad in ("0x0", "80x0", "80", "x24", "80x", "1x99999", "axb", "-1x5"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                agent_exec.parse_term_size(bad)


class LoadJobTests(unittest.TestCase):
    """load_job derives the published state from the files and the lock."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def hold_lock(self, job_id):
        fd = os.open(os.path.join(self.tmp.name, job_id, "meta.json"), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)

    def running(self, **extra):
        record = {"job": {"status": "running"}, "result": None, "failure": None}
        record.update(extra)
        return record

    def test_running_while_the_lock_is_held(self):
        jid = make_job(self.tmp.name, record=self.running())
        self.hold_lock(jid)
        job = agent_exec.load_job(self.tmp.name, jid)
        self.assertEqual((job.state, job.failure), ("running", None))
        self.assertFalse(job.terminal)

    def test_running_with_a_free_lock_is_a_lost_supervisor(self):
        for record in (self.running(), None):
            with self.subTest(record=record):
                jid = make_job(self.tmp.name, record=record)
                job = agent_exec.load_job(self.tmp.name, jid)
                self.assertEqual(job.state, "failed")
                self.assertEqual(job.failure["code"], "supervisor_lost")

    @unittest.skipUnless(LINUX, "boot ids are read from /proc")
    def test_a_record_from_an_earlier_boot(self):
        jid = make_job(self.tmp.name, record=self.running(boot_id="not-this-boot"))
        self.hold_lock(jid)
        job = agent_exec.load_job(self.tmp.name, jid)
        self.assertEqual(job.state, "failed")
        self.assertIn("rebooted", job.failure["message"])

    def test_a_record_that_is_not_ours(self):
        for record in ('{"job": 1}', '{"job": {"status": "sleeping"}}', "[1]", "{not json"):
            with self.subTest(record=record):
                jid = make_job(self.tmp.name, record=record)
                self.hold_lock(jid)
                job = agent_exec.load_job(self.tmp.name, jid)
                self.assertEqual(job.state, "unknown")
                if "sleeping" not in record:  # a record of ours with an odd state is kept
                    self.assertEqual(job.record, {})

    def test_a_terminal_job(self):
        jid = make_job(self.tmp.name, record=exited())
        job = agent_exec.load_job(self.tmp.name, jid)
        self.assertTrue(job.terminal)
        self.assertEqual(job.head()["exit_code"], 0)
        self.assertEqual(job.started_at(), "2026-01-01T00:00:00.000Z")

    def test_meta_problems(self):
        jid = make_job(self.tmp.name, meta=[1])
        with self.assertRaises(agent_exec.AgentExecError) as cm:
            agent_exec.load_job(self.tmp.name, jid)
        self.assertEqual(cm.exception.code, "io_error")
        os.unlink(os.path.join(self.tmp.name, jid, "meta.json"))
        with self.assertRaises(agent_exec.AgentExecError) as cm:
            agent_exec.load_job(self.tmp.name, jid)
        self.assertEqual(cm.exception.code, "job_not_found")

    def test_meta_filter_skips_before_the_record_is_read(self):
        jid = make_job(self.tmp.name, record="{not json")
        self.assertIsNone(agent_exec.load_job(self.tmp.name, jid, lambda meta: False))


class AtomicWriteTests(unittest.TestCase):
    def test_replace_and_keep_locked(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.json")
            self.assertIsNone(agent_exec._write_json_atomic(path, {"a": 1}))
            fd = agent_exec._write_json_atomic(path, {"a": 2}, keep_locked=True)
            try:
                probe = os.open(path, os.O_RDONLY)
                try:
                    self.assertFalse(agent_exec._lock_is_free(probe))
                finally:
                    os.close(probe)
            finally:
                os.close(fd)
            self.assertEqual(agent_exec._read_json(path), {"a": 2})
            self.assertEqual(os.listdir(d), ["x.json"])  # no temp file left

    def test_failure_leaves_nothing(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "x.json")
            self.assertRaises(TypeError, agent_exec._write_json_atomic, path, {"a": object()})
            self.assertEqual(os.listdir(d), [])


class TimeTests(unittest.TestCase):
    def test_rfc3339_round_trip(self):
        t = 1767225600.123
        text = agent_exec._rfc3339(t)
        self.assertEqual(text, "2026-01-01T00:00:00.123Z")
        self.assertAlmostEqual(agent_exec._parse_rfc3339(text), t, places=3)
        self.assertRegex(agent_exec._now(), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertLess(abs(agent_exec._parse_rfc3339(agent_exec._now()) - time.time()), 5)


class LingeringTableTests(unittest.TestCase):
    """_lingering_from_table: the same answers as the one-job-at-a-time checks."""

    def job(self, **record):
        return agent_exec._Job("X", "/nonexistent", {}, record, "exited", None)

    def test_answers_from_one_table(self):
        table = {
            100: (1, 100, "s100"),  # a live supervisor
            200: (1, 150, "s200"),  # a member of group 150, whose leader is gone
            300: (1, 300, "other"),  # a process whose pid is a recorded pgid: not the job's
        }
        cache = {"table": table}
        f = agent_exec._lingering_from_table
        j = self.job(supervisor_pid=100, supervisor_start_time="s100", pid=150)
        self.assertEqual(f(j, 100, cache), (True, 150))
        j = self.job(supervisor_pid=100, supervisor_start_time="old", pid=999)
        self.assertEqual(f(j, 100, cache), (False, None))  # a recycled supervisor pid
        j = self.job(supervisor_pid=5, supervisor_start_time="x", pid=300, pid_start_time="s0")
        self.assertEqual(f(j, 5, cache), (False, None))  # group 300 is a stranger's
        j = self.job(supervisor_pid=5, pid=300, pid_start_time="other")
        self.assertEqual(f(j, 5, cache), (False, 300))  # its leader is the workload


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


if __name__ == "__main__":
    unittest.main()
