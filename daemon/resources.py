"""Falcon resources: each one only translates between HTTP and one core call."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import falcon
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.engine import Engine

from daemon.batcher import Batcher, IncrementKind, QueryKind, QueueFullError
from daemon.metrics import Metrics
from daemon.openapi import openapi_document
from daemon.throttle import LogThrottle
from maxtwo_cli.core.counters import (
    CounterOverflowError,
    IdempotencyKeyReusedError,
    Increment,
    InvalidIncrementError,
    check_idempotency_key,
    check_key,
    check_value,
    read_counter,
)
from maxtwo_cli.core.errors import DatabaseBusyError, MaxtwoError
from maxtwo_cli.core.schema import writes_refused

log = logging.getLogger(__name__)


class QueryResource:
    """GET /: the core query, exactly as `maxtwo query --json` prints it.

    No HEAD (405): every GET / records a query, which a HEAD, a safe method, must not do."""

    def __init__(self, batcher: Batcher, metrics: Metrics, prefetched_key: str) -> None:
        """`prefetched_key`: the environ entry holding an answer the server fetched ahead, if any."""
        self._batcher = batcher
        self._prefetched_key = prefetched_key
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Every GET / records a query: no cache may answer one for the service (nor keep its
        # error: set before one is raised, it goes out with it).
        resp.set_header("Cache-Control", "no-store")
        result = req.env.get(self._prefetched_key)
        if result is None:
            result = self._batcher.submit(QueryKind.name)
        elif isinstance(result, BaseException):
            raise result.with_traceback(None)  # shared by the lane's batch: a fresh traceback each
        self._metrics.saw_epoch(result.epoch)
        # NOTE: JSON text made by the core (the users rendered once per epoch), not resp.media:
        # falcon's media handler would serialise the whole body again for every request.
        resp.data = result.api_json().encode()
        # The chain at full precision (the body's timestamp has whole seconds): lets a client
        # check that it got exactly the time the query before it recorded.
        resp.set_header("X-Maxtwo-Recorded-At", result.recorded_text)
        if result.previous_text is not None:
            resp.set_header("X-Maxtwo-Previous-At", result.previous_text)


# Retry-After of every 503: the database unavailable, or the batcher full.
RETRY_AFTER_SECONDS = 5

# The largest POST /increment body read: {"key": 255 characters, "value": 20 digits} fits many
# times over, even with every character \u-escaped.
MAX_INCREMENT_BODY = 4096
_INCREMENT_FIELDS = {"key", "value"}


def _not_json(constant: str) -> object:
    raise ValueError(f"{constant} is not JSON")  # json takes NaN and Infinity unless told


# NOTE: json.loads() on bytes first guesses their encoding (UTF-8, -16 or -32) and then skips
# whitespace with two regular expressions; both cost more than decoding the document itself (3.7
# of 5.5 us per body, bench/NOTES.md). RFC 8259 makes UTF-8 the only encoding of JSON between
# systems (a BOM may be ignored), and its whitespace is these four characters.
class DuplicateNameError(ValueError):
    """A JSON object names a member twice."""


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # APPSEC: json.loads() keeps the last of two members of one name, other parsers the first
    # (RFC 8259 leaves it open): a proxy that checked one "value" must not see us apply another.
    document = dict(pairs)
    if len(document) != len(pairs):
        names = [name for name, _ in pairs]
        raise DuplicateNameError(next(name for name in names if names.count(name) > 1))
    return document


_JSON_DECODER = json.JSONDecoder(parse_constant=_not_json, object_pairs_hook=_object_without_duplicates)
_JSON_WHITESPACE = " \t\n\r"


def decode_json(body: bytes) -> object:
    """The JSON document in a UTF-8 body (a BOM allowed), as json.loads() reads it; ValueError
    if the body holds anything else (DuplicateNameError: an object names a member twice, which
    json.loads() takes), RecursionError if it is nested too deep. (json.loads() would also take
    UTF-16 and -32, and surrogates encoded as bytes, which UTF-8 forbids.)"""
    text = body.decode()
    text = text.removeprefix("\ufeff")  # a BOM ("utf-8-sig" would decode it away, slowly: 1.7 us)
    text = text.strip(_JSON_WHITESPACE)
    document, end = _JSON_DECODER.raw_decode(text)
    if end != len(text):
        raise ValueError(f"extra data after the JSON document at character {end}")
    return document


def _is_json_in_utf_8(content_type: str | None) -> bool:
    """Whether a Content-Type is application/json, without a charset or with UTF-8's."""
    if content_type is None:
        return False
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != falcon.MEDIA_JSON:
        return False
    # NOTE: JSON defines no parameter (RFC 8259), but clients send charset=utf-8 all the time;
    # another charset names bytes that would be read as UTF-8 all the same.
    for parameter in parameters.split(";") if parameters else ():
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def parse_increment(
    content_type: str | None, body: bytes, idempotency_key: str | None, content_encoding: str | None = None
) -> Increment:
    """The Increment a POST /increment asks for, or the falcon.HTTPError to answer it with."""
    if not _is_json_in_utf_8(content_type):
        raise falcon.HTTPUnsupportedMediaType(description="send the body as application/json, in UTF-8")
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        # NOTE: read as it is, a gzip body would be a 400, and a body merely labelled "br" an
        # increment applied from bytes that were never decoded (RFC 9110 15.5.16).
        raise falcon.HTTPUnsupportedMediaType(
            description="send the body without a Content-Encoding", headers={"Accept-Encoding": "identity"}
        )
    if len(body) > MAX_INCREMENT_BODY:
        raise falcon.HTTPContentTooLarge(description=f"the body may be at most {MAX_INCREMENT_BODY} bytes")
    try:
        document = decode_json(body)
    except DuplicateNameError as ex:
        raise falcon.HTTPUnprocessableEntity(description=f"the body names the field {str(ex)!r} twice") from None
    except ValueError:  # JSONDecodeError, and bytes that are no UTF-8
        if not body:
            # Most often a client that sent neither Content-Length nor Transfer-Encoding (then
            # the request has no body, RFC 9112 section 6.3, and what it sent after is read as
            # the next request): say so rather than "not valid JSON".
            raise falcon.HTTPBadRequest(
                description='the body is empty: send {"key": "...", "value": N} with a Content-Length') from None
        raise falcon.HTTPBadRequest(description="the body is not valid JSON") from None
    except RecursionError:  # arrays or objects nested about a thousand deep: 1 KB does it
        raise falcon.HTTPBadRequest(description="the body's JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise falcon.HTTPBadRequest(description='the body must be a JSON object: {"key": "...", "value": N}')
    fields = set(document)
    if fields != _INCREMENT_FIELDS:
        missing, unknown = sorted(_INCREMENT_FIELDS - fields), sorted(fields - _INCREMENT_FIELDS)
        problems = [f"missing field {name!r}" for name in missing] + [f"unknown field {name!r}" for name in unknown]
        raise falcon.HTTPUnprocessableEntity(description="; ".join(problems))
    try:
        key = check_key(document["key"])
        value = check_value(document["value"])
    except InvalidIncrementError as ex:
        raise falcon.HTTPUnprocessableEntity(description=str(ex)) from None
    if idempotency_key is not None:
        try:
            check_idempotency_key(idempotency_key)
        except InvalidIncrementError as ex:
            raise falcon.HTTPBadRequest(description=str(ex)) from None
    return Increment(key, value, idempotency_key)


class IncrementResource:
    """POST /increment: 202 once the increment is committed (group commit with its batch)."""

    def __init__(self, batcher: Batcher, metrics: Metrics, prefetched_key: str) -> None:
        """`prefetched_key`: the environ entry holding an outcome the server fetched ahead, if any."""
        self._batcher = batcher
        self._metrics = metrics
        self._prefetched_key = prefetched_key

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        outcome = req.env.get(self._prefetched_key)
        if outcome is None:
            outcome = self._apply(req)
        if isinstance(outcome, BaseException):
            raise self._http_error(outcome).with_traceback(None)
        resp.status = falcon.HTTP_202
        resp.data = b""

    def _apply(self, req: falcon.Request) -> object:
        """What the lane would have fetched: the outcome, or the error to answer with."""
        try:
            # At most one byte past the limit: enough for parse_increment to answer 413.
            item = parse_increment(req.content_type, req.bounded_stream.read(MAX_INCREMENT_BODY + 1),
                                   req.get_header("Idempotency-Key"), req.get_header("Content-Encoding"))
        except falcon.HTTPError as ex:
            return ex
        [outcome] = self._batcher.submit_many(IncrementKind.name, [item])
        return outcome

    def _http_error(self, error: BaseException) -> BaseException:
        """The error to raise for a failed increment, counted by reason."""
        if isinstance(error, falcon.HTTPError):
            reason = _REJECTED_REASONS.get(error.status_code, "invalid")
        elif isinstance(error, CounterOverflowError):
            reason, error = "overflow", falcon.HTTPConflict(description=str(error))
        elif isinstance(error, IdempotencyKeyReusedError):
            reason, error = "idempotency_conflict", falcon.HTTPUnprocessableEntity(description=str(error))
        elif isinstance(error, QueueFullError):
            reason = "queue_full"  # a MaxtwoError: the app's handler answers 503
        elif isinstance(error, MaxtwoError):
            # The app's handler answers 503 for every MaxtwoError: the database unavailable, or
            # not one maxtwo can use (a SQLite file that is no database).
            reason = "unavailable"
        else:
            return error  # unexpected: the app's handler logs it and answers 500
        self._metrics.increments_rejected.labels(reason=reason).inc()
        return error


_REJECTED_REASONS = {400: "malformed", 413: "too_large", 415: "unsupported_media_type", 422: "invalid"}


class ReadRoomFullError(DatabaseBusyError):
    """Every place for a read of the database is taken (DatabaseReads): what it says holds no
    detail of the database, and /healthz may show it."""


class DatabaseReads:
    """Room for the request threads that read the database themselves (GET /counters/{key},
    /healthz; the batched routes wait in the lane instead): at most `limit` at a time.

    NOTE: a request thread whose statement the database never answers is lost until it does: a
    server whose backend hangs on its storage keeps its connections alive, so neither
    statement_timeout nor the client's TCP timeouts end the wait. Bounded, such reads cannot take
    every thread: /metrics and the rest are still served, and a read that finds no room within
    WAIT_SECONDS is answered 503."""

    WAIT_SECONDS = 1.0

    def __init__(self, limit: int) -> None:
        self._room = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def room(self) -> Iterator[None]:
        """Hold one place for the block; ReadRoomFullError if none frees up in time."""
        if not self._room.acquire(timeout=self.WAIT_SECONDS):
            raise ReadRoomFullError("every request thread allowed to read the database is waiting for it")
        try:
            yield
        finally:
            self._room.release()


class WriteHealth:
    """Whether this server's writes (the batches of GET / and POST /increment) keep failing,
    for /healthz: a database can answer every check that writes nothing and still fail every
    write (a full disk, an I/O error).

    Failing: batches have failed for FAILING_SECONDS or more with none committed in between and
    no pause of RECENT_SECONDS between two failures, the last of them less than RECENT_SECONDS
    ago. One failure proves little; any commit ends it (some writes work); and it ends by itself
    once no batch has failed for RECENT_SECONDS, so that a server taken out of rotation for it
    gets requests again to show whether it recovered. A lock or a statement timeout
    (DatabaseBusyError) is not told here: another transaction holding a counter's row, or
    SQLite's file, fails the same writes on every server, and would take them all out of
    rotation, the reads they can still serve with them.

    NOTE: no lock: the committers set an attribute each (one per batch), /healthz reads them; a
    commit and a failure at the same moment only decide between themselves which came last."""

    FAILING_SECONDS = 1.0
    RECENT_SECONDS = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failing_since: float | None = None  # the first failure since the last commit
        self._last_failure = 0.0

    def committed(self) -> None:
        self._failing_since = None

    def failed(self) -> None:
        now = self._clock()
        if self._failing_since is None or now - self._last_failure >= self.RECENT_SECONDS:
            self._failing_since = now  # a failure long after the last starts afresh
        self._last_failure = now

    def failing_for(self) -> float | None:
        """Seconds this server's writes have been failing, or None if they are not."""
        since, last, now = self._failing_since, self._last_failure, self._clock()
        if since is None or last - since < self.FAILING_SECONDS or now - last >= self.RECENT_SECONDS:
            return None
        return now - since


def _check_path_is_utf8(req: falcon.Request) -> None:
    """InvalidIncrementError if the path's bytes are not UTF-8.

    NOTE: falcon decodes the path with errors="replace", so that /counters/a%80b and
    /counters/a%C3b would both read the counter "a\ufffdb", which only /counters/a%EF%BF%BDb
    names; a key of bytes that are not UTF-8 was never incremented."""
    try:
        req.env["PATH_INFO"].encode("iso-8859-1").decode("utf-8")  # WSGI's bytes-as-latin-1 str
    except UnicodeError:
        raise InvalidIncrementError("the key is not UTF-8") from None


class CounterResource:
    """GET /counters/{key}: the committed total."""

    def __init__(self, engine: Engine, reads: DatabaseReads) -> None:
        self._engine = engine
        self._reads = reads

    def on_get(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        resp.cache_control = ["no-store"]
        try:
            check_key(key)
            if "\ufffd" in key:
                _check_path_is_utf8(req)
        except InvalidIncrementError:
            # A key POST /increment refuses was never incremented; nor is it asked for: the
            # database could not take some of them (PostgreSQL's text refuses U+0000, and that
            # refusal would read as the database failing: a 503).
            total = None
        else:
            with self._reads.room():
                total = read_counter(self._engine, key)
        if total is None:
            raise falcon.HTTPNotFound(description="no counter under this key: it was never incremented")
        resp.media = {"key": key, "value": total}

    # HEAD: the same answer without its body (falcon drops it, and keeps Content-Length).
    on_head = on_get


class HealthResource:
    """GET /healthz: 200 when the database answers and would take maxtwo's writes, 503 when not."""

    # A failed check's log line, at most once in this many seconds (any client may probe at any
    # rate: a line each was 1,170 lines a second from 4 clients, past journald's rate limit).
    LOG_SECONDS = 10.0

    def __init__(self, engine: Engine, reads: DatabaseReads, writes: WriteHealth) -> None:
        self._engine = engine
        self._reads = reads
        self._writes = writes
        self._throttle = LogThrottle(self.LOG_SECONDS, ("failed health check", "failed health checks"))

    def _log_failure(self, why: str) -> None:
        more = self._throttle.admit()
        if more is not None:
            log.warning("health check failed: %s%s", why, more)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        failing_for = self._writes.failing_for()
        if failing_for is not None:
            # NOTE: GET / and POST /increment answer 503 meanwhile (each logged, with why).
            self._log_failure(f"every write of this server failed for {failing_for:.0f} s")
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
            resp.media = {"status": "unavailable",
                          "description": f"every write of this server has failed for {failing_for:.0f} s; the log says why"}
            return
        try:
            with self._reads.room():
                refused = writes_refused(self._engine)  # asks the database: it answers, or this raises
        except MaxtwoError as ex:
            self._log_failure(str(ex))
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
            # A full read room is said as such: the database may answer, slowly, or not at all.
            # APPSEC: any other error's text names the database (host, name): the log has it.
            description = str(ex) if isinstance(ex, ReadRoomFullError) else "the database does not answer"
            resp.media = {"status": "unavailable", "description": description}
            return
        if refused is not None:
            # NOTE: a database that answers but refuses every write serves nothing: GET / and
            # POST /increment answer 503 meanwhile, so the health check must say so too.
            self._log_failure(f"the database refuses writes: {refused}")
            resp.status = falcon.HTTP_503
            resp.set_header("Retry-After", str(RETRY_AFTER_SECONDS))
            resp.media = {"status": "unavailable", "description": "the database answers but refuses this server's writes"}
            return
        resp.media = {"status": "ok"}

    # HEAD: the same answer without its body (falcon drops it, and keeps Content-Length).
    on_head = on_get


class MetricsResource:
    """GET /metrics: Prometheus text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self._metrics.exposition()

    # HEAD: the same answer without its body (falcon drops it, and keeps Content-Length).
    on_head = on_get


class OpenApiResource:
    """GET /openapi.json: the API description."""

    def __init__(self) -> None:
        self._body = json.dumps(openapi_document()).encode()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body

    # HEAD: the same answer without its body (falcon drops it, and keeps Content-Length).
    on_head = on_get
