from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    _run_it, test_it = _readme_commands()[:2]
    assert "pytest" in test_it
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert test_it in ci_lines


def test_readme_run_command_installs_without_the_test_extra():
    run_it = _readme_commands()[0]
    assert "[test]" not in run_it and "maxtwo" in run_it
