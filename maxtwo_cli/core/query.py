"""The query: at most 2 users above the hidden max_number, and the previous query's time.

Each call atomically records now as the last query time and gets the one recorded before it,
so concurrent callers (threads, processes, daemons) form a chain: each sees its predecessor's
time and exactly one caller, the first ever, sees None.

The users only change when the epoch does, so an AnswerCache keeps the answer per epoch. The
epoch is read from the database on every call, so a randomization by any process invalidates
every cache at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import sqlite3
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import pysqlite as sqlite_pysqlite
from sqlalchemy.engine import Engine

from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.clock import api_timestamp, as_utc, iso_text, utcnow
from maxtwo_cli.core.schema import MAX_POINTS, from_microseconds, to_microseconds

if TYPE_CHECKING:
    import psycopg  # NOTE: for annotations only: a query on SQLite never imports psycopg

ANSWER_SIZE = 2
_TICK = dt.timedelta(microseconds=1)

# PostgreSQL: one statement, one round trip, one snapshot, one transaction.
# - `previous` locks the query-state row (FOR UPDATE re-reads the newest committed version), so
#   concurrent queries queue on it and each one gets its predecessor's time;
# - the recorded time is the database clock, nudged past the previous one so that the chain is
#   strictly increasing even if the clock steps back (after a `seed --reset`, past the time
#   recorded before it, which the reset keeps in previous_query_at: schema.forget_the_last_query);
# - `state` and the users come from the statement's snapshot: they belong to one epoch, and a
#   running randomization (which locks other rows) never blocks this;
# - the users are only read when the caller has no cached answer for this epoch, and never when
#   max_number is 100 (the CHECK constraint guarantees nobody exceeds it).
_POSTGRES_QUERY = sa.text(
    """
    WITH previous AS (
        SELECT last_query_at, previous_query_at FROM query_state WHERE id = 1 FOR UPDATE
    ), recorded AS (
        UPDATE query_state
        SET last_query_at = greatest(
            clock_timestamp(),
            coalesce(previous.last_query_at, previous.previous_query_at) + interval '1 microsecond')
            + (CAST(:count AS integer) - 1) * interval '1 microsecond',
            previous_query_at = previous.last_query_at
        FROM previous
        WHERE query_state.id = 1
        RETURNING previous.last_query_at AS previous_at, query_state.last_query_at AS recorded_at
    ), state AS (
        SELECT epoch, max_number FROM randomizer_state WHERE id = 1
    )
    SELECT recorded.previous_at, recorded.recorded_at, state.epoch, top.id, top.points
    FROM recorded CROSS JOIN state
    LEFT JOIN LATERAL (
        SELECT users.id, users.points FROM users
        WHERE users.points > state.max_number
          AND state.max_number < :max_points
          AND state.epoch IS DISTINCT FROM CAST(:cached_epoch AS bigint)
        ORDER BY users.id
        LIMIT :answer_size
    ) AS top ON true
    ORDER BY top.id
    """
)


@dataclasses.dataclass(frozen=True)
class User:
    id: int
    points: int


@dataclasses.dataclass(frozen=True)
class QueryResult:
    users: tuple[User, ...]
    # The time recorded by the query before this one; None for the first query ever.
    previous: dt.datetime | None
    # The time this query recorded (what the next query will get as `previous`).
    recorded_at: dt.datetime
    epoch: int
    # The two times as iso_text() writes them (made from the times if not given).
    # NOTE: given by run_query_batch(), which formats each time of a batch once: a query's
    # recorded time is the next one's previous time, and GET / shows both (headers and body);
    # three isoformat() calls per query were a tenth of GET /'s own work (bench/NOTES.md).
    previous_text: str | None = dataclasses.field(default=None, compare=False)
    recorded_text: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.recorded_text:
            object.__setattr__(self, "recorded_text", iso_text(self.recorded_at))
        if self.previous_text is None and self.previous is not None:
            object.__setattr__(self, "previous_text", iso_text(self.previous))

    def api_body(self) -> dict[str, Any]:
        """The body of GET / and of `maxtwo query --json`."""
        return {
            "users": _user_dicts(self.users),
            "timestamp": api_timestamp(self.previous_text),
        }

    def api_json(self) -> str:
        """api_body() as JSON text, exactly as json.dumps() writes it."""
        timestamp = api_timestamp(self.previous_text)
        # The timestamp's characters need no escaping.
        timestamp_json = "null" if timestamp is None else f'"{timestamp}"'
        return f'{{"users": {_users_json(self.users)}, "timestamp": {timestamp_json}}}'


# The users of the last answer rendered, and their JSON. NOTE: every answer of an epoch shares
# one users tuple (the AnswerCache's), so GET / renders it once per epoch, not once per request;
# holding the tuple here also keeps its identity from being reused by another.
_rendered_users: tuple[tuple[User, ...], str] = ((), "[]")


def _user_dicts(users: tuple[User, ...]) -> list[dict[str, int]]:
    return [{"id": user.id, "points": user.points} for user in users]


def _users_json(users: tuple[User, ...]) -> str:
    global _rendered_users
    rendered, text = _rendered_users
    if rendered is not users:
        text = json.dumps(_user_dicts(users))
        _rendered_users = (users, text)
    return text


class AnswerCache:
    """The last answer and the epoch it belongs to, shared by the threads of one process.

    NOTE: the whole (epoch, users) pair is replaced by one assignment, which is atomic in
    CPython, so readers never see an epoch with another epoch's users and no lock is needed.
    """

    def __init__(self) -> None:
        self._entry: tuple[int, tuple[User, ...]] | None = None

    def get(self) -> tuple[int, tuple[User, ...]] | None:
        return self._entry

    def put(self, epoch: int, answer: tuple[User, ...]) -> None:
        self._entry = (epoch, answer)


def query_users(engine: Engine, cache: AnswerCache | None = None) -> QueryResult:
    """Record now as the last query time; return up to 2 users above max_number and the previous time."""
    return query_users_batch(engine, 1, cache)[0]


def query_users_batch(engine: Engine, count: int, cache: AnswerCache | None = None) -> list[QueryResult]:
    """`count` consecutive queries in one transaction: one commit (one disk flush) for all.

    The results form a chain exactly as `count` separate calls would: the first gets the time
    recorded before the batch, each later one the time recorded by the one before it (times
    one microsecond apart), and all share one snapshot, so they carry the same users.
    """
    held = HeldConnection(engine)
    try:
        return run_query_batch(held, count, cache)
    finally:
        held.release()


def run_query_batch(held: HeldConnection, count: int, cache: AnswerCache | None = None) -> list[QueryResult]:
    """query_users_batch() on a held connection: for a caller that runs batch after batch.

    One statement: on its own it is its own transaction (on SQLite sent again if its snapshot
    proved old: _query_sqlite); inside held.transaction() it commits with the rest (on SQLite
    without that retry's fresh snapshot: a transaction keeps its first; no caller does so)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    cached = cache.get() if cache is not None else None
    if held.postgres:
        previous, last, epoch, answer = held.run(lambda cursor: _query_postgres(cursor, cached, count))
    else:
        previous, last, epoch, answer = held.run(lambda cursor: _query_sqlite(cursor, cached, count))
    if cache is not None and (cached is None or cached[0] != epoch):
        cache.put(epoch, answer)
    recorded = [last - (count - 1 - index) * _TICK for index in range(count)]
    texts = [iso_text(moment) for moment in recorded]
    previous_text = None if previous is None else iso_text(previous)
    return [
        QueryResult(
            users=answer,
            previous=previous if index == 0 else recorded[index - 1],
            recorded_at=recorded[index],
            epoch=epoch,
            previous_text=previous_text if index == 0 else texts[index - 1],
            recorded_text=texts[index],
        )
        for index in range(count)
    ]


class _DriverStatement:
    """A Core statement rendered once for the driver: its SQL text and parameter layout."""

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._defaults = dict(compiled.params)
        self._order = compiled.positiontup

    def parameters(self, **values: Any) -> tuple[Any, ...] | dict[str, Any]:
        if not values.keys() <= self._defaults.keys():
            raise TypeError(f"unknown parameters {sorted(values.keys() - self._defaults.keys())}")
        merged = {**self._defaults, **values}
        if self._order is None:
            return merged
        return tuple(merged[name] for name in self._order)


# (time recorded before, last time recorded now, epoch, users)
_Outcome = tuple[dt.datetime | None, dt.datetime, int, tuple[User, ...]]


def _query_postgres(
    cursor: psycopg.Cursor, cached: tuple[int, tuple[User, ...]] | None, count: int
) -> _Outcome:
    statement = _postgres_statement()
    rows = cursor.execute(
        statement.sql,
        statement.parameters(
            count=count,
            cached_epoch=cached[0] if cached else None,
            max_points=MAX_POINTS,
            answer_size=ANSWER_SIZE,
        ),
    ).fetchall()
    previous_at, recorded_at, epoch = rows[0][:3]
    if cached is not None and cached[0] == epoch:
        answer = cached[1]
    else:
        answer = tuple(User(id=row[3], points=row[4]) for row in rows if row[3] is not None)
    previous = None if previous_at is None else as_utc(previous_at)
    return previous, as_utc(recorded_at), epoch, answer


@functools.cache
def _postgres_statement() -> _DriverStatement:
    # NOTE: the PostgreSQL dialect is imported on first use: it takes 60 ms, which a command
    # on SQLite need not pay.
    from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg

    return _DriverStatement(_POSTGRES_QUERY, postgresql_psycopg.dialect())


# SQLite: the same in one statement, its own transaction in autocommit. It writes only the
# query-state file (core/db.py: SQLITE_QUERY_SCHEMA; SQLite finds query_state there), whose
# write lock serialises queries, and reads the users and their state from the main file's last
# committed snapshot (WAL), so a running randomization, holding the main file's lock, does not
# make it wait. Users and max_number come from that one snapshot: one epoch.
# - SET sees the row as it was, so previous_query_at keeps the time being replaced and
#   RETURNING (which shows only new values) can return it;
# - the recorded time is `now` from Python (taken as the statement is sent, before any wait for
#   the query state's lock), nudged past the previous one (or, after a reset, past the time
#   recorded before it, as on PostgreSQL), in microseconds;
# - the users are only read when the caller has no cached answer for this epoch, and never when
#   max_number is 100; a subquery of RETURNING must be one value, hence "id points,id points";
# - the snapshot is taken as the statement starts, before it may wait for the query state's
#   lock: if whoever held it saw newer users (a query after a randomization, a `seed --reset`),
#   this one would answer older users after it (after a reset, users no longer there, with no
#   previous time: a review). users_epoch keeps the epoch the last holder saw; a statement whose
#   snapshot is older matches no row, writes nothing and is sent again (_query_sqlite).
# NOTE: one statement instead of BEGIN IMMEDIATE, three statements and COMMIT: every one of them
# releases the interpreter lock while SQLite works and waits to get it back from the request
# threads; GET / went from 504 to 420 us of CPU per request (bench/NOTES.md).
_SQLITE_QUERY = sa.text(
    """
    UPDATE query_state
    SET previous_query_at = last_query_at,
        last_query_at = max(:now, coalesce(coalesce(last_query_at, previous_query_at) + 1, :now)) + :count - 1,
        users_epoch = (SELECT epoch FROM randomizer_state WHERE id = 1)
    WHERE id = 1
      AND (:any_snapshot OR users_epoch IS NULL OR users_epoch <= (SELECT epoch FROM randomizer_state WHERE id = 1))
    RETURNING previous_query_at, last_query_at, users_epoch,
        (SELECT CASE WHEN epoch IS :cached_epoch OR max_number >= :max_points THEN NULL ELSE (
                SELECT group_concat(id || ' ' || points) FROM (
                    SELECT id, points FROM users
                    WHERE points > randomizer_state.max_number
                    ORDER BY id
                    LIMIT :answer_size))
            END
         FROM randomizer_state WHERE id = 1)
    """
)
_SQLITE_STATEMENT = _DriverStatement(_SQLITE_QUERY, sqlite_pysqlite.dialect())
# A second attempt starts after the newer users committed (SQLite commits the main file before
# the query-state file), so it sees them, unless they changed once more while it waited too
# and another query got the lock first; the third then answers from the users it sees, as it
# must after an older copy of the main file was restored. Each attempt is bounded as any
# statement is; the later ones come only after the users changed during a wait.
_SQLITE_ATTEMPTS = 3


def _query_sqlite(
    cursor: sqlite3.Cursor, cached: tuple[int, tuple[User, ...]] | None, count: int
) -> _Outcome:
    # NOTE: fetchall(): the statement, and with it its transaction, ends only once stepped past
    # its last row; merely executed, it holds the write lock and has committed nothing.
    for attempt in range(_SQLITE_ATTEMPTS):
        rows = cursor.execute(
            _SQLITE_STATEMENT.sql,
            _SQLITE_STATEMENT.parameters(
                now=to_microseconds(utcnow()),
                count=count,
                cached_epoch=cached[0] if cached else None,
                max_points=MAX_POINTS,
                answer_size=ANSWER_SIZE,
                # The last attempt takes the users as they are (_SQLITE_ATTEMPTS).
                any_snapshot=attempt == _SQLITE_ATTEMPTS - 1,
            ),
        ).fetchall()
        if rows:
            break
    [(previous_us, last_us, epoch, found)] = rows
    if cached is not None and cached[0] == epoch:
        answer = cached[1]
    else:
        pairs = sorted(tuple(map(int, user.split())) for user in found.split(",")) if found else []
        answer = tuple(User(id=user_id, points=points) for user_id, points in pairs)
    previous = None if previous_us is None else from_microseconds(previous_us)
    return previous, from_microseconds(last_us), epoch, answer
