"""install and uninstall: a private copy, its bytecode and a launcher, in a
temporary HOME; from the file and piped in."""

import json
import os
import subprocess
import tempfile
import unittest

from tests._util import PY, SCRIPT


class InstallTests(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory(prefix="agent-exec-install-")
        self.addCleanup(tmp.cleanup)
        self.home = tmp.name
        self.env = dict(os.environ, HOME=self.home, PATH="/usr/bin:/bin")
        for key in ("XDG_DATA_HOME", "AGENT_EXEC_ROOT"):
            self.env.pop(key, None)
        self.lib = os.path.join(self.home, ".local", "share", "agent-exec", "lib")
        self.launcher = os.path.join(self.home, ".local", "bin", "agent-exec")

    def call(self, argv, stdin=None):
        proc = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.home,
            timeout=60,
        )
        return proc.returncode, json.loads(proc.stdout.decode())

    def files(self):
        out = []
        for d, _dirs, names in os.walk(self.home):
            out += [os.path.relpath(os.path.join(d, n), self.home) for n in names]
        return sorted(out)

    def test_install_from_the_file_then_upgrade_then_uninstall(self):
        rc, j = self.call([PY, SCRIPT, "install"])
        self.assertEqual(rc, 0, j)
        self.assertEqual(j["type"], "install")
        self.assertEqual(j["launcher_path"], self.launcher)
        self.assertEqual(j["library_path"], os.path.join(self.lib, "agent_exec.py"))
        self.assertTrue(os.path.isfile(j["bytecode_path"]), j)
        self.assertEqual((j["python"], j["upgraded"], j["on_path"]), (PY, False, False))
        with open(SCRIPT, "rb") as a, open(j["library_path"], "rb") as b:
            self.assertEqual(a.read(), b.read())
        with open(self.launcher) as f:
            self.assertEqual(f.readline(), "#!%s -IS\n" % PY)
        self.assertTrue(os.access(self.launcher, os.X_OK))
        # The launcher works, and a job it starts runs (its supervisor too).
        self.env["AGENT_EXEC_ROOT"] = os.path.join(self.home, "jobs")
        rc, r = self.call([self.launcher, "run", "--wait", "--", "echo", "installed"])
        self.assertEqual((rc, r["state"]), (0, "exited"), r)
        self.assertIn("installed", r["final_snapshot"]["stdout_tail"])
        del self.env["AGENT_EXEC_ROOT"]
        # Again: an upgrade in place, on PATH this time.
        self.env["PATH"] = os.path.dirname(self.launcher) + ":/usr/bin:/bin"
        rc, j2 = self.call([PY, SCRIPT, "install"])
        self.assertEqual((rc, j2["upgraded"], j2["on_path"]), (0, True, True), j2)
        # uninstall removes what install wrote, and nothing else.
        keep = os.path.join(os.path.dirname(self.launcher), "mine")
        open(keep, "w").close()
        jobs_file = [f for f in self.files() if f.startswith("jobs/")]
        rc, u = self.call([PY, SCRIPT, "uninstall"])
        self.assertEqual(rc, 0, u)
        self.assertIn(self.launcher, u["removed"])
        self.assertEqual(self.files(), sorted(jobs_file + [".local/bin/mine"]))
        self.assertFalse(os.path.exists(self.lib))
        rc, u = self.call([PY, SCRIPT, "uninstall"])  # nothing left to remove
        self.assertEqual((rc, u["removed"]), (0, []), u)

    def test_install_piped_in(self):
        with open(SCRIPT, "rb") as f:
            source = f.read()
        rc, j = self.call([PY, "-", "install"], stdin=source)
        self.assertEqual(rc, 0, j)
        self.assertEqual(j["library_path"], os.path.join(self.lib, "agent_exec.pyc"))
        self.assertEqual(j["bytecode_path"], j["library_path"])
        self.assertFalse(os.path.exists(os.path.join(self.lib, "agent_exec.py")))
        self.env["AGENT_EXEC_ROOT"] = os.path.join(self.home, "jobs")
        rc, r = self.call([self.launcher, "run", "--wait", "--", "echo", "piped"])
        self.assertEqual((rc, r["state"]), (0, "exited"), r)
        self.assertIn("piped", r["final_snapshot"]["stdout_tail"])
        rc, v = self.call([self.launcher, "status", r["job_id"]])
        self.assertEqual(v["exit_code"], 0, v)
        # Installed from the file afterwards: one copy, the source one.
        rc, j2 = self.call([PY, SCRIPT, "install"])
        self.assertFalse(os.path.exists(os.path.join(self.lib, "agent_exec.pyc")))
        self.assertTrue(j2["upgraded"])

    def test_bin_dir_and_prefix(self):
        bin_dir = os.path.join(self.home, "b")
        prefix = os.path.join(self.home, "p")
        rc, j = self.call([PY, SCRIPT, "install", "--bin-dir", bin_dir, "--prefix", prefix])
        self.assertEqual(rc, 0, j)
        self.assertEqual(j["launcher_path"], os.path.join(bin_dir, "agent-exec"))
        self.assertEqual(j["library_path"], os.path.join(prefix, "lib", "agent_exec.py"))
        rc, u = self.call([PY, SCRIPT, "uninstall", "--prefix", prefix])
        self.assertEqual(rc, 0, u)
        self.assertEqual(os.listdir(bin_dir), [])
        rc, e = self.call([PY, SCRIPT, "install", "--prefix", ""])
        self.assertEqual((rc, e["error"]["code"]), (2, "usage_error"), e)

    def test_uninstall_keeps_a_launcher_that_is_no_longer_its_own(self):
        rc, j = self.call([PY, SCRIPT, "install"])
        with open(self.launcher, "w") as f:  # the user put their own in its place
            f.write("#!/bin/sh\necho mine\n")
        rc, u = self.call([PY, SCRIPT, "uninstall"])
        self.assertEqual(rc, 0, u)
        self.assertNotIn(self.launcher, u["removed"])
        with open(self.launcher) as f:
            self.assertIn("mine", f.read())
        # Two prefixes, one launcher: it belongs to the second; uninstalling the
        # first leaves it.
        os.unlink(self.launcher)
        p1, p2 = os.path.join(self.home, "p1"), os.path.join(self.home, "p2")
        self.call([PY, SCRIPT, "install", "--prefix", p1])
        self.call([PY, SCRIPT, "install", "--prefix", p2])
        rc, u = self.call([PY, SCRIPT, "uninstall", "--prefix", p1])
        self.assertNotIn(self.launcher, u["removed"])
        self.assertTrue(os.path.exists(self.launcher))
        rc, u = self.call([PY, SCRIPT, "uninstall", "--prefix", p2])
        self.assertIn(self.launcher, u["removed"])

    def test_an_agent_exec_that_install_did_not_write_is_left_alone(self):
        bin_dir = os.path.join(self.home, "b")
        os.mkdir(bin_dir)
        theirs = os.path.join(bin_dir, "agent-exec")
        with open(theirs, "w") as f:
            f.write("#!/bin/sh\necho pip's agent-exec\n")
        rc, e = self.call([PY, SCRIPT, "install", "--bin-dir", bin_dir])
        self.assertEqual((rc, e["error"]["code"]), (1, "invalid_argument"), e)
        self.assertIn("--bin-dir", e["error"]["message"])
        with open(theirs) as f:
            self.assertIn("pip's", f.read())
        self.assertFalse(os.path.exists(self.lib))  # nothing written at all


if __name__ == "__main__":
    unittest.main()
