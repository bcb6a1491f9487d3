"""daemon/server.py: the process around the app, in-process: listening, the watchdog that
watches the serving loop and the batcher, signals, and the exit paths."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from daemon import server as server_module
from daemon import transport
from daemon.batcher import Batchers, QueryKind
from daemon.metrics import Metrics
from daemon.server import (
    BindError,
    StopRequest,
    bind,
    listen,
    listening_url,
    serve,
    serve_requests,
    start_listening,
)
from daemon.transport import QuietChannel
from daemon.watchdog import Watchdog
from maxtwo_cli.core.errors import DatabaseUnavailableError, MaxtwoError
from maxtwo_cli.core.query import QueryResult
from maxtwo_cli.core.schema import idempotency_keys
from maxtwo_cli.core.settings import Settings
from tests.helpers import notify_socket, state, user_rows, wait_for

# systemd's WatchdogSec= in microseconds: pings every 0.1 s (a quarter of it).
WATCHDOG_USEC = "400000"


def test_a_host_with_several_addresses_is_refused_in_one_line(monkeypatch):
    real = socket.getaddrinfo

    def two_addresses(host, *args, **kwargs):
        if host == "dual.example":
            return real("127.0.0.1", *args, **kwargs) + real("::1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with pytest.raises(BindError, match="several addresses"):
        listen(Settings(database_url="sqlite:///x.db", host="dual.example", port=0))


def test_a_host_that_is_no_address_is_a_bind_error():
    with pytest.raises(BindError, match="not an address or host name"):
        listen(Settings(database_url="sqlite:///x.db", host="no such host..", port=0))


def test_a_host_name_that_does_not_resolve_is_said_to_be_one(monkeypatch):
    def unknown(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(BindError, match=r"'nosuchhost.invalid': cannot resolve it \(Name or service not known\)"):
        listen(Settings(database_url="sqlite:///x.db", host="nosuchhost.invalid", port=0))


def test_a_port_in_use_fails_before_the_database_is_touched(tmp_path, monkeypatch):
    """Seeding a million users and then failing to listen cost a whole seed; nor may the seed's
    seconds be spent with clients waiting in a listening socket's backlog."""
    monkeypatch.setattr(server_module, "configure_logging", lambda: None)
    database = tmp_path / "x.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = Settings(database_url=f"sqlite:///{database}", port=taken.getsockname()[1], seed_count=10)
        with pytest.raises(BindError, match="already in use"):
            serve(settings)
    assert not database.exists()


def test_two_daemons_binding_one_port_at_once_the_second_fails_to_listen_in_one_line():
    """SO_REUSEADDR lets both bind while neither listens: the second learns at listen()."""
    first = bind(Settings(database_url="sqlite:///x.db", port=0))
    settings = Settings(database_url="sqlite:///x.db", port=first.getsockname()[1])
    second = bind(settings)
    try:
        start_listening(first, settings)
        with pytest.raises(BindError, match="already in use"):
            start_listening(second, settings)
    finally:
        first.close()
        second.close()


def test_no_connection_is_taken_while_the_database_is_prepared(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "configure_logging", lambda: None)
    bound: list[socket.socket] = []
    real_bind = server_module.bind
    monkeypatch.setattr(server_module, "bind", lambda settings: bound.append(real_bind(settings)) or bound[-1])

    def prepare(engine, settings):
        with socket.socket() as client:  # refused: the port is bound, not listened on yet
            assert client.connect_ex(bound[0].getsockname()) != 0
        raise RuntimeError("the database failed")

    monkeypatch.setattr(server_module, "prepare_database", prepare)
    with pytest.raises(RuntimeError, match="the database failed"):
        serve(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", port=0))
    assert bound[0].fileno() == -1  # and closed on the way out


def test_the_listening_url_brackets_an_ipv6_address():
    assert listening_url(("127.0.0.1", 8000)) == "http://127.0.0.1:8000"
    assert listening_url(("::1", 8000, 0, 0)) == "http://[::1]:8000"
    assert listening_url(("fe80::1%eth0", 8000, 0, 2)) == "http://[fe80::1%25eth0]:8000"


def test_a_host_in_brackets_is_the_ipv6_address_inside_them():
    """--host [::1], as the address is written in a URL (and in the "listening on" line)."""
    sock = bind(Settings(database_url="sqlite:///x.db", host="[::1]", port=0))
    try:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
    finally:
        sock.close()


def test_a_daemon_on_the_ipv6_wildcard_leaves_the_port_on_ipv4_to_others():
    """--host :: is IPv6 only (IPV6_V6ONLY), whatever the system's default (Linux's takes IPv4
    too, net.ipv6.bindv6only=0): the one address asked for, and IPv4 clients are not let in by
    a bind that never named them."""
    settings = Settings(database_url="sqlite:///x.db", host="::", port=0)
    six = listen(settings)
    try:
        with socket.socket(socket.AF_INET) as four:
            four.bind(("127.0.0.1", six.getsockname()[1]))  # EADDRINUSE if :: had taken IPv4 too
            four.listen()
    finally:
        six.close()


class StandIn:
    """The watchdog and the batcher, as far as the drain's turn uses them."""

    def __init__(self, running_for: float) -> None:
        self.turns = 0
        self.running = running_for
        self.abandoned: list[str] = []

    def loop_turned(self) -> None:
        self.turns += 1

    def running_for(self) -> float:
        return self.running

    def abandon(self, reason: str) -> int:
        self.abandoned.append(reason)
        return 1


def test_the_drain_gives_up_only_on_a_stuck_batch_and_only_once(monkeypatch):
    monkeypatch.setattr(server_module, "ABANDON_AFTER_SECONDS", 0.2)
    healthy, stuck = StandIn(running_for=0.005), StandIn(running_for=2.0)
    # Each as the watchdog and as the only batcher; then both batchers in one daemon (a kind
    # each, as on PostgreSQL): the healthy kind's waiters still get their answers.
    watchdog = StandIn(running_for=0)
    turns = [server_module.draining_turn(stand_in, Batchers.shared(stand_in)) for stand_in in (healthy, stuck)]
    turns.append(server_module.draining_turn(watchdog, Batchers({"query": healthy, "increment": stuck})))
    for turn in turns:
        turn()  # before ABANDON_AFTER_SECONDS: nobody is given up on
    assert not stuck.abandoned
    time.sleep(0.25)
    for _ in range(3):
        for turn in turns:
            turn()
    assert healthy.abandoned == [] and len(stuck.abandoned) == 2  # once by each drain that holds it
    assert healthy.turns == stuck.turns == watchdog.turns == 4  # the watchdog hears of every turn


def test_a_signal_only_records_itself():
    stop = StopRequest()
    assert not stop.requested()
    stop(signal.SIGTERM, None)
    assert stop.requested() and stop.signal == signal.SIGTERM


class Pings:
    """WATCHDOG=1 messages as they arrive on a stand-in for systemd's notification socket."""

    def __init__(self, path) -> None:
        self._listener = notify_socket(path)
        self.times: list[float] = []
        self.messages: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                message = self._listener.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(message)
            if message == "WATCHDOG=1":
                self.times.append(time.monotonic())

    def between(self, start: float, end: float) -> int:
        return len([moment for moment in self.times if start <= moment <= end])

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self._listener.close()


@contextlib.contextmanager
def serving_in_a_thread(settings: Settings, users: int = 0) -> Iterator[socket.socket]:
    """serve_requests() on `settings` (a SQLite file, made and given `users` first) in a thread
    until the block ends, which stops it as a signal would; yields its listening socket."""
    from maxtwo_cli.core import db, schema
    from maxtwo_cli.core.seed import seed_users

    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    if users:
        seed_users(engine, users)
    engine.dispose()
    listener = listen(settings)
    stop = threading.Event()
    serving = threading.Thread(target=serve_requests, args=(settings, listener, Metrics(), stop.is_set), daemon=True)
    serving.start()
    try:
        yield listener
    finally:
        stop.set()
        serving.join(30)
        listener.close()


@pytest.fixture
def watched(tmp_path, monkeypatch) -> Iterator[tuple[int, Pings]]:
    """serve_requests() in a thread, on SQLite, under a watchdog with short timeouts."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(server_module, "LOOP_STALE_SECONDS", 1.0)
    pings = Pings(tmp_path / "notify.sock")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, threads=4,
                        connect_timeout=0.5, statement_timeout=0.5)
    try:
        with serving_in_a_thread(settings, users=10) as listener:
            yield listener.getsockname()[1], pings
    finally:
        pings.close()


def wait_for_pings(pings: Pings, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(pings.times) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pings.times) >= count, pings.messages


def test_the_watchdog_stops_when_the_serving_loop_freezes_and_resumes_after(watched, monkeypatch):
    port, pings = watched
    wait_for_pings(pings, 3)
    frozen, thawed = threading.Event(), threading.Event()
    real_read = QuietChannel.handle_read

    def freezing_read(self):
        frozen.set()
        thawed.wait(30)  # the serving loop hangs here, as in a deadlock or an endless loop
        real_read(self)

    monkeypatch.setattr(QuietChannel, "handle_read", freezing_read)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert frozen.wait(10)
        time.sleep(1.5)  # past LOOP_STALE_SECONDS (1 s): from here on, no pings
        quiet_from = time.monotonic()
        time.sleep(1.5)  # 15 pings' worth
        assert pings.between(quiet_from, time.monotonic()) == 0
        thawed.set()
        client.settimeout(10)
        assert client.recv(100).startswith(b"HTTP/1.1 200")
    before = len(pings.times)
    wait_for_pings(pings, before + 3)  # the loop turns again: so do the pings


@pytest.mark.slow
def test_the_watchdog_stops_while_a_batch_runs_past_every_timeout(watched, monkeypatch):
    port, pings = watched
    wait_for_pings(pings, 3)
    stuck, released = threading.Event(), threading.Event()
    real_apply = QueryKind.apply

    def stuck_apply(self, held, payloads):
        stuck.set()
        released.wait(30)  # a driver call that never returns (a frozen server, a lost packet)
        return real_apply(self, held, payloads)

    monkeypatch.setattr(QueryKind, "apply", stuck_apply)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(20)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stuck.wait(10)
        # The caller gives up at its max_wait (1.5 s) with a 503; the serving loop goes on.
        assert client.recv(100).startswith(b"HTTP/1.1 503")
        # The batch limit: max_wait plus LOOP_STALE_SECONDS, 2.5 s from the batch's start.
        time.sleep(2.0)
        quiet_from = time.monotonic()
        time.sleep(1.5)
        assert pings.between(quiet_from, time.monotonic()) == 0
        released.set()
    before = len(pings.times)
    wait_for_pings(pings, before + 3)


@pytest.mark.slow
def test_the_watchdog_goes_on_while_a_batch_is_slow_but_within_its_timeouts(tmp_path, monkeypatch):
    """A batch may take its database timeouts (connecting, then two statements: 6 s here) and
    more: a daemon whose database is slow, not hung, must not stop pinging and be restarted by
    systemd in the middle of its work. Only past those timeouts plus LOOP_STALE_SECONDS is it
    stuck (the test above)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", WATCHDOG_USEC)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(server_module, "LOOP_STALE_SECONDS", 1.0)
    pings = Pings(tmp_path / "notify.sock")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, threads=4,
                        connect_timeout=2, statement_timeout=2)
    slow, released = threading.Event(), threading.Event()
    real_apply = QueryKind.apply

    def slow_apply(self, held, payloads):
        slow.set()
        released.wait(30)  # a slow database, within its timeouts
        return real_apply(self, held, payloads)

    try:
        with serving_in_a_thread(settings, users=10) as listener:
            wait_for_pings(pings, 3)
            monkeypatch.setattr(QueryKind, "apply", slow_apply)
            with socket.create_connection(listener.getsockname()) as client:
                client.settimeout(30)
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    assert slow.wait(10)
                    time.sleep(1.5)  # past LOOP_STALE_SECONDS, but not past the batch's timeouts
                    watched_from = time.monotonic()
                    time.sleep(1.5)  # 15 pings' worth
                    assert pings.between(watched_from, time.monotonic()) > 0, pings.messages
                finally:
                    released.set()
                assert client.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        pings.close()


def test_a_second_signal_does_not_restart_the_shutdown_budget(monkeypatch):
    """A Ctrl-C after SIGTERM gave the scheduler its 9 s again, past systemd's TimeoutStopSec."""
    now = [100.0]
    monkeypatch.setattr(server_module.time, "monotonic", lambda: now[0])
    stop = server_module.StopRequest()
    assert stop.time_left() == server_module.SCHEDULER_STOP_SECONDS  # no signal: the loop failed
    stop(signal.SIGTERM)
    now[0] += 5.0
    stop(signal.SIGINT)
    assert stop.signal == signal.SIGINT
    assert stop.time_left() == server_module.SHUTDOWN_SECONDS - 5.0


def test_the_database_line_at_start_up_hides_the_password(postgres_url, caplog):
    password = sa.make_url(postgres_url).password
    assert password  # the throwaway server's, else this test would prove nothing
    settings = Settings(database_url=postgres_url, seed_count=0)
    engine = server_module.db.create_engine(settings)
    try:
        with caplog.at_level(logging.INFO, logger="maxtwo"):
            server_module.prepare_database(engine, settings)
    finally:
        engine.dispose()
    assert "database: postgresql+psycopg://" in caplog.text and ":***@" in caplog.text
    assert password not in caplog.text


def test_a_seed_count_of_0_seeds_nothing_and_writes_nothing(engine):
    before = state(engine)
    server_module.seed_if_empty(engine, 0)
    assert state(engine) == before  # no epoch taken, no lock


def test_the_daemon_seeds_only_an_empty_database(engine, caplog):
    """A restart finds its users and leaves them: the second start neither seeds nor says so."""
    with caplog.at_level(logging.INFO, logger=server_module.log.name):
        server_module.seed_if_empty(engine, 5)
        epoch = state(engine).epoch
        server_module.seed_if_empty(engine, 7)
    assert [message for message in caplog.messages if "seed" in message][:1] == ["no users yet: seeding 5"]
    assert not any("seeding 7" in message or "first" in message for message in caplog.messages)
    assert (len(user_rows(engine)), state(engine).epoch) == (5, epoch)


def test_a_daemon_that_finds_the_users_seeded_by_another_goes_on(engine, caplog, monkeypatch):
    """Two daemons started on one empty database: the one whose seed comes second is refused
    (AlreadySeededError) and serves the other's users."""
    server_module.seed_if_empty(engine, 5)
    monkeypatch.setattr(server_module, "has_users", lambda engine: False)  # asked before the other's commit
    with caplog.at_level(logging.INFO, logger=server_module.log.name):
        server_module.seed_if_empty(engine, 7)
    assert "another process seeded the users first" in caplog.messages
    assert len(user_rows(engine)) == 5


def test_serving_ends_with_no_thread_nor_database_connection_left(tmp_path, monkeypatch):
    """The watchdog's thread (a WATCHDOG=1 after STOPPING=1), the committers' threads and their
    connections, the engine's pool: all ended when serve_requests() returns."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    systemd_socket = notify_socket(tmp_path / "notify.sock")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, threads=2)
    engines = []
    create_engine = server_module.db.create_engine
    monkeypatch.setattr(server_module.db, "create_engine",
                        lambda *args, **kwargs: engines.append(create_engine(*args, **kwargs)) or engines[-1])
    # Other tests' idle committers may still be ending (after batcher.IDLE_SECONDS): only the
    # threads this daemon starts count.
    others = set(threading.enumerate())

    def started_here() -> list[str]:
        return [thread.name for thread in threading.enumerate()
                if thread not in others and thread.name in ("maxtwo-watchdog", "maxtwo-batcher")]

    try:
        with serving_in_a_thread(settings) as listener:
            with socket.create_connection(listener.getsockname(), timeout=10) as client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert client.recv(100).startswith(b"HTTP/1.1 200")
            assert {"maxtwo-watchdog", "maxtwo-batcher"} <= set(started_here())
    finally:
        systemd_socket.close()
    assert started_here() == []
    assert engines and all(engine.pool.checkedin() == 0 for engine in engines)


def test_the_watchdog_says_why_it_stopped_each_time_it_stops(caplog):
    """Once per stop, not once per check; and again at the next stop after it resumed (the log
    said nothing of a second hang otherwise)."""
    running_for, pings = [5.0], []
    watchdog = Watchdog(interval=0.02, loop_stale_after=1000, batch_running_for=lambda: running_for[0],
                        batch_limit=1, notify=pings.append)

    def complaints() -> int:
        return sum("not pinging systemd's watchdog" in record.getMessage() for record in caplog.records)

    with caplog.at_level(logging.ERROR, logger="daemon.watchdog"):
        watchdog.start()
        try:
            wait_for(lambda: complaints() == 1, "the first complaint")
            assert "a database batch has run for 5.0 s, past every timeout" in caplog.text  # the why
            time.sleep(0.2)  # ten checks more: still one line
            assert complaints() == 1 and pings == []
            running_for[0] = 0.0
            wait_for(lambda: pings, "a ping once the batch is over")
            running_for[0] = 5.0
            wait_for(lambda: complaints() == 2, "the second complaint")
        finally:
            watchdog.stop()


@pytest.mark.slow
def test_the_watchdog_stops_while_a_lane_is_stuck_at_a_batch(watched, monkeypatch):
    # The batch committed, the serving loop turns, but the lane that answers GET / never
    # returns from answering it: GET / is answered no more, so systemd must hear of it.
    port, pings = watched
    wait_for_pings(pings, 3)
    stuck, released = threading.Event(), threading.Event()
    real_api_json = QueryResult.api_json

    def stuck_api_json(self):  # what GET / answers with, made in the lane's thread
        stuck.set()
        released.wait(30)  # e.g. a deadlock in the lane's thread
        return real_api_json(self)

    monkeypatch.setattr(QueryResult, "api_json", stuck_api_json)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(20)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            assert stuck.wait(10)
            # Past the limit (max_wait plus LOOP_STALE_SECONDS: 2.5 s) from the lane's turn's start.
            time.sleep(3.5)
            quiet_from = time.monotonic()
            time.sleep(1.5)
            assert pings.between(quiet_from, time.monotonic()) == 0
        finally:
            released.set()
        assert client.recv(100).startswith(b"HTTP/1.1 200")
    before = len(pings.times)
    wait_for_pings(pings, before + 3)


def test_the_scheduler_stops_and_tz_is_left_alone_when_serving_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")

    listeners = []

    def failing(settings, listener, metrics, stopping, *, on_ready, **_):
        listeners.append(listener)
        on_ready()  # the scheduler starts here
        raise RuntimeError("the serving loop died")

    monkeypatch.setattr(server_module, "serve_requests", failing)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, seed_count=10, interval=3600)
    serve_until_serving_dies(settings)
    deadline = time.monotonic() + 10
    while any(thread.name.startswith("maxtwo-scheduler") for thread in threading.enumerate()):
        assert time.monotonic() < deadline, [thread.name for thread in threading.enumerate()]
        time.sleep(0.05)
    assert os.environ["TZ"] == "Europe/Berlin"
    assert listeners[0].fileno() == -1  # the port given back


def serve_until_serving_dies(settings: Settings) -> None:
    """serve() on `settings`, whose serve_requests() a test made raise RuntimeError("... died");
    the SIGTERM and SIGINT handlers serve() installed put back as they were (the throwaway
    PostgreSQL's, devtools/pgserver.py, among them)."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(RuntimeError, match="died"):
            serve(settings)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_running_randomization_gets_its_time_to_commit_when_serving_fails(tmp_path, monkeypatch):
    """No signal started a shutdown budget: the run still gets SCHEDULER_STOP_SECONDS, not none."""
    started, finished = threading.Event(), threading.Event()

    def randomize(*args, **kwargs):
        started.set()
        time.sleep(0.5)  # a run in progress, its commit to come
        finished.set()

    def failing(settings, listener, metrics, stopping, *, on_ready, **_):
        on_ready()  # the scheduler starts here, and makes up the current slot at once
        assert started.wait(10)
        raise RuntimeError("the serving loop died")

    monkeypatch.setattr(server_module, "randomize_if_due", randomize)
    monkeypatch.setattr(server_module, "serve_requests", failing)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, seed_count=10, interval=3600)
    serve_until_serving_dies(settings)
    assert finished.is_set(), "serve() returned while the randomization still ran"


def test_the_lanes_answer_once_their_batch_is_in_not_at_its_deadline(tmp_path):
    """Each lane is woken as its batch's outcomes come in (on_answer): a lost wake-up answered
    every batched request at its batch's deadline instead (max_wait: 30 s here), and every
    other test passed, only slower."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0,
                        connect_timeout=10, statement_timeout=10)
    increment = b'{"key": "k", "value": 1}'
    requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(increment), increment),
    ]
    with serving_in_a_thread(settings, users=10) as listener:
        for request, status in zip(requests, (b"200", b"202"), strict=True):
            with socket.create_connection(listener.getsockname(), timeout=60) as client:
                started = time.monotonic()
                client.sendall(request)
                assert client.recv(100).startswith(b"HTTP/1.1 " + status)
                assert time.monotonic() - started < 10, "answered at the batch's deadline"


def test_a_drain_that_runs_out_of_time_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "DRAIN_SECONDS", 0.5)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, threads=2)
    with caplog.at_level(logging.INFO, logger="maxtwo"):
        with serving_in_a_thread(settings) as listener:
            half = socket.create_connection(listener.getsockname(), timeout=10)
            half.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            time.sleep(0.3)
        half.close()
    assert "requests still unanswered after" in caplog.text


def job_run_after_its_boundary(engine, interval: float, **kwargs):
    """The scheduler's job, each call run `after` seconds (1 by default) past the slot's
    boundary by its clock."""
    clock = [0.0]
    run = server_module.scheduled_job(engine, interval, clock=lambda: clock[0], **kwargs)

    def job(due_at, after: float = 1.0):
        clock[0] = due_at.timestamp() + after
        return run(due_at)

    return job


def test_the_scheduled_job_deletes_expired_idempotency_keys_once_an_hour(engine, monkeypatch, caplog):
    import datetime as dt

    from maxtwo_cli.core.batch import HeldConnection
    from maxtwo_cli.core.counters import Increment, apply_increments, increment
    from maxtwo_cli.core.seed import seed_users

    seed_users(engine, 10)

    def add_expired_key() -> None:
        held = HeldConnection(engine)
        with held.transaction():
            apply_increments(held, [Increment("c", 1, "old-key")], now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=25))
        held.release()

    def keys() -> set[str]:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(idempotency_keys.c.key)).scalars())

    def randomization_failing_with(error: MaxtwoError):
        def randomize(*args, **kwargs):
            raise error

        return randomize

    add_expired_key()
    increment(engine, "c", 1, idempotency_key="new-key")
    job = job_run_after_its_boundary(engine, 60)
    job(dt.datetime(2026, 12, 3, 18, 1, tzinfo=dt.UTC))  # not at a full hour: kept
    assert keys() == {"old-key", "new-key"}
    with caplog.at_level(logging.INFO, logger="maxtwo"):
        job(dt.datetime(2026, 12, 3, 19, 0, tzinfo=dt.UTC))
    assert keys() == {"new-key"}
    assert "deleted 1 expired Idempotency-Keys" in caplog.text  # its one trace in the journal
    # A full hour whose randomization fails still deletes them...
    add_expired_key()
    monkeypatch.setattr(server_module, "randomize_if_due", randomization_failing_with(MaxtwoError("failed")))
    with pytest.raises(MaxtwoError):
        job(dt.datetime(2026, 12, 3, 20, 0, tzinfo=dt.UTC))
    assert keys() == {"new-key"}
    # ...but not after a database that did not answer: it would wait for it all over again.
    add_expired_key()
    silent = DatabaseUnavailableError("the database does not answer")
    monkeypatch.setattr(server_module, "randomize_if_due", randomization_failing_with(silent))
    with pytest.raises(DatabaseUnavailableError):
        job(dt.datetime(2026, 12, 3, 21, 0, tzinfo=dt.UTC))
    assert keys() == {"old-key", "new-key"}


@pytest.mark.parametrize("journal_stream", [None, "inherited", "stderr"])
def test_a_log_message_is_one_line_whatever_a_client_put_in_it(capsys, monkeypatch, journal_stream):
    """waitress logs "Client disconnected while serving <path>" with the path decoded as is: a
    newline in it forged a log line of its own. Under journald each line leads with its syslog
    priority: without it, journald stored every line at "info" (an audit); not when stderr is
    not the journal's stream, though the variable was inherited (a redirect, a terminal)."""
    import logging

    under_journald = journal_stream == "stderr"
    if journal_stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        found = os.fstat(2)  # (capsys replaces sys.stderr, not the process's fd 2)
        monkeypatch.setenv("JOURNAL_STREAM", f"{found.st_dev}:{found.st_ino + (journal_stream == 'inherited')}")
    root, waitress_log, queue_log = (logging.getLogger(name) for name in ("", "waitress", "waitress.queue"))
    handlers, level, filters, queue_level = root.handlers[:], root.level, waitress_log.filters[:], queue_log.level
    try:
        server_module.configure_logging()
        assert any(isinstance(each, transport.ConnectionLimitNotes) for each in waitress_log.filters)
        logging.getLogger("waitress").info("Client disconnected while serving %s",
                                           "/x\n2026 CRITICAL forged\x1b[2J\x9b2J")  # (C1's CSI too)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("maxtwo").exception("failed\tonce")
    finally:  # the process's logging as it was
        root.handlers[:] = handlers
        root.setLevel(level)
        waitress_log.filters[:] = filters
        queue_log.setLevel(queue_level)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("INFO waitress: Client disconnected while serving /x\\n2026 CRITICAL forged\\x1b[2J\\x9b2J")
    assert lines[1].endswith("ERROR maxtwo: failed\tonce")
    if under_journald:
        assert lines[0].startswith("<6>INFO waitress: ") and lines[1].startswith("<3>ERROR maxtwo: ")
        assert lines[2] == "<3>Traceback (most recent call last):" and all(line.startswith("<3>") for line in lines[2:])
    else:
        assert lines[0][:4].isdigit() and lines[2] == "Traceback (most recent call last):"  # (a time first)


def add_expired_idempotency_key(engine, key: str = "old") -> None:
    import datetime as dt

    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert().values(
            key=key, fingerprint="f", created_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=25)))


def idempotency_keys_left(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(idempotency_keys))


def test_at_an_interval_of_a_second_the_hourly_cleanup_still_runs(engine):
    """Its share of the slot leaves a margin before the next boundary: a full second of it
    left no time at all at --interval 1 (the end-to-end tests' interval), and the expired
    keys were never deleted."""
    import datetime as dt

    from maxtwo_cli.core.seed import seed_users

    seed_users(engine, 10)
    add_expired_idempotency_key(engine)
    job_run_after_its_boundary(engine, 1)(dt.datetime(2026, 12, 3, 19, 0, tzinfo=dt.UTC), after=0.05)
    assert idempotency_keys_left(engine) == 0


def test_a_failed_cleanup_waits_for_the_next_hour_not_the_next_slot(engine, monkeypatch, caplog):
    """Each try may wait out a lock timeout in the randomizer's thread: not once a slot."""
    import datetime as dt

    from maxtwo_cli.core.seed import seed_users

    seed_users(engine, 10)
    tries = []

    def failing_cleanup(*args, **kwargs):
        tries.append(1)
        raise MaxtwoError("canceling statement due to lock timeout")

    monkeypatch.setattr(server_module, "delete_expired_idempotency_keys", failing_cleanup)
    job = job_run_after_its_boundary(engine, 60)
    hour = dt.datetime(2026, 12, 3, 19, 0, tzinfo=dt.UTC)
    with caplog.at_level(logging.WARNING, logger="maxtwo"):
        for minute in range(5):
            job(hour + dt.timedelta(minutes=minute))
    assert len(tries) == 1
    assert "deleting expired Idempotency-Keys failed" in caplog.text
    job(hour + dt.timedelta(hours=1))
    assert len(tries) == 2


def test_a_cleanup_out_of_time_goes_on_after_the_next_slot_and_stops_at_a_stop_request(engine, monkeypatch):
    """1M expired keys took 2.3 s (SQLite) / 5.7 s (PostgreSQL) in one go, in the randomizer's
    thread: at a short interval the next slots were skipped. A cleanup has a share of the
    interval; what it leaves goes on after the next slot's randomization, not an hour later."""
    import datetime as dt

    from maxtwo_cli.core import counters
    from maxtwo_cli.core.seed import seed_users

    seed_users(engine, 10)
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert(), [
            {"key": f"k{number}", "fingerprint": "f", "created_at": now - dt.timedelta(hours=25)}
            for number in range(5)
        ])

    def left() -> int:
        with engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).select_from(idempotency_keys))

    monkeypatch.setattr(counters, "CLEANUP_CHUNK_POSTGRES", 2)
    monkeypatch.setattr(counters, "CLEANUP_CHUNK_SQLITE", 2)
    monkeypatch.setattr(server_module, "CLEANUP_SHARE", 0)  # out of time after each chunk
    job = job_run_after_its_boundary(engine, 60)
    slot = dt.datetime(2026, 12, 3, 19, 0, tzinfo=dt.UTC)
    job(slot)  # the full hour
    assert left() == 3
    job(slot + dt.timedelta(minutes=1))  # goes on
    assert left() == 1
    job(slot + dt.timedelta(minutes=2))
    assert left() == 0
    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert().values(key="late", fingerprint="f", created_at=now - dt.timedelta(hours=25)))
    job(slot + dt.timedelta(minutes=3))  # done: nothing until the next hour
    assert left() == 1

    monkeypatch.setattr(server_module, "CLEANUP_SHARE", 1)
    with engine.begin() as conn:
        conn.execute(idempotency_keys.insert(), [
            {"key": f"s{number}", "fingerprint": "f", "created_at": now - dt.timedelta(hours=25)}
            for number in range(4)
        ])
    job_at_stop = job_run_after_its_boundary(engine, 60, stopping=lambda: True)
    job_at_stop(slot + dt.timedelta(hours=1))
    assert left() == 3  # one chunk, then the stop request

    # Near the next boundary (a wait for another daemon's run took most of the slot): none, so
    # that this daemon's thread is free at the boundary; the next slot's goes on.
    late = job_run_after_its_boundary(engine, 60)
    late(slot + dt.timedelta(hours=2), after=59.5)
    assert left() == 3
    late(slot + dt.timedelta(hours=2, minutes=1))
    assert left() < 3


def test_a_cleanup_that_starts_late_in_its_slot_ends_a_margin_before_the_next_boundary(engine, monkeypatch):
    """Its share of the interval (15 s of 60) is cut to what is left of the slot but the margin:
    50 s into it (a wait for another daemon's run), 9 s. A full share would run past the next
    boundary, whose run this daemon would then skip as an overlap."""
    import datetime as dt

    from maxtwo_cli.core.seed import seed_users

    seed_users(engine, 10)
    add_expired_idempotency_key(engine)
    budgets = []
    real_forget = server_module.forget_expired_idempotency_keys

    def forget(engine, seconds, stopping):
        budgets.append(seconds)
        return real_forget(engine, seconds, stopping)

    monkeypatch.setattr(server_module, "forget_expired_idempotency_keys", forget)
    job = job_run_after_its_boundary(engine, 60)
    job(dt.datetime(2026, 12, 3, 19, 0, tzinfo=dt.UTC), after=50)
    assert budgets == [pytest.approx(60 - server_module.CLEANUP_MARGIN - 50)]
    assert idempotency_keys_left(engine) == 0
    job(dt.datetime(2026, 12, 3, 20, 0, tzinfo=dt.UTC), after=1)  # early in its slot: the whole share
    assert budgets[1:] == [pytest.approx(60 * server_module.CLEANUP_SHARE)]


def test_a_daemon_whose_serving_fails_closes_its_database_connections(tmp_path, monkeypatch):
    """The scheduler's engine (the schema, the seed and the randomizations use it) is disposed
    of on the way out, not left to the garbage collector: on PostgreSQL each idle connection
    holds a server process (and a slot of max_connections) until then."""
    monkeypatch.setattr(server_module, "configure_logging", lambda: None)
    engines = []
    create_engine = server_module.db.create_engine
    monkeypatch.setattr(server_module.db, "create_engine",
                        lambda *args, **kwargs: engines.append(create_engine(*args, **kwargs)) or engines[-1])

    def failing(settings, listener, metrics, stopping, *, on_ready, **_):
        on_ready()  # the scheduler starts here (and makes up the current slot with the engine)
        raise RuntimeError("the serving loop died")

    monkeypatch.setattr(server_module, "serve_requests", failing)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", port=0, seed_count=10, interval=3600)
    serve_until_serving_dies(settings)
    [engine] = engines
    assert engine.pool.checkedin() == 0 and engine.pool.checkedout() == 0


def test_a_wait_for_another_daemon_s_run_ends_when_serving_fails(postgres_url, monkeypatch, caplog):
    """No signal came, yet the scheduler is stopping (the serving loop died): its job stops
    waiting for the run another daemon holds the slot's lock for, and leaves the slot to it.
    Otherwise it would wait up to the half of the slot (30 minutes at an hourly interval), far
    past what the shutdown gives it, and be cut off at exit."""
    from maxtwo_cli.core.randomize import RANDOMIZE_LOCK_KEY

    monkeypatch.setattr(server_module, "configure_logging", lambda: None)
    # The budget of a stop that no signal started, long enough that only a wait that never
    # ends would run out of it.
    monkeypatch.setattr(server_module, "SCHEDULER_STOP_SECONDS", 20.0)
    # An interval of 1e10 s (317 years): the slot began at the epoch, and its first half, all of
    # which the job would wait, lasts till 2128. (At an hourly one, the wait ended at once when
    # the test ran in the second half of an hour.)
    settings = Settings(database_url=postgres_url, port=0, seed_count=10, interval=1e10)
    # (Its statement timeout is also its idle-in-transaction timeout: the lock is held idle.)
    other = server_module.db.create_engine(dataclasses.replace(settings, statement_timeout=120))

    def waiting_for_the_lock() -> bool:
        with other.connect() as conn:
            return bool(conn.scalar(sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")))

    def failing(settings, listener, metrics, stopping, *, on_ready, **_):
        on_ready()  # the scheduler starts here, and makes up the current slot at once
        wait_for(waiting_for_the_lock, "the job waiting for the other daemon's run", seconds=30)
        raise RuntimeError("the serving loop died")

    monkeypatch.setattr(server_module, "serve_requests", failing)
    try:
        server_module.schema.ensure_schema(other)
        with other.begin() as holder, caplog.at_level(logging.INFO):
            # The other daemon's run for this slot, still going.
            holder.execute(sa.select(sa.func.pg_advisory_xact_lock(RANDOMIZE_LOCK_KEY)))
            serve_until_serving_dies(settings)
    finally:
        other.dispose()
    assert any("not waited for further: this daemon stops" in message for message in caplog.messages)
    assert not any("still running at shutdown" in message for message in caplog.messages)
