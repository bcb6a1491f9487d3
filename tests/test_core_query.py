from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from maxtwo_cli.core import db, schema
from maxtwo_cli.core import query as query_module
from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.clock import format_api_timestamp, iso_text, utcnow
from maxtwo_cli.core.errors import DatabaseUnavailableError
from maxtwo_cli.core.query import AnswerCache, QueryResult, User, query_users, query_users_batch, run_query_batch
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import users
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import assert_chain, prepare, run_in_threads, set_max_number, state

ROWS = 5_000
TICK = dt.timedelta(microseconds=1)  # the step that keeps the chain of query times strictly increasing


@pytest.fixture
def seeded(engine):
    seed_users(engine, ROWS)
    randomize_points(engine)
    return engine


def expected_answer(engine) -> list[tuple[int, int]]:
    """What the database says the answer is, computed independently of the core."""
    max_number = state(engine).max_number
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(users.c.id, users.c.points)
            .where(users.c.points > max_number)
            .order_by(users.c.id)
            .limit(2)
        ).all()
    return [tuple(row) for row in rows]


def test_first_query_ever_has_no_previous_timestamp(seeded):
    first = query_users(seeded)
    assert first.previous is None
    second = query_users(seeded)
    assert second.previous == first.recorded_at
    assert second.recorded_at > first.recorded_at
    assert state(seeded).last_query_at == second.recorded_at


def test_answer_is_the_lowest_ids_above_max_number(seeded):
    for max_number in (0, 37, 99):
        set_max_number(seeded, max_number)
        result = query_users(seeded)
        answer = [(user.id, user.points) for user in result.users]
        assert answer == expected_answer(seeded)
        assert len(answer) <= 2
        assert all(points > max_number for _, points in answer)
    assert len(query_users(seeded).users) == 2  # 99: about 50 of 5,000 users qualify


def test_the_answer_is_in_id_order_whatever_order_the_rows_were_written_in(engine):
    """PostgreSQL keeps a row's new version wherever there is room: the rows written last
    may come first in a scan. The answer is still the two lowest ids."""
    seed_users(engine, 50)
    set_max_number(engine, 0)
    with engine.begin() as conn:
        for user_id in (3, 2, 1):
            conn.execute(users.update().where(users.c.id == user_id).values(points=100))
    assert [(user.id, user.points) for user in query_users(engine).users] == [(1, 100), (2, 100)]


def test_nobody_exceeds_100(seeded):
    set_max_number(seeded, 100)
    assert query_users(seeded).users == ()


def test_api_body_shape(seeded):
    first = query_users(seeded).api_body()
    assert set(first) == {"users", "timestamp"}
    assert first["timestamp"] is None
    assert all(set(user) == {"id", "points"} for user in first["users"])
    second = query_users(seeded).api_body()
    assert len(second["timestamp"]) == len("2020-07-30 17:09:33Z")
    assert second["timestamp"].endswith("Z")


@pytest.mark.parametrize("users", [(), (User(id=1, points=30),), (User(id=1, points=30), User(id=72, points=100))])
@pytest.mark.parametrize("previous", [None, dt.datetime(2020, 7, 30, 17, 9, 33, 999_999, tzinfo=dt.UTC)])
def test_api_json_is_json_dumps_of_the_body(users, previous):
    recorded_at = dt.datetime.now(dt.UTC)
    result = QueryResult(users=users, previous=previous, recorded_at=recorded_at, epoch=1)
    assert result.api_json() == json.dumps(result.api_body())
    # The texts, not given, are made from the times.
    assert result.api_body()["timestamp"] == (None if previous is None else "2020-07-30 17:09:33Z")
    assert result.recorded_text == iso_text(recorded_at)


@pytest.mark.parametrize("moment", [
    dt.datetime(2020, 7, 30, 17, 9, 33, 999_999, tzinfo=dt.UTC), dt.datetime(2020, 7, 30, 17, 9, 33, tzinfo=dt.UTC),
    dt.datetime(2020, 7, 30, 19, 9, 33, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))), dt.datetime(1999, 12, 31, 23, 59, 59),
])
def test_the_api_timestamp_is_the_utc_time_in_whole_seconds(moment):
    utc = moment.astimezone(dt.UTC) if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    assert format_api_timestamp(moment) == utc.strftime("%Y-%m-%d %H:%M:%SZ")
    assert iso_text(moment) == utc.isoformat(timespec="microseconds")  # ".000000" on a whole second too


def test_a_batch_formats_each_time_as_its_results_carry_it(seeded):
    # run_query_batch() hands each result its times as text, made once per time for the batch.
    for results in (query_users_batch(seeded, 1), query_users_batch(seeded, 5)):
        for result in results:
            assert result.recorded_text == result.recorded_at.isoformat(timespec="microseconds")
            assert result.previous_text == (
                None if result.previous is None else result.previous.isoformat(timespec="microseconds"))
        assert [result.previous_text for result in results[1:]] == [result.recorded_text for result in results[:-1]]


def test_api_json_follows_the_users_it_is_given(seeded):
    # The users' JSON is rendered once per answer and reused; a new answer must never get the
    # rendering of an old one.
    cache = AnswerCache()
    for max_number in (0, 99, 100, 0):
        set_max_number(seeded, max_number)
        randomize_points(seeded)
        set_max_number(seeded, max_number)
        body = json.loads(query_users(seeded, cache).api_json())
        assert [(user["id"], user["points"]) for user in body["users"]] == expected_answer(seeded)


def test_a_clock_that_stepped_back_still_makes_a_strictly_increasing_chain(seeded):
    # The last query's time, recorded by a clock that has been set back by an hour since.
    future = utcnow() + dt.timedelta(hours=1)
    with seeded.begin() as conn:
        conn.execute(schema.query_state.update().values(last_query_at=future))
    first = query_users(seeded)
    assert (first.previous, first.recorded_at) == (future, future + TICK)  # a microsecond on
    batch = query_users_batch(seeded, 3)
    assert [result.recorded_at for result in batch] == [future + 2 * TICK, future + 3 * TICK, future + 4 * TICK]
    assert batch[0].previous == first.recorded_at


def test_sqlite_a_query_timed_before_a_reset_records_past_every_time_before_it(tmp_path, monkeypatch):
    """The chain starts over (no previous time), but time does not go back: a query whose time
    was taken before it waited behind the reset recorded a time earlier than ones already
    answered (a review). The last time recorded stays the floor, through several resets."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}"))
    schema.ensure_schema(engine)
    last = query_users(engine).recorded_at
    seed_users(engine, 10, reset=True)
    seed_users(engine, 10, reset=True)
    monkeypatch.setattr(query_module, "utcnow", lambda: last - dt.timedelta(seconds=1))  # taken before its wait
    first = query_users(engine)
    assert (first.previous, first.recorded_at) == (None, last + TICK)
    assert query_users(engine).previous == first.recorded_at
    engine.dispose()


def test_a_reset_keeps_no_floor_where_no_query_ever_was(engine):
    seed_users(engine, 10)
    seed_users(engine, 10, reset=True)
    with engine.connect() as conn:
        assert conn.execute(sa.select(schema.query_state.c.last_query_at, schema.query_state.c.previous_query_at)).one() == (None, None)


def test_a_reset_clears_a_time_recorded_by_a_clock_that_ran_ahead(seeded):
    """The floor a reset keeps is never ahead of now: a reset is how to start over after a
    clock that ran ahead, whose time every query would otherwise go past until it comes."""
    future = utcnow() + dt.timedelta(hours=1)
    with seeded.begin() as conn:
        conn.execute(schema.query_state.update().values(last_query_at=future))
    before_reset = utcnow()
    seed_users(seeded, 10, reset=True)
    first = query_users(seeded)
    assert first.previous is None and before_reset < first.recorded_at < future


@pytest.mark.parametrize(("ahead", "kept"), [(0.3, True), (1.8, False)])
def test_a_reset_keeps_a_time_less_than_a_second_ahead_only(seeded, ahead, kept):
    """The second of schema.forget_the_last_query: a time a little ahead of this clock (another
    daemon's clock, a small step) stays the floor; one further ahead is a clock that ran ahead,
    cleared. (1.8 s leaves the reset 0.8 s to happen in before the time comes within a second.)"""
    recorded = utcnow() + dt.timedelta(seconds=ahead)
    with seeded.begin() as conn:
        conn.execute(schema.query_state.update().values(last_query_at=recorded))
    seed_users(seeded, 10, reset=True)
    first = query_users(seeded)
    assert first.previous is None
    assert (first.recorded_at > recorded) is kept


def test_a_postgresql_session_in_another_time_zone_still_answers_in_utc(postgres_url):
    """A server's TimeZone is its initdb machine's zone unless set, and timestamptz comes back
    in it: the times read are the same instants, and the API's text is UTC's (a local time
    written with a "Z" would be 5:30 off here)."""
    url = sa.make_url(postgres_url)
    url = url.update_query_dict({"options": f"{url.query['options']} -ctimezone=Asia/Kolkata"})
    engine = db.create_engine(Settings(database_url=url.render_as_string(hide_password=False)))
    try:
        schema.ensure_schema(engine)
        seed_users(engine, 3)
        first, second = query_users(engine), query_users(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Kolkata"
    finally:
        engine.dispose()
    assert second.previous == first.recorded_at and second.previous.utcoffset() == dt.timedelta(0)
    shown = dt.datetime.strptime(json.loads(second.api_json())["timestamp"], "%Y-%m-%d %H:%M:%SZ")
    assert abs(shown.replace(tzinfo=dt.UTC) - utcnow()) < dt.timedelta(minutes=5)


def test_sqlite_records_the_time_the_query_was_sent(tmp_path, monkeypatch):
    """SQLite has no clock of its own here: the time is Python's, taken as the statement is
    sent (PostgreSQL's is the server's, so it cannot be pinned this way)."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}"))
    schema.ensure_schema(engine)
    now = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    monkeypatch.setattr(query_module, "utcnow", lambda: now)
    try:
        assert query_users(engine).recorded_at == now
        # The clock has not moved: each query of a batch a microsecond past the one before.
        assert [result.recorded_at for result in query_users_batch(engine, 3)] == [now + TICK, now + 2 * TICK, now + 3 * TICK]
    finally:
        engine.dispose()


def test_the_state_row_keeps_what_the_last_query_got(seeded):
    first = query_users(seeded)
    second = query_users(seeded)
    current = state(seeded)
    assert current.last_query_at == second.recorded_at
    assert current.previous_query_at == second.previous == first.recorded_at


def test_an_answered_batch_is_committed_and_holds_no_lock(seeded):
    runner = HeldConnection(seeded)  # holds its connection from batch to batch, as the batcher does
    try:
        results = run_query_batch(runner, 3)
        # Another connection, refusing to wait: the batch's transaction must be over.
        if seeded.dialect.name == "sqlite":
            other = sqlite3.connect(seeded.url.database, timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            other.close()
        else:
            with seeded.begin() as conn:
                conn.execute(sa.text("SELECT id FROM query_state FOR UPDATE NOWAIT"))
        assert state(seeded).last_query_at == results[-1].recorded_at
    finally:
        runner.release()


def test_concurrent_queries_form_a_chain(seeded):
    results = run_in_threads(lambda: query_users(seeded), threads=8, per_thread=25)
    assert len(results) == 200
    assert_chain(results)


CHAIN_SCRIPT = """
import sys
from maxtwo_cli.core import db
from maxtwo_cli.core.query import query_users
from maxtwo_cli.core.settings import Settings
engine = db.create_engine(Settings(database_url=sys.argv[1], statement_timeout=30.0))
for _ in range(30):
    result = query_users(engine)
    print(result.previous.isoformat() if result.previous else "None", result.recorded_at.isoformat())
"""


def test_queries_from_several_processes_form_a_chain(seeded, database_url):
    processes = [
        subprocess.Popen([sys.executable, "-c", CHAIN_SCRIPT, database_url], stdout=subprocess.PIPE, encoding="utf-8")
        for _ in range(3)
    ]
    pairs = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        pairs += [line.split() for line in out.splitlines()]
    assert len(pairs) == 90
    previous = [None if p == "None" else dt.datetime.fromisoformat(p) for p, _ in pairs]
    recorded = sorted(dt.datetime.fromisoformat(r) for _, r in pairs)
    assert previous.count(None) == 1
    assert sorted(p for p in previous if p is not None) == recorded[:-1]


def test_cache_serves_the_epoch_and_is_invalidated_by_another_process(seeded, database_url):
    set_max_number(seeded, 0)  # so that the answer is not empty (it would be at 100)
    cache = AnswerCache()
    first = query_users(seeded, cache)
    assert first.users
    assert [(u.id, u.points) for u in first.users] == expected_answer(seeded)
    # Change the users behind the cache's back without a new epoch: the cache answers, which
    # proves it is used (a real change always advances the epoch).
    with seeded.begin() as conn:
        conn.execute(users.update().values(points=0))
    assert query_users(seeded, cache).users == first.users

    subprocess.run(
        [sys.executable, "-m", "maxtwo_cli", "randomize", "--database-url", database_url],
        check=True,
        timeout=120,
    )
    after = query_users(seeded, cache)
    assert after.epoch == first.epoch + 1
    assert [(u.id, u.points) for u in after.users] == expected_answer(seeded)
    # The cache holds the new epoch's answer now (it kept the first epoch's, and every query
    # read the users again).
    assert cache.get() == (after.epoch, after.users)


def test_postgres_query_does_not_wait_for_a_running_randomization(postgres_engine):
    engine = postgres_engine
    seed_users(engine, ROWS)
    randomize_points(engine)
    old_epoch = state(engine).epoch
    gate_key = 424242  # an advisory lock this test holds: the randomization stops at it
    with engine.begin() as conn:
        # Hold the randomization open (its row locks taken) near its end, until the test says so.
        conn.execute(sa.text(
            "CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock({gate_key}); RETURN NEW; END $$"
        ))
        conn.execute(sa.text(
            "CREATE TRIGGER slow_last_row BEFORE UPDATE ON users FOR EACH ROW "
            f"WHEN (NEW.id = {ROWS}) EXECUTE FUNCTION slow_update()"
        ))
    # NOTE: ordering, not a stopwatch: the query must finish while the randomization is still
    # held at the gate. Had it waited for the randomization's locks, it could only have ended in
    # the statement timeout's error, since the gate opens after the query returns.
    with engine.connect() as gate:
        gate.execute(sa.select(sa.func.pg_advisory_lock(gate_key)))
        worker = threading.Thread(target=randomize_points, args=(engine,))
        worker.start()
        try:
            deadline = time.monotonic() + 60
            while not _waits_on_advisory_lock(gate) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _waits_on_advisory_lock(gate), "the randomization never reached the gate"
            during = query_users(engine)
            assert worker.is_alive()
        finally:
            gate.execute(sa.select(sa.func.pg_advisory_unlock(gate_key)))
            gate.commit()
            worker.join()
    assert during.epoch == old_epoch
    assert query_users(engine).epoch == old_epoch + 1


def _waits_on_advisory_lock(conn) -> bool:
    """Whether another backend is blocked on an advisory lock (the randomization at the gate)."""
    waiting = conn.scalar(sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
    ))
    conn.rollback()  # NOTE: pg_stat_activity is a snapshot per transaction; the lock is per session
    return bool(waiting)


def test_sqlite_query_does_not_wait_for_a_running_randomization(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url))
    schema.ensure_schema(engine)
    seed_users(engine, ROWS)
    randomize_points(engine)
    old = state(engine)
    old_answer = expected_answer(engine)
    randomizer = db.create_engine(Settings(database_url=url))
    gate, at_gate = threading.Event(), threading.Event()

    @sa.event.listens_for(randomizer, "after_cursor_execute")
    def _hold(_conn, _cursor, statement, *_args):
        # The users are updated, not committed: the main file's write lock is held.
        if statement.startswith("UPDATE users"):
            at_gate.set()
            gate.wait(60)

    worker = threading.Thread(target=randomize_points, args=(randomizer,))
    worker.start()
    try:
        assert at_gate.wait(60), "the randomization never reached the gate"
        # NOTE: ordering, not a stopwatch: had the query waited for the randomization's lock,
        # it could only have ended in the busy timeout's error (the gate opens after it).
        during = query_users(engine)
        assert worker.is_alive()
    finally:
        gate.set()
        worker.join()
    # The last committed snapshot: users and max_number of one epoch, the old one.
    assert during.epoch == old.epoch
    assert [(user.id, user.points) for user in during.users] == old_answer
    after = query_users(engine)
    assert after.epoch == old.epoch + 1 and after.previous == during.recorded_at
    assert (tmp_path / "maxtwo.db-query").exists()
    engine.dispose()
    randomizer.dispose()


def test_sqlite_query_waits_for_the_query_state_lock_without_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url, statement_timeout=10.0))
    schema.ensure_schema(engine)
    seed_users(engine, 100)
    holder = db.create_engine(Settings(database_url=url))
    with holder.begin() as conn:  # another writer of the query state, holding its lock
        conn.execute(schema.query_state.update().values(last_query_at=None))
        worker_result = []
        worker = threading.Thread(target=lambda: worker_result.append(query_users(engine)))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive()  # waiting, not failed
    worker.join(10)
    assert worker_result and worker_result[0].previous is None
    engine.dispose()
    holder.dispose()


def test_sqlite_a_query_waiting_for_a_reset_answers_from_the_users_it_made(tmp_path):
    """A query takes its snapshot of the users, then waits for the query state's lock, which
    `seed --reset` holds: it answered the replaced users with the reset's "no previous time",
    recorded at the time it was sent, before queries answered earlier (a review)."""
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url, statement_timeout=30.0))
    schema.ensure_schema(engine)
    seed_users(engine, ROWS)
    randomize_points(engine)
    set_max_number(engine, 0)
    before = query_users(engine)
    assert len(before.users) == 2  # randomized: the old users answer
    resetter = db.create_engine(Settings(database_url=url))
    waiting: list[threading.Thread] = []
    results: list[QueryResult] = []
    resumed_at: list[dt.datetime] = []

    def query_while_the_reset_holds_its_locks(done: int, _total: int) -> None:
        if waiting:
            return
        worker = threading.Thread(target=lambda: results.append(query_users(engine)))
        waiting.append(worker)
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive()  # ordering: its snapshot is taken; it waits for the lock
        resumed_at.append(utcnow())  # the reset goes on to commit from here

    reset = seed_users(resetter, 3, reset=True, on_progress=query_while_the_reset_holds_its_locks)
    waiting[0].join(30)
    [during] = results
    assert (during.users, during.previous, during.epoch) == ((), None, reset.epoch)
    assert during.recorded_at > resumed_at[0] > before.recorded_at  # not its stale send time
    after = query_users(engine)
    assert after.previous == during.recorded_at
    engine.dispose()
    resetter.dispose()


def test_sqlite_a_query_state_newer_than_the_users_is_taken_as_it_is(tmp_path):
    """The query-state file ahead of the main file (an older copy of the main file restored):
    queries still answer, from the users there are, and the two agree again from then on."""
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url))
    schema.ensure_schema(engine)
    seed_users(engine, ROWS)
    randomize_points(engine)
    epoch = state(engine).epoch
    with sqlite3.connect(tmp_path / "maxtwo.db-query") as restored:
        restored.execute("UPDATE query_state SET users_epoch = ?", (epoch + 1000,))
    first = query_users(engine)
    assert first.epoch == epoch
    assert [(user.id, user.points) for user in first.users] == expected_answer(engine)
    with sqlite3.connect(tmp_path / "maxtwo.db-query") as check:
        assert check.execute("SELECT users_epoch FROM query_state").fetchall() == [(epoch,)]
    assert query_users(engine).previous == first.recorded_at
    engine.dispose()


def test_a_query_that_waits_too_long_for_a_lock_says_so_and_the_next_one_works(database_url):
    prepare(database_url, 100)
    engine = db.create_engine(Settings(database_url=database_url, statement_timeout=0.3))
    holder = db.create_engine(Settings(database_url=database_url))
    runner = HeldConnection(engine)
    with holder.begin() as conn:  # the lock a query needs, held past its timeout
        conn.execute(schema.query_state.update().values(last_query_at=None))
        with pytest.raises(DatabaseUnavailableError) as failed:
            run_query_batch(runner, 1)
    assert ("stayed locked" if database_url.startswith("sqlite") else "did not answer in time") \
        in str(failed.value)
    if database_url.startswith("postgresql"):
        with engine.connect() as conn:  # the pool got back the connection as it lent it out
            assert conn.connection.driver_connection.autocommit is False
    assert run_query_batch(runner, 1)[0].previous is None
    runner.release()
    engine.dispose()
    holder.dispose()


def test_a_deadlock_or_a_lock_timeout_is_not_blamed_on_the_url(postgres_engine):
    """Both are OperationalErrors in psycopg, like a refused connection; the advice differs."""
    with postgres_engine.begin() as conn:
        conn.execute(schema.query_state.update().values(last_query_at=None))
        with pytest.raises(DatabaseUnavailableError) as timed_out, db.database_errors(postgres_engine), \
                postgres_engine.begin() as other:
            other.execute(sa.text("SET LOCAL lock_timeout = '50ms'"))
            other.execute(schema.query_state.update().values(last_query_at=None))
    assert "did not grant a lock in time" in str(timed_out.value)
    assert "URL" not in str(timed_out.value)

    first, second = postgres_engine.connect(), postgres_engine.connect()
    first.execute(sa.text("CREATE TABLE pair (id int PRIMARY KEY)"))
    first.execute(sa.text("INSERT INTO pair VALUES (1), (2)"))
    first.commit()
    first.execute(sa.text("UPDATE pair SET id = id WHERE id = 1"))
    second.execute(sa.text("UPDATE pair SET id = id WHERE id = 2"))
    errors: list[Exception] = []

    def take(conn, row: int) -> None:
        try:
            with db.database_errors(postgres_engine):
                conn.execute(sa.text("UPDATE pair SET id = id WHERE id = :row"), {"row": row})
        except DatabaseUnavailableError as ex:
            errors.append(ex)
        conn.rollback()

    crossing = threading.Thread(target=take, args=(first, 2))
    crossing.start()
    take(second, 1)
    crossing.join(30)
    first.close()
    second.close()
    assert len(errors) == 1, errors  # PostgreSQL fails one of the two
    assert "rolled the transaction back" in str(errors[0]) and "deadlock detected" in str(errors[0])
    assert "URL" not in str(errors[0])


def test_a_statement_refuses_a_parameter_it_does_not_have():
    # A misspelt parameter would otherwise be dropped silently, and the one meant sent as NULL.
    with pytest.raises(TypeError, match=r"unknown parameters \['nonsense'\]"):
        query_module._SQLITE_STATEMENT.parameters(count=1, nonsense=2)
