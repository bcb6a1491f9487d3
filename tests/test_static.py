"""Static checks: `ruff check .` finds nothing under pyproject.toml's [tool.ruff] rules, and the
bandit rules guard security properties, no SQL built from strings above all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# NOTE: the ruff installed beside this interpreter, the one the test extra pins (its rule set
# changes between minor releases and these checks demand zero findings), before any on PATH.
_BESIDE = Path(sys.executable).with_name("ruff")
RUFF = str(_BESIDE) if _BESIDE.exists() else (shutil.which("ruff") or "ruff")
# The flake8-bandit rules ("S"), S608 (SQL built from strings) among them. S101 (assert) is
# fine outside tests' concerns here; nothing else is ignored.
COMMAND = [RUFF, "check", "--no-cache", "--select", "S", "--ignore", "S101"]
# The whole project with its own configuration: what a developer runs as `ruff check .`.
PROJECT_COMMAND = [RUFF, "check", "--no-cache", "--output-format", "concise"]
PACKAGES = ("maxtwo_cli", "daemon", "tests", "bench", "devtools")


def test_no_string_built_sql_or_other_bandit_findings():
    done = subprocess.run([*COMMAND, "maxtwo_cli", "daemon"], cwd=ROOT, check=False, capture_output=True, encoding="utf-8")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_catches_string_built_sql(tmp_path):
    """The check is live: a query built with an f-string is flagged."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "def find(conn, name):\n"
        "    return conn.execute(f\"SELECT id FROM users WHERE name = '{name}'\")\n"
    )
    done = subprocess.run([*COMMAND, str(sample)], check=False, capture_output=True, encoding="utf-8")
    assert done.returncode == 1
    assert "S608" in done.stdout


def test_ruff_finds_nothing_in_the_project():
    """`ruff check .` over every file ruff sees (tests, bench and devtools too): zero findings."""
    done = subprocess.run([*PROJECT_COMMAND, "."], cwd=ROOT, check=False, capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_sees_every_python_file_of_the_project():
    """Zero findings above means something only if no package was left out of the check."""
    done = subprocess.run([RUFF, "check", "--show-files", "."], cwd=ROOT, check=False, capture_output=True, encoding="utf-8",
                          timeout=60)
    assert done.returncode == 0, done.stderr
    shown = {Path(line) for line in done.stdout.splitlines()}
    ours = {path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}
    assert ours, PACKAGES
    assert sorted(ours - shown) == []


def test_the_project_configuration_is_live(tmp_path):
    """pyproject.toml's rules are the ones applied: a file breaking a few of them is flagged."""
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import subprocess\n"
        "\n"
        "\n"
        "def run(name):\n"
        "    subprocess.run(['echo', name])\n"
        "    return ['one' 'two', f\"SELECT id FROM users WHERE name = '{name}'\"]\n"
    )
    config = ROOT / "pyproject.toml"
    done = subprocess.run([*PROJECT_COMMAND, "--config", str(config), str(sample)], cwd=tmp_path, check=False,
                          capture_output=True, encoding="utf-8", timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    for code in ("PLW1510", "ISC004", "S608"):
        assert code in done.stdout, done.stdout
