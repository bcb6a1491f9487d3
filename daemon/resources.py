"""Falcon resources: each one only translates between HTTP and one core call."""

from __future__ import annotations

import json
import logging
import threading

import falcon
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.engine import Engine

from daemon.batcher import Batcher, QueryKind
from daemon.metrics import Metrics
from daemon.openapi import openapi_document
from maxtwo_cli.core.db import ping
from maxtwo_cli.core.errors import MaxtwoError

log = logging.getLogger(__name__)


class QueryResource:
    """GET /: the core query, exactly as `maxtwo query --json` prints it."""

    def __init__(self, batcher: Batcher, metrics: Metrics, prefetched_key: str) -> None:
        """`prefetched_key`: the environ entry holding an answer the server fetched ahead, if any."""
        self._batcher = batcher
        self._prefetched_key = prefetched_key
        self._metrics = metrics
        self._epoch_seen: int | None = None
        self._epoch_lock = threading.Lock()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = req.env.get(self._prefetched_key)
        if result is None:
            result = self._batcher.submit(QueryKind.name)
        elif isinstance(result, BaseException):
            raise result.with_traceback(None)  # shared by the lane's batch: a fresh traceback each
        if result.epoch != self._epoch_seen:  # the gauge changes once per epoch, not per request
            with self._epoch_lock:
                # Epochs only grow: a thread late with an older one must not set it back.
                if self._epoch_seen is None or result.epoch > self._epoch_seen:
                    self._epoch_seen = result.epoch
                    self._metrics.epoch.set(result.epoch)
        # NOTE: JSON text made by the core (the users rendered once per epoch), not resp.media:
        # falcon's media handler would serialise the whole body again for every request.
        resp.data = result.api_json().encode()
        # Every GET / records a query: no cache may answer one for the service.
        resp.cache_control = ["no-store"]
        # The chain at full precision (the body's timestamp has whole seconds): lets a client
        # check that it got exactly the time the query before it recorded.
        resp.set_header("X-Maxtwo-Recorded-At", result.recorded_at.isoformat())
        if result.previous is not None:
            resp.set_header("X-Maxtwo-Previous-At", result.previous.isoformat())


class HealthResource:
    """GET /healthz: 200 when the database answers, 503 when it does not."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            ping(self._engine)
        except MaxtwoError as ex:
            log.warning("health check failed: %s", ex)
            resp.status = falcon.HTTP_503
            resp.media = {"status": "unavailable", "description": "the database does not answer"}
            return
        resp.media = {"status": "ok"}


class MetricsResource:
    """GET /metrics: Prometheus text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self._metrics.exposition()


class OpenApiResource:
    """GET /openapi.json: the API description."""

    def __init__(self) -> None:
        self._body = json.dumps(openapi_document()).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
