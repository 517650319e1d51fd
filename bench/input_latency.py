"""How quickly agent-exec sees that a job waits for input (Linux).

A job writes the wall clock just before it blocks reading its stdin (a
``read`` in sh, an ``input()`` in Python); a ``wait --input`` started before
that returns when the job is seen blocked.  The latency is from the stamp
to the return of ``wait``, wall clock on the same machine.  Each sample is
one job (started with ``--stdin-open``, or with ``--pty``, then killed).

    python3 bench/input_latency.py [--runs 20] [--tool PATH]
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

# Each job sleeps a random while first, so that the wait is blocked already.
WORKLOADS = {
    "sh read": "sleep 0.$(( RANDOM %% 3 + 2 )); date +%%s%%N > %s; read x",
    "python input()": (
        '%s -c "import random, time; time.sleep(0.2 + random.random() / 5); '
        "open('%%s', 'w').write(str(time.time_ns())); input('? ')\"" % sys.executable
    ),
}


def one(tool, root, workload, stamp, mode):
    def cli(*args):
        out = subprocess.run(
            [sys.executable, tool, "--root", root] + list(args), stdout=subprocess.PIPE
        ).stdout
        return json.loads(out)

    script = workload % stamp
    job = cli("run", mode, "--snapshot-after", "0", "--", "bash", "-c", script)["job_id"]
    try:
        answer = cli("wait", "--input", "--timeout-ms", "10000", job)
        seen = time.time_ns()
        with open(stamp) as f:
            asked = int(f.read().strip())
        if not answer.get("waiting_for_input"):
            raise SystemExit("not detected: %r" % answer)
        return (seen - asked) / 1e6
    finally:
        cli("kill", "--signal", "KILL", job)
        os.unlink(stamp) if os.path.exists(stamp) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tool", default=os.path.join(REPO, "agent_exec.py"))
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "root")
        for mode in ("--stdin-open", "--pty"):
            for name, workload in WORKLOADS.items():
                stamp = os.path.join(tmp, "stamp")
                samples = sorted(
                    one(opts.tool, root, workload, stamp, mode) for _ in range(opts.runs)
                )
                p95 = samples[max(0, int(round(0.95 * len(samples))) - 1)]
                print(
                    "%-12s %-15s median %.1f ms, p95 %.1f ms, max %.1f ms (%d runs)"
                    % (mode, name, statistics.median(samples), p95, samples[-1], len(samples))
                )


if __name__ == "__main__":
    main()
