#!/usr/bin/env python3
"""What the automatic clean-up of `run` costs in a root full of old jobs.

    python3 bench/autogc.py                 # 10,000 old jobs, 40 runs of each kind
    python3 bench/autogc.py --jobs 2000 --runs 20

It makes a root of N finished jobs that ended 60 days ago (one real job, its
directory copied under old ids), then times `run --snapshot-after 0 -- true`
in that root, interleaving runs with AGENT_EXEC_GC_AFTER=off (the floor) and
with the default (30 days: every one of the N jobs is due).  The figure is
the difference of the means (and medians): what a run pays on average for
the clean-up, the sweep's start (one listing of the root) included; the
step is taken by each new job's supervisor, so run should pay nothing but
the CPU it takes from the next call.  It also reports the slowest run of
each kind, how many jobs the runs removed, and the step alone (one call of
_auto_gc in a fresh interpreter, timed inside): what a supervisor spends.

Standard library only; the root is a temporary directory, removed at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import agent_exec  # noqa: E402

CLI = [
    sys.executable,
    "-S",
    "-c",
    "import sys; sys.path.insert(0, %r); import agent_exec; agent_exec.cli()" % REPO,
]
DAY_MS = 86400000


def _call(root: str, gc_after: "str | None", *args) -> "tuple":
    env = dict(os.environ, AGENT_EXEC_ROOT=root)
    env.pop("AGENT_EXEC_GC_AFTER", None)
    if gc_after is not None:
        env["AGENT_EXEC_GC_AFTER"] = gc_after
    t0 = time.perf_counter()
    out = subprocess.run(CLI + list(args), env=env, stdout=subprocess.PIPE, check=False).stdout
    return time.perf_counter() - t0, json.loads(out)


def make_root(n: int) -> str:
    root = tempfile.mkdtemp(prefix="agent-exec-autogc-")
    _, answer = _call(root, "off", "run", "--wait", "--", "true")
    src = os.path.join(root, answer["job_id"])
    files = {name: open(os.path.join(src, name), "rb").read() for name in os.listdir(src)}
    meta = json.loads(files.pop("meta.json"))
    state = json.loads(files.pop("state.json"))
    files.pop("control", None)
    shutil.rmtree(src)
    now_ms = int(time.time() * 1000)
    for i in range(n):
        made = now_ms - 61 * DAY_MS + i
        job_id = agent_exec.new_ulid(made / 1000.0)
        d = os.path.join(root, job_id)
        os.mkdir(d, 0o700)
        meta["job"]["id"] = state["job"]["id"] = job_id
        meta["created_at"] = agent_exec._rfc3339(made / 1000.0)
        state["finished_at"] = agent_exec._rfc3339(made / 1000.0 + 1 * DAY_MS / 1000.0)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        for name, doc in (("meta.json", meta), ("state.json", state)):
            with open(os.path.join(d, name), "w") as f:
                json.dump(doc, f)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args()
    t0 = time.monotonic()
    root = make_root(args.jobs)
    made_s = time.monotonic() - t0
    try:
        for _ in range(3):  # warm-up: bytecode, page cache
            _call(root, "off", "run", "--snapshot-after", "0", "--", "true")
        before = sum(1 for n in os.listdir(root) if agent_exec.is_job_id(n))
        off, on = [], []
        for i in range(args.runs):
            pair = ((None, on), ("off", off))
            for gc_after, into in pair if i % 2 else pair[::-1]:  # alternate: drift hits both
                seconds, answer = _call(
                    root, gc_after, "run", "--snapshot-after", "0", "--", "true"
                )
                if not answer.get("ok"):
                    raise SystemExit("run failed: %s" % answer)
                into.append(seconds * 1000)
        after = sum(1 for n in os.listdir(root) if agent_exec.is_job_id(n))
        removed = before + 2 * args.runs - after
        print(
            "root of %d old jobs (made in %.1f s), %d runs of each kind"
            % (args.jobs, made_s, args.runs)
        )
        print(
            "  run, AGENT_EXEC_GC_AFTER=off: mean %.2f ms, median %.2f ms, max %.2f ms"
            % (statistics.mean(off), statistics.median(off), max(off))
        )
        print(
            "  run, automatic gc (30d):      mean %.2f ms, median %.2f ms, max %.2f ms"
            % (statistics.mean(on), statistics.median(on), max(on))
        )
        print(
            "  cost of the automatic gc: %+.2f ms per run on average (median %+.2f ms); "
            "%d old jobs removed"
            % (
                statistics.mean(on) - statistics.mean(off),
                statistics.median(on) - statistics.median(off),
                removed,
            )
        )
        # The step alone, as a run pays it: a fresh interpreter, one call, timed inside.
        code = (
            "import sys, time; sys.path.insert(0, %r); import agent_exec; "
            "t = time.perf_counter(); agent_exec._auto_gc(%r); "
            "print((time.perf_counter() - t) * 1000)" % (REPO, root)
        )
        steps = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE)
            steps.append(float(out.stdout))
        print(
            "  the clean-up step alone (fresh interpreter, %d calls): mean %.2f ms, "
            "median %.2f ms, max %.2f ms"
            % (len(steps), statistics.mean(steps), statistics.median(steps), max(steps))
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
