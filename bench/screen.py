"""What `screen` costs: a big log with periodic clears, cold and warm, against a 1 KB log.

`screen` feeds stdout.log through a terminal emulator.  Its checkpoint
(screen.cache) makes a warm call feed only the new bytes; a cold call (no
checkpoint) searches the log backwards for the last full-screen clear and
feeds from there.  This measures, as wall-clock time of the CLI call
(median of --runs):

- `status (for scale)`: the start-up of any call;
- `1 KB`: screen on a job whose log is 1 KB (cold): the floor;
- `50 MB, clears, cold`: a 50 MB log drawn as full-screen frames (ESC[H
  ESC[2J every ~50 KB, colours, CR LF), the checkpoint deleted before
  each call;
- `50 MB, clears, warm`: the same, the checkpoint in place, nothing new;
- `50 MB + 1 MB new, warm`: 1 MB appended to the log since the checkpoint;
- `50 MB coloured lines, cold`: a log of coloured lines that never clears
  (a build log): the cold start begins at its last lines;
- `10 MB, no clear, cold`: the worst case, rows drawn with a cursor
  movement and never cleared, every byte fed (the emulator's rate, MB/s).

    python3 bench/screen.py [--runs 5] [--tool PATH] [--mb 50]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frames(total_bytes, clear=True, moves=False):
    """Full-screen frames of coloured rows, until ``total_bytes``.

    ``moves``: each row starts with a cursor movement (CHA), which no cold
    start can skip: every byte goes through the emulator."""
    out = []
    size = 0
    frame = 0
    while size < total_bytes:
        chunk = [b"\x1b[H\x1b[2J" if clear else b""]
        for row in range(1000):
            chunk.append(
                (b"\x1b[1G" if moves else b"")
                + b"frame %6d row %4d \x1b[32mok\x1b[0m %s\r\n" % (frame, row, b"." * 20)
            )
        data = b"".join(chunk)
        out.append(data)
        size += len(data)
        frame += 1
    data = b"".join(out)[:total_bytes]
    return data[: data.rfind(b"\n") + 1]  # whole lines


class Bench:
    def __init__(self, tool, root, runs):
        self.tool, self.root, self.runs = tool, root, runs

    def cli(self, *args):
        out = subprocess.run(
            [sys.executable, self.tool, "--root", self.root] + list(args),
            stdout=subprocess.PIPE,
            check=True,
        ).stdout
        answer = json.loads(out)
        assert answer.get("ok"), answer
        return answer

    def job_of(self, data, tmp, name):
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return self.cli("run", "--wait", "--", "cat", path)["job_id"]

    def timed(self, job, cold, before=None):
        cache = os.path.join(self.root, job, "screen.cache")
        samples = []
        for _ in range(self.runs):
            if cold and os.path.exists(cache):
                os.unlink(cache)
            if before is not None:
                before()
            t0 = time.perf_counter()
            answer = self.cli("screen", job)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples), answer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--tool", default=os.path.join(REPO, "agent_exec.py"))
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(opts.tool, os.path.join(tmp, "root"), opts.runs)
        small = b.job_of(frames(1000), tmp, "small")
        big = b.job_of(frames(opts.mb << 20), tmp, "big")
        flat = b.job_of(frames(10 << 20, clear=False, moves=True), tmp, "flat")
        coloured = b.job_of(frames(opts.mb << 20, clear=False), tmp, "coloured")
        rows = []
        samples = []
        for _ in range(opts.runs):
            t0 = time.perf_counter()
            b.cli("status", small)
            samples.append(time.perf_counter() - t0)
        rows.append(("status (for scale)", statistics.median(samples)))
        floor, _ = b.timed(small, cold=True)
        rows.append(("1 KB", floor))
        t, cold_answer = b.timed(big, cold=True)
        rows.append(("%d MB, clears, cold" % opts.mb, t))
        b.timed(big, cold=False)  # leaves a checkpoint
        t, warm_answer = b.timed(big, cold=False)
        assert warm_answer["rows"] == cold_answer["rows"], "warm and cold screens differ"
        rows.append(("%d MB, clears, warm" % opts.mb, t))
        log = os.path.join(b.root, big, "stdout.log")
        more = frames(1 << 20)

        def append():
            with open(log, "ab") as f:
                f.write(more)

        t, _ = b.timed(big, cold=False, before=append)
        rows.append(("%d MB + 1 MB new, warm" % opts.mb, t))
        t, _ = b.timed(coloured, cold=True)
        rows.append(("%d MB coloured lines, cold" % opts.mb, t))
        t, _ = b.timed(flat, cold=True)
        rows.append(("10 MB, no clear, cold", t))
        print("CLI calls (wall clock, median of %d):" % opts.runs)
        for name, t in rows:
            print("  %-26s %8.1f ms  %6.1f x the 1 KB call" % (name, t * 1000, t / floor))
        print("  emulator rate (no clear, cold): %.1f MB/s" % (10 / max(1e-9, t - floor)))
        in_process(opts, b, small, big, flat, coloured)


def in_process(opts, b, small, big, flat, coloured):
    """The same, without the interpreter's start-up: _job_screen() in this process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(opts.tool)))
    import agent_exec

    def median(job, cold):
        samples = []
        for _ in range(opts.runs):
            if cold:
                try:
                    os.unlink(os.path.join(b.root, job, "screen.cache"))
                except OSError:
                    pass
            j = agent_exec.load_job(b.root, job)
            t0 = time.perf_counter()
            agent_exec._job_screen(j)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    floor = median(small, True)
    cold = median(big, True)
    warm = median(big, False)
    log = os.path.join(b.root, big, "stdout.log")
    more = frames(1 << 20)
    samples = []
    for _ in range(opts.runs):
        agent_exec._job_screen(agent_exec.load_job(b.root, big))  # a checkpoint at the end
        with open(log, "ab") as f:
            f.write(more)
        j = agent_exec.load_job(b.root, big)
        t0 = time.perf_counter()
        agent_exec._job_screen(j)
        samples.append(time.perf_counter() - t0)
    appended = statistics.median(samples)
    flat_cold = median(flat, True)
    coloured_cold = median(coloured, True)
    print("in process (_job_screen, median of %d):" % opts.runs)
    print("  %-26s %8.2f ms" % ("1 KB, cold", floor * 1000))
    print(
        "  %-26s %8.2f ms  %6.1f x 1 KB"
        % ("%d MB, clears, cold" % opts.mb, cold * 1000, cold / floor)
    )
    print(
        "  %-26s %8.2f ms  %6.1f x 1 KB"
        % ("%d MB, clears, warm" % opts.mb, warm * 1000, warm / floor)
    )
    print(
        "  %-26s %8.2f ms  %6.1f x 1 KB" % ("+ 1 MB new, warm", appended * 1000, appended / floor)
    )
    print(
        "  %-26s %8.2f ms  %6.1f x 1 KB"
        % ("%d MB coloured lines, cold" % opts.mb, coloured_cold * 1000, coloured_cold / floor)
    )
    print(
        "  %-26s %8.2f ms  %6.1f x 1 KB (%.1f MB/s)"
        % ("10 MB, no clear, cold", flat_cold * 1000, flat_cold / floor, 10 / flat_cold)
    )


if __name__ == "__main__":
    main()
