"""Every option of every command, given an out-of-range, wrong-type or empty value: exit 2 and
one line on stderr, no traceback, nothing created."""

from __future__ import annotations

import os
import subprocess

import pytest
from typer.testing import CliRunner

from maxtwo_cli.cli import app
from tests.serve_process import MAXTWO

runner = CliRunner()

BAD_VALUES = [
    ("seed", "--count", ["-1", "abc", "", "1.5"]),
    ("serve", "--port", ["0", "65536", "-1", "http", ""]),
    # One thread alone would be taken by the first read the database never answers.
    ("serve", "--threads", ["0", "1", "-3", "many", ""]),
    ("serve", "--interval", ["0", "-1", "soon", "", "1e-12", "0.09"]),
    ("serve", "--seed-count", ["-1", "lots", ""]),
]
CASES = [(command, option, value) for command, option, values in BAD_VALUES for value in values]


@pytest.mark.parametrize(("command", "option", "value"), CASES)
def test_bad_option_values_are_one_line_usage_errors(command, option, value, tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    result = runner.invoke(app, [command, option, value, "--database-url", url])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and option in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "maxtwo.db").exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MAXTWO_PORT", "70000"), ("MAXTWO_THREADS", "0"), ("MAXTWO_INTERVAL", "x"), ("MAXTWO_SEED_COUNT", "-5")],
)
def test_bad_environment_values_are_usage_errors_too(variable, value, tmp_path):
    result = runner.invoke(app, ["serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"], env={variable: value})
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and variable in result.stderr


@pytest.mark.parametrize("args", [["--database-url"], ["seed", "--count"], ["nonsense"], ["query", "extra"]])
def test_missing_values_and_unknown_words(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_the_installed_command_gives_the_same_single_line(tmp_path):
    done = subprocess.run(
        [str(MAXTWO), "serve", "--port", "99999", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--port" in done.stderr


def maxtwo(*args: str, stdout=subprocess.PIPE, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(MAXTWO), *args], check=False, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=60, env=env)


def test_output_that_cannot_be_written_is_one_line_saying_what_was_done(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with open("/dev/full", "w") as full:  # every write: ENOSPC, as on a full disk
        applied = maxtwo("increment", "k", "1", "--database-url", url, stdout=full)
        version = maxtwo("--version", stdout=full)
    # A script that retried the increment on exit 1 would count it twice: the line says it is in.
    assert applied.returncode == 1 and applied.stderr.count("\n") == 1, applied.stderr
    assert "cannot write the output" in applied.stderr and "the increment is committed (total 1)" in applied.stderr
    assert version.returncode == 1 and version.stderr.count("\n") == 1, version.stderr
    assert "Traceback" not in applied.stderr + version.stderr
    assert maxtwo("counters", "--json", "--database-url", url).stdout == '{"counters": [{"key": "k", "value": 1}]}\n'


def closed_pipe() -> int:
    """The writing end of a pipe whose reader is gone: every write fails with EPIPE."""
    reader, writer = os.pipe()
    os.close(reader)
    return writer


def test_a_closed_pipe_says_what_was_done_and_nothing_when_nothing_was(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    writer = closed_pipe()
    try:
        # `maxtwo increment k 1 | head -c0`: the increment is in, and the line says so.
        applied = maxtwo("increment", "k", "1", "--database-url", url, stdout=writer)
        # `maxtwo counters | head`: a reader that stopped early is told nothing.
        listed = maxtwo("counters", "--database-url", url, stdout=writer)
        # `maxtwo query | true`: the query is recorded, whether rich or print writes the answer.
        queried = [maxtwo("query", *json, "--database-url", url, stdout=writer) for json in ([], ["--json"])]
    finally:
        os.close(writer)
    assert applied.returncode == 1 and applied.stderr.count("\n") == 1, applied.stderr
    assert "Broken pipe" in applied.stderr and "the increment is committed (total 1)" in applied.stderr
    assert (listed.returncode, listed.stderr) == (1, "")
    for result in queried:
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "Broken pipe" in result.stderr and "the query is recorded" in result.stderr


def test_a_key_the_terminal_cannot_show_is_shown_escaped(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    latin_1 = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    applied = maxtwo("increment", "\u2603", "1", "--database-url", url, env=latin_1)
    listed = maxtwo("counters", "--database-url", url, env=latin_1)
    assert (applied.returncode, applied.stdout) == (0, "\\u2603: 1\n"), applied.stderr
    assert listed.returncode == 0 and "\\u2603" in listed.stdout, listed.stderr
    assert len({len(line) for line in listed.stdout.splitlines()}) == 1, listed.stdout  # measured as shown


def test_a_closed_standard_output_is_an_error_not_silence(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    done = subprocess.run(["sh", "-c", f'"{MAXTWO}" increment k 1 --database-url "{url}" >&-'],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "standard output is closed" in done.stderr and "the increment is committed (total 1)" in done.stderr
