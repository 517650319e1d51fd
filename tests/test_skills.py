"""install-skills: agent-exec's own SKILL.md, or a local skill folder, where
agent harnesses load skills; the lock file; the errors.  In a temporary HOME
and working directory."""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from tests._util import CLI, check_strictly


class InstallSkillsTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="agent-exec-skills-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home = os.path.join(self.tmp, "home")
        self.work = os.path.join(self.tmp, "work")
        os.makedirs(self.home)
        os.makedirs(self.work)
        self.env = dict(os.environ, HOME=self.home)

    def call(self, *args, cwd=None):
        proc = subprocess.run(
            CLI + ["install-skills"] + list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=cwd or self.work,
            timeout=60,
        )
        answer = json.loads(proc.stdout.decode())
        check_strictly(answer)
        return proc.returncode, answer

    def lock(self, path):
        with open(path) as f:
            return json.load(f)

    def test_self_into_the_current_directory(self):
        code, answer = self.call()
        self.assertEqual(code, 0, answer)
        self.assertEqual(answer["type"], "install_skills")
        self.assertIs(answer["global"], False)
        skill = os.path.join(self.work, ".agents", "skills", "agent-exec")
        self.assertEqual(
            answer["skills"], [{"name": "agent-exec", "source_type": "self", "path": skill}]
        )
        with open(os.path.join(skill, "SKILL.md")) as f:
            text = f.read()
        self.assertTrue(text.startswith("---\nname: agent-exec\ndescription: "))
        for word in ("run", "read", "wait", "cursor", "kill", "ready", "exit_code"):
            self.assertIn(word, text)
        lock_path = os.path.join(self.work, ".agents", ".skill-lock.json")
        self.assertEqual(answer["lock_file_path"], lock_path)
        entries = self.lock(lock_path)["skills"]
        self.assertEqual([e["name"] for e in entries], ["agent-exec"])
        self.assertEqual(entries[0]["source_type"], "self")
        self.assertEqual(entries[0]["path"], skill)
        # Again: replaced, still one entry.
        self.assertEqual(self.call()[0], 0)
        self.assertEqual(len(self.lock(lock_path)["skills"]), 1)

    def test_global_and_claude(self):
        code, answer = self.call("--global", "--claude")
        self.assertEqual(code, 0, answer)
        self.assertIs(answer["global"], True)
        skill = os.path.join(self.home, ".claude", "skills", "agent-exec")
        self.assertEqual(answer["skills"][0]["path"], skill)
        self.assertTrue(os.path.isfile(os.path.join(skill, "SKILL.md")))
        self.assertEqual(
            answer["lock_file_path"], os.path.join(self.home, ".claude", ".skill-lock.json")
        )
        self.assertFalse(os.path.exists(os.path.join(self.work, ".agents")))

    def test_local_folder(self):
        src = os.path.join(self.tmp, "mine")
        os.makedirs(os.path.join(src, "scripts"))
        with open(os.path.join(src, "SKILL.md"), "w") as f:
            f.write("---\nname: my-skill\ndescription: test skill\n---\nDo things.\n")
        with open(os.path.join(src, "scripts", "helper.sh"), "w") as f:
            f.write("echo hi\n")
        self.call()  # agent-exec's own first: the lock keeps both
        code, answer = self.call("--source", "local:" + src)
        self.assertEqual(code, 0, answer)
        skill = os.path.join(self.work, ".agents", "skills", "my-skill")
        self.assertEqual(
            answer["skills"], [{"name": "my-skill", "source_type": "local", "path": skill}]
        )
        self.assertTrue(os.path.isfile(os.path.join(skill, "scripts", "helper.sh")))
        names = [e["name"] for e in self.lock(answer["lock_file_path"])["skills"]]
        self.assertEqual(sorted(names), ["agent-exec", "my-skill"])

    def test_errors(self):
        code, answer = self.call("--source", "github:user/repo")
        self.assertEqual(code, 1)
        self.assertEqual(answer["error"]["code"], "unknown_source_scheme")
        code, answer = self.call("--source", "bogus")
        self.assertEqual(answer["error"]["code"], "unknown_source_scheme")
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty)
        code, answer = self.call("--source", "local:" + empty)
        self.assertEqual(code, 1)
        self.assertEqual(answer["error"]["code"], "invalid_argument")
        self.assertIn("SKILL.md", answer["error"]["message"])
        code, answer = self.call("--source", "local:" + os.path.join(self.tmp, "nowhere"))
        self.assertEqual(answer["error"]["code"], "invalid_argument")
        self.assertFalse(os.path.exists(os.path.join(self.work, ".agents")))


if __name__ == "__main__":
    unittest.main()
