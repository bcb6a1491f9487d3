from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from maxtwo_cli.core import db, errors, schema
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.counters import (
    IdempotencyKeyReusedError,
    delete_expired_idempotency_keys,
    increment,
    list_counters,
    read_counter,
)
from maxtwo_cli.core.errors import ConfigurationError, SchemaMismatchError
from maxtwo_cli.core.query import query_users
from maxtwo_cli.core.randomize import randomize_if_due
from maxtwo_cli.core.settings import Settings, default_database_url
from tests.conftest import libpq_url
from tests.helpers import main_file_locked, state


def test_ensure_schema_twice_is_harmless(engine):
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)
    current = state(engine)
    assert current.epoch == 0
    assert current.last_query_at is None
    assert current.randomized_at is None
    assert 0 <= current.max_number <= 100


@pytest.mark.parametrize("state_table", [schema.randomizer_state, schema.query_state], ids=lambda table: table.name)
def test_a_deleted_state_row_is_made_again(engine, state_table):
    with engine.begin() as conn:
        conn.execute(state_table.delete())
    schema.ensure_schema(engine)
    assert query_users(engine).previous is None
    assert randomize_if_due(engine, due_at=utcnow(), interval=60) is not None


def test_maxtwo_tables_in_another_schema_do_not_stand_in_for_this_ones(postgres_url):
    """Two deployments in one PostgreSQL database, each in a schema of its own (search_path):
    the other's tables made this one's fresh schema look complete, and none was ever made."""
    url = sa.make_url(postgres_url)
    other = url.query["options"].removeprefix("-csearch_path=") + "_other"
    other_url = url.update_query_dict({"options": f"-csearch_path={other}"}).render_as_string(hide_password=False)
    with psycopg.connect(libpq_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{other}"')
    engines = [db.create_engine(Settings(database_url=other_url)), db.create_engine(Settings(database_url=postgres_url))]
    try:
        for engine in engines:
            schema.ensure_schema(engine)
        increment(engines[1], "a", 1)
        assert query_users(engines[1]).previous is None
        assert read_counter(engines[0], "a") is None
    finally:
        for engine in engines:
            engine.dispose()
        with psycopg.connect(libpq_url(postgres_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{other}" CASCADE')


ENSURE_SCRIPT = """
import sys
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.settings import Settings
schema.ensure_schema(db.create_engine(Settings(database_url=sys.argv[1], statement_timeout=30.0)))
"""


@pytest.mark.slow  # four Python processes per database
def test_ensure_schema_from_several_processes_at_once(settings):
    processes = [
        subprocess.Popen([sys.executable, "-c", ENSURE_SCRIPT, settings.database_url], stderr=subprocess.PIPE, encoding="utf-8")
        for _ in range(4)
    ]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    engine = db.create_engine(settings)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.randomizer_state)) == 1
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.query_state)) == 1
    engine.dispose()


def test_ensure_schema_from_several_connections_at_once_on_postgres(postgres_url):
    """The advisory lock serialises the creators: without it two CREATE TABLE IF NOT EXISTS
    of one table collide in PostgreSQL's catalogue (a unique violation on pg_type), and a
    daemon starting beside another on a new database fails. (Threads released together: the
    processes of the test above start too far apart to collide every time.)"""
    engines = [db.create_engine(Settings(database_url=postgres_url)) for _ in range(8)]
    start = threading.Barrier(len(engines))
    errors: list[BaseException] = []

    def create(engine: sa.Engine) -> None:
        try:
            with engine.connect():  # connected before the barrier: the creators start together
                pass
            start.wait(30)
            schema.ensure_schema(engine)
        except BaseException as ex:  # noqa: BLE001 - reported below
            errors.append(ex)

    threads = [threading.Thread(target=create, args=(engine,)) for engine in engines]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for engine in engines:
            engine.dispose()
    assert errors == []
    engine = db.create_engine(Settings(database_url=postgres_url))
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(schema.randomizer_state)) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("held", ["main", "query state"])
def test_a_sqlite_file_another_process_is_writing_in_its_first_journal_mode_is_waited_for(tmp_path, monkeypatch, held):
    """Two processes opening a new file at once: while one writes in it in its first (rollback)
    journal mode, as it does to switch it to WAL, the other's switch fails at once with
    SQLITE_BUSY (SQLite never calls the busy handler to upgrade a read transaction: it could
    deadlock). maxtwo tries again within the busy timeout instead of failing."""
    path = tmp_path / "maxtwo.db"
    writer = sqlite3.connect(path if held == "main" else db.sqlite_query_state_path(path), isolation_level=None)
    # (A table of maxtwo's name: a file of another program's tables would be refused instead.)
    writer.execute(f"CREATE TABLE {db.SQLITE_OWN_TABLE} (x)")
    writer.execute("BEGIN IMMEDIATE")
    waits = []

    def wait(seconds: float) -> None:  # the other process finishes at the first wait
        waits.append(seconds)
        if writer.in_transaction:
            writer.execute("COMMIT")

    monkeypatch.setattr(db.time, "sleep", wait)
    try:
        engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=10.0))
        with db.reading(engine) as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql(f"PRAGMA {db.SQLITE_QUERY_SCHEMA}.journal_mode").scalar() == "wal"
        engine.dispose()
    finally:
        writer.close()
    assert waits  # it met SQLITE_BUSY, and waited instead of failing


def test_an_error_other_than_busy_is_not_tried_again(monkeypatch):
    """Only SQLITE_BUSY is waited out: any other error fails at once, not at the busy
    timeout's end (a mutation audit)."""
    waits: list[float] = []
    monkeypatch.setattr(db.time, "sleep", waits.append)
    with (contextlib.closing(sqlite3.connect(":memory:")) as connection,
          pytest.raises(sqlite3.OperationalError, match="syntax error")):
        db._execute_when_free(connection.cursor(), "SELEC 1", busy_until=time.monotonic() + 5)
    assert waits == []


def test_a_database_made_before_previous_query_at_gets_it(engine):
    # An older maxtwo's query_state had no previous_query_at; ensure_schema adds it, keeping
    # the chain.
    schema.ensure_schema(engine)
    first = query_users(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE query_state DROP COLUMN previous_query_at"))
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)  # and only once
    assert query_users(engine).previous == first.recorded_at


def test_a_sqlite_query_file_made_before_users_epoch_gets_it(tmp_path):
    # SQLite keeps in query_state the users' epoch the last query saw (core/query.py); an older
    # maxtwo's file has no such column: ensure_schema adds it, keeping the chain.
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    first = query_users(engine)
    engine.dispose()
    with sqlite3.connect(tmp_path / "maxtwo.db-query") as old:
        old.execute("ALTER TABLE query_state DROP COLUMN users_epoch")
    old.close()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)  # and only once
    assert query_users(engine).previous == first.recorded_at
    engine.dispose()
    with sqlite3.connect(tmp_path / "maxtwo.db-query") as upgraded:
        assert upgraded.execute("SELECT users_epoch FROM query_state").fetchall() == [(0,)]
    upgraded.close()


def test_postgres_query_state_has_no_users_epoch(postgres_engine):
    # SQLite's alone: on PostgreSQL a reset's TRUNCATE holds queries off before their snapshot.
    schema.ensure_schema(postgres_engine)
    columns = {column["name"] for column in sa.inspect(postgres_engine).get_columns("query_state")}
    assert columns == {"id", "last_query_at", "previous_query_at"}


def test_a_database_made_before_scheduled_for_gets_it_and_its_next_slot_runs(engine):
    schema.ensure_schema(engine)
    due_at = utcnow()
    assert randomize_if_due(engine, due_at=due_at, interval=60) is not None
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE randomizer_state DROP COLUMN scheduled_for"))
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)  # and only once
    # No slot recorded: the first scheduled run after the upgrade runs, and counts.
    assert randomize_if_due(engine, due_at=due_at, interval=60) is not None
    assert randomize_if_due(engine, due_at=due_at, interval=60) is None


def test_a_sqlite_database_with_its_query_state_inside_gets_it_moved_out(tmp_path):
    # Before the query state had a file of its own, it was a table in the main file (without
    # previous_query_at in the oldest databases); ensure_schema moves its time, keeping the chain.
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    engine.dispose()
    (tmp_path / "maxtwo.db-query").unlink()
    last_query_at = 1_700_000_000_123_456  # microseconds, as SQLite stores it
    with sqlite3.connect(path) as old:
        old.execute("DROP VIEW ix_idempotency_keys_created_at")  # no maxtwo of then made it
        old.execute("CREATE TABLE query_state (id SMALLINT PRIMARY KEY, last_query_at BIGINT)")
        old.execute("INSERT INTO query_state VALUES (1, ?)", (last_query_at,))
    old.close()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)  # and only once
    assert query_users(engine).previous == schema.from_microseconds(last_query_at)
    engine.dispose()
    with sqlite3.connect(path) as main_file:
        assert main_file.execute("SELECT name FROM sqlite_master WHERE name = 'query_state'").fetchall() == []
    main_file.close()


def make_counters_the_old_way(path, suffix: str = "") -> None:
    """A SQLite database as maxtwo made it before the counters lived in the query-state file:
    a counter and an Idempotency-Key in main-file tables (renamed with `suffix`, as a move that
    a crash cut short leaves them)."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    engine.dispose()
    with sqlite3.connect(path) as old:
        old.execute("DROP VIEW ix_idempotency_keys_created_at")  # no older maxtwo made it
        for table in (schema.counters, schema.idempotency_keys):
            old.execute(str(sa.schema.CreateTable(table).compile(dialect=engine.dialect)))
            for index in table.indexes:
                old.execute(str(sa.schema.CreateIndex(index).compile(dialect=engine.dialect)))
        old.execute("INSERT INTO counters VALUES ('a', 5), ('b', -2)")
        old.execute("INSERT INTO idempotency_keys VALUES ('k1', 'another body', ?)", (schema.to_microseconds(utcnow()),))
        if suffix:
            for table in (schema.counters, schema.idempotency_keys):
                old.execute(f"ALTER TABLE {table.name} RENAME TO {table.name}{suffix}")
    old.close()
    with sqlite3.connect(f"{path}-query") as query_file:
        query_file.execute("DROP TABLE counters")
        query_file.execute("DROP TABLE idempotency_keys")
    query_file.close()


def tables_in(path) -> set[str]:
    with sqlite3.connect(path) as connection:
        names = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    connection.close()
    return names


@pytest.mark.parametrize("suffix", ["", "_moved"])
def test_a_sqlite_database_with_its_counters_inside_gets_them_moved_to_the_query_file(tmp_path, suffix):
    # "_moved": the move renames the old tables and copies them in one transaction, whose main
    # file commits first; a crash between leaves them renamed and uncopied, and the next run copies.
    path = tmp_path / "maxtwo.db"
    make_counters_the_old_way(path, suffix)
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    schema.ensure_schema(engine)  # and only once
    assert list_counters(engine) == [("a", 5), ("b", -2)]
    with pytest.raises(IdempotencyKeyReusedError):
        increment(engine, "a", 1, idempotency_key="k1")  # the key came along
    assert increment(engine, "a", 1).total == 6
    engine.dispose()
    assert {"counters", "idempotency_keys"} <= tables_in(f"{path}-query")
    assert tables_in(path) == {"users", "randomizer_state"}


def test_counters_in_both_files_are_refused_and_left_alone(tmp_path):
    # An older maxtwo made the main file's tables anew after the move: both hold live rows.
    path = tmp_path / "maxtwo.db"
    make_counters_the_old_way(path)
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    engine.dispose()
    with sqlite3.connect(path) as old:  # without the query-state file attached: the main file's
        old.execute(str(sa.schema.CreateTable(schema.counters).compile(dialect=engine.dialect)))
        old.execute("INSERT INTO counters VALUES ('a', 1)")
    old.close()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="merge them by hand"):
        schema.ensure_schema(engine)
    engine.dispose()
    assert "counters" in tables_in(path) and "counters" in tables_in(f"{path}-query")


def make_counters_as_an_older_maxtwo(path) -> None:
    """What the schema set-up of a maxtwo from before the move does: it looks for its tables in
    the main file only, and creates those it misses there, in one transaction."""
    older = db.create_engine(Settings(database_url=f"sqlite:///{path}"))  # as it made it, attach included
    try:
        with older.begin() as conn:
            schema.metadata.create_all(conn, tables=[schema.counters, schema.idempotency_keys])
    finally:
        older.dispose()


@pytest.mark.parametrize("moved", [False, True])
def test_an_older_maxtwo_cannot_make_the_counters_anew_in_the_main_file(tmp_path, moved):
    # Made there, SQL that names them would find them first: two sets of totals.
    path = tmp_path / "maxtwo.db"
    if moved:
        make_counters_the_old_way(path)
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    increment(engine, "a", 1)
    with pytest.raises(sa.exc.OperationalError, match="ix_idempotency_keys_created_at"):
        make_counters_as_an_older_maxtwo(path)
    assert "counters" not in tables_in(path)  # its transaction rolled back whole
    schema.ensure_schema(engine)
    assert read_counter(engine, "a") == (6 if moved else 1)
    engine.dispose()


def test_a_dropped_guard_against_an_older_maxtwo_is_made_again(tmp_path):
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    with sqlite3.connect(path) as conn:
        conn.execute('DROP VIEW main."ix_idempotency_keys_created_at"')
    conn.close()
    schema.ensure_schema(engine)
    engine.dispose()
    with pytest.raises(sa.exc.OperationalError, match="ix_idempotency_keys_created_at"):
        make_counters_as_an_older_maxtwo(path)


def test_a_move_cut_short_and_a_table_made_anew_in_the_main_file_are_refused(tmp_path):
    # The renamed table was never copied: it holds the only copy of its rows, never dropped.
    path = tmp_path / "maxtwo.db"
    make_counters_the_old_way(path, "_moved")
    with sqlite3.connect(path) as old:
        old.execute(str(sa.schema.CreateTable(schema.counters).compile(dialect=sqlite_dialect())))
    old.close()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="merge them by hand"):
        schema.ensure_schema(engine)
    engine.dispose()
    assert {"counters", "counters_moved"} <= tables_in(path)


def test_a_lost_query_state_file_is_refused_not_made_anew_empty(tmp_path):
    # It holds the counters and their Idempotency-Keys: made anew, every total would restart at
    # 0 and a retried increment would be applied again.
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    increment(engine, "a", 1)
    engine.dispose()
    for lost in tmp_path.glob("maxtwo.db-query*"):
        lost.unlink()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="missing or empty; restore both files"):
        schema.ensure_schema(engine)
    engine.dispose()
    # Nothing made in its place (a review: an empty one, which a restore with cp -n would keep).
    assert sorted(found.name for found in tmp_path.iterdir()) == ["maxtwo.db"]
    (tmp_path / "maxtwo.db-query").touch()  # a file of 0 bytes: as good as lost
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="missing or empty; restore both files"):
        schema.ensure_schema(engine)
    engine.dispose()
    assert (tmp_path / "maxtwo.db-query").stat().st_size == 0


def test_on_sqlite_increments_never_wait_for_the_main_file_a_randomization_locks(tmp_path):
    with main_file_locked(tmp_path) as engine:
        assert increment(engine, "a", 1).total == 1  # one statement
        assert increment(engine, "a", 1, idempotency_key="k").total == 2  # a transaction
        assert delete_expired_idempotency_keys(engine).deleted == 0
        assert read_counter(engine, "a") == 2 and list_counters(engine) == [("a", 2)]  # and reads


def test_a_complete_sqlite_database_is_only_read_so_a_command_need_not_wait_for_a_randomization(tmp_path):
    with main_file_locked(tmp_path) as engine:
        schema.ensure_schema(engine)  # with the write lock it would fail: "stayed locked"
        assert query_users(engine).previous is None


def test_points_outside_0_to_100_are_refused_by_the_database(engine):
    for points in (-1, 101):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                schema.users.insert().values(points=points, inserted_at=utcnow(), updated_at=utcnow())
            )


@pytest.mark.parametrize(("table", "columns", "row", "problem"), [
    ("users", "id INTEGER PRIMARY KEY, name TEXT", (1, "ada"), "no randomizer_state beside it"),
    # maxtwo's columns, and more (a review: another application's users, randomized and
    # then truncated by `seed --reset`).
    ("users", "id INTEGER PRIMARY KEY, name TEXT, points INTEGER, inserted_at TIMESTAMP, updated_at TIMESTAMP",
     (1, "ada", 1234, None, None), "no randomizer_state beside it"),
    # maxtwo's columns alone, but no randomizer_state: maxtwo never makes one without the other.
    ("users", "id INTEGER PRIMARY KEY, points INTEGER, inserted_at TIMESTAMP, updated_at TIMESTAMP",
     (1, 1234, None, None), "no randomizer_state beside it"),
    # maxtwo's columns by name, not by type: a total would come back as text.
    ("counters", "key TEXT PRIMARY KEY, value TEXT", ("a", "hello"), "column value of type"),
])
def test_a_foreign_table_is_refused_and_left_alone(settings, table, columns, row, problem):
    assert_refused_and_left_alone(settings, table, columns, row, problem)


@pytest.mark.parametrize(("change", "problem", "columns"), [
    # Beside maxtwo's other tables: made by a maxtwo that took another program's users.
    ("ADD COLUMN name TEXT", "a column name maxtwo never made", {"id", "points", "inserted_at", "updated_at", "name"}),
    ("DROP COLUMN updated_at", "no column updated_at", {"id", "points", "inserted_at"}),
])
def test_a_users_table_of_another_shape_is_refused_and_left_alone(engine, change, problem, columns):
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE users {change}"))
    with pytest.raises(SchemaMismatchError, match=f"'users' that maxtwo did not create .{problem}"):
        schema.ensure_schema(engine)
    with engine.connect() as conn:
        assert {column["name"] for column in sa.inspect(conn).get_columns("users")} == columns


def test_a_counters_table_of_32_bit_totals_is_refused_and_left_alone(postgres_url):
    # PostgreSQL's integer: a total past 2**31 would fail later, not now. (SQLite's INTEGER
    # holds 64 bits.)
    settings = Settings(database_url=postgres_url)
    assert_refused_and_left_alone(settings, "counters", "key TEXT PRIMARY KEY, value INTEGER", ("a", 1), "column value of type")


def assert_refused_and_left_alone(settings, table, columns, row, problem):
    engine = db.create_engine(settings)
    foreign = sa.table(table, *(sa.column(column.split()[0]) for column in columns.split(", ")))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} ({columns})"))
        conn.execute(foreign.insert().values(dict(zip(foreign.c.keys(), row, strict=True))))
    with pytest.raises(SchemaMismatchError, match=f"{table}.*{problem}"):
        schema.ensure_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(*foreign.c)).all() == [row]
        tables = sa.inspect(conn).get_table_names()
    assert "randomizer_state" not in tables  # all-or-nothing: nothing was created either
    engine.dispose()


@pytest.mark.parametrize("tables", [["notes (x)"], ["users (id INTEGER PRIMARY KEY, name TEXT)", "notes (x)"]],
                         ids=["unrelated", "a-users-table"])
def test_another_programs_sqlite_file_is_refused_untouched(tmp_path, tables):
    """Not only its tables: WAL mode would stay with the file, and a -query file appear beside it."""
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        for table in tables:
            other.execute(f"CREATE TABLE {table}")
        other.commit()
    content = path.read_bytes()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match=r"another program's tables .* maxtwo will not touch it"):
        schema.ensure_schema(engine)
    engine.dispose()
    assert path.read_bytes() == content
    assert sorted(tmp_path.iterdir()) == [path]  # no -query file, no -wal
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)


@pytest.mark.parametrize(("count", "shown"), [(5, "(t1, t2, t3, t4, t5)"), (6, "(t1, t2, t3, t4, t5, ...)")])
def test_another_programs_tables_are_named_up_to_five(tmp_path, count, shown):
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        for number in range(1, count + 1):
            other.execute(f"CREATE TABLE t{number} (x)")
        other.commit()
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError) as raised:
        schema.ensure_schema(engine)
    engine.dispose()
    assert f"another program's tables {shown} and none" in str(raised.value)


def _sqlite_error(message: str, name: str) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name  # as SQLite's own errors carry it
    return error


# Each error a driver raises, as the user reads it: what went wrong and what to do.
@pytest.mark.parametrize(("scheme", "raised", "kind", "advice"), [
    ("postgresql", psycopg.errors.SerializationFailure("could not serialize access"), errors.DatabaseBusyError,
     "rolled the transaction back (could not serialize access); nothing of it was applied: try again"),
    ("postgresql", psycopg.errors.DeadlockDetected("deadlock detected"), errors.DatabaseBusyError,
     "rolled the transaction back (deadlock detected); nothing of it was applied: try again"),
    ("postgresql", psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
     errors.DatabaseBusyError, "did not grant a lock in time"),
    ("postgresql", psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
     errors.DatabaseBusyError, "did not answer in time"),
    ("postgresql", psycopg.errors.InsufficientPrivilege("permission denied for table users"),
     errors.DatabaseUnavailableError, "refused: permission denied for table users; check the role's privileges"),
    ("sqlite", _sqlite_error("database table is locked", "SQLITE_LOCKED_SHAREDCACHE"), errors.DatabaseBusyError,
     "stayed locked by another process"),
    ("sqlite", _sqlite_error("unusual words", "SQLITE_LOCKED"), errors.DatabaseBusyError, "stayed locked"),
    ("sqlite", _sqlite_error("database or disk is full", "SQLITE_FULL"), errors.DatabaseUnavailableError,
     "is full; free some space"),
    ("sqlite", _sqlite_error("attempt to write a readonly database", "SQLITE_READONLY"),
     errors.DatabaseUnavailableError, "is read-only (attempt to write a readonly database)"),
    ("sqlite", _sqlite_error("disk I/O error", "SQLITE_IOERR_WRITE"), errors.DatabaseUnavailableError,
     "could not be read or written (disk I/O error, SQLITE_IOERR_WRITE); check its file system"),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None)
def test_each_database_error_says_what_went_wrong_and_what_to_do(tmp_path, scheme, raised, kind, advice):
    url = "postgresql://maxtwo:s3cret@127.0.0.1:1/maxtwo" if scheme == "postgresql" else f"sqlite:///{tmp_path / 'm.db'}"
    engine = db.create_engine(Settings(database_url=url))  # connects to nothing: the error is made up
    with pytest.raises(errors.MaxtwoError) as translated, db.database_errors(engine):
        raise raised
    assert type(translated.value) is kind
    assert advice in str(translated.value) and "s3cret" not in str(translated.value)


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    with pytest.raises(SchemaMismatchError, match="not a SQLite database") as refused:
        schema.ensure_schema(engine)
    assert str(refused.value).startswith(f"{path} (or {db.sqlite_query_state_path(path)}, which holds its query state) ")
    assert path.read_bytes() == content


@pytest.mark.parametrize(
    ("raw", "driver"),
    [
        ("postgresql://u:p@localhost/db", "postgresql+psycopg"),
        ("postgres://u:p@localhost/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u:p@localhost:5433/db", "postgresql+psycopg"),
        ("sqlite:///relative.db", "sqlite+pysqlite"),
    ],
)
def test_accepted_urls(raw, driver):
    assert db.parse_database_url(raw).drivername == driver


@pytest.mark.parametrize(
    "raw",
    [
        "mysql://root:s3cret@localhost/db",
        "postgresql+psycopg2://u:s3cret@localhost/db",
        "not a url s3cret",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///x.db?mode=ro",
        # A user, password or host: SQLAlchemy refused it in several lines, after maxtwo had
        # made the path's directories (relative to the working directory).
        "sqlite://user:s3cret@host/tmp/x.db",
        "sqlite://host/x.db",
        "sqlite://:s3cret@/x.db",
        "sqlite://@/x.db",
        "sqlite://:0/x.db",
        "sqlite:///x%00.db",
    ],
)
def test_refused_urls_never_echo_the_password(raw):
    with pytest.raises(ConfigurationError) as info:
        db.parse_database_url(raw)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("name", ["connect_timeout", "tcp_user_timeout", "keepalives", "keepalives_idle",
                                  "keepalives_interval", "keepalives_count"])
def test_a_libpq_parameter_maxtwo_sets_itself_is_refused_in_the_url_not_ignored(name):
    """SQLAlchemy let maxtwo's value replace the URL's without a word (a review: ?connect_timeout=30
    waited 5 s)."""
    with pytest.raises(ConfigurationError, match=f"sets {name}, which maxtwo sets itself.*remove .{name}="):
        db.parse_database_url(f"postgresql://u:s3cret@localhost/db?sslmode=prefer&{name}=1")


def test_the_urls_application_name_is_the_sessions(postgres_url):
    def application_name(url):
        engine = db.create_engine(Settings(database_url=url))
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT current_setting('application_name')")).scalar_one()
        finally:
            engine.dispose()

    named = sa.make_url(postgres_url).update_query_dict({"application_name": "maxtwo-a"})
    assert application_name(named.render_as_string(hide_password=False)) == "maxtwo-a"
    assert application_name(postgres_url) == "maxtwo"


def test_a_sqlite_path_in_the_home_directory_is_expanded(monkeypatch, tmp_path):
    # A shell leaves a ~ inside a word alone: it would otherwise be a directory named "~" here.
    monkeypatch.setenv("HOME", str(tmp_path))
    assert db.parse_database_url("sqlite:///~/data/maxtwo.db").database == str(tmp_path / "data" / "maxtwo.db")


def test_every_path_to_a_sqlite_database_finds_the_same_query_state_and_counters(tmp_path):
    # SQLite follows a symbolic link to the database; the query-state file must too, or the
    # link would see its own chain of queries and counters beside the target's users.
    (tmp_path / "real").mkdir()
    real = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'real' / 'maxtwo.db'}"))
    schema.ensure_schema(real)
    first = query_users(real)
    increment(real, "a", 1)
    (tmp_path / "link.db").symlink_to(tmp_path / "real" / "maxtwo.db")
    linked = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'link.db'}"))
    schema.ensure_schema(linked)
    assert query_users(linked).previous == first.recorded_at
    assert read_counter(linked, "a") == 1
    assert not (tmp_path / "link.db-query").exists()
    real.dispose()
    linked.dispose()


def test_redact_hides_the_password():
    url = db.parse_database_url("postgresql://user:s3cret@db.example:5432/maxtwo")
    assert db.redact(url) == "postgresql+psycopg://user:***@db.example:5432/maxtwo"


def test_default_database_url_follows_systemd_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'state' / 'maxtwo.db'}"
    # A unit with several StateDirectory= entries: systemd lists them all, ":" between.
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'state'}:{tmp_path / 'other'}")
    assert default_database_url() == f"sqlite:///{tmp_path / 'state' / 'maxtwo.db'}"
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_database_url() == f"sqlite:///{tmp_path / 'data' / 'maxtwo' / 'maxtwo.db'}"
    # Relative: invalid by the XDG Base Directory spec, so ignored (as unset or empty is).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for ignored in ("data", "", None):
        if ignored is None:
            monkeypatch.delenv("XDG_DATA_HOME")
        else:
            monkeypatch.setenv("XDG_DATA_HOME", ignored)
        assert default_database_url() == f"sqlite:///{tmp_path / 'home' / '.local' / 'share' / 'maxtwo' / 'maxtwo.db'}"
    # An empty or relative HOME is taken as unset: the user's home from the password database
    # (Python made the empty one "/", the file /.local/share/maxtwo/maxtwo.db).
    monkeypatch.chdir(tmp_path)
    user_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    for unusable in ("", "home"):
        monkeypatch.setenv("HOME", unusable)
        assert default_database_url() == f"sqlite:///{user_home / '.local' / 'share' / 'maxtwo' / 'maxtwo.db'}"


def test_no_home_directory_at_all_is_a_clear_error(monkeypatch, tmp_path):
    # A user id without an entry in the password database (a container's) and no usable HOME:
    # Python's own answer was "/" or the working directory.
    def no_entry(uid):
        raise KeyError(uid)

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for unusable in ("", "relative"):
        monkeypatch.setenv("HOME", unusable)
        with pytest.raises(ConfigurationError, match="no home directory for the default database"):
            default_database_url()
    from tests.test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("query"), "set XDG_DATA_HOME or give --database-url")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))  # which is all it needs then
    assert default_database_url() == f"sqlite:///{tmp_path / 'maxtwo' / 'maxtwo.db'}"


def test_the_default_file_is_the_one_named_whatever_its_directory_holds(monkeypatch, tmp_path):
    # "?", "#" and "%" would otherwise be read as the URL's query, fragment and escapes.
    state = tmp_path / "we?ird #dir %41 ü"
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    url = default_database_url()
    assert db.parse_database_url(url).database == str(state / "maxtwo.db")
    engine = db.create_engine(Settings(database_url=url))
    schema.ensure_schema(engine)
    engine.dispose()
    assert (state / "maxtwo.db").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [state.name]


# A name in Latin-1 (bytes that are not UTF-8), as Python reads it from the environment or argv.
NOT_UTF8 = os.fsdecode(b"caf\xe9")


def test_a_default_file_whose_path_is_not_utf8_is_refused_in_one_line(monkeypatch, tmp_path):
    # quote() refused the name (a traceback); SQLite names its files in UTF-8.
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / NOT_UTF8))
    with pytest.raises(ConfigurationError, match=r"default database, .*/caf\\xe9/maxtwo.db, has a path that is not UTF-8"):
        default_database_url()


@pytest.mark.parametrize("where", ["the path", "the working directory", "a link's target"])
def test_a_sqlite_file_whose_path_is_not_utf8_is_refused_and_nothing_made(monkeypatch, tmp_path, where):
    """Opened, such a file failed on its neighbour's ATTACH, after its directory was made: an
    "unexpected UnicodeEncodeError"."""
    (tmp_path / NOT_UTF8).mkdir()
    url = {
        "the path": f"sqlite:///{tmp_path / NOT_UTF8 / 'new' / 'maxtwo.db'}",
        "the working directory": "sqlite:///new/maxtwo.db",
        "a link's target": f"sqlite:///{tmp_path / 'link'}",
    }[where]
    monkeypatch.chdir(tmp_path / NOT_UTF8)
    (tmp_path / "link").symlink_to(tmp_path / NOT_UTF8 / "maxtwo.db")
    with pytest.raises(ConfigurationError, match=r"the SQLite database path .*/caf\\xe9/.* is not UTF-8"):
        db.create_engine(Settings(database_url=url))
    assert list((tmp_path / NOT_UTF8).iterdir()) == []


def test_percent_escapes_that_are_not_utf8_are_refused_not_replaced(tmp_path):
    """SQLAlchemy decodes %E9 as U+FFFD: another file, made silently."""
    with pytest.raises(ConfigurationError, match="escapes are not UTF-8"):
        db.parse_database_url(f"sqlite:///{tmp_path}/caf%E9/maxtwo.db")
    assert db.parse_database_url(f"sqlite:///{tmp_path}/caf%C3%A9/%EF%BF%BD.db").database == f"{tmp_path}/caf\u00e9/\ufffd.db"


def test_the_sqlite_file_and_its_directory_are_created_on_first_use(tmp_path):
    path = tmp_path / "new" / "dir" / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    schema.ensure_schema(engine)
    assert path.exists()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_postgres_users_table_is_built_for_hot_updates(postgres_engine):
    with postgres_engine.connect() as conn:
        options = conn.scalar(sa.text("SELECT reloptions FROM pg_class WHERE oid = 'users'::regclass"))
        indexed = conn.execute(sa.text(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
            "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = 'users'::regclass"
        )).scalars().all()
    assert "fillfactor=50" in options
    assert indexed == ["id"]


def test_a_complete_postgres_database_is_checked_without_waiting_for_the_users_lock(postgres_engine, postgres_url):
    """A seed holds the users table's exclusive lock until it commits. Every command checks the
    schema first, and that check waited for the lock (SQLAlchemy's reflection deparses column
    defaults): an increment, which never reads users, failed after the statement timeout."""
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=2.0))
    try:
        with postgres_engine.connect() as seeding:
            seeding.execute(sa.text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
            schema.ensure_schema(engine)  # a wait here: DatabaseBusyError after 2 s
            assert increment(engine, "during-a-seed", 1).total == 1
    finally:
        engine.dispose()


def test_postgres_transactions_are_read_committed_whatever_the_sessions_default(postgres_url):
    """maxtwo's statements rely on READ COMMITTED; under a server's (or role's, or database's)
    default of SERIALIZABLE, concurrent writers failed with serialization errors."""
    from maxtwo_cli.core.batch import HeldConnection

    strict = sa.make_url(postgres_url)
    strict = strict.update_query_dict({"options": strict.query["options"] + " -cdefault_transaction_isolation=serializable"})
    engine = db.create_engine(Settings(database_url=strict.render_as_string(hide_password=False)))
    held = HeldConnection(engine)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW transaction_isolation")).scalar() == "read committed"
        with held.transaction():
            shown = held.run(lambda cursor: cursor.execute("SHOW transaction_isolation").fetchone()[0])
        assert shown == "read committed"
    finally:
        held.release()
        engine.dispose()


def test_a_postgres_transaction_left_idle_past_the_statement_timeout_ends(postgres_url):
    """A client frozen inside a transaction (SIGSTOP, a paused VM) held its row locks, and with
    them every other daemon's writes to those rows, until it came back."""
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=0.5))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # the transaction begins
            time.sleep(1.5)
            with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout"):
                conn.execute(sa.text("SELECT 1"))
    finally:
        engine.dispose()


@pytest.mark.parametrize(("query", "environment"), [
    ({"options": "-cDateStyle=German"}, {}),  # as a server's, database's or role's default
    ({}, {"PGDATESTYLE": "SQL, DMY"}),  # libpq sends it after the startup options
    ({"client_encoding": "LATIN1"}, {}),
    ({}, {"PGCLIENTENCODING": "LATIN1"}),
], ids=["date-style-default", "PGDATESTYLE", "latin-1-in-the-url", "PGCLIENTENCODING"])
def test_postgres_session_defaults_that_maxtwo_cannot_work_with_are_overridden(postgres_url, monkeypatch, query,
                                                                               environment):
    """psycopg reads timestamps in the ISO DateStyle only (every query failed: "can't parse
    timestamptz"), and a key outside LATIN-1 cannot be sent in it (UnicodeEncodeError)."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    url = sa.make_url(postgres_url)
    if "options" in query:
        query = {"options": f"{url.query['options']} {query['options']}"}
    engine = db.create_engine(Settings(database_url=url.update_query_dict(query).render_as_string(hide_password=False)))
    try:
        schema.ensure_schema(engine)
        assert increment(engine, "snow\u2603man", 2).total == 2
        assert read_counter(engine, "snow\u2603man") == 2
        first = query_users(engine)
        assert query_users(engine).previous == first.recorded_at
    finally:
        engine.dispose()


def test_postgres_lock_and_transaction_timeouts_of_a_role_or_database_are_overridden(postgres_url):
    """A role's or database's default lock_timeout (here 1 ms) failed increments of a key that
    waited for another batch; its transaction_timeout (PostgreSQL 17 on; here 20 ms) failed
    every randomization longer than it, so the table was never randomized again. (A request's
    own transactions keep a transaction_timeout: one more bound on them, the role's choice.)"""
    from maxtwo_cli.core.batch import HeldConnection
    from maxtwo_cli.core.randomize import randomize_points
    from maxtwo_cli.core.seed import seed_users

    def with_options(options: str) -> sa.Engine:
        url = sa.make_url(postgres_url)
        url = url.update_query_dict({"options": f"{url.query['options']} {options}"})
        return db.create_engine(Settings(database_url=url.render_as_string(hide_password=False)))

    plain = db.create_engine(Settings(database_url=postgres_url))
    schema.ensure_schema(plain)
    waiting_ok, long_transactions_ok = with_options("-clock_timeout=1"), with_options("-ctransaction_timeout=20")
    held = HeldConnection(plain)
    try:
        seed_users(long_transactions_ok, 200_000)
        randomize_points(long_transactions_ok)  # both take longer than 20 ms
        with waiting_ok.connect() as conn:
            assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "0"
        with held.transaction():  # another daemon's batch, holding the counter's row for 0.3 s
            held.run(lambda cursor: cursor.execute("INSERT INTO counters VALUES ('held', 1)"))
            waiting = threading.Thread(target=lambda: increment(waiting_ok, "held", 1))
            waiting.start()
            time.sleep(0.3)
        waiting.join(10)
        assert read_counter(plain, "held") == 2
    finally:
        held.release()
        for engine in (waiting_ok, long_transactions_ok, plain):
            engine.dispose()


def test_a_postgres_database_not_in_utf8_is_refused(postgres_server):
    """In a SQL_ASCII database a character counts as its bytes: a key of 200 "é" broke the
    length check, and with it the whole batch of increments it came in (LATIN1: a key with
    a character it has no equivalent for)."""
    name = f"test_ascii_{uuid.uuid4().hex[:12]}"
    admin = libpq_url(postgres_server.url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LOCALE 'C' TEMPLATE template0")
    engine = db.create_engine(Settings(database_url=sa.make_url(postgres_server.url).set(database=name)
                                       .render_as_string(hide_password=False)))
    try:
        with pytest.raises(ConfigurationError, match=f"the database '{name}' is encoded in SQL_ASCII, .* needs UTF8"):
            schema.ensure_schema(engine)
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name}")
