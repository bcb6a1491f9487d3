"""create_app(settings, engine): the Falcon WSGI app. A pure factory: no environment reads,
no threads, no connections opened here."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import falcon
from sqlalchemy.engine import Engine

from daemon import querylane
from daemon.metrics import Metrics
from daemon.resources import HealthResource, MetricsResource, OpenApiResource, QueryResource
from maxtwo_cli.core.combiner import QueryCombiner
from maxtwo_cli.core.errors import MaxtwoError
from maxtwo_cli.core.query import AnswerCache
from maxtwo_cli.core.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    metrics: Metrics | None = None,
    combiner: QueryCombiner | None = None,
) -> falcon.App:
    """The API: GET /, /healthz, /metrics, /openapi.json; JSON errors everywhere.

    `combiner`: the one GET / queries through (by default, query_combiner()'s); its owner
    closes it at shutdown."""
    metrics = metrics or Metrics()
    app = falcon.App(middleware=[RequestMetrics(metrics)])
    combiner = combiner or query_combiner(settings, engine, metrics)
    app.add_route("/", QueryResource(combiner, metrics))
    app.add_route("/healthz", HealthResource(engine))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/openapi.json", OpenApiResource())
    app.add_error_handler(MaxtwoError, _database_unavailable)
    app.add_error_handler(Exception, _unexpected)
    app.set_error_serializer(_serialize_error)
    return app


def query_combiner(settings: Settings, engine: Engine, metrics: Metrics) -> QueryCombiner:
    return QueryCombiner(
        engine,
        AnswerCache(),
        # Room for the batch running when a request comes and its own, each bounded by the
        # database timeouts; it ends a wait that nothing else would (a server gone silent).
        max_wait=settings.connect_timeout + 2 * settings.statement_timeout,
        on_batch=metrics.query_batch_size.observe,
    )


class RequestMetrics:
    """Counts every answer by route and status, and times it."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # NOTE: labels() validates and sorts its arguments on every call, which cost GET / more
        # than the counting itself; each series' child is looked up once and kept here. The
        # keys are bounded (routes, known methods, status codes), so these stay small.
        self._counters: dict[tuple[str, str, object], Any] = {}
        self._timers: dict[str, Any] = {}

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        arrived = querylane.arrived_at()  # a GET / waits for its batch before the app sees it
        req.context.started = arrived if arrived is not None else time.perf_counter()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        # NOTE: the URI template, never the raw path, so a scan of random URLs cannot blow up
        # the number of time series.
        route = req.uri_template or "unmatched"
        # APPSEC: clients choose the method; an unknown one must not make a new time series.
        method = req.method if req.method in falcon.COMBINED_METHODS else "OTHER"
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


def _database_unavailable(req: falcon.Request, resp: falcon.Response, ex: MaxtwoError, params: dict) -> None:
    # APPSEC: the detail (host, database, driver message) goes to the log, not to the client.
    log.warning("%s %s: 503: %s", req.method, req.path, ex)
    raise falcon.HTTPServiceUnavailable(
        description="the database is unavailable; try again shortly",
        retry_after=RETRY_AFTER_SECONDS,
    )


def _unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    if isinstance(ex, falcon.HTTPError | falcon.HTTPStatus):
        raise ex  # falcon's own; its default handling is right
    log.exception("%s %s: 500", req.method, req.path)
    raise falcon.HTTPInternalServerError(description="an unexpected error; it has been logged")


def _serialize_error(req: falcon.Request, resp: falcon.Response, exception: falcon.HTTPError) -> None:
    """Every error is JSON, whatever the client's Accept header says."""
    body = {"status": exception.status_code, "title": exception.title}
    if exception.description:
        body["description"] = exception.description
    resp.content_type = falcon.MEDIA_JSON
    resp.data = json.dumps(body).encode()
