from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from maxtwo_cli.core import combiner as combiner_module
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.combiner import QueryCombiner
from maxtwo_cli.core.errors import DatabaseUnavailableError
from maxtwo_cli.core.query import AnswerCache, BatchRunner, query_users, query_users_batch
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import assert_chain, run_in_threads, state


@pytest.fixture
def seeded(engine):
    seed_users(engine, 1000)
    randomize_points(engine)
    return engine


def test_a_batch_is_a_chain_in_one_transaction(seeded):
    before = query_users(seeded)
    batch = query_users_batch(seeded, 5)
    assert batch[0].previous == before.recorded_at
    for earlier, later in zip(batch, batch[1:]):
        assert later.previous == earlier.recorded_at
        assert later.recorded_at > earlier.recorded_at
    assert len({result.users for result in batch}) == 1
    assert state(seeded).last_query_at == batch[-1].recorded_at
    assert query_users(seeded).previous == batch[-1].recorded_at


def test_batch_count_must_be_positive(seeded):
    with pytest.raises(ValueError):
        query_users_batch(seeded, 0)


def test_a_runner_holds_one_connection_from_batch_to_batch_until_released(seeded):
    runner = BatchRunner(seeded)
    first = runner.run(2)
    assert seeded.pool.checkedout() == 1
    second = runner.run(3)
    assert seeded.pool.checkedout() == 1
    assert_chain([*first, *second])
    runner.release()
    assert seeded.pool.checkedout() == 0
    runner.release()  # twice is harmless


def test_a_runner_drops_a_connection_the_server_closed_and_takes_a_fresh_one(postgres_engine):
    seed_users(postgres_engine, 100)
    runner = BatchRunner(postgres_engine)
    before = runner.run(1)[0]
    held = runner._pooled.driver_connection
    with postgres_engine.begin() as other:
        other.execute(sa.select(sa.func.pg_terminate_backend(held.info.backend_pid)))
    old_pool = postgres_engine.pool
    with pytest.raises(DatabaseUnavailableError):
        runner.run(1)
    assert old_pool.checkedout() == 0 and runner._pooled is None  # dropped, not kept
    assert postgres_engine.pool is not old_pool  # the pool was started afresh
    after = runner.run(1)[0]
    assert runner._pooled.driver_connection is not held
    assert after.previous == before.recorded_at  # the failed batch recorded nothing
    runner.release()


def test_an_idle_committer_gives_its_connection_back(seeded, monkeypatch):
    monkeypatch.setattr(combiner_module, "_IDLE_SECONDS", 0.2)
    combiner = QueryCombiner(seeded, max_wait=30)
    run_in_threads(combiner.query, threads=4, per_thread=5)
    deadline = time.monotonic() + 10
    while seeded.pool.checkedout() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seeded.pool.checkedout() == 0
    assert combiner.query().previous is not None  # and a new committer starts on demand


def test_concurrent_callers_share_transactions_and_keep_the_chain(seeded):
    sizes: list[int] = []
    combiner = QueryCombiner(seeded, AnswerCache(), max_wait=30, on_batch=sizes.append)
    results = run_in_threads(combiner.query, threads=16, per_thread=20)

    assert len(results) == 320
    assert sum(sizes) == 320
    assert max(sizes) > 1  # 16 threads at once: some of them shared a transaction
    assert len(sizes) < 320
    assert_chain(results)


def test_query_many_is_a_chain_of_answers_from_one_batch(seeded):
    sizes: list[int] = []
    combiner = QueryCombiner(seeded, AnswerCache(), max_wait=30, on_batch=sizes.append)
    before = combiner.query()
    many = combiner.query_many(5)
    assert sizes == [1, 5]
    assert many[0].previous == before.recorded_at
    assert_chain([before, *many] if before.previous is None else [*many])
    assert state(seeded).last_query_at == many[-1].recorded_at
    with pytest.raises(ValueError):
        combiner.query_many(0)
    combiner.close(5)


def test_waiters_for_several_answers_are_batched_whole_within_max_batch(seeded, monkeypatch):
    running, release = threading.Event(), threading.Event()
    real_run = BatchRunner.run

    def held_run(self, count):
        running.set()
        release.wait(10)  # the first batch runs only once the others have queued
        return real_run(self, count)

    monkeypatch.setattr(BatchRunner, "run", held_run)
    sizes: list[int] = []
    combiner = QueryCombiner(seeded, max_wait=30, max_batch=4, on_batch=sizes.append)
    first = threading.Thread(target=combiner.query)
    first.start()
    assert running.wait(10)
    answers: list[list] = []
    queued = [threading.Thread(target=lambda: answers.append(combiner.query_many(3))) for _ in range(3)]
    for thread in queued:
        thread.start()
    deadline = time.monotonic() + 10
    while len(combiner._waiting) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *queued]:
        thread.join(20)
    # Two waiters for 3 would make a batch of 6, over max_batch; one is never split.
    assert sizes == [1, 3, 3, 3]
    assert sorted(len(batch) for batch in answers) == [3, 3, 3]
    for batch in answers:
        for earlier, later in zip(batch, batch[1:]):
            assert later.previous == earlier.recorded_at
    combiner.close(5)


def test_a_prefetched_answer_is_returned_once_without_asking_the_database(seeded):
    sizes: list[int] = []
    combiner = QueryCombiner(seeded, max_wait=30, on_batch=sizes.append)
    fetched = combiner.query_many(1)[0]
    others: list = []
    with combiner.prefetched(fetched):
        other = threading.Thread(target=lambda: others.append(combiner.query()))
        other.start()
        other.join(10)
        assert combiner.query() is fetched  # for this thread only, and once
        after = combiner.query()
    assert sizes == [1, 1, 1]  # the prefetched answer cost no batch
    assert others[0].recorded_at not in (fetched.recorded_at, after.recorded_at)
    assert combiner.query().previous == after.recorded_at  # the context is gone
    combiner.close(5)


def test_a_prefetched_error_is_raised_as_this_callers_own_copy(seeded):
    combiner = QueryCombiner(seeded, max_wait=30)
    shared = DatabaseUnavailableError("the database went away")
    with combiner.prefetched(shared), pytest.raises(DatabaseUnavailableError, match="went away") as raised:
        combiner.query()
    assert raised.value is not shared
    assert combiner.query() is not None  # only once, and only inside
    combiner.close(5)


def test_every_waiter_of_a_failing_batch_gets_the_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    engine = db.create_engine(Settings(database_url=f"sqlite:///{blocker / 'maxtwo.db'}"))
    combiner = QueryCombiner(engine, max_wait=30)
    errors = []

    def worker() -> None:
        try:
            combiner.query()
        except DatabaseUnavailableError as ex:
            errors.append(ex)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 8
    assert not any(thread.is_alive() for thread in threads)


def test_every_caller_gives_up_after_max_wait_while_the_transaction_is_stuck(tmp_path):
    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url, statement_timeout=20))
    schema.ensure_schema(engine)
    holder = db.create_engine(Settings(database_url=url)).connect()
    holder.begin()  # the write lock: the committer's UPDATE waits for it up to 20 s
    combiner = QueryCombiner(engine, max_wait=3)
    outcomes: list[tuple[float, object]] = []

    def caller() -> None:
        started = time.monotonic()
        outcome = _try(combiner.query)
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
    assert all(2.9 < waited < 6 for waited, _ in outcomes)
    # Once the lock is free, the stuck batch commits and the next callers are answered.
    assert combiner.query().previous is not None
    engine.dispose()


def _try(function):
    try:
        return function()
    except Exception as ex:  # noqa: BLE001 - the outcome is what the test looks at
        return ex


def test_an_answer_that_comes_after_its_caller_gave_up_harms_nobody(seeded, monkeypatch):
    release = threading.Event()
    real_run = BatchRunner.run

    def slow_run(self, count):
        release.wait(10)
        return real_run(self, count)

    monkeypatch.setattr(BatchRunner, "run", slow_run)
    crashes: list = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    combiner = QueryCombiner(seeded, max_wait=0.3)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError):
        combiner.query()  # its batch is running when it gives up
    assert 0.25 < time.monotonic() - started < 5
    release.set()  # the batch commits and answers the caller that left
    monkeypatch.setattr(BatchRunner, "run", real_run)
    assert combiner.query().previous is not None  # the committer lives on
    combiner.close(5)
    assert not crashes
    assert seeded.pool.checkedout() == 0


def test_close_ends_the_committer_and_gives_its_connection_back(seeded):
    combiner = QueryCombiner(seeded, max_wait=30)
    combiner.query()
    assert seeded.pool.checkedout() == 1  # held between batches
    combiner.close(5)
    assert seeded.pool.checkedout() == 0
    assert not combiner._committer.is_alive()


def test_sqlite_query_transactions_queue_on_the_writers_lock(tmp_path):
    import fcntl

    url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    engine = db.create_engine(Settings(database_url=url))
    schema.ensure_schema(engine)
    seed_users(engine, 10)
    query_users(engine)
    lock_file = tmp_path / "maxtwo.db-writers"
    assert lock_file.exists()
    with open(lock_file) as held:  # another process's writer, in the middle of its transaction
        fcntl.flock(held, fcntl.LOCK_EX)
        done = threading.Event()
        thread = threading.Thread(target=lambda: (query_users(engine), done.set()))
        thread.start()
        assert not done.wait(0.5)  # it waits for the lock...
        fcntl.flock(held, fcntl.LOCK_UN)
        assert done.wait(10)  # ...and goes the moment it is free
    thread.join()
    engine.dispose()
