"""Fault injection against the real daemon and real databases (`pytest -m fault`).

Each test records what it measured in the session's reliability report (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from devtools.pgserver import ThrowawayPostgres
from maxtwo_cli.core import db
from maxtwo_cli.core.randomize import RANDOMIZE_LOCK_KEY
from maxtwo_cli.core.schema import randomizer_state, users
from maxtwo_cli.core.settings import Settings
from tests.conftest import libpq_url
from tests.helpers import ClientThreads, distinct_updated_at, state, wait_for
from tests.serve_process import MAXTWO, ServeProcess, get

pytestmark = [pytest.mark.fault, pytest.mark.slow]  # 5-30 s each: outages, kills, full disks

# NOTE: the bounds below tell a bounded wait from a hang or a pile-up, with slack for a loaded
# 2-core machine; docs/reliability.md records what was actually measured.
SLACK = 3.0  # seconds on top of a timeout that bounds an answer
RECOVERY = 5.0  # seconds from the fault's end to the first 200


class Clients(ClientThreads):
    """A few threads requesting GET / (or `path`) back to back, recording (start, latency, status)."""

    def __init__(self, base: str, threads: int = 4, path: str = "/") -> None:
        super().__init__(threads, join_seconds=60)
        self.base = base
        self.path = path
        self.samples: list[tuple[float, float, int | str]] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = get(self.base + self.path, timeout=30)[0]
            except OSError as ex:
                status = type(ex).__name__
            with self._lock:
                self.samples.append((started, time.monotonic() - started, status))

    def between(self, start: float, end: float) -> list[tuple[float, float, int | str]]:
        return [sample for sample in self.samples if start <= sample[0] < end]


def test_database_outage_under_load(tmp_path, reliability):
    with ThrowawayPostgres(fsync=False) as server:
        engine = db.create_engine(Settings(database_url=server.url))
        with ServeProcess(server.url, interval=1, seed_count=2000) as daemon:
            daemon.start(tmp_path / "serve.log")
            with Clients(daemon.base) as clients:
                time.sleep(1.0)
                server.stop()
                down_at = time.monotonic()
                time.sleep(5.0)
                starting_at = time.monotonic()
                server.start()
                back_at = time.monotonic()
                epoch = state(engine).epoch
                recovered_at = None
                while time.monotonic() - back_at < 10:
                    done = [s for s in clients.between(back_at, time.monotonic()) if s[2] == 200]
                    if done:
                        recovered_at = min(s[0] + s[1] for s in done)
                        break
                    time.sleep(0.05)
                time.sleep(1.5)
            # Requests made and answered entirely while the server was down.
            during = [s for s in clients.between(down_at, starting_at) if s[0] + s[1] <= starting_at]
            statuses = {s[2] for s in during}
            new_epoch = state(engine).epoch
            assert daemon.process.poll() is None  # never crashed
            assert daemon.terminate() == 0
        engine.dispose()

    assert during and statuses <= {503}  # every request in the outage: a 503, no 500, no hang
    worst = max(s[1] for s in during)
    assert worst < 5 + SLACK  # the 5 s connect timeout bounds every answer
    assert recovered_at is not None and recovered_at - back_at < RECOVERY
    assert new_epoch > epoch  # the scheduler randomized again after the outage
    reliability.record(
        "A database outage under load: 503s, then recovery without a restart",
        "A real PostgreSQL server is stopped for 5 s under a running `maxtwo serve` "
        "(`--interval 1`) while 4 clients request `GET /` back to back, then started again.",
        [
            (f"requests during the outage: {len(during)}, all answered 503 (statuses seen: "
             f"{sorted(map(str, statuses))})"),
            (f"slowest answer during the outage: {worst * 1000:.0f} ms; median "
             f"{statistics.median(s[1] for s in during) * 1000:.0f} ms"),
            f"first 200 after the server came back: {(recovered_at - back_at) * 1000:.0f} ms later",
            f"randomizations after recovery: epoch {epoch} -> {new_epoch}; daemon exit code 0",
        ],
    )


def start_for_a_boundary(daemon: ServeProcess, engine: sa.Engine, tmp_path: Path, interval: float) -> float:
    """Start the daemon; once its start's run is done, the next boundary at least 3 s away."""
    daemon.start(tmp_path / "serve.log")
    wait_for(lambda: state(engine).randomized_at is not None, "the start's randomization (its slot's)")
    boundary = (time.time() // interval + 1) * interval
    return boundary + interval if boundary - time.time() < 3 else boundary


def test_a_randomization_an_outage_at_its_boundary_failed_is_made_up_within_its_slot(tmp_path, reliability):
    """A database down for a few seconds at the boundary left the points as they were for the
    whole interval (a day at --interval 86400), on every daemon."""
    interval = 10
    with ThrowawayPostgres(fsync=False) as server:
        engine = db.create_engine(Settings(database_url=server.url))
        with ServeProcess(server.url, interval=interval, seed_count=2000) as daemon:
            boundary = start_for_a_boundary(daemon, engine, tmp_path, interval)
            time.sleep(max(0.0, boundary - 1.5 - time.time()))
            epoch_before = state(engine).epoch  # (the slot before's run done, 8.5 s ago)
            engine.dispose()
            server.stop()
            time.sleep(max(0.0, boundary + 1.5 - time.time()))
            server.start()
            back_at = time.time()
            wait_for(lambda: state(engine).epoch > epoch_before, "a randomization after the outage", interval)
            with engine.connect() as conn:
                scheduled_for, randomized_at, epoch_after = conn.execute(
                    sa.select(randomizer_state.c.scheduled_for, randomizer_state.c.randomized_at,
                              randomizer_state.c.epoch)
                ).one()
            assert daemon.terminate() == 0
        engine.dispose()
    log = (tmp_path / "serve.log").read_text(encoding="utf-8")
    assert epoch_after == epoch_before + 1
    assert scheduled_for.timestamp() == boundary  # the slot the outage failed, made up
    assert randomized_at.timestamp() < boundary + interval / 2  # within the first half of its slot
    assert "failed: " in log and "retrying in" in log
    reliability.record(
        "An outage at a randomization's boundary: the slot is made up within it",
        f"A real PostgreSQL server is stopped 1.5 s before a boundary of a running `maxtwo serve "
        f"--interval {interval}` and started again 1.5 s after it.",
        [
            (f"the slot's run failed, then was retried: randomized {randomized_at.timestamp() - boundary:.1f} s "
             f"after its boundary ({randomized_at.timestamp() - back_at:.1f} s after the server was back), "
             f"for that slot; epoch {epoch_before} -> {epoch_after}"),
        ],
    )


def test_a_slot_whose_run_elsewhere_rolled_back_is_run_within_its_slot(tmp_path, reliability):
    """Another daemon's run held the lock at the boundary and was rolled back (that daemon was
    stopped mid-run): this daemon had taken the slot for done, and no daemon ran it (an audit).
    Here the test holds the same lock across the boundary, as that run did, and rolls back."""
    interval = 10
    with ThrowawayPostgres(fsync=False) as server:
        engine = db.create_engine(Settings(database_url=server.url))
        with ServeProcess(server.url, interval=interval, seed_count=2000) as daemon:
            boundary = start_for_a_boundary(daemon, engine, tmp_path, interval)
            with engine.connect() as holder:
                time.sleep(max(0.0, boundary - 1 - time.time()))
                epoch_before = state(engine).epoch  # (the slot before's run done, 9 s ago)
                holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
                time.sleep(max(0.0, boundary + 2 - time.time()))
                holder.rollback()
            released_at = time.time()
            wait_for(lambda: state(engine).epoch > epoch_before, "the slot's run after the rollback", interval)
            with engine.connect() as conn:
                scheduled_for, randomized_at = conn.execute(
                    sa.select(randomizer_state.c.scheduled_for, randomizer_state.c.randomized_at)
                ).one()
            assert daemon.terminate() == 0
        engine.dispose()
    log = (tmp_path / "serve.log").read_text(encoding="utf-8")
    assert scheduled_for.timestamp() == boundary  # that slot, run after all
    # Once the lock was let go (the daemon waited for it), within the first half of its slot.
    assert released_at - 0.5 < randomized_at.timestamp() < boundary + interval / 2
    assert "failed" not in log and "left to another" not in log
    reliability.record(
        "A slot whose run elsewhere rolled back: run within the slot",
        f"The test holds the scheduled runs' advisory lock from 1 s before a boundary of a running "
        f"`maxtwo serve --interval {interval}` (on a real PostgreSQL) until 2 s after it, as another "
        f"daemon's run stopped mid-run would, and then rolls back.",
        [
            (f"the daemon waited for the lock, then ran that slot: randomized "
             f"{randomized_at.timestamp() - boundary:.1f} s after its boundary "
             f"({randomized_at.timestamp() - released_at:.1f} s after the rollback)"),
        ],
    )


def test_a_database_restart_fails_no_request_made_once_it_is_back(tmp_path, reliability):
    increment = (b'{"key": "a", "value": 1}', {"Content-Type": "application/json"})
    routes = ("/healthz", "/", "/counters/a")
    with ThrowawayPostgres(fsync=False) as server, ServeProcess(server.url, interval=60, seed_count=100) as daemon:
        daemon.start(tmp_path / "serve.log")
        # Every route once: connections wait in the pool, and each committer holds its own.
        before = [daemon.post("/increment", *increment)[0], *(daemon.get(path)[0] for path in routes)]
        postmaster = server._postmaster_pid()
        restarting = time.monotonic()
        server.restart()
        restarted_after = time.monotonic() - restarting
        # The answers below prove something only if the server did go away and come back.
        assert server._postmaster_pid() not in (None, postmaster)
        after = {path: daemon.get(path)[0] for path in routes}
        after["/increment"] = daemon.post("/increment", *increment)[0]
        assert daemon.terminate() == 0
    assert before == [202, 200, 200, 200]
    # Each route used to answer its first request after the restart 503: its connection, closed
    # by the server, was found out only by the statement that failed on it.
    assert after == {"/healthz": 200, "/": 200, "/counters/a": 200, "/increment": 202}, daemon.log()
    reliability.record(
        "A database restart: no request fails once it is back",
        "Every route of a running `maxtwo serve` is requested once, so that its connections wait in "
        "the pool or are held by the committers; the PostgreSQL server is restarted; then every "
        "route is requested again.",
        [f"the restart took {restarted_after:.1f} s; the first request to each route after it: "
         + ", ".join(f"`{path}` {status}" for path, status in after.items())],
    )


def test_stuck_lock_turns_into_503_within_the_statement_timeout(database_url, tmp_path, reliability):
    with ServeProcess(database_url, interval=60, seed_count=2000) as daemon:
        daemon.start(tmp_path / "serve.log")
        assert daemon.get("/")[0] == 200
        if database_url.startswith("postgresql"):
            holder = psycopg.connect(libpq_url(database_url))
            holder.execute("SELECT * FROM query_state FOR UPDATE")  # a transaction stays open
        else:
            holder = db.create_engine(Settings(database_url=database_url)).connect()
            holder.begin()  # BEGIN IMMEDIATE: the write lock
            holder.execute(users.update().where(users.c.id == 1).values(points=1))
        with Clients(daemon.base, threads=8) as clients:
            time.sleep(8)
            holder.rollback()
            released_at = time.monotonic()
            time.sleep(1.5)
        holder.close()
        stuck = clients.between(0, released_at - 6)
        after = clients.between(released_at + 0.5, time.monotonic())
        threads_alive = daemon.metric("maxtwo_query_batch_size_count")
        assert daemon.terminate() == 0

    assert stuck and {s[2] for s in stuck} == {503}
    slowest = max(s[1] for s in stuck)
    assert slowest < 5 + SLACK  # the 5 s statement (or busy) timeout, not a pile-up
    assert after and {s[2] for s in after} == {200}
    kind = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite"
    reliability.record(
        f"A stuck lock ({kind}): 503 within the statement timeout, then recovery",
        "A test connection holds the lock a query needs (PostgreSQL: `SELECT ... FOR UPDATE` on the "
        "query-state row; SQLite: the write lock) for 8 s while 8 clients request `GET /`.",
        [
            (f"requests answered while the lock was held: {len(stuck)}, all 503; slowest "
             f"{slowest * 1000:.0f} ms (statement timeout 5 s)"),
            f"requests after the release: {len(after)}, all 200",
            f"query transactions run by the daemon in all: {threads_alive:.0f}",
        ],
    )


def test_a_counter_held_by_another_transaction_holds_up_no_query(postgres_url, tmp_path, reliability):
    # PostgreSQL: another transaction (an operator's, or another daemon's batch) holds a
    # counter's row. The increment waits for it and fails alone at the statement timeout;
    # GET / neither waits with it nor shares its 503 (a lane and a committer per kind).
    with ServeProcess(postgres_url, interval=3600, seed_count=2000) as daemon:
        daemon.start(tmp_path / "serve.log")
        increment = (b'{"key": "held", "value": 1}', {"Content-Type": "application/json"})
        assert daemon.post("/increment", *increment)[0] == 202
        holder = psycopg.connect(libpq_url(postgres_url))
        holder.execute("SELECT * FROM counters WHERE key = 'held' FOR UPDATE")  # a transaction stays open
        posted: list[tuple[int, float]] = []

        def post() -> None:
            started = time.monotonic()
            posted.append((daemon.post("/increment", *increment, timeout=30)[0], time.monotonic() - started))

        poster = threading.Thread(target=post)
        poster.start()
        with Clients(daemon.base, threads=8) as clients:
            time.sleep(7)  # past the increment's statement timeout (5 s)
        holder.rollback()
        holder.close()
        poster.join(30)
        assert daemon.post("/increment", *increment)[0] == 202  # the lock gone
        total = daemon.get("/counters/held")[1]["value"]
        assert daemon.terminate() == 0

    [(status, waited)] = posted
    assert status == 503 and 5 - 0.5 < waited < 5 + SLACK
    assert total == 2  # the 503'd increment was not applied
    queries = clients.samples
    assert queries and {sample[2] for sample in queries} == {200}
    slowest = max(sample[1] for sample in queries)
    assert slowest < 3.0  # not behind the increment's lock (5 s)
    reliability.record(
        "A counter's row held by another transaction (PostgreSQL): GET / goes on",
        "A test connection holds one counter's row (`SELECT ... FOR UPDATE`) for 7 s; one client "
        "posts an increment of that key while 8 clients request `GET /`.",
        [
            f"the increment: {status} after {waited * 1000:.0f} ms (statement timeout 5 s), not applied",
            f"`GET /` meanwhile: {len(queries)} requests, all 200; slowest {slowest * 1000:.0f} ms",
        ],
    )


def test_sigkill_during_a_randomization_leaves_nothing_half_done(tmp_path, reliability):
    rows = 1_000_000
    with ThrowawayPostgres(fsync=True) as server:
        engine = db.create_engine(Settings(database_url=server.url))
        with ServeProcess(server.url, interval=2, seed_count=rows) as daemon:
            daemon.start(tmp_path / "serve.log", wait=False)
            daemon.wait_ready(timeout=120)
            before = state(engine)
            # Wait until the daemon's UPDATE of every user is running, then kill it outright.
            deadline, running = time.monotonic() + 30, False
            with psycopg.connect(libpq_url(server.url), autocommit=True) as watcher:
                while not running and time.monotonic() < deadline:
                    running = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE 'UPDATE users SET points%'"
                    ).fetchone()[0] > 0
                    time.sleep(0.02)
                assert running
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait(10)
                # The server notices the dead client and rolls its transaction back.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'UPDATE users SET points%' "
                    "AND state <> 'idle'"
                ).fetchone()[0]:
                    time.sleep(0.1)
        after = state(engine)
        with engine.connect() as conn:
            stamps = conn.execute(sa.select(users.c.updated_at).distinct()).scalars().all()
            count = conn.scalar(sa.select(sa.func.count()).select_from(users))
        # The killed run either committed entirely (then it is the state's run) or not at all.
        assert len(stamps) == 1
        assert count == rows
        if after.epoch == before.epoch:
            outcome = "rolled back"
        else:
            outcome = "committed before the kill"
            assert stamps[0] == after.randomized_at
        with ServeProcess(server.url, interval=60, seed_count=rows) as restarted:
            started = time.monotonic()
            restarted.start(tmp_path / "restart.log")
            ready_in = time.monotonic() - started
            assert restarted.get("/")[0] == 200
            assert restarted.terminate() == 0
        engine.dispose()
    reliability.record(
        "A crash during a randomization: all or nothing",
        f"`maxtwo serve` (PostgreSQL, fsync on, {rows:,} users) is SIGKILLed while its UPDATE of "
        "every user runs (seen in pg_stat_activity); then the table is checked and a new daemon started.",
        [
            (f"the killed run: {outcome}; distinct updated_at values afterwards: {len(stamps)}; "
             f"rows: {count:,}; epoch {before.epoch} -> {after.epoch}"),
            f"a restarted daemon answered its first request {ready_in:.2f} s after start",
        ],
    )


def test_three_daemons_one_run_per_interval_and_a_killed_runner_is_replaced(postgres_url, tmp_path, reliability):
    interval = 2
    engine = db.create_engine(Settings(database_url=postgres_url))
    daemons = [ServeProcess(postgres_url, interval=interval, seed_count=2000) for _ in range(3)]
    try:
        for number, daemon in enumerate(daemons):
            daemon.start(tmp_path / f"serve-{number}.log")
        runs = lambda: [d.metric("maxtwo_randomize_duration_seconds_count") for d in daemons]  # noqa: E731
        # From the middle of one interval to the middle of another, 10 intervals later.
        time.sleep(interval * (int(time.time() / interval) + 1.5) - time.time())
        epoch_before, runs_before = state(engine).epoch, runs()
        time.sleep(10 * interval)
        epoch_after, runs_after = state(engine).epoch, runs()
        performed = [after - before for before, after in zip(runs_before, runs_after, strict=True)]
        assert epoch_after - epoch_before == 10
        assert sum(performed) == 10
        assert all(daemon.get("/")[0] == 200 for daemon in daemons)

        # Kill the daemon that did the last run, in the middle of the interval after it.
        last_runner = max(range(3), key=lambda n: float(daemons[n].metric(
            "maxtwo_randomize_last_success_timestamp_seconds")))
        daemons[last_runner].process.send_signal(signal.SIGKILL)
        daemons[last_runner].process.wait(10)
        next_boundary = interval * (int(time.time() / interval) + 1)
        # The next boundary's run, by a survivor: seen before the boundary after it (a loaded
        # machine may start it late, but not an interval late).
        known_epoch = state(engine).epoch
        time.sleep(max(0.0, next_boundary - time.time()))
        while state(engine).epoch == known_epoch and time.time() < next_boundary + interval - 0.2:
            time.sleep(0.05)
        after_kill = state(engine)
        late_by = after_kill.randomized_at.timestamp() - next_boundary
        assert after_kill.epoch == known_epoch + 1
        assert 0 <= late_by < interval
        survivors = [d for n, d in enumerate(daemons) if n != last_runner]
        assert all(daemon.get("/")[0] == 200 for daemon in survivors)
        for daemon in survivors:
            assert daemon.terminate() == 0
    finally:
        for daemon in daemons:
            daemon.stop()
        engine.dispose()
    reliability.record(
        "Several daemons: one randomization per interval between them",
        f"Three `maxtwo serve` processes share one PostgreSQL database with `--interval {interval}`; "
        "randomizations are counted over 10 intervals (database epoch and each daemon's metrics), "
        "then the daemon that performed the last run is SIGKILLed.",
        [
            (f"10 boundaries crossed: {epoch_after - epoch_before} randomizations in the database; "
             f"performed per daemon: {', '.join(f'{count:.0f}' for count in performed)}"),
            (f"after killing the last runner, the next boundary's run started {late_by * 1000:.0f} ms "
             "after the boundary, performed by a survivor"),
            "all daemons answered GET / with 200 throughout; the survivors exited 0 on SIGTERM",
        ],
    )


class FreezableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding: a database that goes silent without
    closing anything (a hung server, a network that drops packets)."""

    def __init__(self, target_port: int) -> None:
        import socket as socket_module

        self._socket_module = socket_module
        self.target_port = target_port
        self.listener = socket_module.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = self._socket_module.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()  # frozen: the bytes are taken in and go nowhere
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.flowing.set()
        self.listener.close()


@contextlib.contextmanager
def daemon_behind_a_freezable_proxy(postgres_url: str, tmp_path: Path,
                                    interval: float = 60) -> Iterator[tuple[ServeProcess, FreezableProxy]]:
    """`maxtwo serve` on PostgreSQL through a FreezableProxy, started and answering."""
    url = sa.make_url(postgres_url)
    proxy = FreezableProxy(url.port)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        with ServeProcess(proxied, interval=interval, seed_count=500) as daemon:
            daemon.start(tmp_path / "serve.log")
            assert daemon.get("/")[0] == 200
            yield daemon, proxy
    finally:
        proxy.close()


def test_a_database_that_goes_silent_gets_503s_not_a_hang(postgres_url, tmp_path, reliability):
    with daemon_behind_a_freezable_proxy(postgres_url, tmp_path) as (daemon, proxy):
        proxy.flowing.clear()
        with Clients(daemon.base, threads=4) as clients:
            time.sleep(20)
            proxy.flowing.set()
            thawed_at = time.monotonic()
            time.sleep(3)
        # Made in the first 2 s of the silence: each must be answered before it ends.
        silent = clients.between(0, thawed_at - 18)
        after = clients.between(thawed_at + 1, time.monotonic())
        assert daemon.terminate() == 0
    # Nothing on the client side can end a call the server's kernel keeps acknowledging: the
    # committer thread waits out the silence, but every request gives up at the request path's
    # own bound, connect + 2 x statement timeout = 15 s.
    assert silent and {s[2] for s in silent} == {503}
    slowest = max(s[1] for s in silent)
    assert all(s[0] + s[1] < thawed_at for s in silent)  # answered while still silent: no hang
    assert after and {s[2] for s in after} == {200}
    reliability.record(
        "A database that goes silent: 503s within a bound, not a hang",
        "A TCP proxy between `maxtwo serve` and PostgreSQL stops forwarding for 20 s (the "
        "connections stay open, so neither the statement timeout nor TCP notices) while 4 "
        "clients request `GET /`; then it forwards again.",
        [
            (f"requests made while the database was silent: {len(silent)}, all answered 503, the "
             f"slowest after {slowest:.1f} s (bound: connect + 2 x statement timeout = 15 s)"),
            f"requests after it spoke again: {len(after)}, all 200",
        ],
    )


def test_sigterm_while_the_database_is_silent_answers_every_request_503(postgres_url, tmp_path, reliability):
    # Every part of the shutdown waits as long as it may: the batched routes' requests, reads in
    # request threads (which the drain waits out), and a scheduled randomization that started
    # after the silence began. Each part's budget used to be fixed, and together they took
    # 10.05 s.
    with daemon_behind_a_freezable_proxy(postgres_url, tmp_path, interval=2) as (daemon, proxy):
        with Clients(daemon.base, threads=4, path="/counters/a"):
            time.sleep(0.5)  # connections in the pool, so that the reads below get stuck mid-statement
        proxy.flowing.clear()
        with Clients(daemon.base, threads=4) as clients, Clients(daemon.base, threads=4, path="/counters/a"):
            time.sleep(2.5)  # a slot's randomization started, and waits for the database
            signalled = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            exit_code = daemon.process.wait(15)
            stopped_after = time.monotonic() - signalled
    # Every request in flight at the signal waits for a database that will not answer within
    # the drain (its own bound is 15 s): the daemon gives up on the database before the drain
    # ends and answers them 503, rather than closing their connections unanswered.
    in_flight = clients.between(0, signalled)
    assert in_flight and {s[2] for s in in_flight} == {503}, (in_flight, daemon.log())
    assert exit_code == 0, daemon.log()
    assert "a randomization is still running at shutdown" in daemon.log()
    assert stopped_after < 10, stopped_after
    reliability.record(
        "SIGTERM while the database is silent: every request read is answered, exit 0 within 10 s",
        "A TCP proxy between `maxtwo serve --interval 2` and PostgreSQL stops forwarding; 4 "
        "clients request `GET /` and 4 `GET /counters/a` for 2.5 s (a scheduled randomization "
        "starts meanwhile and waits for the database too), then the daemon gets SIGTERM.",
        [
            f"requests in flight or made before the signal: {len(in_flight)}, all answered 503",
            f"the daemon exited {exit_code}, {stopped_after:.1f} s after the signal",
        ],
    )


def test_reads_held_by_a_silent_database_leave_threads_for_the_rest(postgres_url, tmp_path, reliability):
    with daemon_behind_a_freezable_proxy(postgres_url, tmp_path) as (daemon, proxy):
        assert daemon.post("/increment", b'{"key": "a", "value": 1}', {"Content-Type": "application/json"})[0] == 202
        proxy.flowing.clear()
        answers: list[tuple[str, float, int | str]] = []

        def read(path: str) -> None:
            started = time.monotonic()
            try:
                status = get(daemon.base + path, timeout=60)[0]
            except OSError as ex:
                status = type(ex).__name__
            answers.append((path, time.monotonic() - started, status))

        # More reads than the daemon has request threads (16), every one of them waiting for
        # the database.
        readers = [threading.Thread(target=read, args=(path,)) for path in ["/counters/a", "/healthz"] * 12]
        for reader in readers:
            reader.start()
        time.sleep(3)
        asked = time.monotonic()
        try:
            metrics_status = get(daemon.base + "/metrics", timeout=10)[0]
        except OSError as ex:
            metrics_status = type(ex).__name__
        metrics_after = time.monotonic() - asked
        proxy.flowing.set()
        for reader in readers:
            reader.join(60)
        assert daemon.terminate() == 0
    # Half the request threads may wait for the database on these routes; the rest answer 503
    # once they have waited a second for room, and /metrics finds a thread at once.
    assert metrics_status == 200 and metrics_after < SLACK, (metrics_status, metrics_after)
    assert len(answers) == len(readers) and {status for _, _, status in answers} <= {200, 503}, answers
    turned_away = [latency for _, latency, status in answers if status == 503 and latency < 2 + SLACK]
    assert len(turned_away) >= len(readers) - 8, answers
    reliability.record(
        "Reads a silent database holds leave request threads for the rest",
        "A TCP proxy between `maxtwo serve` (16 request threads) and PostgreSQL stops forwarding; "
        "24 clients request `GET /counters/a` and `/healthz` at once, then one `GET /metrics`; "
        "then the proxy forwards again.",
        [
            f"`GET /metrics` answered {metrics_status} in {metrics_after:.2f} s",
            (f"reads answered 503 without waiting for the database: {len(turned_away)}, the slowest "
             f"after {max(turned_away):.1f} s; the others answered once it spoke again or their "
             "connection attempt timed out"),
        ],
    )


@contextlib.contextmanager
def small_file_system(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at mount_point (needs root, as on the CI machines): a disk
    that really fills up, without filling the machine's."""
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          check=False, capture_output=True, encoding="utf-8")
    if done.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs and needs root: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> int:
    """Write files into directory until its file system is full; the bytes written."""
    written, chunk = 0, b"\0" * 65536
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            written += os.write(descriptor, chunk)
    except OSError as ex:
        assert ex.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return written


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """chattr +i: even root's writes fail (EPERM), also through files that are already open,
    so the running daemon meets a read-only database exactly as after a remount."""
    done = subprocess.run(["chattr", "+i", *map(str, paths)], check=False, capture_output=True, encoding="utf-8")
    try:
        if done.returncode != 0:
            pytest.fail(f"this test needs chattr on a file system that supports it: {done.stderr.strip()}")
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=False, capture_output=True)


def maxtwo(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAXTWO_DATABASE_URL": database_url}
    env.pop("MAXTWO_DEBUG", None)
    return subprocess.run([str(MAXTWO), *args], check=False, env=env, capture_output=True, encoding="utf-8", timeout=120)


def check_intact(path: Path, users_expected: int) -> sa.Row:
    """The file passes SQLite's integrity check, one randomization's stamp is on every user, and
    the state matches it: nothing was half-written."""
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
            assert conn.scalar(sa.select(sa.func.count()).select_from(users)) == users_expected
        stamps = distinct_updated_at(engine)
        current = state(engine)
        assert len(stamps) == 1
        if current.randomized_at is not None:
            assert stamps[0] == current.randomized_at
        return current
    finally:
        engine.dispose()


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    assert done.returncode == 1, done
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("Error: ")
    for word in words:
        assert word in line
    return line


def test_a_full_disk_gets_503_and_exit_1_then_recovers(tmp_path, reliability):
    interval = 2
    with small_file_system(tmp_path / "disk", "8m") as disk:
        path = disk / "maxtwo.db"
        url = f"sqlite:///{path}"
        assert maxtwo(url, "seed", "--count", "20000").returncode == 0
        with ServeProcess(url, interval=interval, seed_count=20000) as daemon:
            daemon.start(tmp_path / "serve.log")
            assert daemon.get("/")[0] == 200
            filled = fill(disk)
            full_from = time.monotonic()
            failures_before, epoch_before = daemon.metric("maxtwo_randomize_failures_total"), state_of(path).epoch
            with Clients(daemon.base) as clients:
                time.sleep(2 * interval + 0.5)
                health_while_full = daemon.get("/healthz")
                randomize = maxtwo(url, "randomize")
                reset = maxtwo(url, "seed", "--reset", "--count", "200000")
                full_until = time.monotonic()
                failures = daemon.metric("maxtwo_randomize_failures_total") - failures_before
                epoch_while_full = state_of(path).epoch
                (disk / "filler").unlink()
                freed_at = time.monotonic()
                time.sleep(interval + 1.5)
            while_full = clients.between(full_from, full_until)
            recovered = [s for s in clients.between(freed_at, time.monotonic()) if s[2] == 200]
            status, body = daemon.get("/")
            health_after = daemon.get("/healthz")
            assert daemon.process.poll() is None
            assert daemon.terminate() == 0
        current = check_intact(path, 20000)

    statuses = {s[2] for s in while_full}
    assert while_full and statuses <= {200, 503}  # no 500, no dropped connection
    assert 503 in statuses
    assert max(s[1] for s in while_full) < 5  # below the 5 s busy timeout: none waited one out
    assert failures >= 2 and epoch_while_full == epoch_before  # every run while full failed
    randomize_error = one_line_error(randomize, "full", "free some space")
    one_line_error(reset, "full")  # and the reset rolled back: the 20,000 users are all there
    assert recovered and recovered[0][0] + recovered[0][1] - freed_at < RECOVERY
    assert status == 200 and set(body) == {"users", "timestamp"}
    assert current.epoch > epoch_while_full  # randomizations resumed with no restart
    # /healthz writes nothing, so only the batchers' failures tell it (WriteHealth).
    assert health_while_full[0] == 503, health_while_full
    assert health_while_full[1]["description"].startswith("every write of this server has failed for ")
    assert health_after == (200, {"status": "ok"})
    reliability.record(
        "A full disk (SQLite): 503 and exit 1, nothing half-written, recovery",
        f"The SQLite file lives on an 8 MB tmpfs that the test fills to the last byte ({filled:,} "
        f"bytes of filler) under a running `maxtwo serve --interval {interval}` and 4 clients; "
        "`maxtwo randomize` and `maxtwo seed --reset --count 200000` run meanwhile; then the "
        "filler is deleted.",
        [
            (f"requests while full: {len(while_full)}; statuses {sorted(map(str, statuses))}, "
             f"the slowest in {max(s[1] for s in while_full) * 1000:.0f} ms"),
            (f"scheduled randomizations that failed while full: {failures:.0f} (counted in "
             "maxtwo_randomize_failures_total; the daemon kept running)"),
            (f"`maxtwo randomize`: exit 1, `{randomize_error}`; `seed --reset`: exit 1 and the "
             "20,000 users it would have replaced were all still there"),
            (f"first 200 after space was freed: {(recovered[0][0] + recovered[0][1] - freed_at) * 1000:.0f} ms "
             f"later; epoch {epoch_while_full} -> {current.epoch} with no restart; PRAGMA "
             "integrity_check: ok; one updated_at on every user, the state's"),
            (f"`/healthz` while full: 503, \"{health_while_full[1]['description']}\"; after: 200"),
        ],
    )


def test_a_read_only_database_file_gets_503_and_exit_1_then_recovers(tmp_path, reliability):
    directory = tmp_path / "data"
    directory.mkdir()
    path = directory / "maxtwo.db"
    url = f"sqlite:///{path}"
    assert maxtwo(url, "seed", "--count", "20000").returncode == 0
    with ServeProcess(url, interval=60, seed_count=20000) as daemon:
        daemon.start(tmp_path / "serve.log")
        assert daemon.get("/")[0] == 200
        # NOTE: not the -shm file: SQLite maps it into memory, and a refused write through a
        # mapping is a SIGBUS for any program (the daemon's faulthandler logs it; systemd
        # restarts). A read-only file system refuses the file and its journal like this.
        descriptors_before = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
        with Clients(daemon.base) as clients:
            files = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-query", "-query-wal")]
            with immutable(*files, directory):
                read_only_from = time.monotonic()
                time.sleep(2)
                randomize = maxtwo(url, "randomize")
                query = maxtwo(url, "query")
            made_writable = time.monotonic()
            time.sleep(1.5)
        # Each failed batch replaces its SQLite connection; each replaced one kept both files
        # open for good (hundreds a second: at systemd's default limit of 1,024, every request
        # then failed; a review). The clients' connections are closed by now.
        descriptors_after = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))
        assert descriptors_after < descriptors_before + 20, (descriptors_before, descriptors_after)
        while_read_only = [s for s in clients.between(read_only_from, made_writable) if s[0] + s[1] < made_writable]
        recovered = [s for s in clients.between(made_writable, time.monotonic()) if s[2] == 200]
        assert maxtwo(url, "randomize").returncode == 0
        assert daemon.get("/")[0] == 200
        assert daemon.terminate() == 0
    check_intact(path, 20000)

    statuses = {s[2] for s in while_read_only}
    assert while_read_only and statuses == {503}
    slowest = max(s[1] for s in while_read_only)
    assert slowest < 5  # below the 5 s busy timeout: none waited one out
    randomize_error = one_line_error(randomize, "read-only")
    one_line_error(query, "read-only")
    assert recovered and recovered[0][0] + recovered[0][1] - made_writable < RECOVERY
    reliability.record(
        "A read-only database file (SQLite): 503 and exit 1, then recovery",
        "Under a running `maxtwo serve` and 4 clients, the SQLite file, its query-state file, "
        "their -wal files and their directory are made immutable (chattr +i: writes fail even through open files, even for "
        "root); `maxtwo randomize` and `maxtwo query` run meanwhile; then they are made writable.",
        [
            (f"requests while read-only: {len(while_read_only)}, all 503, the slowest in "
             f"{slowest * 1000:.0f} ms"),
            f"`maxtwo randomize` and `maxtwo query`: exit 1, e.g. `{randomize_error}`",
            (f"first 200 after: {(recovered[0][0] + recovered[0][1] - made_writable) * 1000:.0f} ms; "
             "PRAGMA integrity_check: ok; one updated_at on every user, the state's"),
        ],
    )


def state_of(path: Path) -> sa.Row:
    engine = db.create_engine(Settings(database_url=f"sqlite:///{path}"))
    try:
        return state(engine)
    finally:
        engine.dispose()
