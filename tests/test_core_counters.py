"""core/counters.py on SQLite and a real PostgreSQL: totals, overflow, Idempotency-Keys."""

from __future__ import annotations

import datetime as dt
import os
import random
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import types

import pytest
import sqlalchemy as sa

from devtools import pgserver
from maxtwo_cli.core import counters as counters_module
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.counters import (
    INT64_MAX,
    INT64_MIN,
    Applied,
    CounterOverflowError,
    Forgotten,
    IdempotencyKeyReusedError,
    Increment,
    InvalidIncrementError,
    add_increments,
    apply_increments,
    check_idempotency_key,
    check_key,
    check_value,
    delete_expired_idempotency_keys,
    increment,
    list_counters,
    read_counter,
)
from maxtwo_cli.core.errors import DatabaseUnavailableError, MaxtwoError
from maxtwo_cli.core.schema import idempotency_keys
from maxtwo_cli.core.settings import Settings
from tests.helpers import wait_for

TICK = dt.timedelta(microseconds=1)


@pytest.fixture(params=["in the caller's transaction", "committed by itself", "added in the caller's transaction"])
def batch(request):
    """Apply a batch every way the core allows: apply_increments() inside a caller's transaction
    (which no production path opens today), add_increments() outside one (the batcher's way), or
    add_increments() inside one (it hands the batch to apply_increments)."""

    def run(engine, items, now=None):
        held = HeldConnection(engine)
        try:
            if request.param == "committed by itself":
                return add_increments(held, items, now)
            with held.transaction():
                if request.param == "added in the caller's transaction":
                    return add_increments(held, items, now)
                return apply_increments(held, items, now)
        finally:
            held.release()

    return run


def test_increments_add_subtract_and_zero_changes_nothing(engine):
    assert increment(engine, "a", 5).total == 5
    assert increment(engine, "a", -7).total == -2
    assert increment(engine, "a", 0).total == -2
    assert read_counter(engine, "a") == -2
    assert read_counter(engine, "never") is None


def test_zero_creates_a_counter_at_zero(engine):
    assert increment(engine, "z", 0).total == 0
    assert list_counters(engine) == [("z", 0)]


def test_a_batch_sums_by_key_and_reports_each_keys_total(engine, batch):
    outcomes = batch(engine, [Increment("b", 2), Increment("a", 1), Increment("b", 3), Increment("a", -4)])
    assert outcomes == [Applied("b", 5), Applied("a", -3), Applied("b", 5), Applied("a", -3)]
    assert list_counters(engine) == [("a", -3), ("b", 5)]


@pytest.mark.parametrize(("start", "delta"), [(INT64_MAX, 1), (INT64_MIN, -1), (INT64_MAX - 5, 6), (INT64_MIN + 5, -6)])
def test_an_overflowing_increment_fails_alone_and_the_rest_of_its_batch_applies(engine, batch, start, delta):
    increment(engine, "edge", start)
    outcomes = batch(engine, [Increment("other", 1), Increment("edge", delta), Increment("third", -1)])
    assert outcomes[0] == Applied("other", 1) and outcomes[2] == Applied("third", -1)
    assert isinstance(outcomes[1], CounterOverflowError)
    assert read_counter(engine, "edge") == start  # kept its value
    assert read_counter(engine, "other") == 1 and read_counter(engine, "third") == -1


def test_the_extremes_themselves_are_reachable(engine):
    assert increment(engine, "max", INT64_MAX).total == INT64_MAX
    assert increment(engine, "min", INT64_MIN).total == INT64_MIN
    assert increment(engine, "max", INT64_MIN).total == -1
    with pytest.raises(CounterOverflowError):
        increment(engine, "min", -1)


def test_a_key_whose_batch_sum_overflows_applies_what_fits_in_arrival_order(engine, batch):
    increment(engine, "k", INT64_MAX - 10)
    # Their sum (14) would overflow: one by one, 6 fits (MAX-4), the next 6 does not, -2 fits
    # (MAX-6), 4 fits (MAX-2).
    outcomes = batch(engine, [Increment("k", 6), Increment("k", 6), Increment("k", -2), Increment("k", 4)])
    assert isinstance(outcomes[1], CounterOverflowError)
    assert [outcome.total for index, outcome in enumerate(outcomes) if index != 1] == [INT64_MAX - 2] * 3
    assert read_counter(engine, "k") == INT64_MAX - 2


def test_one_by_one_a_total_may_reach_the_minimum_itself(engine, batch):
    increment(engine, "low", INT64_MIN + 1)
    # Their sum (-2) would overflow: one by one, the first -1 takes the total to the minimum.
    outcomes = batch(engine, [Increment("low", -1), Increment("low", -1)])
    assert outcomes[0] == Applied("low", INT64_MIN) and isinstance(outcomes[1], CounterOverflowError)
    assert read_counter(engine, "low") == INT64_MIN


def test_a_batch_whose_sum_is_exactly_the_minimum_applies_whole(engine, batch):
    # The sum fits (it is the minimum itself), though one by one MIN - 1 would not: applied as
    # one sum, every increment applies. (The key makes add_increments() go through _add too.)
    outcomes = batch(engine, [Increment("x", INT64_MIN, "k"), Increment("x", -1), Increment("x", 1)])
    assert outcomes == [Applied("x", INT64_MIN)] * 3
    assert read_counter(engine, "x") == INT64_MIN


def test_a_new_key_whose_sum_is_no_64_bit_value_is_applied_as_far_as_it_fits(engine, batch):
    outcomes = batch(engine, [Increment("n", INT64_MAX), Increment("n", INT64_MAX)])
    assert outcomes[0] == Applied("n", INT64_MAX) and isinstance(outcomes[1], CounterOverflowError)
    assert read_counter(engine, "n") == INT64_MAX


def test_a_new_key_whose_increments_net_to_zero_one_by_one_reads_zero(engine, batch):
    # Their sum (2 * MAX) is no 64-bit value: one by one, MAX fits, the next two do not, -MAX fits.
    items = [Increment("z", INT64_MAX), Increment("z", INT64_MAX), Increment("z", INT64_MAX), Increment("z", -INT64_MAX)]
    outcomes = batch(engine, items)
    assert all(isinstance(outcome, CounterOverflowError) for outcome in outcomes[1:3])
    assert [outcomes[0], outcomes[3]] == [Applied("z", 0)] * 2
    assert read_counter(engine, "z") == 0


def test_a_key_at_the_maximum_refuses_what_overflows_and_keeps_no_idempotency_key(engine, batch):
    increment(engine, "top", INT64_MAX)
    outcomes = batch(engine, [Increment("top", INT64_MAX, "k1"), Increment("top", 1, "k2")])
    assert all(isinstance(outcome, CounterOverflowError) for outcome in outcomes)
    assert read_counter(engine, "top") == INT64_MAX
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(idempotency_keys.c.key)).scalars()) == []


def test_sums_that_cross_the_range_midway_but_end_inside_apply_whole(engine, batch):
    # In arrival order the second would overflow; applied together (concurrent requests, any
    # order is theirs) the total fits, so all three apply.
    outcomes = batch(engine, [Increment("m", INT64_MAX), Increment("m", 1), Increment("m", -2)])
    assert outcomes == [Applied("m", INT64_MAX - 1)] * 3


class CountingHeld(HeldConnection):
    """A held connection that counts its round trips (every run() is one statement here)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.statements = 0

    def run(self, work, **options):
        self.statements += 1
        return super().run(work, **options)


def test_a_batch_without_idempotency_keys_is_one_statement_committed_by_itself(engine):
    held = CountingHeld(engine)
    try:
        outcomes = add_increments(held, [Increment("b", 2), Increment("a", 1), Increment("b", 3)])
        assert held.statements == 1  # no BEGIN, no COMMIT
        assert not held.in_transaction
    finally:
        held.release()
    assert outcomes == [Applied("b", 5), Applied("a", 1), Applied("b", 5)]
    assert list_counters(engine) == [("a", 1), ("b", 5)]  # committed: another connection sees it


def test_what_the_one_statement_leaves_out_is_applied_in_a_transaction_in_arrival_order(engine):
    increment(engine, "edge", INT64_MAX - 5)
    held = CountingHeld(engine)
    try:
        outcomes = add_increments(held, [Increment("edge", 3), Increment("x", 1), Increment("edge", 3),
                                         Increment("edge", 2)])
        # The statement, then BEGIN, the left-out part's own try at "edge" (refused again), a read
        # of it and a write, and COMMIT: the read and the write in one transaction.
        assert held.statements == 6 and not held.in_transaction
    finally:
        held.release()
    assert outcomes[1] == Applied("x", 1)
    assert outcomes[0] == outcomes[3] == Applied("edge", INT64_MAX)
    assert isinstance(outcomes[2], CounterOverflowError)
    assert read_counter(engine, "edge") == INT64_MAX and read_counter(engine, "x") == 1


def test_when_the_left_out_part_fails_the_committed_statement_still_answers(engine, monkeypatch):
    from maxtwo_cli.core import counters as core_counters

    increment(engine, "edge", INT64_MAX)

    def database_gone(held, items, now=None):
        raise DatabaseUnavailableError("the database went away")

    monkeypatch.setattr(core_counters, "apply_increments", database_gone)
    held = HeldConnection(engine)
    try:
        outcomes = add_increments(held, [Increment("x", 1), Increment("edge", 1)])
    finally:
        held.release()
    assert outcomes[0] == Applied("x", 1)
    assert isinstance(outcomes[1], DatabaseUnavailableError)
    assert read_counter(engine, "x") == 1 and read_counter(engine, "edge") == INT64_MAX


def test_inside_a_transaction_add_increments_commits_with_it(engine):
    held = HeldConnection(engine)
    try:
        with pytest.raises(RuntimeError, match="rolled back"), held.transaction():
            # With an Idempotency-Key it would otherwise open (and commit) a transaction itself.
            add_increments(held, [Increment("t", 1), Increment("u", 2, "key-u")])
            raise RuntimeError("rolled back")
    finally:
        held.release()
    assert read_counter(engine, "t") is None and read_counter(engine, "u") is None


def test_the_table_never_holds_a_non_integer(engine):
    if engine.dialect.name == "sqlite":  # (PostgreSQL's bigint column rounds a 1.5 itself)
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO counters (key, value) VALUES ('r', 1.5)"))
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO counters (key, value) VALUES ('r', 9223372036854775807 + 1)"))
    with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO counters (key, value) VALUES ('s', 'five')"))


def test_an_idempotency_key_retry_is_applied_once(engine):
    first = increment(engine, "i", 3, idempotency_key="retry-1")
    again = increment(engine, "i", 3, idempotency_key="retry-1")
    assert first.total == 3 and again == Applied("i", None, replayed=True)
    assert read_counter(engine, "i") == 3


def test_an_idempotency_key_with_a_different_body_is_refused(engine):
    increment(engine, "i", 3, idempotency_key="once")
    reused = "^this Idempotency-Key was used within the last 24 hours for a different increment$"
    with pytest.raises(IdempotencyKeyReusedError, match=reused):
        increment(engine, "i", 4, idempotency_key="once")
    with pytest.raises(IdempotencyKeyReusedError):
        increment(engine, "j", 3, idempotency_key="once")
    with pytest.raises(IdempotencyKeyReusedError):  # the sign is part of the body
        increment(engine, "i", -3, idempotency_key="once")
    assert read_counter(engine, "i") == 3 and read_counter(engine, "j") is None


def test_the_same_idempotency_key_twice_in_one_batch(engine, batch):
    outcomes = batch(engine, [Increment("d", 1, "dup"), Increment("d", 1, "dup"), Increment("d", 2, "dup")])
    assert outcomes[0] == Applied("d", 1)
    assert outcomes[1] == Applied("d", None, replayed=True)
    assert isinstance(outcomes[2], IdempotencyKeyReusedError)
    assert read_counter(engine, "d") == 1


def test_a_retry_in_the_same_batch_of_a_refused_increment_is_refused_too(engine, batch):
    """Not answered as a replay of an increment that was never applied."""
    increment(engine, "top", INT64_MAX)
    outcomes = batch(engine, [Increment("top", 1, "retry"), Increment("top", 1, "retry")])
    assert [type(outcome) for outcome in outcomes] == [CounterOverflowError, CounterOverflowError]
    assert read_counter(engine, "top") == INT64_MAX


def test_a_batch_s_later_uses_of_a_refused_idempotency_key_get_what_each_would_alone(engine, batch):
    """The refused first use leaves the key unused: a retry of it is refused again, and another
    body under the same key is a first use (not 422, as if the refused one had been recorded)."""
    increment(engine, "top", INT64_MAX - 1)
    outcomes = batch(engine, [Increment("top", 2, "k"), Increment("top", 2, "k"), Increment("top", 1, "k")])
    assert [type(outcome) for outcome in outcomes[:2]] == [CounterOverflowError, CounterOverflowError]
    assert outcomes[2] == Applied("top", INT64_MAX)
    assert read_counter(engine, "top") == INT64_MAX
    assert batch(engine, [Increment("top", 1, "k")]) == [Applied("top", None, replayed=True)]
    assert isinstance(batch(engine, [Increment("top", 2, "k")])[0], IdempotencyKeyReusedError)


def test_a_refused_idempotency_key_leaves_the_rest_of_its_batch_as_it_would_be(engine, batch):
    """Increments without a key, and under other keys, beside one refused under its key."""
    increment(engine, "top", INT64_MAX)
    outcomes = batch(engine, [Increment("top", 1, "k"), Increment("a", 1), Increment("b", 2, "j"),
                              Increment("b", 2, "j")])
    assert isinstance(outcomes[0], CounterOverflowError)
    assert outcomes[1:] == [Applied("a", 1), Applied("b", 2), Applied("b", None, replayed=True)]
    assert isinstance(batch(engine, [Increment("top", 1, "k")])[0], CounterOverflowError)
    assert batch(engine, [Increment("b", 2, "j")]) == [Applied("b", None, replayed=True)]
    assert list_counters(engine) == [("a", 1), ("b", 2), ("top", INT64_MAX)]


def test_a_batch_whose_sum_reaches_exactly_the_maximum_applies_whole(engine, batch):
    outcomes = batch(engine, [Increment("x", INT64_MAX), Increment("x", 1), Increment("x", -1)])
    assert outcomes == [Applied("x", INT64_MAX)] * 3
    assert read_counter(engine, "x") == INT64_MAX


def test_an_idempotency_key_is_recorded_with_its_increment_or_not_at_all(engine, monkeypatch):
    """Recorded, and the increment then failed: every retry was a replay of nothing."""
    def failing_upsert(*args, **kwargs):
        raise RuntimeError("the statement failed")

    monkeypatch.setattr(counters_module, "_upsert", failing_upsert)
    held = HeldConnection(engine)
    try:
        with pytest.raises(RuntimeError):
            add_increments(held, [Increment("i", 1, "once")])
    finally:
        held.release()
    monkeypatch.undo()
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(idempotency_keys.c.key)).scalars()) == []
    assert increment(engine, "i", 1, idempotency_key="once").total == 1


def test_an_idempotency_key_lives_24_hours_to_the_microsecond(engine, batch):
    then = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    batch(engine, [Increment("b", 1, "edge")], now=then)
    at_24_hours = then + dt.timedelta(hours=24)
    assert delete_expired_idempotency_keys(engine, at_24_hours).deleted == 0
    assert batch(engine, [Increment("b", 1, "edge")], now=at_24_hours) == [Applied("b", None, replayed=True)]
    assert batch(engine, [Increment("b", 1, "edge")], now=at_24_hours + TICK) == [Applied("b", 2)]


def test_a_later_use_of_a_refused_increment_s_idempotency_key_is_recorded_at_the_batch_s_time(engine, batch):
    # The second pass of a batch (the key's first use refused) recorded the key at its own time.
    increment(engine, "top", INT64_MAX)
    then = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    outcomes = batch(engine, [Increment("top", 1, "k"), Increment("b", 2, "k")], now=then)
    assert isinstance(outcomes[0], CounterOverflowError) and outcomes[1] == Applied("b", 2)
    assert delete_expired_idempotency_keys(engine, then + dt.timedelta(hours=24)).deleted == 0
    assert delete_expired_idempotency_keys(engine, then + dt.timedelta(hours=24) + TICK).deleted == 1


def test_a_refused_increment_leaves_its_idempotency_key_unused(engine):
    increment(engine, "o", INT64_MAX)
    with pytest.raises(CounterOverflowError):
        increment(engine, "o", 1, idempotency_key="over")
    with pytest.raises(CounterOverflowError):
        increment(engine, "o", 1, idempotency_key="over")  # refused again, not replayed
    increment(engine, "o", -1)
    assert increment(engine, "o", 1, idempotency_key="over").total == INT64_MAX


def test_an_expired_idempotency_key_is_a_new_use_and_is_deleted(engine, batch):
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=25)
    batch(engine, [Increment("e", 1, "old")], now=long_ago)
    assert increment(engine, "e", 1, idempotency_key="old").total == 2  # expired: applied again
    batch(engine, [Increment("e", 5, "older")], now=long_ago)
    assert delete_expired_idempotency_keys(engine).deleted == 1
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(idempotency_keys.c.key)).scalars()) == ["old"]


def test_list_counters_sorted_limited_or_by_key(engine):
    for key in ["c", "a", "b"]:
        increment(engine, key, ord(key))
    assert list_counters(engine) == [("a", 97), ("b", 98), ("c", 99)]
    assert list_counters(engine, limit=2) == [("a", 97), ("b", 98)]
    assert list_counters(engine, ["c", "nope", "a"]) == [("a", 97), ("c", 99)]
    # More keys than PostgreSQL takes parameters in one statement (65,535).
    assert list_counters(engine, [f"k{number}" for number in range(70_000)] + ["c", "a"]) == [("a", 97), ("c", 99)]


def test_list_counters_lists_the_first_100_by_default(engine):
    held = HeldConnection(engine)
    try:
        add_increments(held, [Increment(f"k{number:03}", number) for number in range(101)])
    finally:
        held.release()
    assert list_counters(engine) == [(f"k{number:03}", number) for number in range(100)]


@pytest.fixture
def en_us_locale(monkeypatch):
    """en_US.UTF-8 compiled into a temporary directory and named by LOCPATH, for a server
    started by the test: this machine has only the C locales, most PostgreSQL servers do not."""
    directory = tempfile.mkdtemp(prefix="maxtwo-locales-")
    try:
        # Traversable: under root, the PostgreSQL server runs as a user of its own.
        os.chmod(directory, 0o711)  # noqa: S103 (no listing, no writing: only a path to follow)
        compiled = subprocess.run(["localedef", "-i", "en_US", "-f", "UTF-8", f"{directory}/en_US.UTF-8"],
                                  capture_output=True, encoding="utf-8", check=False)
        assert compiled.returncode == 0, (
            f"localedef could not compile en_US (its source comes with Debian's locales package, which "
            f".ci/run installs): {compiled.stderr.strip()}")
        monkeypatch.setenv("LOCPATH", directory)
        yield "en_US.UTF-8"
    finally:
        shutil.rmtree(directory)


@pytest.mark.slow
def test_list_counters_in_code_point_order_on_a_postgresql_created_with_a_language_locale(en_us_locale):
    with pgserver.ThrowawayPostgres(fsync=False) as server:
        admin = sa.create_engine(server.superuser_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE english TEMPLATE template0 LOCALE '{en_us_locale}'"))
        admin.dispose()
        engine = db.create_engine(Settings(database_url=server.url.rsplit("/", 1)[0] + "/english"))
        try:
            schema.ensure_schema(engine)
            for key in ["c", "a", "B"]:
                increment(engine, key, ord(key))
            with engine.connect() as conn:  # the database's own order, which the test must not see
                assert conn.execute(sa.text("SELECT key FROM counters ORDER BY key")).scalars().all() == ["a", "B", "c"]
            with engine.connect() as conn:  # sorted as the database's collation would not
                assert str(counters_module._in_code_point_order(conn)) == 'counters.key COLLATE "C"'
            assert list_counters(engine) == [("B", 66), ("a", 97), ("c", 99)]
            assert list_counters(engine, limit=1) == [("B", 66)]
            assert list_counters(engine, ["c", "a", "B"]) == [("B", 66), ("a", 97), ("c", 99)]
        finally:
            engine.dispose()


def test_a_database_in_code_point_order_lists_counters_by_its_primary_key(engine):
    """No sort of the whole table where the primary key's order is code point order already:
    SQLite, and the test server (created with the C locale)."""
    with engine.connect() as conn:
        assert counters_module._in_code_point_order(conn) is counters_module.counters.c.key


def test_keys_of_every_shape_round_trip(engine):
    keys = ["/", "a/b", "%2F", "ключ", "emoji 😀", " spaced ", "x" * 255, "'; DROP TABLE counters; --", "?&#"]
    for key in keys:
        increment(engine, key, 1)
    assert [read_counter(engine, key) for key in keys] == [1] * len(keys)


def test_concurrent_increments_from_many_threads_are_exact(engine):
    rng = random.Random(7)
    plan = [[(f"k{rng.randrange(10)}", rng.randrange(-1000, 1000)) for _ in range(50)] for _ in range(8)]
    expected: dict[str, int] = {}
    for work in plan:
        for key, value in work:
            expected[key] = expected.get(key, 0) + value
    errors = []

    def worker(work) -> None:
        try:
            for key, value in work:
                increment(engine, key, value)
        except Exception as ex:  # noqa: BLE001 - reported below
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(work,)) for work in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert dict(list_counters(engine, limit=1000)) == expected


# The messages are the 422's description and the CLI's error, word for word.
KEY_LENGTH = "key must be 1 to 255 characters long"
KEY_TEXT = "key must be a string"


@pytest.mark.parametrize(("key", "message"), [
    ("", KEY_LENGTH), ("x" * 256, KEY_LENGTH), ("a\x00b", "key must not contain U+0000"), (5, KEY_TEXT),
    (None, KEY_TEXT), ("\udc80", "key must be valid Unicode (no unpaired surrogates)"),
])
def test_bad_keys(key, message):
    with pytest.raises(InvalidIncrementError, match=f"^{re.escape(message)}$"):
        check_key(key)


VALUE_RANGE = f"value must be between {INT64_MIN} and {INT64_MAX}"


@pytest.mark.parametrize(("value", "message"), [
    *((value, "value must be an integer") for value in (True, False, 1.0, "5", None)),
    (INT64_MAX + 1, VALUE_RANGE), (INT64_MIN - 1, VALUE_RANGE),
])
def test_bad_values(value, message):
    with pytest.raises(InvalidIncrementError, match=f"^{re.escape(message)}$"):
        check_value(value)


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é", "new\nline", "a,b", "first, second", "del\x7f"])
def test_bad_idempotency_keys(key):
    message = "Idempotency-Key must be one header of 1 to 255 printable ASCII characters, no comma"
    with pytest.raises(InvalidIncrementError, match=f"^{re.escape(message)}$"):
        check_idempotency_key(key)


@pytest.mark.parametrize("key", ["k", "x" * 255, "a b", "a~", "!\"#$%&'()*+-./09:;<=>?@AZ[\\]^_`az{|}"])
def test_idempotency_keys_up_to_the_bounds(key):
    """1 and 255 characters, and printable ASCII from the space to the tilde, both included."""
    assert check_idempotency_key(key) == key


def test_a_key_whose_sum_is_no_64_bit_value_is_locked_in_key_order_with_the_rest(postgres_engine):
    """Another daemon's transaction takes "a" and then "b", the order every batch takes rows
    in. A batch with Idempotency-Keys that adds to "b" and, beyond any 64-bit sum, to "a" must
    take them in that order too: taking "b" first and then waiting for "a" would deadlock, and
    PostgreSQL would fail one of the two after deadlock_timeout."""
    increment(postgres_engine, "a", 1)
    increment(postgres_engine, "b", 1)
    other = postgres_engine.connect()  # its first statement opens a transaction
    other_pid = other.scalar(sa.text("SELECT pg_backend_pid()"))
    other.execute(sa.text("UPDATE counters SET value = value + 1 WHERE key = 'a'"))
    items = [Increment("b", 1, "once-b"), Increment("a", INT64_MAX - 2), Increment("a", INT64_MAX)]
    worker, outcomes = _batch_in_a_thread(postgres_engine, items)
    try:
        wait_for(lambda: _blocked_by(postgres_engine, other_pid), "the batch waiting for a row lock")
        # Taking "b" now: the batch must not hold it.
        other.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
        other.execute(sa.text("UPDATE counters SET value = value + 1 WHERE key = 'b'"))
        other.commit()
    finally:
        other.close()
        worker.join(30)
    # "a" was 2 when the batch got it: MAX - 2 fits (MAX), then MAX does not.
    assert outcomes[:2] == [Applied("b", 3), Applied("a", INT64_MAX)]
    assert isinstance(outcomes[2], CounterOverflowError)
    assert [read_counter(postgres_engine, key) for key in "ab"] == [INT64_MAX, 3]


def test_an_expired_key_deleted_by_the_cleanup_during_a_claim_is_a_new_use_not_a_replay(postgres_engine):
    now = dt.datetime.now(dt.UTC)
    _batch_in_a_thread(postgres_engine, [Increment("x", 1, "a")], now - dt.timedelta(hours=30))[0].join(30)
    other = postgres_engine.connect()
    other_pid = other.scalar(sa.text("SELECT pg_backend_pid()"))
    # Not committed: the batch's claim of "b" waits for it, after its claim of "a".
    other.execute(idempotency_keys.insert().values(key="b", fingerprint="f", created_at=now))
    worker, outcomes = _batch_in_a_thread(postgres_engine, [Increment("x", 5, "a"), Increment("y", 1, "b")], now)
    deleted: list[int] = []
    cleanup = threading.Thread(target=lambda: deleted.append(delete_expired_idempotency_keys(postgres_engine, now).deleted))
    try:
        wait_for(lambda: _blocked_by(postgres_engine, other_pid), "the batch's claim waiting")
        [batch_pid] = _blocked_by(postgres_engine, other_pid)
        cleanup.start()
        wait_for(lambda: deleted or _blocked_by(postgres_engine, batch_pid), "the cleanup done or waiting")
        other.rollback()
    finally:
        other.close()
        worker.join(30)
        if cleanup.ident is not None:
            cleanup.join(30)
    # "a" had expired: this is a new use, applied (not a replay of the old one, never applied).
    assert outcomes == [Applied("x", 6), Applied("y", 1)]
    assert read_counter(postgres_engine, "x") == 6
    assert deleted == [0]  # "a" was claimed anew meanwhile: live again


def test_the_cleanup_skips_a_key_a_batch_holds_rather_than_wait_for_it(postgres_engine):
    # Never waiting for a batch, it cannot deadlock with one (a batch claims keys in key order,
    # the cleanup takes them oldest first).
    now = dt.datetime.now(dt.UTC)
    with postgres_engine.begin() as conn:
        for minutes, key in enumerate("bma"):
            created_at = now - dt.timedelta(hours=30) + dt.timedelta(minutes=minutes)
            conn.execute(idempotency_keys.insert().values(key=key, fingerprint="f", created_at=created_at))
    holder = postgres_engine.connect()
    holder.execute(sa.text("SELECT key FROM idempotency_keys WHERE key = 'm' FOR UPDATE"))
    try:
        assert delete_expired_idempotency_keys(postgres_engine, now).deleted == 2
    finally:
        holder.rollback()
        holder.close()
    assert delete_expired_idempotency_keys(postgres_engine, now).deleted == 1  # the next run takes it


def add_expired_keys(engine: sa.Engine, count: int, now: dt.datetime) -> None:
    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert(), [
            {"key": f"k{number}", "fingerprint": "f", "created_at": now - dt.timedelta(hours=25, seconds=number)}
            for number in range(count)
        ])


def test_the_cleanup_s_chunk_is_its_database_s(engine, monkeypatch):
    monkeypatch.setattr(counters_module, "CLEANUP_CHUNK_POSTGRES", 2)
    monkeypatch.setattr(counters_module, "CLEANUP_CHUNK_SQLITE", 3)
    now = dt.datetime.now(dt.UTC)
    add_expired_keys(engine, 5, now)
    chunk = 2 if db.is_postgres(engine) else 3
    assert delete_expired_idempotency_keys(engine, now, go_on=lambda: False) == Forgotten(chunk, done=False)


def test_the_cleanup_pauses_between_chunks_on_sqlite_only_and_not_once_told_to_stop(engine, monkeypatch):
    """Its pause lets SQLite's other writers in (PostgreSQL's wait for no lock of a whole file)."""
    pauses: list[float] = []
    monkeypatch.setattr(counters_module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=pauses.append))
    now = dt.datetime.now(dt.UTC)
    add_expired_keys(engine, 5, now)
    assert delete_expired_idempotency_keys(engine, now, chunk=2, go_on=lambda: False) == Forgotten(2, done=False)
    assert pauses == []
    assert delete_expired_idempotency_keys(engine, now, chunk=2) == Forgotten(3, done=True)
    assert len(pauses) == (0 if db.is_postgres(engine) else 1)


def test_a_database_error_in_the_cleanup_is_one_of_maxtwo_s(tmp_path):
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}"))  # no tables
    try:
        with pytest.raises(MaxtwoError, match="no such table"):
            delete_expired_idempotency_keys(engine)
    finally:
        engine.dispose()


def test_the_cleanup_stops_when_told_after_a_chunk_and_says_keys_are_left(engine):
    now = dt.datetime.now(dt.UTC)
    add_expired_keys(engine, 5, now)
    assert delete_expired_idempotency_keys(engine, now, chunk=2, go_on=lambda: False) == Forgotten(2, done=False)
    assert delete_expired_idempotency_keys(engine, now, chunk=2) == Forgotten(3, done=True)


def test_on_sqlite_writers_get_in_between_the_cleanup_chunks(tmp_path):
    """SQLite's busy handler sleeps in steps growing to 100 ms: chunk after chunk with no gap, a
    waiting writer found the lock taken at each try (up to 330 ms for one increment). With a
    pause after each chunk it gets in between them."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'm.db'}"))
    schema.ensure_schema(engine)
    now = dt.datetime.now(dt.UTC)
    add_expired_keys(engine, 40_000, now)
    writes_during: list[float] = []
    cleaning = threading.Event()
    done = threading.Event()

    def writer() -> None:
        while not done.is_set():
            increment(engine, "w", 1)
            if cleaning.is_set():
                writes_during.append(time.monotonic())
            time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        cleaning.set()
        assert delete_expired_idempotency_keys(engine, now) == Forgotten(40_000, done=True)  # 40 chunks
    finally:
        done.set()
        thread.join(10)
        engine.dispose()
    # Measured: 9 writes without the pause, 48 with it (one or more between most chunks).
    assert len(writes_during) >= 20, f"{len(writes_during)} writes during the cleanup"


def test_on_sqlite_the_cleanup_goes_on_while_the_users_file_is_being_written(tmp_path):
    """The keys live in the query-state file, and the cleanup locks that file alone: it does not
    wait for a randomization (the users file's writer) to end."""
    path = tmp_path / "m.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=2.0))
    schema.ensure_schema(engine)
    now = dt.datetime.now(dt.UTC)
    add_expired_keys(engine, 10, now)
    randomizing = sqlite3.connect(path, isolation_level=None)  # the users file alone
    try:
        randomizing.execute("BEGIN IMMEDIATE")
        assert delete_expired_idempotency_keys(engine, now) == Forgotten(10, done=True)
    finally:
        randomizing.close()
        engine.dispose()


def test_the_cleanup_deletes_in_chunks_oldest_first_until_none_is_left(engine):
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:  # the youngest written first: the table's order is not their age
        for hours, key in [(1, "live"), (26, "e"), (27, "d"), (28, "c"), (29, "b"), (30, "a")]:
            conn.execute(idempotency_keys.insert().values(
                key=key, fingerprint="f", created_at=now - dt.timedelta(hours=hours)))
    assert delete_expired_idempotency_keys(engine, now, chunk=2, go_on=lambda: False) == Forgotten(2, done=False)
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(idempotency_keys.c.key)).scalars()) == ["c", "d", "e", "live"]
    assert delete_expired_idempotency_keys(engine, now, chunk=2) == Forgotten(3, done=True)
    with engine.connect() as conn:
        assert list(conn.execute(sa.select(idempotency_keys.c.key)).scalars()) == ["live"]


def _batch_in_a_thread(engine, items, now=None) -> tuple[threading.Thread, list]:
    """add_increments() of `items` in a thread of its own; its outcomes, or the error it raised."""
    outcomes: list = []

    def run() -> None:
        held = HeldConnection(engine)
        try:
            outcomes.extend(add_increments(held, items, now))
        except Exception as ex:  # noqa: BLE001 - asserted by the caller
            outcomes.append(ex)
        finally:
            held.release()

    worker = threading.Thread(target=run)
    worker.start()
    return worker, outcomes


def _blocked_by(engine, pid: int) -> list[int]:
    """The backends waiting for a lock that backend `pid` holds."""
    with engine.connect() as conn:
        return list(conn.scalars(
            sa.text("SELECT pid FROM pg_stat_activity WHERE CAST(:pid AS integer) = ANY(pg_blocking_pids(pid))"),
            {"pid": pid},
        ))
