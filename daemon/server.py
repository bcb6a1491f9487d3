"""`maxtwo serve`: the process around the app. Owns the engine, the scheduler thread, waitress,
signals and sd_notify.

Start-up, in order: schema, seed if empty, bind, READY=1, scheduler, serve. On SIGTERM or
SIGINT: STOPPING=1, stop accepting, answer what was already accepted, stop the scheduler (a
running randomization commits or is rolled back), dispose of the engine, exit 0.
"""

from __future__ import annotations

import datetime as dt
import errno
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import waitress
from waitress import wasyncore
from waitress.server import BaseWSGIServer
from sqlalchemy.engine import Engine

from daemon import systemd
from daemon.app import create_app, query_combiner
from daemon.eventloop import ChangePoller, QuietChannel
from daemon.metrics import Metrics
from daemon.querylane import QueryLaneDispatcher
from daemon.scheduler import RandomizeScheduler
from maxtwo_cli import __version__
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.combiner import QueryCombiner
from maxtwo_cli.core.errors import AlreadySeededError, MaxtwoError
from maxtwo_cli.core.randomize import RandomizeResult, randomize_if_due
from maxtwo_cli.core.seed import has_users, seed_users
from maxtwo_cli.core.settings import Settings

log = logging.getLogger("maxtwo")

# The shutdown budget (systemd's TimeoutStopSec is 15 s; we promise 10): answer what was
# accepted, then give a running randomization the rest.
DRAIN_SECONDS = 5.0
SCHEDULER_STOP_SECONDS = 3.0
# The query committer gives its connection back (a stuck transaction is not waited out).
COMBINER_STOP_SECONDS = 1.0
# How often the serving loop looks up from poll() to notice a stop request.
LOOP_TICK_SECONDS = 0.2
# A connection counts as idle (safe to close at shutdown) once quiet this long: a client that
# has just connected may not have sent its request yet, and closing it then would reset it.
QUIET_SECONDS = 0.25

# waitress settings. NOTE: channel_timeout drops idle keep-alive connections; the connection
# limit is above the 200 concurrent clients we test with, below the default fd limit (1024).
WAITRESS_CONNECTION_LIMIT = 512
WAITRESS_CHANNEL_TIMEOUT = 30
WAITRESS_BACKLOG = 1024


class BindError(MaxtwoError):
    """The listening socket could not be created."""


def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    # NOTE: `schedule` compares naive local times, which repeat or skip an hour when daylight
    # saving time changes: the whole daemon runs in UTC, so the minutely runs never bunch up or
    # pause (and the log's times are UTC too).
    os.environ["TZ"] = "UTC"
    time.tzset()
    configure_logging(with_pid=settings.workers > 1)
    # NOTE: a fatal signal would otherwise end the daemon without a word in the journal: SQLite
    # maps the -shm file into memory, and a write to it that the file system refuses (an
    # immutable or vanished file) is a SIGBUS. This prints every thread's stack to stderr first.
    faulthandler.enable()
    log.info("maxtwo %s starting (pid %d)", __version__, os.getpid())
    if settings.workers > 1:
        from daemon.workers import supervise  # NOTE: imported here: it imports this module

        supervise(settings)
        return
    engine = db.create_engine(settings, pool_size=2)
    try:
        prepare_database(engine, settings)
        listener = listen(settings)
        log.info("listening on http://%s:%s", *listener.getsockname()[:2])
        metrics = Metrics()
        # Requests and the scheduler get pools of their own, so a burst of requests can never
        # take the connection a randomization needs.
        scheduler = RandomizeScheduler(scheduled_job(engine, settings.interval), settings.interval, metrics)

        def ready() -> None:
            systemd.notify("READY=1")
            scheduler.start()

        serve_requests(settings, listener, metrics, stop_on_signals(), on_ready=ready)
        scheduler.stop(SCHEDULER_STOP_SECONDS)
    finally:
        engine.dispose()
    log.info("stopped")


def prepare_database(engine: Engine, settings: Settings) -> None:
    """The schema, and the users if there are none yet (see --seed-count)."""
    log.info("database: %s", db.redact(engine.url))
    schema.ensure_schema(engine)
    seed_if_empty(engine, settings.seed_count)


def serve_requests(
    settings: Settings,
    listener: socket.socket,
    metrics: Metrics,
    stop: threading.Event,
    *,
    on_ready: Callable[[], None],
) -> None:
    """Answer HTTP on `listener` until `stop` is set, then drain: what every serving process does."""
    request_engine = db.create_engine(settings, pool_size=settings.threads, pre_ping=False)
    combiner = query_combiner(settings, request_engine, metrics)
    try:
        app = create_app(settings, request_engine, metrics=metrics, combiner=combiner)
        server = bind(app, settings, listener, query_lane=combiner)
        on_ready()
        _serve_until(server, stop)
        log.info("stopping: answering the requests already accepted")
        _drain(server, time.monotonic() + DRAIN_SECONDS)
    finally:
        combiner.close(COMBINER_STOP_SECONDS)
        request_engine.dispose()


def configure_logging(*, with_pid: bool = False) -> None:
    """One line per event on stderr; journald adds its own timestamps. `with_pid`: for several
    processes, whose lines journald files under the one that opened the stream."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s"
    if with_pid:
        fmt = "[%(process)d] " + fmt
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format=fmt if under_journald else "%(asctime)s " + fmt,
        force=True,
    )
    # NOTE: waitress warns "Task queue depth is N" once per queued request under load, which
    # would flood the journal exactly when it matters; queueing is visible in the latency
    # histogram instead.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def seed_if_empty(engine: Engine, count: int) -> None:
    if count <= 0 or has_users(engine):
        return
    log.info("no users yet: seeding %d", count)

    def progress(done: int, total: int) -> None:
        log.info("seeding: %d/%d users", done, total)

    try:
        result = seed_users(engine, count, on_progress=progress)
    except AlreadySeededError:
        log.info("another process seeded the users first")
        return
    log.info("seeded %d users in %.2f s (%.0f rows/s)", result.rows, result.seconds, result.rows_per_second)


def scheduled_job(engine: Engine, interval: float):
    def job(due_at: dt.datetime) -> RandomizeResult | None:
        return randomize_if_due(engine, due_at=due_at, interval=interval)

    return job


def listen(settings: Settings) -> socket.socket:
    """The listening socket for settings.host and settings.port (0: any free port)."""
    host = settings.host.removeprefix("[").removesuffix("]")  # [::1], as in a URL
    try:
        addresses = socket.getaddrinfo(
            host, settings.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        raise BindError(f"cannot listen on {settings.host!r}: not an address or host name") from None
    if len({address[4] for address in addresses}) > 1:
        # NOTE: a name with several addresses (localhost: 127.0.0.1 and ::1) would need a socket
        # each, which the graceful drain below does not drive.
        raise BindError(
            f"--host {settings.host} resolves to several addresses; give one (e.g. 127.0.0.1 or ::1)"
        )
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As waitress does: a restart may bind while the last run's connections are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(WAITRESS_BACKLOG)
    except OSError as ex:
        sock.close()
        reason = "the port is already in use" if ex.errno == errno.EADDRINUSE else ex.strerror
        raise BindError(f"cannot listen on {settings.host}:{settings.port}: {reason}") from None
    return sock


def bind(
    app, settings: Settings, listener: socket.socket | None = None, *, query_lane: QueryCombiner | None = None
) -> BaseWSGIServer:
    """A waitress server for `app` on `listener` (by default, a new one from listen()).

    `query_lane`: the combiner that app's GET / queries through, to answer those requests in
    batches (daemon/querylane.py) rather than one request thread each."""
    dispatcher = None
    if query_lane is not None:
        dispatcher = QueryLaneDispatcher(query_lane, paths=["/"])
        dispatcher.set_thread_count(settings.threads)
    server = waitress.create_server(
        app,
        sockets=[listener or listen(settings)],
        threads=settings.threads,
        connection_limit=WAITRESS_CONNECTION_LIMIT,
        channel_timeout=WAITRESS_CHANNEL_TIMEOUT,
        backlog=WAITRESS_BACKLOG,
        asyncore_use_poll=True,  # select() cannot watch more than 1024 descriptors
        ident="maxtwo",
        expose_tracebacks=False,
        # NOTE: waitress's own hook for a dispatcher of one's own (it calls it a test shim;
        # waitress is pinned below 3.1 for this and the channel subclass). None: its default.
        _dispatcher=dispatcher,
    )
    server.channel_class = QuietChannel
    return server


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if not stop.is_set():
            systemd.notify("STOPPING=1")
            log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _serve_until(server: BaseWSGIServer, stop: threading.Event) -> None:
    # NOTE: waitress's own run() loops until an exception; this loop polls in short ticks, so a
    # stop request is noticed without tearing the loop down mid-response.
    if not ChangePoller.available():
        while not stop.is_set():
            wasyncore.loop(timeout=LOOP_TICK_SECONDS, map=server._map, use_poll=True, count=1)
        return
    poller = ChangePoller(server)
    try:
        while not stop.is_set():
            poller.poll(LOOP_TICK_SECONDS)
    finally:
        poller.close()


def _drain(server: BaseWSGIServer, deadline: float) -> None:
    """Stop listening, answer every request already received, then close everything."""
    # Connections that completed their handshake but wait in the backlog count as accepted:
    # take them in before the listening socket closes (closing it would reset them).
    for _ in range(WAITRESS_BACKLOG):
        try:
            accepted = server.accept()
            if accepted is None:
                break
            conn, addr = accepted
            server.set_socket_options(conn)
        except OSError:
            continue  # one client gave up in the backlog; the next may not have
        server.channel_class(server, conn, server.fix_addr(addr), server.adj, map=server._map)
    # Close the listening socket only; the trigger that wakes this loop must stay open.
    wasyncore.dispatcher.close(server)
    while time.monotonic() < deadline:
        if not any(_busy(channel) for channel in list(server.active_channels.values())) and not (
            server.task_dispatcher.queue or server.task_dispatcher.active_count
        ):
            break
        wasyncore.loop(timeout=0.05, map=server._map, use_poll=True, count=1)
    else:
        log.warning("shutdown: requests still unanswered after %.0f s, closing them", DRAIN_SECONDS)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    wasyncore.close_all(server._map)


def _busy(channel) -> bool:
    """A request in progress, a response unsent, or bytes that may still be on their way."""
    return bool(
        channel.requests
        or channel.request is not None
        or channel.total_outbufs_len
        or time.time() - channel.last_activity < QUIET_SECONDS
    )
