"""Finding jobs again: names, tags, owners, single-flight keys, ports, and the
automatic clean-up of run.

The pure parts (name, tag and pattern syntax) are tested in-process; the rest
against a temporary root, through the real CLI.
"""

import json
import os
import subprocess
import sys
import threading
import time
import unittest

from tests._jobs import JobsTestCase, LINUX, free_port, job_ids_in
from tests._procs import wait_until
from tests._util import CLI, PY, REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

import agent_exec  # noqa: E402

# A server on $PORT that says which port it got.
PORT_ECHO = (
    "import os, socket, time\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(os.environ['PORT'])))\n"
    "s.listen(4)\n"
    "print('port', os.environ['PORT'], os.environ['AGENT_EXEC_PORT'], flush=True)\n"
    "time.sleep(60)\n"
)


class NameSyntaxTests(unittest.TestCase):
    def test_names_that_are_accepted(self):
        for name in ("web", "dev-server", "api_1", "a.b", "test", "server", "Zebra", "x" * 64):
            with self.subTest(name=name):
                self.assertIsNone(agent_exec._name_error(name))

    def test_names_that_are_refused(self):
        ulid = agent_exec.new_ulid()
        for name in (
            "",
            "x" * 65,
            "a b",
            "a/b",
            "caf\u00e9",
            "-x",
            "0abc",
            "7zzz",
            ulid,
            ulid.lower(),
            ulid[:10],
        ):
            with self.subTest(name=name):
                self.assertIsNotNone(agent_exec._name_error(name))

    def test_what_reads_as_an_id_prefix(self):
        self.assertTrue(agent_exec._id_like("01AB"))
        self.assertTrue(agent_exec._id_like("01ab"))
        self.assertFalse(agent_exec._id_like("01A"))  # shorter than a prefix
        self.assertFalse(agent_exec._id_like("8ABC"))  # no ULID starts with 8
        self.assertFalse(agent_exec._id_like("01AI"))  # I is not Crockford


class TagSyntaxTests(unittest.TestCase):
    def test_tags(self):
        self.assertEqual(agent_exec.parse_tag("team"), ("team", None))
        self.assertEqual(agent_exec.parse_tag("env=dev"), ("env", "dev"))
        self.assertEqual(agent_exec.parse_tag("ns.sub/x:y=a=b"), ("ns.sub/x:y", "a=b"))
        for bad in ("", "=x", "k=", "a b", "-k", ".k", "k*", "k=v*", "k=\x01", "k" * 65):
            with self.subTest(tag=bad):
                self.assertRaises(ValueError, agent_exec.parse_tag, bad)

    def test_patterns(self):
        def matches(pattern, tags):
            return agent_exec._tag_matches(agent_exec.parse_tag_pattern(pattern), tags)

        tags = ["env=dev", "ns.a=1", "team"]
        self.assertTrue(matches("env", tags))
        self.assertTrue(matches("env=dev", tags))
        self.assertFalse(matches("env=prod", tags))
        self.assertTrue(matches("team", tags))
        self.assertFalse(matches("team=x", tags))
        self.assertTrue(matches("ns.*", tags))
        self.assertFalse(matches("ns.*", ["ns", "nsx=1"]))
        self.assertTrue(matches("n*", ["nsx=1"]))
        self.assertTrue(matches("*", tags))
        self.assertFalse(matches("*", []))
        self.assertTrue(matches("env=d*", tags))
        self.assertFalse(matches("env=p*", tags))
        for bad in ("a*b", "=x", "k=", "a b*"):
            with self.subTest(pattern=bad):
                self.assertRaises(ValueError, agent_exec.parse_tag_pattern, bad)

    def test_tag_list_keeps_one_value_per_key_sorted(self):
        pairs = agent_exec._tag_pairs(["b", "a=1", "a=2"], "--tag")
        self.assertEqual(agent_exec._tag_list(pairs), ["a=2", "b"])


class HousekeepingUnitTests(unittest.TestCase):
    def test_gc_after(self):
        cases = {"": agent_exec.DEFAULT_GC_AFTER_MS, "off": None, "OFF": None, "2h": 7200000}
        for text, want in cases.items():
            with self.subTest(text=text):
                os.environ["AGENT_EXEC_GC_AFTER"] = text
                try:
                    self.assertEqual(agent_exec._gc_after_ms(), want)
                finally:
                    del os.environ["AGENT_EXEC_GC_AFTER"]
        for text in ("0", "soon", "-1d"):
            with self.subTest(text=text):
                os.environ["AGENT_EXEC_GC_AFTER"] = text
                try:
                    with self.assertRaises(agent_exec.AgentExecError) as e:
                        agent_exec._gc_after_ms()
                    self.assertEqual(e.exception.code, "invalid_argument")
                finally:
                    del os.environ["AGENT_EXEC_GC_AFTER"]

    def test_the_ulid_cut_off_orders_ids_by_time(self):
        now = time.time()
        cut = agent_exec._ulid_prefix(int(now * 1000))
        self.assertLess(agent_exec.new_ulid(now - 1), cut)
        self.assertGreater(agent_exec.new_ulid(now + 1), cut)


class ToolArgumentTests(unittest.TestCase):
    def test_status_wait_kill_take_a_key_instead_of_an_id(self):
        o = agent_exec.options_from_arguments("status", {"key": "dev"})
        self.assertEqual((o.key, o.job_id), ("dev", None))
        self.assertIsNone(agent_exec._id_or_key(o))
        o = agent_exec.options_from_arguments("wait", {"key": "dev"})
        self.assertIsNone(agent_exec._id_or_key(o))
        o = agent_exec.options_from_arguments("kill", {})
        self.assertIn("--key", agent_exec._id_or_key(o))
        o = agent_exec.options_from_arguments("wait", {"key": "k", "job_ids": ["web"]})
        self.assertIn("not both", agent_exec._id_or_key(o))


class FindingTestCase(JobsTestCase):
    def env(self, **extra):
        env = super().env(**extra)
        for key in ("AGENT_EXEC_OWNER", "AGENT_EXEC_GC_AFTER"):
            if key not in extra:
                env.pop(key, None)
        return env

    def done(self, *opts, env=None):
        """``run --wait [opts] -- true``: a finished job's id."""
        j = self.ok("run", "--wait", *opts, "--", "true", env=env)
        self.assertEqual(j["state"], "exited", j)
        return j["job_id"]

    def sleeper(self, *opts):
        j = self.ok("run", "--snapshot-after", "0", *opts, "--", "sleep", "60")
        self.addCleanup(self.kill_job, j["job_id"])
        return j


class NameTests(FindingTestCase):
    def test_a_name_names_the_newest_job_with_it(self):
        first = self.done("--name", "web")
        second = self.sleeper("--name", "web")["job_id"]
        self.assertGreater(second, first)
        s = self.ok("status", "web")
        self.assertEqual((s["job_id"], s["name"]), (second, "web"))
        self.assertEqual(self.ok("tail", "web")["job_id"], second)
        listed = self.ok("list", "--name", "web")["jobs"]
        self.assertEqual([j["job_id"] for j in listed], [second, first])
        self.assertEqual(self.ok("kill", "web")["job_id"], second)
        self.assertEqual(self.ok("wait", "web")["job_id"], second)
        self.assertEqual(self.ok("read", "web")["job_id"], second)
        self.done("--name", "x", "--key", "k")
        for index in ("names", "keys"):  # private, like the root's other directories
            self.assertEqual(os.stat(os.path.join(self.root, index)).st_mode & 0o777, 0o700)

    def test_names_and_ids_coexist(self):
        jid = self.done("--name", "build")
        self.assertEqual(self.ok("status", jid[:8])["job_id"], jid)
        self.assertIsNone(self.ok("status", self.done())["name"])

    def test_a_name_that_reads_as_an_id_is_refused_before_anything_exists(self):
        jid = self.done()
        for name in (jid[:6], jid[:6].lower(), "01ab", "a b", "x" * 65, "-x"):
            with self.subTest(name=name):
                before = job_ids_in(self.root)
                r = self.fail_with("invalid_argument", "run", "--name=" + name, "--", "true")
                self.assertIn("name", r["error"]["message"])
                self.assertEqual(job_ids_in(self.root), before)

    def test_an_unknown_name_is_job_not_found(self):
        self.done("--name", "web")
        self.fail_with("job_not_found", "status", "nope")
        self.fail_with("job_not_found", "status", "a b")

    def test_a_deleted_job_leaves_its_name(self):
        old = self.done("--name", "web")
        new = self.done("--name", "web")
        self.ok("delete", new)
        self.assertEqual(self.ok("status", "web")["job_id"], old)
        self.ok("delete", "web")
        self.fail_with("job_not_found", "status", "web")


class TagTests(FindingTestCase):
    def test_run_list_and_tag(self):
        a = self.done("--tag", "env=dev", "--tag", "team", "--tag", "ns.x=1")
        b = self.done("--tag", "env=prod", "--tag", "ns.y")
        self.done()
        self.assertEqual(self.ok("status", a)["tags"], ["env=dev", "ns.x=1", "team"])

        def ids(*tags):
            argv = ["list"] + ["--tag=" + t for t in tags]
            return [j["job_id"] for j in self.ok(*argv)["jobs"]]

        self.assertEqual(ids("env"), [b, a])
        self.assertEqual(ids("env=dev"), [a])
        self.assertEqual(ids("ns.*"), [b, a])
        self.assertEqual(ids("ns.*", "team"), [a])
        self.assertEqual(ids("env=p*"), [b])
        self.assertEqual(ids("missing"), [])
        t = self.ok("tag", a, "--add", "env=staging", "--remove", "team", "--add", "new")
        self.assertEqual(t["tags"], ["env=staging", "new", "ns.x=1"])
        self.assertTrue(t["changed"])
        self.assertEqual(ids("env=staging"), [a])
        t = self.ok("tag", a, "--remove", "env=other")  # another value: kept
        self.assertEqual((t["tags"], t["changed"]), (["env=staging", "new", "ns.x=1"], False))
        self.assertEqual(self.ok("list", "--tag", "new")["jobs"][0]["tags"], t["tags"])
        self.assertTrue(os.path.isfile(os.path.join(self.job_dir(a), "tags.json")))

    def test_bad_tag_syntax_is_invalid_argument(self):
        jid = self.done()
        before = job_ids_in(self.root)
        self.fail_with("invalid_argument", "run", "--tag", "a b", "--", "true")
        self.fail_with("invalid_argument", "run", "--tag", "k=", "--", "true")
        self.assertEqual(job_ids_in(self.root), before)
        self.fail_with("invalid_argument", "list", "--tag", "a*b")
        self.fail_with("invalid_argument", "tag", jid, "--add", "=v")
        self.fail_with("invalid_argument", "tag", jid, "--remove", "x y")
        self.fail_with("job_not_found", "tag", "nosuchname", "--add", "x")

    def test_concurrent_tag_calls_lose_nothing(self):
        jid = self.sleeper()["job_id"]
        procs = [
            subprocess.Popen(
                CLI + ["tag", jid, "--add", "k%d=%d" % (i, i)],
                stdout=subprocess.PIPE,
                env=self.env(),
            )
            for i in range(10)
        ]
        for p in procs:
            p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0)
        tags = self.ok("status", jid)["tags"]
        self.assertEqual(sorted(tags), sorted("k%d=%d" % (i, i) for i in range(10)))


class OwnerTests(FindingTestCase):
    def test_owner_from_option_or_environment(self):
        mine = self.done(env=self.env(AGENT_EXEC_OWNER="sess-1"))
        other = self.done("--owner", "sess-2", env=self.env(AGENT_EXEC_OWNER="sess-1"))
        nobody = self.done()
        self.assertEqual(self.ok("status", mine)["owner"], "sess-1")
        self.assertEqual(self.ok("status", other)["owner"], "sess-2")
        self.assertIsNone(self.ok("status", nobody)["owner"])
        listed = self.ok("list", "--mine", env=self.env(AGENT_EXEC_OWNER="sess-1"))["jobs"]
        self.assertEqual([j["job_id"] for j in listed], [mine])
        listed = self.ok("list", "--owner", "sess-2")["jobs"]
        self.assertEqual([(j["job_id"], j["owner"]) for j in listed], [(other, "sess-2")])

    def test_mine_needs_an_owner_in_the_environment(self):
        self.usage_error("list", "--mine")
        self.usage_error("list", "--mine", "--owner", "x")
        self.fail_with("invalid_argument", "run", "--owner", "", "--", "true")

    def test_finding_filters_look_in_every_directory(self):
        sub = os.path.join(self.tmp, "elsewhere")
        os.mkdir(sub)
        jid = self.done("--owner", "o", "--cwd", sub)
        self.assertEqual([j["job_id"] for j in self.ok("list", "--owner", "o")["jobs"]], [jid])
        self.assertEqual(self.ok("list", "--owner", "o", "--cwd", self.tmp)["jobs"], [])
        self.assertEqual(self.ok("list")["jobs"], [])  # the default stays: this directory


class KeyTests(FindingTestCase):
    def test_twenty_concurrent_runs_with_one_key_make_one_job(self):
        argv = CLI + ["run", "--snapshot-after", "0", "--key", "K", "--", "sleep", "30"]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, env=self.env()) for _ in range(20)]
        answers = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        jobs = job_ids_in(self.root)
        for jid in jobs:
            self.addCleanup(self.kill_job, jid)
        self.assertEqual(len(jobs), 1, answers)
        self.assertEqual({a["job_id"] for a in answers}, set(jobs))
        self.assertEqual(sorted(a["reused"] for a in answers), [False] + [True] * 19)

    def test_scope_running_and_any(self):
        first = self.done("--key", "k")
        j = self.ok("run", "--wait", "--key", "k", "--", "true")
        self.assertFalse(j["reused"])  # the first one no longer runs
        self.assertNotEqual(j["job_id"], first)
        again = self.ok("run", "--key", "k", "--key-scope", "any", "--", "true")
        self.assertEqual((again["job_id"], again["reused"]), (j["job_id"], True))
        self.assertEqual(again["state"], "exited")

    def test_status_wait_and_kill_take_a_key(self):
        j = self.sleeper("--key", "dev server of /src")
        time.sleep(1.2)
        r = self.ok("run", "--snapshot-after", "1000", "--key", "dev server of /src", "--", "x")
        self.assertTrue(r["reused"])
        # The snapshot window covers the job's first second, which is over.
        self.assertLess(r["waited_ms"], 900)
        s = self.ok("status", "--key", "dev server of /src")
        self.assertEqual((s["job_id"], s["key"]), (j["job_id"], "dev server of /src"))
        w = self.ok("wait", "--key", "dev server of /src", "--timeout-ms", "100")
        self.assertTrue(w["timed_out"])
        k = self.ok("kill", "--key", "dev server of /src")
        self.assertEqual(k["job_id"], j["job_id"])
        listed = self.ok("list", "--key", "dev server of /src")["jobs"]
        self.assertEqual([x["job_id"] for x in listed], [j["job_id"]])
        self.fail_with("job_not_found", "status", "--key", "nothing")

    def test_bad_key_usage(self):
        jid = self.done()
        self.usage_error("run", "--key-scope", "any", "--", "true")
        self.usage_error("status", jid, "--key", "k")
        self.usage_error("status")
        self.usage_error("wait")
        self.fail_with("invalid_argument", "run", "--key", "", "--", "true")


@unittest.skipUnless(LINUX, "port holders are found through /proc")
class PortTests(FindingTestCase):
    def test_two_auto_ports_differ_and_each_job_sees_its_own(self):
        results = []

        def start():
            r = self.cli("run", "--port", "auto", "--", PY, "-c", PORT_ECHO)
            results.append(r.json)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for r in results:
            self.addCleanup(self.kill_job, r["job_id"])
        ports = [r["port"] for r in results]
        self.assertEqual(len(set(ports)), 2, results)
        for r in results:
            self.assertTrue(r["ready"], r)
            self.assertIn("port %d %d" % (r["port"], r["port"]), r["snapshot"]["stdout_tail"])
            s = self.ok("status", r["job_id"])
            self.assertEqual(s["port"], r["port"])
            self.assertIn(r["port"], s["ports"])
            listed = self.ok("list", "--port", str(r["port"]))["jobs"]
            self.assertEqual([x["job_id"] for x in listed], [r["job_id"]])

    def test_a_port_in_use_is_refused_before_anything_exists(self):
        j = self.ok("run", "--port", "auto", "--", PY, "-c", PORT_ECHO)
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertTrue(j["ready"], j)
        before = job_ids_in(self.root)
        e = self.fail_with("port_in_use", "run", "--port", str(j["port"]), "--", "true")
        self.assertEqual(job_ids_in(self.root), before)
        self.assertEqual(e["error"]["job_id"], j["job_id"])
        self.assertIsInstance(e["error"]["pid"], int)
        self.assertIn(j["job_id"], e["error"]["message"])
        self.usage_error("run", "--port", "0", "--", "true")
        self.usage_error("run", "--port", "x", "--", "true")
        self.usage_error("run", "--port", "auto", "--ready-port", "80", "--", "true")

    def test_a_given_free_port(self):
        port = free_port()
        j = self.ok("run", "--port", str(port), "--", PY, "-c", PORT_ECHO)
        self.addCleanup(self.kill_job, j["job_id"])
        self.assertEqual((j["port"], j["ready"]), (port, True), j)
        self.assertIn("port %d %d" % (port, port), j["snapshot"]["stdout_tail"])

    def test_a_given_port_is_reserved_while_its_job_runs(self):
        j = self.sleeper("--port", "auto")  # reserved, never listened on
        e = self.fail_with("port_in_use", "run", "--port", str(j["port"]), "--", "true")
        self.assertEqual(e["error"]["job_id"], j["job_id"])
        st = self.ok("status", j["job_id"])
        self.assertEqual(st["port"], j["port"])
        self.assertEqual(e["error"]["pid"], st["pid"])  # the reserving job's main pid
        e = self.usage_error("list", "--port", "abc")
        self.assertIn("expected a TCP port 1-65535", e.json["error"]["message"])


class AutoGcTests(FindingTestCase):
    def gc_state(self):
        try:
            return self.read_json(os.path.join(self.root, ".gc-state.json"))
        except (OSError, ValueError):
            return {}

    def run_until(self, env, done, tries=15):
        """Runs (each one's supervisor takes a step of the clean-up) until ``done()``."""
        for _ in range(tries):
            if done():
                return True
            self.done(env=env)
            wait_until(done, 1.0)
        return done()

    def test_run_removes_old_finished_jobs_a_little_at_a_time(self):
        env = self.env(AGENT_EXEC_GC_AFTER="1s")
        off = self.env(AGENT_EXEC_GC_AFTER="off")  # (any other run would start a sweep)
        old = self.done(env=off)
        runner = self.ok("run", "--snapshot-after", "0", "--", "sleep", "60", env=off)["job_id"]
        self.addCleanup(self.kill_job, runner)  # running: never removed
        time.sleep(1.5)
        # The first run's supervisor starts the sweep (one listing of the root),
        # the next ones go on with it, at most one removal each.
        self.assertTrue(self.run_until(env, lambda: old not in job_ids_in(self.root)))
        self.assertTrue(
            self.run_until(env, lambda: self.gc_state().get("offset") == self.gc_state()["total"])
        )
        self.assertEqual(self.gc_state()["total"], 2, self.gc_state())
        self.assertIn(runner, job_ids_in(self.root))
        # The sweep is done: the next one starts an hour later, not now.
        second = self.done(env=env)
        time.sleep(1.5)
        for _ in range(3):
            self.done(env=env)
            time.sleep(0.3)
        self.assertIn(second, job_ids_in(self.root))

    def test_off_disables_it_and_a_bad_value_is_refused(self):
        old = self.done()
        time.sleep(1.5)
        for _ in range(3):
            self.done(env=self.env(AGENT_EXEC_GC_AFTER="off"))
        self.assertIn(old, job_ids_in(self.root))
        before = job_ids_in(self.root)
        r = self.fail_with(
            "invalid_argument", "run", "--", "true", env=self.env(AGENT_EXEC_GC_AFTER="x")
        )
        self.assertIn("AGENT_EXEC_GC_AFTER", r["error"]["message"])
        self.assertEqual(job_ids_in(self.root), before)


if __name__ == "__main__":
    unittest.main()
