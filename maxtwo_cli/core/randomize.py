"""Randomization: every user's points re-rolled and a new max_number, in one transaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from maxtwo_cli.core.clock import as_utc, utcnow
from maxtwo_cli.core.db import (
    ONE_FILE_OPTION,
    database_errors,
    is_postgres,
    set_job_timeouts,
    sqlite_main_files,
)
from maxtwo_cli.core.errors import RandomizationInProgressError
from maxtwo_cli.core.schema import MAX_POINTS, draw_max_number, randomizer_state, users
from maxtwo_cli.core.writebehind import write_behind

# The scheduled randomization's advisory lock: an arbitrary constant ("max2") in the high 32 bits,
# the OID of this schema's randomizer_state table in the low ones. NOTE: advisory locks are
# the database's, not a schema's: with one key for all, a deployment in another schema of the
# same database (search_path in its URL) waited for the other's runs each slot, and stood back
# when one outlasted the half of the slot.
RANDOMIZE_LOCK_KEY = sa.literal(0x6D617832 << 32, sa.BigInteger) + sa.func.coalesce(
    sa.cast(sa.func.to_regclass(randomizer_state.name), sa.BigInteger), 0)

# One statement per table, evaluated inside the database; every value 0..100 equally likely.
# PostgreSQL: random() is uniform in [0, 1), so floor(random() * 101) covers 0..100.
_POSTGRES_POINTS = sa.cast(sa.func.floor(sa.func.random() * (MAX_POINTS + 1)), sa.SmallInteger)
# SQLite: random() is a uniform signed 64-bit integer; masked to its 63 low bits it is uniform
# in 0..2**63-1, and modulo 101 that is uniform in 0..100 up to a bias below 1e-17. (abs() would
# overflow on the one value -2**63.)
_SQLITE_POINTS = sa.func.random().op("&")(2**63 - 1) % (MAX_POINTS + 1)


@dataclasses.dataclass(frozen=True)
class RandomizeResult:
    rows: int
    seconds: float
    epoch: int
    randomized_at: dt.datetime
    # Seconds a scheduled run waited, before its own, for another process's that rolled back.
    waited: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def randomize_points(engine: Engine) -> RandomizeResult:
    """Give every user new uniform random points 0..100 and draw a new max_number, atomically.

    Concurrent callers are serialised by the lock on the state row; each of them performs its
    own run. On PostgreSQL its statements have no time bound (db.set_job_timeouts).
    """
    started = time.perf_counter()
    with database_errors(engine), write_behind(sqlite_main_files(engine)), _main_file_only(engine).begin() as conn:
        outcome = randomize_in_transaction(conn)
    assert outcome is not None  # unconditional: it always runs
    return _timed(outcome, started)


def randomize_if_due(
    engine: Engine, *, due_at: dt.datetime, interval: float, stopping: Callable[[], bool] = lambda: False
) -> RandomizeResult | None:
    """The scheduled randomization: run it unless another process already did for this slot.

    Several daemons sharing a database all call this at the same wall-clock boundaries; exactly
    one of them randomizes. On PostgreSQL a transaction-scoped advisory lock (released at commit
    or rollback, so it cannot leak through a connection pooler) holds the others until the run
    has ended (_wait_for_the_slot_lock); afterwards the slot recorded with the last scheduled
    run (`scheduled_for`) turns them away. Slots are the daemons' own boundaries, so neither
    the database's clock nor a manual `maxtwo randomize` earlier in the interval stands in for
    a scheduled run; the daemons' clocks need only agree within half an interval. Returns None
    when it did not run. `stopping()`: true once the process is to stop; a wait for another
    process's run ends then (RandomizationInProgressError).
    """
    started = time.perf_counter()
    with database_errors(engine), write_behind(sqlite_main_files(engine)), _main_file_only(engine).begin() as conn:
        at, waited = None, 0.0
        if is_postgres(conn):
            # The slot recorded last, read with the lock's try in one statement (one snapshot):
            # read after it, a run that committed in between would seem to have rolled back.
            locked, seen = conn.execute(sa.select(sa.func.pg_try_advisory_xact_lock(RANDOMIZE_LOCK_KEY),
                                                  randomizer_state.c.scheduled_for)).one()
            if not locked:
                if not _wait_for_the_slot_lock(conn, due_at, interval, stopping):
                    return None
                if conn.scalar(sa.select(randomizer_state.c.scheduled_for)) != seen:
                    return None  # that run committed
                # That run rolled back: this one starts now, its duration and the time it
                # records (now() is the transaction's start, before the wait).
                waited, started = time.perf_counter() - started, time.perf_counter()
                at = conn.scalar(sa.select(sa.func.clock_timestamp()))
        # NOTE: no time bound on its statements, as for `maxtwo randomize`: a run longer than
        # the interval makes the next slot skip (the scheduler), while one cut off at the
        # interval's end was rolled back every time, and the table never randomized again.
        outcome = randomize_in_transaction(conn, slot=(due_at, interval), at=at)
    return None if outcome is None else dataclasses.replace(_timed(outcome, started), waited=waited)


def _wait_for_the_slot_lock(
    conn: sa.Connection, due_at: dt.datetime, interval: float, stopping: Callable[[], bool]
) -> bool:
    """Another process's scheduled run holds the lock: wait for its end, up to the half of the
    slot. True once the lock is this process's (the caller tells from `scheduled_for` whether
    that run committed: this slot's, or one late for the slot before, which this slot then
    skips as the overlap it is, as on one daemon; or rolled back, its daemon stopped mid-run:
    the slot is still due). RandomizationInProgressError if that run still holds it at the half
    of the slot, or once stopping() (the slot is left to the others).

    NOTE: the others used to stand back at once: a run that then rolled back left its slot
    without a run on every daemon (an audit). The wait is a lock wait bounded by lock_timeout,
    a second at a time, so that a stop request ends it within a second."""
    set_job_timeouts(conn)  # no statement or transaction timeout meanwhile (a role's default)
    until = due_at + dt.timedelta(seconds=interval / 2)
    while not stopping() and (left := (until - utcnow()).total_seconds()) > 0:
        conn.execute(sa.select(sa.func.set_config("lock_timeout", str(max(1, int(min(left, 1.0) * 1000))), True)))
        try:
            with conn.begin_nested():  # a lock wait that times out undoes this much only
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        except sa.exc.DBAPIError as ex:
            if getattr(ex.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
        else:
            if not stopping():
                return True
            break
    if stopping():
        raise RandomizationInProgressError("this process stops: no wait for another's run", stopping=True)
    raise RandomizationInProgressError("another process's randomization still holds the lock at the half of the slot")


# SQLSTATE lock_not_available: the lock_timeout ran out.
_LOCK_NOT_AVAILABLE = "55P03"


def _main_file_only(engine: Engine) -> Engine:
    """The engine for a randomization's transaction: on SQLite it locks the main file alone,
    so queries and increments (which write only the query-state file) go on meanwhile (core/db.py)."""
    return engine.execution_options(**{ONE_FILE_OPTION: True})


def _timed(outcome: tuple[int, dt.datetime, int], started: float) -> RandomizeResult:
    """The result of a committed run that began at perf_counter() `started`."""
    epoch, randomized_at, rows = outcome
    return RandomizeResult(
        rows=rows,
        seconds=time.perf_counter() - started,
        epoch=epoch,
        randomized_at=as_utc(randomized_at),
    )


def _an_interval_ahead(conn: sa.Connection, interval: float) -> sa.ColumnElement[Any] | dt.datetime:
    """This process's clock plus `interval`, read once the run holds the slot's lock.

    NOTE: on SQLite the statement may first wait for the write lock (up to the busy timeout), and
    a time taken before that made a slot that another daemon recorded meanwhile look recorded
    by a clock that was ahead: a late run went ahead, randomized the slot a second time and
    moved scheduled_for back (a review). SQLite's clock is this host's, read as the statement
    runs. On PostgreSQL the scheduled run holds its advisory lock already: now is fresh."""
    if is_postgres(conn):
        return utcnow() + dt.timedelta(seconds=interval)
    return sa.literal_column(f"{_SQLITE_NOW} + {round(interval * 1_000_000)}")


# SQLite's clock (the host's), as maxtwo stores times there: integer microseconds since 1970,
# in whole milliseconds (julianday's own precision; unrounded, floating-point error left some
# 20 us off). Read by the statement as it runs: after its wait for the write lock.
_SQLITE_NOW = "CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER) * 1000"


def randomize_in_transaction(
    conn: sa.Connection, *, slot: tuple[dt.datetime, float] | None = None, at: dt.datetime | None = None
) -> tuple[int, dt.datetime, int] | None:
    """The randomization itself, inside the caller's transaction: (epoch, randomized_at, rows).

    `at`: the time to record on PostgreSQL instead of now(), the transaction's start.

    With `slot` (due_at, interval): the scheduled run for the boundary due_at, recorded as
    such; None, changing nothing, if one was recorded for it already or for a later one (a
    run that comes late, its daemon paused, finds the slots after it done). Boundaries are
    `interval` apart: half of one tells the same boundary from the previous. But a slot
    recorded more than an interval ahead of this process's clock was recorded by a clock that
    was ahead (set back since, or another daemon's, out of the half-interval agreement): it
    stood in for every slot until that time came, and no daemon randomized meanwhile (a clock
    set a year ahead for a few seconds stopped the randomizations for a year).
    NOTE: the check is part of the first statement, a write: on SQLite a transaction that read
    first would fail with SQLITE_BUSY_SNAPSHOT, not wait, if another writer committed before
    its first write (it begins DEFERRED, see _main_file_only)."""
    if is_postgres(conn):
        set_job_timeouts(conn)
        now: sa.ColumnElement[dt.datetime] | dt.datetime = sa.func.now() if at is None else at
        points = _POSTGRES_POINTS
    else:
        # (Read after the wait for the write lock, as _an_interval_ahead: a time read before
        # could record a randomization as older than one that committed ahead of it.)
        now = sa.literal_column(_SQLITE_NOW)
        points = _SQLITE_POINTS
    # The state row first: its lock serialises randomizations, and a query that reads the new
    # epoch is guaranteed to read the new points too (same transaction, same snapshot).
    new_state = randomizer_state.update().values(
        max_number=draw_max_number(),
        epoch=randomizer_state.c.epoch + 1,
        randomized_at=now,
    )
    if slot is not None:
        due_at, interval = slot
        last = randomizer_state.c.scheduled_for
        new_state = new_state.values(scheduled_for=due_at).where(
            sa.or_(last.is_(None), last < due_at - dt.timedelta(seconds=interval / 2), last > _an_interval_ahead(conn, interval))
        )
    state = conn.execute(
        new_state.returning(randomizer_state.c.epoch, randomizer_state.c.randomized_at)
    ).one_or_none()
    if state is None:
        return None
    epoch, randomized_at = state
    # The time the state row got (on SQLite another read of the clock would differ).
    rows = conn.execute(users.update().values(points=points, updated_at=randomized_at)).rowcount
    return epoch, randomized_at, rows
