"""``read``: cursors, long polls, cursor hand-off between readers, exact bytes."""

import concurrent.futures
import json
import math
import os
import random
import re
import resource
import string
import time
import unittest

from tests._jobs import (
    JobsTestCase,
    PLAN_WORKLOAD,
    REPLACEMENT,
    TERMINAL,
    cursor_pos,
    is_utf8,
    splits_a_character,
)
from tests._procs import wait_until
from tests._util import PY


# ---- read ---------------------------------------------------------------------


class ReadTests(JobsTestCase):
    def test_read_whole_output_of_a_finished_job(self):
        job = self.bytes_job(b"hello\nworld\n", b"oops\n")
        j = self.okv("read", job)
        self.assertEqual(j["type"], "read")
        self.assertEqual(j["job_id"], job)
        self.assertEqual(j["state"], "exited")
        self.assertEqual(j["stdout"], "hello\nworld\n")
        self.assertEqual(j["stderr"], "oops\n")
        self.assertIs(j["more"], False)
        self.assertIs(j["eof"], True)
        self.assertEqual(cursor_pos(j["cursor"]), (12, 5))
        # Reading again from that cursor: nothing new, still eof.
        again = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual((again["stdout"], again["stderr"]), ("", ""))
        self.assertIs(again["eof"], True)
        self.assertEqual(again["cursor"], j["cursor"])

    def test_read_resolves_a_prefix(self):
        job = self.bytes_job(b"x\n")
        j = self.okv("read", job[:10])
        self.assertEqual(j["job_id"], job)
        self.assertEqual(j["stdout"], "x\n")

    def test_max_bytes_pages_with_more_and_eof(self):
        job = self.bytes_job(b"0123456789", b"abcdef")
        pages = []
        cursor = None
        for _ in range(10):
            args = ["read", "--max-bytes", "4"] + (["--cursor", cursor] if cursor else [])
            j = self.okv(*(args + [job]))
            pages.append((j["stdout"], j["stderr"], j["more"], j["eof"]))
            cursor = j["cursor"]
            if j["eof"]:
                break
        self.assertEqual(
            pages,
            [
                ("0123", "abcd", True, False),
                ("4567", "ef", True, False),
                ("89", "", False, True),
            ],
        )

    def test_default_max_bytes_is_64k_per_stream(self):
        n = 65536 + 1000
        job = self.bytes_job(b"a" * n, b"b" * 10)
        j = self.okv("read", job)
        self.assertEqual(len(j["stdout"]), 65536)
        self.assertEqual(j["stderr"], "b" * 10)
        self.assertIs(j["more"], True)
        self.assertIs(j["eof"], False)
        j2 = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual(j2["stdout"], "a" * 1000)
        self.assertIs(j2["eof"], True)

    def test_multibyte_characters_are_never_split(self):
        text = "aé€😀\n中𝄞"
        data = text.encode("utf-8")
        job = self.bytes_job(data, text[::-1].encode("utf-8"))
        for max_bytes in (1, 2, 3):
            with self.subTest(max_bytes=max_bytes):
                pages = self.read_all(job, max_bytes)
                for p in pages:
                    self.assertNotIn(REPLACEMENT, p["stdout"] + p["stderr"], p)
                self.assertEqual("".join(p["stdout"] for p in pages), text)
                self.assertEqual("".join(p["stderr"] for p in pages), text[::-1])
                # Never more than max_bytes, unless one character is wider.
                prev = (0, 0)
                for p in pages:
                    cur = cursor_pos(p["cursor"])
                    for i in (0, 1):
                        self.assertLessEqual(cur[i] - prev[i], max(max_bytes, 4), p)
                    prev = cur

    def test_invalid_bytes_before_a_character_do_not_split_it(self):
        # A lone lead byte, an ASCII byte, then a valid 4-byte character: read
        # one byte at a time, the emoji must still come back whole.
        data = b"\xf0A" + "😀".encode("utf-8") + b"z"
        job = self.bytes_job(data)
        pages = self.read_all(job, 1)
        got = "".join(p["stdout"] for p in pages)
        self.assertEqual(got, data.decode("utf-8", "replace"), pages)
        self.assertEqual(cursor_pos(pages[-1]["cursor"])[0], len(data))

    def test_truncated_character_at_the_end_still_reaches_eof(self):
        # The log ends inside a multi-byte character (the job died mid-write):
        # reading byte by byte must still get past it and reach eof.
        for tail in (b"\xf0\x9f", b"\xe2\x82"):
            with self.subTest(tail=tail):
                data = b"ab" + tail
                job = self.bytes_job(data)
                pages = self.read_all(job, 1, limit=8)
                got = "".join(p["stdout"] for p in pages)
                self.assertEqual(got, data.decode("utf-8", "replace"))
                self.assertEqual(cursor_pos(pages[-1]["cursor"])[0], len(data))

    def test_invalid_bytes_are_replaced_and_counted(self):
        data = b"ok\xff\xfe\n\xc3(\n"
        job = self.bytes_job(data, b"\x80")
        j = self.okv("read", job)
        self.assertEqual(j["stdout"], data.decode("utf-8", "replace"))
        self.assertEqual(j["stderr"], REPLACEMENT)
        self.assertEqual(cursor_pos(j["cursor"]), (len(data), 1))
        self.assertIs(j["eof"], True)

    def test_malformed_cursor_is_a_usage_error(self):
        job = self.bytes_job(b"x\n")
        # one cursor through the CLI; every bad cursor: test_units (CursorTests,
        # OptionValueWiringTests)
        for bad in ("c1.zz.0",):
            with self.subTest(cursor=bad):
                self.fail_with("usage_error", "read", "--cursor", bad, job, exit_code=2)

    def test_bad_max_bytes_and_wait_ms_are_usage_errors(self):
        job = self.bytes_job(b"x\n")
        self.fail_with("usage_error", "read", "--max-bytes", "-1", job, exit_code=2)
        self.fail_with("usage_error", "read", "--max-bytes", "lots", job, exit_code=2)
        self.fail_with("usage_error", "read", "--wait-ms", "soon", job, exit_code=2)

    def test_unknown_job(self):
        self.fail_with("job_not_found", "read", "0123456789ABCDEFGHJKMNPQRS")
        self.fail_with("job_not_found", "read", "../etc")

    def test_cursor_past_the_end_reads_nothing(self):
        # Before any restart (see test_lifecycle_run's AttemptCursorTests for after one).
        job = self.bytes_job(b"abc\n")
        j = self.okv("read", "--cursor", "c1.ff.ff", job)
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertIs(j["more"], False)
        self.assertNotIn("cursor_reset", j)


class LongPollTests(JobsTestCase):
    def test_wait_ms_wakes_on_new_output(self):
        # Three lines, 0.8 s apart; each read long-polls for the next one.
        # The line carries the time it was written: the read must come back
        # right after it (the target: within 50 ms; the test allows noise).
        code = (
            "import sys, time\n"
            "for i in range(3):\n"
            "    time.sleep(0.8)\n"
            "    sys.stdout.write('%.6f\\n' % time.time())\n"
            "    sys.stdout.flush()\n"
            "time.sleep(30)\n"
        )
        job = self.py_job(code)
        cursor = None
        lags = []
        for _ in range(3):
            args = ["read", "--wait-ms", "10000"] + (["--cursor", cursor] if cursor else [])
            j, took = self.timed(*(args + [job]))
            now = time.time()
            self.assertEqual(j["state"], "running", j)
            self.assertLess(took, 8.0, j)
            lines = j["stdout"].splitlines()
            self.assertTrue(lines, j)
            lags.append(now - float(lines[-1]))
            cursor = j["cursor"]
        self.kill_job(job)
        self.assertLess(min(lags), 0.3, "long-poll wake-up lags: %r" % lags)

    def test_wait_ms_returns_at_once_when_the_job_ends(self):
        job = self.py_job("import time; time.sleep(1.0)")
        t0 = time.monotonic()
        j = self.okv("read", "--wait-ms", "20000", job)
        took = time.monotonic() - t0
        self.assertIn(j["state"], TERMINAL)
        self.assertEqual(j["state"], "exited")
        self.assertIs(j["eof"], True)
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertLess(took, 6.0)

    def test_wait_ms_times_out_without_output_and_costs_no_cpu(self):
        job = self.start("sleep", "30")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        j = self.okv("read", "--wait-ms", "1500", job)
        took = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.assertEqual(j["state"], "running")
        self.assertEqual((j["stdout"], j["stderr"]), ("", ""))
        self.assertIs(j["eof"], False)
        self.assertIs(j["more"], False)
        self.assertEqual(cursor_pos(j["cursor"]), (0, 0))
        self.assertGreaterEqual(took, 1.4)
        self.assertLess(took, 8.0)
        # Startup costs a fraction of a second; a busy loop would burn ~1.5 s.
        self.assertLess(cpu, 0.9, "read --wait-ms used %.2fs of CPU" % cpu)
        self.kill_job(job)

    def test_wait_ms_returns_existing_output_immediately(self):
        job = self.py_job("import time; print('ready', flush=True); time.sleep(30)")
        self.assertTrue(
            wait_until(lambda: os.path.getsize(os.path.join(self.job_dir(job), "stdout.log")))
        )
        j, took = self.timed("read", "--wait-ms", "20000", job)
        self.assertEqual(j["stdout"], "ready\n")
        self.assertLess(took, 6.0)
        self.kill_job(job)


class CursorHandoffTests(JobsTestCase):
    """run, tail and wait return a cursor; read --cursor continues from it."""

    TWO_PHASE = (
        "import sys, time\n"
        "sys.stdout.write('first\\n'); sys.stdout.flush()\n"
        "sys.stderr.write('e1\\n'); sys.stderr.flush()\n"
        "time.sleep(1.5)\n"
        "sys.stdout.write('second\\n'); sys.stdout.flush()\n"
        "sys.stderr.write('e2\\n'); sys.stderr.flush()\n"
    )

    def test_run_with_snapshot_then_read_loses_and_repeats_nothing(self):
        r = self.okv("run", "--snapshot-after", "700", "--", PY, "-c", self.TWO_PHASE)
        job = r["job_id"]
        self.assertEqual(r["state"], "running", r)
        snap = r["snapshot"]
        self.assertEqual(snap["stdout_tail"], "first\n", r)
        self.assertEqual(
            cursor_pos(r["cursor"]),
            (snap["stdout_observed_bytes"], snap["stderr_observed_bytes"]),
        )
        self.wait_job(job)
        j = self.okv("read", "--cursor", r["cursor"], job)
        self.assertEqual(j["stdout"], "second\n")
        self.assertEqual(j["stderr"], "e2\n")
        self.assertIs(j["eof"], True)
        self.assertEqual(snap["stdout_tail"] + j["stdout"], self.log(job, "stdout").decode())
        self.assertEqual(snap["stderr_tail"] + j["stderr"], self.log(job, "stderr").decode())

    def test_run_without_snapshot_gives_a_cursor_at_the_start(self):
        r = self.okv("run", "--snapshot-after", "0", "--", PY, "-c", "print('all of it')")
        self.assertIn("cursor", r)
        self.wait_job(r["job_id"])
        j = self.okv("read", "--cursor", r["cursor"], r["job_id"])
        self.assertEqual(j["stdout"], "all of it\n")

    def test_run_wait_cursor_is_at_the_end(self):
        r = self.okv("run", "--wait", "--", PY, "-c", "print('x' * 10)")
        self.assertEqual(cursor_pos(r["cursor"]), (11, 0))
        j = self.okv("read", "--cursor", r["cursor"], r["job_id"])
        self.assertEqual((j["stdout"], j["eof"]), ("", True))

    def test_tail_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        path = os.path.join(self.job_dir(job), "stderr.log")
        self.assertTrue(wait_until(lambda: os.path.getsize(path) >= 3))
        t = self.okv("tail", job)
        self.assertIn("cursor", t)
        self.assertEqual(t["stdout_tail"], "first\n", t)
        self.assertEqual(cursor_pos(t["cursor"]), (6, 3))
        j = self.okv("read", "--cursor", t["cursor"], "--wait-ms", "10000", job)
        self.assertEqual(j["stdout"], "second\n")
        self.wait_job(job)

    def test_wait_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        w = self.okv("wait", "--timeout-ms", "30000", job)
        self.assertEqual(w["state"], "exited")
        self.assertEqual(cursor_pos(w["cursor"]), (13, 6))
        j = self.okv("read", "--cursor", w["cursor"], job)
        self.assertEqual((j["stdout"], j["stderr"], j["eof"]), ("", "", True))

    def test_wait_match_cursor_then_read(self):
        job = self.py_job(self.TWO_PHASE)
        w = self.okv("wait", "--match", "first", "--timeout-ms", "20000", job)
        self.assertIs(w["matched"], True, w)
        j = self.okv("read", "--cursor", w["match"]["cursor"], "--wait-ms", "10000", job)
        self.wait_job(job)
        rest = self.okv("read", "--cursor", j["cursor"], job)
        self.assertEqual(j["stdout"] + rest["stdout"], "second\n")


# ---- the exact-bytes property ------------------------------------------------------

MULTIBYTE = ["é", "ß", "ñ", "Ω", "€", "中", "文", "한", "😀", "🎉", "𝄞", "\u0301"]
ASCII = string.ascii_letters + string.digits + " .,;:-_=+"
SHAPES = ("ascii", "utf8", "multibyte", "binary", "long_line", "mixed", "empty")
SEEDS = [3, 17, 42, 101, 256, 777, 1009, 2024, 4242, 5150, 8080, 9001, 31337, 65537, 99991]


def _text(rng, n, ratio):
    return "".join(
        rng.choice(MULTIBYTE) if rng.random() < ratio else rng.choice(ASCII) for _ in range(n)
    )


def gen_stream(rng, shape, budget):
    """Random output of one stream, about ``budget`` bytes, of the given shape."""
    if shape == "empty":
        return b""
    kinds = {
        "ascii": ["ascii"],
        "utf8": ["ascii", "utf8"],
        "multibyte": ["multibyte"],
        "binary": ["binary", "ascii"],
        "long_line": ["long"],
        "mixed": ["ascii", "utf8", "multibyte", "binary", "long", "crlf"],
    }[shape]
    parts = []
    total = 0
    while total < budget:
        left = budget - total
        kind = rng.choice(kinds)
        if kind == "ascii":
            piece = (_text(rng, rng.randint(0, min(60, left)), 0.0) + "\n").encode()
        elif kind == "utf8":
            piece = (_text(rng, rng.randint(0, max(1, min(40, left // 2))), 0.4) + "\n").encode()
        elif kind == "multibyte":
            piece = _text(rng, rng.randint(1, max(1, min(30, left // 3))), 1.0).encode()
            if rng.random() < 0.5:
                piece += b"\n"
        elif kind == "binary":
            piece = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, min(64, left))))
        elif kind == "crlf":
            piece = (_text(rng, rng.randint(0, min(20, left)), 0.2) + "\r\n").encode()
        else:  # one long line, no newline of its own
            piece = _text(rng, max(1, left // 2), 0.3).encode()
        parts.append(piece)
        total += len(piece)
    data = b"".join(parts)
    if data.endswith(b"\n") and rng.random() < 0.5:
        data = data[:-1]  # no newline at the very end
    return data


def gen_case(index, seed):
    """Case ``index`` of the property test: output, write plan and --max-bytes range."""
    rng = random.Random(seed)
    # Every shape comes up on stdout (rotation) and at random on stderr.
    shapes = (SHAPES[index % len(SHAPES)], rng.choice(SHAPES))
    hi = max(1, min(5000, int(math.exp(rng.uniform(0, math.log(5000))))))
    if "long_line" in shapes:
        hi = max(hi, rng.randint(1000, 5000))  # a long line, in a bounded number of reads
    lo = max(1, hi // 3)
    out = gen_stream(rng, shapes[0], rng.randint(1, 6 * hi))
    err = gen_stream(rng, shapes[1], rng.randint(1, 6 * hi))
    # Random write sizes (splitting characters on purpose), interleaved; a
    # few pauses, most of a second in all, so that reads race the writer.
    steps = []
    offs = {1: 0, 2: 0}
    sizes = {1: len(out), 2: len(err)}
    while offs[1] < sizes[1] or offs[2] < sizes[2]:
        fd = rng.choice([fd for fd in (1, 2) if offs[fd] < sizes[fd]])
        left = sizes[fd] - offs[fd]
        n = rng.randint(1, max(1, min(left, max(1, sizes[fd] // 4))))
        steps.append([fd, n, 0.0])
        offs[fd] += n
    if steps:
        for i in rng.sample(range(len(steps)), min(len(steps), 6)):
            steps[i][2] = round(rng.uniform(0.08, 0.25), 3)
    return {"seed": seed, "lo": lo, "hi": hi, "out": out, "err": err, "steps": steps}


class ExactBytesPropertyTests(JobsTestCase):
    """Reading cursor by cursor, with any --max-bytes, gives back the logs exactly."""

    def _run_case(self, case):
        rng = random.Random(case["seed"] * 7 + 1)
        plan = os.path.join(self.tmp, "plan-%d.json" % case["seed"])
        with open(plan, "w") as f:
            json.dump(
                {"out": case["out"].hex(), "err": case["err"].hex(), "steps": case["steps"]}, f
            )
        r = self.ok("run", "--snapshot-after", "0", "--", PY, "-c", PLAN_WORKLOAD, plan)
        job = r["job_id"]
        cursor = r["cursor"]
        chunks = {"stdout": [], "stderr": []}  # (start, end, text)
        reads = running_reads = 0
        stalled = False
        validated = False
        while True:
            max_bytes = rng.randint(case["lo"], case["hi"])
            args = ["read", "--max-bytes", str(max_bytes), "--cursor", cursor]
            if stalled or rng.random() < 0.2:
                args += ["--wait-ms", "300"]
            j = self.ok(*(args + [job]))
            if not validated:
                self.assert_schema(j, "read")
                validated = True
            reads += 1
            if j["state"] == "running":
                running_reads += 1
            before, after = cursor_pos(cursor), cursor_pos(j["cursor"])
            for i, stream in enumerate(("stdout", "stderr")):
                self.assertGreaterEqual(after[i], before[i], j)
                # At most max_bytes, unless a single character is wider.
                self.assertLessEqual(after[i] - before[i], max(max_bytes, 4), (max_bytes, j))
                chunks[stream].append((before[i], after[i], j[stream], max_bytes))
            if j["state"] in TERMINAL and not j["more"]:
                self.assertIs(j["eof"], True, j)
            if j["eof"]:
                self.assertIs(j["more"], False, j)
                break
            progressed = after != before
            if j["state"] in TERMINAL:
                self.assertTrue(progressed, "a terminal job's read made no progress: %r" % j)
            stalled = not progressed
            cursor = j["cursor"]
            self.assertLess(reads, 1000, "read never reached eof")
        # One read past the end: nothing, and still eof.
        end = self.ok("read", "--cursor", j["cursor"], job)
        self.assertEqual((end["stdout"], end["stderr"], end["eof"]), ("", "", True))
        self.assertEqual(end["cursor"], j["cursor"])
        for stream, expected in (("stdout", case["out"]), ("stderr", case["err"])):
            log = self.log(job, stream)
            self.assertEqual(log, expected, "%s.log is not what the workload wrote" % stream)
            pieces = chunks[stream]
            self.assertEqual(pieces[-1][1], len(log), "the last cursor is not at the end")
            valid = is_utf8(log)
            for start, stop, text, max_bytes in pieces:
                where = "%s[%d:%d] (--max-bytes %d)" % (stream, start, stop, max_bytes)
                self.assertEqual(text, log[start:stop].decode("utf-8", "replace"), where)
                if splits_a_character(log, stop):
                    self.fail(
                        "a read split a character at %s: bytes %r | %r"
                        % (where, log[max(0, stop - 6) : stop], log[stop : stop + 6])
                    )
                if valid:
                    self.assertNotIn(REPLACEMENT, text, where)
            self.assertEqual(
                "".join(p[2] for p in pieces),
                log.decode("utf-8", "replace"),
                "the reads of %s do not add up to the log" % stream,
            )
        return reads, running_reads

    def test_reads_add_up_to_the_logs_exactly(self):
        cases = [gen_case(i, seed) for i, seed in enumerate(SEEDS)]
        # Four cases at a time: most of the cost is interpreter start-up and pauses.
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            futures = [(c, pool.submit(self._run_case, c)) for c in cases]
            total_running = 0
            for case, fut in futures:
                with self.subTest(seed=case["seed"], hi=case["hi"]):
                    _reads, running = fut.result(timeout=300)
                    total_running += running
        # Some of the reads must have raced the writer.
        self.assertGreater(total_running, 0)

    def test_generator_covers_the_shapes(self):
        # The property test is only as good as its inputs.
        cases = [gen_case(i, seed) for i, seed in enumerate(SEEDS)]
        blobs = [c["out"] for c in cases] + [c["err"] for c in cases]
        self.assertTrue(any(not is_utf8(b) for b in blobs), "no invalid UTF-8")
        self.assertTrue(any(re.search(rb"[\xf0-\xf4]", b) for b in blobs), "no 4-byte chars")
        self.assertTrue(any(b and not b.endswith(b"\n") for b in blobs), "no missing newline")
        self.assertTrue(any(b"\n" not in b and len(b) > 1000 for b in blobs), "no long line")
        self.assertTrue(any(c["hi"] < 8 for c in cases), "no tiny --max-bytes")
        self.assertTrue(any(c["hi"] > 1000 for c in cases), "no large --max-bytes")


if __name__ == "__main__":
    unittest.main()
