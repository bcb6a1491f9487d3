"""Seeding: N users at 0 points in one transaction: on SQLite made by a set-based INSERT inside
the database, on PostgreSQL loaded by COPY with only the ids sent."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.db import (
    LONG_JOB_LOCK_TIMEOUT,
    database_errors,
    is_postgres,
    reading,
    set_job_timeouts,
    sqlite_main_files,
)
from maxtwo_cli.core.errors import AlreadySeededError, MaxtwoError, SchemaMismatchError
from maxtwo_cli.core.schema import (
    UtcTimestamp,
    draw_max_number,
    forget_the_last_query,
    randomizer_state,
    users,
)
from maxtwo_cli.core.settings import MAX_SEED_COUNT
from maxtwo_cli.core.writebehind import write_behind

log = logging.getLogger(__name__)

# How long the VACUUM after a seed waits for a lock on users held by another session before
# giving up (it is not worth a hang: the seed has committed, autovacuum catches up later).
VACUUM_LOCK_TIMEOUT = LONG_JOB_LOCK_TIMEOUT

# Rows per step (an INSERT statement on SQLite, a run of COPY writes on PostgreSQL): big enough
# that per-step overhead vanishes, small enough that a progress bar moves. All steps share one
# transaction, so the seed is still all-or-nothing.
SEED_BATCH_SIZE = 100_000

# PostgreSQL: the bulk-load recipe of its manual ("Populating a Database"), all inside the seed's
# transaction. COPY inserts a page of rows at a time (one WAL record per page, not per row); the
# table is emptied in this transaction, which lets FREEZE write the rows already frozen, so no
# later pass has to stamp them; and the primary key is built once, sorted, after the load rather
# than entry by entry. Only the ids travel (text, one batch at a time: no row ever exists in Python);
# the timestamps are column defaults for the length of the load: now(), the transaction's time.
# Measured with 1M users: 1.3-1.5 s, against 3.5-3.9 s for INSERT ... SELECT generate_series into
# the indexed table (bench/NOTES.md).
# NOTE: ACCESS EXCLUSIVE on users until the commit (TRUNCATE, ALTER TABLE), on every seed, the
# first of an empty table included: queries wait for it (past their statement timeout, a 503).
_POSTGRES_LOAD_START = [
    sa.text("TRUNCATE users"),
    # The name PostgreSQL gives an unnamed primary key, as maxtwo's schema creates it.
    sa.text("ALTER TABLE users DROP CONSTRAINT users_pkey"),
    sa.text("ALTER TABLE users ALTER COLUMN inserted_at SET DEFAULT now(), ALTER COLUMN updated_at SET DEFAULT now()"),
]
_POSTGRES_COPY = "COPY users (id) FROM STDIN WITH (FREEZE)"
# Ids per write: their text is built in memory first (about 7 bytes an id, 60 per id while
# joined), so writes stay small.
_COPY_IDS_PER_WRITE = 10_000
_POSTGRES_LOAD_END = [
    sa.text("ALTER TABLE users ALTER COLUMN inserted_at DROP DEFAULT, ALTER COLUMN updated_at DROP DEFAULT"),
    sa.text("ALTER TABLE users ADD CONSTRAINT users_pkey PRIMARY KEY (id)"),
]
# SQLite has no generate_series: a cross join of six ten-row tables makes the rows (LIMIT stops
# the join), and SQLite numbers them. Given no id, it appends each row as the table's largest
# rowid plus one (1 when empty), with no id to compute and no search of its B-tree for a row that
# already has it: 1M rows 0.29-0.33 s, against 0.85-1.2 s with the ids computed from the join and
# inserted, 0.63-0.75 s computed more cheaply (raw sqlite3, bench/NOTES.md).
_SQLITE_ROWS_PER_STATEMENT = 10**6  # what the join makes at most
_SQLITE_INSERT = sa.text(
    "WITH ten(n) AS (VALUES (0), (1), (2), (3), (4), (5), (6), (7), (8), (9)) "
    "INSERT INTO users (points, inserted_at, updated_at) "
    "SELECT 0, :now, :now FROM ten a, ten b, ten c, ten d, ten e, ten f LIMIT :rows"
).bindparams(sa.bindparam("now", type_=UtcTimestamp()))


@dataclasses.dataclass(frozen=True)
class SeedResult:
    rows: int
    seconds: float
    epoch: int
    # The users a reset replaced (0 for a first seed): their removal is in `seconds` too.
    replaced: int = 0
    # Why the planner's statistics could not be refreshed after the committed seed (one line,
    # no secrets), or None when they were (or need not be, as on SQLite).
    statistics_warning: str | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def seed_users(
    engine: Engine,
    count: int,
    *,
    reset: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> SeedResult:
    """Insert `count` users with 0 points, ids 1..count, in one transaction.

    Refuses (AlreadySeededError) when users exist, unless `reset`, which replaces them, forgets
    the last query time and draws a new max_number. Either way the epoch advances, so no cached
    answer survives. `on_progress(done, total)` is called after each batch.
    """
    if not 0 <= count <= MAX_SEED_COUNT:
        raise ValueError(f"count must be 0 to {MAX_SEED_COUNT}")
    started = time.perf_counter()
    with database_errors(engine), write_behind(sqlite_main_files(engine)), engine.begin() as conn:
        postgres = is_postgres(conn)
        if postgres:
            # Seeding may take longer than a request's statement timeout.
            set_job_timeouts(conn)
            # Serialise with randomizations and other seeds (SQLite's BEGIN IMMEDIATE already has).
            conn.execute(sa.select(randomizer_state.c.id).with_for_update())
        existing = conn.scalar(sa.select(sa.func.count()).select_from(users))
        if existing and not reset:
            raise AlreadySeededError(
                f"the users table already holds {existing:,} users; "
                "pass --reset to replace them"
            )
        if postgres:
            _load_users_postgres(conn, count, on_progress)
        else:
            if existing:
                conn.execute(users.delete())
            _insert_users_sqlite(conn, count, on_progress)
        state_update = randomizer_state.update().values(epoch=randomizer_state.c.epoch + 1)
        if reset:
            state_update = state_update.values(max_number=draw_max_number())
        epoch = conn.scalar(state_update.returning(randomizer_state.c.epoch))
        if reset:
            # NOTE: on PostgreSQL the load's TRUNCATE already holds every query off until the
            # commit (see _POSTGRES_LOAD_START): a reset is an outage.
            forget_the_last_query(conn, epoch)
    statistics_warning = None
    if is_postgres(engine):
        try:
            _vacuum_users(engine)
        except MaxtwoError as ex:
            # The users are committed: a seed that failed only here is no failed seed (and a
            # daemon seeding at start-up still starts). Autovacuum refreshes them later.
            statistics_warning = f"VACUUM (ANALYZE) users after the seed failed: {ex}"
            log.warning(
                "seeded %d users, but the planner's statistics were not refreshed (%s); "
                "autovacuum will, or run VACUUM (ANALYZE) users",
                count,
                statistics_warning,
            )
    return SeedResult(
        rows=count,
        seconds=time.perf_counter() - started,
        epoch=epoch,
        replaced=existing,
        statistics_warning=statistics_warning,
    )


def has_users(engine: Engine) -> bool:
    """Whether the users table holds at least one row."""
    with reading(engine) as conn:
        return bool(conn.scalar(sa.select(sa.exists(sa.select(users.c.id)))))


def _insert_users_sqlite(
    conn: sa.Connection, count: int, on_progress: Callable[[int, int], None] | None
) -> None:
    now = utcnow()
    step = min(SEED_BATCH_SIZE, _SQLITE_ROWS_PER_STATEMENT)
    for first in range(1, count + 1, step):
        last = min(first + step - 1, count)
        # SQLite numbers the rows only when id is the table's rowid: maxtwo's table, not every
        # table with the same columns (ensure_schema checks only those). There, the ids would be
        # missing (a NOT NULL id) or go on from the largest ever held (AUTOINCREMENT). The rows
        # themselves always satisfy maxtwo's own constraints.
        try:
            conn.execute(_SQLITE_INSERT, {"rows": last - first + 1, "now": now})
        except sa.exc.IntegrityError:
            raise _not_numbered_from_1() from None
        if on_progress is not None:
            on_progress(last, count)
    # count distinct ids, none below 1, in a table that was empty: 1..count if the largest is count.
    if count and conn.scalar(sa.select(sa.func.max(users.c.id))) != count:
        raise _not_numbered_from_1()


def _not_numbered_from_1() -> SchemaMismatchError:
    return SchemaMismatchError(
        "the users table is not maxtwo's: it refused new users or did not number them 1, 2, 3... "
        "itself (an id that is no INTEGER PRIMARY KEY, or AUTOINCREMENT); maxtwo will not seed "
        "it, point --database-url at another database"
    )


def _load_users_postgres(
    conn: sa.Connection, count: int, on_progress: Callable[[int, int], None] | None
) -> None:
    for statement in _POSTGRES_LOAD_START:
        conn.execute(statement)
    # COPY is the driver's own protocol; it runs on SQLAlchemy's connection, in its transaction.
    with conn.connection.driver_connection.cursor() as cursor, cursor.copy(_POSTGRES_COPY) as copy:
        for first in range(1, count + 1, SEED_BATCH_SIZE):
            last = min(first + SEED_BATCH_SIZE - 1, count)
            for start in range(first, last + 1, _COPY_IDS_PER_WRITE):
                ids = range(start, min(start + _COPY_IDS_PER_WRITE, last + 1))
                copy.write("\n".join(map(str, ids)) + "\n")
            if on_progress is not None:
                on_progress(last, count)
    for statement in _POSTGRES_LOAD_END:
        conn.execute(statement)
    # Explicit ids bypass the identity sequence; move it past them for any later insert.
    conn.execute(
        sa.text("SELECT setval(pg_get_serial_sequence('users', 'id'), :value, :called)"),
        {"value": max(count, 1), "called": count > 0},
    )


def _vacuum_users(engine: Engine) -> None:
    """The planner's statistics for the new rows, and the visibility map, changing no data.

    NOTE: before the load used COPY FREEZE, this VACUUM also stamped every freshly inserted row;
    without it the first randomization after a seed paid for that and ran about twice as slow
    (measured on 1M rows). Frozen rows need no stamping, and VACUUM skips the pages the
    visibility map already marks. VACUUM cannot run inside a transaction block, hence its own
    autocommit connection after the seed has committed. Its length grows with the table, so
    no statement bound; a lock held elsewhere still ends in an error, never a hang.
    """
    with database_errors(engine), engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        try:
            conn.exec_driver_sql("SET statement_timeout = 0")
            lock_ms = max(1, int(VACUUM_LOCK_TIMEOUT * 1000))
            conn.execute(sa.select(sa.func.set_config("lock_timeout", str(lock_ms), False)))
            conn.exec_driver_sql("VACUUM (ANALYZE) users")
            # The connection goes back to the pool: with the engine's bounds again.
            conn.exec_driver_sql("RESET statement_timeout")
            conn.exec_driver_sql("RESET lock_timeout")
        except BaseException:
            # Gone, or still without its bounds: either way never back into the pool.
            conn.invalidate()
            raise
