"""The design notes the code cites are in the repository (issue 21: code and tests cited a design file that was not)."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_markdown_file_the_code_cites_is_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [f for f in tracked if f.endswith((".py", ".sh", ".toml"))]
    cited = {}
    for f in files:
        for m in re.finditer(r"\b([\w./-]+\.md)\b", open(os.path.join(ROOT, f), encoding="utf-8").read()):
            cited.setdefault(m.group(1), f)
    assert "docs/architecture.md" in cited
    docs = [f for f in tracked if f.endswith(".md")]
    missing = {name: f for name, f in cited.items() if not os.path.isfile(os.path.join(ROOT, name))
               and not any(d.endswith("/" + name) for d in docs)}
    assert not missing, f"cited but not in the repository: {missing}"
