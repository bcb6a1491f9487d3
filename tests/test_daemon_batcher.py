"""daemon/batcher.py: group commit on real databases, GET /'s queries and other kinds."""

from __future__ import annotations

import contextlib
import itertools
import select
import sqlite3
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from daemon import batcher as batcher_module
from daemon.batcher import Batcher, QueryKind
from maxtwo_cli.core import batch as batch_module
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.batch import HeldConnection
from maxtwo_cli.core.errors import DatabaseBusyError, DatabaseUnavailableError, MaxtwoError
from maxtwo_cli.core.query import AnswerCache, QueryResult, query_users, query_users_batch, run_query_batch
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import assert_chain, prepare, run_in_threads, stalled_batchers, state, wait_for


@pytest.fixture
def seeded(engine):
    seed_users(engine, 1000)
    randomize_points(engine)
    return engine


def test_a_batch_is_a_chain_in_one_transaction(seeded):
    before = query_users(seeded)
    batch = query_users_batch(seeded, 5)
    assert batch[0].previous == before.recorded_at
    for earlier, later in itertools.pairwise(batch):
        assert later.previous == earlier.recorded_at
        assert later.recorded_at > earlier.recorded_at
    assert len({result.users for result in batch}) == 1
    assert state(seeded).last_query_at == batch[-1].recorded_at
    assert query_users(seeded).previous == batch[-1].recorded_at


def test_batch_count_must_be_positive(seeded):
    with pytest.raises(ValueError):
        query_users_batch(seeded, 0)


def test_a_runner_holds_one_connection_from_batch_to_batch_until_released(seeded):
    runner = HeldConnection(seeded)
    first = run_query_batch(runner, 2)
    assert seeded.pool.checkedout() == 1
    second = run_query_batch(runner, 3)
    assert seeded.pool.checkedout() == 1
    assert_chain([*first, *second])
    runner.release()
    assert seeded.pool.checkedout() == 0
    runner.release()  # twice is harmless


def test_a_runner_gives_its_connection_back_when_work_outside_a_transaction_fails(seeded):
    """Not a driver's error (a bug in the work, an interrupt): what the connection was left in
    is unknown, so it goes back to the pool (which rolls it back) rather than on to the next run."""
    runner = HeldConnection(seeded)
    runner.run(lambda cursor: cursor.execute("SELECT 1").fetchall())
    assert runner.held

    def fails_after_a_statement(cursor):
        cursor.execute("SELECT 1")
        raise ValueError("a bug in the work")

    with pytest.raises(ValueError):
        runner.run(fails_after_a_statement)
    assert not runner.held and seeded.pool.checkedout() == 0
    runner.release()


def terminate_and_wait_until_told(connection) -> None:
    """The server ends `connection`'s session, as a restart would; returns once its message
    has arrived."""
    with connection_to_the_same_server(connection) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (connection.info.backend_pid,))
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    assert poller.poll(10_000), "the server never said it closed the connection"


@contextlib.contextmanager
def connection_to_the_same_server(connection):
    other = psycopg.connect(connection.info.dsn + f" password={connection.info.password}", autocommit=True)
    try:
        yield other
    finally:
        other.close()


@pytest.mark.parametrize("pre_ping", [True, False])
def test_a_runner_replaces_a_connection_the_server_closed_while_it_was_held(postgres_url, pre_ping):
    engine = db.create_engine(Settings(database_url=postgres_url), pre_ping=pre_ping)
    try:
        schema.ensure_schema(engine)
        seed_users(engine, 100)
        runner = HeldConnection(engine)
        before = run_query_batch(runner, 1)[0]
        held = runner._pooled.driver_connection
        terminate_and_wait_until_told(held)
        # Found before use: no batch fails for it (it used to: a 503 for all of its requests).
        after = run_query_batch(runner, 1)[0]
        assert runner._pooled.driver_connection is not held and after.previous == before.recorded_at
        runner.release()
    finally:
        engine.dispose()


def test_a_commit_fails_on_the_connection_it_was_to_end(postgres_url):
    # The server closes the connection after the transaction's last statement: the COMMIT must
    # fail (an unknown outcome), not run on a fresh connection, where it would commit nothing
    # and say it did.
    engine = db.create_engine(Settings(database_url=postgres_url), pre_ping=False)
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        with pytest.raises(DatabaseUnavailableError), runner.transaction():
            insert_note(runner, "lost")
            terminate_and_wait_until_told(runner._pooled.driver_connection)
        assert notes(engine) == set()
    finally:
        runner.release()
        NOTES.drop(engine)
        engine.dispose()


def assert_nothing_committed_and_the_next_runs(runner: HeldConnection, engine) -> None:
    """After a transaction that failed: none of it is in the table, and the next one commits."""
    assert notes(engine) == set()
    with runner.transaction():
        insert_note(runner, "next")
    assert notes(engine) == {"next"}


def test_nothing_more_of_a_transaction_runs_once_its_connection_is_lost(postgres_url):
    # A caller that caught a statement's error inside transaction() and went on would otherwise
    # run the rest on a fresh connection, each statement committed by itself, and then send the
    # COMMIT there, which commits nothing and succeeds.
    engine = db.create_engine(Settings(database_url=postgres_url), pre_ping=False)
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        with pytest.raises(DatabaseUnavailableError, match="lost during a transaction"), runner.transaction():
            insert_note(runner, "first")
            terminate_and_wait_until_told(runner._pooled.driver_connection)
            with pytest.raises(DatabaseUnavailableError):
                insert_note(runner, "second")
            with pytest.raises(DatabaseUnavailableError, match="lost during a transaction"):
                insert_note(runner, "third")
        assert_nothing_committed_and_the_next_runs(runner, engine)
    finally:
        runner.release()
        NOTES.drop(engine)
        engine.dispose()


def test_a_transaction_whose_statement_failed_commits_nothing_even_if_its_caller_went_on(engine):
    # PostgreSQL takes the COMMIT of a transaction whose statement failed as a ROLLBACK, and
    # reports success: a caller that caught the error and went on would be told all committed.
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        with pytest.raises(MaxtwoError, match="nothing of it was committed"), runner.transaction():
            insert_note(runner, "first")
            with pytest.raises(MaxtwoError):
                insert_note(runner, "first")
            with pytest.raises(MaxtwoError, match="nothing of it was committed"):
                insert_note(runner, "second")
        assert_nothing_committed_and_the_next_runs(runner, engine)
    finally:
        runner.release()
        NOTES.drop(engine)


def test_a_busy_statement_caught_and_passed_over_still_fails_as_busy(engine, monkeypatch):
    # The error the transaction ends with keeps the kind of the one that doomed it: a lock
    # (DatabaseBusyError, a 503) must not come out as a 500.
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)

        def busy(cursor):
            raise DatabaseBusyError("a lock timed out")

        with pytest.raises(DatabaseBusyError, match="nothing of it was committed") as raised, runner.transaction():
            insert_note(runner, "first")
            with pytest.raises(DatabaseBusyError):
                runner.run(busy)
        assert isinstance(raised.value.__cause__, DatabaseBusyError)
        assert notes(engine) == set()
    finally:
        runner.release()
        NOTES.drop(engine)


def test_a_commit_that_the_server_turned_into_a_rollback_fails(postgres_engine):
    # A work function that catches its own statement's error leaves PostgreSQL's transaction
    # aborted: its COMMIT is then a ROLLBACK that reports success, and only the tag tells.
    runner = HeldConnection(postgres_engine)

    def insert_twice(cursor):
        cursor.execute("INSERT INTO test_notes (text) VALUES ('x')")
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            cursor.execute("INSERT INTO test_notes (text) VALUES ('x')")

    try:
        NOTES.create(postgres_engine)
        with pytest.raises(RuntimeError, match="ended this transaction with ROLLBACK"), runner.transaction():
            runner.run(insert_twice)
        assert_nothing_committed_and_the_next_runs(runner, postgres_engine)
    finally:
        runner.release()
        NOTES.drop(postgres_engine)


def test_a_pooled_connection_the_server_closed_is_replaced_at_checkout(postgres_url):
    # The request engine pings no connection before use (a round trip per query): one the
    # server closed while it sat in the pool is found without one.
    engine = db.create_engine(Settings(database_url=postgres_url), pool_size=1, pre_ping=False)
    try:
        with engine.connect() as conn:
            pooled = conn.connection.driver_connection
        terminate_and_wait_until_told(pooled)
        db.ping(engine)
        with engine.connect() as conn:
            assert conn.connection.driver_connection is not pooled
    finally:
        engine.dispose()


def test_closed_while_idle_tells_a_connection_the_server_ended_from_a_live_one(postgres_engine):
    """What the pool asks at each checkout on the request path (no pre-ping): a live idle
    connection is kept, one the server ended is replaced, and so is one closed here already
    (no descriptor left to ask: a mutation audit)."""
    with postgres_engine.connect() as conn, postgres_engine.connect() as other:
        driver = conn.connection.driver_connection
        assert not db.closed_while_idle(driver)
        other.execute(sa.select(sa.func.pg_terminate_backend(driver.info.backend_pid)))
        wait_for(lambda: db.closed_while_idle(driver), "the server's word that it ended the connection")
        driver.close()
        assert db.closed_while_idle(driver)
        conn.invalidate()


def test_a_connection_made_for_a_checkout_is_not_taken_for_a_closed_one(postgres_url, monkeypatch):
    # Were a connection readable again as soon as it was made, the pool would try twice and
    # then raise an error that is no database error (a 500). A new connection is not asked.
    monkeypatch.setattr(db, "closed_while_idle", lambda connection: True)
    engine = db.create_engine(Settings(database_url=postgres_url), pool_size=1, pre_ping=False)
    try:
        db.ping(engine)  # a new connection
        db.ping(engine)  # the pooled one is "closed": replaced by a new one, which is used
    finally:
        engine.dispose()


def test_a_runner_drops_a_connection_the_server_closed_and_takes_a_fresh_one(postgres_engine, monkeypatch):
    seed_users(postgres_engine, 100)
    runner = HeldConnection(postgres_engine)
    before = run_query_batch(runner, 1)[0]
    held = runner._pooled.driver_connection
    # The server's word that it closed the connection has not arrived before the batch starts.
    monkeypatch.setattr(batch_module, "closed_while_idle", lambda connection: False)
    with postgres_engine.begin() as other:
        other.execute(sa.select(sa.func.pg_terminate_backend(held.info.backend_pid)))
    old_pool = postgres_engine.pool
    with pytest.raises(DatabaseUnavailableError):
        run_query_batch(runner, 1)
    assert old_pool.checkedout() == 0 and runner._pooled is None  # dropped, not kept
    assert postgres_engine.pool is not old_pool  # the pool was started afresh
    after = run_query_batch(runner, 1)[0]
    assert runner._pooled.driver_connection is not held
    assert after.previous == before.recorded_at  # the failed batch recorded nothing
    runner.release()


def test_an_idle_committer_gives_its_connection_back(seeded, monkeypatch):
    monkeypatch.setattr(batcher_module, "IDLE_SECONDS", 0.2)
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    run_in_threads(lambda: batcher.submit("query"), threads=4, per_thread=5)
    deadline = time.monotonic() + 10
    while seeded.pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seeded.pool.checkedout() == 0
    assert batcher.submit("query").previous is not None  # and a new committer starts on demand


def test_concurrent_callers_share_transactions_and_keep_the_chain(seeded):
    sizes: list[int] = []
    batcher = Batcher(seeded, [QueryKind(AnswerCache())], max_wait=30, on_batch=lambda kind, outcomes: sizes.append(len(outcomes)))
    results = run_in_threads(lambda: batcher.submit("query"), threads=16, per_thread=20)

    assert len(results) == 320
    assert sum(sizes) == 320
    assert max(sizes) > 1  # 16 threads at once: some of them shared a transaction
    assert len(sizes) < 320
    assert_chain(results)


def test_query_many_is_a_chain_of_answers_from_one_batch(seeded):
    sizes: list[int] = []
    batcher = Batcher(seeded, [QueryKind(AnswerCache())], max_wait=30, on_batch=lambda kind, outcomes: sizes.append(len(outcomes)))
    before = batcher.submit("query")
    many = batcher.submit_many("query", [None] * 5)
    assert sizes == [1, 5]
    assert many[0].previous == before.recorded_at
    assert_chain([before, *many] if before.previous is None else [*many])
    assert state(seeded).last_query_at == many[-1].recorded_at
    with pytest.raises(ValueError):
        batcher.submit_many("query", [])
    batcher.close(5)


def test_waiters_for_several_answers_are_batched_whole_within_max_batch(seeded, monkeypatch):
    running, release = threading.Event(), threading.Event()
    real_apply = QueryKind.apply

    def held_apply(self, held, payloads):
        running.set()
        release.wait(10)  # the first batch runs only once the others have queued
        return real_apply(self, held, payloads)

    monkeypatch.setattr(QueryKind, "apply", held_apply)
    sizes: list[int] = []
    batcher = Batcher(seeded, [QueryKind()], max_wait=30, max_batch=4, on_batch=lambda kind, outcomes: sizes.append(len(outcomes)))
    first = threading.Thread(target=lambda: batcher.submit("query"))
    first.start()
    assert running.wait(10)
    answers: list[list] = []
    queued = [threading.Thread(target=lambda: answers.append(batcher.submit_many("query", [None] * 3))) for _ in range(3)]
    for thread in queued:
        thread.start()
    deadline = time.monotonic() + 10
    while len(batcher._waiting) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *queued]:
        thread.join(20)
    # Two waiters for 3 would make a batch of 6, over max_batch; one is never split.
    assert sizes == [1, 3, 3, 3]
    assert sorted(len(batch) for batch in answers) == [3, 3, 3]
    for batch in answers:
        for earlier, later in itertools.pairwise(batch):
            assert later.previous == earlier.recorded_at
    batcher.close(5)


def stall_queries(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """QueryKind's batches wait (up to 10 s) until the first event is set; the second is set
    once one is waiting."""
    release, running = threading.Event(), threading.Event()
    real_apply = QueryKind.apply

    def stalled_apply(self, held, payloads):
        running.set()
        release.wait(10)
        return real_apply(self, held, payloads)

    monkeypatch.setattr(QueryKind, "apply", stalled_apply)
    return release, running


def test_an_answer_that_comes_after_its_caller_gave_up_harms_nobody(seeded, monkeypatch):
    real_apply = QueryKind.apply
    release, _ = stall_queries(monkeypatch)
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    batcher = Batcher(seeded, [QueryKind()], max_wait=0.3)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError):
        batcher.submit("query")  # its batch is running when it gives up
    assert 0.25 < time.monotonic() - started < 5
    release.set()  # the batch commits and answers the caller that left
    monkeypatch.setattr(QueryKind, "apply", real_apply)
    assert batcher.submit("query").previous is not None  # the committer lives on
    batcher.close(5)
    assert not crashes
    assert seeded.pool.checkedout() == 0


def test_a_caller_that_gives_up_while_queued_leaves_the_queue(seeded, monkeypatch):
    """Counted as pending after it left, each such caller brought the queue nearer its bound,
    until every request was refused as a full queue (503)."""
    release, running = stall_queries(monkeypatch)
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    first = threading.Thread(target=lambda: batcher.submit("query"))
    first.start()
    assert running.wait(10)
    outcomes = batcher.submit_many("query", [None, None], timeout=0.2)
    assert [str(outcome) for outcome in outcomes] == ["no answer from the database in the time its caller had left"] * 2
    assert batcher.pending() == 0
    release.set()
    first.join(10)
    batcher.close(5)


def test_single_waiters_fill_a_batch_up_to_max_batch_exactly(seeded, monkeypatch):
    release, running = stall_queries(monkeypatch)
    sizes: list[int] = []
    batcher = Batcher(seeded, [QueryKind()], max_wait=30, max_batch=4, on_batch=lambda kind, outcomes: sizes.append(len(outcomes)))
    callers = [threading.Thread(target=lambda: batcher.submit("query")) for _ in range(5)]
    callers[0].start()
    assert running.wait(10)
    for caller in callers[1:]:
        caller.start()
    wait_for(lambda: batcher.pending() == 4, "four callers queued")
    release.set()
    for caller in callers:
        caller.join(20)
    assert sizes == [1, 4]
    batcher.close(5)


def test_one_caller_for_more_than_max_pending_is_served_when_nobody_waits(seeded):
    """The bound keeps a queue from growing; a caller alone is no queue (a lane's batch of
    requests is one caller)."""
    batcher = Batcher(seeded, [QueryKind()], max_wait=30, max_pending=2)
    outcomes = batcher.submit_many("query", [None] * 3)
    assert all(isinstance(outcome, QueryResult) for outcome in outcomes), outcomes
    batcher.close(5)


def test_running_for_is_the_time_the_running_batch_has_taken_and_0_between_batches(seeded, monkeypatch):
    """What the watchdog and the shutdown read to tell a stuck batch from a healthy one; and
    the batch's whole time, on_commit's (the commit time metric)."""
    release, running = stall_queries(monkeypatch)
    commits: list[float] = []
    batcher = Batcher(seeded, [QueryKind()], max_wait=30, on_commit=commits.append)
    assert batcher.running_for() == 0
    enqueued = time.monotonic()
    ticket = batcher.enqueue("query", [None])
    assert running.wait(5)
    time.sleep(0.2)
    assert 0.2 <= batcher.running_for() <= time.monotonic() - enqueued
    release.set()
    assert isinstance(batcher.outcomes(ticket)[0], QueryResult)
    wait_for(lambda: batcher.running_for() == 0 and commits, "the batch's end")
    assert 0.2 <= commits[0] <= time.monotonic() - enqueued
    batcher.close(5)


def test_abandon_answers_the_running_batch_and_the_queue_at_once_and_later_callers_too(seeded, monkeypatch):
    release, running = stall_queries(monkeypatch)
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    in_batch = batcher.enqueue("query", [None])
    assert running.wait(5)
    queued = batcher.enqueue("query", [None, None])  # behind the stuck batch
    started = time.monotonic()
    assert batcher.abandon("shutting down") == 2  # tickets answered: the running one, the queued one
    assert [type(o) for o in batcher.outcomes(in_batch)] == [DatabaseUnavailableError]
    assert [str(o) for o in batcher.outcomes(queued)] == ["shutting down"] * 2
    assert time.monotonic() - started < 1  # not max_wait's 30 s
    assert [str(o) for o in batcher.submit_many("query", [None], timeout=0)] == ["shutting down"]
    assert batcher.pending() == 0
    release.set()  # the stuck batch commits; its answer for a waiter answered already is dropped
    batcher.close(5)
    assert not batcher._committer.is_alive()
    assert not crashes
    assert [str(o) for o in in_batch.outcomes] == ["shutting down"]  # not replaced by the late answer
    assert state(seeded).last_query_at is not None  # the abandoned batch did commit: an unknown outcome


def test_a_ticket_takes_its_first_answer_only_and_says_which_was_first():
    """abandon() counts the waiters it answered by answer()'s result: in a batch of several
    kinds the committer may have answered some of its running tickets already."""
    answered: list[str] = []
    ticket = batcher_module.Ticket(QueryKind.name, [None], lambda: answered.append("told"))
    assert not ticket.answered()
    assert ticket.answer(["first"]) is True
    assert ticket.answer(["second"]) is False
    assert ticket.outcomes == ["first"] and ticket.answered() and answered == ["told"]


def test_abandon_before_any_batch_ran_answers_later_callers(seeded):
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    assert batcher.abandon("shutting down") == 0
    with pytest.raises(DatabaseUnavailableError, match=r"^shutting down$"):
        batcher.submit("query")


def test_the_query_kind_fills_the_answer_cache_it_was_given(seeded):
    cache = AnswerCache()
    batcher = Batcher(seeded, [QueryKind(cache)], max_wait=30)
    try:
        result = batcher.submit("query")
    finally:
        batcher.close(5)
    assert cache.get() is not None and cache.get()[1] == result.users


class LateTicket(batcher_module.Ticket):
    """A ticket whose wait runs out, though its answer may have come just before."""

    def wait(self, timeout: float | None) -> bool:
        return False


def test_an_answer_that_came_as_the_wait_ran_out_is_taken_and_none_is_a_timeout(seeded):
    batcher = Batcher(seeded, [QueryKind()], max_wait=0.25)
    answered = LateTicket("query", [None])
    answered.answer(["the outcome"])
    assert batcher.outcomes(answered, 0) == ["the outcome"]
    [error] = batcher.outcomes(LateTicket("query", [None]))
    assert isinstance(error, DatabaseUnavailableError) and str(error) == "no answer from the database within 0.25 s"


class CommitterKilled(BaseException):
    """What no committer raises by design (_run_batch answers every error), raised anyway."""


def test_a_committer_that_died_is_replaced_by_the_next_caller(seeded, monkeypatch):
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    run_batch, broken = Batcher._run_batch, []

    def broken_once(self, held, batch):
        if not broken:
            broken.append(batch)
            raise CommitterKilled
        return run_batch(self, held, batch)

    monkeypatch.setattr(Batcher, "_run_batch", broken_once)
    batcher = Batcher(seeded, [QueryKind()], max_wait=3)
    try:
        [lost] = batcher.submit_many("query", [None], timeout=0.3)
        assert isinstance(lost, DatabaseUnavailableError)
        wait_for(lambda: len(crashes) == 1, "the committer's end")
        assert batcher.submit("query").recorded_at is not None  # a new committer answered
    finally:
        batcher.close(5)


def test_no_thread_to_be_had_is_a_database_unavailable_error_and_leaves_nothing_queued(seeded, monkeypatch):
    def no_thread(self):
        raise RuntimeError("can't start new thread")

    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(DatabaseUnavailableError, match=r"^cannot start the batch thread: can't start new thread$"):
                batcher.submit_many("query", [None, None])
        assert batcher.pending() == 0
        assert batcher.submit("query").recorded_at is not None  # and with threads again, it works
        committers = [thread for thread in threading.enumerate() if thread.name == "maxtwo-batcher"]
        assert committers and all(thread.daemon for thread in committers)  # (other tests' may be idling out)
    finally:
        batcher.close(5)


class Stuck:
    """A batcher whose batch has run `running` s, and `waiters` callers to answer if abandoned."""

    def __init__(self, running: float, waiters: int) -> None:
        self.running, self.waiters, self.reasons = running, waiters, []

    def running_for(self) -> float:
        return self.running

    def abandon(self, reason: str) -> int:
        self.reasons.append(reason)
        return self.waiters


def test_abandon_stuck_abandons_each_batcher_at_its_threshold_once_and_counts_the_waiters():
    at, past, healthy = Stuck(1.0, 2), Stuck(3.0, 3), Stuck(0.5, 7)
    batchers = batcher_module.Batchers({"query": at, "increment": past, "other": healthy})
    assert batchers.abandon_stuck("the reason", 1.0) == 5
    assert at.reasons == past.reasons == ["the reason"] and healthy.reasons == []
    assert batchers.abandon_stuck("the reason", 1.0) == 0  # once each


def test_close_ends_the_committer_and_gives_its_connection_back(seeded):
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    batcher.submit("query")
    assert seeded.pool.checkedout() == 1  # held between batches
    batcher.close(5)
    assert seeded.pool.checkedout() == 0
    assert not batcher._committer.is_alive()




def test_closing_the_batchers_waits_their_timeout_in_all_not_for_each(engine):
    """Shutdown's budget: two batchers with a batch each that does not end, closed together
    within the timeout given, not one timeout after the other."""
    gate = threading.Event()
    batchers = stalled_batchers(engine, gate)
    tickets = [batchers[kind].enqueue(kind, [None]) for kind in ("query", "increment")]
    try:
        wait_for(lambda: all(batcher.running_for() > 0 for batcher in batchers.each()),
                 "both batches running")
        started = time.monotonic()
        batchers.close(0.5)
        took = time.monotonic() - started
    finally:
        gate.set()
    for batcher, ticket in zip(batchers.each(), tickets, strict=True):
        assert batcher.outcomes(ticket, 5) == [None]  # each let its batch finish
    batchers.close(5)
    assert not any(batcher._committer.is_alive() for batcher in batchers.each())
    assert 0.45 < took < 0.9, took  # 1.0 s when each waited its own 0.5 s


def test_every_waiter_of_a_failing_batch_gets_the_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    engine = db.create_engine(Settings(database_url=f"sqlite:///{blocker / 'maxtwo.db'}"))
    batcher = Batcher(engine, [QueryKind()], max_wait=30)
    errors = []

    def worker() -> None:
        try:
            batcher.submit("query")
        except DatabaseUnavailableError as ex:
            errors.append(ex)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 8
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.slow
def test_every_caller_gives_up_after_max_wait_while_the_transaction_is_stuck(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url, statement_timeout=20))
    schema.ensure_schema(engine)
    holder = db.create_engine(Settings(database_url=url)).connect()
    holder.begin()  # the write lock: the committer's UPDATE waits for it up to 20 s
    batcher = Batcher(engine, [QueryKind()], max_wait=3)
    outcomes: list[tuple[float, object]] = []

    def caller() -> None:
        started = time.monotonic()
        outcome = _try(lambda: batcher.submit("query"))
        outcomes.append((time.monotonic() - started, outcome))

    first = threading.Thread(target=caller)  # its batch is the stuck one
    first.start()
    time.sleep(0.3)
    later = [threading.Thread(target=caller) for _ in range(4)]  # they queue behind it
    for thread in later:
        thread.start()
    for thread in [first, *later]:
        thread.join(20)
    holder.rollback()
    holder.close()
    assert len(outcomes) == 5
    assert all(isinstance(outcome, DatabaseUnavailableError) for _, outcome in outcomes)
    # Each gives up at its own max_wait (3 s), not at the lock's 20 s.
    assert all(2.9 < waited < 15 for waited, _ in outcomes)
    # Once the lock is free, the stuck batch commits and the next callers are answered.
    assert batcher.submit("query").previous is not None
    engine.dispose()


# --- several kinds of operation in one batch -------------------------------------------------

class Interrupted(BaseException):
    """Raised through the batcher's `except Exception`, as KeyboardInterrupt would be."""


NOTES = sa.Table("test_notes", sa.MetaData(), sa.Column("text", sa.Text, nullable=False, unique=True))


def insert_note(held: HeldConnection, text: str) -> None:
    """One note, in the held connection's transaction if one is open."""
    sql = "INSERT INTO test_notes (text) VALUES (%s)" if held.postgres else "INSERT INTO test_notes (text) VALUES (?)"
    held.run(lambda cursor: cursor.execute(sql, (text,)))


class NoteKind:
    """A second kind of write for these tests: insert a note. A note "bad" fails alone (the
    kind returns its error); a note "raise" makes the kind raise for its whole part, and a note
    "interrupt" makes it raise Interrupted, which is no Exception."""

    name = "note"

    def apply(self, held, payloads):
        # Several statements: outside the batcher's transaction, a transaction of its own (the
        # Kind contract), so that a part that raises leaves nothing behind.
        if held.in_transaction:
            return self._notes(held, payloads)
        with held.transaction():
            return self._notes(held, payloads)

    def _notes(self, held, payloads):
        if "raise" in payloads or "interrupt" in payloads:
            insert_note(held, "written before raising")
            if "interrupt" in payloads:
                raise Interrupted("as a KeyboardInterrupt or a SystemExit would")
            raise RuntimeError("this kind failed as a whole")
        outcomes = []
        for text in payloads:
            if text == "bad":
                outcomes.append(ValueError("a bad note"))
                continue
            insert_note(held, text)
            outcomes.append(f"noted {text}")
        return outcomes


@contextlib.contextmanager
def queries_and_notes(engine, monkeypatch, **options):
    """A batcher with queries and notes, whose first batch starts only once everything the test
    submits has queued: all of it lands in one batch. `options`: more of the Batcher's."""
    NOTES.create(engine)
    gate = threading.Event()
    real_apply = QueryKind.apply

    def gated(self, held, payloads):
        gate.wait(10)
        return real_apply(self, held, payloads)

    monkeypatch.setattr(QueryKind, "apply", gated)
    parts: list[tuple[str, int]] = []
    batcher = Batcher(engine, [QueryKind(), NoteKind()], max_wait=30,
                      on_batch=lambda kind, outcomes: parts.append((kind, len(outcomes))), **options)
    try:
        yield batcher, gate, parts
    finally:
        batcher.close(5)


@pytest.fixture
def two_kinds(seeded, monkeypatch):
    with queries_and_notes(seeded, monkeypatch) as batcher_gate_parts:
        yield batcher_gate_parts


def submit_together(batcher, gate, submissions):
    """Each (kind, payload) from a thread of its own; the outcome or error of each, in order."""
    outcomes: dict[int, object] = {}
    opener = threading.Thread(target=lambda: outcomes.setdefault(-1, _try(lambda: batcher.submit("query"))))
    opener.start()  # its batch waits at the gate; everything below queues for the next one
    wait_for(lambda: batcher.running_for() > 0, "the opener's batch at the gate")
    threads = [threading.Thread(target=lambda i=i, kind=kind, payload=payload:
                                outcomes.__setitem__(i, _try(lambda: batcher.submit(kind, payload))))
               for i, (kind, payload) in enumerate(submissions)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(batcher._waiting) == len(submissions), "every submission queued behind it")
    gate.set()
    for thread in [opener, *threads]:
        thread.join(20)
    return [outcomes[i] for i in range(len(submissions))]


def notes(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.select(NOTES.c.text)).scalars())


def test_kinds_share_one_batch_and_a_failing_operation_fails_alone(seeded, two_kinds):
    batcher, gate, parts = two_kinds
    outcomes = submit_together(batcher, gate, [("note", "a"), ("query", None), ("note", "bad"), ("note", "b")])
    assert outcomes[0] == "noted a" and outcomes[3] == "noted b"
    assert isinstance(outcomes[1], QueryResult)
    assert isinstance(outcomes[2], ValueError)
    assert notes(seeded) == {"a", "b"}
    assert sorted(parts[1:]) == [("note", 3), ("query", 1)]  # one batch after the opener's


def test_a_kind_that_raises_fails_its_own_part_and_the_rest_commits(seeded, two_kinds):
    batcher, gate, _parts = two_kinds
    outcomes = submit_together(batcher, gate, [("query", None), ("note", "a"), ("note", "raise"), ("query", None)])
    assert isinstance(outcomes[0], QueryResult) and isinstance(outcomes[3], QueryResult)
    assert outcomes[3].previous == outcomes[0].recorded_at  # the queries committed, as a chain
    assert state(seeded).last_query_at == outcomes[3].recorded_at
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes[1:3])
    assert notes(seeded) == set()  # the failed part left nothing behind, not even its first insert
    # And the batcher goes on.
    assert batcher.submit("note", "after") == "noted after"
    assert notes(seeded) == {"after"}


def test_a_part_that_raises_after_another_committed_shares_its_error_with_nobody_queued(seeded, monkeypatch):
    """A part that fails after another part of its batch committed fails alone: the batch counts
    as committed (on_commit), and whoever queued while it ran is tried in the next batch rather
    than handed its error."""
    notes_running, notes_release = threading.Event(), threading.Event()
    real_notes = NoteKind._notes

    def held_notes(self, held, payloads):
        notes_running.set()
        notes_release.wait(10)
        return real_notes(self, held, payloads)

    monkeypatch.setattr(NoteKind, "_notes", held_notes)
    commits: list[float] = []
    with queries_and_notes(seeded, monkeypatch, on_commit=commits.append) as (batcher, gate, _):
        opener = batcher.enqueue("query", [None])  # its batch waits at the gate
        wait_for(lambda: batcher.running_for() > 0, "the opener's batch at the gate")
        query, noted = batcher.enqueue("query", [None]), batcher.enqueue("note", ["raise"])  # the next batch
        gate.set()
        assert notes_running.wait(10)  # the queries committed and were answered; the notes run
        later = batcher.enqueue("query", [None])
        notes_release.set()
        assert isinstance(batcher.outcomes(noted)[0], RuntimeError)
        [result] = batcher.outcomes(later)
        assert isinstance(result, QueryResult), result
        assert result.previous == batcher.outcomes(query)[0].recorded_at
        assert isinstance(batcher.outcomes(opener)[0], QueryResult)
    assert len(commits) == 3  # the opener's batch, the one whose queries committed, the later one


def test_a_driver_error_inside_a_kind_fails_its_part_alone(seeded, two_kinds):
    batcher, gate, _ = two_kinds
    # (Notes pass no gate: it stays closed for submit_together, which fails if it was opened.)
    assert batcher.submit("note", "same") == "noted same"
    outcomes = submit_together(batcher, gate, [("query", None), ("note", "same")])  # a real driver error
    assert isinstance(outcomes[0], QueryResult)
    assert isinstance(outcomes[1], DatabaseUnavailableError)  # the driver error, translated
    assert state(seeded).last_query_at == outcomes[0].recorded_at


@pytest.mark.parametrize(("error", "notes_committed"), [
    # Nothing committed, and not for a reason of the part's own: most likely the database is
    # gone, so nothing more is tried.
    (RuntimeError("the queries failed as a whole"), False),
    # The database answered (a lock or statement timeout is the part's own trouble): the notes
    # are tried, and commit.
    (DatabaseBusyError("the database did not answer in time (canceling statement due to lock timeout)"), True),
])
def test_when_the_first_kind_raises(seeded, two_kinds, monkeypatch, error, notes_committed):
    batcher, gate, _ = two_kinds
    gated = QueryKind.apply

    def failing(self, held, payloads):
        if len(payloads) == 2:
            raise error
        return gated(self, held, payloads)

    monkeypatch.setattr(QueryKind, "apply", failing)
    outcomes = submit_together(batcher, gate, [("query", None), ("note", "a"), ("query", None)])
    assert isinstance(outcomes[0], type(error)) and isinstance(outcomes[2], type(error))
    if notes_committed:
        assert outcomes[1] == "noted a" and notes(seeded) == {"a"}
    else:
        assert isinstance(outcomes[1], type(error)) and notes(seeded) == set()
    assert batcher.submit("note", "after") == "noted after"  # and the batcher goes on


class BusyKind:
    """A kind whose every part fails on a lock of its own (the part fails, the batch goes on)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def apply(self, held, payloads):
        raise DatabaseBusyError(f"{self.name}: the database did not answer in time (lock timeout)")


def test_a_batch_in_which_no_part_committed_is_in_no_commit_or_batch_metric(seeded):
    gate = threading.Event()

    class GateKind:
        name = "gate"

        def apply(self, held, payloads):
            gate.wait(10)
            return [None] * len(payloads)

    commits: list[float] = []
    parts: list[tuple[str, int]] = []
    failures: list[BaseException] = []
    batcher = Batcher(seeded, [BusyKind("first"), BusyKind("second"), GateKind()], max_wait=30,
                      on_batch=lambda kind, outcomes: parts.append((kind, len(outcomes))), on_commit=commits.append,
                      on_failure=failures.append)
    try:
        opener = batcher.enqueue("gate", [None])  # its batch holds the committer at the gate
        wait_for(lambda: batcher.running_for() > 0, "the opener's batch at the gate")
        first, second = batcher.enqueue("first", [None]), batcher.enqueue("second", [None])  # one batch, two kinds
        gate.set()
        assert batcher.outcomes(opener) == [None]
        assert [type(outcome) for outcome in batcher.outcomes(first) + batcher.outcomes(second)] == [DatabaseBusyError] * 2
    finally:
        batcher.close(5)
    # The opener's batch committed; the one after it did not, and is in neither metric. Each
    # of its parts failed as a whole (what /healthz hears of).
    assert (len(commits), parts) == (1, [("gate", 1)])
    assert [type(failure) for failure in failures] == [DatabaseBusyError] * 2


def test_a_batch_that_fails_as_one_is_told_once(seeded):
    class BrokenKind:
        name = "broken"

        def apply(self, held, payloads):
            raise DatabaseUnavailableError("gone")

    failures: list[BaseException] = []
    commits: list[float] = []
    batcher = Batcher(seeded, [BrokenKind()], max_wait=30, on_commit=commits.append, on_failure=failures.append)
    try:
        with pytest.raises(DatabaseUnavailableError):
            batcher.submit("broken")
    finally:
        batcher.close(5)
    assert [str(failure) for failure in failures] == ["gone"] and commits == []


def test_a_later_part_raising_no_exception_fails_only_the_waiters_not_yet_answered(seeded, two_kinds):
    # The queries are answered before the notes run. Answered again with the notes' error, a
    # query's ticket would be released twice (its caller not waiting yet: this test collects
    # it last), which raises and leaves the notes' callers waiting out their timeout.
    batcher, gate, _ = two_kinds
    opener = threading.Thread(target=lambda: batcher.submit("query"))
    opener.start()  # its batch waits at the gate; the two below queue for the next one
    wait_for(lambda: batcher.running_for() > 0, "the opener's batch")
    query = batcher.enqueue("query", [None])
    noted = batcher.enqueue("note", ["a", "interrupt"])
    gate.set()
    opener.join(10)
    outcomes = batcher.outcomes(noted, timeout=10)
    assert all(isinstance(outcome, Interrupted) for outcome in outcomes), outcomes
    [result] = batcher.outcomes(query, timeout=0)
    assert isinstance(result, QueryResult)
    assert state(seeded).last_query_at == result.recorded_at
    assert notes(seeded) == set()
    assert batcher.submit("note", "after") == "noted after"  # and the batcher goes on


@pytest.mark.parametrize(("error", "note_tried"), [
    # Most likely the database is gone: each would otherwise wait out a timeout of its own.
    (RuntimeError("the database went away"), False),
    # A lock or timeout: the queries queued behind would wait for the same lock; a note needs
    # no such lock (as GET / needs no counter's row lock, nor on SQLite the main file a
    # randomization holds), so it is tried, and commits.
    (DatabaseBusyError("the database did not grant a lock in time"), True),
])
def test_whoever_queued_while_a_batch_failed_shares_its_error_untried(seeded, two_kinds, monkeypatch, error, note_tried):
    batcher, gate, _ = two_kinds
    gated = QueryKind.apply
    batches: list[int] = []

    def failing(self, held, payloads):
        batches.append(len(payloads))
        gated(self, held, payloads)  # the opener's batch waits at the gate while the rest queue
        raise error

    monkeypatch.setattr(QueryKind, "apply", failing)
    outcomes = submit_together(batcher, gate, [("query", None), ("note", "a")])
    assert batches == [1]  # only the opener's batch of queries ran
    assert isinstance(outcomes[0], type(error))
    assert batcher.pending() == 0  # those that shared the error are no longer counted as waiting
    if note_tried:
        assert outcomes[1] == "noted a" and notes(seeded) == {"a"}
    else:
        assert isinstance(outcomes[1], type(error)) and notes(seeded) == set()


def test_a_lock_or_statement_timeout_is_a_database_busy_error(database_url):
    """What lets a batch go on past a part that timed out (above), from the real drivers."""
    prepare(database_url)
    engine = db.create_engine(Settings(database_url=database_url, statement_timeout=0.3))
    holder = db.create_engine(Settings(database_url=database_url))
    with holder.begin() as conn:  # the query state's lock, held past the timeout
        conn.execute(schema.query_state.update().values(last_query_at=None))
        runner = HeldConnection(engine)
        with pytest.raises(DatabaseBusyError):
            run_query_batch(runner, 1)
    runner.release()
    engine.dispose()
    holder.dispose()


def assert_a_mixed_batchs_query_does_not_wait_for_its_note(engine, monkeypatch, notes_locked) -> None:
    """A batch of a query and a note while `notes_locked()` holds a lock the note's insert needs:
    the query is answered meanwhile (each kind commits on its own, queries first); the note
    goes through once the lock is let go."""
    with queries_and_notes(engine, monkeypatch) as (batcher, gate, parts):
        results: dict[str, object] = {}
        answered = threading.Event()
        opener = threading.Thread(target=lambda: batcher.submit("query"))
        opener.start()  # its batch waits at the gate; the two below queue for the next one
        wait_for(lambda: batcher.running_for() > 0, "the opener's batch")
        query = threading.Thread(target=lambda: (results.setdefault("query", batcher.submit("query")), answered.set()))
        note = threading.Thread(target=lambda: results.setdefault("note", batcher.submit("note", "a")))
        query.start()
        note.start()
        wait_for(lambda: len(batcher._waiting) == 2, "the query and the note in the queue")
        with notes_locked():
            gate.set()
            assert answered.wait(5), "the query waited for the note's lock"
            assert "note" not in results  # the note does wait for it
        for thread in (opener, query, note):
            thread.join(20)
    assert isinstance(results["query"], QueryResult) and results["note"] == "noted a"
    assert sorted(parts[1:]) == [("note", 1), ("query", 1)]  # one batch after the opener's


def test_on_postgresql_a_mixed_batchs_queries_are_answered_while_the_notes_wait_for_a_lock(
    postgres_engine, monkeypatch
):
    seed_users(postgres_engine, 10)

    @contextlib.contextmanager
    def table_locked():
        holder = postgres_engine.connect()
        holder.execute(sa.text("LOCK TABLE test_notes IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            holder.rollback()
            holder.close()

    assert_a_mixed_batchs_query_does_not_wait_for_its_note(postgres_engine, monkeypatch, table_locked)


def test_on_sqlite_a_mixed_batchs_queries_are_answered_while_the_main_file_is_locked(tmp_path, monkeypatch):
    # Queries write only the query-state file: they need not wait for the main file's lock.
    path = tmp_path / "maxtwo.db"
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}", statement_timeout=10.0))
    schema.ensure_schema(engine)
    seed_users(engine, 10)

    @contextlib.contextmanager
    def main_file_locked():
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the main file's write lock, as a randomization holds it
        try:
            yield
        finally:
            holder.rollback()
            holder.close()

    assert_a_mixed_batchs_query_does_not_wait_for_its_note(engine, monkeypatch, main_file_locked)
    engine.dispose()


def test_an_unknown_kind_is_refused(seeded):
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    with pytest.raises(ValueError, match="unknown kind"):
        batcher.submit("nonsense")


def _try(function):
    try:
        return function()
    except Exception as ex:  # noqa: BLE001 - the outcome is what the test looks at
        return ex


def test_a_ticket_tells_whoever_waits_for_several_once_it_is_answered(seeded):
    # The lane waits for several tickets at once (daemon/transport.py): each answer wakes it.
    batcher = Batcher(seeded, [QueryKind()], max_wait=30)
    answered: list[str] = []
    ticket = batcher.enqueue(QueryKind.name, [None], lambda: answered.append("committed"))
    wait_for(lambda: answered == ["committed"], "the ticket's callback")
    assert ticket.answered() and batcher.outcomes(ticket, 0)[0].recorded_at is not None
    # Answered at once (here: a batcher given up at shutdown): told at once, too.
    batcher.abandon("shutting down")
    refused = batcher.enqueue(QueryKind.name, [None], lambda: answered.append("refused"))
    assert refused.answered() and answered == ["committed", "refused"]
    assert isinstance(batcher.outcomes(refused, 0)[0], DatabaseUnavailableError)
    batcher.close(5)


# -- core/batch.py's HeldConnection after a failure (a mutation audit) --


def test_a_transaction_whose_statement_failed_and_raised_leaves_the_runner_usable(engine):
    """The usual failure: a statement fails and its error leaves the block. The doom it set
    must end with the transaction, or every later run of the held connection fails."""
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        with pytest.raises(MaxtwoError), runner.transaction():
            insert_note(runner, "first")
            insert_note(runner, "first")  # a unique violation, not caught
        assert not runner.in_transaction
        assert_nothing_committed_and_the_next_runs(runner, engine)
    finally:
        runner.release()
        NOTES.drop(engine)


def test_a_begin_that_fails_on_a_lost_connection_leaves_the_runner_usable(postgres_url, monkeypatch):
    """BEGIN on a connection the server closed unnoticed fails; no transaction was open, so
    nothing is doomed: the next transaction runs on a fresh connection."""
    engine = db.create_engine(Settings(database_url=postgres_url), pre_ping=False)
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        runner.run(lambda cursor: cursor.execute("SELECT 1"))
        monkeypatch.setattr(batch_module, "closed_while_idle", lambda connection: False)
        terminate_and_wait_until_told(runner._pooled.driver_connection)
        with pytest.raises(DatabaseUnavailableError), runner.transaction():
            pytest.fail("the block ran although BEGIN failed")
        assert not runner.in_transaction
        monkeypatch.undo()
        assert_nothing_committed_and_the_next_runs(runner, engine)
    finally:
        runner.release()
        NOTES.drop(engine)
        engine.dispose()


def test_a_rollback_that_fails_on_a_lost_connection_drops_it_and_the_pool(postgres_url):
    """The block raised after the server closed the connection: the ROLLBACK fails, and the
    connection (and, the server being gone, the pool) is thrown away, not kept held."""
    engine = db.create_engine(Settings(database_url=postgres_url), pre_ping=False)
    runner = HeldConnection(engine)
    try:
        NOTES.create(engine)
        old_pool = engine.pool
        with pytest.raises(ValueError), runner.transaction():
            insert_note(runner, "lost")
            terminate_and_wait_until_told(runner._pooled.driver_connection)
            raise ValueError("the caller's own error")
        assert not runner.held
        assert old_pool.checkedout() == 0 and engine.pool is not old_pool
        assert_nothing_committed_and_the_next_runs(runner, engine)
    finally:
        runner.release()
        NOTES.drop(engine)
        engine.dispose()


def test_a_release_inside_an_open_postgres_transaction_throws_the_connection_away(postgres_engine):
    """release() while the server still has the transaction open (a statement interrupted
    half-way): psycopg refuses autocommit then; the connection must be invalidated, not raise
    out of release() nor go back to the pool with the transaction open."""
    runner = HeldConnection(postgres_engine)
    try:
        NOTES.create(postgres_engine)
        with pytest.raises(DatabaseUnavailableError, match="lost during a transaction"), runner.transaction():
            insert_note(runner, "x")
            runner.release()
        assert postgres_engine.pool.checkedout() == 0
        assert_nothing_committed_and_the_next_runs(runner, postgres_engine)
    finally:
        runner.release()
        NOTES.drop(postgres_engine)


def test_a_sqlite_connection_that_could_not_write_is_not_used_again(tmp_path):
    """As a connection opened while the file was read-only stays read-only for good: after its
    write failed, the next run takes a fresh connection (PRAGMA query_only stands in for it)."""
    from maxtwo_cli.core import schema

    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}"))
    runner = HeldConnection(engine)
    try:
        schema.ensure_schema(engine)
        NOTES.create(engine)
        runner.run(lambda cursor: cursor.execute("PRAGMA query_only=ON"))
        with pytest.raises(MaxtwoError):
            insert_note(runner, "refused")
        insert_note(runner, "written")
        assert notes(engine) == {"written"}
    finally:
        runner.release()
        engine.dispose()
