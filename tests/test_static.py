"""Static checks that guard security properties: no SQL built from strings (ruff's bandit rules)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
# The flake8-bandit rules ("S"), S608 (SQL built from strings) among them. S101 (assert) is
# fine outside tests' concerns here; nothing else is ignored.
COMMAND = [RUFF, "check", "--no-cache", "--select", "S", "--ignore", "S101"]


def test_no_string_built_sql_or_other_bandit_findings():
    done = subprocess.run([*COMMAND, "maxtwo_cli", "daemon"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_catches_string_built_sql(tmp_path):
    """The check is live: a query built with an f-string is flagged."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "def find(conn, name):\n"
        "    return conn.execute(f\"SELECT id FROM users WHERE name = '{name}'\")\n"
    )
    done = subprocess.run([*COMMAND, str(sample)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "S608" in done.stdout
