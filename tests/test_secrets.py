"""APPSEC: the database password never appears in any output of a full run."""

from __future__ import annotations

import sqlite3
import subprocess

import pytest
import sqlalchemy as sa

from tests.serve_process import MAXTWO, ServeProcess


@pytest.mark.slow  # a full run of every command and the daemon (~15 s)
def test_the_password_appears_nowhere(postgres_url, postgres_server, tmp_path):
    password = postgres_server.password
    seen: list[str] = []

    def run(*args: str, url: str = postgres_url) -> None:
        done = subprocess.run(
            [str(MAXTWO), *args], env={"MAXTWO_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
            check=False, capture_output=True, encoding="utf-8", timeout=120,
        )
        seen.extend([done.stdout, done.stderr])

    for command in ([], ["seed"], ["randomize"], ["query"], ["serve"]):
        run(*command, "--help")
    run("seed", "--count", "500")
    run("seed", "--count", "500")  # refused: an error message
    run("randomize", "--timing")
    run("query")
    run("query", "--json")
    wrong = sa.make_url(postgres_url).set(password=password + "x").render_as_string(hide_password=False)
    run("query", url=wrong)  # authentication fails
    unreachable = sa.make_url(postgres_url).set(port=1).render_as_string(hide_password=False)
    run("query", url=unreachable)

    with ServeProcess(postgres_url, interval=1, seed_count=500) as daemon:
        daemon.start(tmp_path / "serve.log")
        for path in ("/", "/", "/healthz", "/metrics", "/openapi.json", "/nope"):
            seen.append(str(daemon.get(path)[1]))
        assert daemon.terminate() == 0
        seen.append(daemon.log())

    assert len(seen) > 20
    leaks = [output for output in seen if password in output]
    assert leaks == []


def test_settings_never_show_the_database_url():
    # A repr lands in tracebacks (pytest's, rich's with locals) and in log lines.
    from maxtwo_cli.core.settings import Settings

    assert "s3cret" not in repr(Settings(database_url="postgresql://u:s3cret@localhost/db"))


def test_a_url_parameter_error_never_quotes_the_password():
    # SQLAlchemy's own message quotes the bad parameter, which may be the password too.
    from maxtwo_cli.core import db
    from maxtwo_cli.core.errors import ConfigurationError
    from maxtwo_cli.core.settings import Settings

    with pytest.raises(ConfigurationError) as raised:
        db.create_engine(Settings(database_url="postgresql://u:p4ssw0rd@localhost/db?port=p4ssw0rd"))
    assert "p4ssw0rd" not in str(raised.value) and "***" in str(raised.value)


@pytest.mark.parametrize(("text", "secrets", "public", "expected"), [
    # A word of its own in a quoted value is masked, not every occurrence of its letters, nor
    # a word of the message's own text.
    ('password authentication failed for user "u" ("s")', ["s"], [], 'password authentication failed for user "u" ("***")'),
    ("the URL's host, user's name, password s", ["s"], [], "the URL's host, user's name, password s"),
    ("the URL's host 'x'", ["s"], [], "the URL's host 'x'"),  # the "'" of "URL's" opens no quote
    ("user 'pass'", ["as"], [], "user 'pass'"),  # a word of its own, not part of one
    ("at 127.0.0.1: bad 127", ["127"], ["127.0.0.1"], "at 127.0.0.1: bad 127"),  # also the host: left
    ('for user "maxtwo"', ["maxtwo"], ["maxtwo"], 'for user "maxtwo"'),  # also the user: left
    ("invalid literal for int(): 'p4ssw0rd'", ["p4ssw0rd"], ["u", "localhost"], "invalid literal for int(): '***'"),
    # In URL and keyword syntax, whatever the value, an unencoded "@" or "/" in it too.
    ("(postgresql://u:Top@Sec/ret@db.example/maxtwo)", [], [], "(postgresql://u:***@db.example/maxtwo)"),
    ("postgresql://me@srv:hunter2@db.example/maxtwo", [], [], "postgresql://me@srv:***@db.example/maxtwo"),  # Azure's user
    # A space unencoded in the password (libpq takes it; Click quotes it back), and a "://".
    ("argument(s) (postgresql://u:pw secret@h/d)", [], [], "argument(s) (postgresql://u:***@h/d)"),
    ("postgresql://u:a b\tc@h/d", [], [], "postgresql://u:***@h/d"),
    ("(postgresql://u:pa://ss@h/d)", [], [], "(postgresql://u:***@h/d)"),
    # Each URL of a line up to its own "@" (none crosses into the next), and lines apart.
    ("postgresql://a:x y@h1/d and postgresql://b:z w@h2/d", [], [], "postgresql://a:***@h1/d and postgresql://b:***@h2/d"),
    ("http://h:80/p\nmail a@b", [], [], "http://h:80/p\nmail a@b"),
    # A driver's detail after the URL keeps its "@"s (a review: the cause was masked away).
    ('at postgresql://maxtwo@db:5432/maxtwo (role "a@b" does not exist)', [], [],
     'at postgresql://maxtwo@db:5432/maxtwo (role "a@b" does not exist)'),
    ('at postgresql://me@srv:***@db/maxtwo (failed for user "me@srv")', [], [],
     'at postgresql://me@srv:***@db/maxtwo (failed for user "me@srv")'),
    # An "@" in a query's password: the URL's mask took the port's ":" for a password's start.
    ("postgresql://u@h:5432/db?password=hunt@er2x", [], [], "postgresql://u@h:5432/db?password=***"),
    ("postgresql://u@h:5432/db?sslpassword=pa@ss-tail", [], [], "postgresql://u@h:5432/db?sslpassword=***"),
    ("postgresql://u:pw@h:5432/db?password=a@bTAIL", [], [], "postgresql://u:***@h:5432/db?password=***"),
    ("PASSWORD=hunter2 SSLKEY=/etc/k3y sslkey='/etc/k 3y'", [], [], "PASSWORD=*** SSLKEY=*** sslkey=***"),  # any case
    ("host=x password='a b\\' c' user=u", [], [], "host=x password=*** user=u"),
    ("postgresql://u@h/db?sslpassword=xyz&password=abc", [], [], "postgresql://u@h/db?sslpassword=***&password=***"),
    ('host=x password="top secret" user=u', [], [], "host=x password=*** user=u"),
    # A known secret goes first, whole, however the syntax would cut it; the longer of two first.
    ("?password=ab'cd&x=1", ["ab'cd"], [], "?password=***&x=1"),
    ("'ab-cd' and 'ab'", ["ab", "ab-cd"], [], "'***' and '***'"),
    ("sqlite:////tmp/a:b@c.db, http://h:80/p", [], [], "sqlite:////tmp/a:b@c.db, http://h:80/p"),
    # The URL help's placeholder stays readable; a real password where it stands does not.
    ("expected postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE", [], [],
     "expected postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"),
    ("postgresql://USER:hunter2@HOST/db", [], [], "postgresql://USER:PASSWORD@HOST/db"),
])
def test_redact_text(text, secrets, public, expected):
    from maxtwo_cli.core.redaction import redact_text

    assert redact_text(text, secrets, public) == expected


def test_a_short_or_common_wrong_password_is_not_given_away_by_the_masking(postgres_server):
    """Every "s" of the message masked ("pa***word") told that the password was "s"; a password
    equal to the user's name, masked where the name is quoted, told it too."""
    from tests.test_cli import assert_one_line_error, invoke

    for password in ("s", "maxtwo"):
        url = sa.make_url(postgres_server.url).set(password=password).render_as_string(hide_password=False)
        result = invoke("query", "--database-url", url)
        assert_one_line_error(result, 'password authentication failed for user "maxtwo"', "//maxtwo:***@",
                              "the URL's host")


def test_the_database_urls_query_secrets_are_masked_wherever_they_are_shown():
    from maxtwo_cli.core import db

    url = db.parse_database_url("postgresql://u@db.example/maxtwo?application_name=%00masked%00"
                                "&password=topsecret&sslpassword=k3y")
    # The URL as logged (`maxtwo serve`'s "database: ..." line) and as errors give it; the rest
    # of it as it was.
    assert db.redact(url) == ("postgresql+psycopg://u@db.example/maxtwo?application_name=%00masked%00"
                              "&password=***&sslpassword=***")
    # A driver's message that quotes one of them.
    assert db.redact_message('syntax error at or near "topsecret" and "k3y"', url) == (
        'syntax error at or near "***" and "***"')


def test_a_database_error_never_holds_the_password_even_before_the_cli_masks_it(tmp_path):
    """The CLI masks every message once more on its way out; the daemon logs a scheduled run's
    error as it is: the error must be masked where it is made."""
    from maxtwo_cli.core import db
    from maxtwo_cli.core.errors import DatabaseUnavailableError
    from maxtwo_cli.core.settings import Settings

    engine = db.create_engine(Settings(database_url="postgresql://maxtwo:Pw0rdSecret@127.0.0.1:1/maxtwo",
                                       connect_timeout=1))
    with pytest.raises(DatabaseUnavailableError) as raised:
        db.ping(engine)
    assert "Pw0rdSecret" not in str(raised.value) and "maxtwo:***@127.0.0.1:1" in str(raised.value)


@pytest.mark.parametrize("driver", ["sqlite3", "psycopg"])
def test_a_driver_error_quoting_the_password_is_masked_where_it_is_made(driver):
    """The error above quotes no password, so it cannot tell whether the driver's own words are
    masked; here a driver's error quotes it (as a conninfo parse error may), raised as the
    driver raises it (a review's mutant: the detail taken unmasked)."""
    import psycopg

    from maxtwo_cli.core import db
    from maxtwo_cli.core.errors import MaxtwoError
    from maxtwo_cli.core.settings import Settings

    engine = db.create_engine(Settings(database_url="postgresql://maxtwo:Pw0rdSecret@127.0.0.1:1/maxtwo"))
    error_class = {"sqlite3": sqlite3.OperationalError, "psycopg": psycopg.OperationalError}[driver]
    with pytest.raises(MaxtwoError) as raised, db.database_errors(engine):
        raise error_class('invalid connection option "password=Pw0rdSecret"')
    assert "Pw0rdSecret" not in str(raised.value) and "invalid connection option" in str(raised.value)
    engine.dispose()


@pytest.mark.parametrize("args", [["query"], []], ids=["an-argument", "a-command"])
def test_a_url_given_where_the_cli_expects_no_url_is_quoted_masked(args):
    from tests.test_cli import assert_one_line_error, invoke

    # The second: a user name holding "@", as Azure's USER@SERVER names do; the third, a
    # password holding a space (a review: shown whole).
    for user, password in (("maxtwo", "TopSecret99"), ("maxtwo@server", "TopSecret99"), ("maxtwo", "Top Secret99")):
        result = invoke(*args, f"postgresql://{user}:{password}@db.example/maxtwo")
        assert_one_line_error(result, f"postgresql://{user}:***@db.example/maxtwo", exit_code=2)
        assert "Secret99" not in result.output
