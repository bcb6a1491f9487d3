"""Counters: durable increments of 64-bit totals kept under string keys.

The database adds: no process ever holds a total, so any number of daemons on one database
keep exact totals. Increments are applied in batches (daemon/batcher.py gathers them; the CLI
applies one): a batch without Idempotency-Keys is one statement, plus a transaction of its own
for what that statement leaves out (add_increments); otherwise one transaction. Rows are taken
in one order everywhere: Idempotency-Keys first, then counters, each sorted by key, so that
concurrent batches of several daemons lock rows in the same order and never deadlock. (The one
exception: a batch that reuses a refused increment's Idempotency-Key for another body applies
that one after the rest, apply_increments. Against a batch taking the same rows the other way,
PostgreSQL ends the deadlock after deadlock_timeout and one batch answers 503: a retry is safe.)

A total never leaves the signed 64-bit range: an increment that would take it out fails alone
(CounterOverflowError), and every other increment of its batch applies. Concurrent increments
may be applied in any order, so a batch applies all of a key's increments at once whenever
their sum keeps the total in range (some order of them then does at every step); only for a
key where it does not are they applied one by one, in arrival order, and the ones that would
overflow refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.db import ONE_FILE_OPTION, database_errors, is_postgres, reading
from maxtwo_cli.core.errors import MaxtwoError
from maxtwo_cli.core.schema import counters, idempotency_keys, to_microseconds
from maxtwo_cli.core.settings import is_utf8

log = logging.getLogger(__name__)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_KEY_LENGTH = 255
MAX_IDEMPOTENCY_KEY_LENGTH = 255
IDEMPOTENCY_TTL = dt.timedelta(hours=24)


class InvalidIncrementError(MaxtwoError):
    """A key or value an increment cannot have (HTTP 422, CLI usage error)."""


class CounterOverflowError(MaxtwoError):
    """The increment would take the counter's total out of the signed 64-bit range."""


class IdempotencyKeyReusedError(MaxtwoError):
    """An Idempotency-Key already used, within 24 hours, for a different increment."""


def check_key(key: object) -> str:
    """The key, if a counter can have it; InvalidIncrementError if not."""
    if not isinstance(key, str):
        raise InvalidIncrementError("key must be a string")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidIncrementError(f"key must be 1 to {MAX_KEY_LENGTH} characters long")
    if "\x00" in key:
        raise InvalidIncrementError("key must not contain U+0000")
    # NOTE: a lone surrogate ("\udc80", which JSON's \u escapes can make) cannot be stored as
    # UTF-8 by either database.
    if not is_utf8(key):
        raise InvalidIncrementError("key must be valid Unicode (no unpaired surrogates)")
    return key


def check_value(value: object) -> int:
    """The value, if it is an integer in the signed 64-bit range; InvalidIncrementError if not."""
    # NOTE: bool is an int in Python, and JSON's true must not count as 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidIncrementError("value must be an integer")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidIncrementError(f"value must be between {INT64_MIN} and {INT64_MAX}")
    return value


def check_idempotency_key(key: str) -> str:
    """An Idempotency-Key: 1 to 255 printable ASCII characters, no comma.

    NOTE: HTTP joins repeated header fields with ", " (RFC 9110 section 5.3), so a request that
    carries two Idempotency-Keys arrives with one holding a comma; taken as one key, a retry
    carrying either of them alone would be applied again."""
    if (not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all(" " <= char <= "~" for char in key)
            or "," in key):
        raise InvalidIncrementError(
            f"Idempotency-Key must be one header of 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters, "
            "no comma"
        )
    return key


@dataclasses.dataclass(frozen=True)
class Increment:
    key: str
    value: int
    idempotency_key: str | None = None

    @property
    def fingerprint(self) -> str:
        """What a retry under the same Idempotency-Key must ask for again."""
        return hashlib.sha256(json.dumps([self.key, self.value]).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Applied:
    """An increment's outcome: committed with its batch (or earlier, for a replay)."""

    key: str
    # The counter's total once the batch applied; None for a replay (nothing applied now).
    total: int | None
    replayed: bool = False


def increment(engine: Engine, key: str, value: int, idempotency_key: str | None = None) -> Applied:
    """Add `value` to the counter `key` in a transaction of its own; its new total."""
    item = Increment(check_key(key), check_value(value), idempotency_key)
    held = HeldConnection(engine)
    try:
        [outcome] = add_increments(held, [item])
    finally:
        held.release()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def add_increments(held: HeldConnection, items: Sequence[Increment], now: dt.datetime | None = None) -> list[Any]:
    """apply_increments(), committed: in the caller's transaction if one is open, otherwise in
    as few round trips as it can.

    Outside a transaction, a batch without Idempotency-Keys is added in one statement, which in
    autocommit is its own transaction: no BEGIN and COMMIT round trips (bench/NOTES.md). Any
    increment that statement leaves out (its counter's total would leave the range) is then
    applied by apply_increments() in a transaction of its own, in arrival order. A batch with
    Idempotency-Keys is one transaction: a key is recorded with its increment or not at all."""
    if held.in_transaction:
        return apply_increments(held, items, now)
    if any(item.idempotency_key is not None for item in items):
        with held.transaction():
            return apply_increments(held, items, now)
    sums: dict[str, int] = {}
    for item in items:
        sums[item.key] = sums.get(item.key, 0) + item.value
    totals = _add_sums_in_range(held, sums)
    outcomes: list[Any] = [Applied(item.key, totals[item.key]) if item.key in totals else None for item in items]
    left_out = [index for index, outcome in enumerate(outcomes) if outcome is None]
    if left_out:
        try:
            with held.transaction():
                rest = apply_increments(held, [items[index] for index in left_out], now)
        except MaxtwoError as ex:
            # The statement's increments are committed: only the left-out ones fail (were it
            # raised, their callers would be told that committed increments had failed).
            rest = [ex] * len(left_out)
        for index, outcome in zip(left_out, rest, strict=True):
            outcomes[index] = outcome
    return outcomes


def apply_increments(held: HeldConnection, items: Sequence[Increment], now: dt.datetime | None = None) -> list[Any]:
    """Apply a batch of increments inside the caller's transaction (held.transaction()).

    The outcome of each, in order: Applied, or the error it alone fails with
    (CounterOverflowError, IdempotencyKeyReusedError). A database error raises."""
    now = now or utcnow()
    outcomes: list[Any] = [None] * len(items)
    first_uses: dict[str | None, int] = {}
    to_apply = _settle_idempotency_keys(held, items, now, outcomes, first_uses)
    claimed_by = {index: items[index].idempotency_key for index in to_apply if items[index].idempotency_key}
    totals, refused = _add(held, [(index, items[index]) for index in to_apply])
    for index in to_apply:
        if index in refused:
            outcomes[index] = CounterOverflowError(
                f"adding {items[index].value} to counter {items[index].key!r} would take it out of the "
                f"signed 64-bit range ({INT64_MIN}..{INT64_MAX}); it keeps its value"
            )
        else:
            outcomes[index] = Applied(items[index].key, totals[items[index].key])
    # A refused increment leaves no trace, its Idempotency-Key included: a retry is refused again.
    unclaim = sorted({claimed_by[index] for index in refused if index in claimed_by})
    if unclaim:
        held.run(lambda cursor: _execute_each(cursor, held, "DELETE FROM idempotency_keys WHERE key = ?",
                                              [(key,) for key in unclaim]))
        # The batch's later uses of those keys were judged against the refused one. A retry of
        # it (the same body) is refused with it; another body, sent alone, would have been a
        # first use: applied now, after the rest (a review: it got 422 or 409 depending on how
        # the requests fell into batches). One pass per body: n retries never take n passes.
        later = []
        for index, item in enumerate(items):
            first = first_uses.get(item.idempotency_key)
            if item.idempotency_key not in unclaim or first == index:
                continue
            if item.fingerprint == items[first].fingerprint:
                outcomes[index] = outcomes[first]
            else:
                later.append(index)
        if later:
            for index, outcome in zip(later, apply_increments(held, [items[i] for i in later], now), strict=True):
                outcomes[index] = outcome
    return outcomes


def _settle_idempotency_keys(
    held: HeldConnection, items: Sequence[Increment], now: dt.datetime, outcomes: list[Any], first_use: dict
) -> list[int]:
    """Claim the batch's Idempotency-Keys; fill in the outcomes of replays and conflicts; return
    the indexes of the increments to apply. `first_use`: filled with each key's first increment."""
    for index, item in enumerate(items):
        if item.idempotency_key is not None:
            first_use.setdefault(item.idempotency_key, index)
    if not first_use:
        return list(range(len(items)))
    keys = sorted(first_use)
    # NOTE: a claim waits for a concurrent transaction inserting the same key (another daemon's
    # batch) and then finds it taken: one of the two applies the increment, never both. A key
    # taken but expired (not deleted yet) is claimed anew. A key taken and live is left as it is
    # but locked by the claim all the same, so the daemons' cleanup skips it until its
    # fingerprint is read (deleted in between, a new use would look like a replay, never applied).
    fingerprints = [items[first_use[key]].fingerprint for key in keys]
    claimed = set(held.run(lambda cursor: _claim(cursor, held, keys, fingerprints, now, now - IDEMPOTENCY_TTL)))
    taken = [key for key in keys if key not in claimed]
    recorded = dict(held.run(lambda cursor: _recorded(cursor, held, taken))) if taken else {}
    to_apply = []
    for index, item in enumerate(items):
        key = item.idempotency_key
        if key is None or (key in claimed and first_use[key] == index):
            to_apply.append(index)
            continue
        # Used before: earlier in this very batch, or by an earlier request.
        if key in claimed:
            fingerprint = items[first_use[key]].fingerprint
        elif key in recorded:
            fingerprint = recorded[key]
        else:  # the claim locked it: it cannot be gone (were it, a "replay" would apply nothing)
            raise RuntimeError(f"Idempotency-Key {key!r} vanished while this batch held it")
        if fingerprint == item.fingerprint:
            outcomes[index] = Applied(item.key, None, replayed=True)
        else:
            outcomes[index] = IdempotencyKeyReusedError(
                "this Idempotency-Key was used within the last 24 hours for a different increment"
            )
    return to_apply


def _add(held: HeldConnection, items: list[tuple[int, Increment]]) -> tuple[dict[str, int], set[int]]:
    """Add the increments; (each key's total afterwards, the indexes refused for overflow)."""
    by_key: dict[str, list[tuple[int, int]]] = {}
    for index, item in items:
        by_key.setdefault(item.key, []).append((index, item.value))
    sums = {key: sum(value for _, value in values) for key, values in by_key.items()}
    # NOTE: a key whose sum is no 64-bit value goes into the one statement too, adding 0, which
    # always fits: so its row is locked in key order with the others' (taken later, it could
    # deadlock with another daemon's batch), and a new key's row exists from here on, at 0. That
    # row is never left behind with nothing applied: a first increment on 0 always fits.
    no_sum = {key for key, total in sums.items() if not INT64_MIN <= total <= INT64_MAX}
    totals = _add_sums_in_range(held, {key: 0 if key in no_sum else total for key, total in sums.items()})
    refused: set[int] = set()
    # The keys to apply one by one, in arrival order: those, and those whose sum would take the
    # total out of the range (the statement left them out, but locked their rows).
    for key in sorted(no_sum | (by_key.keys() - totals.keys())):
        total = current = totals[key] if key in no_sum else _read_locked(held, key)
        for index, value in by_key[key]:
            if INT64_MIN <= total + value <= INT64_MAX:
                total += value
            else:
                refused.add(index)
        if total != current:
            held.run(lambda cursor, key=key, total=total: _execute_each(
                cursor, held, "UPDATE counters SET value = ? WHERE key = ?", [(total, key)]))
        totals[key] = total
    return totals, refused


def _add_sums_in_range(held: HeldConnection, sums: dict[str, int]) -> dict[str, int]:
    """Each key's sum added in one statement, keys sorted; the totals afterwards. A key is
    missing from them if its sum is no 64-bit value or the total would leave the range: the
    statement left it out, unchanged."""
    fast = sorted(key for key, total in sums.items() if INT64_MIN <= total <= INT64_MAX)
    if not fast:
        return {}
    return dict(held.run(lambda cursor: _upsert(cursor, held, fast, [sums[key] for key in fast])))


def _execute_each(cursor: Any, held: HeldConnection, sql: str, rows: list[tuple]) -> None:
    """`sql` (with ? markers) once per row."""
    statement = sql.replace("?", "%s") if held.postgres else sql
    for row in rows:
        cursor.execute(statement, row)


# NOTE: `value + delta` must never be computed when it would overflow (PostgreSQL raises, which
# would fail the whole batch; SQLite makes a REAL, which the STRICT table refuses). The CASE
# decides by the sign of the current value which bound to compare with, computing only
# differences that stay in range; CASE evaluates only the branch it takes.
# (Spelled out in each statement: the static check refuses SQL assembled from strings.)
_UPSERT_POSTGRES = (
    "INSERT INTO counters (key, value) "
    "SELECT key, value FROM unnest(%s::text[], %s::bigint[]) AS batch (key, value) ORDER BY key "
    "ON CONFLICT (key) DO UPDATE SET value = counters.value + excluded.value WHERE "
    "CASE WHEN counters.value >= 0 THEN excluded.value <= 9223372036854775807 - counters.value "
    "ELSE excluded.value >= -9223372036854775807 - 1 - counters.value END "
    "RETURNING key, value"
)
# NOTE: SQLite parses `INSERT ... SELECT ... ON CONFLICT` ambiguously without a WHERE clause in
# the SELECT (its documented workaround is `WHERE true`).
_UPSERT_SQLITE = (
    "INSERT INTO counters (key, value) "
    "SELECT json_extract(item.value, '$[0]'), json_extract(item.value, '$[1]') FROM json_each(?) AS item "
    "WHERE true ON CONFLICT (key) DO UPDATE SET value = counters.value + excluded.value WHERE "
    "CASE WHEN counters.value >= 0 THEN excluded.value <= 9223372036854775807 - counters.value "
    "ELSE excluded.value >= -9223372036854775807 - 1 - counters.value END "
    "RETURNING key, value"
)


def _upsert(cursor: Any, held: HeldConnection, keys: list[str], values: list[int]) -> list[tuple[str, int]]:
    """One statement for the whole batch: new keys inserted, the others added to unless the
    total would leave the range (those are missing from what it returns)."""
    if held.postgres:
        return cursor.execute(_UPSERT_POSTGRES, (keys, values)).fetchall()
    return cursor.execute(_UPSERT_SQLITE, (json.dumps(list(zip(keys, values, strict=True))),)).fetchall()


def _read_locked(held: HeldConnection, key: str) -> int:
    """The total of a counter whose row this transaction has locked already."""
    if held.postgres:
        # NOTE: the upsert locked the row already (FOR NO KEY UPDATE, as an update does); asked
        # again at that strength, the read is right on its own, and upgrades nothing.
        sql = "SELECT value FROM counters WHERE key = %s FOR NO KEY UPDATE"
    else:
        sql = "SELECT value FROM counters WHERE key = ?"
    return held.run(lambda cursor: cursor.execute(sql, (key,)).fetchone()[0])


def _claim(
    cursor: Any, held: HeldConnection, keys: list[str], fingerprints: list[str], now: dt.datetime,
    expired_before: dt.datetime,
) -> list[str]:
    """Record the keys (sorted, each once) unless taken and live; the keys recorded now."""
    if held.postgres:
        rows = cursor.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, created_at) "
            "SELECT key, fingerprint, %s FROM unnest(%s::text[], %s::text[]) AS claim (key, fingerprint) "
            "ORDER BY key ON CONFLICT (key) DO UPDATE "
            "SET fingerprint = excluded.fingerprint, created_at = excluded.created_at "
            "WHERE idempotency_keys.created_at < %s RETURNING key",
            (now, keys, fingerprints, expired_before),
        ).fetchall()
    else:
        rows = cursor.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, created_at) "
            "SELECT json_extract(item.value, '$[0]'), json_extract(item.value, '$[1]'), ? FROM json_each(?) AS item "
            "WHERE true ON CONFLICT (key) DO UPDATE "
            "SET fingerprint = excluded.fingerprint, created_at = excluded.created_at "
            "WHERE idempotency_keys.created_at < ? RETURNING key",
            (to_microseconds(now), json.dumps(list(zip(keys, fingerprints, strict=True))), to_microseconds(expired_before)),
        ).fetchall()
    return [row[0] for row in rows]


def _recorded(cursor: Any, held: HeldConnection, keys: list[str]) -> list[tuple[str, str]]:
    """(key, fingerprint) of keys the claim left as they were (and locked)."""
    if held.postgres:
        return cursor.execute(
            "SELECT key, fingerprint FROM idempotency_keys WHERE key = ANY(%s)", (keys,)
        ).fetchall()
    return cursor.execute(
        "SELECT key, fingerprint FROM idempotency_keys WHERE key IN (SELECT value FROM json_each(?))",
        (json.dumps(keys),),
    ).fetchall()


def read_counter(engine: Engine, key: str) -> int | None:
    """The committed total of counter `key`; None if it was never incremented."""
    with reading(engine) as conn:
        return conn.scalar(sa.select(counters.c.value).where(counters.c.key == key))


def list_counters(engine: Engine, keys: Sequence[str] | None = None, limit: int = 100) -> list[tuple[str, int]]:
    """(key, total) sorted by key: of `keys` (those ever incremented), or the first `limit`."""
    # NOTE: a statement takes at most 65,535 parameters on PostgreSQL: many keys go in several.
    wanted = sorted(set(keys or ()))
    with reading(engine) as conn:
        statement = sa.select(counters.c.key, counters.c.value).order_by(_in_code_point_order(conn))
        statements = [statement.where(counters.c.key.in_(wanted[start : start + _KEYS_PER_STATEMENT]))
                      for start in range(0, len(wanted), _KEYS_PER_STATEMENT)] or [statement.limit(limit)]
        found = [(key, value) for part in statements for key, value in conn.execute(part)]
    # Each part comes in the database's order; parts of many keys are merged in Python's.
    return sorted(found) if len(statements) > 1 else found


_KEYS_PER_STATEMENT = 10_000

# The database's default collation: its libc name, and its provider (PostgreSQL 15 and later;
# read through jsonb so that an older server, libc only, gives NULL rather than an error).
_DEFAULT_COLLATION = sa.text(
    "SELECT datcollate, to_jsonb(d) ->> 'datlocprovider' FROM pg_database d WHERE datname = current_database()"
)


def _in_code_point_order(conn: sa.Connection) -> sa.ColumnElement[str]:
    """The key to sort by for code point order, Python's. SQLite's BINARY collation is that
    order, and so is PostgreSQL's default in a database created with the C locale or the builtin
    provider (PostgreSQL 17): the primary key's index gives it, no sort. Any other default
    (en_US puts "a" before "B") is overridden with COLLATE "C", which that index cannot serve:
    the table is read whole and sorted (70 ms for a million keys; a review)."""
    if not is_postgres(conn):
        return counters.c.key
    collate, provider = conn.execute(_DEFAULT_COLLATION).one()
    if provider == "b" or (provider in (None, "c") and collate in ("C", "POSIX")):
        return counters.c.key
    return counters.c.key.collate("C")


# Keys the cleanup deletes in one transaction: on SQLite its write lock stops every GET / and
# POST /increment meanwhile, so fewer there; and after each chunk a pause as long as the chunk
# took, times CLEANUP_PAUSE_FACTOR.
CLEANUP_CHUNK_POSTGRES = 50_000
CLEANUP_CHUNK_SQLITE = 1_000
CLEANUP_PAUSE_FACTOR = 1.0


@dataclasses.dataclass(frozen=True)
class Forgotten:
    """What a cleanup of expired Idempotency-Keys did: how many it deleted, and whether none is left."""

    deleted: int
    done: bool


def delete_expired_idempotency_keys(
    engine: Engine,
    now: dt.datetime | None = None,
    chunk: int | None = None,
    go_on: Callable[[], bool] = lambda: True,
) -> Forgotten:
    """Forget the Idempotency-Keys older than 24 hours, until none is left or go_on() says to
    stop (asked after each chunk).

    In transactions of at most `chunk` keys each, oldest first: one statement for millions of
    expired keys would outlast the statement timeout and fail whole, hour after hour, while the
    backlog grew (PostgreSQL, 1M expired keys: 1.4-1.7 s as one plain DELETE, 7.5-8 s locked in
    key order; 0.45 s a chunk of 50,000; bench/NOTES.md). On SQLite a chunk holds the write
    lock every GET / and POST /increment needs, so chunks are smaller there (a review measured
    0.3 s per 50,000), with a pause after each (CLEANUP_PAUSE_FACTOR)."""
    postgres = is_postgres(engine)
    if chunk is None:
        chunk = CLEANUP_CHUNK_POSTGRES if postgres else CLEANUP_CHUNK_SQLITE
    expired_before = (now or utcnow()) - IDEMPOTENCY_TTL
    oldest = (
        sa.select(idempotency_keys.c.key)
        .where(idempotency_keys.c.created_at < expired_before)
        .order_by(idempotency_keys.c.created_at)
        .limit(chunk)
    )
    if postgres:
        # NOTE: SKIP LOCKED: a key a batch holds (claiming it anew, or reading it) is left for
        # the next run. So the cleanup never waits for a batch, and cannot deadlock with one;
        # a batch may wait for a chunk's short transaction, then finds the key gone.
        oldest = oldest.with_for_update(skip_locked=True)
    else:
        # SQLite: the query-state file's write lock alone (the keys live there), so that a
        # randomization goes on meanwhile, and the cleanup need not wait for one. Queries and
        # increments wait for each chunk, hence the small ones.
        engine = engine.execution_options(**{ONE_FILE_OPTION: True})
    statement = idempotency_keys.delete().where(idempotency_keys.c.key.in_(oldest.scalar_subquery()))
    deleted = 0
    with database_errors(engine):
        while True:
            started = time.monotonic()
            with engine.begin() as conn:
                count = conn.execute(statement).rowcount
            deleted += count
            if count < chunk:
                return Forgotten(deleted, done=True)
            if not postgres and go_on():
                # NOTE: a writer waiting for the lock sleeps in SQLite's busy handler, in steps
                # growing to 100 ms; chunk after chunk with no gap, it found the lock taken at
                # each try and waited up to 330 ms (300,000 keys; 10 ms with the pause and chunks
                # of 1,000, bench/NOTES.md).
                time.sleep((time.monotonic() - started) * CLEANUP_PAUSE_FACTOR)
            if not go_on():  # (after the pause too: a stop request may have come meanwhile)
                return Forgotten(deleted, done=False)
