"""Database URLs, engines and the translation of driver errors into maxtwo errors.

Two databases are first-class: an embedded SQLite file (the zero-setup default) and PostgreSQL
through psycopg 3. Everything dialect-specific about *connecting* lives here; the SQL that
differs lives next to the job that runs it (seed.py, randomize.py, query.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import select
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine

from maxtwo_cli.core.errors import (
    ConfigurationError,
    DatabaseBusyError,
    DatabaseUnavailableError,
    MaxtwoError,
    SchemaMismatchError,
)
from maxtwo_cli.core.redaction import redact_text
from maxtwo_cli.core.settings import Settings, is_utf8, shown_path

log = logging.getLogger(__name__)

# An execution option for transactions that only read: on SQLite they need not wait for the
# write lock (WAL readers run beside a writer).
READ_ONLY_OPTION = "maxtwo_read_only"
# An execution option for SQLite transactions whose first statement writes and that write one
# file only (the main file: a randomization; the query-state file: the counters' cleanup): they
# begin DEFERRED and so lock that file alone. BEGIN IMMEDIATE would lock every attached file
# too, and queries and increments (in the query-state file) would wait for a randomization
# (0.3 s per million users), or it for them.
ONE_FILE_OPTION = "maxtwo_one_file"

# SQLite: the query state (the last query's time) and the counters with their Idempotency-Keys
# live in a file of its own beside the database, attached to every connection under this schema
# name. A query writes only that file and reads the users' last committed snapshot from the main
# one (WAL), and an increment writes only that file, so neither waits for a randomization's
# write lock. NOTE: a transaction that writes both files commits atomically per file only (main
# first); docs/design.md lists the few that do.
SQLITE_QUERY_SCHEMA = "maxtwo_query"

# A table every maxtwo SQLite file holds (since the first release): a file with tables but not this
# one is another program's.
SQLITE_OWN_TABLE = "randomizer_state"

# The name of a view in the main file that every maxtwo SQLite database keeps once its counters
# live in the query-state file (core/schema.py says why it bears an index's name): with it there,
# a missing query-state file was lost, not yet to be made.
SQLITE_COUNTERS_MOVED_GUARD = "ix_idempotency_keys_created_at"

URL_HELP = "expected sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"

# libpq parameters of time that maxtwo sets itself on PostgreSQL (_create_postgres_engine): its
# 503s within seconds of an outage and the watchdog's bound on a batch rely on them. NOTE:
# SQLAlchemy lets a keyword argument replace the URL's: ?connect_timeout=30 was ignored without a
# word (a review). Refused instead. (A client_encoding is replaced by UTF8 as PGCLIENTENCODING's
# is: no other encoding can send every key, and nothing else depends on it.)
_PARAMETERS_MAXTWO_SETS = (
    "connect_timeout", "tcp_user_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
)

# Driver names a user may write, and the one SQLAlchemy gets: a plain postgresql:// means psycopg 3.
_DRIVERS = {
    "sqlite": "sqlite+pysqlite",
    "sqlite+pysqlite": "sqlite+pysqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}


def parse_database_url(raw: str) -> URL:
    """Parse and normalise a database URL, or raise ConfigurationError without echoing it."""
    try:
        url = sa.make_url(raw.strip())
    except (exc.ArgumentError, ValueError):
        # NOTE: ValueError for e.g. an unencoded "@" or ":" in the password (a bad port), or
        # libpq's list of hosts (HOST1:PORT1,HOST2:PORT2), which SQLAlchemy writes otherwise.
        # APPSEC: an unparseable URL may still hold a password, so it is never repeated back.
        hosts = raw.rpartition("@")[2].partition("/")[0]
        advice = "; several hosts are written ?host=HOST1:PORT1&host=HOST2:PORT2" if "," in hosts else ""
        raise ConfigurationError(f"the database URL cannot be parsed; {URL_HELP}{advice}") from None
    if "@" in (url.host or "") or (url.password is not None and _password_may_be_cut(raw)):
        # APPSEC: an unencoded "@" in the password ends it there (SQLAlchemy's password is all
        # up to the first "@"): the rest became the host name, or the host and then the
        # database name or the query after a "/", "?" or "[" in it, all shown in messages (and
        # looked up in DNS).
        raise ConfigurationError(
            "the database URL holds an '@' that is not percent-encoded, or a '?' in the password: "
            f"write '@', ':' and '?' in the password as %40, %3A and %3F, and '@' elsewhere as %40; {URL_HELP}"
        )
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ConfigurationError(
            f"unsupported database {url.drivername!r} in the database URL; {URL_HELP}"
        )
    url = url.set(drivername=driver)
    if url.get_backend_name() != "sqlite":
        fixed = [name for name in _PARAMETERS_MAXTWO_SETS if name in url.query]
        if fixed:
            raise ConfigurationError(
                f"the database URL sets {fixed[0]}, which maxtwo sets itself (its timeouts and its answers "
                f"during an outage rely on it); remove ?{fixed[0]}=... from the URL"
            )
        return url
    if not url.database or url.database == ":memory:":
        raise ConfigurationError(
            "a SQLite database URL must name a file, because every maxtwo process shares it; "
            + URL_HELP
        )
    if any(part is not None for part in (url.username, url.password, url.host, url.port)):
        # NOTE: SQLAlchemy refuses these only when it makes the engine, in several lines, and
        # after maxtwo made the file's directory; and sqlite://HOST/PATH is no file on HOST.
        raise ConfigurationError(
            "a SQLite database URL names a local file and takes no user, password or host "
            "(sqlite:///relative/path or sqlite:////absolute/path); " + URL_HELP
        )
    if "\0" in url.database:
        raise ConfigurationError("the SQLite database path contains a NUL character; no file can be named so")
    try:
        unquote(raw, errors="strict")
    except UnicodeDecodeError:
        # NOTE: SQLAlchemy decodes the bytes of %XX escapes that are not UTF-8 as U+FFFD: another
        # file, made silently.
        raise ConfigurationError(
            "the SQLite database path's %XX escapes are not UTF-8, as SQLite's file names must be; "
            "write a character as itself or as its UTF-8 bytes (é: %C3%A9)"
        ) from None
    if url.query:
        # NOTE: SQLAlchemy would pass ?mode=ro and the like on with a warning, and ignore them.
        raise ConfigurationError(f"a SQLite database URL takes no parameters (?{next(iter(url.query))}=...); {URL_HELP}")
    if url.database.startswith("~"):
        # A shell leaves a ~ inside a word alone: sqlite:///~/maxtwo.db means the home directory.
        url = url.set(database=os.path.expanduser(url.database))
    return url


def _password_may_be_cut(raw: str) -> bool:
    """For a URL that SQLAlchemy found a password in: whether that password may be only part
    of what its writer meant, the rest shown as the host (and so printed, and looked up).

    SQLAlchemy's password starts after the first ":" (the user name holds none; an "@" in it
    is taken whole: Azure's USER@SERVER names) and ends at the first "@" after it. Either way
    is ambiguous: an "@" after that one (the password's own, unencoded), or a "?" before it:
    a password's own "?", or a query's "@" (`USER@HOST:5432/DB?password=a@b`: the port's ":"
    started the "password"). %40 and %3F work everywhere."""
    after_scheme = raw.partition("://")[2]
    ends = after_scheme.find("@", after_scheme.find(":") + 1)
    return ends != -1 and ("@" in after_scheme[ends + 1 :] or "?" in after_scheme[:ends])


# libpq also takes secrets as query parameters (?password=...).
_SECRET_QUERY_KEYS = ("password", "sslpassword", "sslkey")
# What stands for one of them in redact(): a value no real one is (libpq takes no NUL); and
# the stand-ins as rendered, to be written "***".
_HIDDEN = "\x00masked\x00"
_HIDDEN_VALUES = re.compile(rf"(?<=[?&])({'|'.join(_SECRET_QUERY_KEYS)})=%00masked%00(?=&|$)")


def redact(url: URL) -> str:
    """The URL as it may appear in any output: the password, if any, is replaced by ***."""
    hidden = {key: _HIDDEN for key in _SECRET_QUERY_KEYS if key in url.query}
    # The query's masks as written, not percent-encoded ("?password=%2A%2A%2A" in the log).
    rendered = url.update_query_dict(hidden).render_as_string(hide_password=True)
    return _HIDDEN_VALUES.sub(r"\1=***", rendered)


def redact_message(text: str, url: URL) -> str:
    """A message that may quote the URL's secrets (a driver's, a library's), with them masked."""
    public = [str(part) for part in (url.username, url.host, url.port, url.database) if part]
    return redact_text(text, secrets_of(url), public)


def secrets_of(url: URL) -> list[str]:
    """Every secret the URL carries, for scrubbing messages that might quote them."""
    found = [str(url.password)] if url.password else []
    for key in _SECRET_QUERY_KEYS:
        value = url.query.get(key)
        found += [value] if isinstance(value, str) else list(value or ())
    return [secret for secret in found if secret]


def create_engine(settings: Settings, *, pool_size: int = 5, pre_ping: bool = True) -> Engine:
    """Create an engine for settings.database_url; connects lazily, creates nothing yet.

    `pre_ping` (PostgreSQL): check each pooled connection with a round trip before use, so the
    pool recovers by itself after a database restart. The request path turns it off, because it
    would double the round trips per query: a pooled connection the server has closed is found
    without one instead (closed_while_idle).
    """
    url = parse_database_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, settings, pool_size)
    return _create_postgres_engine(url, settings, pool_size, pre_ping)


def _create_postgres_engine(url: URL, settings: Settings, pool_size: int, pre_ping: bool) -> Engine:
    statement_timeout_ms = int(settings.statement_timeout * 1000)
    # Every statement is bounded, so a stuck lock turns into an error, not a hang. Long jobs
    # (seed, randomize) lift the bound for their own transaction only. A transaction left idle
    # as long is ended with its session: a client frozen inside one (SIGSTOP, a paused VM,
    # swapping) held its row locks until it came back, and with them every other daemon's
    # writes to those rows and every scheduled randomization. maxtwo's statements rely on READ
    # COMMITTED (a single UPDATE waits for a row's lock, then updates its newest version):
    # under a server's default of REPEATABLE READ or SERIALIZABLE, concurrent writers failed
    # with serialization errors. A lock wait is bounded by the statement's own bound: a role's
    # or database's default lock_timeout failed an increment that waited for another daemon's
    # batch. Options given in the URL (e.g. ?options=-csearch_path%3Dmaxtwo) are kept; these
    # come after them, so they win.
    options = " ".join(
        filter(None, [
            url.query.get("options"),
            f"-c statement_timeout={statement_timeout_ms}",
            f"-c idle_in_transaction_session_timeout={statement_timeout_ms}",
            "-c lock_timeout=0",
            r"-c default_transaction_isolation=read\ committed",  # libpq: an escaped space
        ])
    )
    try:
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=pre_ping,
            # APPSEC: bound values never end up in exception messages.
            hide_parameters=True,
            connect_args={
                "connect_timeout": max(1, math.ceil(settings.connect_timeout)),
                # (The URL's, if it names one: pg_stat_activity tells the daemons apart by it.)
                "application_name": url.query.get("application_name", "maxtwo"),
                # Any other (the URL's, PGCLIENTENCODING's, a role's) cannot send every key.
                "client_encoding": "UTF8",
                "options": options,
                # NOTE: statement_timeout is enforced by the server; if the server's host dies or
                # the network drops packets, only the client's TCP timeouts end the wait. Unsent
                # data times out after the statement bound, an idle link is probed after 5 s.
                "tcp_user_timeout": int(settings.statement_timeout * 1000),
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 3,
            },
        )
    except exc.ArgumentError as ex:
        # NOTE: SQLAlchemy checks some of the URL's parameters here (?port=abc); the keyword
        # arguments above are fixed, so it is the URL's fault.
        message = redact_message(str(ex), url)  # APPSEC: it may quote one
        raise ConfigurationError(f"the database URL is not valid ({message}); {URL_HELP}") from None
    event.listen(engine, "connect", _iso_date_style)
    if not pre_ping:
        event.listen(engine, "connect", _mark_new)
        event.listen(engine, "checkout", _replace_if_closed_while_idle)
    return engine


def _iso_date_style(dbapi_connection: Any, _record: Any) -> None:
    """psycopg reads timestamps in the ISO DateStyle only: another (the server's, a database's
    or role's default, PGDATESTYLE) failed every query with "can't parse timestamptz". Asked
    without a round trip: the server reports the setting as the session starts. NOTE: not in
    the startup options above: PGDATESTYLE reaches the server after them, and wins."""
    if (dbapi_connection.info.parameter_status("DateStyle") or "").startswith("ISO"):
        return
    dbapi_connection.execute("SET DateStyle = ISO")
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()  # a session setting, kept once committed


_NEW = "maxtwo.new"  # in ConnectionPoolEntry.info: connected for this checkout


def _mark_new(_dbapi_connection: Any, record: Any) -> None:
    record.info[_NEW] = True


def _replace_if_closed_while_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    # SQLAlchemy's documented way (PoolEvents.checkout): DisconnectionError makes the pool
    # replace this connection with a fresh one before anybody uses it. NOTE: a connection made
    # for this very checkout is not asked: the pool tries twice, then raises an error that is
    # no database error (a 500); a new connection that fails gets its 503 from its statement.
    if not record.info.pop(_NEW, False) and closed_while_idle(dbapi_connection):
        raise exc.DisconnectionError("the server closed this pooled connection while it was idle")


def closed_while_idle(driver_connection: Any) -> bool:
    """Whether the server has closed (or is closing) an idle PostgreSQL connection: its socket
    is readable while no statement runs. A restarted or stopped server, an idle-session
    timeout and pg_terminate_backend() each send an error and close it; found this way, it is
    replaced before use, at the cost of one poll() and no round trip (pool_pre_ping's would
    double a query's). Anything else unasked-for costs one reconnection, never an error."""
    if driver_connection.closed:  # closed, or found broken already: no descriptor to ask
        return True
    poller = select.poll()
    poller.register(driver_connection.fileno(), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def sqlite_query_state_path(database: str | Path) -> Path:
    """The file that holds a SQLite database's query state and counters: `maxtwo.db` ->
    `maxtwo.db-query`, beside the file itself: a symbolic link to the database is followed, as
    SQLite follows it (to keep its journals beside the target), so that every path to one
    database finds the same state."""
    return Path(f"{os.path.realpath(database)}-query")


def sqlite_main_files(engine: Engine) -> list[str]:
    """The files a rewrite of the users table writes: on SQLite the main file and its WAL (the
    query state lives apart); none on PostgreSQL, whose server keeps its own files."""
    if is_postgres(engine):
        return []
    # NOTE: SQLite follows a symbolic link to the database and keeps its WAL beside the target.
    database = os.path.realpath(engine.url.database or "")
    return [database, f"{database}-wal"]


def _create_sqlite_engine(url: URL, settings: Settings, pool_size: int) -> Engine:
    path = Path(url.database or "")
    query_state_path = str(sqlite_query_state_path(path))
    if not is_utf8(query_state_path):  # (resolved: a relative path or a link's target too)
        raise ConfigurationError(
            f"the SQLite database path {shown_path(query_state_path.removesuffix('-query'))} is not UTF-8, "
            "as SQLite's file names must be"
        )
    with contextlib.suppress(OSError):
        # A missing parent directory is created on first use; a failure surfaces on connect
        # as a clear "cannot open" error.
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        hide_parameters=True,
        # The busy timeout: how long a writer waits for another's lock before failing.
        connect_args={"timeout": settings.statement_timeout, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # NOTE: take transaction control away from the sqlite3 module (it begins lazily and
        # DEFERRED); maxtwo emits its own BEGIN IMMEDIATE below, the SQLAlchemy-documented way.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _refuse_another_programs_file(cursor, path)
        _refuse_a_lost_query_file(cursor, path, query_state_path)
        # WAL lets readers go on while one writer works; FULL keeps every commit durable.
        busy_until = time.monotonic() + settings.statement_timeout
        _execute_when_free(cursor, "PRAGMA journal_mode=WAL", busy_until=busy_until)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"ATTACH DATABASE ? AS {SQLITE_QUERY_SCHEMA}", (query_state_path,))
        _execute_when_free(cursor, f"PRAGMA {SQLITE_QUERY_SCHEMA}.journal_mode=WAL", busy_until=busy_until)
        cursor.execute(f"PRAGMA {SQLITE_QUERY_SCHEMA}.synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # Nearly every maxtwo transaction writes (even a query records its time), so take the
        # write lock up front: a DEFERRED transaction that upgrades later can fail with
        # SQLITE_BUSY without waiting for the busy timeout. Read-only work says so (see ping),
        # and so does work that writes one file first and alone (ONE_FILE_OPTION): its first
        # write takes the lock in the busy handler all the same.
        options = connection.get_execution_options()
        deferred = options.get(READ_ONLY_OPTION, False) or options.get(ONE_FILE_OPTION, False)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


def _refuse_another_programs_file(cursor: sqlite3.Cursor, path: Path) -> None:
    """Refuse a SQLite file that holds tables but none of maxtwo's, before anything in it or
    beside it changes: WAL mode stays with a file, and the query-state file would appear beside it."""
    tables = sorted(name for (name,) in cursor.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")
                    if not name.startswith("sqlite_"))
    if tables and SQLITE_OWN_TABLE not in tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise SchemaMismatchError(
            f"the SQLite file {path} holds another program's tables ({shown}) and none of maxtwo's; "
            "maxtwo will not touch it, point --database-url at another file"
        )


def _refuse_a_lost_query_file(cursor: sqlite3.Cursor, path: Path, query_state_path: str) -> None:
    """Refuse a database whose query-state file is gone or empty before ATTACH makes one: the
    refusal left an empty file there (a review), which a restore with `cp -n` would then keep."""
    if os.path.exists(query_state_path) and os.path.getsize(query_state_path) > 0:
        return
    guarded = cursor.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type = 'view' AND name = ?", (SQLITE_COUNTERS_MOVED_GUARD,)
    ).fetchone()
    if guarded:
        raise lost_query_file_error(path)


def lost_query_file_error(database: str | Path) -> SchemaMismatchError:
    return SchemaMismatchError(
        f"{sqlite_query_state_path(database)}, which holds the counters and query state of {database}, is "
        "missing or empty; restore both files from one backup (see docs/deployment.md)"
    )


# Between two tries of _execute_when_free: the other process's switch takes about a millisecond.
_BUSY_RETRY_SECONDS = 0.01


def _execute_when_free(cursor: sqlite3.Cursor, sql: str, *, busy_until: float) -> None:
    """cursor.execute(sql), tried again while SQLite answers SQLITE_BUSY at once, until
    time.monotonic() reaches `busy_until` (roughly: a last try may still wait out the busy
    handler for a lock it does ask it for).

    NOTE: switching a new file to WAL reads it, then upgrades to a write, and SQLite never calls
    the busy handler for such an upgrade (it could deadlock): while another process writes in
    the file's first journal mode (switching it to WAL itself, as two maxtwo processes opening a
    new file at once both do), the switch fails at once, whatever the busy timeout.
    """
    while True:
        try:
            cursor.execute(sql)
            return
        except sqlite3.OperationalError as ex:
            # (& 0xFF: SQLITE_BUSY_RECOVERY and the like too, another process recovering the WAL.)
            code = getattr(ex, "sqlite_errorcode", 0)
            if code & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= busy_until:
                raise
            time.sleep(_BUSY_RETRY_SECONDS)


def is_postgres(engine: Engine | sa.Connection) -> bool:
    return engine.dialect.name == "postgresql"


# How long a long job (seed, randomize) waits for a lock held by another before giving up.
LONG_JOB_LOCK_TIMEOUT = 60.0


def set_job_timeouts(conn: sa.Connection) -> None:
    """For the rest of this PostgreSQL transaction: no bound on its statements (a long job's
    length grows with the table), nor on the transaction (a role's or database's default
    transaction_timeout, PostgreSQL 17 on, failed every randomization longer than it), and its
    lock waits bounded by LONG_JOB_LOCK_TIMEOUT, so that lifting the others never turns a
    stuck lock into a hang."""
    settings = {"statement_timeout": "0", "lock_timeout": str(int(LONG_JOB_LOCK_TIMEOUT * 1000))}
    if conn.dialect.server_version_info >= (17,):  # (unknown before: an error to set)
        settings["transaction_timeout"] = "0"
    # One round trip for all of them.
    conn.execute(sa.select(*(sa.func.set_config(name, value, True) for name, value in settings.items())))


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[sa.Connection]:
    """A connection for work that only reads, driver errors translated (database_errors); on
    SQLite it takes no write lock, so it never waits for a randomization (READ_ONLY_OPTION)."""
    with database_errors(engine), engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY_OPTION: True})


def ping(engine: Engine) -> None:
    """Check that the database answers; raise DatabaseUnavailableError if it does not."""
    with reading(engine) as conn:
        conn.execute(sa.select(1))


def driver_errors() -> tuple[type[Exception], ...]:
    """The base classes of the drivers' errors, for `except db.driver_errors():`.

    NOTE: psycopg is imported only when a PostgreSQL engine is created (SQLAlchemy's dialect
    does it), never here: a SQLite command does not pay the 60 ms it takes. Until it is
    imported, none of its errors can have been raised.
    """
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error,) if psycopg is None else (sqlite3.Error, psycopg.Error)


@contextlib.contextmanager
def database_errors(engine: Engine) -> Iterator[None]:
    """Turn driver errors raised inside the block into MaxtwoErrors with a useful message."""
    try:
        yield
    except MaxtwoError:
        raise
    except exc.DBAPIError as ex:
        raise _translate(engine, ex.orig) from None
    except driver_errors() as ex:
        raise _translate(engine, ex) from None


def _translate(engine: Engine, original: BaseException | None) -> MaxtwoError:
    where = redact(engine.url)
    # APPSEC: a driver may quote the connection string; never let the password through.
    detail = redact_message(_first_line(original), engine.url)
    psycopg = sys.modules.get("psycopg")  # None: no psycopg error was raised (driver_errors())
    if psycopg is not None and isinstance(original, psycopg.errors.QueryCanceled):
        return DatabaseBusyError(
            f"the database at {where} did not answer in time ({detail}); "
            "check for long-running transactions or locks"
        )
    # NOTE: psycopg makes these OperationalErrors too, which would advise checking the URL.
    if psycopg is not None and isinstance(original, psycopg.errors.LockNotAvailable):  # lock_timeout
        return DatabaseBusyError(
            f"the database at {where} did not grant a lock in time ({detail}); "
            "check for long-running transactions or locks"
        )
    if psycopg is not None and isinstance(
        original, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
    ):
        return DatabaseBusyError(
            f"the database at {where} rolled the transaction back ({detail}); nothing of it "
            "was applied: try again"
        )
    if psycopg is not None and isinstance(original, psycopg.OperationalError):
        return DatabaseUnavailableError(
            # NOTE: not "{where}: {detail}": every message is masked once more on its way out
            # (redact_message), where a URL ending in ?password=*** would lose the ":" to the mask.
            f"cannot use the database at {where} ({detail}); "
            "check that the server is running and the URL's host, port, user and password"
        )
    if psycopg is not None and isinstance(original, psycopg.errors.InsufficientPrivilege):
        return DatabaseUnavailableError(
            f"the database at {where} refused: {detail}; check the role's privileges"
        )
    if psycopg is not None and isinstance(original, psycopg.errors.InvalidSchemaName):
        # "no schema has been selected to create in": search_path (?options=-csearch_path%3D...)
        # names none that exists and that the role may use (PostgreSQL skips the others).
        return ConfigurationError(
            f"the database at {where} refused: {detail}; create the schema that search_path names "
            "(CREATE SCHEMA name AUTHORIZATION role), or let the role use it (GRANT USAGE, CREATE ON "
            "SCHEMA name TO role), or name another"
        )
    if isinstance(original, sqlite3.DatabaseError) and "not a database" in detail:
        return SchemaMismatchError(
            f"{engine.url.database} (or {sqlite_query_state_path(engine.url.database or '')}, which "
            "holds its query state) is not a SQLite database; point --database-url elsewhere"
        )
    if isinstance(original, sqlite3.OperationalError):
        advice = _sqlite_advice(engine.url.database, original, detail)
        return DatabaseBusyError(advice) if _sqlite_busy(original, detail) else DatabaseUnavailableError(advice)
    return DatabaseUnavailableError(f"the database at {where} failed: {detail}")


def _sqlite_busy(error: sqlite3.OperationalError, detail: str) -> bool:
    """Whether SQLite gave up waiting for another connection's lock."""
    name = getattr(error, "sqlite_errorname", None) or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in detail


def _sqlite_advice(path: str | None, error: sqlite3.OperationalError, detail: str) -> str:
    """What went wrong with a SQLite file and what to do, from SQLite's primary result code."""
    name = getattr(error, "sqlite_errorname", None) or ""
    if _sqlite_busy(error, detail):
        return (f"the SQLite file {path} stayed locked by another process; "
                "try again, or check for a stuck maxtwo process")
    if name.startswith("SQLITE_FULL"):
        return f"the disk holding the SQLite file {path} is full; free some space and try again"
    if name.startswith("SQLITE_READONLY"):
        return (f"the SQLite file {path} is read-only ({detail}); make the file, its directory "
                "and the files beside it whose names begin with its own (-wal, -shm, -query, -query-wal, "
                "-query-shm) writable by this user")
    if name.startswith("SQLITE_IOERR"):
        return (f"the SQLite file {path} could not be read or written ({detail}, {name}); check "
                "its file system: full, read-only or failing")
    if path and os.path.isdir(path):
        return f"cannot use the SQLite file {path}: it is a directory; give the path of a file in it"
    return (f"cannot use the SQLite file {path}: {detail}; "
            "check that its directory exists and is writable")


def _first_line(error: BaseException | None) -> str:
    text = str(error or "unknown error").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
