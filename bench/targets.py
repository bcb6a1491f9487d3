"""The databases under test. Each benchmark asks for a fresh, empty database and gets it dropped
afterwards: a new SQLite file, or a new schema on the PostgreSQL server.

PostgreSQL is the server whose URL was given, or a throwaway server started here with durable,
benchmark-sized settings and always stopped in a `finally`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from bench.common import register_secret, say
from maxtwo_cli.core.db import create_engine, parse_database_url, redact
from maxtwo_cli.core.settings import Settings

# The throwaway server's settings. NOTE: all of them keep every commit durable (fsync stays on,
# synchronous_commit stays on); they only give the minutely full-table UPDATE room: shared
# memory that holds the 1M-row table (a 10M-row table and its index, 1.3 GB, do not fit, and
# 3GB measured no faster there: bench/NOTES.md), a WAL buffer for its burst, and no checkpoint
# forced by WAL volume or time in the middle of a timed run.
# wal_init_zero off: a server that has run a while reuses the WAL segments its checkpoints
# recycle; this one, new and rarely checkpointing, makes a new 16 MB segment every ~0.1 s of a
# randomization and by default fills it with zeroes while holding the WAL write lock, so every
# commit meanwhile waited ~45 ms (GET / p99 7x higher during randomizations, an artefact of a
# new server; bench/NOTES.md). Off, a new segment is only sized: what a long-running server pays.
POSTGRES_SETTINGS = {
    "shared_buffers": "1GB",
    "wal_buffers": "64MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "wal_init_zero": "off",
}
# What the report shows of the server's configuration, whoever set it.
REPORTED_POSTGRES_SETTINGS = (
    "shared_buffers", "wal_buffers", "max_wal_size", "checkpoint_timeout", "wal_init_zero", "fsync",
    "synchronous_commit", "full_page_writes", "wal_level", "work_mem", "maintenance_work_mem",
    "max_connections",
)

_names = itertools.count(1)


class SqliteTarget:
    name = "SQLite"
    is_postgres = False

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @contextlib.contextmanager
    def fresh_database(self, label: str) -> Iterator[str]:
        """The URL of a database file that does not exist yet; deleted afterwards."""
        path = self._directory / f"{label}-{next(_names)}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm", "-journal", "-query", "-query-wal", "-query-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    @contextlib.contextmanager
    def fresh_engine(self, label: str) -> Iterator[Engine]:
        with self.fresh_database(label) as url, _engine(url) as engine:
            yield engine

    def describe(self) -> dict:
        return {"version": sqlite3.sqlite_version, "settings": {
            "journal_mode": "WAL", "synchronous": "FULL", "storage": "a file in a temporary directory"}}


class PostgresTarget:
    name = "PostgreSQL"
    is_postgres = True

    def __init__(self, url: str, origin: str) -> None:
        self._url = parse_database_url(url)
        register_secret(self._url.password)
        self.origin = origin  # "throwaway" or "given"
        # Creates and drops the benchmark schemas; autocommit, no pool to keep sessions open.
        self._admin = sa.create_engine(
            self._url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": 10}, hide_parameters=True)

    @property
    def redacted_url(self) -> str:
        return redact(self._url)

    @contextlib.contextmanager
    def fresh_database(self, label: str) -> Iterator[str]:
        """The URL of an empty schema (via search_path); the schema is dropped afterwards.

        Callers must have disposed of their engines and stopped their processes by then.
        """
        # A random part too: a given server may be shared with another harness.
        schema = f"maxtwo_bench_{label}_{next(_names)}_{secrets.token_hex(3)}"
        with self._admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        try:
            options = " ".join(filter(None, [self._url.query.get("options"), f"-csearch_path={schema}"]))
            yield self._url.update_query_dict({"options": options}).render_as_string(hide_password=False)
        finally:
            with self._admin.connect() as conn:
                conn.exec_driver_sql("SET lock_timeout = '60s'")
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @contextlib.contextmanager
    def fresh_engine(self, label: str) -> Iterator[Engine]:
        with self.fresh_database(label) as url, _engine(url) as engine:
            yield engine

    def describe(self) -> dict:
        with self._admin.connect() as conn:
            version = conn.scalar(sa.text("SHOW server_version"))
            settings = {name: conn.scalar(sa.text(f"SHOW {name}")) for name in REPORTED_POSTGRES_SETTINGS}
        return {"version": version, "origin": self.origin, "settings": settings}

    def dispose(self) -> None:
        self._admin.dispose()


@contextlib.contextmanager
def _engine(url: str) -> Iterator[Engine]:
    """An engine exactly as maxtwo builds its own (timeouts, WAL and durability pragmas)."""
    engine = create_engine(Settings(database_url=url), pool_size=2)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def open_postgres(given_url: str | None) -> Iterator[PostgresTarget]:
    """The given server, or a throwaway one that is stopped and deleted whatever happens."""
    if given_url:
        target = PostgresTarget(given_url, origin="given")
        say(f"PostgreSQL: using {target.redacted_url} (its settings are reported as found)")
        try:
            yield target
        finally:
            target.dispose()
        return
    from devtools.pgserver import ThrowawayPostgres  # the repository root is on sys.path

    settings = ", ".join(f"{name}={value}" for name, value in POSTGRES_SETTINGS.items())
    say(f"PostgreSQL: starting a throwaway server (fsync on, {settings})")
    server = ThrowawayPostgres(fsync=True, settings=POSTGRES_SETTINGS)
    register_secret(server.password)
    target = None
    try:
        server.start()
        target = PostgresTarget(server.url, origin="throwaway")
        yield target
    finally:
        if target is not None:
            target.dispose()
        say("PostgreSQL: stopping the throwaway server")
        server.cleanup()


def postgres_only(targets: list) -> list[PostgresTarget]:
    return [target for target in targets if target.is_postgres]


def process_environment(url: str | None) -> dict[str, str]:
    """The environment for a subprocess on database `url`: no inherited maxtwo or systemd settings.

    NOTE: without JOURNAL_STREAM the daemon stamps its log lines, which serve_log.py reads.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MAXTWO_") and key not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}
    if url is not None:
        env["MAXTWO_DATABASE_URL"] = url
    return env
