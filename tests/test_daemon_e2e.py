"""End to end: the real `maxtwo serve` process, over a socket, on SQLite and PostgreSQL."""

from __future__ import annotations

import http.client
import math
import signal
import socket
import threading
import time

import pytest
import sqlalchemy as sa

from devtools.pgserver import ThrowawayPostgres
from maxtwo_cli.core import db
from maxtwo_cli.core.clock import format_api_timestamp
from maxtwo_cli.core.schema import users
from maxtwo_cli.core.settings import Settings
from tests.helpers import notifications, notify_socket, state, wait_for
from tests.serve_process import ServeProcess


def wait_for_epoch_change(engine, epoch: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state(engine).epoch
        if current != epoch:
            return current
        time.sleep(0.05)
    raise AssertionError(f"the epoch stayed at {epoch} for {timeout} s")


def test_serve_end_to_end(database_url, tmp_path):
    with ServeProcess(database_url, interval=1, seed_count=2000) as daemon:
        daemon.start(tmp_path / "serve.log")
        engine = db.create_engine(Settings(database_url=database_url))

        # Seeded on first start, and the first query ever gets null.
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(users)) == 2000
        status, body = daemon.get("/")
        assert status == 200 and body["timestamp"] is None

        # The chain: each answer carries the time the previous request recorded.
        for _ in range(10):
            recorded_by_previous = format_api_timestamp(state(engine).last_query_at)
            status, body = daemon.get("/")
            assert status == 200
            assert body["timestamp"] == recorded_by_previous

        # Every interval brings new points (and a new epoch).
        seen = []
        epoch = state(engine).epoch
        for _ in range(3):
            epoch = wait_for_epoch_change(engine, epoch)
            with engine.connect() as conn:
                seen.append(tuple(conn.scalars(sa.select(users.c.points).order_by(users.c.id))))
        assert len(set(seen)) == 3
        assert all(min(points) >= 0 and max(points) <= 100 for points in seen)

        # A request waitress refuses itself, before the app sees it, is counted all the same.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no Host
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        metrics = daemon.get("/metrics")[1]
        assert 'maxtwo_http_refused_total{status="400"} 1.0' in metrics

        assert daemon.terminate() == 0
        assert "Traceback" not in daemon.log()
        engine.dispose()


def _hammer(port: int, stop: threading.Event, outcomes: list, lock: threading.Lock) -> None:
    """Request GET / over and over on fresh connections; record when each connected and how it ended."""
    while not stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        connected_at = None  # a refused connection was never in flight
        try:
            connection.connect()
        except (ConnectionRefusedError, ConnectionResetError):
            # The listener is closed (or closing, in that instant a handshake is reset): never
            # accepted, nothing lost.
            outcome = "refused"
        else:
            # NOTE: stamped once connected; stamped before, a thread descheduled across the
            # SIGTERM would count a connection refused after it as in flight before it.
            connected_at = time.monotonic()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                outcome = response.status
            except (OSError, http.client.HTTPException) as ex:
                outcome = f"lost: {type(ex).__name__}"
        finally:
            connection.close()
        with lock:
            outcomes.append((connected_at, outcome))
        if outcome == "refused":
            return


def test_sigterm_during_a_burst_answers_everything_and_exits_0(database_url, tmp_path):
    with ServeProcess(database_url, interval=1, seed_count=2000) as daemon:
        daemon.start(tmp_path / "serve.log")
        stop, lock, outcomes = threading.Event(), threading.Lock(), []
        clients = [
            threading.Thread(target=_hammer, args=(daemon.port, stop, outcomes, lock))
            for _ in range(16)
        ]
        for client in clients:
            client.start()
        time.sleep(1.5)
        sigterm_at = time.monotonic()
        code = daemon.terminate(timeout=15)
        stopped_in = time.monotonic() - sigterm_at
        stop.set()
        for client in clients:
            client.join(20)
        # In flight at SIGTERM: every request whose connection was made before the signal was
        # sent. Each of them must be answered. A connection attempted after it may be refused
        # (or, in the instant the listening socket closes, reset): it was never in flight.
        in_flight = [
            outcome for connected_at, outcome in outcomes
            if connected_at is not None and connected_at < sigterm_at
        ]
        answered = [outcome for outcome in in_flight if outcome == 200]
        assert code == 0
        assert stopped_in < 10
        assert len(answered) > 50
        assert answered == in_flight
        assert "stopped" in daemon.log()
        # 16 eager clients, 8 threads: requests queued, yet waitress's per-request warning
        # about it never reaches the log.
        assert "Task queue depth" not in daemon.log()


def test_ctrl_c_stops_the_daemon_as_sigterm_does_and_exits_0(tmp_path):
    """README: Ctrl-C stops `maxtwo serve` once it serves, exit 0, after the same drain."""
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")
        assert daemon.get("/healthz")[0] == 200
        daemon.process.send_signal(signal.SIGINT)
        assert daemon.process.wait(15) == 0
        log = daemon.log()
    assert "received SIGINT" in log and "stopped" in log and "Traceback" not in log
    # The line that says where it serves (with --port 0, the only place that says which port).
    assert f"listening on http://127.0.0.1:{daemon.port}\n" in log


def test_a_sigint_ignored_from_the_start_stays_ignored_once_it_serves(tmp_path):
    """As during the start's seed: a job a script started in the background ignores SIGINT (the
    Ctrl-C that stops the script reaches it too); SIGTERM stops it."""
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log", sigint_ignored=True)
        daemon.process.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the serving loop turns every LOOP_TICK_SECONDS
        assert daemon.get("/healthz")[0] == 200
        assert daemon.process.poll() is None
        assert daemon.terminate() == 0
        log = daemon.log()
    assert "received SIGINT" not in log and "received SIGTERM" in log


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_start_s_seed_ends_the_daemon_at_once_and_the_seed_is_rolled_back(
        tmp_path, signum, exit_code):
    """README: during the start's seed, SIGTERM ends the process at once and Ctrl-C exits 130,
    the seed rolled back either way. The graceful stop's handlers come only once it serves:
    installed before the seed, they would record the signal and let a seed of millions run on
    (past systemd's TimeoutStopSec, then a SIGKILL) only to stop as soon as it served."""
    database_url = f"sqlite:///{tmp_path / 'maxtwo.db'}"
    with ServeProcess(database_url, interval=60, seed_count=20_000_000) as daemon:
        daemon.start(tmp_path / "serve.log", wait=False)
        wait_for(lambda: "seeding: " in daemon.log(), "the seed under way (its first batch in)", seconds=60)
        daemon.process.send_signal(signum)
        assert daemon.process.wait(15) == exit_code, daemon.log()
        log = daemon.log()
    assert "listening on" not in log and "seeded" not in log
    if signum == signal.SIGINT:
        assert "interrupted; a change not yet committed was rolled back" in log and "Traceback" not in log
    engine = db.create_engine(Settings(database_url=database_url))
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(users)) == 0
    finally:
        engine.dispose()


def test_a_fatal_signal_leaves_every_thread_s_stack_in_the_log(tmp_path):
    """A SIGBUS (SQLite's -shm mapping on a full or failing disk) or a SIGSEGV in a driver
    would otherwise end the daemon without a word in the journal."""
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10) as daemon:
        daemon.start(tmp_path / "serve.log")
        daemon.process.send_signal(signal.SIGBUS)
        assert daemon.process.wait(15) != 0
        log = daemon.log()
    assert "Fatal Python error: Bus error" in log and "most recent call first" in log


@pytest.mark.slow  # a drain held open for its whole 5 s
def test_no_randomization_starts_once_sigterm_came(tmp_path):
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=1, seed_count=100) as daemon:
        daemon.start(tmp_path / "serve.log")
        # Half a request: the drain waits for the rest of it, for as long as it may (5 s).
        with socket.create_connection(("127.0.0.1", daemon.port)) as half:
            half.sendall(b"GET / HTTP/1.1\r\nHost: maxtwo\r\n")
            time.sleep(0.3)
            assert daemon.terminate() == 0
        log = daemon.log()
    # Five boundaries passed during the drain; a run started then would be cut off at exit, and
    # daemons sharing the database would have skipped its slot. (One may have started just before.)
    after_signal = log[log.index("received SIGTERM"):]
    assert after_signal.count("randomized ") <= 1, after_signal


def test_a_slot_no_daemon_ran_is_made_up_at_start_and_a_restart_runs_none_twice(database_url, tmp_path):
    """A slot that passed while no daemon ran (an outage, an upgrade across it) was never made
    up: with --interval 86400, a daemon down across 00:00 UTC meant no randomization that day."""
    engine = db.create_engine(Settings(database_url=database_url))
    with ServeProcess(database_url, interval=86400, seed_count=500) as daemon:
        daemon.start(tmp_path / "first.log")
        wait_for(lambda: state(engine).randomized_at is not None, "the slot of today randomized at start")
        # (Counted once the run's commit has returned: after the row was seen, a CI run read 0.)
        wait_for(lambda: daemon.metric("maxtwo_randomize_duration_seconds_count") >= 1, "the run counted")
        assert daemon.metric("maxtwo_randomize_duration_seconds_count") == 1
        randomized = state(engine)
        assert daemon.terminate() == 0
    with ServeProcess(database_url, interval=86400, seed_count=500) as daemon:
        daemon.start(tmp_path / "second.log")
        wait_for(lambda: "done already" in daemon.log(), "the restarted daemon standing back")
        assert state(engine)[:3] == randomized[:3]  # epoch, max_number, randomized_at
        assert daemon.terminate() == 0


@pytest.mark.slow  # several intervals of two daemons
def test_two_daemons_randomize_exactly_once_per_interval(postgres_url, tmp_path):
    engine = db.create_engine(Settings(database_url=postgres_url))
    # NOTE: 2 s intervals: a run may start up to 1 s late (a loaded machine) and still be
    # counted in its own interval.
    interval, intervals = 2, 4
    with ServeProcess(postgres_url, interval=interval, seed_count=2000) as first, \
            ServeProcess(postgres_url, interval=interval, seed_count=2000) as second:
        first.start(tmp_path / "first.log")
        second.start(tmp_path / "second.log")
        # Measure from the middle of one interval to the middle of another, away from the
        # boundaries where runs happen.
        time.sleep(interval * (math.floor(time.time() / interval) + 1.5) - time.time())
        epoch_before = state(engine).epoch
        runs_before = first.metric("maxtwo_randomize_duration_seconds_count") + second.metric(
            "maxtwo_randomize_duration_seconds_count"
        )
        time.sleep(intervals * interval)
        epoch_after = state(engine).epoch
        runs_after = first.metric("maxtwo_randomize_duration_seconds_count") + second.metric(
            "maxtwo_randomize_duration_seconds_count"
        )
        assert epoch_after - epoch_before == intervals  # one randomization per boundary crossed
        assert runs_after - runs_before == intervals  # performed by the two daemons between them
        stood_back = first.metric('maxtwo_randomize_skipped_total{reason="elsewhere"}') + second.metric(
            'maxtwo_randomize_skipped_total{reason="elsewhere"}'
        )
        assert stood_back >= intervals - 1  # the other daemon was there each time and stood back
        assert first.terminate() == 0 and second.terminate() == 0
    engine.dispose()


def test_sd_notify_ready_watchdog_stopping(tmp_path):
    listener = notify_socket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with ServeProcess(f"sqlite:///{tmp_path / 'maxtwo.db'}", interval=60, seed_count=10, env=env) as daemon:
        daemon.start(tmp_path / "serve.log")
        messages = notifications(listener, seconds=4)
        assert daemon.terminate() == 0
        messages += notifications(listener)
    listener.close()
    assert messages[0] == "READY=1"
    assert messages.count("WATCHDOG=1") >= 6  # every 0.25 s (a quarter of WATCHDOG_USEC): about 16
    assert messages.count("STOPPING=1") == 1
    # The drain still tells the watchdog that its loop turns: a ping may follow STOPPING=1
    # (one did in a CI run, once pings came every quarter of the interval), nothing else.
    assert set(messages[messages.index("STOPPING=1") + 1:]) <= {"WATCHDOG=1"}


@pytest.mark.slow  # its own PostgreSQL server, stopped and started
def test_the_daemon_rides_out_a_database_outage(tmp_path):
    """Its own PostgreSQL server, stopped and started again under the running daemon."""
    with ThrowawayPostgres(fsync=False) as server:
        engine = db.create_engine(Settings(database_url=server.url))
        with ServeProcess(server.url, interval=1, seed_count=500) as daemon:
            daemon.start(tmp_path / "serve.log")
            assert daemon.get("/")[0] == 200

            server.stop()
            started = time.monotonic()
            status, body = daemon.get("/", timeout=15)
            assert status == 503 and body["status"] == 503
            # The connect timeout (5 s) plus slack for a loaded machine; a hang hits the 15 s.
            assert time.monotonic() - started < 12
            assert daemon.get("/healthz", timeout=15)[0] == 503
            time.sleep(1.5)  # at least one scheduled run fails meanwhile

            server.start()
            recovered_at = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if daemon.get("/", timeout=15)[0] == 200:
                    recovered_at = time.monotonic()
                    break
                time.sleep(0.1)
            assert recovered_at is not None
            epoch = state(engine).epoch
            wait_for_epoch_change(engine, epoch, timeout=5)  # the scheduler recovered too
            assert daemon.metric("maxtwo_randomize_failures_total") >= 1
            assert daemon.terminate() == 0
        engine.dispose()
