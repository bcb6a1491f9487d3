from __future__ import annotations

import collections
import datetime as dt
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from maxtwo_cli.core import db, schema
from maxtwo_cli.core import randomize as randomize_module
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.errors import DatabaseBusyError, MaxtwoError, RandomizationInProgressError
from maxtwo_cli.core.randomize import RANDOMIZE_LOCK_KEY, RandomizeResult, randomize_if_due, randomize_points
from maxtwo_cli.core.schema import MAX_POINTS, draw_max_number
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.conftest import fresh_schema, is_postgres_url
from tests.helpers import distinct_updated_at, points_histogram, prepare, state, user_rows

ROWS = 20_000


@pytest.fixture
def seeded(engine):
    seed_users(engine, ROWS)
    return engine


def test_points_cover_0_to_100_and_nothing_else(seeded):
    result = randomize_points(seeded)
    assert result.rows == ROWS
    histogram = points_histogram(seeded)
    # With 20,000 rows, a value is missing with probability (100/101)**20000 < 1e-86.
    assert sorted(histogram) == list(range(101))
    assert sum(histogram.values()) == ROWS


def test_points_are_uniform_chi_square(seeded):
    randomize_points(seeded)
    histogram = points_histogram(seeded)
    expected = ROWS / 101
    chi_square = sum((histogram.get(value, 0) - expected) ** 2 / expected for value in range(101))
    # 100 degrees of freedom: mean 100, sd 14. P(chi2 > 200) is about 1e-8, so this never
    # flakes, yet a biased generator (e.g. floor(random()*100), which never yields 100) fails.
    assert chi_square < 200


def test_the_two_ends_are_as_likely_as_any_other_value(seeded):
    """round(random() * 100) gives 0 and 100 half the weight of the others: the chi-square bound
    above catches that only about half the time (its statistic is near 200 then)."""
    randomize_points(seeded)
    histogram = points_histogram(seeded)
    # Uniform: 0 and 100 together expected 396 times in 20,000 (sd 20), so below 300 has a
    # probability near 1e-6; with half the weight each they come about 198 times together.
    assert histogram.get(0, 0) + histogram.get(MAX_POINTS, 0) > 300


def test_max_number_is_drawn_from_0_to_100():
    # 20,000 draws: a value missing with probability below 101 * (100/101)**20000, about 1e-84.
    assert {draw_max_number() for _ in range(20_000)} == set(range(MAX_POINTS + 1))


def test_max_number_is_uniform_chi_square():
    """Every value present is not enough: min(randbelow(102), 100) covers them all with 100
    twice as likely (statistic near 1,100 then; a review's mutant)."""
    draws = 101_000
    histogram = collections.Counter(draw_max_number() for _ in range(draws))
    expected = draws / 101
    chi_square = sum((histogram.get(value, 0) - expected) ** 2 / expected for value in range(101))
    assert chi_square < 200  # as for the points: P(chi2 > 200) about 1e-8 at 100 degrees of freedom


def test_one_updated_at_for_all_rows_and_it_moves(seeded):
    seeded_at = distinct_updated_at(seeded)
    result = randomize_points(seeded)
    after = distinct_updated_at(seeded)
    assert len(after) == 1
    assert after != seeded_at
    assert after[0] == result.randomized_at == state(seeded).randomized_at


def test_epoch_increments_and_max_number_is_redrawn(seeded):
    before = state(seeded)
    numbers = set()
    for run in range(1, 6):
        result = randomize_points(seeded)
        assert result.epoch == before.epoch + run
        numbers.add(state(seeded).max_number)
    # Five draws from 0..100 all equal: probability 101**-4, about 1e-8.
    assert len(numbers) > 1
    assert all(0 <= number <= 100 for number in numbers)


def test_concurrent_randomizations_serialise(seeded):
    before = state(seeded).epoch
    errors = []

    def run() -> None:
        try:
            randomize_points(seeded)
        except MaxtwoError as ex:  # pragma: no cover - reported below
            errors.append(ex)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert state(seeded).epoch == before + 3
    assert len(distinct_updated_at(seeded)) == 1


def _install_failing_trigger(engine, database_url: str, fail_at_id: int) -> None:
    """A test-only trigger: the UPDATE of one row part way through the table fails."""
    with engine.begin() as conn:
        if is_postgres_url(database_url):
            conn.execute(sa.text(
                "CREATE FUNCTION fail_update() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$"
            ))
            conn.execute(sa.text(
                "CREATE TRIGGER fail_part_way BEFORE UPDATE ON users FOR EACH ROW "
                f"WHEN (NEW.id = {fail_at_id}) EXECUTE FUNCTION fail_update()"
            ))
        else:
            conn.execute(sa.text(
                "CREATE TRIGGER fail_part_way BEFORE UPDATE ON users FOR EACH ROW "
                f"WHEN NEW.id = {fail_at_id} BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
            ))


def test_a_randomization_that_fails_part_way_changes_nothing(seeded, database_url):
    randomize_points(seeded)
    before_rows = user_rows(seeded)
    before_state = state(seeded)
    _install_failing_trigger(seeded, database_url, fail_at_id=ROWS // 2)

    with pytest.raises(MaxtwoError, match="injected failure"):
        randomize_points(seeded)

    assert user_rows(seeded) == before_rows
    assert state(seeded) == before_state


def test_a_randomization_whose_connection_is_killed_changes_nothing(postgres_engine):
    """PostgreSQL only: SQLite has no server connection to kill (the trigger test covers it)."""
    seeded = postgres_engine
    seed_users(seeded, ROWS)
    before_rows = user_rows(seeded)
    before_state = state(seeded)
    with seeded.begin() as conn:
        # Slow down one row in the middle so the UPDATE is surely running when it is killed.
        conn.execute(sa.text(
            "CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(30); RETURN NEW; END $$"
        ))
        conn.execute(sa.text(
            "CREATE TRIGGER slow_part_way BEFORE UPDATE ON users FOR EACH ROW "
            f"WHEN (NEW.id = {ROWS // 2}) EXECUTE FUNCTION slow_update()"
        ))
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_try(randomize_points, seeded)))
    worker.start()
    deadline = time.monotonic() + 20
    killed = False
    while not killed and time.monotonic() < deadline:
        time.sleep(0.1)
        with seeded.connect() as conn:
            killed = bool(conn.scalar(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'UPDATE users SET points%' AND state = 'active' "
                "AND pid <> pg_backend_pid()"
            )))
    worker.join(30)
    assert killed
    assert isinstance(outcome[0], MaxtwoError)
    assert user_rows(seeded) == before_rows
    assert state(seeded) == before_state


def _try(function, *args):
    try:
        return function(*args)
    except MaxtwoError as ex:
        return ex


def test_randomize_if_due_runs_once_per_slot(seeded):
    due_at = utcnow()
    first = randomize_if_due(seeded, due_at=due_at, interval=60)
    assert first is not None and first.rows == ROWS
    assert 0 < first.seconds < 30  # the run's own time (the scheduler's histogram, its warning)
    # The same slot again (another daemon arriving late): not due.
    assert randomize_if_due(seeded, due_at=due_at, interval=60) is None
    # The next slot is due.
    assert randomize_if_due(seeded, due_at=due_at + dt.timedelta(seconds=60), interval=60) is not None
    assert state(seeded).epoch == first.epoch + 1


@pytest.mark.parametrize("before_the_boundary", [30, 1])
def test_a_manual_run_does_not_stand_in_for_the_scheduled_one(seeded, before_the_boundary):
    manual = randomize_points(seeded)  # `maxtwo randomize`, shortly before the next boundary
    due_at = manual.randomized_at + dt.timedelta(seconds=before_the_boundary)
    scheduled = randomize_if_due(seeded, due_at=due_at, interval=60)
    assert scheduled is not None and scheduled.epoch == manual.epoch + 1
    assert randomize_if_due(seeded, due_at=due_at, interval=60) is None


def test_the_slot_is_the_daemons_boundary_not_the_databases_clock(postgres_engine, monkeypatch):
    # A daemon whose clock is ahead of the database server's (or behind) still runs once per
    # slot. (On SQLite the database's clock is the daemon's: the host's.)
    seed_users(postgres_engine, 100)
    far = utcnow() + dt.timedelta(minutes=10)
    monkeypatch.setattr(randomize_module, "utcnow", lambda: far)  # the daemon's clock
    assert randomize_if_due(postgres_engine, due_at=far, interval=60) is not None
    assert randomize_if_due(postgres_engine, due_at=far, interval=60) is None
    assert randomize_if_due(postgres_engine, due_at=far + dt.timedelta(seconds=60), interval=60) is not None
    assert randomize_if_due(postgres_engine, due_at=far + dt.timedelta(seconds=60.001), interval=60) is None


def test_sqlite_a_run_that_waited_for_the_lock_finds_the_slot_recorded_meanwhile(tmp_path):
    """Another daemon holds the write lock past this run's boundary and records a later slot:
    once it has the lock, this run stands back. With the clock read before it waited, that slot
    looked recorded by a clock that was ahead: the run went ahead, randomized a second time in
    the interval and moved scheduled_for back (a review)."""
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=30.0))
    schema.ensure_schema(engine)
    seed_users(engine, 100)
    interval = 2.0
    due_at = utcnow()
    later_slot = due_at + dt.timedelta(seconds=2 * interval)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE randomizer_state SET scheduled_for = ?", (schema.to_microseconds(later_slot),))
    outcome: list[RandomizeResult | None] = []
    late = threading.Thread(target=lambda: outcome.append(randomize_if_due(engine, due_at=due_at, interval=interval)))
    late.start()
    time.sleep(interval + 0.5)  # past the time it would have taken for "an interval ahead"
    assert late.is_alive()  # ordering: it waits for the lock
    holder.execute("COMMIT")
    holder.close()
    late.join(30)
    assert outcome == [None]
    with engine.connect() as conn:
        assert conn.scalar(sa.select(schema.randomizer_state.c.scheduled_for)) == later_slot
    engine.dispose()


def test_sqlite_a_randomization_that_waited_for_the_lock_records_when_it_ran(tmp_path):
    """Its time is read once it holds the write lock: read before, a run that waited recorded
    a time older than the one that committed ahead of it."""
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=30.0))
    schema.ensure_schema(engine)
    seed_users(engine, 100)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcome: list[RandomizeResult] = []
    waiting = threading.Thread(target=lambda: outcome.append(randomize_points(engine)))
    waiting.start()
    time.sleep(1.0)
    assert waiting.is_alive()  # ordering: it waits for the lock
    released_at = utcnow()
    holder.execute("COMMIT")
    holder.close()
    waiting.join(30)
    # (SQLite's clock counts milliseconds: a little slack below.)
    assert outcome[0].randomized_at > released_at - dt.timedelta(milliseconds=50)
    assert distinct_updated_at(engine) == [outcome[0].randomized_at]
    engine.dispose()


@pytest.mark.parametrize("ahead", [dt.timedelta(days=365), dt.timedelta(minutes=5), dt.timedelta(seconds=90)])
def test_a_slot_recorded_by_a_clock_that_was_ahead_stands_in_for_no_later_one(seeded, ahead):
    """A daemon's clock a year ahead for a few seconds (set back since) recorded a slot a year
    away, and every daemon took each slot until then for done: no randomization for a year.
    More than one interval ahead is that already (5 minutes: five slots lost; 90 s: one)."""
    now = utcnow()
    assert randomize_if_due(seeded, due_at=now + ahead, interval=60) is not None
    assert randomize_if_due(seeded, due_at=now, interval=60) is not None
    assert randomize_if_due(seeded, due_at=now, interval=60) is None  # and once only

def test_a_run_that_comes_late_finds_the_later_slots_done(seeded):
    # Its daemon paused for minutes (SIGSTOP, a paused VM) while the others ran on: it must not
    # randomize a second time in the interval, nor make the next slot run again.
    now = utcnow()
    for minutes in (3, 2, 1, 0):
        assert randomize_if_due(seeded, due_at=now - dt.timedelta(minutes=minutes), interval=60) is not None
    assert randomize_if_due(seeded, due_at=now - dt.timedelta(minutes=3), interval=60) is None
    assert randomize_if_due(seeded, due_at=now, interval=60) is None


def test_a_scheduled_run_longer_than_the_interval_completes(seeded):
    # A table that takes longer to randomize than the interval is randomized at every other
    # slot (the one due meanwhile skips). On PostgreSQL the run's statements were bounded by the
    # interval: cancelled every time, such a table was never randomized again.
    result = randomize_if_due(seeded, due_at=utcnow(), interval=0.001)
    assert result is not None and result.rows == ROWS and result.seconds > 0.001


def test_a_randomization_is_not_bound_by_the_requests_statement_timeout(postgres_url):
    """`maxtwo randomize` and the scheduled run lift the statement timeout that bounds the
    requests: a table too large to randomize within it was never randomized."""
    prepare(postgres_url, 10)
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=0.5))
    with engine.begin() as conn:  # 10 rows at 0.1 s each: 1 s, twice the statement timeout
        conn.execute(sa.text("CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN PERFORM pg_sleep(0.1); RETURN NEW; END $$"))
        conn.execute(sa.text("CREATE TRIGGER slow_rows BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION slow_row()"))
    try:
        assert randomize_points(engine).rows == 10
        assert randomize_if_due(engine, due_at=utcnow(), interval=60).rows == 10
    finally:
        engine.dispose()


def test_a_randomization_waits_for_a_lock_no_longer_than_the_long_jobs_lock_timeout(postgres_engine, monkeypatch):
    """No statement timeout for a randomization, but a bound on its lock waits: without it, a
    session holding the users table (a stray LOCK TABLE, a long ALTER) held `maxtwo randomize`
    and the scheduler's job for ever."""
    seed_users(postgres_engine, 10)
    monkeypatch.setattr(db, "LONG_JOB_LOCK_TIMEOUT", 0.3)
    with postgres_engine.connect() as holder:
        holder.execute(sa.text("LOCK TABLE users IN ACCESS EXCLUSIVE MODE"))
        runner, outcome = in_a_thread(lambda: randomize_points(postgres_engine))
        runner.join(5)
        still_waiting = runner.is_alive()
        holder.rollback()
        runner.join(10)
    assert not still_waiting
    assert isinstance(outcome.get("error"), DatabaseBusyError), outcome


def test_randomize_if_due_on_a_fresh_database(engine):
    assert randomize_if_due(engine, due_at=utcnow(), interval=1) is not None


def test_randomize_if_due_stands_back_while_another_run_holds_the_lock(postgres_engine):
    seed_users(postgres_engine, 100)
    due_at = utcnow()
    with postgres_engine.connect() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        # Another daemon's run holds the lock past the half of the slot: it is left to that run.
        # NOTE: no stopwatch needed: the lock's holder is this very thread.
        with pytest.raises(RandomizationInProgressError):
            randomize_if_due(postgres_engine, due_at=due_at - dt.timedelta(seconds=31), interval=60)


def test_a_deployment_in_another_schema_does_not_wait_for_this_one(postgres_engine, postgres_server):
    """Advisory locks are the database's: two deployments in two schemas of one database
    (search_path) must not take each other's runs for their own."""
    seed_users(postgres_engine, 100)
    with fresh_schema(postgres_server) as other_url:
        other = db.create_engine(Settings(database_url=other_url))
        try:
            schema.ensure_schema(other)
            with other.connect() as holder:  # the other deployment's run, in progress
                holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
                result = randomize_if_due(postgres_engine, due_at=utcnow() - dt.timedelta(seconds=29), interval=60)
            assert result is not None and result.waited == 0
        finally:
            other.dispose()


def in_a_thread(call) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as ex:  # noqa: BLE001 - handed to the test
            outcome["error"] = ex

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("holder_commits", [None, "this slot", "the slot before"])
def test_randomize_if_due_waits_for_the_run_that_holds_the_lock(postgres_engine, holder_commits):
    """The others stood back at once: a run that then rolled back (its daemon stopped mid-run)
    left its slot without a run on every daemon (an audit). They wait for its end now, and stand
    back if it committed: this slot, or the slot before, late (then this slot is skipped as an
    overlap, as on one daemon: two runs in one interval otherwise)."""
    seed_users(postgres_engine, 100)
    due_at = utcnow()
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        waiter, outcome = in_a_thread(lambda: randomize_if_due(postgres_engine, due_at=due_at, interval=60))
        time.sleep(0.5)
        assert waiter.is_alive()  # waiting, not standing back
        epoch = state(postgres_engine).epoch
        if holder_commits is None:
            holder.rollback()
        else:
            slot = due_at if holder_commits == "this slot" else due_at - dt.timedelta(seconds=60)
            randomize_module.randomize_in_transaction(holder, slot=(slot, 60))
            holder.commit()
        released_at = utcnow()
        waiter.join(10)
    if holder_commits is not None:
        assert outcome == {"result": None} and state(postgres_engine).epoch == epoch + 1
    else:
        # That run rolled back: the slot is still due, and run; the time recorded is the run's,
        # not the start of the transaction that waited.
        assert outcome["result"] is not None and state(postgres_engine).epoch == epoch + 1
        assert outcome["result"].randomized_at >= released_at - dt.timedelta(seconds=0.2)
        assert outcome["result"].seconds < 5  # the wait is no part of the run's time
        assert 0.5 <= outcome["result"].waited < 10  # but said apart (the join's bound)


def test_the_wait_is_no_transaction_s_timeout(postgres_engine, postgres_url):
    """A role's transaction_timeout (PostgreSQL 17 on) ended the waiting transaction as the
    lock came free, and the slot failed on that daemon (a review)."""
    seed_users(postgres_engine, 100)
    url = sa.make_url(postgres_url)
    if postgres_engine.dialect.server_version_info >= (17,):  # (unknown before: refused)
        url = url.update_query_dict({"options": f"{url.query['options']} -ctransaction_timeout=1000"})
    waiting_engine = db.create_engine(Settings(database_url=url.render_as_string(hide_password=False)))
    due_at = utcnow()
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        waiter, outcome = in_a_thread(lambda: randomize_if_due(waiting_engine, due_at=due_at, interval=60))
        time.sleep(1.5)  # past the role's transaction_timeout
        holder.rollback()
        waiter.join(10)
    waiting_engine.dispose()
    assert outcome.get("result") is not None, outcome


@pytest.mark.parametrize("lock_let_go", [False, True])
def test_a_stop_request_ends_the_wait_for_another_process_s_run(postgres_engine, lock_let_go):
    """The wait went on to the half of the slot (up to 30 s) after SIGTERM, and the stopping
    daemon could start a run once the lock came free (a review). `lock_let_go`: the holder rolls
    back as the stop comes, so that the wait ends with the lock granted to a stopping process."""
    seed_users(postgres_engine, 100)
    stop = threading.Event()
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        epoch = state(postgres_engine).epoch
        waiter, outcome = in_a_thread(
            lambda: randomize_if_due(postgres_engine, due_at=utcnow(), interval=60, stopping=stop.is_set))
        time.sleep(0.3)
        stopped_at = time.monotonic()
        stop.set()
        if lock_let_go:
            holder.rollback()
        waiter.join(10)
        ended_after = time.monotonic() - stopped_at
    error = outcome.get("error")
    assert isinstance(error, RandomizationInProgressError) and error.stopping, outcome
    assert ended_after < 2.5  # a lock wait of a second at most at a time
    assert state(postgres_engine).epoch == epoch  # no run, the lock granted or not


def test_randomize_if_due_waits_no_longer_than_the_half_of_the_slot(postgres_engine):
    seed_users(postgres_engine, 100)
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        started = time.monotonic()
        waiter, outcome = in_a_thread(lambda: randomize_if_due(postgres_engine, due_at=utcnow(), interval=2))
        waiter.join(10)
        waited = time.monotonic() - started
    assert isinstance(outcome.get("error"), RandomizationInProgressError)
    assert 0.9 <= waited < 5  # up to the half of its 2 s slot (1 s after due_at, which is now)


def test_the_wait_leaves_the_connection_s_lock_timeout_as_it_was(postgres_url):
    """The wait sets lock_timeout a second at a time for its transaction only: set for the
    session, it stayed on the pooled connection (a millisecond, for the last slice), and the
    requests that later used it failed on any lock wait."""
    engine = db.create_engine(Settings(database_url=postgres_url), pool_size=1)
    schema.ensure_schema(engine)
    seed_users(engine, 10)
    try:
        with engine.connect() as conn:
            before = conn.scalar(sa.text("SHOW lock_timeout"))
        holder_engine = db.create_engine(Settings(database_url=postgres_url), pool_size=1)
        try:
            with holder_engine.connect() as holder:
                holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
                waiter, outcome = in_a_thread(lambda: randomize_if_due(engine, due_at=utcnow(), interval=60))
                time.sleep(0.3)
                holder.rollback()
                waiter.join(10)
        finally:
            holder_engine.dispose()
        assert outcome.get("result") is not None and outcome["result"].waited > 0, outcome
        with engine.connect() as conn:  # the one pooled connection, which waited
            assert conn.scalar(sa.text("SHOW lock_timeout")) == before
    finally:
        engine.dispose()


def test_a_run_for_the_slot_before_that_commits_as_the_lock_is_tried_is_seen(postgres_engine):
    """The slot recorded is read in the lock's try statement: read in a statement after it,
    a run late for the slot before that committed in between seemed to have rolled back, and
    this slot ran too: two randomizations in one interval."""
    seed_users(postgres_engine, 100)
    due_at = utcnow()
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        randomize_module.randomize_in_transaction(holder, slot=(due_at - dt.timedelta(seconds=60), 60))
        epoch = state(postgres_engine).epoch

        def commit_after_the_try(conn, cursor, statement, parameters, context, executemany):
            if "pg_try_advisory_xact_lock" in statement and holder.in_transaction():
                holder.commit()  # the late run commits just after the lock's try

        sa.event.listen(postgres_engine, "after_cursor_execute", commit_after_the_try)
        try:
            outcome = randomize_if_due(postgres_engine, due_at=due_at, interval=60)
        finally:
            sa.event.remove(postgres_engine, "after_cursor_execute", commit_after_the_try)
    assert outcome is None
    assert state(postgres_engine).epoch == epoch + 1


def test_an_error_other_than_the_lock_timeout_ends_the_wait(postgres_engine):
    """Only the lock_timeout of a slice is waited through: a cancelled wait (an operator's
    pg_cancel_backend) is the run's failure, not more waiting."""
    seed_users(postgres_engine, 100)
    with postgres_engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
        waiter, outcome = in_a_thread(lambda: randomize_if_due(postgres_engine, due_at=utcnow(), interval=60))
        cancelled = False
        deadline = time.monotonic() + 5
        while not cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
            cancelled = bool(holder.scalar(sa.text(
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid()")))
        waiter.join(5)
        still_waiting = waiter.is_alive()
        holder.rollback()
        waiter.join(10)
    assert cancelled and not still_waiting
    assert isinstance(outcome.get("error"), MaxtwoError), outcome
