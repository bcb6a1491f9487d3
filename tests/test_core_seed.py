from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa

from maxtwo_cli.core import db, schema
from maxtwo_cli.core import seed as seed_module
from maxtwo_cli.core.clock import utcnow
from maxtwo_cli.core.errors import AlreadySeededError, DatabaseBusyError, SchemaMismatchError
from maxtwo_cli.core.query import query_users
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.schema import users
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.conftest import libpq_url
from tests.helpers import distinct_updated_at, main_file_locked, points_histogram, state, user_rows


def test_seed_inserts_count_users_at_zero_points(engine):
    result = seed_users(engine, 10_000)
    assert result.rows == 10_000
    assert points_histogram(engine) == {0: 10_000}
    rows = user_rows(engine)
    assert [row.id for row in rows] == list(range(1, 10_001))
    assert len(distinct_updated_at(engine)) == 1
    assert rows[0].inserted_at == rows[0].updated_at
    assert rows[0].inserted_at.tzinfo is not None


def test_seed_spans_several_batches_in_one_transaction(engine, monkeypatch):
    monkeypatch.setattr(seed_module, "SEED_BATCH_SIZE", 300)
    progress = []
    seed_users(engine, 1_000, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(300, 1000), (600, 1000), (900, 1000), (1000, 1000)]
    assert [row.id for row in user_rows(engine)] == list(range(1, 1_001))


def test_a_count_that_fills_its_last_batch_reports_each_batch_once(engine, monkeypatch):
    """A loop running one batch past count inserted nothing more but reported the end twice."""
    monkeypatch.setattr(seed_module, "SEED_BATCH_SIZE", 300)
    progress = []
    seed_users(engine, 600, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(300, 600), (600, 600)]


@pytest.mark.parametrize("count", [1, 301, 601])
def test_a_last_batch_of_one_user_is_seeded(engine, monkeypatch, count):
    """Counts one past a batch boundary: a loop stopping short of count + 1 left that user out."""
    monkeypatch.setattr(seed_module, "SEED_BATCH_SIZE", 300)
    assert seed_users(engine, count).rows == count
    assert [row.id for row in user_rows(engine)] == list(range(1, count + 1))


@pytest.mark.parametrize(("earlier", "count"), [(0, 0), (0, 1), (0, 5), (7, 3)])
def test_a_user_added_after_a_seed_gets_the_next_id(engine, earlier, count):
    """A later plain insert works: PostgreSQL's COPY gives the ids itself, past the identity's
    sequence, and the seed moves the sequence on (back, after a reset to fewer users), or a
    user added by hand later collided with user 1 (or skipped ids)."""
    if earlier:
        seed_users(engine, earlier)
    seed_users(engine, count, reset=bool(earlier))
    now = utcnow()
    with engine.begin() as conn:
        added = conn.scalar(users.insert().values(points=0, inserted_at=now, updated_at=now).returning(users.c.id))
    assert added == count + 1


def test_seed_refuses_existing_users_without_reset(engine):
    seed_users(engine, 100)
    before = state(engine)
    with pytest.raises(AlreadySeededError, match="--reset"):
        seed_users(engine, 50)
    assert len(user_rows(engine)) == 100
    assert state(engine).epoch == before.epoch


def test_reset_replaces_users_and_forgets_the_query_state(engine):
    seed_users(engine, 500)
    randomize_points(engine)
    query_users(engine)
    before = state(engine)
    assert before.last_query_at is not None

    seed_users(engine, 200, reset=True)

    after = state(engine)
    assert after.epoch > before.epoch
    assert after.last_query_at is None
    assert points_histogram(engine) == {0: 200}
    assert [row.id for row in user_rows(engine)] == list(range(1, 201))
    assert query_users(engine).previous is None


def test_reset_draws_a_new_max_number(engine):
    seed_users(engine, 10)
    # 1 in 101 chance each time to draw the same number again; eight resets never all do.
    drawn = {state(engine).max_number}
    for _ in range(8):
        seed_users(engine, 10, reset=True)
        drawn.add(state(engine).max_number)
    assert len(drawn) > 1


def test_seed_count_zero_is_valid(engine):
    result = seed_users(engine, 0)
    assert result.rows == 0
    assert user_rows(engine) == []
    # An empty table may be seeded later.
    seed_users(engine, 5)
    assert len(user_rows(engine)) == 5


def test_seed_advances_the_epoch(engine):
    before = state(engine).epoch
    seed_users(engine, 10)
    assert state(engine).epoch == before + 1


def test_negative_count_is_rejected(engine):
    with pytest.raises(ValueError):
        seed_users(engine, -1)


def interrupt(done: int, total: int) -> None:
    raise RuntimeError("interrupted")


def test_a_seed_that_cannot_have_the_file_says_so_in_one_line(tmp_path):
    """Another process's write transaction holds the SQLite file past the busy timeout: a
    DatabaseBusyError that names the file, as every other command's (the CLI prints it as one
    line), not the driver's error."""
    with main_file_locked(tmp_path) as engine, pytest.raises(DatabaseBusyError, match="stayed locked by another"):
        seed_users(engine, 10)


def test_a_failed_seed_leaves_the_users_and_the_table_as_they_were(engine):
    seed_users(engine, 500)
    before = state(engine)
    with pytest.raises(RuntimeError, match="interrupted"):
        seed_users(engine, 1_000, reset=True, on_progress=interrupt)
    assert [row.id for row in user_rows(engine)] == list(range(1, 501))
    assert state(engine) == before
    seed_users(engine, 300, reset=True)  # the table still works as before
    assert [row.id for row in user_rows(engine)] == list(range(1, 301))


@pytest.mark.parametrize(
    "id_column",
    [
        "id INTEGER PRIMARY KEY AUTOINCREMENT",  # goes on after the largest id it ever held
        "id BIGINT NOT NULL PRIMARY KEY",  # no rowid alias: SQLite gives no id at all
    ],
)
def test_a_users_table_that_does_not_number_from_1_is_not_seeded(tmp_path, id_column):
    # SQLite numbers the seeded rows itself; a table that is not maxtwo's (same columns) may not.
    # (Beside maxtwo's other tables: without randomizer_state, ensure_schema refuses it first.)
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'other.db'}"))
    try:
        schema.ensure_schema(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE users"))
            conn.execute(sa.text(
                f"CREATE TABLE users ({id_column}, points SMALLINT NOT NULL, "
                "inserted_at BIGINT NOT NULL, updated_at BIGINT NOT NULL)"
            ))
            conn.execute(sa.text("INSERT INTO users VALUES (5, 0, 0, 0)"))
        schema.ensure_schema(engine)
        before = state(engine)
        with pytest.raises(SchemaMismatchError, match="not maxtwo's: it refused new users or did not number them 1, 2, 3"):
            seed_users(engine, 3, reset=True)
        assert [row.id for row in user_rows(engine)] == [5]
        assert state(engine) == before
    finally:
        engine.dispose()


def test_postgres_bulk_load_leaves_the_table_definition_as_it_was(postgres_engine):
    # The load drops the primary key and gives the timestamps defaults for its own length;
    # afterwards (committed or not) the table must be exactly maxtwo's again.
    def definition() -> tuple:
        with postgres_engine.connect() as conn:
            constraints = conn.execute(sa.text(
                "SELECT conname, contype FROM pg_constraint WHERE conrelid = 'users'::regclass ORDER BY 1"
            )).all()
            defaults = conn.execute(sa.text(
                "SELECT column_name, column_default FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'users' ORDER BY 1"
            )).all()
            options = conn.scalar(sa.text("SELECT reloptions FROM pg_class WHERE oid = 'users'::regclass"))
        return constraints, defaults, options

    original = definition()
    assert ("users_pkey", "p") in original[0] and original[2] == ["fillfactor=50"]
    seed_users(postgres_engine, 2_000)
    assert definition() == original
    with pytest.raises(RuntimeError, match="interrupted"):
        seed_users(postgres_engine, 2_000, reset=True, on_progress=interrupt)
    assert definition() == original


def test_a_seed_refreshes_the_statistics_without_a_warning(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="maxtwo_cli.core.seed"):
        result = seed_users(engine, 1_000)
    assert result.statistics_warning is None
    assert not caplog.records


def test_two_first_seeds_at_once_one_seeds_and_the_other_is_told_so(postgres_engine):
    """The second waits for the first (the state row's lock), then finds its users: without
    that wait both counted no users and met at the load's TRUNCATE, a deadlock."""
    first_inside, outcome = threading.Event(), {}

    @sa.event.listens_for(postgres_engine, "before_cursor_execute")
    def hold_the_first_seed(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("TRUNCATE") and threading.current_thread().name == "first":
            first_inside.set()
            time.sleep(1.0)  # its transaction open: the second seed starts meanwhile

    def seed(name: str, count: int) -> None:
        try:
            outcome[name] = seed_users(postgres_engine, count)
        except Exception as ex:  # noqa: BLE001 - handed to the test
            outcome[name] = ex

    first = threading.Thread(target=seed, args=("first", 10), name="first")
    first.start()
    assert first_inside.wait(30)
    second = threading.Thread(target=seed, args=("second", 20))
    second.start()
    first.join(30)
    second.join(30)
    sa.event.remove(postgres_engine, "before_cursor_execute", hold_the_first_seed)
    assert getattr(outcome["first"], "rows", None) == 10, outcome
    assert isinstance(outcome["second"], AlreadySeededError), outcome


def test_a_seed_with_reset_beside_randomizations_waits_its_turn_on_sqlite(tmp_path):
    """A seed takes SQLite's write lock up front (BEGIN IMMEDIATE): begun deferred, it failed
    with SQLITE_BUSY_SNAPSHOT ("stayed locked") whenever a randomization committed between
    its first read and its first write."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", statement_timeout=10.0))
    schema.ensure_schema(engine)
    seed_users(engine, 20_000)
    stop, errors = threading.Event(), []

    def randomize_until_stopped() -> None:
        while not stop.is_set():
            try:
                randomize_points(engine)
            except Exception as ex:  # noqa: BLE001 - reported below
                errors.append(ex)

    randomizer = threading.Thread(target=randomize_until_stopped)
    randomizer.start()
    try:
        for _ in range(15):
            try:
                seed_users(engine, 20_000, reset=True)
            except Exception as ex:  # noqa: BLE001 - reported below
                errors.append(ex)
    finally:
        stop.set()
        randomizer.join(30)
        engine.dispose()
    assert errors == []


@pytest.mark.parametrize("vacuum_fails", [False, True], ids=["vacuumed", "vacuum-failed"])
def test_the_connection_a_seed_vacuumed_on_goes_back_to_the_pool_with_its_bounds(postgres_url, monkeypatch,
                                                                                  vacuum_fails):
    """The VACUUM after a seed runs without the engine's statement bound: its connection must
    not go back to the pool that way (every later request on it unbounded) nor stay in it dead."""
    engine = db.create_engine(Settings(database_url=postgres_url, statement_timeout=7.0), pool_size=1)
    schema.ensure_schema(engine)
    with engine.connect() as conn:
        bounds = [conn.exec_driver_sql(f"SHOW {name}").scalar() for name in ("statement_timeout", "lock_timeout")]
    assert bounds[0] == "7s"
    monkeypatch.setattr(seed_module, "VACUUM_LOCK_TIMEOUT", 0.2)
    other = LockAfterCommit(postgres_url) if vacuum_fails else None
    try:
        result = seed_users(engine, 100, on_progress=other.on_progress if other else None)
        assert (result.statistics_warning is not None) == vacuum_fails
        with engine.connect() as conn:
            assert [conn.exec_driver_sql(f"SHOW {name}").scalar() for name in ("statement_timeout", "lock_timeout")] == bounds
    finally:
        if other:
            other.done()
        engine.dispose()


class LockAfterCommit:
    """Another session that asks for a lock on users while the seed's transaction holds it, so
    it gets the lock the moment the seed commits, before the VACUUM that follows: the VACUUM
    then waits for it for real. `terminate`: end the waiting VACUUM's connection instead, as if
    the database went away."""

    def __init__(self, url: str, *, terminate: bool = False) -> None:
        self.url = libpq_url(url)
        self.terminate = terminate
        self.release = threading.Event()
        self.errors: list[BaseException] = []
        self.thread: threading.Thread | None = None
        self.pid: int | None = None
        self.opened = threading.Event()

    def on_progress(self, done: int, total: int) -> None:
        """Seed progress: at the end of the load (still in the seed's transaction), queue the lock."""
        if done < total:
            return
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        assert self.opened.wait(10)
        with psycopg.connect(self.url, autocommit=True) as watcher:
            assert wait_until(lambda: watcher.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (self.pid,)
            ).fetchone()[0] == 1), "the other session never queued for the lock"

    def _hold(self) -> None:
        try:
            with psycopg.connect(self.url) as conn:
                self.pid = conn.info.backend_pid
                self.opened.set()
                conn.execute("LOCK TABLE users IN SHARE UPDATE EXCLUSIVE MODE")
                if self.terminate:
                    self._terminate_vacuum()
                self.release.wait(10)
                conn.rollback()
        except BaseException as ex:  # noqa: BLE001 - reported by done()
            self.errors.append(ex)

    def _terminate_vacuum(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as killer:
            def waiting_vacuum() -> int | None:
                row = killer.execute(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'VACUUM%%' "
                    "AND wait_event_type = 'Lock'"
                ).fetchone()
                return row[0] if row else None

            assert wait_until(lambda: waiting_vacuum() is not None), "no VACUUM ever waited"
            killer.execute("SELECT pg_terminate_backend(%s)", (waiting_vacuum(),))

    def done(self) -> None:
        self.release.set()
        if self.thread is not None:
            self.thread.join(10)
        assert not self.errors


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    ("terminate", "reason"),
    [(False, "lock timeout"), (True, "terminating connection")],
    ids=["lock-timeout", "connection-ended"],
)
def test_a_failed_vacuum_after_a_committed_seed_is_a_warning(
    postgres_engine, postgres_url, monkeypatch, caplog, terminate, reason
):
    monkeypatch.setattr(seed_module, "VACUUM_LOCK_TIMEOUT", 10.0 if terminate else 0.2)
    seed_users(postgres_engine, 100)
    before = state(postgres_engine)
    other = LockAfterCommit(postgres_url, terminate=terminate)
    try:
        with caplog.at_level(logging.WARNING, logger="maxtwo_cli.core.seed"):
            result = seed_users(postgres_engine, 2_000, reset=True, on_progress=other.on_progress)
        # The seed returned and its rows are committed (read while the other session still
        # holds its lock, which does not keep readers out).
        assert result.rows == 2_000
        assert [row.id for row in user_rows(postgres_engine)] == list(range(1, 2_001))
        assert state(postgres_engine).epoch == before.epoch + 1
    finally:
        other.done()
    assert result.statistics_warning is not None and reason in result.statistics_warning
    [record] = [record for record in caplog.records if record.name == "maxtwo_cli.core.seed"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "\n" not in message
    assert "seeded 2000 users, but the planner's statistics were not refreshed" in message
    assert reason in message
    password = sa.make_url(postgres_url).password
    if password:
        assert password not in message and password not in caplog.text
    # The pool is not left with a dead or unbounded connection: the next seed vacuums fine.
    caplog.clear()
    assert seed_users(postgres_engine, 10, reset=True).statistics_warning is None
