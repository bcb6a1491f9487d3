"""The baselines maxtwo is compared with, written the way public implementations do the job.

- Seeding: the application generates rows chunk by chunk and sends chunks of 10,000 rows with a
  parameterised multi-row INSERT (Ecto's insert_all; PostgreSQL) or executemany (SQLite), all
  in one transaction, into the same users table maxtwo creates.
- Randomizing: one `UPDATE users SET points = floor(random()*101), updated_at = now()` on a
  default table (a plain CREATE TABLE: no fillfactor, no CHECK; on SQLite SQLAlchemy's default
  DateTime storage, ISO-8601 text) - the best published approach.
- The floors: maxtwo's update with one cost taken away, to show how much of the time is left to
  win. PostgreSQL: maxtwo's own table and UPDATE, but UNLOGGED, so no WAL at all. SQLite (which
  has no unlogged tables): maxtwo's own table and durable transaction, every user given the same
  constant points, so no random().
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from maxtwo_cli.core import schema
from maxtwo_cli.core.db import is_postgres
from maxtwo_cli.core.seed import seed_users

CHUNK_ROWS = 10_000

# What a default model of the exercise's table looks like: id, points and the two timestamps.
_default_metadata = sa.MetaData()
default_users = sa.Table(
    "users",
    _default_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("points", sa.SmallInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("inserted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_NAIVE_UPDATE_POSTGRES = sa.text("UPDATE users SET points = floor(random()*101), updated_at = now()")
# SQLite: SQLAlchemy's DateTime stores this text; abs(random()) % 101 is the usual translation.
_NAIVE_UPDATE_SQLITE = sa.text("UPDATE users SET points = abs(random()) % 101, updated_at = :now")
_ISO_TIMESTAMP = "%Y-%m-%d %H:%M:%S.%f"


def unbounded(conn: sa.Connection) -> None:
    """Lift maxtwo's per-statement timeout for this transaction only (a 10M-row statement
    legitimately takes longer than a request may)."""
    if is_postgres(conn):
        conn.execute(sa.select(sa.func.set_config("statement_timeout", "0", True)))


def vacuum_analyze(engine: Engine) -> None:
    """VACUUM (ANALYZE) users: every timed PostgreSQL table starts from the same clean state."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("SET statement_timeout = 0")
        conn.exec_driver_sql("VACUUM (ANALYZE) users")


def insert_in_chunks(engine: Engine, rows: int) -> None:
    """The seed baseline: rows built in Python, 10,000 per statement, one transaction."""
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        unbounded(conn)
        if is_postgres(conn):
            _insert_chunks_postgres(conn, rows, now)
        else:
            _insert_chunks_sqlite(conn, rows, schema.to_microseconds(now))


def _insert_chunks_postgres(conn: sa.Connection, rows: int, now: dt.datetime) -> None:
    statements: dict[int, str] = {}
    for first in range(1, rows + 1, CHUNK_ROWS):
        count = min(CHUNK_ROWS, rows - first + 1)
        if count not in statements:  # built once, like a prepared insert_all of that size
            placeholders = ", ".join(["(%s, %s, %s, %s)"] * count)
            statements[count] = f"INSERT INTO users (id, points, inserted_at, updated_at) VALUES {placeholders}"
        params = tuple(value for user_id in range(first, first + count) for value in (user_id, 0, now, now))
        conn.exec_driver_sql(statements[count], params)


def _insert_chunks_sqlite(conn: sa.Connection, rows: int, now_microseconds: int) -> None:
    # NOTE: executemany, because 10,000 rows x 4 values exceed SQLite's 32,766 bound variables
    # per statement; the table is maxtwo's, so timestamps are its integer microseconds.
    insert = "INSERT INTO users (id, points, inserted_at, updated_at) VALUES (?, ?, ?, ?)"
    for first in range(1, rows + 1, CHUNK_ROWS):
        chunk = [(user_id, 0, now_microseconds, now_microseconds)
                 for user_id in range(first, min(first + CHUNK_ROWS, rows + 1))]
        conn.exec_driver_sql(insert, chunk)


def create_default_table(engine: Engine, rows: int) -> None:
    """A default users table holding `rows` users at 0 points (untimed preparation)."""
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        unbounded(conn)
        _default_metadata.create_all(conn)
        if is_postgres(conn):
            conn.execute(sa.text(
                "INSERT INTO users (id, points, inserted_at, updated_at) "
                "SELECT g, 0, now(), now() FROM generate_series(1, CAST(:rows AS integer)) AS g"),
                {"rows": rows})
        else:
            conn.execute(sa.text(
                "WITH RECURSIVE ids(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM ids WHERE id < :rows) "
                "INSERT INTO users (id, points, inserted_at, updated_at) SELECT id, 0, :now, :now FROM ids"),
                {"rows": rows, "now": now.strftime(_ISO_TIMESTAMP)})
    if is_postgres(engine):
        vacuum_analyze(engine)


def naive_update(engine: Engine) -> int:
    """The randomize baseline: the published single UPDATE, in its own transaction."""
    with engine.begin() as conn:
        unbounded(conn)
        if is_postgres(conn):
            return conn.execute(_NAIVE_UPDATE_POSTGRES).rowcount
        now = dt.datetime.now(dt.UTC).strftime(_ISO_TIMESTAMP)
        return conn.execute(_NAIVE_UPDATE_SQLITE, {"now": now}).rowcount


def create_unlogged_copy(engine: Engine, rows: int) -> None:
    """maxtwo's schema with an UNLOGGED users table (fillfactor 50 kept), seeded by the core."""
    schema.ensure_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE users SET UNLOGGED")
    seed_users(engine, rows)
    vacuum_analyze(engine)


_CONSTANT_POINTS = 50


def constant_update(engine: Engine) -> int:
    """The SQLite floor: maxtwo's update of every row, a constant in place of random(), without
    the state-row update maxtwo makes first in the same transaction (one row).

    NOTE: a constant also keeps every record the same size, where random points change the size
    of about 2 % of them each run (SQLite stores 0 and 1 in no bytes, 2..100 in one)."""
    with engine.begin() as conn:
        return conn.execute(schema.users.update().values(
            points=_CONSTANT_POINTS, updated_at=dt.datetime.now(dt.UTC))).rowcount


def is_logged(engine: Engine) -> bool:
    """Whether PostgreSQL writes the users table to the WAL (i.e. it survives a crash)."""
    with engine.connect() as conn:
        return conn.scalar(sa.text("SELECT relpersistence FROM pg_class WHERE oid = 'users'::regclass")) == "p"
