"""Every option of every command, given an out-of-range, wrong-type or empty value: exit 2 and
one line on stderr, no traceback, nothing created; and every other error as one line, masked,
with what was done all the same."""

from __future__ import annotations

import os
import subprocess

import pytest
from typer.testing import CliRunner

from maxtwo_cli import cli
from maxtwo_cli.cli import app
from maxtwo_cli.core.errors import ConfigurationError
from tests.serve_process import MAXTWO, maxtwo_command
from tests.test_cli import assert_one_line_error, invoke

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
# A key no latin-1 output can show, for the tests of what the CLI does with it on the way out. It
# goes in as UTF-8 bytes to a child in UTF-8 mode, so that an ASCII locale with UTF-8 mode turned
# off (LC_ALL=C PYTHONUTF8=0) stops it neither in this process nor in the child's argv.
SNOWMAN = "\u2603".encode()
UTF8_ARGV = {"PYTHONUTF8": "1"}


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
        check=False, capture_output=True, encoding="utf-8", timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "--port" in done.stderr


def test_output_that_cannot_be_written_is_one_line_saying_what_was_done(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with open("/dev/full", "w", encoding="utf-8") as full:  # every write: ENOSPC, as on a full disk
        applied = maxtwo_command("increment", "k", "1", "--database-url", url, stdout=full)
        version = maxtwo_command("--version", stdout=full)
    # A script that retried the increment on exit 1 would count it twice: the line says it is in.
    assert applied.returncode == 1 and applied.stderr.count("\n") == 1, applied.stderr
    assert "cannot write the output" in applied.stderr and "the increment is committed (total 1)" in applied.stderr
    assert version.returncode == 1 and version.stderr.count("\n") == 1, version.stderr
    assert "Traceback" not in applied.stderr + version.stderr
    assert maxtwo_command("counters", "--json", "--database-url", url).stdout == '{"counters": [{"key": "k", "value": 1}]}\n'


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
        applied = maxtwo_command("increment", "k", "1", "--database-url", url, stdout=writer)
        # `maxtwo counters | head`: a reader that stopped early is told nothing.
        listed = maxtwo_command("counters", "--database-url", url, stdout=writer)
        # `maxtwo query | true`: the query is recorded, whether rich or print writes the answer.
        queried = [maxtwo_command("query", *json, "--database-url", url, stdout=writer) for json in ([], ["--json"])]
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
    applied = maxtwo_command("increment", SNOWMAN, "1", "--database-url", url, PYTHONIOENCODING="latin-1", **UTF8_ARGV)
    listed = maxtwo_command("counters", "--database-url", url, PYTHONIOENCODING="latin-1")
    assert (applied.returncode, applied.stdout) == (0, "\\u2603: 1\n"), applied.stderr
    assert listed.returncode == 0 and "\\u2603" in listed.stdout, listed.stderr
    assert len({len(line) for line in listed.stdout.splitlines()}) == 1, listed.stdout  # measured as shown


def test_a_database_path_that_is_not_utf8_is_one_line(tmp_path):
    given = maxtwo_command("query", "--database-url", os.fsencode(f"sqlite:///{tmp_path}/") + b"caf\xe9.db")
    default = maxtwo_command("query", XDG_DATA_HOME=str(tmp_path / os.fsdecode(b"caf\xe9")))
    for done in (given, default):
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "caf\\xe9" in done.stderr and "not UTF-8" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_closed_standard_output_is_an_error_not_silence(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    done = subprocess.run(["sh", "-c", f'"{MAXTWO}" increment k 1 --database-url "{url}" >&-'],
                          check=False, capture_output=True, encoding="utf-8", timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "standard output is closed" in done.stderr and "the increment is committed (total 1)" in done.stderr


@pytest.mark.parametrize(("args", "done"), [
    (["increment", "k", "1"], "the increment is committed (total 1)"),
    (["seed", "--count", "10"], "the 10 users are committed"),
    (["randomize", "--timing"], "the randomization is committed"),
])
def test_a_full_disk_says_exactly_what_was_committed(tmp_path, args, done):
    with open("/dev/full", "w", encoding="utf-8") as full:
        result = maxtwo_command(*args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}", stdout=full)
    assert (result.returncode, result.stderr) == (1, f"Error: cannot write the output (No space left on device); {done}\n")


def test_a_usage_error_points_to_its_command_s_help():
    result = invoke("query", "--bogus")
    assert (result.exit_code, result.stderr) == (2, "Error: No such option: --bogus (see maxtwo query --help)\n")


def test_a_missing_option_value_after_a_negative_value_names_the_option():
    # `-5` is an argument here (a negative increment), not an option to complain of.
    assert_one_line_error(invoke("increment", "a", "-5", "--database-url"), "'--database-url' requires an argument",
                          exit_code=2)


def test_a_blank_database_url_is_empty_too(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert_one_line_error(invoke("query", "--database-url", "  "), "--database-url", "empty", exit_code=2)
    assert "MAXTWO_DATABASE_URL" not in invoke("query", "--database-url", "  ").stderr
    # From the variable, the error names it (a review: it named the option alone).
    monkeypatch.setenv("MAXTWO_DATABASE_URL", " ")
    assert_one_line_error(invoke("query"), "MAXTWO_DATABASE_URL", "empty", exit_code=2)
    assert not list(tmp_path.iterdir())


def test_no_default_database_is_one_line_and_exit_1(monkeypatch):
    def nowhere():
        raise ConfigurationError("no home directory for the default database")

    monkeypatch.setattr(cli, "default_database_url", nowhere)
    assert_one_line_error(invoke("query"), "no home directory")


def test_a_usage_error_on_the_journal_s_stream_is_stored_as_an_error(tmp_path):
    """A unit whose environment file says MAXTWO_THREADS=1 fails to start with exit 2: its line,
    as every other error line, goes to the journal as an error (test_cli.py has the runtime one)."""
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        found = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}", "MAXTWO_THREADS": "1"}
        done = subprocess.run([str(MAXTWO), "serve", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"],
                              stdout=subprocess.DEVNULL, stderr=stderr, timeout=60, check=False, env=env)
    assert done.returncode == 2
    assert stderr_path.read_text(encoding="utf-8").startswith("<3>Error: Invalid value for '--threads'")


def test_debug_tracebacks_show_no_local_variables():
    """MAXTWO_DEBUG=1: Typer's traceback with its locals would print the URL and its password."""
    done = maxtwo_command("query", "--database-url", "postgresql://maxtwo:Pw0rdSecret@127.0.0.1:1/maxtwo",
                          MAXTWO_DEBUG="1")
    assert done.returncode == 1
    assert "Traceback" in done.stderr  # the debug output is there ...
    assert "Pw0rdSecret" not in done.stdout + done.stderr  # ... and the password is not


def test_only_maxtwo_debug_1_shows_a_traceback():
    result = invoke("query", "--database-url", "mysql://root@localhost/db", env={"MAXTWO_DEBUG": "0"})
    assert_one_line_error(result, "unsupported database 'mysql'")


def test_an_unexpected_error_is_one_line_masked_with_the_debug_hint(monkeypatch):
    # The core masks its own errors; the CLI masks whatever else reaches it.
    def broken(settings):
        raise RuntimeError("driver said: password 'Pw0rdSecret' rejected")

    monkeypatch.setattr(cli, "_open", broken)
    result = invoke("query", "--database-url", "postgresql://maxtwo:Pw0rdSecret@127.0.0.1:1/maxtwo")
    assert_one_line_error(result, "unexpected RuntimeError: driver said: password '***' rejected",
                          "(set MAXTWO_DEBUG=1 for details)")
    assert "Pw0rdSecret" not in result.output


def test_the_error_of_a_refused_url_is_masked_too(monkeypatch):
    def refused(settings):
        raise ConfigurationError("cannot use postgresql://u:Pw0rdSecret@db.example/maxtwo")

    monkeypatch.setattr(cli, "_open", refused)
    result = invoke("query", "--database-url", "mysql://u:Pw0rdSecret@db.example/maxtwo")
    assert_one_line_error(result, "postgresql://u:***@db.example/maxtwo")
    assert "Pw0rdSecret" not in result.output


def test_an_error_message_is_not_read_as_rich_markup(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert invoke("increment", "[red]c[/red]", str(2**63 - 1), "--database-url", url).exit_code == 0
    assert_one_line_error(invoke("increment", "[red]c[/red]", "1", "--database-url", url), "'[red]c[/red]'",
                          "keeps its value")


def test_an_error_quoting_a_key_the_output_cannot_encode_is_escaped(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert maxtwo_command("increment", SNOWMAN, str(2**63 - 1), "--database-url", url, **UTF8_ARGV).returncode == 0
    done = maxtwo_command("increment", SNOWMAN, "1", "--database-url", url, PYTHONIOENCODING="latin-1:strict", **UTF8_ARGV)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("Error: adding 1 to counter '\\u2603' would take it out")
