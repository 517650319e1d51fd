"""The terminal screen: the emulator (`_Screen`), --plain (`_plain_text`), `screen`.

In-process tests feed hand-written sequences to the emulator; others run
real terminal programs (less, a curses program, top) on a pseudo-terminal
of their own and compare what the emulator makes of their output with what
they are known to draw; subprocess tests drive `screen` and `--plain`.
"""

import json
import os
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import unittest
import unicodedata

from tests._jobs import JobsTestCase, cursor_pos, write_json_atomic
from tests._procs import curses_box_rows
from tests._util import PY, REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)
import agent_exec  # noqa: E402

Screen = agent_exec._Screen
plain = agent_exec._plain_text


def fed(data, cols=10, rows=4, newline_mode=False, **kw):
    scr = Screen(cols, rows, newline_mode)
    scr.feed(data.encode("utf-8") if isinstance(data, str) else data)
    return scr


def fed_bytewise(data, cols=10, rows=4, newline_mode=False):
    scr = Screen(cols, rows, newline_mode)
    for i in range(len(data)):
        scr.feed(data[i : i + 1])
    return scr


class PrintingTests(unittest.TestCase):
    def test_text_crlf_and_trailing_spaces_trimmed(self):
        s = fed("ab  \r\ncd")
        self.assertEqual(s.lines, ["ab", "cd", "", ""])
        self.assertEqual(s.cursor, {"row": 1, "col": 2})

    def test_lf_keeps_the_column_unless_newline_mode(self):
        self.assertEqual(fed("ab\ncd").lines[:2], ["ab", "  cd"])
        self.assertEqual(fed("ab\ncd", newline_mode=True).lines[:2], ["ab", "cd"])

    def test_deferred_wrap_at_the_last_column(self):
        s = fed("abcdefghij")  # exactly one row of 10
        self.assertEqual(s.cursor, {"row": 0, "col": 9})
        self.assertTrue(s.wrap_next)
        s.feed(b"\r\n")  # CR cancels the pending wrap: no empty row between
        s.feed(b"k")
        self.assertEqual(s.lines[:3], ["abcdefghij", "k", ""])
        s = fed("abcdefghijk")
        self.assertEqual(s.lines[:2], ["abcdefghij", "k"])

    def test_autowrap_off_overwrites_the_last_column(self):
        s = fed("\x1b[?7labcdefghijXYZ")
        self.assertEqual(s.lines[:2], ["abcdefghiZ", ""])
        s.feed(b"\x1b[?7h\rabcdefghij")
        s.feed(b"12")
        self.assertEqual(s.lines[:2], ["abcdefghij", "12"])

    def test_scrolling_at_the_bottom(self):
        s = fed("1\r\n2\r\n3\r\n4\r\n5", rows=4)
        self.assertEqual(s.lines, ["2", "3", "4", "5"])

    def test_cr_bs_tab(self):
        s = fed("abcdef\rX\bY\tZ")
        self.assertEqual(s.lines[0], "Ybcdef  Z")
        self.assertEqual(fed("a\tb\tc", cols=20).lines[0], "a       b       c")
        self.assertEqual(fed("a\t\t\tb", cols=20).cursor["col"], 19)  # stops at the margin

    def test_tab_stops_set_and_cleared(self):
        s = fed("\x1b[3g\x1b[4G\x1bH\r\tx", cols=20)  # clear all, set one at column 3
        self.assertEqual(s.lines[0], "   x")
        s = fed("\x1b[9G\x1b[g\r\tx", cols=20)  # clear the stop at column 8
        self.assertEqual(s.lines[0], " " * 16 + "x")
        self.assertEqual(fed("\x1b[2I!\x1b[2Z?", cols=20).lines[0], " " * 8 + "?" + " " * 7 + "!")

    def test_utf8_split_across_feeds_and_wide_characters(self):
        data = "a\u4e2d\u00e9b\n".encode("utf-8")
        s = fed_bytewise(data)
        self.assertEqual(s.lines[0], "a\u4e2d\u00e9b")
        self.assertEqual(s.cursor, {"row": 1, "col": 5})  # a + 2 cells + e + b
        self.assertEqual(s.grid[0][1:3], ["\u4e2d", ""])

    def test_wide_character_that_does_not_fit_wraps(self):
        s = fed("abcdefghi\u4e2d")
        self.assertEqual(s.lines[:2], ["abcdefghi", "\u4e2d"])

    def test_overwriting_half_a_wide_character_blanks_the_other_half(self):
        s = fed("\u4e2d\u6587\rx")
        self.assertEqual(s.lines[0], "x \u6587")
        s = fed("\u4e2d\u6587\x1b[2Gy")
        self.assertEqual(s.lines[0], " y\u6587")

    def test_combining_marks_attach_to_the_previous_cell(self):
        s = fed("e\u0301x")
        self.assertEqual(s.lines[0], "e\u0301x")
        self.assertEqual(s.cursor["col"], 2)
        self.assertEqual(fed("a\u200db").lines[0], "ab")  # Cf: dropped

    def test_invalid_utf8_shows_a_replacement_character(self):
        self.assertEqual(fed(b"a\xffb").lines[0], "a\ufffdb")

    def test_c1_and_del_show_nothing(self):
        self.assertEqual(fed("a\x7f\u009bb\x07\x00c").lines[0], "abc")

    def test_rep_repeats_the_last_character(self):
        self.assertEqual(fed("x\x1b[3b").lines[0], "xxxx")

    def test_the_fast_path_characters_are_one_cell_each(self):
        _whole, _partial, narrow = agent_exec._escape_regexes()
        ranges = narrow.pattern.strip("[]+")
        i = 0
        checked = 0
        while i < len(ranges):
            lo = ranges[i]
            hi = ranges[i + 2] if i + 1 < len(ranges) and ranges[i + 1] == "-" else lo
            i += 3 if hi is not lo else 1
            for o in range(ord(lo), ord(hi) + 1):
                ch = chr(o)
                if unicodedata.category(ch) == "Cn":
                    continue  # unassigned: whatever it is, it will not be combining
                checked += 1
                self.assertEqual(agent_exec._char_width(ch), 1, hex(o))
        self.assertGreater(checked, 1000)


class CursorTests(unittest.TestCase):
    def test_cup_hvp_and_relative_moves(self):
        s = fed("\x1b[3;4Hx\x1b[1;1fy\x1b[2Bz\x1b[3Cw\x1b[2Dv\x1b[Au", rows=5)
        self.assertEqual(s.lines[:4], ["y", "     u", " z xvw", ""])

    def test_moves_stop_at_the_edges(self):
        s = fed("\x1b[99;99H")
        self.assertEqual(s.cursor, {"row": 3, "col": 9})
        s.feed(b"\x1b[99A\x1b[99D")
        self.assertEqual(s.cursor, {"row": 0, "col": 0})
        s.feed(b"\x1b[0;0H")
        self.assertEqual(s.cursor, {"row": 0, "col": 0})

    def test_cha_vpa_cnl_cpl_hpa_vpr_hpr(self):
        s = fed("abc\x1b[6Gd\x1b[3de\x1b[2Ef\x1b[Fg")
        self.assertEqual(s.cursor, {"row": 2, "col": 1})
        self.assertEqual(s.lines, ["abc  d", "", "g     e", "f"])
        s = fed("\x1b[2`a\x1b[e\x1b[2ab")
        self.assertEqual(s.lines[:2], [" a", "    b"])

    def test_save_and_restore_cursor(self):
        s = fed("ab\x1b7\x1b[3;3Hx\x1b8y")
        self.assertEqual(s.lines[0], "aby")
        s = fed("ab\x1b[s\x1b[3;3Hx\x1b[uy")
        self.assertEqual(s.lines[0], "aby")
        self.assertEqual(fed("\x1b[3;3H\x1b8z").lines[0], "z")  # nothing saved: home

    def test_origin_mode_counts_from_the_top_margin(self):
        s = fed("\x1b[2;3r\x1b[?6h\x1b[1;1Hx\x1b[9;1Hy", rows=4)
        self.assertEqual(s.lines, ["", "x", "y", ""])


class EraseTests(unittest.TestCase):
    def setUp(self):
        self.fill = "0123456789" * 4  # 4 full rows of 10

    def test_erase_in_line(self):
        self.assertEqual(fed(self.fill + "\x1b[2;5H\x1b[K").lines[1], "0123")
        self.assertEqual(fed(self.fill + "\x1b[2;5H\x1b[0K").lines[1], "0123")
        self.assertEqual(fed(self.fill + "\x1b[2;5H\x1b[1K").lines[1], "     56789")
        self.assertEqual(fed(self.fill + "\x1b[2;5H\x1b[2K").lines[1], "")

    def test_erase_in_display(self):
        self.assertEqual(fed(self.fill + "\x1b[2;5H\x1b[J").lines, ["0123456789", "0123", "", ""])
        self.assertEqual(
            fed(self.fill + "\x1b[2;5H\x1b[1J").lines,
            ["", "     56789", "0123456789"] * 1 + ["0123456789"],
        )
        s = fed(self.fill + "\x1b[2;5H\x1b[2J")
        self.assertEqual(s.lines, [""] * 4)
        self.assertEqual(s.cursor, {"row": 1, "col": 4})  # 2J does not move the cursor
        # 3J erases the scrollback (none is kept): the screen stays.
        self.assertEqual(fed(self.fill + "\x1b[3J").lines, ["0123456789"] * 4)

    def test_erase_insert_delete_characters(self):
        self.assertEqual(fed("0123456789\x1b[3G\x1b[2X").lines[0], "01  456789")
        self.assertEqual(fed("0123456789\x1b[3G\x1b[2P").lines[0], "01456789")
        self.assertEqual(fed("0123456789\x1b[3G\x1b[2@").lines[0], "01  234567")
        self.assertEqual(fed("abc\x1b[1G\x1b[4hXY\x1b[4lZ").lines[0], "XYZbc")  # IRM

    def test_decaln(self):
        self.assertEqual(fed("\x1b#8", cols=3, rows=2).lines, ["EEE", "EEE"])


class ScrollTests(unittest.TestCase):
    def test_scroll_region_index_and_reverse_index(self):
        s = fed("a\r\nb\r\nc\r\nd\x1b[2;3r", rows=4)
        self.assertEqual(s.cursor, {"row": 0, "col": 0})  # DECSTBM homes the cursor
        s.feed(b"\x1b[3;1H\n")  # LF at the bottom margin scrolls the region only
        self.assertEqual(s.lines, ["a", "c", "", "d"])
        s.feed(b"\x1b[2;1H\x1bM")  # RI at the top margin
        self.assertEqual(s.lines, ["a", "", "c", "d"])
        s.feed(b"\x1b[3;1Hx\x1bD")  # IND
        self.assertEqual(s.lines, ["a", "x", "", "d"])
        s.feed(b"\x1b[2;5Hy\x1bE")  # NEL: CR too
        self.assertEqual(s.cursor, {"row": 2, "col": 0})

    def test_insert_and_delete_lines_within_the_region(self):
        base = "1\r\n2\r\n3\r\n4"
        s = fed(base + "\x1b[2;1H\x1b[L", rows=4)
        self.assertEqual(s.lines, ["1", "", "2", "3"])
        s = fed(base + "\x1b[2;1H\x1b[2M", rows=4)
        self.assertEqual(s.lines, ["1", "4", "", ""])
        s = fed(base + "\x1b[1;3r\x1b[2;1H\x1b[L", rows=4)
        self.assertEqual(s.lines, ["1", "", "2", "4"])
        s = fed(base + "\x1b[2;3r\x1b[4;1H\x1b[L", rows=4)  # outside the region: nothing
        self.assertEqual(s.lines, ["1", "2", "3", "4"])

    def test_scroll_up_and_down(self):
        base = "1\r\n2\r\n3\r\n4"
        self.assertEqual(fed(base + "\x1b[S", rows=4).lines, ["2", "3", "4", ""])
        self.assertEqual(fed(base + "\x1b[2T", rows=4).lines, ["", "", "1", "2"])
        self.assertEqual(fed(base + "\x1b[2;3r\x1b[S", rows=4).lines, ["1", "3", "", "4"])

    def test_reverse_index_at_the_top_scrolls_down(self):
        self.assertEqual(fed("1\r\n2\x1b[H\x1bM0", rows=3).lines, ["0", "1", "2"])


class AlternateScreenTests(unittest.TestCase):
    def test_1049_saves_the_cursor_and_restores_the_main_screen(self):
        s = fed("main\r\nprompt$ ")
        s.feed(b"\x1b[?1049h")
        self.assertTrue(s.alt_screen)
        self.assertEqual(s.lines, [""] * 4)
        s.feed(b"\x1b[Hfull screen app\x1b[3;3H")
        self.assertEqual(s.lines[0], "full scree")
        s.feed(b"\x1b[?1049l")
        self.assertFalse(s.alt_screen)
        self.assertEqual(s.lines[:2], ["main", "prompt$"])
        self.assertEqual(s.cursor, {"row": 1, "col": 8})

    def test_47_and_1047(self):
        s = fed("main\x1b[?47halt")
        self.assertEqual(s.lines[0], "    alt")
        s.feed(b"\x1b[?47l")
        self.assertEqual(s.lines[0], "main")
        s = fed("main\x1b[?1047halt\x1b[?1047l")
        self.assertEqual(s.lines[0], "main")
        self.assertFalse(s.alt_screen)

    def test_ris_resets_everything_but_the_title(self):
        s = fed("\x1b]2;t\x07abc\x1b[2;3r\x1b[?1049h\x1b[?7lxyz\x1bc")
        self.assertEqual((s.lines, s.cursor, s.alt_screen), ([""] * 4, {"row": 0, "col": 0}, False))
        self.assertTrue(s.autowrap)
        self.assertEqual((s.top, s.bottom), (0, 3))
        self.assertEqual(s.title, "t")


class DroppedSequenceTests(unittest.TestCase):
    def test_sgr_osc_dcs_apc_and_charsets_leave_no_trace(self):
        data = (
            "\x1b[1;31;48;5;200;38:2:1:2:3mR\x1b[0m"
            "\x1b]8;;http://x\x1b\\L\x1b]8;;\x1b\\"
            "\x1bP1$r0m\x1b\\\x1b_apc\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\"
            "\x1b(B\x1b)0\x1b=\x1b>\x1b[?25l\x1b[?1h\x1b[>4;1m\x1b[2 q\x1b[6n\x1b[c!"
        )
        s = fed(data, cols=20)
        self.assertEqual(s.lines[0], "RL!")
        self.assertEqual(s.cursor, {"row": 0, "col": 3})
        self.assertIsNone(s.title)

    def test_title_osc_0_and_2_with_bel_or_st(self):
        self.assertEqual(fed("\x1b]0;one\x07").title, "one")
        self.assertEqual(fed("\x1b]2;two\x1b\\").title, "two")
        self.assertIsNone(fed("\x1b]1;icon\x07").title)

    def test_every_cut_gives_the_same_screen(self):
        data = (
            "\x1b]0;t\u00eftle\x07\x1b[1;32mgr\u00fcn\x1b[0m \u4e2d\x1b[2;3Hx"
            "\x1bP+q\x1b\\\x1b(0lqk\x1b(B\x1b[?1049h\x1b[Halt\u00e9"
        ).encode("utf-8")
        want = fed(data, cols=12)
        for cut in range(1, len(data)):
            s = Screen(12, 4)
            s.feed(data[:cut])
            s.feed(data[cut:])
            self.assertEqual((s.lines, s.cursor, s.title), (want.lines, want.cursor, want.title))
        one = fed_bytewise(data, cols=12)
        self.assertEqual((one.lines, one.cursor, one.title), (want.lines, want.cursor, want.title))
        self.assertEqual(want.lines[0], "alt\u00e9")
        self.assertTrue(want.alt_screen)

    def test_dec_line_drawing(self):
        s = fed("\x1b(0lqk\r\nx x\r\nmqj\x1b(Bq")
        self.assertEqual(
            s.lines[:3], ["\u250c\u2500\u2510", "\u2502 \u2502", "\u2514\u2500\u2518q"]
        )
        s = fed("\x1b)0a\x0eq\x0fq")  # SO/SI select G1/G0
        self.assertEqual(s.lines[0], "a\u2500q")

    def test_a_broken_sequence_drops_its_esc_only(self):
        self.assertEqual(fed("a\x1b[\x01b").lines[0], "a[b")

    def test_an_endless_string_is_dropped(self):
        s = fed("\x1b]0;" + "x" * (agent_exec._SCREEN_STRING_MAX + 10))
        self.assertEqual(s._pending, "")
        s.feed(b"\r\nok")
        self.assertEqual(s.lines[1][-2:], "ok")


class ResizeAndStateTests(unittest.TestCase):
    def test_resize_keeps_the_cursor_row(self):
        s = fed("1\r\n2\r\n3\r\n4", rows=4)
        s.resize(5, 2)
        self.assertEqual((s.lines, s.cursor), (["3", "4"], {"row": 1, "col": 1}))
        s.resize(12, 3)
        self.assertEqual(s.lines, ["3", "4", ""])
        s.feed(b"\x1b[3;12Hz")
        self.assertEqual(s.lines[2], " " * 11 + "z")

    def test_state_round_trip(self):
        prefix = "a\u4e2d\x1b[2;3r\x1b7\x1b[?1049h\x1b(0q\x1b]2;T\x07".encode("utf-8")
        # Cut inside an escape sequence, then inside a UTF-8 character.
        for cut, rest in ((b"\x1b[1", b";1Hb\x1b[?1049l"), (b"\xc3", b"\xa4\x1b[?1049lz")):
            s = fed(prefix + cut, cols=8)
            t = Screen.from_state(json.loads(json.dumps(s.state())))
            for scr in (s, t):
                scr.feed(rest)
            self.assertEqual((s.lines, s.cursor, s.title), (t.lines, t.cursor, t.title))
            self.assertFalse(t.alt_screen)
        self.assertEqual(t.lines[0], "z\u4e2d")  # DECSTBM homed the cursor before DECSC
        with self.assertRaises((ValueError, KeyError, TypeError)):
            Screen.from_state(dict(s.state(), grid=[["x"]]))


class RobustnessTests(unittest.TestCase):
    def test_random_input_never_raises_and_the_cursor_stays_on_the_screen(self):
        import random

        rng = random.Random(11)
        pieces = [
            b"\x1b[", b"\x1b]", b"\x1bP", b"\x1b(", b"\x1b", b";", b"?", b"1049", b"h", b"l",
            b"r", b"H", b"J", b"K", b"L", b"M", b"@", b"P", b"X", b"S", b"T", b"m", b"b", b"9" * 7,
            b"\r", b"\n", b"\b", b"\t", b"\x07", b"\x0e", b"\x0f", b"ab", b"\xe4\xb8\xad",
            b"\xcc\x81", b"\xff", b"\xc3", b"\x1bc", b"\x1b7", b"\x1b8", b"\x1bM", b"\x1b#8",
        ]  # fmt: skip
        for trial in range(30):
            scr = Screen(rng.randint(1, 12), rng.randint(1, 6))
            for _ in range(400):
                scr.feed(b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
                self.assertTrue(0 <= scr.y < scr.rows and 0 <= scr.x < scr.cols, trial)
                self.assertEqual(len(scr.grid), scr.rows)
                self.assertTrue(all(len(r) == scr.cols for r in scr.grid), trial)
                if rng.random() < 0.01:
                    scr.resize(rng.randint(1, 12), rng.randint(1, 6))
            json.dumps(scr.state())
            self.assertEqual(len(scr.lines), scr.rows)

    def test_huge_parameters_cost_nothing(self):
        scr = Screen(80, 24)
        t0 = time.monotonic()
        scr.feed(b"\x1b[" + b"9" * 6000 + b"A\x1b[999999999999I\x1b[99999999Z\x1b[999999999b")
        scr.feed(b"\x1b[99999999@\x1b[9999999L\x1b[9999999S\x1b[99999;99999r ok")
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertIn(" ok", scr.lines[23])


class PlainTextTests(unittest.TestCase):
    def test_escapes_go(self):
        self.assertEqual(plain("\x1b[1;31merror\x1b[0m: x\n"), "error: x\n")
        self.assertEqual(plain("\x1b]0;title\x07a\x1b]8;;u\x1b\\b\x1b(Bc\x1b=d"), "abcd")
        self.assertEqual(plain("\x1bP1$r\x1b\\e"), "e")

    def test_plain_text_is_returned_as_is(self):
        text = "a\tb\n\u4e2d\n"
        self.assertIs(plain(text), text)

    def test_a_cut_sequence_at_the_end_goes(self):
        self.assertEqual(plain("ok\x1b[1;3"), "ok")
        self.assertEqual(plain("ok\x1b]0;tit"), "ok")
        self.assertEqual(plain("ok\x1b"), "ok")

    def test_a_cr_redrawn_line_is_reduced_to_its_last_version(self):
        self.assertEqual(plain("10%\r20%\r100%\n"), "100%\n")
        self.assertEqual(plain("downloading\rdone\n"), "done\n")  # shorter: still the last
        self.assertEqual(plain("\x1b[32mgreen\x1b[0m 10%\r 99%\n"), " 99%\n")
        self.assertEqual(plain("abc\rX"), "X")
        self.assertEqual(plain("old\r\x1b[K"), "")  # the last version erased the line
        self.assertEqual(plain("downloading\rdone\x1b[K\n"), "done\n")
        self.assertEqual(plain("downloading\r\x1b[2Kdone\n"), "done\n")
        self.assertEqual(plain("abcdef\x1b[1K\n"), "\n")
        self.assertEqual(plain("line\r\nnext\r\n"), "line\nnext\n")
        self.assertEqual(plain("50%\r"), "50%")

    def test_backspace_and_controls(self):
        self.assertEqual(plain("abc\b\bX\n"), "aXc\n")
        self.assertEqual(plain("a\x07b\x00c\x01\x02\x03d"), "abcd")


# ---- real programs on a pseudo-terminal ------------------------------------------


def _spawn_on_pty(argv, cols, rows, env=None):
    """(pid, master fd) of ``argv`` on a new pseudo-terminal of cols x rows."""
    import fcntl
    import pty
    import termios

    environ = dict(os.environ, TERM="xterm-256color", LESSHISTFILE="-", LANG="C.UTF-8")
    for key in ("LESS", "LESSOPEN", "LESSCLOSE", "LC_ALL", "PAGER"):
        environ.pop(key, None)
    environ.update(env or {})
    pid, fd = pty.fork()
    if pid == 0:  # the child: set the size, then become the program
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execvpe(argv[0], argv, environ)
        finally:
            os._exit(127)
    return pid, fd


class RealProgramTests(unittest.TestCase):
    """Programs that draw with terminfo, compared with what they are known to draw."""

    def run_on_pty(self, argv, cols=80, rows=24, env=None):
        pid, fd = _spawn_on_pty(argv, cols, rows, env)
        self.addCleanup(self._end, pid, fd)
        self.raw = b""
        return fd, Screen(cols, rows)

    def _end(self, pid, fd):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
        os.close(fd)

    def pump(self, fd, scr, done, timeout=10.0):
        """Feed the program's output until ``done(scr)`` holds in a quiet moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                if done(scr):
                    return True
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the program has ended
                break
            if not data:
                break
            self.raw += data
            scr.feed(data)
        return done(scr)

    @unittest.skipUnless(shutil.which("less"), "no less")
    def test_less_first_screenful_then_pgdn(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "lines.txt")
        with open(path, "w") as f:
            f.write("".join("line %d\n" % i for i in range(1, 201)))
        fd, scr = self.run_on_pty(["less", path])
        self.assertTrue(self.pump(fd, scr, lambda s: s.lines[22] == "line 23"), scr.lines)
        self.assertEqual(scr.lines[:23], ["line %d" % i for i in range(1, 24)])
        self.assertIn("lines.txt", scr.lines[23])  # less's prompt names the file
        self.assertTrue(scr.alt_screen)
        self.assertEqual(scr.cursor["row"], 23)
        os.write(fd, b"\x1b[6~")  # pgdn
        self.assertTrue(self.pump(fd, scr, lambda s: s.lines[0] == "line 24"), scr.lines)
        self.assertEqual(scr.lines[:23], ["line %d" % i for i in range(24, 47)])
        os.write(fd, b" ")
        self.assertTrue(self.pump(fd, scr, lambda s: s.lines[0] == "line 47"), scr.lines)
        os.write(fd, b"q")
        self.pump(fd, scr, lambda s: not s.alt_screen)
        self.assertFalse(scr.alt_screen)
        # Fed in one piece, or one byte at a time, the capture gives the same screen.
        self.assertEqual(fed_bytewise(self.raw, 80, 24).lines, scr.lines)

    def test_curses_box_and_text_at_known_cells(self):
        program = (
            "import curses\n"
            "def main(w):\n"
            "    w.addstr(0, 0, 'curses test')\n"
            "    win = curses.newwin(5, 20, 2, 10)\n"
            "    win.box()\n"
            "    win.addstr(2, 3, 'hello curses')\n"
            "    w.addstr(10, 5, 'wide: \\u4e2d\\u6587!')\n"
            "    w.addstr(12, 0, 'x' * 79)\n"
            "    w.addstr(23, 70, 'corner')\n"
            "    w.refresh()\n"
            "    win.refresh()\n"
            "    w.move(20, 7)\n"
            "    w.refresh()\n"
            "    w.getch()\n"
            "curses.wrapper(main)\n"
        )
        fd, scr = self.run_on_pty([PY, "-c", program])
        ok = self.pump(
            fd, scr, lambda s: s.cursor == {"row": 20, "col": 7} and "hello" in s.lines[4]
        )
        self.assertTrue(ok, (scr.lines, scr.cursor, self.raw[-300:]))
        want = curses_box_rows()
        want[10] = "     wide: \u4e2d\u6587!"
        want[12] = "x" * 79
        self.assertEqual(scr.lines, want)
        self.assertTrue(scr.alt_screen)
        self.assertEqual(scr.grid[10][11:15], ["\u4e2d", "", "\u6587", ""])
        os.write(fd, b"q")  # curses ends: the main screen comes back
        self.pump(fd, scr, lambda s: not s.alt_screen)
        self.assertFalse(scr.alt_screen)

    @unittest.skipUnless(shutil.which("top"), "no top")
    def test_top_batch_header(self):
        fd, scr = self.run_on_pty(["top", "-b", "-n", "1", "-p", str(os.getpid())], cols=120)
        self.pump(fd, scr, lambda s: False, timeout=3.0)
        self.assertRegex(scr.lines[0], r"^top - \d\d:\d\d:\d\d up .*load average")
        self.assertRegex(scr.lines[1], r"^(Tasks|Threads): ")
        self.assertTrue(scr.lines[2].startswith("%Cpu"), scr.lines)
        self.assertRegex("\n".join(scr.lines), r"\n +PID +USER .*COMMAND")
        self.assertIn(str(os.getpid()), "\n".join(scr.lines))


# ---- the cold start and the checkpoint ----------------------------------------------


class RestartPointTests(unittest.TestCase):
    def restart(self, data, rows=24, pty=True):
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        os.write(fd, data)
        try:
            return agent_exec._screen_restart(fd, len(data), rows, pty)
        finally:
            os.close(fd)

    def test_rules(self):
        clear = b"\x1b[H\x1b[2J"
        self.assertEqual(self.restart(b"abc"), (0, False))  # short: from the start
        self.assertEqual(self.restart(b"a" + clear + b"b"), (1, False))
        self.assertEqual(self.restart(b"a\x1b[2J\x1b[1;1Hb"), (1, False))
        self.assertEqual(self.restart(b"a" + clear + b"b\x1bcc"), (7 + 2, False))
        # In the alternate screen when it cleared: say so.
        self.assertEqual(self.restart(b"a\x1b[?1047hx" + clear + b"b"), (10, True))
        self.assertEqual(self.restart(b"a\x1b[?1049hx"), (1, False))
        # A switch back to the main screen after the clear: its content matters.
        self.assertEqual(self.restart(b"a\x1b[?1049h" + clear + b"b\x1b[?1049l"), (0, False))
        self.assertEqual(
            self.restart(b"\x1bc" + b"a\x1b[?1049h" + clear + b"\x1b[?1049l"), (0, False)
        )
        # A clear before a full-screen program that has exited counts.
        data = b"x" + clear + b"main\r\n\x1b[?1049h" + clear + b"alt\x1b[?1049lafter"
        self.assertEqual(self.restart(data), (1, False))
        whole, part = Screen(80, 24), Screen(80, 24)
        whole.feed(data)
        part.feed(data[1:])
        self.assertEqual((part.lines, part.cursor), (whole.lines, whole.cursor))
        self.assertEqual(whole.lines[:2], ["main", "after"])

    def test_the_screen_switch_before_a_clear_is_found_blocks_back(self):
        from unittest import mock

        filler = b"\x1b[1mtext\x1b[0m\r\n" * 40
        clear = b"\x1b[2J\x1b[H"
        with mock.patch.object(agent_exec, "_SCREEN_BLOCK", 64):
            data = b"\x1b[?1049h" + filler + clear + b"x"
            self.assertEqual(self.restart(data), (8 + len(filler), True))
            data = b"\x1b[?1049h\x1b[?1049l" + filler + clear + b"x"
            self.assertEqual(self.restart(data), (16 + len(filler), False))
            data = b"\x1b[?47h\x1bc" + filler + clear + b"x"
            self.assertEqual(self.restart(data), (8 + len(filler), False))
            data = filler + clear + filler
            self.assertEqual(self.restart(data), (len(filler), False))

    def test_a_log_without_escapes_starts_at_its_last_lines(self):
        data = b"".join(b"line %d\n" % i for i in range(1000))
        at, alt = self.restart(data, rows=24, pty=False)
        self.assertEqual(data[at:].count(b"\n"), 24)  # and the cursor's row: 25
        self.assertEqual(self.restart(data, rows=24, pty=True), (0, False))  # bare LF on a PTY
        crlf = data.replace(b"\n", b"\r\n")
        at, _ = self.restart(crlf, rows=24, pty=True)
        self.assertEqual(crlf[at:].count(b"\n"), 24)

    def test_a_coloured_log_starts_at_its_last_lines_too(self):
        from unittest import mock

        lines = b"".join(
            b"\x1b[1;32mok\x1b[0m line %d\x1b[K\x1b]0;t%d\x07\r\n" % (i, i) for i in range(3000)
        )
        with mock.patch.object(agent_exec, "_SCREEN_BLOCK", 4096):  # several blocks
            at, _ = self.restart(lines)
            self.assertEqual(lines[at:].count(b"\n"), 24)
            whole, part = Screen(80, 24), Screen(80, 24)
            whole.feed(lines)
            part.feed(lines[at:])
            self.assertEqual((part.lines, part.cursor), (whole.lines, whole.cursor))
            # A mode set long before, or a cursor movement among the last lines: from 0.
            self.assertEqual(self.restart(b"\x1b[?7l" + lines), (0, False))
            self.assertEqual(self.restart(b"\x1b[2;20r" + lines), (0, False))
            self.assertEqual(self.restart(b"\x1b(0" + lines), (0, False))
            self.assertEqual(self.restart(lines + b"\x1b[5Aup\r\n"), (0, False))
            self.assertEqual(self.restart(lines + b"\x0eso\r\n"), (0, False))
            # A cursor movement long before is harmless: the last lines scroll over it.
            at, _ = self.restart(b"\x1b[5;5Hx" + lines)
            self.assertGreater(at, 0)

    def test_a_cold_start_shows_what_a_full_feed_shows(self):
        chunks = []
        for i in range(300):
            chunks.append(b"\x1b[H\x1b[2J" if i % 50 == 0 else b"")
            chunks.append(b"row %d \x1b[1mbold\x1b[0m\r\n" % i)
        data = b"".join(chunks)
        at, alt = self.restart(data)
        self.assertGreater(at, len(data) // 2)
        whole = Screen(80, 24)
        whole.feed(data)
        part = Screen(80, 24)
        part.feed(data[at:])
        self.assertEqual((part.lines, part.cursor), (whole.lines, whole.cursor))


class _FakeJob:
    """What _job_screen reads of a job: its directory, meta.json, state.json."""

    def __init__(self, path, meta=None):
        self.dir = path
        self.meta = meta or {}
        self.record = {}

    def path(self, name):
        return os.path.join(self.dir, name)


class CheckpointTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.job = _FakeJob(self.dir, {"pty": True})

    def append(self, data):
        with open(self.job.path("stdout.log"), "ab") as f:
            f.write(data)

    def check(self, spy=None):
        """The screen from the checkpoint, and as a feed of the whole log shows it.

        ``spy`` replaces _Screen.feed during the _job_screen call only."""
        from unittest import mock

        if spy is not None:
            with mock.patch.object(Screen, "feed", spy):
                screen, pos = agent_exec._job_screen(self.job)
        else:
            screen, pos = agent_exec._job_screen(self.job)
        with open(self.job.path("stdout.log"), "rb") as f:
            data = f.read()
        whole = Screen(80, 24)
        whole.feed(data)
        self.assertEqual(pos, len(data))
        got = (screen.lines, screen.cursor, screen.alt_screen, screen.title)
        self.assertEqual(got, (whole.lines, whole.cursor, whole.alt_screen, whole.title))
        return screen

    def test_warm_calls_feed_only_new_bytes(self):
        self.append(b"\x1b]2;first\x07hello\r\n")
        self.check()
        fed_bytes = []
        real = Screen.feed

        def spy(scr, data, final=False):
            fed_bytes.append(data)
            return real(scr, data, final)

        self.append(b"world\r\n")
        self.assertEqual(self.check(spy).lines[:2], ["hello", "world"])
        self.assertEqual(fed_bytes, [b"world\r\n"])

    def test_a_checkpoint_far_behind_skips_to_the_last_clear(self):
        self.append(b"\x1b]2;first\x07start\r\n")
        self.check()
        filler = b"".join(b"row %d \x1b[1mx\x1b[0m\r\n" % i for i in range(20000))
        tail = b"\x1b]0;second\x07" + filler + b"\x1b[H\x1b[2Jclean\r\n" + b"after"
        self.append(tail)
        fed_bytes = []
        real = Screen.feed

        def spy(scr, data, final=False):
            fed_bytes.append(len(data))
            return real(scr, data, final)

        screen = self.check(spy)
        self.assertLess(sum(fed_bytes), 100)  # from the clear on, not the 400 KB before it
        self.assertEqual(screen.title, "second")
        self.assertEqual(screen.lines[:2], ["clean", "after"])
        # And with the title only in the checkpoint:
        self.append(b"\x1b[H\x1b[2J" + filler + b"\x1b[H\x1b[2Jx")
        self.assertEqual(self.check().title, "second")

    def test_cold_start_finds_the_title_before_the_clear(self):
        self.append(b"\x1b]0;old\x07\x1b]2;the title\x1b\\text\x1b[H\x1b[2Jnew")
        screen = self.check()
        self.assertEqual(screen.title, "the title")
        os.unlink(self.job.path("screen.cache"))
        self.assertEqual(self.check().title, "the title")

    def test_a_replaced_log_is_read_afresh(self):
        self.append(b"one\r\n")
        self.check()
        os.unlink(self.job.path("stdout.log"))
        self.append(b"two\r\n")  # a new inode
        self.assertEqual(self.check().lines[0], "two")


# ---- the commands ---------------------------------------------------------------------

PROGRESS = (
    "import sys\n"
    "for i in range(0, 101, 25):\n"
    "    sys.stdout.write('\\r\\x1b[32mprogress %3d%%\\x1b[0m' % i)\n"
    "    sys.stdout.flush()\n"
    "print()\n"
    "print('done\\x1b]0;my title\\x07')\n"
)


class ScreenCommandTests(JobsTestCase):
    def test_screen_of_a_progress_bar_job(self):
        jid = self.finished(PY, "-c", PROGRESS)
        j = self.okv("screen", jid)
        self.assertEqual(j["type"], "screen")
        self.assertEqual(j["rows"], ["progress 100%", "done"] + [""] * 22)
        self.assertEqual((j["cols"], j["lines"]), (80, 24))
        self.assertEqual(j["cursor"], {"row": 2, "col": 0})
        self.assertIs(j["alt_screen"], False)
        self.assertEqual(j["title"], "my title")
        size = len(self.log(jid, "stdout"))
        self.assertEqual(cursor_pos(j["log_cursor"]), (size, 0))
        # The checkpoint: private, and the next answer is the same.
        cache = os.path.join(self.job_dir(jid), "screen.cache")
        self.assertEqual(os.stat(cache).st_mode & 0o777, 0o600)
        self.assertEqual(self.okv("screen", "--plain", jid), j)
        # A damaged checkpoint is read afresh.
        with open(cache, "w") as f:
            f.write("{not json")
        self.assertEqual(self.okv("screen", jid), j)

    def test_no_title_no_field_and_an_empty_job(self):
        j = self.okv("screen", self.finished("true"))
        self.assertNotIn("title", j)
        self.assertEqual(j["rows"], [""] * 24)
        self.assertEqual(j["log_cursor"], "c1.0.0")

    def test_screen_follows_a_running_job(self):
        jid = self.running(
            PY, "-u", "-c", "import time\nprint('one')\ntime.sleep(1)\nprint('two')\ntime.sleep(60)"
        )
        self.wait_for_output(jid, "one")
        first = self.okv("screen", jid)
        self.assertEqual(first["state"], "running")
        self.assertEqual(first["rows"][:2], ["one", ""])
        self.wait_for_output(jid, "two")
        again = self.okv("screen", jid)  # from the checkpoint: only the new bytes
        self.assertEqual(again["rows"][:2], ["one", "two"])
        r = self.okv("read", "--cursor", first["log_cursor"], jid)
        self.assertEqual(r["stdout"], "two\n")

    def test_pty_size_and_resizes_from_the_job_directory(self):
        text = "".join("%03d %s\r\n" % (i, "x" * 95) for i in range(40)) + "\x1b[2;1Hhere"
        jid = self.bytes_job(text.encode())
        meta_path = os.path.join(self.job_dir(jid), "meta.json")
        meta = self.read_json(meta_path)
        meta.update(pty=True, pty_size={"cols": 100, "rows": 30})
        write_json_atomic(meta_path, meta)
        j = self.okv("screen", jid)
        self.assertEqual((j["cols"], j["lines"]), (100, 30))
        self.assertEqual(j["rows"][0], "011 " + "x" * 95)
        self.assertEqual(j["rows"][1], "here" + "x" * 95)  # the last screen's row 2, overwritten
        self.assertEqual(j["rows"][28], "039 " + "x" * 95)
        self.assertEqual(j["cursor"], {"row": 1, "col": 4})
        # A resize to 50x10 once 20 lines were out: the rest is drawn at that size.
        at = len("".join("%03d %s\r\n" % (i, "x" * 95) for i in range(20)))
        with open(os.path.join(self.job_dir(jid), "resize.jsonl"), "w") as f:
            f.write(json.dumps({"at": at, "cols": 50, "rows": 10}) + "\n")
        j = self.okv("screen", jid)
        self.assertEqual((j["cols"], j["lines"]), (50, 10))
        # Lines wrap at 50 now: 2 rows each, then the cursor's empty row.
        self.assertEqual(j["rows"][0], "x" * 49)  # the end of line 035
        self.assertEqual(j["rows"][1], "here" + "x" * 46)  # over the start of 036
        self.assertEqual(j["rows"][7:], ["039 " + "x" * 46, "x" * 49, ""])

    @unittest.skipUnless(shutil.which("less"), "no less")
    def test_screen_of_a_pty_job_that_ran_less(self):
        # The lead's `run --pty` is not here yet: what less drew on a real
        # pseudo-terminal becomes the stdout.log of a job marked as a PTY job.
        path = os.path.join(self.tmp, "lines.txt")
        with open(path, "w") as f:
            f.write("".join("line %d\n" % i for i in range(1, 201)))
        pid, fd = _spawn_on_pty(["less", path], 80, 24)
        raw = b""
        try:
            deadline = time.monotonic() + 10
            scr = Screen(80, 24)
            while time.monotonic() < deadline and scr.lines[22] != "line 23":
                if select.select([fd], [], [], 0.1)[0]:
                    data = os.read(fd, 65536)
                    raw += data
                    scr.feed(data)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
        jid = self.bytes_job(raw)
        meta_path = os.path.join(self.job_dir(jid), "meta.json")
        meta = self.read_json(meta_path)
        meta.update(pty=True, pty_size={"cols": 80, "rows": 24})
        write_json_atomic(meta_path, meta)
        j = self.okv("screen", jid)
        self.assertEqual(j["rows"][:23], ["line %d" % i for i in range(1, 24)])
        self.assertIn("lines.txt", j["rows"][23])
        self.assertIs(j["alt_screen"], True)
        self.assertEqual(j["cursor"]["row"], 23)

    def test_unknown_job(self):
        self.fail_with("job_not_found", "screen", "01ZZZZZZZZZZZZZZZZZZZZZZZZ")


class PlainOptionTests(JobsTestCase):
    def test_read_and_tail_plain_and_raw_cursors_mix(self):
        jid = self.finished(PY, "-c", PROGRESS)
        raw = self.log(jid, "stdout").decode()
        j = self.okv("read", "--plain", jid)
        self.assertEqual(j["stdout"], "progress 100%\ndone\n")
        self.assertEqual(cursor_pos(j["cursor"])[0], len(raw))
        t = self.okv("tail", "--plain", jid)
        self.assertEqual(t["stdout_tail"], "progress 100%\ndone\n")
        self.assertEqual(t["stdout_observed_bytes"], len(raw))
        self.assertEqual(t["stdout_included_bytes"], len(raw))  # raw bytes, as without --plain
        # A --plain read that would end inside an escape ends before it: the
        # cursor counts the raw bytes, and a raw read from it goes on there.
        first = self.okv("read", "--plain", "--max-bytes", "20", jid)
        pos = cursor_pos(first["cursor"])[0]
        self.assertLessEqual(pos, 20)
        self.assertNotIn("\x1b", first["stdout"])
        self.assertNotIn("\x1b", raw[pos - 1 : pos])  # not cut just after an ESC
        rest = self.okv("read", "--cursor", first["cursor"], jid)
        self.assertEqual(raw[:pos] + rest["stdout"], raw)

    def test_run_and_wait_plain(self):
        j = self.okv("run", "--wait", "--plain", "--", PY, "-c", PROGRESS)
        self.assertEqual(j["final_snapshot"]["stdout_tail"], "progress 100%\ndone\n")
        w = self.okv("wait", "--plain", "--match", "done", j["job_id"])
        self.assertEqual(w["match"]["line"], "done")
        w = self.okv("wait", "--match", "done", j["job_id"])
        self.assertEqual(w["match"]["line"], "done\x1b]0;my title\x07")


if __name__ == "__main__":
    unittest.main()
