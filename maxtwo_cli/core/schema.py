"""The tables, and their idempotent, concurrency-safe creation.

State lives in the database, not in a process, so the CLI, one daemon or several daemons all
share it and it survives restarts. It is split in two single-row tables on purpose: a query
writes only `query_state`, a randomization writes only `randomizer_state` and `users`, so on
PostgreSQL a running randomization (holding row locks) never blocks a query. SQLite locks
whole files, so there `query_state` lives in a file of its own (core/db.py,
SQLITE_QUERY_SCHEMA) for the same reason, and so do the counters and their Idempotency-Keys:
an increment never waits for a randomization either, nor does a query queued behind one.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine

from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.db import (
    SQLITE_COUNTERS_MOVED_GUARD,
    SQLITE_QUERY_SCHEMA,
    database_errors,
    is_postgres,
    lost_query_file_error,
    ping,
    reading,
    sqlite_query_state_path,
)
from maxtwo_cli.core.errors import ConfigurationError, SchemaMismatchError

MAX_POINTS = 100
# An arbitrary constant naming maxtwo's schema-creation lock among advisory locks.
SCHEMA_LOCK_KEY = 0x6D617832_0001

metadata = sa.MetaData()


def _postgres_fillfactor(table: sa.Table, percent: int) -> None:
    """Create `table` on PostgreSQL with `percent` of each page filled, the rest left for updates.

    NOTE: rather than postgresql_with=...: a PostgreSQL keyword on a table makes SQLAlchemy
    import its PostgreSQL dialect (60 ms) in every process, a command on SQLite too. Set on the
    empty table right after its creation, the storage parameter is the same."""
    ddl = sa.DDL(f"ALTER TABLE {table.name} SET (fillfactor = {int(percent)})")
    sa.event.listen(table, "after_create", ddl.execute_if(dialect="postgresql"))


class UtcTimestamp(sa.TypeDecorator[dt.datetime]):
    """A UTC instant: timestamptz on PostgreSQL, integer microseconds since 1970 on SQLite.

    NOTE: SQLite has no timestamp type; SQLAlchemy's default stores 26-character strings,
    which more than doubles the users table and slows the minutely full-table update by half
    (measured: 1M rows, 31 MB vs 70 MB, 0.6-0.8 s vs 0.9-1.5 s).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return to_microseconds(value)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return from_microseconds(value)
        return value.astimezone(dt.UTC)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def to_microseconds(moment: dt.datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def from_microseconds(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=value)


users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("points", sa.SmallInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("inserted_at", UtcTimestamp(), nullable=False),
    sa.Column("updated_at", UtcTimestamp(), nullable=False),
    sa.CheckConstraint(f"points BETWEEN 0 AND {MAX_POINTS}", name="users_points_range"),
)
# NOTE: no index on points, and half of every page left free: the minutely UPDATE of every row
# then stays a HOT update (new row versions on the same page, no index maintenance), about 4x
# faster than on a default table.
_postgres_fillfactor(users, 50)

randomizer_state = sa.Table(
    "randomizer_state",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("max_number", sa.SmallInteger, nullable=False),
    # Incremented by every change to users: the key of any cached answer.
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("randomized_at", UtcTimestamp(), nullable=True),
    # The boundary the last scheduled run was for (randomize_if_due), by the daemons' clocks;
    # a manual run leaves it alone.
    sa.Column("scheduled_for", UtcTimestamp(), nullable=True),
    sa.CheckConstraint("id = 1", name="randomizer_state_single_row"),
    sa.CheckConstraint(f"max_number BETWEEN 0 AND {MAX_POINTS}", name="max_number_range"),
)

query_state = sa.Table(
    "query_state",
    metadata,
    sa.Column("id", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("last_query_at", UtcTimestamp(), nullable=True),
    # What the last query got as its previous time. NOTE: SQLite's RETURNING shows only new
    # values, so keeping the old one in the row is what lets a query be one statement there.
    # After a `seed --reset`, the last time recorded before it (forget_the_last_query).
    sa.Column("previous_query_at", UtcTimestamp(), nullable=True),
    sa.CheckConstraint("id = 1", name="query_state_single_row"),
)
# NOTE: on SQLite the same table in the attached query-state file. ensure_schema leaves no
# query_state in the main file, so SQL that names it unqualified (SQLite looks in temp, main,
# then attached files; maxtwo makes no temp tables) finds this one.
_sqlite_query_state = query_state.to_metadata(sa.MetaData(), schema=SQLITE_QUERY_SCHEMA)
# Where databases made before that kept it.
_sqlite_old_query_state = query_state.to_metadata(sa.MetaData(), schema="main")
# SQLite only: the users' epoch that the last query answered from (or that a `seed --reset` made).
# NOTE: a query there reads the main file's snapshot as its statement starts, then may wait for
# the query-state file's lock; a query or a reset that got the lock first may have seen newer
# users. core/query.py compares the two and asks again rather than answer older users after
# them. (PostgreSQL needs none: the reset's TRUNCATE holds queries off before their snapshot.)
_sqlite_query_state.append_column(sa.Column("users_epoch", sa.BigInteger, nullable=True))

# The counters service (core/counters.py). NOTE: on PostgreSQL every increment rewrites its row;
# no index covers value and a third of each page stays free, so those updates stay HOT (the new
# row version on the same page, no index entry). On SQLite a STRICT table can never hold a
# non-integer: SQLite's + turns a 64-bit overflow into a REAL, which it would then refuse.
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    # STRICT tables know INTEGER (64 bits), not BIGINT.
    sa.Column("value", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.CheckConstraint("length(key) BETWEEN 1 AND 255", name="counters_key_length"),
    sqlite_strict=True,
    sqlite_with_rowid=False,
)
_postgres_fillfactor(counters, 70)

# Idempotency-Key of an applied increment, recorded in its transaction: a retry within 24 hours
# is answered without applying it again. The daemon deletes expired keys.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    # What the request asked for (core/counters.py, Increment.fingerprint): a retry must match.
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("created_at", UtcTimestamp(), nullable=False, index=True),
)

# NOTE: on SQLite the counters and their keys live in the query-state file too, beside
# query_state: the main file's lock, which a randomization holds for a while, is then one an
# increment never needs. SQL that names them unqualified finds them there, as query_state.
_sqlite_own_file = {table.name: table.to_metadata(sa.MetaData(), schema=SQLITE_QUERY_SCHEMA)
                    for table in (counters, idempotency_keys)}
# Databases made before kept them in the main file; ensure_schema renames each (to this suffix)
# in the transaction that copies it over, and drops it once that copy has committed.
_MOVED_SUFFIX = "_moved"
# NOTE: a maxtwo from before the move looks for the counters in the main file only and would
# make them anew there, where SQL that names them finds them first: two sets of totals, and
# Idempotency-Keys forgotten. Its schema set-up creates an index after its tables, in the same
# transaction; a view of that index's name in the main file (db.SQLITE_COUNTERS_MOVED_GUARD:
# tables, views and indexes share one namespace) makes that fail and roll back: such a maxtwo
# refuses the database.
_GUARD_NOTE = "the counters live in the -query file: a maxtwo older than this database cannot use it"

# Columns added after a release: (table, column). ensure_schema adds them to older databases.
_ADDED_COLUMNS = (
    (query_state, query_state.c.previous_query_at),
    (randomizer_state, randomizer_state.c.scheduled_for),
    (_sqlite_query_state, _sqlite_query_state.c.users_epoch),
)


def draw_max_number() -> int:
    """A fresh hidden number, uniform in 0..100."""
    return secrets.randbelow(MAX_POINTS + 1)


def ensure_schema(engine: Engine) -> None:
    """Create maxtwo's tables and state rows if missing; refuse a database that is not ours.

    Safe to run any number of times and from several processes at once: on PostgreSQL a
    transaction-scoped advisory lock serialises creators (DDL is transactional there), on
    SQLite the BEGIN IMMEDIATE write lock does. A database that is complete already is only
    read: every command runs this first, and on SQLite the write lock would make it wait for a
    running randomization.
    """
    postgres = is_postgres(engine)
    with reading(engine) as conn:
        if postgres:
            _refuse_an_encoding_other_than_utf8(conn)
        if _is_complete(conn):
            return
    with database_errors(engine), engine.begin() as conn:
        if postgres:
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
        tables = _tables_of(conn)
        _refuse_another_programs_users(conn, tables)
        if not postgres:
            _refuse_a_query_file_without_counters(conn)
            _move_counters_to_their_file(conn)  # before the tables are created: it copies to new ones
        for table in tables:
            table.create(conn, checkfirst=True)
        _check_shape(conn, tables)
        _add_missing_columns(conn, tables)
        if not postgres:
            _copy_old_query_state(conn)
        if postgres:
            from sqlalchemy.dialects.postgresql import insert  # NOTE: imported for PostgreSQL only (60 ms)
        else:
            insert = sqlite.insert
        conn.execute(
            insert(randomizer_state)
            .values(id=1, max_number=draw_max_number(), epoch=0, randomized_at=None)
            .on_conflict_do_nothing()
        )
        conn.execute(insert(_query_state_of(conn)).values(id=1, last_query_at=None).on_conflict_do_nothing())
    if not postgres:
        # NOTE: a transaction of its own, after the copy has committed: SQLite commits the main
        # file before attached ones, so a crash between the two commits of one transaction
        # could drop the old table without the copy.
        with database_errors(engine), engine.begin() as conn:
            if _has_old_query_state(conn):
                _sqlite_old_query_state.drop(conn)
            inspector = sa.inspect(conn)
            for name in _sqlite_own_file:
                if inspector.has_table(name + _MOVED_SUFFIX, schema="main"):
                    conn.exec_driver_sql(f'DROP TABLE main."{name}{_MOVED_SUFFIX}"')
            # After the drops: the moved table's index bore the guard's name until now.
            conn.exec_driver_sql(
                f'CREATE VIEW IF NOT EXISTS main."{SQLITE_COUNTERS_MOVED_GUARD}" AS SELECT \'{_GUARD_NOTE}\' AS note'
            )


def _tables_of(conn: sa.Connection) -> list[sa.Table]:
    """maxtwo's tables where this database keeps them (SQLite: query_state, the counters and
    their keys in the query-state file)."""
    if is_postgres(conn):
        return list(metadata.sorted_tables)
    return [_sqlite_query_state if table is query_state else _sqlite_own_file.get(table.name, table)
            for table in metadata.sorted_tables]


def _query_state_of(conn: sa.Connection) -> sa.Table:
    return query_state if is_postgres(conn) else _sqlite_query_state


def forget_the_last_query(conn: sa.Connection, users_epoch: int) -> None:
    """What `seed --reset` does to the query state, in its transaction: the next query is the
    first ever (no previous time), and on SQLite none answers from the users it replaced.

    The last time recorded before stays, as previous_query_at, for the next query to record a
    later one: SQLite's time is taken before the statement waits (behind this reset, say), and
    a recorded time earlier than those already answered would go back (a review). Unless it
    lies more than a second ahead of the clock the queries use (a small step of the clock is
    kept): recorded by a clock that ran ahead, which a reset still clears."""
    table = _query_state_of(conn)
    last = sa.func.coalesce(table.c.last_query_at, table.c.previous_query_at)
    if is_postgres(conn):
        soon: sa.ColumnElement[Any] = sa.literal_column("clock_timestamp() + interval '1 second'")
    else:
        soon = sa.literal(utcnow() + dt.timedelta(seconds=1), UtcTimestamp())
    values: dict[str, Any] = {
        "last_query_at": None,
        "previous_query_at": sa.case((last <= soon, last), else_=None),
    }
    if "users_epoch" in table.c:
        values["users_epoch"] = users_epoch
    conn.execute(table.update().values(values))


def _refuse_an_encoding_other_than_utf8(conn: sa.Connection) -> None:
    """A counter's key is any text of 1 to 255 characters. In a LATIN1 database some cannot be
    stored ("has no equivalent in encoding"), in a SQL_ASCII one a character counts as its
    bytes (a key of 200 "é" broke the length check): either failed the whole batch of
    increments it came in, every other one of them answered 503, whenever a client sent such
    a key. Asked without a round trip: the server reports its encoding as the session starts."""
    encoding = conn.connection.driver_connection.info.parameter_status("server_encoding")
    if encoding is None:  # a pooler that does not pass the server's report on
        encoding = conn.exec_driver_sql("SHOW server_encoding").scalar()
    if encoding != "UTF8":
        raise ConfigurationError(
            f"the database {conn.engine.url.database!r} is encoded in {encoding}, and maxtwo needs "
            "UTF8 (a counter's key is any text): create one with CREATE DATABASE ... ENCODING 'UTF8' "
            "TEMPLATE template0, move the data there (docs/deployment.md, Upgrading), and point "
            "--database-url at it"
        )


def _is_complete(conn: sa.Connection) -> bool:
    """Whether every table, column and state row is there (and nothing is left to move), and
    the users table has no column maxtwo never made (_check_shape then says so)."""
    inspector = sa.inspect(conn)
    tables = _tables_of(conn)
    found = _found_columns(conn, tables)
    if any(not set(table.columns.keys()) <= found.get(table.name, set()) for table in tables):
        return False
    if found[users.name] != set(users.columns.keys()):
        return False
    if not is_postgres(conn) and (
        _has_old_query_state(conn)
        or any(inspector.has_table(name + suffix, schema="main") for name in _sqlite_own_file for suffix in ("", _MOVED_SUFFIX))
        or SQLITE_COUNTERS_MOVED_GUARD not in inspector.get_view_names(schema="main")
    ):
        return False
    rows = sa.select(
        sa.select(sa.func.count()).select_from(randomizer_state).scalar_subquery(),
        sa.select(sa.func.count()).select_from(_query_state_of(conn)).scalar_subquery(),
    )
    return tuple(conn.execute(rows).one()) == (1, 1)


def _has_old_query_state(conn: sa.Connection) -> bool:
    old = _sqlite_old_query_state
    return sa.inspect(conn).has_table(old.name, schema=old.schema)


def _copy_old_query_state(conn: sa.Connection) -> None:
    """A SQLite database made before the query state had a file of its own: copy its row there
    (ensure_schema drops the old table once the copy has committed; a row copied before is kept)."""
    old = _sqlite_old_query_state
    if not _has_old_query_state(conn):
        return
    _check_shape(conn, [old])
    conn.execute(
        sqlite.insert(_sqlite_query_state)
        # NOTE: SQLite needs a WHERE before ON CONFLICT here (else ON reads as a join's).
        .from_select(["id", "last_query_at"], sa.select(old.c.id, old.c.last_query_at).where(sa.true()))
        .on_conflict_do_nothing()
    )


def _refuse_a_query_file_without_counters(conn: sa.Connection) -> None:
    """The guard is made once the counters live in the query-state file: with it there and
    they not, the file there is not the one that held them (another database's, made by hand):
    making the counters anew would start every total at 0 and forget every Idempotency-Key,
    silently. (A file missing or empty is refused before it is attached: db.py.)"""
    inspector = sa.inspect(conn)
    if SQLITE_COUNTERS_MOVED_GUARD in inspector.get_view_names(schema="main") and not inspector.has_table(
        "counters", schema=SQLITE_QUERY_SCHEMA
    ):
        raise lost_query_file_error(conn.engine.url.database or "")


def _move_counters_to_their_file(conn: sa.Connection) -> None:
    """A SQLite database made before the counters and their keys lived in the query-state file:
    copy each table there, and rename the old one in the same transaction (ensure_schema drops
    it once this has committed).

    NOTE: crash-safe although SQLite commits the two files one after the other (the main file
    first): a crash between leaves the old table renamed and its copy not made, and the next
    run copies from the renamed table (nothing can have written to it: no SQL names it)."""
    inspector = sa.inspect(conn)
    for name, new in _sqlite_own_file.items():
        old = metadata.tables[name].to_metadata(sa.MetaData(), schema="main")
        moved = name + _MOVED_SUFFIX
        in_main, renamed = inspector.has_table(name, schema="main"), inspector.has_table(moved, schema="main")
        copied = inspector.has_table(name, schema=SQLITE_QUERY_SCHEMA)
        if in_main and (copied or renamed):
            # A table made anew in the main file after a move (by hand, or by a maxtwo from
            # before the guard below), which SQL that names it finds first: two tables hold
            # live rows, and no rule says which to keep.
            raise SchemaMismatchError(
                f"the SQLite database holds a table {name!r} in {conn.engine.url.database} and its rows moved "
                f"to {sqlite_query_state_path(conn.engine.url.database or '')} (or to {moved!r}) as well; "
                "merge them by hand, keeping one table, in the -query file"
            )
        if in_main:
            _check_shape(conn, [old])
            source = name
        elif renamed and not copied:
            source = moved  # renamed by a move whose copy a crash undid
        else:
            continue
        new.create(conn)
        columns = [column.name for column in new.columns]
        rows = sa.table(source, *(sa.column(column) for column in columns), schema="main")
        conn.execute(new.insert().from_select(columns, sa.select(*rows.c)))
        if source == name:
            conn.exec_driver_sql(f'ALTER TABLE main."{name}" RENAME TO "{moved}"')


def _add_missing_columns(conn: sa.Connection, tables: list[sa.Table]) -> None:
    """Bring a database made by an older maxtwo up to date (nullable columns, no data moved)."""
    inspector = sa.inspect(conn)
    for table in tables:
        found = _column_names(inspector, table)
        for column in _columns_added_later(table):
            if column.name not in found:
                ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
                conn.execute(sa.DDL(f"ALTER TABLE {table.fullname} ADD COLUMN {ddl}"))


def _found_columns(conn: sa.Connection, tables: list[sa.Table]) -> dict[str, set[str]]:
    """The column names of each of `tables` that the database has, by table name."""
    if is_postgres(conn):
        return _postgres_column_names(conn, tables)
    inspector = sa.inspect(conn)
    return {table.name: _column_names(inspector, table) for table in tables
            if inspector.has_table(table.name, schema=table.schema)}


def _refuse_another_programs_users(conn: sa.Connection, tables: list[sa.Table]) -> None:
    """Refuse a users table without randomizer_state beside it: another program's, whose rows
    a randomization would rewrite and `seed --reset` delete. maxtwo creates both in one
    transaction, and has since its first release. (On SQLite, core/db.py refuses such a file
    on connecting, before anything in it or beside it changes.)"""
    found = _found_columns(conn, tables)
    if users.name in found and randomizer_state.name not in found:
        raise SchemaMismatchError(
            f"the database already has a table {users.name!r} that maxtwo did not create (no "
            f"{randomizer_state.name} beside it); maxtwo will not touch it, point --database-url at another database"
        )


def _postgres_column_names(conn: sa.Connection, tables: list[sa.Table]) -> dict[str, set[str]]:
    """The column names of each of `tables` that the search path finds, by table name, read
    from the catalogs alone.

    NOTE: not SQLAlchemy's reflection, which deparses each column's default (pg_get_expr) and so
    waits for a lock on the table: a seed holds the users table's exclusive lock until it commits,
    and every command (an increment, which never reads users) waited for it, or timed out."""
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, a.attname FROM pg_catalog.pg_class c"
            " JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relname = ANY(:names) AND c.relkind IN ('r', 'p') AND pg_catalog.pg_table_is_visible(c.oid)"
        ),
        {"names": [table.name for table in tables]},
    )
    found: dict[str, set[str]] = {}
    for table_name, column_name in rows:
        found.setdefault(table_name, set()).add(column_name)
    return found


def _column_names(inspector: sa.Inspector, table: sa.Table) -> set[str]:
    """The names of the columns `table` has in the database (where this dialect keeps it)."""
    return {column["name"] for column in inspector.get_columns(table.name, schema=table.schema)}


def _columns_added_later(table: sa.Table) -> list[sa.Column[Any]]:
    # (By name: query_state's SQLite copies are tables of their own, and only one has users_epoch.)
    return [column for owner, column in _ADDED_COLUMNS if owner.name == table.name and column.name in table.c]


# Tables whose column types are checked too (their types never changed since they came):
# another application's `counters (key text, value text)` has maxtwo's columns by name.
_TYPE_CHECKED_TABLES = frozenset({"counters", "idempotency_keys"})


def _check_shape(conn: sa.Connection, tables: list[sa.Table]) -> None:
    """create() skips tables that exist; make sure the ones it skipped are really ours."""
    inspector = sa.inspect(conn)
    for table in tables:
        columns = {column["name"]: column["type"] for column in inspector.get_columns(table.name, schema=table.schema)}
        added_later = {column.name for column in _columns_added_later(table)}
        problems = [f"no column {name}" for name in sorted(set(table.columns.keys()) - set(columns) - added_later)]
        if table.name == users.name:
            # NOTE: only users: a newer maxtwo adds columns to the other tables (_ADDED_COLUMNS),
            # never to this one, whose every row a randomization rewrites.
            problems += [f"a column {name} maxtwo never made" for name in sorted(set(columns) - set(table.columns.keys()))]
        if not problems and table.name in _TYPE_CHECKED_TABLES:
            for column in table.columns:
                expected, found = column.type.dialect_impl(conn.dialect), columns[column.name]
                # The kind of type (text, integer, time), and for a 64-bit total, 64 bits.
                narrower = isinstance(expected, sa.BigInteger) and not isinstance(found, sa.BigInteger)
                if found._type_affinity is not expected._type_affinity or narrower:
                    problems.append(f"column {column.name} of type {found}")
        if problems:
            raise SchemaMismatchError(
                f"the database already has a table {table.name!r} that maxtwo did not create "
                f"({', '.join(problems)}); maxtwo will not touch it, point --database-url at another database"
            )


# What maxtwo does, table by table: the privileges its PostgreSQL role needs. (INSERT ... ON
# CONFLICT DO UPDATE needs INSERT and UPDATE, and an UPDATE that reads its rows SELECT.)
_PRIVILEGES = (
    *((table, "SELECT") for table in (users, randomizer_state, query_state, counters, idempotency_keys)),
    (users, "UPDATE"),
    (randomizer_state, "UPDATE"),
    (query_state, "UPDATE"),
    (counters, "INSERT"),
    (counters, "UPDATE"),
    (idempotency_keys, "INSERT"),
    (idempotency_keys, "UPDATE"),
    (idempotency_keys, "DELETE"),
)


def writes_refused(engine: Engine) -> str | None:
    """Why the database would refuse maxtwo's writes, or None: a role without a privilege, a
    read-only server (a standby, default_transaction_read_only) or SQLite file. Asks without
    writing, so a health check can tell "answers" from "works"; DatabaseUnavailableError if the
    database does not answer at all (one round trip on PostgreSQL: no ping needed besides)."""
    if not is_postgres(engine):
        ping(engine)  # the file opens and reads; the rest is the operating system's to say
        return _sqlite_writes_refused(engine.url.database or "")
    # NOTE: any column's privilege will do for SELECT, INSERT and UPDATE: a role granted them
    # column by column is not refused (DELETE is the table's alone).
    checks = [
        (sa.func.has_table_privilege if privilege == "DELETE" else sa.func.has_any_column_privilege)(
            table.name, privilege
        )
        for table, privilege in _PRIVILEGES
    ]
    with reading(engine) as conn:
        read_only, *granted = conn.execute(sa.select(sa.func.current_setting("transaction_read_only"), *checks)).one()
    if read_only == "on":
        return "the server takes no writes (a standby, or default_transaction_read_only)"
    missing = [f"{privilege} on {table.name}" for (table, privilege), ok in zip(_PRIVILEGES, granted, strict=True) if not ok]
    return f"the role lacks {', '.join(missing)}" if missing else None


def _sqlite_writes_refused(database: str) -> str | None:
    # NOTE: SQLite follows a symbolic link to the database and keeps its journals beside the
    # target, and so does the query-state file (core/db.py). access()
    # reports what a write would meet: permissions (for the effective user; not for root), a
    # read-only file system (EROFS) and the immutable flag (EPERM, root included). An -shm file
    # that cannot be written is mapped read-only, and every write fails.
    effective = os.access in os.supports_effective_ids
    for name in (os.path.realpath(database), str(sqlite_query_state_path(database))):
        for path in (name, f"{name}-wal", f"{name}-shm"):
            if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK, effective_ids=effective):
                return f"{path} is not writable"
        directory = os.path.dirname(os.path.abspath(name))
        if not os.access(directory, os.W_OK | os.X_OK, effective_ids=effective):
            return f"the directory {directory} is not writable (SQLite creates its journals there)"
    return None
