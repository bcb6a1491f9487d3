"""create_app(settings, engine): the Falcon WSGI app. A pure factory: no environment reads,
no threads, no connections opened here."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import falcon
from sqlalchemy.engine import Engine

from daemon.batcher import Batcher, Batchers, IncrementKind, Kind, QueryKind, QueueFullError
from daemon.metrics import Metrics
from daemon.resources import (
    RETRY_AFTER_SECONDS,
    CounterResource,
    DatabaseReads,
    HealthResource,
    IncrementResource,
    MetricsResource,
    OpenApiResource,
    QueryResource,
    WriteHealth,
    parse_increment,
)
from daemon.throttle import LogThrottle
from maxtwo_cli.core import db
from maxtwo_cli.core.counters import Applied, Increment
from maxtwo_cli.core.errors import DatabaseBusyError, DatabaseUnavailableError, MaxtwoError
from maxtwo_cli.core.settings import Settings

if TYPE_CHECKING:  # the app never needs the transport (nor waitress) itself
    from daemon.transport import LaneRequest

log = logging.getLogger(__name__)

# WSGI environ entries a server may set for a request whose outcome it fetched ahead (the
# daemon's lane, daemon/transport.py, with enqueue_outcomes() below): the outcome (GET /'s answer,
# an increment's Applied, or the error to answer with), and the time.perf_counter() at which the
# request arrived, so its latency counts the wait.
PREFETCHED_ANSWER = "maxtwo.prefetched_answer"
ARRIVED_AT = "maxtwo.arrived_at"
# The routes whose writes the lanes batch, (method, path), by the kind of write each makes.
LANE_ROUTES = {QueryKind.name: ("GET", "/"), IncrementKind.name: ("POST", "/increment")}


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    metrics: Metrics | None = None,
    batchers: Batchers | None = None,
    writes: WriteHealth | None = None,
) -> falcon.App:
    """The API: GET /, POST /increment, GET /counters/{key}, /healthz, /metrics, /openapi.json;
    JSON errors everywhere.

    `batchers`: those GET / and POST /increment write through (by default, new_batchers()'s);
    their owner closes them at shutdown; `writes`: what they tell of their commits and failures
    (/healthz reads it). Only new_batchers()'s feed the batch metrics
    (increments applied included)."""
    if batchers is not None and writes is None:
        raise TypeError("create_app(): batchers given without the WriteHealth they tell (writes=)")
    metrics = metrics or Metrics()
    app = falcon.App(middleware=[RequestMetrics(metrics)])
    writes = writes or WriteHealth()
    batchers = batchers or new_batchers(settings, engine, metrics, writes)
    app.add_route("/", QueryResource(batchers[QueryKind.name], metrics, PREFETCHED_ANSWER))
    app.add_route("/increment", IncrementResource(batchers[IncrementKind.name], metrics, PREFETCHED_ANSWER))
    # NOTE: `path`: a key may hold "/" (sent as %2F, which the server decodes before routing).
    reads = DatabaseReads(limit=max(1, settings.threads // 2))
    app.add_route("/counters/{key:path}", CounterResource(engine, reads))
    app.add_route("/healthz", HealthResource(engine, reads, writes))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_error_handler(MaxtwoError, DatabaseUnavailableAnswers())
    app.add_error_handler(QueueFullError, _overloaded)
    app.add_error_handler(Exception, _unexpected)
    app.set_error_serializer(_serialize_error)
    return app


def new_batchers(settings: Settings, engine: Engine, metrics: Metrics, writes: WriteHealth) -> Batchers:
    """The group commit for every write the API makes: a batcher per kind on PostgreSQL, one
    for both on SQLite (see Batchers). `writes`: told of every batch committed or failed."""

    sizes = {QueryKind.name: metrics.query_batch_size, IncrementKind.name: metrics.increment_batch_size}

    def observe(kind: str, outcomes: list[Any]) -> None:
        sizes[kind].observe(len(outcomes))
        if kind == IncrementKind.name:
            # NOTE: counted here, once per batch, rather than by each request's 202: a counter's
            # inc() takes a lock, which cost 1-2 us per request (bench/NOTES.md).
            applied = sum(1 for outcome in outcomes if isinstance(outcome, Applied))
            if applied:
                metrics.increments_applied.inc(applied)

    def committed(seconds: float) -> None:
        metrics.batch_commit_seconds.observe(seconds)
        writes.committed()

    def failed(error: BaseException) -> None:
        if not isinstance(error, DatabaseBusyError):  # see WriteHealth
            writes.failed()

    def batcher(kinds: list[Kind]) -> Batcher:
        return Batcher(
            engine,
            kinds,
            # Room for the batch running when a request comes and its own, each bounded by the
            # database timeouts; it ends a wait that nothing else would (a server gone silent).
            max_wait=batch_timeout(settings),
            on_batch=observe,
            on_commit=committed,
            on_failure=failed,
        )

    if db.is_postgres(engine):
        batchers = Batchers({kind.name: batcher([kind]) for kind in (QueryKind(), IncrementKind())})
    else:
        batchers = Batchers.shared(batcher([QueryKind(), IncrementKind()]))
    metrics.batch_queue_depth.set_function(batchers.pending)
    return batchers


def enqueue_outcomes(
    batchers: Batchers, requests: list[LaneRequest], on_answer: Callable[[], None] | None = None
) -> tuple[list[Any], list]:
    """Start getting the outcome of each of LANE_ROUTES' requests, each kind's writes in one
    batch: what the resources would get themselves (daemon/resources.py), a malformed
    increment's HTTP error included. The lane's submit; collect_outcomes() waits for them, and
    on_answer() is called once they are all in (outcomes_ready() tells)."""
    outcomes: list[Any] = [None] * len(requests)
    queries: list[int] = []
    increments: list[tuple[int, Increment]] = []
    for index, request in enumerate(requests):
        if request.method == "GET":
            queries.append(index)
            continue
        try:
            headers = request.headers
            increments.append((index, parse_increment(headers.get("CONTENT_TYPE"), request.body,
                                                      headers.get("IDEMPOTENCY_KEY"), headers.get("CONTENT_ENCODING"))))
        except Exception as ex:  # noqa: BLE001 - its own answer (an unexpected one: 500), not the batch's
            outcomes[index] = ex
    tickets: list = []

    def answered() -> None:
        # NOTE: once for the lot, not per kind: each call wakes the lane thread (the last two
        # answers at once may both see them all in: a wake-up more, harmless).
        if on_answer is not None and outcomes_ready((outcomes, tickets)):
            on_answer()

    if queries:
        batcher = batchers[QueryKind.name]
        tickets.append((queries, batcher, batcher.enqueue(QueryKind.name, [None] * len(queries), answered)))
    if increments:
        batcher = batchers[IncrementKind.name]
        tickets.append(([index for index, _ in increments], batcher,
                        batcher.enqueue(IncrementKind.name, [item for _, item in increments], answered)))
    return outcomes, tickets


def outcomes_ready(pending: tuple[list[Any], list]) -> bool:
    """Whether every outcome enqueue_outcomes() started getting is in."""
    return all(ticket.answered() for _, _, ticket in pending[1])


def collect_outcomes(pending: tuple[list[Any], list], timeout: float) -> list[Any]:
    """The outcomes enqueue_outcomes() started getting, waiting at most `timeout` s in all."""
    outcomes, tickets = pending
    deadline = time.monotonic() + timeout
    for indexes, batcher, ticket in tickets:
        for index, outcome in zip(indexes, batcher.outcomes(ticket, deadline - time.monotonic()), strict=True):
            outcomes[index] = outcome
    return outcomes


def failure_scope(outcome: Any) -> str | None:
    """Whom the failure an outcome reports concerns beyond its own request, of those queued
    meanwhile: "all" (the database failed), "route" (a lock or timeout that every request of
    its route meets: DatabaseBusyError, e.g. SQLite's main file held by a randomization, which
    POST /increment needs and GET / does not), or None (its own, a full queue, or no failure)."""
    if not isinstance(outcome, DatabaseUnavailableError) or isinstance(outcome, QueueFullError):
        return None
    return "route" if isinstance(outcome, DatabaseBusyError) else "all"


def batch_timeout(settings: Settings) -> float:
    """The longest a healthy batch usually takes: connecting, then its statements, each bounded.

    NOTE: not a hard bound. A batch may wait for a lock once per commit (on SQLite a batch of
    both kinds: its queries, its increments' statement and, rarely, a transaction for the increments that
    statement left out; and its queries' statement once more, up to twice, when the users changed
    while it waited: core/query.py); a caller that gives up gets a 503, an unknown outcome
    (docs/reliability.md)."""
    return settings.connect_timeout + 2 * settings.statement_timeout


# The methods falcon knows (HTTP's and WebDAV's), as a set: two lookups per request.
_KNOWN_METHODS = frozenset(falcon.COMBINED_METHODS)


class RequestMetrics:
    """Counts every answer by route and status, and times it; and answers an unknown method 501
    and names OPTIONS in an OPTIONS answer's Allow, here because every request passes this
    middleware (a second one would cost every request a second dispatch)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # NOTE: labels() validates and sorts its arguments on every call, which cost GET / more
        # than the counting itself; each series' child is looked up once and kept here. The
        # keys are bounded (routes, known methods, status codes), so these stay small.
        self._counters: dict[tuple[str, str, object], Any] = {}
        self._timers: dict[str, Any] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # A request from the lane (GET /, POST /increment) waited for its batch before the app
        # saw it.
        req.context.started = req.env.get(ARRIVED_AT) or time.perf_counter()
        if req.method not in _KNOWN_METHODS:
            # RFC 9110 section 9.1: a method the server does not recognize SHOULD get 501 (falcon
            # answers 400, "Invalid HTTP method"). Counted as method "OTHER" below.
            raise falcon.HTTPNotImplemented(description="the request method is not one this server implements")

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        # NOTE: the URI template, never the raw path, so a scan of random URLs cannot blow up
        # the number of time series.
        route = req.uri_template or "unmatched"
        # APPSEC: clients choose the method; an unknown one must not make a new time series.
        method = req.method if req.method in _KNOWN_METHODS else "OTHER"
        if method == "OPTIONS":
            _allow_options_too(resp)
        key = (route, method, resp.status)
        counter = self._counters.get(key)
        if counter is None:
            status = str(falcon.http_status_to_code(resp.status))
            counter = self._counters[key] = self._metrics.requests.labels(route=route, method=method, status=status)
        counter.inc()
        started = getattr(req.context, "started", None)
        if started is not None:
            timer = self._timers.get(route)
            if timer is None:
                timer = self._timers[route] = self._metrics.request_latency.labels(route=route)
            timer.observe(time.perf_counter() - started)


def _allow_options_too(resp: falcon.Response) -> None:
    """OPTIONS is a method of every path: falcon's answer to it leaves it out of Allow, where its
    405 puts it in (RFC 9110 section 10.2.1: the methods the path supports)."""
    allow = resp.get_header("Allow")
    if allow and "OPTIONS" not in allow.split(", "):
        resp.set_header("Allow", f"{allow}, OPTIONS")


class DatabaseUnavailableAnswers:
    """The error handler for MaxtwoError: 503 with Retry-After, and a log line at most once every
    LOG_SECONDS (LogThrottle), which counts the 503s left out since the one before. Every 503
    is counted in maxtwo_http_requests_total."""

    LOG_SECONDS = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._throttle = LogThrottle(self.LOG_SECONDS, ("503 for the database, any route,", "503s for the database, any route,"), clock)

    def __call__(self, req: falcon.Request, resp: falcon.Response, ex: MaxtwoError, params: dict) -> None:
        more = self._throttle.admit()
        if more is not None:
            # APPSEC: the detail (host, database, driver message) goes to the log, not to the
            # client. The path as its repr (\x00, \n, \x1b escaped): a client chooses it, and a
            # newline in it would forge a log line of its own, an escape sequence drive an
            # operator's terminal.
            log.warning("%s %r: 503: %s%s", req.method, req.path, ex, more)
        raise falcon.HTTPServiceUnavailable(
            description="the database is unavailable; try again shortly",
            retry_after=RETRY_AFTER_SECONDS,
        )


def _overloaded(req: falcon.Request, resp: falcon.Response, ex: QueueFullError, params: dict) -> None:
    # NOTE: no log line per refusal: under overload it would flood the journal exactly when it
    # matters (maxtwo_increments_rejected_total{reason="queue_full"} counts them).
    raise falcon.HTTPServiceUnavailable(
        description="too many writes wait for the database; try again shortly",
        retry_after=RETRY_AFTER_SECONDS,
    )


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    if isinstance(ex, falcon.HTTPError | falcon.HTTPStatus):
        raise ex  # falcon's own; its default handling is right
    log.exception("%s %r: 500", req.method, req.path)  # the path escaped (see DatabaseUnavailableAnswers)
    raise falcon.HTTPInternalServerError(description="an unexpected error; it has been logged")


def _serialize_error(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Every error is JSON, whatever the client's Accept header says, titled with its status
    line: falcon titles a few of its own otherwise ("Bad request" for an unknown method), and
    that title becomes the description if there is none."""
    title = falcon.code_to_http_status(exception.status_code)
    body = {"status": exception.status_code, "title": title}
    description = exception.description or (exception.title if exception.title != title else None)
    if description:
        body["description"] = description
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(body).encode()
