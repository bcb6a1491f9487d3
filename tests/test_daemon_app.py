"""The Falcon app in-process (falcon.testing) on SQLite and PostgreSQL: every endpoint, status
and error body."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import falcon.testing
import pytest
import sqlalchemy as sa

import daemon.resources
from daemon.app import ARRIVED_AT, PREFETCHED_ANSWER, DatabaseUnavailableAnswers, create_app, new_batchers
from daemon.batcher import IncrementKind
from daemon.metrics import INCREMENT_REJECTIONS, Metrics
from daemon.openapi import openapi_document
from daemon.resources import WriteHealth
from daemon.throttle import LogThrottle
from maxtwo_cli.core import db, schema
from maxtwo_cli.core.counters import increment
from maxtwo_cli.core.errors import DatabaseBusyError, DatabaseUnavailableError
from maxtwo_cli.core.query import query_users
from maxtwo_cli.core.randomize import randomize_points
from maxtwo_cli.core.seed import seed_users
from maxtwo_cli.core.settings import Settings
from tests.helpers import set_max_number, state, unreachable_settings


@pytest.fixture
def client(settings, engine):
    seed_users(engine, 2000)
    randomize_points(engine)
    return falcon.testing.TestClient(create_app(settings, engine))


def test_get_root_is_the_core_query(client, engine):
    first = client.simulate_get("/")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json["timestamp"] is None
    assert 1 <= len(first.json["users"]) <= 2 or state(engine).max_number == 100
    second = client.simulate_get("/")
    assert second.json["timestamp"] is not None
    # The same chain at full precision in the headers.
    assert "x-maxtwo-previous-at" not in first.headers
    assert second.headers["x-maxtwo-previous-at"] == first.headers["x-maxtwo-recorded-at"]
    assert second.json["timestamp"] == first.headers["x-maxtwo-recorded-at"][:19].replace("T", " ") + "Z"
    assert second.json["users"] == first.json["users"]  # same epoch, same answer
    max_number = state(engine).max_number
    assert all(user["points"] > max_number for user in second.json["users"])


def test_body_is_exactly_the_documented_shape(client):
    client.simulate_get("/")
    body = client.simulate_get("/").text
    assert body.startswith('{"users": [')
    assert '], "timestamp": "' in body and body.endswith('Z"}')


def test_a_new_epoch_changes_the_answer_the_cache_holds(client, engine):
    set_max_number(engine, 0)
    randomize_points(engine)
    before = client.simulate_get("/").json["users"]
    for _ in range(5):
        randomize_points(engine)
        set_max_number(engine, 0)
        # Different epoch: the app must not serve its cached users (which would be `before`).
        after = client.simulate_get("/").json["users"]
        if after != before:
            break
    assert after != before


def test_healthz(client):
    result = client.simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json == {"status": "ok"}


def test_healthz_keeps_the_database_out_of_its_answer(settings, engine, monkeypatch, caplog):
    # A timeout is a DatabaseBusyError, as a full read room is; its text names the database.
    def timed_out(_engine):
        raise DatabaseBusyError("the database at postgresql+psycopg://maxtwo:***@db-host:5432/maxtwo did not "
                                "answer in time (canceling statement due to statement timeout)")

    monkeypatch.setattr(daemon.resources, "writes_refused", timed_out)
    result = falcon.testing.TestClient(create_app(settings, engine)).simulate_get("/healthz")
    assert result.status_code == 503
    assert result.json == {"status": "unavailable", "description": "the database does not answer"}
    assert "db-host" in caplog.text  # the log has it


def test_failed_health_checks_are_logged_once_in_ten_seconds(database_url, tmp_path, caplog):
    """A line per failed check was 1,170 lines a second from 4 probing clients (an audit): past
    journald's rate limit, which then drops the lines that tell the outage."""
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    with caplog.at_level(logging.WARNING, logger="daemon.resources"):
        statuses = {client.simulate_get("/healthz").status_code for _ in range(10)}
    engine.dispose()
    assert statuses == {503}
    assert len([record for record in caplog.records if "health check failed" in record.getMessage()]) == 1


def _healthz_refused(settings, engine, caplog) -> str:
    """The log's reason, once /healthz answered 503 for a database that refuses writes."""
    result = falcon.testing.TestClient(create_app(settings, engine)).simulate_get("/healthz")
    assert result.status_code == 503 and result.headers["retry-after"] == "5"
    assert result.json == {"status": "unavailable",
                           "description": "the database answers but refuses this server's writes"}
    [record] = [r for r in caplog.records if "refuses writes" in r.getMessage()]
    return record.getMessage()


def _with_options(postgres_url: str, options: str) -> Settings:
    url = sa.make_url(postgres_url)
    url = url.update_query_dict({"options": f"{url.query['options']} {options}"})
    return Settings(database_url=url.render_as_string(hide_password=False))


@contextlib.contextmanager
def _role_granted(postgres_engine, postgres_url, *grants: str) -> Iterator[Settings]:
    """Settings whose sessions act as a new role given `grants` ("{role}" in each names it):
    the server's own role is a superuser, which may do everything."""
    role = f"test_role_{uuid.uuid4().hex[:12]}"
    with postgres_engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} NOLOGIN")
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {conn.exec_driver_sql('SELECT current_schema()').scalar()} TO {role}")
        for grant in grants:
            conn.exec_driver_sql(grant.format(role=role))
    try:
        yield _with_options(postgres_url, f"-crole={role}")
    finally:
        with postgres_engine.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


def test_healthz_fails_when_the_role_may_not_write(postgres_engine, postgres_url, caplog):
    with _role_granted(postgres_engine, postgres_url,
                       "GRANT SELECT, UPDATE ON users, randomizer_state, query_state TO {role}",
                       "GRANT SELECT, INSERT, UPDATE, DELETE ON counters, idempotency_keys TO {role}",
                       "REVOKE UPDATE ON query_state FROM {role}",
                       "REVOKE INSERT ON counters FROM {role}") as settings:
        engine = db.create_engine(settings)
        try:
            assert "lacks UPDATE on query_state, INSERT on counters" in _healthz_refused(settings, engine, caplog)
        finally:
            engine.dispose()


def test_privileges_granted_column_by_column_are_enough(postgres_engine, postgres_url):
    """A role granted INSERT and UPDATE on the columns maxtwo writes, not on whole tables, is
    not refused (any column's privilege will do; DELETE is the table's alone), and it writes."""
    with _role_granted(postgres_engine, postgres_url,
                       "GRANT SELECT ON users, randomizer_state, query_state, counters, idempotency_keys TO {role}",
                       "GRANT UPDATE (points, updated_at) ON users TO {role}",
                       "GRANT UPDATE ON randomizer_state, query_state TO {role}",
                       "GRANT INSERT (key, value), UPDATE (value) ON counters TO {role}",
                       "GRANT INSERT, UPDATE, DELETE ON idempotency_keys TO {role}") as settings:
        engine = db.create_engine(settings)
        try:
            assert schema.writes_refused(engine) is None
            assert increment(engine, "granted by column", 3).total == 3
        finally:
            engine.dispose()


def test_healthz_fails_on_a_read_only_server(postgres_engine, postgres_url, caplog):
    settings = _with_options(postgres_url, "-cdefault_transaction_read_only=on")
    engine = db.create_engine(settings)
    try:
        assert "takes no writes" in _healthz_refused(settings, engine, caplog)
    finally:
        engine.dispose()


@contextlib.contextmanager
def _not_writable(path: Path) -> Iterator[None]:
    """`path` refused to writes, for root too (whom permissions do not stop): chattr +i, as a
    read-only remount would."""
    root = os.geteuid() == 0
    if root:
        done = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True, encoding="utf-8")
        if done.returncode != 0:
            pytest.fail(f"this test needs chattr on a file system that supports it: {done.stderr.strip()}")
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
        else:
            path.chmod(mode)


def test_healthz_fails_when_a_sqlite_file_is_not_writable(tmp_path, caplog):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}")
    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    query_file = tmp_path / "maxtwo.db-query"
    try:
        with _not_writable(query_file):
            assert f"{query_file} is not writable" in _healthz_refused(settings, engine, caplog)
    finally:
        engine.dispose()


def test_healthz_fails_when_a_sqlite_directory_is_not_writable(tmp_path, caplog):
    """Every file writable, the directory not: SQLite cannot make the journals it keeps there
    (the WAL and its index, made again each time the last connection has removed them)."""
    directory = tmp_path / "data"
    directory.mkdir()
    settings = Settings(database_url=f"sqlite:///{directory / 'maxtwo.db'}")
    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    try:
        with _not_writable(directory):
            assert f"the directory {directory} is not writable" in _healthz_refused(settings, engine, caplog)
    finally:
        engine.dispose()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_write_health_fails_only_while_every_write_keeps_failing():
    clock = FakeClock()
    writes = WriteHealth(clock)
    assert writes.failing_for() is None
    writes.failed()
    assert writes.failing_for() is None  # one failure proves little
    clock.now += 0.5
    writes.failed()
    assert writes.failing_for() is None
    clock.now += 0.5
    writes.failed()  # failing for 1 s, nothing committed in between
    assert writes.failing_for() == 1.0
    clock.now += WriteHealth.RECENT_SECONDS - 0.5
    assert writes.failing_for() == WriteHealth.RECENT_SECONDS + 0.5
    clock.now += 0.5  # no failure for RECENT_SECONDS: requests may come back, and show
    assert writes.failing_for() is None
    writes.failed()  # and they failed again: a new spell, which one failure does not make
    assert writes.failing_for() is None
    clock.now += 1
    writes.failed()
    assert writes.failing_for() == 1.0
    writes.committed()  # some writes work
    assert writes.failing_for() is None
    writes.failed()
    clock.now += 5
    writes.committed()
    writes.failed()
    assert writes.failing_for() is None  # a failure now and then, commits between them
    clock.now += 3600
    writes.failed()  # an hour later, no commit in between: a new spell all the same
    assert writes.failing_for() is None


def _post_for(client, seconds: float) -> set[int]:
    """POST /increment back to back for `seconds`; the statuses answered."""
    statuses, started = set(), time.monotonic()
    while time.monotonic() - started < seconds:
        statuses.add(client.simulate_post("/increment", json={"key": "a", "value": 1}).status_code)
    return statuses


def test_healthz_fails_while_every_write_fails_though_the_database_answers(settings, engine, monkeypatch, caplog):
    # A full disk or an I/O error fails every write while every check that writes nothing
    # passes (tests/test_fault.py fills a real disk; here the kinds fail as they then do).
    monkeypatch.setattr(WriteHealth, "FAILING_SECONDS", 0.2)
    seed_users(engine, 100)
    client = falcon.testing.TestClient(create_app(settings, engine))
    assert client.simulate_post("/increment", json={"key": "a", "value": 1}).status_code == 202

    def disk_full(self, held, payloads):
        raise DatabaseUnavailableError("the disk holding the SQLite file is full; free some space and try again")

    with monkeypatch.context() as failing:
        failing.setattr(IncrementKind, "apply", disk_full)
        assert _post_for(client, 0.4) == {503}
        refused = client.simulate_get("/healthz")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json["status"] == "unavailable"
    assert refused.json["description"].startswith("every write of this server has failed for ")
    assert "every write of this server failed" in caplog.text
    assert client.simulate_get("/healthz").status_code == 503  # nothing has shown otherwise yet
    assert client.simulate_post("/increment", json={"key": "a", "value": 1}).status_code == 202
    assert client.simulate_get("/healthz").json == {"status": "ok"}


def test_healthz_holds_while_a_lock_held_elsewhere_fails_the_writes(tmp_path, monkeypatch):
    # A lock fails the same writes on every server sharing the database: /healthz failing for
    # it would take them all out of rotation, and the reads they still serve with them.
    monkeypatch.setattr(WriteHealth, "FAILING_SECONDS", 0.2)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'maxtwo.db'}", statement_timeout=0.1)
    engine = db.create_engine(settings)
    schema.ensure_schema(engine)
    seed_users(engine, 100)
    client = falcon.testing.TestClient(create_app(settings, engine))
    holder = sqlite3.connect(tmp_path / "maxtwo.db-query", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        assert _post_for(client, 0.6) == {503}
        assert client.simulate_get("/healthz").json == {"status": "ok"}
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def test_metrics(client):
    client.simulate_get("/")
    client.simulate_get("/nope")
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain")
    text = result.text
    assert 'maxtwo_http_requests_total{method="GET",route="/",status="200"} 1.0' in text
    assert 'maxtwo_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    for name in (
        "maxtwo_http_request_duration_seconds_bucket",
        "maxtwo_randomize_duration_seconds",
        "maxtwo_randomize_last_success_timestamp_seconds",
        "maxtwo_randomize_failures_total",
        'maxtwo_randomize_skipped_total{reason="overlap"}',
        "maxtwo_epoch",
    ):
        assert name in text


def test_every_reason_an_increment_is_refused_for_is_a_series_from_the_start(client):
    """At 0 before the first refusal: a series that appears only then makes rate() and alerts
    on it miss that first one."""
    text = client.simulate_get("/metrics").text
    for reason in INCREMENT_REJECTIONS:
        assert f'maxtwo_increments_rejected_total{{reason="{reason}"}} 0.0' in text
    assert len(INCREMENT_REJECTIONS) >= 6


def test_the_epoch_gauge_follows_get_root_and_never_goes_back(settings, engine):
    """A request thread late with an older epoch's answer must not set it back."""
    seed_users(engine, 100)
    metrics = Metrics()
    client = falcon.testing.TestClient(create_app(settings, engine, metrics=metrics))
    client.simulate_get("/")
    assert metrics.registry.get_sample_value("maxtwo_epoch") == state(engine).epoch
    older = query_users(engine)
    randomize_points(engine)
    client.simulate_get("/")
    assert metrics.registry.get_sample_value("maxtwo_epoch") == older.epoch + 1
    assert client.simulate_get("/", extras={PREFETCHED_ANSWER: older}).status_code == 200
    assert metrics.registry.get_sample_value("maxtwo_epoch") == older.epoch + 1


def test_openapi_document(client):
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 200
    document = result.json
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/", "/increment", "/counters/{key}", "/healthz", "/metrics", "/openapi.json"}
    assert document == openapi_document()


@pytest.mark.parametrize("path", ["/nope", "/users/1", "/" + "x" * 2000])
def test_unknown_paths_are_json_404(client, path):
    result = client.simulate_get(path)
    assert result.status_code == 404
    assert result.headers["content-type"] == "application/json"
    assert result.json["status"] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/", "/healthz", "/metrics", "/openapi.json"])
def test_wrong_methods_are_json_405(client, method, path):
    result = client.simulate_request(method, path)
    assert result.status_code == 405
    assert result.json["status"] == 405
    assert "GET" in result.headers["allow"]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/openapi.json"])
def test_head_answers_as_get_without_the_body(client, path):
    get = client.simulate_get(path)
    head = client.simulate_head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_of_a_counter_and_of_one_never_incremented(client):
    assert client.simulate_post("/increment", json={"key": "a/b", "value": 2}).status_code == 202
    head = client.simulate_head("/counters/a%2Fb")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["cache-control"] == "no-store"
    assert client.simulate_head("/counters/never").status_code == 404


def test_head_of_the_query_is_refused_for_it_would_record_a_query(client):
    result = client.simulate_head("/")
    assert result.status_code == 405
    assert "HEAD" not in result.headers["allow"] and "GET" in result.headers["allow"]
    assert client.simulate_get("/").json["timestamp"] is None  # no query was recorded


def test_errors_are_json_even_when_the_client_asks_for_xml(client):
    result = client.simulate_get("/nope", headers={"Accept": "application/xml"})
    assert result.status_code == 404
    assert result.headers["content-type"] == "application/json"


def test_unexpected_errors_are_a_generic_500_with_the_traceback_in_the_log(settings, engine, caplog):
    app = create_app(settings, engine)

    class Broken:
        def on_get(self, req, resp):
            raise RuntimeError("secret internals")

    app.add_route("/broken", Broken())
    with caplog.at_level(logging.ERROR):
        result = falcon.testing.TestClient(app).simulate_get("/broken")
    assert result.status_code == 500
    assert result.json["status"] == 500
    assert "secret internals" not in result.text
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_every_error_is_titled_with_its_status_line(settings, engine):
    """falcon titles some of its errors otherwise (its unknown-method answer "Bad request"); the
    API's errors all have the status line as title, and such a title becomes the description."""
    app = create_app(settings, engine)

    class Titled:
        def on_get(self, req, resp):
            raise falcon.HTTPBadRequest(title="Bad request")

    app.add_route("/titled", Titled())
    client = falcon.testing.TestClient(app)
    assert client.simulate_get("/titled").json == {"status": 400, "title": "400 Bad Request", "description": "Bad request"}
    assert client.simulate_get("/nope").json["title"] == "404 Not Found"


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # falcon.testing's WSGI validator: the point
@pytest.mark.parametrize("path", ["/", "/healthz", "/nope"])
def test_an_unknown_method_is_501(client, path):
    # RFC 9110 section 9.1: a method the server does not recognize SHOULD get 501 (falcon's is 400).
    got = client.simulate_request("FOO", path)
    assert got.status_code == 501
    assert got.json == {"status": 501, "title": "501 Not Implemented",
                        "description": "the request method is not one this server implements"}


def test_a_path_is_logged_with_its_control_characters_escaped(database_url, tmp_path, caplog):
    """A client chooses the path: a newline in it would forge a log line, ESC drive a terminal."""
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    with caplog.at_level(logging.WARNING):
        got = client.simulate_get("/counters/a%0A2026-12-05 CRITICAL forged%1B[2J")
    engine.dispose()
    assert got.status_code == 503
    [message] = [record.getMessage() for record in caplog.records if "503" in record.getMessage()]
    assert "\n" not in message and "\x1b" not in message
    assert "'/counters/a\\n2026-12-05 CRITICAL forged\\x1b[2J'" in message


def test_an_outage_logs_a_line_every_ten_seconds_not_one_per_request(database_url, tmp_path, caplog):
    """A line per 503 was 1,400 lines a second from 4 clients: past journald's rate limit, which
    then drops the lines that tell the outage."""
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    with caplog.at_level(logging.WARNING, logger="daemon.app"):
        statuses = {client.simulate_get(path).status_code for path in ("/", "/counters/a") * 10}
    engine.dispose()
    assert statuses == {503}
    assert len([record for record in caplog.records if ": 503: " in record.getMessage()]) == 1

    now = [1000.0]
    answers = DatabaseUnavailableAnswers(clock=lambda: now[0])
    request = falcon.testing.create_req(path="/")
    lines = []
    for at in (1000.0, 1001.0, 1009.9, 1010.0, 1011.0, 1030.0):
        now[0] = at
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="daemon.app"), pytest.raises(falcon.HTTPServiceUnavailable):
            answers(request, None, DatabaseUnavailableError("down"), {})
        lines += [(at, record.getMessage()) for record in caplog.records]
    assert lines == [
        (1000.0, "GET '/': 503: down"),
        (1010.0, "GET '/': 503: down (2 more 503s for the database, any route, since the last such line)"),
        # (An earlier outage's, maybe: the line says when, rather than seem to follow them.)
        (1030.0, "GET '/': 503: down (1 more 503 for the database, any route, since the last such line, the last of them 19 s ago)"),
    ]


def test_database_unreachable_is_a_503_json_that_reveals_nothing(database_url, tmp_path):
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))

    query = client.simulate_get("/")
    assert query.status_code == 503
    assert query.json["status"] == 503
    assert query.headers["retry-after"] == "5"
    assert query.headers["cache-control"] == "no-store"  # an error of GET / is no more cacheable
    assert "s3cret" not in query.text and "127.0.0.1" not in query.text and "maxtwo.db" not in query.text

    # Every 503 the document says carries Retry-After does.
    requests = {
        ("/", "get"): {},
        ("/healthz", "get"): {},
        ("/increment", "post"): {"json": {"key": "a", "value": 1}},
        ("/counters/{key}", "get"): {"path": "/counters/a"},
        ("/healthz", "head"): {},
        ("/counters/{key}", "head"): {"path": "/counters/a"},
    }
    for path, operations in openapi_document()["paths"].items():
        for method, operation in operations.items():
            if "Retry-After" in operation["responses"].get("503", {}).get("headers", {}):
                kwargs = dict(requests.pop((path, method)))
                answer = client.simulate_request(method.upper(), kwargs.pop("path", path), **kwargs)
                assert (answer.status_code, answer.headers.get("retry-after")) == (503, "5"), (path, method)
    assert not requests  # each of them declared it

    health = client.simulate_get("/healthz")
    assert health.status_code == 503
    assert health.json["status"] == "unavailable"

    metrics = client.simulate_get("/metrics")
    assert metrics.status_code == 200
    assert 'route="/",status="503"' in metrics.text
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # wsgiref's validator; the point
def test_unknown_methods_do_not_make_new_metric_series(client):
    for method in ("X0ZZ", "X1ZZ", "BREW"):
        assert client.simulate_request(method, "/").status_code == 501
    text = client.simulate_get("/metrics").text
    assert 'method="OTHER"' in text
    assert "X0ZZ" not in text and "BREW" not in text


@pytest.mark.parametrize("path", ["/", "/increment", "/counters/a", "/healthz", "/metrics", "/openapi.json"])
def test_options_and_405_name_the_same_methods(client, path):
    """falcon's OPTIONS answer left OPTIONS out of Allow, where its 405 put it in (an audit)."""
    options = client.simulate_options(path)
    refused = client.simulate_request("DELETE", path)
    assert options.status_code == 200 and refused.status_code == 405
    assert options.headers["allow"] == refused.headers["allow"]
    assert "OPTIONS" in options.headers["allow"].split(", ")


def test_create_app_refuses_batchers_without_the_write_health_they_tell(settings, engine):
    metrics, writes = Metrics(), WriteHealth()
    batchers = new_batchers(settings, engine, metrics, writes)
    try:
        with pytest.raises(TypeError, match="writes="):
            create_app(settings, engine, metrics=metrics, batchers=batchers)
    finally:
        batchers.close(5)


def test_requests_are_counted_by_status_on_the_same_route(client):
    """The series' children are kept by (route, method, status): a 404 and then a 200 of one
    route are two series."""
    assert client.simulate_get("/counters/never").status_code == 404
    assert client.simulate_post("/increment", json={"key": "k", "value": 1}).status_code == 202
    assert client.simulate_get("/counters/k").status_code == 200
    assert client.simulate_get("/counters/never").status_code == 404
    text = client.simulate_get("/metrics").text
    assert 'maxtwo_http_requests_total{method="GET",route="/counters/{key:path}",status="404"} 2.0' in text
    assert 'maxtwo_http_requests_total{method="GET",route="/counters/{key:path}",status="200"} 1.0' in text


def test_a_request_s_latency_counts_from_its_arrival_and_is_timed_per_route(settings, engine):
    """A lane request waited for its batch before the app saw it: its latency counts from
    ARRIVED_AT, which the server sets, not from when the app took it."""
    metrics = Metrics()
    client = falcon.testing.TestClient(create_app(settings, engine, metrics=metrics))
    assert client.simulate_get("/openapi.json", extras={ARRIVED_AT: time.perf_counter() - 3.0}).status_code == 200
    assert client.simulate_get("/metrics").status_code == 200
    sample = metrics.registry.get_sample_value
    assert sample("maxtwo_http_request_duration_seconds_sum", {"route": "/openapi.json"}) >= 3.0
    assert sample("maxtwo_http_request_duration_seconds_count", {"route": "/openapi.json"}) == 1
    assert 0 < sample("maxtwo_http_request_duration_seconds_sum", {"route": "/metrics"}) < 3.0


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # wsgiref's validator
def test_a_webdav_method_falcon_knows_is_405_not_501(client):
    """falcon knows WebDAV's methods too: one of them is a method this server recognizes and the
    path does not support (405, counted under its name), not an unknown one (501, "OTHER")."""
    got = client.simulate_request("PROPFIND", "/healthz")
    assert got.status_code == 405 and got.json["status"] == 405
    text = client.simulate_get("/metrics").text
    assert 'maxtwo_http_requests_total{method="PROPFIND",route="/healthz",status="405"} 1.0' in text


def test_errors_falcon_raises_without_a_description_get_none(client):
    """Titled with the status line, an error has no description to repeat it in."""
    assert client.simulate_get("/nope").json == {"status": 404, "title": "404 Not Found"}
    assert client.simulate_delete("/healthz").json == {"status": 405, "title": "405 Method Not Allowed"}


def test_get_root_answers_the_outcome_the_server_fetched_ahead(settings, engine):
    """The lane's GET / comes with its answer (or its error) already fetched: the resource
    answers it as it is, and records no query of its own."""
    seed_users(engine, 100)
    client = falcon.testing.TestClient(create_app(settings, engine))
    fetched = query_users(engine)
    got = client.simulate_get("/", extras={PREFETCHED_ANSWER: fetched})
    assert got.status_code == 200 and got.text == fetched.api_json()
    assert got.headers["x-maxtwo-recorded-at"] == fetched.recorded_text
    assert query_users(engine).previous == fetched.recorded_at  # no query in between
    failed = client.simulate_get("/", extras={PREFETCHED_ANSWER: DatabaseUnavailableError("down")})
    assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
    assert failed.headers["cache-control"] == "no-store"


def test_write_health_holds_for_the_ten_seconds_docs_design_md_gives():
    """docs/design.md: 503 once every batch has failed for 1 s, until 10 s after the last failure."""
    clock = FakeClock()
    writes = WriteHealth(clock)
    writes.failed()
    clock.now += 1.0
    writes.failed()
    clock.now += 9.5
    assert writes.failing_for() == 10.5
    clock.now += 0.5
    assert writes.failing_for() is None


def test_failed_health_checks_are_logged_every_ten_seconds(database_url, tmp_path, caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(daemon.resources, "LogThrottle", functools.partial(LogThrottle, clock=lambda: now[0]))
    settings = unreachable_settings(database_url, tmp_path)
    engine = db.create_engine(settings)
    client = falcon.testing.TestClient(create_app(settings, engine))
    logged = []
    for at in (1000.0, 1009.5, 1010.0):
        now[0] = at
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="daemon.resources"):
            assert client.simulate_get("/healthz").status_code == 503
        logged += [at for record in caplog.records if "health check failed" in record.getMessage()]
    engine.dispose()
    assert logged == [1000.0, 1010.0]
