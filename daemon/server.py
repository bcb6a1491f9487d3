"""`maxtwo serve`: the process around the app. Owns the engines, the batchers, the scheduler
thread, the watchdog, the transport (waitress), signals and sd_notify.

Start-up, in order: bind (the port taken), schema, seed if empty, listen, READY=1, scheduler,
serve. On SIGTERM or SIGINT: STOPPING=1, stop accepting, answer what was already accepted, stop
the scheduler (a running randomization commits or is rolled back), close the batchers, dispose
of the engines, exit 0. Several cores or hosts: several daemons behind a reverse proxy (docs/deployment.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import faulthandler
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from daemon import systemd, transport
from daemon.app import (
    ARRIVED_AT,
    LANE_ROUTES,
    PREFETCHED_ANSWER,
    batch_timeout,
    collect_outcomes,
    create_app,
    enqueue_outcomes,
    failure_scope,
    new_batchers,
    outcomes_ready,
)
from daemon.batcher import Batchers
from daemon.metrics import Metrics
from daemon.resources import MAX_INCREMENT_BODY, WriteHealth
from daemon.scheduler import RandomizeScheduler
from daemon.watchdog import Watchdog
from maxtwo_cli import __version__
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.counters import delete_expired_idempotency_keys
from maxtwo_cli.core.errors import AlreadySeededError, DatabaseUnavailableError, MaxtwoError
from maxtwo_cli.core.journal import priority_prefix, stderr_is_journal
from maxtwo_cli.core.randomize import RandomizeResult, randomize_if_due
from maxtwo_cli.core.seed import has_users, seed_users
from maxtwo_cli.core.settings import Settings

log = logging.getLogger("maxtwo")

# The shutdown budget, from the signal (systemd's TimeoutStopSec is 15 s; we promise 10, and
# keep a second for the process's own exit): answer what was accepted, then give a running
# randomization what is left.
SHUTDOWN_SECONDS = 9.0
DRAIN_SECONDS = 5.0
# Requests still waiting for the database this long into the drain, behind a batch that has
# run this long (a healthy one takes milliseconds), are answered 503: their batcher abandons
# them, and the rest of the drain sends those answers.
ABANDON_AFTER_SECONDS = 4.0
STUCK_BATCH_SECONDS = 1.0
# For a running randomization when the daemon stops for another reason than a signal.
SCHEDULER_STOP_SECONDS = 3.0
# The batcher gives its connection back (a stuck transaction is not waited out).
BATCHER_STOP_SECONDS = 1.0
# The serving loop turns at least every transport.LOOP_TICK_SECONDS; this long without a turn,
# it is hung (a generous margin for a loaded machine and a long garbage collection).
LOOP_STALE_SECONDS = 10.0


class BindError(MaxtwoError):
    """The listening socket could not be created."""


@dataclasses.dataclass(frozen=True)
class TransportOptions:
    """The transport's speed hooks (daemon/transport.py), all on in production; the benchmark
    that keeps them (bench/hooks.py) turns them off one by one."""

    lane: bool = True
    change_poller: bool = True
    quiet_channel: bool = True
    one_pull: bool = True  # the lane's trigger pulls for a batch made as one (with the change poller)
    accept_backlog: bool = True  # up to 64 waiting connections taken per turn of the loop (not one)


class StopRequest:
    """Set by SIGTERM or SIGINT, read by the serving loop.

    NOTE: a signal handler runs between two bytecodes of the main thread, wherever it is, even
    inside the logging module or sd_notify's socket code: it only records the signal here, and
    the loop, which turns at least every LOOP_TICK_SECONDS, does the rest."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.at: float | None = None  # time.monotonic() of the first signal

    def __call__(self, signum: int, _frame: object = None) -> None:
        self.signal = signum
        if self.at is None:
            self.at = time.monotonic()

    def time_left(self) -> float:
        """Seconds left of the shutdown budget; SCHEDULER_STOP_SECONDS if no signal started it."""
        if self.at is None:
            return SCHEDULER_STOP_SECONDS
        return max(0.0, self.at + SHUTDOWN_SECONDS - time.monotonic())

    def requested(self) -> bool:
        return self.signal is not None

    def install(self) -> StopRequest:
        signal.signal(signal.SIGTERM, self)
        # NOTE: a SIGINT ignored from the start stays ignored, as during the start's seed (and
        # in Python itself): a script's background job shares the script's process group, so
        # the Ctrl-C that stops the script reaches the job too, which the shell made ignore it.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self)
        return self


def serve(settings: Settings, options: TransportOptions = TransportOptions()) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    configure_logging()
    # NOTE: a fatal signal would otherwise end the daemon without a word in the journal: SQLite
    # maps the -shm file into memory, and a write to it that the file system refuses (an
    # immutable or vanished file) is a SIGBUS. This prints every thread's stack to stderr first.
    faulthandler.enable()
    log.info("maxtwo %s starting (pid %d)", __version__, os.getpid())
    engine = db.create_engine(settings, pool_size=2)
    scheduler: RandomizeScheduler | None = None
    listener: socket.socket | None = None
    stop = StopRequest()
    try:
        # NOTE: the port taken before the database is prepared, and listened on after: a port in
        # use fails at once rather than after a seed of a million users, and no client waits in
        # the backlog meanwhile.
        listener = bind(settings)
        prepare_database(engine, settings)
        start_listening(listener, settings)
        log.info("listening on %s", listening_url(listener.getsockname()))
        # NOTE: from here on, SIGTERM asks for a graceful stop; before, it ends the process at
        # once (a seed in progress is rolled back by the database).
        stop.install()
        metrics = Metrics()
        # Requests and the scheduler get pools of their own, so a burst of requests can never
        # take the connection a randomization needs.
        # (Its job stops waiting for another daemon's run at a signal, or once the scheduler is
        # stopped for any other reason: the serving loop failed.)
        scheduler = RandomizeScheduler(
            scheduled_job(engine, settings.interval, lambda: stop.requested() or scheduler.stopping()),
            settings.interval, metrics, catch_up=True)
        serve_requests(settings, listener, metrics, stop.requested, on_ready=scheduler.start,
                       on_stopping=lambda: _stopping(stop, scheduler), options=options)
    finally:
        if scheduler is not None:
            # NOTE: what the drain and the batchers left of the budget, not a fixed share: a
            # drain that ran its course, then a stuck randomization, took 10.05 s to exit.
            scheduler.stop(stop.time_left())
        engine.dispose()
        if listener is not None:
            listener.close()  # (closed by the transport already, unless serving failed before it)
    log.info("stopped")


def _stopping(stop: StopRequest, scheduler: RandomizeScheduler) -> None:
    systemd.notify("STOPPING=1")
    if stop.signal is not None:
        log.info("received %s", signal.Signals(stop.signal).name)
    # NOTE: before the drain, not after it: a run started meanwhile would be cut off at exit
    # (rolled back), and the other daemons skip a slot one of them has taken.
    scheduler.request_stop()


def serve_requests(
    settings: Settings,
    listener: socket.socket,
    metrics: Metrics,
    stopping: Callable[[], bool],
    *,
    on_ready: Callable[[], None] = lambda: None,
    on_stopping: Callable[[], None] = lambda: None,
    options: TransportOptions = TransportOptions(),
) -> None:
    """Answer HTTP on `listener` until stopping(), then drain. READY=1 once serving; the
    watchdog runs meanwhile. on_ready() after READY=1 (the scheduler starts there), and
    on_stopping() once a stop is requested (STOPPING=1 there)."""
    request_engine = db.create_engine(settings, pool_size=settings.threads, pre_ping=False)
    writes = WriteHealth()
    batchers = new_batchers(settings, request_engine, metrics, writes)
    watchdog: Watchdog | None = None
    try:
        app = create_app(settings, request_engine, metrics=metrics, batchers=batchers, writes=writes)
        server = open_transport(app, listener, settings.threads, batched_routes(batchers), options,
                                on_refused=lambda status: metrics.http_refused.labels(status=str(status)).inc())
        # GET / and POST /increment wait in the lanes' queues before their batchers': both count.
        metrics.batch_queue_depth.set_function(lambda: batchers.pending() + server.lane_waiting())
        watchdog = Watchdog(
            interval=systemd.watchdog_interval(),
            loop_stale_after=LOOP_STALE_SECONDS,
            batch_running_for=batchers.running_for,
            lane_busy_for=server.lane_busy_for,
            # A batch past its callers' wait is stuck beyond what any database timeout allows;
            # so is a lane at one batch that long (it waits for the batch no longer than that).
            batch_limit=batch_timeout(settings) + LOOP_STALE_SECONDS,
        )
        systemd.notify("READY=1")
        watchdog.start()
        on_ready()
        server.serve_until(stopping, on_turn=watchdog.loop_turned)
        on_stopping()
        log.info("stopping: answering the requests already accepted")
        if not server.drain(DRAIN_SECONDS, on_turn=draining_turn(watchdog, batchers)):
            log.warning("shutdown: requests still unanswered after %.0f s, closed", DRAIN_SECONDS)
    finally:
        if watchdog is not None:
            watchdog.stop()
        batchers.close(BATCHER_STOP_SECONDS)
        request_engine.dispose()


def draining_turn(watchdog: Watchdog, batchers: Batchers) -> Callable[[], None]:
    """What the loop does at every turn of the drain: tell the watchdog, and once
    ABANDON_AFTER_SECONDS have passed, answer whoever still waits for a stuck batch 503 (a batch
    that has run STUCK_BATCH_SECONDS; a healthy one takes milliseconds)."""
    abandon_at = time.monotonic() + ABANDON_AFTER_SECONDS

    def turn() -> None:
        watchdog.loop_turned()
        # NOTE: only the batchers stuck (on PostgreSQL a kind each): the other kind's requests
        # still get their answers.
        if time.monotonic() >= abandon_at and batchers.abandon_stuck(
            "shutting down: the database did not answer in time", STUCK_BATCH_SECONDS
        ):
            log.warning("shutdown: gave up waiting for the database; the requests still waiting get 503")

    return turn


def open_transport(
    app: Callable, listener: socket.socket, threads: int, lanes: list[transport.Lane], options: TransportOptions,
    on_refused: Callable[[int], None] | None = None,
) -> transport.Transport:
    """The transport `maxtwo serve` answers on, `lanes` (if any) taking LANE_ROUTES' requests
    unless options turn them off.

    NOTE: the hello-world baseline (bench/hello.py) is built by this too, so that it travels
    the daemon's path by construction and cannot drift from it."""
    return transport.Transport(
        app,
        listener,
        threads=threads,
        lanes=lanes if options.lane else (),
        change_poller=options.change_poller,
        quiet_channel=options.quiet_channel,
        one_pull=options.one_pull,
        accept_backlog=options.accept_backlog,
        on_refused=on_refused,
        arrival_key=ARRIVED_AT,
    )


def batched_routes(batchers: Batchers) -> list[transport.Lane]:
    """GET / and POST /increment through the transport's lanes: their outcomes fetched in
    batches (daemon/app.py's enqueue_outcomes), handed to the app in its environ. A lane per
    route where each kind has a batcher of its own (PostgreSQL), so that an increment waiting
    for a row lock holds up no GET /'s answer; one for both where they share one (SQLite)."""
    return lanes_for(lambda requests, wake: enqueue_outcomes(batchers, requests, wake), outcomes_ready,
                     collect_outcomes,
                     max_batch=min(batcher.max_batch for batcher in batchers.each()),
                     max_wait=max(batcher.max_wait for batcher in batchers.each()),
                     separate=batchers.separate())


def lanes_for(submit: Callable[[list[transport.LaneRequest], Callable[[], None]], Any], ready: Callable[[Any], bool],
              collect: Callable[[Any, float], list], *, max_batch: int, max_wait: float,
              separate: bool = False) -> list[transport.Lane]:
    """A lane for LANE_ROUTES (`separate`: one for each of them), their outcomes from
    submit(requests, wake), ready(handle) and collect(handle, timeout) (transport.Lane)."""
    groups = [frozenset({route}) for route in LANE_ROUTES.values()] if separate else [frozenset(LANE_ROUTES.values())]
    return [
        transport.Lane(
            routes=routes,
            submit=submit,
            ready=ready,
            collect=collect,
            max_batch=max_batch,
            max_wait=max_wait,
            max_body=MAX_INCREMENT_BODY,
            environ_for=lambda outcome, arrived: {PREFETCHED_ANSWER: outcome, ARRIVED_AT: arrived},
            failure_scope=failure_scope,
        )
        for routes in groups
    ]


def prepare_database(engine: Engine, settings: Settings) -> None:
    """The schema, and the users if there are none yet (see --seed-count)."""
    log.info("database: %s", db.redact(engine.url))
    schema.ensure_schema(engine)
    seed_if_empty(engine, settings.seed_count)


def configure_logging() -> None:
    """One line per event on stderr; journald adds its own timestamps."""
    under_journald = stderr_is_journal()
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter(fmt) if under_journald else OneLineFormatter("%(asctime)s " + fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    transport.configure_logging()


# C0 and C1 control characters, the tab left alone.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class OneLineFormatter(logging.Formatter):
    """Control characters in a message escaped (a newline as \\n, ESC as \\x1b); a traceback
    keeps its lines. APPSEC: a message may quote what a client chose (waitress logs "Client
    disconnected while serving <path>", the path decoded as is): a newline in it forged a log
    line of its own, an escape sequence would drive an operator's terminal. (maxtwo's own
    messages quote such text as its repr.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging.Formatter's name
        return _CONTROLS.sub(lambda control: control.group().encode("unicode_escape").decode(),
                             super().formatMessage(record))


class JournalFormatter(OneLineFormatter):
    """Each line led by its syslog priority (<3> for an error), which journald takes from a
    stream (SyslogLevelPrefix=, on by default): without it every line was stored at "info", and
    `journalctl -p warning` showed no failure at all (an audit)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = priority_prefix(record.levelno)
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


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


# How often the scheduler also deletes the Idempotency-Keys past their 24 hours.
IDEMPOTENCY_CLEANUP_SECONDS = 3600
# A cleanup's time: this share of the interval. What it leaves goes on after the next slot's
# randomization (not an hour later): the slots stay on time whatever the backlog (1M expired
# keys took 2.3 s on SQLite, 5.7 s on PostgreSQL, in one go). No cap beyond that: at an
# interval of a day, 10 s a slot left the keys of more than 15 increments a second to pile up.
CLEANUP_SHARE = 0.25
# Seconds kept free before the next boundary (a quarter of the interval, if less): a chunk's
# time (0.45 s for 50,000 keys on PostgreSQL), since the cleanup looks at its time after each.
CLEANUP_MARGIN = 1.0


def scheduled_job(
    engine: Engine, interval: float, stopping: Callable[[], bool] = lambda: False, clock: Callable[[], float] = time.time
):
    """The scheduler's job: the slot's randomization, then, once an hour, the cleanup of expired
    Idempotency-Keys. `clock`: seconds since the Unix epoch (tests pass their own)."""
    left_over = False  # the last cleanup ran out of its time with expired keys left

    def job(due_at: dt.datetime) -> RandomizeResult | None:
        nonlocal left_over
        # Once an hour (the first slot at or after each full hour) and after a cleanup that ran
        # out of time, whether the randomization ran, was done elsewhere or failed for a reason
        # of its own (not a database that does not answer: the cleanup would wait out the same
        # timeouts); every daemon does it, and a DELETE of what is already gone costs nothing.
        cleanup = left_over or due_at.timestamp() % IDEMPOTENCY_CLEANUP_SECONDS < interval
        try:
            return randomize_if_due(engine, due_at=due_at, interval=interval, stopping=stopping)
        except DatabaseUnavailableError:
            cleanup = False
            raise
        finally:
            if cleanup:
                # Its share of the interval, and never past the next boundary: after a wait for
                # another daemon's run (up to half the interval) and its own, this daemon would
                # skip that boundary's run as an overlap.
                # (A chunk's time of margin: the time is looked at after each chunk.)
                margin = min(CLEANUP_MARGIN, interval * CLEANUP_SHARE)
                left = due_at.timestamp() + interval - margin - clock()
                left_over = left <= 0 or not forget_expired_idempotency_keys(
                    engine, min(interval * CLEANUP_SHARE, left), stopping)

    return job


def forget_expired_idempotency_keys(engine: Engine, seconds: float, stopping: Callable[[], bool]) -> bool:
    """Delete expired Idempotency-Keys for about `seconds` at most (one chunk at least), and
    not past a stop request; whether none is left."""
    deadline = time.monotonic() + seconds
    try:
        forgotten = delete_expired_idempotency_keys(
            engine, go_on=lambda: time.monotonic() < deadline and not stopping()
        )
    except MaxtwoError as ex:  # the next hour tries again
        log.warning("deleting expired Idempotency-Keys failed: %s", ex)
        return True
    if forgotten.deleted:
        more = "" if forgotten.done else "; more after the next randomization"
        log.info("deleted %d expired Idempotency-Keys%s", forgotten.deleted, more)
    return forgotten.done


def listening_url(address: tuple) -> str:
    """The URL of a socket address: http://127.0.0.1:8000, http://[::1]:8000,
    http://[fe80::1%25eth0]:8000 (a zone's "%" percent-encoded, RFC 6874)."""
    host, port = address[:2]
    return f"http://[{host.replace('%', '%25')}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(settings: Settings) -> socket.socket:
    """The listening socket for settings.host and settings.port (0: any free port)."""
    sock = bind(settings)
    try:
        start_listening(sock, settings)
    except BindError:
        sock.close()
        raise
    return sock


def start_listening(sock: socket.socket, settings: Settings) -> None:
    """Listen on a bound socket. NOTE: SO_REUSEADDR lets two sockets bind one port while
    neither listens yet (two daemons started at once on the same port): the second learns here."""
    try:
        sock.listen(transport.BACKLOG)
    except OSError as ex:
        raise _cannot_listen(settings, ex) from None


def bind(settings: Settings) -> socket.socket:
    """A socket bound to settings.host and settings.port (0: any free port), not listening yet:
    the port is taken (BindError if it cannot be), and no connection is accepted."""
    host = settings.host.removeprefix("[").removesuffix("]")  # [::1], as in a URL
    try:
        addresses = socket.getaddrinfo(
            host, settings.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as ex:  # a host name the resolver does not know, or no resolver
        raise BindError(f"cannot listen on {settings.host!r}: cannot resolve it ({ex.strerror})") from None
    except (OSError, UnicodeError):
        raise BindError(f"cannot listen on {settings.host!r}: not an address or host name") from None
    if len({address[4] for address in addresses}) > 1:
        # NOTE: a name with several addresses (localhost: 127.0.0.1 and ::1) would need a socket
        # each, which the graceful drain does not drive.
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
    except OSError as ex:
        sock.close()
        raise _cannot_listen(settings, ex) from None
    return sock


def _cannot_listen(settings: Settings, error: OSError) -> BindError:
    reason = "the port is already in use" if error.errno == errno.EADDRINUSE else error.strerror
    return BindError(f"cannot listen on {settings.host}:{settings.port}: {reason}")
