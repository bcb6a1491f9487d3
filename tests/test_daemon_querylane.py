"""GET / answered in batches by the query lane (daemon/querylane.py): a real waitress server
with maxtwo's Falcon app, on SQLite and PostgreSQL, spoken to over real sockets."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from daemon.app import create_app
from daemon.metrics import Metrics
from daemon.server import _serve_until, bind
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.combiner import QueryCombiner
from maxtwo_cli.core.query import AnswerCache, BatchRunner
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import unreachable_settings

REQUEST_THREADS = 4


@dataclasses.dataclass
class Served:
    port: int
    server: object
    metrics: Metrics
    batch_sizes: list[int]  # queries per batch, as the combiner reported them
    # (method, path) -> names of the threads that answered them
    threads: dict[tuple[str, str], set[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(set))

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)


@contextlib.contextmanager
def serve(settings: Settings, engine, max_wait: float = 30) -> Iterator[Served]:
    sizes: list[int] = []
    combiner = QueryCombiner(engine, AnswerCache(), max_wait=max_wait, on_batch=sizes.append)
    metrics = Metrics()
    app = create_app(settings, engine, metrics=metrics, combiner=combiner)

    def recording(environ, start_response):
        served.threads[environ["REQUEST_METHOD"], environ["PATH_INFO"]].add(threading.current_thread().name)
        return app(environ, start_response)

    listening = Settings(database_url=settings.database_url, port=0, threads=REQUEST_THREADS)
    server = bind(recording, listening, query_lane=combiner)
    served = Served(server.socket.getsockname()[1], server, metrics, sizes)
    stop = threading.Event()
    loop = threading.Thread(target=_serve_until, args=(server, stop), daemon=True)
    loop.start()
    try:
        yield served
    finally:
        stop.set()
        loop.join(5)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        server.close()
        combiner.close(5)


@pytest.fixture
def served(settings, engine) -> Iterator[Served]:
    seed_users(engine, 200)
    randomize_points(engine)
    with serve(settings, engine) as running:
        yield running


def get(connection: http.client.HTTPConnection, path: str = "/") -> http.client.HTTPResponse:
    connection.request("GET", path)
    response = connection.getresponse()
    response.body = response.read()
    return response


def links(response: http.client.HTTPResponse) -> tuple[dt.datetime, dt.datetime | None]:
    """(recorded, previous) of one GET / answer, from its headers (full precision)."""
    previous = response.getheader("X-Maxtwo-Previous-At")
    return (
        dt.datetime.fromisoformat(response.getheader("X-Maxtwo-Recorded-At")),
        dt.datetime.fromisoformat(previous) if previous else None,
    )


def test_get_root_is_answered_by_the_lane_and_everything_else_by_request_threads(served):
    connection = served.connect()
    for _ in range(3):
        response = get(connection)
        assert response.status == 200
        assert set(json.loads(response.body)) == {"users", "timestamp"}
    assert get(connection, "/healthz").status == 200
    connection.request("POST", "/")
    assert connection.getresponse().status == 405
    assert served.threads["GET", "/"] == {"maxtwo-query-lane"}
    assert served.threads["GET", "/healthz"] and served.threads["POST", "/"]
    assert "maxtwo-query-lane" not in served.threads["GET", "/healthz"] | served.threads["POST", "/"]


def test_concurrent_clients_share_batches_larger_than_the_thread_pool_and_keep_the_chain(served):
    clients, per_client = 30, 20
    answers: list[tuple[dt.datetime, dt.datetime | None]] = []
    statuses: list[int] = []
    barrier = threading.Barrier(clients)

    def client() -> None:
        connection = served.connect()
        barrier.wait()
        for _ in range(per_client):
            response = get(connection)
            statuses.append(response.status)
            answers.append(links(response))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * clients * per_client
    ordered = sorted(answers)
    for (earlier, _), (later, previous) in zip(ordered, ordered[1:]):
        assert previous == earlier  # every answer got the time of the one just before it
    assert sum(served.batch_sizes) == clients * per_client
    # Request threads could only ever batch as many as there are threads.
    assert max(served.batch_sizes) > REQUEST_THREADS


def test_pipelined_requests_on_one_connection_are_answered_in_order(served):
    paths = ["/", "/healthz", "/", "/", "/openapi.json", "/"]
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path in paths))
        reader = sock.makefile("rb")
        bodies = [read_response(reader) for _ in paths]
    kinds = ["query" if "users" in body else "health" if "status" in body else "openapi" for body, _ in bodies]
    assert kinds == ["query", "health", "query", "query", "openapi", "query"]
    recorded = [at for body, at in bodies if "users" in body]
    assert recorded == sorted(recorded) and len(set(recorded)) == 4


def read_response(reader) -> tuple[dict, str | None]:
    """One HTTP/1.1 response from a stream of several: (JSON body, X-Maxtwo-Recorded-At)."""
    assert reader.readline().split()[1] == b"200"
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    return json.loads(reader.read(int(headers["content-length"]))), headers.get("x-maxtwo-recorded-at")


def test_a_failing_database_answers_every_lane_request_with_a_json_503(database_url, tmp_path):
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    statuses, bodies = [], []
    with serve(settings, engine) as served:

        def client() -> None:
            response = get(served.connect())
            statuses.append((response.status, response.getheader("Retry-After")))
            bodies.append(json.loads(response.body))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert statuses == [(503, "5")] * 8
        assert all(body["status"] == 503 for body in bodies)
        assert served.threads["GET", "/"] == {"maxtwo-query-lane"}
    engine.dispose()


def test_requests_queued_while_a_batch_fails_share_its_error_instead_of_waiting_again(database_url):
    settings = Settings(database_url=database_url, statement_timeout=1.0)
    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    seed_users(engine, 10)
    holder = db.create_engine(Settings(database_url=database_url))
    waits: list[tuple[int, float]] = []
    with serve(settings, engine) as served, holder.begin() as conn:
        # The lock every query needs, held for longer than two batches' timeouts.
        conn.execute(schema.query_state.update().values(last_query_at=None))

        def client() -> None:
            started = time.monotonic()
            waits.append((get(served.connect()).status, time.monotonic() - started))

        first = threading.Thread(target=client)
        first.start()
        time.sleep(0.2)  # its batch waits for the lock; the others queue in the lane
        later = [threading.Thread(target=client) for _ in range(5)]
        for thread in later:
            thread.start()
        for thread in [first, *later]:
            thread.join(10)
    assert [status for status, _ in waits] == [503] * 6
    # A batch of their own would have waited out the lock's second too: about 2 s.
    assert max(waited for _, waited in waits) < 1.7
    engine.dispose()
    holder.dispose()


def test_a_request_waits_at_most_max_wait_from_its_arrival_not_from_its_batch(settings, engine, monkeypatch):
    seed_users(engine, 10)
    real_run = BatchRunner.run

    def slow_run(self, count):
        time.sleep(0.8)
        return real_run(self, count)

    monkeypatch.setattr(BatchRunner, "run", slow_run)
    outcomes: dict[str, tuple[int, float]] = {}
    with serve(settings, engine, max_wait=1.0) as served:

        def client(name: str) -> None:
            started = time.monotonic()
            outcomes[name] = (get(served.connect()).status, time.monotonic() - started)

        first = threading.Thread(target=client, args=("first",))
        first.start()
        time.sleep(0.1)
        second = threading.Thread(target=client, args=("second",))  # queues behind the first batch
        second.start()
        for thread in (first, second):
            thread.join(10)
        assert outcomes["first"][0] == 200
        # Its own batch would be answered 0.8 s after the first's, 1.5 s after it came: past
        # its 1 s, so it gets a 503 at about 1 s instead.
        status, waited = outcomes["second"]
        assert status == 503 and 0.9 < waited < 3


def test_the_latency_histogram_counts_the_wait_for_the_batch(served, monkeypatch):
    real_run = BatchRunner.run

    def slow_run(self, count):
        time.sleep(0.3)
        return real_run(self, count)

    monkeypatch.setattr(BatchRunner, "run", slow_run)
    assert get(served.connect()).status == 200
    sample = served.metrics.registry.get_sample_value
    assert sample("maxtwo_http_request_duration_seconds_count", {"route": "/"}) == 1
    assert sample("maxtwo_http_request_duration_seconds_sum", {"route": "/"}) >= 0.3


def test_shutdown_ends_the_lane_thread(served):
    assert get(served.connect()).status == 200
    lane = [thread for thread in threading.enumerate() if thread.name == "maxtwo-query-lane"]
    assert lane
    served.server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
    assert not any(thread.is_alive() for thread in lane)
