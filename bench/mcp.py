#!/usr/bin/env python3
"""The MCP server's figures: round trip, memory, zombies.

    python3 bench/mcp.py                   # 1,000 status calls, 10,000 for memory, 1,000 runs
    python3 bench/mcp.py --quick           # 200 / 2,000 / 100
    python3 bench/mcp.py --json out.json

1. A `status` tool call's round trip through `agent-exec mcp` (write the
   request line, read the answer line): median and p95 over N calls, against
   the CLI's `status` as a process (as a script, and with `-m` and the cached
   bytecode).  Target: median <= 2 ms.
2. The server's resident memory (VmRSS) after 1,000 calls and after 10,000
   (status, read, tail and list in turn): flat.
3. 1,000 `run`s through the server: no zombie child of the server left, and
   its thread count back where it started.

Standard library only; Linux (it reads /proc).  Everything runs against a
temporary jobs root that is removed at the end, with every job killed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPT = os.path.join(REPO, "agent_exec.py")
PY = sys.executable
sys.path.insert(0, REPO)
from tests._procs import kill_jobs_in, vmrss_kb, zombies_of  # noqa: E402

CACHED = [
    PY,
    "-S",
    "-c",
    "import sys; sys.path.insert(0, %r); import agent_exec; agent_exec.cli()" % REPO,
]


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def threads_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return None


class Server:
    def __init__(self, env):
        self.proc = subprocess.Popen(
            CACHED + ["mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.n = 0

    def rpc(self, method, params):
        self.n += 1
        line = json.dumps({"jsonrpc": "2.0", "id": self.n, "method": method, "params": params})
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            msg = json.loads(self.proc.stdout.readline())
            if msg.get("id") == self.n:
                return msg

    def call(self, name, arguments):
        msg = self.rpc("tools/call", {"name": name, "arguments": arguments})
        return msg["result"]["structuredContent"]

    def close(self):
        self.proc.stdin.close()
        return self.proc.wait(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    calls, memory_calls, runs, cli_calls = (
        (200, 2000, 100, 30) if args.quick else (1000, 10000, 1000, 100)
    )
    tmp = tempfile.mkdtemp(prefix="agent-exec-bench-mcp-")
    os.chmod(tmp, 0o700)
    root = os.path.join(tmp, "root")
    env = dict(os.environ, AGENT_EXEC_ROOT=root)
    env.pop("AGENT_EXEC_LOG", None)
    figures = {}
    try:
        server = Server(env)
        server.rpc(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        job = server.call("run", {"command": ["sh", "-c", "echo hello"], "wait": True})["job_id"]
        for _ in range(20):  # warm up
            server.call("status", {"job_id": job})
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            server.call("status", {"job_id": job})
            samples.append((time.perf_counter() - t0) * 1000)
        figures["mcp_status_ms"] = {
            "median": percentile(samples, 50),
            "p95": percentile(samples, 95),
            "n": calls,
        }
        for label, argv in (
            ("cli_script_status_ms", [PY, SCRIPT]),
            ("cli_cached_status_ms", CACHED),
        ):
            cli = []
            for _ in range(cli_calls):
                t0 = time.perf_counter()
                subprocess.run(
                    argv + ["status", job], stdout=subprocess.DEVNULL, env=env, check=True
                )
                cli.append((time.perf_counter() - t0) * 1000)
            figures[label] = {
                "median": percentile(cli, 50),
                "p95": percentile(cli, 95),
                "n": cli_calls,
            }

        # Memory over many calls of several kinds.
        pid = server.proc.pid
        kinds = [
            ("status", {"job_id": job}),
            ("read", {"job_id": job}),
            ("tail", {"job_id": job}),
            ("list", {"all": True}),
        ]
        rss = {}
        for i in range(1, memory_calls + 1):
            server.call(*kinds[i % len(kinds)])
            if i in (memory_calls // 10, memory_calls):
                rss[i] = vmrss_kb(pid)
        figures["mcp_rss_kb"] = rss

        # Many runs: no zombie, no thread left over.
        threads_before = threads_of(pid)
        t0 = time.perf_counter()
        for _ in range(runs):
            r = server.call("run", {"command": ["true"], "snapshot_after": 0})
            assert r["ok"], r
        took = time.perf_counter() - t0
        time.sleep(0.5)
        figures["mcp_runs"] = {
            "runs": runs,
            "seconds": round(took, 1),
            "zombies": len(zombies_of(pid)),
            "threads_before": threads_before,
            "threads_after": threads_of(pid),
            "rss_kb_after": vmrss_kb(pid),
        }
        figures["exit_code_at_eof"] = server.close()
    finally:
        kill_jobs_in(root)
        shutil.rmtree(tmp, ignore_errors=True)

    m = figures["mcp_status_ms"]
    print(
        "machine: %s, %d cores, %s"
        % (os.uname().machine, os.cpu_count() or 0, sys.version.split()[0])
    )
    print(
        "1. status round trip through agent-exec mcp: median %.2f ms, p95 %.2f ms"
        " over %d calls  [%s: median <= 2 ms]"
        % (m["median"], m["p95"], m["n"], "PASS" if m["median"] <= 2 else "FAIL")
    )
    for label in ("cli_script_status_ms", "cli_cached_status_ms"):
        c = figures[label]
        print(
            "   CLI status as a process (%s): median %.1f ms, p95 %.1f ms over %d"
            % (
                "script" if "script" in label else "-m, cached bytecode",
                c["median"],
                c["p95"],
                c["n"],
            )
        )
    rss = figures["mcp_rss_kb"]
    first, last = sorted(rss)
    print(
        "2. server RSS: %d KiB after %d calls, %d KiB after %d calls (%+d KiB)"
        % (rss[first], first, rss[last], last, rss[last] - rss[first])
    )
    r = figures["mcp_runs"]
    print(
        "3. %d runs in %.1f s: %d zombies, threads %d -> %d, RSS %d KiB"
        % (
            r["runs"],
            r["seconds"],
            r["zombies"],
            r["threads_before"],
            r["threads_after"],
            r["rss_kb_after"],
        )
    )
    print("   exit status at EOF: %d" % figures["exit_code_at_eof"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = m["median"] <= 2 and r["zombies"] == 0 and figures["exit_code_at_eof"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
