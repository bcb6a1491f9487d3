from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import daemon
from maxtwo_cli import __version__
from maxtwo_cli.cli import app
from tests.serve_process import maxtwo_command

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env={"MAXTWO_DEBUG": None, **(env or {})})


def assert_one_line_error(result, *fragments: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"maxtwo {__version__}"


@pytest.mark.parametrize("command", ["seed", "randomize", "query"])
def test_every_command_help_has_an_example_and_the_env_var(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert f"Example: maxtwo {command}" in result.stdout
    assert "MAXTWO_DATABASE_URL" in result.stdout


def test_serve_help_shows_every_numeric_options_range():
    shown = " ".join(invoke("serve", "--help").stdout.split())
    for allowed in ("1<=x<=65535", "2<=x<=256", "0.1<=x<=86400", "0<=x<=2147483647"):
        assert allowed in shown, allowed


def test_help_never_shows_the_database_url_from_the_environment():
    env = {"MAXTWO_DATABASE_URL": "postgresql://u:s3cret@localhost/db"}
    for command in ([], ["seed"], ["randomize"], ["query"]):
        result = invoke(*command, "--help", env=env)
        assert "s3cret" not in result.output


def assert_rate(printed: re.Match | None, rows: int) -> None:
    """The rows/s printed is the rows over the seconds printed, to their rounding (however short
    the run: a rate of 0 for runs under a second passed every test once, a mutation audit)."""
    assert printed is not None
    seconds, rate = printed.group(1), float(printed.group(2).replace(",", ""))
    half_digit = 0.5 * 10 ** -len(seconds.partition(".")[2])
    assert rows / (float(seconds) + half_digit) - 1 <= rate, (seconds, rate)
    if float(seconds) > half_digit:
        assert rate <= rows / (float(seconds) - half_digit) + 1, (seconds, rate)


def test_seed_randomize_query_round_trip(database_url):
    result = invoke("seed", "--count", "2000", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert_rate(re.fullmatch(r"seeded 2,000 users in ([\d.]+) s \(([\d,]+) rows/s\)\n", result.stdout), 2000)

    result = invoke("randomize", "--timing", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert_rate(re.fullmatch(r"randomized 2,000 users in ([\d.]+) s \(([\d,]+) rows/s\)\n", result.stdout), 2000)

    result = invoke("randomize", "--database-url", database_url)
    assert result.exit_code == 0 and result.stdout == ""

    result = invoke("query", "--json", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["timestamp"] is None
    assert len(body["users"]) <= 2
    assert all(set(user) == {"id", "points"} for user in body["users"])

    result = invoke("query", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert re.search(r"previous query: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", result.stdout)
    assert "max_number" not in result.stdout


def test_query_on_a_fresh_database_says_never(database_url):
    result = invoke("query", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "previous query: never" in result.stdout


def test_database_url_from_the_environment(database_url):
    result = invoke("seed", "--count", "10", env={"MAXTWO_DATABASE_URL": database_url})
    assert result.exit_code == 0, result.output


def test_seed_twice_names_reset(database_url):
    assert invoke("seed", "--count", "10", "--database-url", database_url).exit_code == 0
    result = invoke("seed", "--count", "10", "--database-url", database_url)
    assert_one_line_error(result, "--reset", "10 users")
    result = invoke("seed", "--count", "20", "--reset", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    # No rows/s: the time holds the removal of the 10 (2 users "at 12 rows/s", an audit).
    assert re.fullmatch(r"replaced 10 users with 20 in [\d.]+ s\n", result.stdout)


@pytest.mark.parametrize("value", ["-1", "abc", "", str(2**31), "99999999999999999999"])
def test_bad_count_is_a_usage_error(value, tmp_path):
    result = invoke("seed", "--count", value, "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(("option", "value"), [("--threads", "0"), ("--threads", "257"),
                                               ("--threads", "100000000"), ("--seed-count", str(2**31))])
def test_serve_refuses_out_of_range_numbers_before_starting(option, value, tmp_path):
    result = invoke("serve", option, value, "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line_error(result, option, exit_code=2)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--threads", "1"], {}, "Invalid value for '--threads': 1 is not in the range"),
        (["serve", "--threads", "1"], {"MAXTWO_THREADS": "8"}, "Invalid value for '--threads': 1 is not"),
        (["serve"], {"MAXTWO_THREADS": "1"}, "'--threads' (env var: 'MAXTWO_THREADS'): 1 is not in the range"),
        (["serve", "--port", "abc"], {}, "Invalid value for '--port': 'abc' is not an integer."),
        (["serve", "--port", "it's"], {}, """Invalid value for '--port': "it's" is not an integer."""),
        (["serve"], {"MAXTWO_PORT": "abc"}, "(env var: 'MAXTWO_PORT'): 'abc' is not an integer."),
        (["serve", "--interval", "abc"], {}, "Invalid value for '--interval': 'abc' is not a number."),
        (["seed", "--count", "1.5"], {}, "Invalid value for '--count': '1.5' is not an integer."),
        (["counters", "--limit", "x"], {}, "Invalid value for '--limit': 'x' is not an integer."),
    ],
)
def test_a_bad_number_says_where_it_came_from_in_plain_words(args, env, expected, tmp_path):
    """The environment variable is named only when the value came from it (Typer named it
    always: `--threads 1` sent users looking for a MAXTWO_THREADS they never set)."""
    result = invoke(*args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}", env=env)
    assert_one_line_error(result, expected, exit_code=2)
    if not env:
        assert "env var" not in result.stderr


def test_an_error_on_the_journal_s_stream_is_stored_as_an_error(tmp_path):
    """`maxtwo serve` failing to start under systemd: its one line went to the journal at
    "info", and `journalctl -p warning` missed it (a review)."""
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as stderr:
        found = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}", "MAXTWO_DEBUG": ""}
        done = subprocess.run([sys.executable, "-m", "maxtwo_cli", "query", "--database-url", "mysql://u@h/db"],
                              stderr=stderr, stdout=subprocess.DEVNULL, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert stderr_path.read_text(encoding="utf-8").startswith("<3>Error: unsupported database 'mysql'")


@pytest.mark.parametrize("stderr", ["closed", "full"])
def test_an_error_that_stderr_cannot_take_keeps_its_exit_status_and_stays_out_of_stdout(stderr):
    """`2>&-`: the line went to stdout, into the data a script reads; `2>/dev/full`: exit 1 for a
    usage error (a review)."""
    redirect = "2>&-" if stderr == "closed" else "2>/dev/full"
    for args in ('increment "" 1', ""):  # a bad argument; `maxtwo` alone (its help on stderr)
        done = subprocess.run(["sh", "-c", f'exec "$0" -m maxtwo_cli {args} {redirect}', sys.executable],
                              stdout=subprocess.PIPE, env={**os.environ, "MAXTWO_DEBUG": ""}, timeout=60, check=False)
        assert (done.returncode, done.stdout) == (2, b""), args


def test_unknown_option_is_a_usage_error():
    assert invoke("query", "--bogus").exit_code == 2


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://root:s3cret@localhost/db", "unsupported database 'mysql'"),
        ("definitely not a url s3cret", "cannot be parsed"),
        ("postgresql://maxtwo:s3cret@127.0.0.1:1/maxtwo", "check that the server is running"),
        ("postgresql://maxtwo@127.0.0.1:1/maxtwo?password=s3cret", "/maxtwo?password=*** (connection failed"),  # the mask left the URL whole
        ("postgresql://maxtwo:pa@s3cret@127.0.0.1:1/maxtwo", "percent-encode"),
        ("postgresql://maxtwo:pa:s3cret@db:5432x/maxtwo", "cannot be parsed"),
        ("postgresql://maxtwo:s3cret@127.0.0.1/maxtwo?port=abc", "non-integer port"),
        ("postgresql://maxtwo:s3cret@db1:5432,db2:5432/maxtwo", "several hosts are written ?host="),
    ],
)
def test_bad_database_urls_are_one_line_errors(url, fragment):
    result = invoke("query", "--database-url", url)
    assert_one_line_error(result, fragment)
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    "url",
    [
        *(f"postgresql://maxtwo:{password}@127.0.0.1:1/maxtwo"
          for password in ("Sup3r@Secret/PW", "Sup3r@Sec?x=retPW", "Sup3r@[SecretPW]", "Sup3r@Sec/r?e[t")),
        # A query's password: the port's ":" taken for the start of a password (a second review).
        "postgresql://maxtwo@127.0.0.1:1/maxtwo?password=Sup3r@SecretPW",
        "postgresql://maxtwo@[::1]/maxtwo?password=Sup3r@SecretPW",
        "postgresql://127.0.0.1:1/maxtwo?password=Sup3r@SecretPW",
    ],
)
def test_an_unencoded_at_sign_in_the_password_shows_none_of_it(url):
    # SQLAlchemy ends the password at its first "@": what follows went into the host, the
    # database name or the query, and so into the error message (and a DNS lookup).
    result = invoke("query", "--database-url", url)
    assert_one_line_error(result, "percent-encoded")
    for fragment in ("Sup3r", "Sec", "ret", "PW"):
        assert fragment not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://maxtwo:pa/ss@127.0.0.1:1/maxtwo",  # RFC 3986 wants %2F; SQLAlchemy reads it right
        "postgresql://maxtwo:pa%40ss%3F@127.0.0.1:1/maxtwo",
        "postgresql://maxtwo:s3cret@[::1]:1/maxtwo",
        "postgresql://maxtwo@127.0.0.1:1/maxtwo?password=Sup3r%40SecretPW",
    ],
)
def test_unambiguous_urls_with_a_password_are_taken(url):
    result = invoke("query", "--database-url", url)
    assert_one_line_error(result, "check that the server is running")


def test_an_at_sign_in_the_user_name_is_still_taken():
    # Azure's USER@SERVER user names: SQLAlchemy takes the "@" before the ":" into the user name.
    result = invoke("query", "--database-url", "postgresql://admin@myserver:s3cret@127.0.0.1:1/maxtwo")
    assert_one_line_error(result, "admin%40myserver:***@127.0.0.1:1", "check that the server is running")


def test_several_hosts_are_tried_in_turn(postgres_url):
    # libpq's failover, as SQLAlchemy writes it: the first host refuses, the second answers.
    url = sa.make_url(postgres_url)
    hosts = sa.URL.create(url.drivername, url.username, url.password, database=url.database, query={
        **url.query, "host": ["127.0.0.1:1", f"{url.host}:{url.port}"], "target_session_attrs": "read-write",
    })
    result = invoke("seed", "--count", "10", "--database-url", hosts.render_as_string(hide_password=False))
    assert result.exit_code == 0, result.output


def test_a_search_path_naming_no_schema_says_to_create_it(postgres_url):
    # README's ?options=-csearch_path%3Dmaxtwo before the schema exists (a review): PostgreSQL's
    # own words alone ("no schema has been selected to create in") did not say what to do.
    url = sa.make_url(postgres_url).update_query_dict({"options": "-csearch_path=maxtwo_missing"})
    result = invoke("query", "--database-url", url.render_as_string(hide_password=False))
    assert_one_line_error(result, "no schema has been selected", "create the schema that search_path names")


@pytest.mark.parametrize("command", ["query", "serve", "counters"])
def test_an_empty_database_url_is_a_usage_error_not_the_default(command, tmp_path, monkeypatch):
    # `--database-url "$URL"` with $URL unset must not write to the default SQLite file.
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    result = invoke(command, "--database-url", "")
    assert_one_line_error(result, "--database-url", "empty", exit_code=2)
    assert not list(tmp_path.iterdir())


def test_wrong_password_is_one_line_and_never_printed(postgres_server):
    url = sa.make_url(postgres_server.url).set(password="wrong-s3cret")
    result = invoke("query", "--database-url", url.render_as_string(hide_password=False))
    assert_one_line_error(result, "password", "***")
    assert "wrong-s3cret" not in result.output
    assert postgres_server.password not in result.output


def test_the_real_password_never_appears_in_any_output(postgres_url, postgres_server):
    outputs = [
        invoke("seed", "--count", "100", "--database-url", postgres_url).output,
        invoke("seed", "--count", "100", "--database-url", postgres_url).output,  # an error
        invoke("randomize", "--timing", "--database-url", postgres_url).output,
        invoke("query", "--database-url", postgres_url).output,
    ]
    assert all(postgres_server.password not in output for output in outputs)


def test_unwritable_sqlite_directory_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = invoke("query", "--database-url", f"sqlite:///{blocker / 'sub' / 'maxtwo.db'}")
    assert_one_line_error(result, "SQLite file")


def test_a_sqlite_path_that_is_a_directory_is_said_to_be_one(tmp_path):
    result = invoke("query", "--database-url", f"sqlite:///{tmp_path}")
    assert_one_line_error(result, "it is a directory")


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(
        app,
        ["query", "--database-url", "mysql://root@localhost/db"],
        env={"MAXTWO_DEBUG": "1"},
    )
    assert result.exit_code == 1
    assert result.exception is not None and type(result.exception).__name__ == "ConfigurationError"


def test_installed_maxtwo_runs_as_a_subprocess(tmp_path):
    executable = Path(sys.executable).with_name("maxtwo")
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    subprocess.run([executable, "seed", "--count", "100", "--database-url", url], check=True, timeout=60)
    done = subprocess.run(
        [executable, "query", "--json"],
        env={"MAXTWO_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout)["timestamp"] is None
    failed = subprocess.run([executable, "query", "--database-url", "mysql://x"],
                            check=False, capture_output=True, encoding="utf-8", timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr


def test_maxtwo_alone_shows_the_help_as_click_lays_it_out():
    executable = Path(sys.executable).with_name("maxtwo")
    done = subprocess.run([executable], check=False, capture_output=True, encoding="utf-8", timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Usage: maxtwo [OPTIONS] COMMAND")
    assert "Commands:" in lines and "Error:" not in done.stderr


def test_python_dash_m_works():
    done = subprocess.run([sys.executable, "-m", "maxtwo_cli", "--version"],
                          check=False, capture_output=True, encoding="utf-8", timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"maxtwo {__version__}"


def test_the_daemon_package_is_ours_not_python_daemon():
    assert Path(daemon.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "daemon"


def test_serve_defaults_are_the_settings_defaults():
    # The options' defaults are what --help shows and what `maxtwo serve` runs with; the
    # Settings defaults are what the docs and the benchmark harness read.
    import inspect

    from maxtwo_cli.cli import serve
    from maxtwo_cli.core.settings import Settings

    defaults = Settings(database_url="sqlite:///unused.db")
    parameters = inspect.signature(serve).parameters
    for name in ("host", "port", "threads", "interval", "seed_count"):
        assert parameters[name].default == getattr(defaults, name), name


@pytest.fixture
def started(monkeypatch) -> list:
    """`maxtwo serve`'s settings as the daemon gets them; nothing served."""
    from daemon import server

    runs: list = []
    monkeypatch.setattr(server, "serve", runs.append)
    return runs


def test_serve_hands_every_option_to_the_daemon(started, tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = invoke("serve", "--host", "192.0.2.1", "--port", "4321", "--threads", "3", "--interval", "0.1",
                    "--seed-count", "7", "--database-url", url)
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert (settings.database_url, settings.host, settings.port, settings.threads, settings.interval,
            settings.seed_count) == (url, "192.0.2.1", 4321, 3, 0.1, 7)


def test_serve_reads_every_option_from_the_environment(started, tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = invoke("serve", env={"MAXTWO_DATABASE_URL": url, "MAXTWO_HOST": "::1", "MAXTWO_PORT": "4322",
                                  "MAXTWO_THREADS": "4", "MAXTWO_INTERVAL": "86400", "MAXTWO_SEED_COUNT": "0"})
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert (settings.database_url, settings.host, settings.port, settings.threads, settings.interval,
            settings.seed_count) == (url, "::1", 4322, 4, 86400.0, 0)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf"])
def test_serve_refuses_an_interval_that_is_no_number_of_seconds(started, tmp_path, value):
    result = invoke("serve", "--interval", value, "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert_one_line_error(result, "--interval", exit_code=2)
    assert started == []


def test_seed_count_range_and_default(tmp_path):
    assert "[default: 1000000; 0<=x<=2147483647]" in " ".join(invoke("seed", "--help").stdout.split())
    result = invoke("seed", "--count", "0", "--database-url", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("seeded 0 users in ")


def test_the_progress_bar_shows_on_a_terminal_only_and_not_for_zero_users(tmp_path):
    # TTY_COMPATIBLE=1: rich takes stderr for a terminal (rich's documented override).
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert "seeding" in maxtwo_command("seed", "--count", "1000", "--database-url", url, TTY_COMPATIBLE="1").stderr
    assert maxtwo_command("seed", "--count", "0", "--reset", "--database-url", url, TTY_COMPATIBLE="1").stderr == ""
    assert maxtwo_command("seed", "--count", "1000", "--reset", "--database-url", url).stderr == ""


def test_the_query_table_shows_each_user_s_id_and_points(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert invoke("seed", "--count", "5", "--database-url", url).exit_code == 0
    with sqlite3.connect(tmp_path / "x.db") as conn:  # points 10, 20 ... 50; above 15: users 2, 3, 4, 5
        conn.execute("UPDATE users SET points = id * 10")
        conn.execute("UPDATE randomizer_state SET max_number = 15, epoch = epoch + 1")
    result = invoke("query", "--database-url", url)
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert rows == [["2", "20"], ["3", "30"]]
    assert re.search(r"┃\s*id\s*┃\s*points\s*┃", result.stdout)


def test_a_seed_whose_statistics_were_not_refreshed_succeeds_with_a_note(postgres_url, monkeypatch):
    from maxtwo_cli.core import seed as seed_module
    from maxtwo_cli.core.errors import DatabaseUnavailableError

    def failing_vacuum(engine):
        raise DatabaseUnavailableError("the database at postgresql://maxtwo:***@x/db did not answer in time")

    monkeypatch.setattr(seed_module, "_vacuum_users", failing_vacuum)
    result = invoke("seed", "--count", "100", "--database-url", postgres_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("seeded 100 users")
    assert result.stderr.strip() == ("note: the planner's statistics were not refreshed; autovacuum will, "
                                     "or run VACUUM (ANALYZE) users")


def test_ctrl_c_is_one_line_and_exit_130(postgres_url, monkeypatch):
    """Here after the seed committed (PostgreSQL's VACUUM runs after it): its users stay."""
    from maxtwo_cli.core import seed as seed_module

    def interrupted(engine):
        raise KeyboardInterrupt

    monkeypatch.setattr(seed_module, "_vacuum_users", interrupted)
    result = invoke("seed", "--count", "100", "--database-url", postgres_url)
    assert_one_line_error(result, "interrupted", "rolled back", "committed is kept", exit_code=130)
    assert "already holds 100 users" in invoke("seed", "--count", "100", "--database-url", postgres_url).stderr


def test_seeding_twice_is_a_reported_error_not_an_unexpected_one(tmp_path):
    """AlreadySeededError is a MaxtwoError: the CLI says what to do, not "unexpected
    AlreadySeededError ... (set MAXTWO_DEBUG=1 for details)" as for a bug."""
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    assert invoke("seed", "--count", "10", "--database-url", url).exit_code == 0
    result = invoke("seed", "--count", "10", "--database-url", url)
    assert_one_line_error(result, "--reset")
    assert "unexpected" not in result.stderr and "MAXTWO_DEBUG" not in result.stderr
