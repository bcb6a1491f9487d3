"""POST /increment and GET /counters/{key} in-process, on SQLite and PostgreSQL: every status,
on the request-thread path (falcon.testing) and through the lane (a real waitress server)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator

import falcon.testing
import pytest
import sqlalchemy as sa

import daemon.app
import daemon.resources
from daemon.app import collect_outcomes, create_app, enqueue_outcomes, new_batchers
from daemon.batcher import Batcher, Batchers, IncrementKind, QueryKind, QueueFullError
from daemon.metrics import INCREMENT_REJECTIONS, Metrics
from daemon.resources import DatabaseReads, DuplicateNameError, WriteHealth, decode_json
from daemon.transport import LaneRequest
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.counters import INT64_MAX, INT64_MIN, Applied, CounterOverflowError, read_counter
from maxtwo_cli.core.errors import DatabaseBusyError, DatabaseUnavailableError
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import stalled_batchers, unreachable_settings
from tests.inprocess import running

JSON = {"Content-Type": "application/json"}


@contextlib.contextmanager
def app_on(settings, engine) -> Iterator[tuple[falcon.App, Batchers, Metrics]]:
    """The app with batchers of its own, closed afterwards."""
    metrics, writes = Metrics(), WriteHealth()
    batchers = new_batchers(settings, engine, metrics, writes)
    try:
        yield create_app(settings, engine, metrics=metrics, batchers=batchers, writes=writes), batchers, metrics
    finally:
        batchers.close(5)


@pytest.fixture
def app_parts(settings, engine):
    with app_on(settings, engine) as parts:
        yield parts


@pytest.fixture
def client(app_parts):
    return falcon.testing.TestClient(app_parts[0])


def post(client, body, headers=JSON):
    text = body if isinstance(body, str) else json.dumps(body)
    return client.simulate_post("/increment", body=text, headers=headers)


def rejected(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("maxtwo_increments_rejected_total", {"reason": reason})


def test_202_with_an_empty_body_and_the_total_reads_back(client, engine):
    for value in (5, -7, 0):
        response = post(client, {"key": "a", "value": value})
        assert response.status_code == 202 and response.content == b""
    got = client.simulate_get("/counters/a")
    assert got.status_code == 200 and got.json == {"key": "a", "value": -2}
    assert got.headers["cache-control"] == "no-store"
    assert read_counter(engine, "a") == -2


@pytest.mark.parametrize(("body", "reason"), [
    ("{", "malformed"), ("[1, 2]", "malformed"), ('"key"', "malformed"), ("\xff", "malformed"),
    ('{"key": "a", "value": NaN}', "malformed"), ('{"key": "a", "value": -Infinity}', "malformed"),
    ({"key": "a"}, "invalid"), ({"value": 1}, "invalid"), ({"key": "a", "value": 1, "extra": 0}, "invalid"),
    ({"key": "a", "value": True}, "invalid"), ({"key": "a", "value": 1.0}, "invalid"),
    ({"key": "a", "value": "5"}, "invalid"), ({"key": "a", "value": None}, "invalid"),
    ({"key": "a", "value": INT64_MAX + 1}, "invalid"), ({"key": "a", "value": INT64_MIN - 1}, "invalid"),
    ({"key": "", "value": 1}, "invalid"), ({"key": "x" * 256, "value": 1}, "invalid"),
    ({"key": "a\u0000b", "value": 1}, "invalid"), ({"key": 5, "value": 1}, "invalid"),
    ('{"key": "a", "value": 1, "value": 5}', "invalid"), ('{"key": "b", "key": "a", "value": 1}', "invalid"),
    ('{"key": "a", "value": 1, "v\\u0061lue": 5}', "invalid"),
])
def test_bad_bodies_are_refused_and_nothing_is_applied(client, app_parts, engine, body, reason):
    response = post(client, body)
    assert response.status_code == (400 if reason == "malformed" else 422)
    assert response.json["status"] == response.status_code and response.json["description"]
    assert rejected(app_parts[2], reason) == 1
    assert read_counter(engine, "a") is None


@pytest.mark.parametrize("body", [
    b'{"key": "k", "value": 1}', b' \t\r\n{"key":"k","value":1}\n', b"\xef\xbb\xbf{}", b"\xef\xbb\xbf {}", b"[1]",
    b'"\\ud800"', b"1 ", b"NaN", '{"k": "\u00e9"}'.encode(),
    b"", b" ", b"\xef\xbb\xbf", b" \xef\xbb\xbf{}", b"{} x", b"{}{}", b"\x0c{}", b"{}\xc2\xa0", b"\xff", b"{",
])
def test_a_body_is_read_as_json_loads_reads_utf_8(body):
    def not_json(constant):  # NaN and Infinity: json.loads takes them, JSON does not
        raise ValueError(constant)

    try:
        expected = json.loads(body, parse_constant=not_json)
    except ValueError:
        with pytest.raises(ValueError):
            decode_json(body)
    else:
        assert decode_json(body) == expected


def test_an_object_that_names_a_member_twice_is_refused_at_any_depth():
    # json.loads() would keep the last one (other parsers, the first).
    for body in (b'{"a": 1, "a": 1}', b'[{"b": {"a": 1, "\\u0061": 2}}]'):
        with pytest.raises(DuplicateNameError, match="a"):
            decode_json(body)
    assert decode_json(b'{"a": {"a": 1}, "b": [{"a": 2}]}') == {"a": {"a": 1}, "b": [{"a": 2}]}


def test_json_in_another_encoding_than_utf_8_is_malformed(client, app_parts):
    # RFC 8259: JSON between systems is UTF-8 (json.loads would guess UTF-16 and take the first;
    # it would take the second's surrogate, encoded as bytes, which UTF-8 forbids).
    for body in ('{"key": "a", "value": 1}'.encode("utf-16"), b'{"key": "\xed\xb0\x80", "value": 1}'):
        assert client.simulate_post("/increment", body=body, headers=JSON).status_code == 400, body
    assert rejected(app_parts[2], "malformed") == 2


def test_an_empty_body_is_malformed_and_says_so(client, app_parts):
    response = client.simulate_post("/increment", body=b"", headers=JSON)
    assert response.status_code == 400 and response.json["description"].startswith("the body is empty")
    response = client.simulate_post("/increment", body=b" ", headers=JSON)
    assert response.status_code == 400 and response.json["description"] == "the body is not valid JSON"


def test_json_nested_too_deeply_is_malformed(client, app_parts):
    # json's decoder raises RecursionError (no ValueError) about a thousand levels down.
    response = client.simulate_post("/increment", body="[" * 2000, headers=JSON)
    assert response.status_code == 400 and "nested" in response.json["description"]


def test_an_unexpected_error_in_one_lane_request_is_its_own(app_parts, monkeypatch):
    # The lane submits a batch's requests together: one that fails in an unforeseen way must get
    # its own error (the app answers it 500), not fail the others' batch.
    batchers = app_parts[1]
    real_parse = daemon.app.parse_increment

    def parse(content_type, body, *headers):
        if body == b"boom":
            raise RuntimeError("unforeseen")
        return real_parse(content_type, body, *headers)

    monkeypatch.setattr(daemon.app, "parse_increment", parse)
    requests = [LaneRequest("POST", "/increment", {"CONTENT_TYPE": "application/json"}, body)
                for body in (b"boom", b'{"key": "a", "value": 2}')] + [LaneRequest("GET", "/", {}, b"")]
    bad, applied, query = collect_outcomes(enqueue_outcomes(batchers, requests), 30)
    assert isinstance(bad, RuntimeError)
    assert isinstance(applied, Applied) and applied.total == 2
    assert query.recorded_at is not None


def test_413_415_and_a_bad_idempotency_key(client, app_parts):
    assert post(client, "x" * 5000).status_code == 413
    # At most 4 KiB: exactly that is taken, a byte more is not.
    text = json.dumps({"key": "edge", "value": 1})
    at_the_limit = text + " " * (4096 - len(text))
    assert post(client, at_the_limit).status_code == 202
    assert post(client, at_the_limit + " ").status_code == 413
    assert post(client, {"key": "a", "value": 1}, headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.simulate_post("/increment", body='{"key": "a", "value": 1}').status_code == 415
    for content_type in ("application/json; charset=utf-8", 'Application/JSON;Charset="UTF-8"', "application/json; charset=utf8"):
        assert post(client, {"key": "a", "value": 1}, headers={"Content-Type": content_type}).status_code == 202
    # Another charset names bytes that would be read as UTF-8 all the same.
    for content_type in ("application/json; charset=utf-16", "application/json;charset=iso-8859-1"):
        refused = post(client, {"key": "a", "value": 1}, headers={"Content-Type": content_type})
        assert refused.status_code == 415 and "UTF-8" in refused.json["description"], content_type
    for idempotency_key in ("é", "first, second"):  # the second: two headers, as HTTP joins them
        bad_key = post(client, {"key": "a", "value": 1}, headers={**JSON, "Idempotency-Key": idempotency_key})
        assert bad_key.status_code == 400 and "Idempotency-Key" in bad_key.json["description"]
    # A body labelled with a coding is not read as if it were plain.
    encoded = post(client, {"key": "a", "value": 1}, headers={**JSON, "Content-Encoding": "br"})
    assert encoded.status_code == 415 and encoded.headers["accept-encoding"] == "identity"
    assert post(client, {"key": "a", "value": 1}, headers={**JSON, "Content-Encoding": "identity"}).status_code == 202
    assert rejected(app_parts[2], "too_large") == 2 and rejected(app_parts[2], "unsupported_media_type") == 5


def test_409_keeps_the_value(client, engine, app_parts):
    assert post(client, {"key": "big", "value": INT64_MAX}).status_code == 202
    refused = post(client, {"key": "big", "value": 1})
    assert refused.status_code == 409 and "64-bit" in refused.json["description"]
    assert read_counter(engine, "big") == INT64_MAX
    assert rejected(app_parts[2], "overflow") == 1
    assert app_parts[2].registry.get_sample_value("maxtwo_increments_applied_total") == 1


def test_idempotency_key_replay_and_conflict(client, engine, app_parts):
    headers = {**JSON, "Idempotency-Key": "order-17"}
    assert post(client, {"key": "i", "value": 3}, headers).status_code == 202
    assert post(client, {"key": "i", "value": 3}, headers).status_code == 202
    conflict = post(client, {"key": "i", "value": 4}, headers)
    assert conflict.status_code == 422 and "Idempotency-Key" in conflict.json["description"]
    assert read_counter(engine, "i") == 3
    # The replay counts as applied (it is answered 202), the conflict does not.
    assert app_parts[2].registry.get_sample_value("maxtwo_increments_applied_total") == 2


def test_404_for_a_key_never_incremented_and_keys_with_slashes(client):
    assert client.simulate_get("/counters/nothing").status_code == 404
    assert client.simulate_get("/counters/nothing").json["status"] == 404
    for key in ["a/b", "/", "ключ", "100%", "?x=1#y"]:
        assert post(client, {"key": key, "value": 1}).status_code == 202
        got = client.simulate_get("/counters/" + urllib.parse.quote(key, safe=""))
        assert got.status_code == 200 and got.json == {"key": key, "value": 1}, key


def test_404_without_asking_the_database_for_a_key_post_refuses(client, app_parts, monkeypatch):
    """PostgreSQL's text cannot hold U+0000: asked for it, the database refused, read as a 503."""
    asked = []
    monkeypatch.setattr(daemon.resources, "read_counter", lambda engine, key: asked.append(key))
    for path in ("/counters/%00", "/counters/a%00b", "/counters/" + "x" * 256):
        got = client.simulate_get(path)
        assert got.status_code == 404 and got.json["status"] == 404, path
    assert asked == []
    assert client.simulate_get("/counters/" + "x" * 255).status_code == 404 and asked == ["x" * 255]


def test_a_path_whose_bytes_are_not_utf8_reads_no_counter(app_parts):
    """falcon decodes the path with errors="replace": /counters/a%80b read the counter "a\ufffdb"."""
    app, batchers, _ = app_parts
    with running(app, batchers=batchers) as served:
        connection = served.connect()

        def get(path: str) -> tuple[int, bytes]:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()

        connection.request("POST", "/increment", body=json.dumps({"key": "a\ufffdb", "value": 42}), headers=JSON)
        posted = connection.getresponse()
        assert (posted.status, posted.read()) == (202, b"")
        status, body = get("/counters/a%EF%BF%BDb")
        assert (status, json.loads(body)) == (200, {"key": "a\ufffdb", "value": 42})
        for path in ("/counters/a%80b", "/counters/a%C3b", "/counters/a%ED%A0%80b"):
            status, body = get(path)
            assert status == 404 and json.loads(body)["status"] == 404, path
        connection.close()


def test_a_key_holding_u0000_is_404_on_both_databases(client):
    """The same through the real read, which on PostgreSQL failed with 503 (and a warning each)."""
    got = client.simulate_get("/counters/%00")
    assert got.status_code == 404 and got.json["status"] == 404


def test_503_when_the_database_is_unavailable(database_url, tmp_path):
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    response = post(client, {"key": "a", "value": 1})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert client.simulate_get("/counters/a").status_code == 503
    engine.dispose()


def test_reads_waiting_for_the_database_hold_at_most_half_the_threads(settings, engine, monkeypatch):
    reading, gate = threading.Event(), threading.Event()
    real_read = daemon.resources.read_counter

    def stalled_read(*args):
        reading.set()
        gate.wait(10)
        return real_read(*args)

    monkeypatch.setattr(daemon.resources, "read_counter", stalled_read)
    monkeypatch.setattr(DatabaseReads, "WAIT_SECONDS", 0.2)
    client = falcon.testing.TestClient(create_app(dataclasses.replace(settings, threads=3), engine))
    held = threading.Thread(target=client.simulate_get, args=("/counters/a",))
    held.start()
    try:
        assert reading.wait(10)
        # One of three threads may wait for the database on these routes: the next one is refused.
        refused = client.simulate_get("/healthz")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json["description"] == "every request thread allowed to read the database is waiting for it"
        assert client.simulate_get("/metrics").status_code == 200
    finally:
        gate.set()
        held.join(10)
    assert client.simulate_get("/healthz").status_code == 200
    assert client.simulate_get("/counters/a").status_code == 404


def test_503_when_too_many_increments_wait(settings, engine, monkeypatch, caplog):
    gate = threading.Event()
    real_apply = IncrementKind.apply
    monkeypatch.setattr(IncrementKind, "apply", lambda self, held, payloads: (gate.wait(10), real_apply(self, held, payloads))[1])
    batcher = Batcher(engine, [QueryKind(), IncrementKind()], max_wait=30, max_pending=2)
    metrics = Metrics()
    client = falcon.testing.TestClient(create_app(settings, engine, metrics=metrics, batchers=Batchers.shared(batcher),
                                                  writes=WriteHealth()))
    statuses: list[int] = []

    def send() -> threading.Thread:
        thread = threading.Thread(target=lambda: statuses.append(post(client, {"key": "q", "value": 1}).status_code))
        thread.start()
        return thread

    def until(condition) -> None:
        waited = threading.Event()
        for _ in range(400):
            if condition():
                return
            waited.wait(0.05)
        raise AssertionError("timed out")

    threads = [send()]
    until(lambda: batcher.running_for() > 0)  # its batch runs, held at the gate
    threads += [send(), send()]
    until(lambda: batcher.pending() == 2)  # two wait: the queue is full
    with caplog.at_level(logging.INFO):
        refused = post(client, {"key": "q", "value": 1})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    # Said as what it is, counted as such, and no log line: under overload that would flood the
    # journal when it matters (the database is fine).
    assert refused.json["description"] == "too many writes wait for the database; try again shortly"
    assert (rejected(metrics, "queue_full"), rejected(metrics, "unavailable")) == (1, 0)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("daemon")] == []
    gate.set()
    for thread in threads:
        thread.join(20)
    statuses.append(refused.status_code)
    assert sorted(statuses) == [202, 202, 202, 503]
    assert read_counter(engine, "q") == 3
    batcher.close(5)


def test_an_increment_refused_for_a_file_that_is_no_database_is_counted(tmp_path):
    """Answered 503 like an unavailable database, and counted as one (it went uncounted)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}")
    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    engine.dispose()
    for file in list(tmp_path.iterdir()):  # the main file and its -query file overwritten
        if file.name.endswith(("-wal", "-shm")):
            file.unlink()
        else:
            file.write_bytes(b"these are my notes, not a database\n" * 200)
    engine = db.create_engine(settings)
    try:
        with app_on(settings, engine) as (app, _, metrics):
            assert post(falcon.testing.TestClient(app), {"key": "a", "value": 1}).status_code == 503
    finally:
        engine.dispose()
    assert rejected(metrics, "unavailable") == 1


def test_whom_a_failure_concerns_beyond_its_own_request():
    """A full queue is no failure of the database: one refusal would otherwise fail whatever
    was queued meanwhile."""
    assert daemon.app.failure_scope(QueueFullError("full")) is None
    assert daemon.app.failure_scope(CounterOverflowError("over")) is None
    assert daemon.app.failure_scope(Applied("a", 1)) is None
    assert daemon.app.failure_scope(DatabaseBusyError("locked")) == "route"
    assert daemon.app.failure_scope(DatabaseUnavailableError("down")) == "all"


def test_a_lane_waits_its_timeout_in_all_for_both_kinds_not_for_each(engine):
    gate = threading.Event()
    batchers = stalled_batchers(engine, gate)
    requests = [LaneRequest("GET", "/", {}, b""),
                LaneRequest("POST", "/increment", {"CONTENT_TYPE": "application/json"}, b'{"key": "a", "value": 1}')]
    try:
        started = time.monotonic()
        outcomes = collect_outcomes(enqueue_outcomes(batchers, requests), 0.5)
        took = time.monotonic() - started
    finally:
        gate.set()
        batchers.close(5)
    assert all(isinstance(outcome, DatabaseUnavailableError) for outcome in outcomes), outcomes
    assert took < 0.9, took  # 1.0 s when each kind waited its own 0.5 s


def test_the_lanes_answer_increments_and_queries_in_batches(settings, engine, app_parts):
    app, batchers, metrics = app_parts
    statuses: list[int] = []
    with running(app, batchers=batchers) as served:

        def client(index: int) -> None:
            connection = served.connect()
            for round_ in range(20):
                if round_ % 5 == 0:
                    connection.request("GET", "/")
                else:
                    connection.request("POST", "/increment", body=json.dumps({"key": f"k{index % 3}", "value": 1}),
                                       headers=JSON)
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # Every kind of answer through the lane, too.
        connection = served.connect()
        gzip = {**JSON, "Content-Encoding": "gzip"}
        for body, headers, status in [("{", JSON, 400), ('{"key": "k0"}', JSON, 422), ("{}", {}, 415),
                                      ('{"key": "k0", "value": 1}', gzip, 415),
                                      ('{"key": "big", "value": 9223372036854775807}', JSON, 202),
                                      ('{"key": "big", "value": 1}', JSON, 409), ("x" * 5000, JSON, 413),
                                      ("[" * 2000, JSON, 400)]:
            connection.request("POST", "/increment", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == status, body
            if headers is gzip:
                assert response.getheader("Accept-Encoding") == "identity"
    assert sorted(set(statuses)) == [200, 202] and len(statuses) == 240
    assert sum(read_counter(engine, f"k{index}") for index in range(3)) == 12 * 16
    sample = metrics.registry.get_sample_value
    assert sample("maxtwo_increment_batch_size_sum") == 12 * 16 + 2
    assert sample("maxtwo_increments_applied_total") == 12 * 16 + 1  # not the one refused with 409
    assert sample("maxtwo_increment_batch_size_count") < 12 * 16  # increments shared transactions


def test_on_postgresql_a_get_root_never_waits_for_an_increment_held_by_a_row_lock(postgres_url, postgres_engine):
    # Another daemon's batch, or an operator's open transaction, holds a counter's row: the
    # increment waits for it (up to the statement timeout), and GET / must not wait with it.
    settings = Settings(database_url=postgres_url, statement_timeout=10.0)
    seed_users(postgres_engine, 20)
    randomize_points(postgres_engine)
    metrics, writes = Metrics(), WriteHealth()
    batchers = new_batchers(settings, postgres_engine, metrics, writes)
    assert batchers[QueryKind.name] is not batchers[IncrementKind.name]
    app = create_app(settings, postgres_engine, metrics=metrics, batchers=batchers, writes=writes)
    answers: dict[str, tuple[int, float]] = {}

    def send(name: str, method: str, path: str, body: str | None = None) -> threading.Thread:
        def run() -> None:
            started = time.monotonic()
            connection = served.connect()
            connection.request(method, path, body=body, headers=JSON if body else {})
            response = connection.getresponse()
            response.read()
            answers[name] = (response.status, time.monotonic() - started)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    with running(app, batchers=batchers) as served, postgres_engine.connect() as holder:
        send("first", "POST", "/increment", '{"key": "held", "value": 1}').join(30)
        assert answers["first"][0] == 202
        holder.execute(sa.text("SELECT value FROM counters WHERE key = 'held' FOR UPDATE"))  # held until rollback
        holder_pid = holder.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        try:
            increment = send("increment", "POST", "/increment", '{"key": "held", "value": 2}')
            with postgres_engine.connect() as watcher:
                blocked = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
                deadline = time.monotonic() + 10
                while not watcher.execute(blocked, {"pid": holder_pid}).scalar() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert watcher.execute(blocked, {"pid": holder_pid}).scalar(), "the increment never waited for the lock"
            query = send("query", "GET", "/")
            query.join(3)  # the lock is held meanwhile
        finally:
            holder.rollback()
        query.join(30)
        increment.join(30)
    batchers.close(5)
    assert answers["query"][0] == 200 and answers["query"][1] < 2.0, answers
    assert answers["increment"][0] == 202 and answers["increment"][1] > answers["query"][1], answers
    assert read_counter(postgres_engine, "held") == 3


def test_each_batch_s_commit_is_timed(client, app_parts):
    assert post(client, {"key": "a", "value": 1}).status_code == 202
    sample = app_parts[2].registry.get_sample_value
    assert sample("maxtwo_batch_commit_duration_seconds_count") >= 1
    assert sample("maxtwo_batch_commit_duration_seconds_sum") > 0


def test_the_queue_depth_counts_the_writes_waiting_for_the_batchers(settings, engine, app_parts, monkeypatch):
    """(The lane's queue is counted on top of this in a real server: test_daemon_counters_e2e.)"""
    app, batchers, metrics = app_parts
    client = falcon.testing.TestClient(app)
    gate, running = threading.Event(), threading.Event()
    real_apply = IncrementKind.apply

    def held(self, *args):
        running.set()
        gate.wait(10)
        return real_apply(self, *args)

    monkeypatch.setattr(IncrementKind, "apply", held)
    threads = [threading.Thread(target=post, args=(client, {"key": "q", "value": 1}))]
    threads[0].start()
    try:
        assert running.wait(10)  # its batch runs, held at the gate
        threads += [threading.Thread(target=post, args=(client, {"key": "q", "value": 1})) for _ in range(2)]
        for thread in threads[1:]:
            thread.start()
        deadline = time.monotonic() + 10
        while batchers.pending() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metrics.registry.get_sample_value("maxtwo_batch_queue_depth") == 2
    finally:
        gate.set()
        for thread in threads:
            thread.join(20)
    assert metrics.registry.get_sample_value("maxtwo_batch_queue_depth") == 0
    assert read_counter(engine, "q") == 3


def test_a_write_waits_for_a_batch_as_long_as_connecting_and_two_statements_may_take(settings, engine, monkeypatch):
    """A request waits for the batch running when it came and then its own, each bounded by the
    database's timeouts: one that takes longer than connecting alone still answers 202."""
    settings = dataclasses.replace(settings, connect_timeout=0.2, statement_timeout=1.0)
    real_apply = IncrementKind.apply

    def slow(self, *args):
        time.sleep(1.6)  # past connect_timeout + statement_timeout, within connect_timeout + 2 * statement_timeout
        return real_apply(self, *args)

    monkeypatch.setattr(IncrementKind, "apply", slow)
    with app_on(settings, engine) as (app, _, _):
        assert post(falcon.testing.TestClient(app), {"key": "slow", "value": 1}).status_code == 202
    assert read_counter(engine, "slow") == 1


def test_the_media_type_content_coding_and_idempotency_key_are_read_as_http_defines_them(client, engine):
    """Whitespace around a media type's ";" (RFC 9110 section 5.6.6) and a content coding in any
    case (section 8.4.1) are the same; an empty Idempotency-Key is none of 1 to 255 characters."""
    for headers in ({"Content-Type": "application/json ; charset=utf-8"}, {"Content-Type": "application/json\t"},
                    {**JSON, "Content-Encoding": "Identity"}, {**JSON, "Content-Encoding": " identity "},
                    {**JSON, "Content-Encoding": ""}):
        assert post(client, {"key": "a", "value": 1}, headers=headers).status_code == 202, headers
    for content_type in ("application/json; CHARSET=utf-16", "application/json ; charset = latin1"):
        assert post(client, {"key": "a", "value": 1}, headers={"Content-Type": content_type}).status_code == 415
    empty_key = post(client, {"key": "a", "value": 1}, headers={**JSON, "Idempotency-Key": ""})
    assert empty_key.status_code == 400 and "Idempotency-Key" in empty_key.json["description"]
    assert read_counter(engine, "a") == 5


def test_a_member_named_twice_is_the_one_the_error_names():
    with pytest.raises(DuplicateNameError) as raised:
        decode_json(b'{"b": 1, "a": 1, "a": 2}')
    assert str(raised.value) == "a"


def test_an_unexpected_outcome_is_a_500_and_no_refusal_of_the_increment(app_parts, caplog):
    """The lane hands over an error parse_increment never meant (test_an_unexpected_error_in_one_
    lane_request_is_its_own): the app's 500, logged, and counted under no reason a client caused."""
    app, _, metrics = app_parts
    client = falcon.testing.TestClient(app)
    with caplog.at_level(logging.ERROR):
        got = client.simulate_post("/increment", extras={daemon.app.PREFETCHED_ANSWER: RuntimeError("unforeseen")})
    assert got.status_code == 500 and "unforeseen" not in got.text
    assert "unforeseen" in caplog.text
    assert {reason: rejected(metrics, reason) for reason in INCREMENT_REJECTIONS} == dict.fromkeys(INCREMENT_REJECTIONS, 0)


def test_a_read_waits_for_a_place_that_frees_up_and_gets_it_back_when_it_fails():
    reads = DatabaseReads(limit=1)
    with pytest.raises(DatabaseUnavailableError), reads.room():
        raise DatabaseUnavailableError("down")  # the read failed: its place is free again
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reads.room():
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(10)
        threading.Timer(0.3, release.set).start()  # well within WAIT_SECONDS
        started = time.monotonic()
        with reads.room():
            waited = time.monotonic() - started
    finally:
        release.set()
        holder.join(10)
    assert 0.2 < waited < DatabaseReads.WAIT_SECONDS
